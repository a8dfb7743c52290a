// The process caches of descriptors and plans (cuda/common/cache.h), without a GPU:
//   - a key is built once, however many threads ask for it at once, and all share the value;
//   - a build holds only its own key: a call for another key completes while it runs (a
//     plan search can take seconds, and must not stall every other initialize);
//   - a failed build caches nothing: the next call builds again.
// tests/test_cpp.py builds and runs it; it prints "cache: N checks passed".
#include "common/cache.h"

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include "checks.h"

namespace {

using checks::Check;

struct Value {
  int number = 0;
};

using Cache = jaxdnn::KeyedCache<Value>;
using jaxdnn::CacheKey;

CacheKey Key(const char* name) {
  CacheKey key;
  key.Add(name);
  return key;
}

}  // namespace

int main() {
  using namespace std::chrono_literals;

  // Sixteen threads ask for one key at once: one build, one shared value.
  {
    Cache cache;
    std::atomic<int> builds{0};
    std::vector<std::shared_ptr<const Value>> got(16);
    std::vector<std::thread> threads;
    for (int t = 0; t < 16; ++t)
      threads.emplace_back([&, t] {
        cache.GetOrBuild(
            Key("one"),
            [&](Value* v) {
              ++builds;
              std::this_thread::sleep_for(20ms);  // others arrive while it builds
              v->number = 7;
              return jaxdnn::ffi::Error::Success();
            },
            &got[t]);
      });
    for (std::thread& thread : threads) thread.join();
    Check(builds == 1, "a key asked for by 16 threads at once is built once");
    bool shared = true;
    for (const auto& value : got) shared = shared && value == got[0] && value->number == 7;
    Check(shared, "every thread gets the one value");
  }

  // Key A's build waits until key B's call has returned: with one lock for all keys, B
  // would wait for A and the test would time out below instead.
  {
    Cache cache;
    std::promise<void> a_started, b_done;
    std::shared_future<void> b_done_future = b_done.get_future().share();
    std::thread a([&] {
      std::shared_ptr<const Value> out;
      cache.GetOrBuild(
          Key("a"),
          [&](Value* v) {
            a_started.set_value();
            b_done_future.wait_for(10s);
            v->number = 1;
            return jaxdnn::ffi::Error::Success();
          },
          &out);
    });
    a_started.get_future().wait();
    auto b = std::async(std::launch::async, [&] {
      std::shared_ptr<const Value> out;
      jaxdnn::ffi::Error error = cache.GetOrBuild(
          Key("b"),
          [](Value* v) {
            v->number = 2;
            return jaxdnn::ffi::Error::Success();
          },
          &out);
      return error.success() && out->number == 2;
    });
    const bool b_finished = b.wait_for(5s) == std::future_status::ready;
    Check(b_finished, "another key's call completes while a build runs");
    b_done.set_value();
    Check(b.get(), "that call gets its own value");
    a.join();
  }

  // A failed build leaves nothing behind; the next call builds again, and then it is kept.
  {
    Cache cache;
    int builds = 0;
    std::shared_ptr<const Value> out;
    jaxdnn::ffi::Error first = cache.GetOrBuild(
        Key("flaky"),
        [&](Value*) {
          ++builds;
          return jaxdnn::ffi::Error(jaxdnn::ffi::ErrorCode::kInternal, "no plan");
        },
        &out);
    Check(first.failure() && first.message() == "no plan" && out == nullptr,
          "a failed build returns its error and no value");
    auto build = [&](Value* v) {
      ++builds;
      v->number = 3;
      return jaxdnn::ffi::Error::Success();
    };
    Check(cache.GetOrBuild(Key("flaky"), build, &out).success() && out->number == 3,
          "the next call builds again");
    Check(cache.GetOrBuild(Key("flaky"), build, &out).success() && builds == 2,
          "a successful build is kept");
  }

  return checks::Report("cache");
}
