// The cuDNN handle pool (cuda/common/handles.cc) against a simulated CUDA and cuDNN: this
// file defines the few runtime and cuDNN functions the pool calls, with streams that can be
// destroyed and captured, and checks the pool's rules without a GPU:
//   - a borrowed handle is exclusive and bound to the borrowing stream;
//   - a handle is never moved off a stream other than by the launch that moved it (and back
//     at once), so cudnnSetStream never records on a stream that may be gone (the crash of
//     RELIABILITY.md: an event recorded on a destroyed stream);
//   - no handle is created on a thread that is capturing a CUDA graph: a spare is made
//     ahead, or another thread makes one.
// tests/test_cpp.py builds and runs it; it prints "handle pool: N checks passed".
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "checks.h"
#include "common/handles.h"

struct cudnnContext {
  cudaStream_t stream = nullptr;
  std::atomic<int> users{0};
};

namespace {

std::mutex fake_mutex;
std::set<cudaStream_t> dead_streams, capturing_streams;
int handles_created = 0, set_stream_calls = 0;
std::vector<std::string> violations;
thread_local bool this_thread_captures = false;  // capture mode is thread-local in XLA

cudaStream_t Stream(uintptr_t id) { return reinterpret_cast<cudaStream_t>(id); }

}  // namespace

extern "C" {
cudnnStatus_t cudnnCreate(cudnnHandle_t* handle) {
  std::lock_guard<std::mutex> lock(fake_mutex);
  if (this_thread_captures) violations.push_back("cudnnCreate while this thread captures");
  *handle = new cudnnContext();
  ++handles_created;
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnSetStream(cudnnHandle_t handle, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(fake_mutex);
  ++set_stream_calls;
  // what crashed: cuDNN records an event on the previous stream
  if (dead_streams.count(handle->stream) != 0)
    violations.push_back("cudnnSetStream moved a handle off a destroyed stream");
  handle->stream = stream;
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnGetStream(cudnnHandle_t handle, cudaStream_t* stream) {
  std::lock_guard<std::mutex> lock(fake_mutex);
  *stream = handle->stream;
  return CUDNN_STATUS_SUCCESS;
}
const char* cudnnGetErrorString(cudnnStatus_t) { return "CUDNN_STATUS_SIMULATED"; }
void cudnnGetLastErrorString(char* message, size_t max_size) {
  if (max_size > 0) message[0] = '\0';
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "cudaErrorSimulated"; }
const char* cudaGetErrorString(cudaError_t) { return "simulated"; }
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  std::lock_guard<std::mutex> lock(fake_mutex);
  *status = capturing_streams.count(stream) != 0 ? cudaStreamCaptureStatusActive
                                                 : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
}  // extern "C"

namespace {

using checks::Check;

// Marks `stream` as being captured by this thread while the object lives.
class Capture {
 public:
  explicit Capture(cudaStream_t stream) : stream_(stream) {
    std::lock_guard<std::mutex> lock(fake_mutex);
    capturing_streams.insert(stream);
    this_thread_captures = true;
  }
  ~Capture() {
    std::lock_guard<std::mutex> lock(fake_mutex);
    capturing_streams.erase(stream_);
    this_thread_captures = false;
  }

 private:
  cudaStream_t stream_;
};

// One execution: initialize (reserve; outside capture) then execute (borrow) on `stream`,
// captured when `captured`; `during` runs while the handle is held.
template <typename During>
void Execution(int device, cudaStream_t stream, bool captured, During&& during) {
  Check(jaxdnn::ReserveCudnnHandle("test", device).success(), "reserve succeeds");
  std::unique_ptr<Capture> capture(captured ? new Capture(stream) : nullptr);
  jaxdnn::BorrowedCudnnHandle handle("test", device, stream);
  Check(handle.error().success() && handle.get() != nullptr, "borrow succeeds");
  if (handle.get() == nullptr) return;
  Check(handle.get()->users.fetch_add(1) == 0, "a borrowed handle is exclusive");
  Check(handle.get()->stream == stream, "a borrowed handle is bound to its stream");
  during(handle.get());
  handle.get()->users.fetch_sub(1);
}

void Execution(int device, cudaStream_t stream, bool captured = false) {
  Execution(device, stream, captured, [](cudnnHandle_t) {});
}

}  // namespace

int main() {
  const cudaStream_t compute = Stream(0x100), trace = Stream(0x200), capture = Stream(0x300);

  // One stream, one thread: the handle is bound once and reused.
  Execution(0, compute);
  const int set_after_first = set_stream_calls;
  for (int k = 0; k < 10; ++k) Execution(0, compute);
  Check(set_stream_calls == set_after_first, "a handle bound to its stream is not bound again");

  // A stream being captured (XLA tracing a command buffer) gets a spare made ahead.
  Execution(0, trace, /*captured=*/true);
  {
    std::lock_guard<std::mutex> lock(fake_mutex);
    dead_streams.insert(trace);  // XLA destroys its tracing stream
  }
  for (int k = 0; k < 10; ++k) Execution(0, compute);

  // A launch that binds the handle to its own capture stream for a while (GraphCache);
  // the stream goes with its state afterwards.
  Execution(0, compute, false, [&](cudnnHandle_t handle) { cudnnSetStream(handle, capture); });
  {
    std::lock_guard<std::mutex> lock(fake_mutex);
    dead_streams.insert(capture);
  }
  for (int k = 0; k < 10; ++k) Execution(0, compute);

  // Eight threads on one stream and a few on others, some captured, at once, two devices.
  {
    std::vector<std::thread> threads;
    for (int t = 0; t < 12; ++t)
      threads.emplace_back([t, compute] {
        const cudaStream_t stream = t < 8 ? compute : Stream(0x1000 + t);
        for (int k = 0; k < 200; ++k)
          Execution(t % 2, stream, /*captured=*/t >= 10,
                    [](cudnnHandle_t) { std::this_thread::yield(); });
      });
    for (std::thread& thread : threads) thread.join();
  }

  // Under capture, with the stream's one handle busy and the one spare taken: a second
  // borrow gets a handle made on another thread (the capturing thread may not allocate),
  // not one moved off another stream (device 2: a fresh pool).
  {
    const cudaStream_t traced = Stream(0x400);
    Check(jaxdnn::ReserveCudnnHandle("test", 2).success(), "reserve succeeds");
    const int created_before = handles_created;
    std::atomic<bool> holding{false}, release{false};
    cudnnHandle_t held = nullptr, got = nullptr;
    std::thread holder([&] {
      Capture capturing(traced);
      jaxdnn::BorrowedCudnnHandle handle("test", 2, traced);  // takes the spare
      held = handle.get();
      holding = true;
      while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    });
    while (!holding) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    {
      Capture capturing(traced);
      jaxdnn::BorrowedCudnnHandle handle("test", 2, traced);
      got = handle.get();
      Check(handle.error().success() && got != nullptr && got->stream == traced,
            "the second borrow under capture gets a handle bound to its stream");
    }
    release = true;
    holder.join();
    Check(held != nullptr && got != held, "two borrows at once hold two handles");
    Check(handles_created == created_before + 1, "one handle is made for the second borrow");
  }

  int64_t counted = 0;
  for (const auto& [device, counts] : jaxdnn::CountCudnnHandles()) {
    counted += counts.created;
    Check(counts.streams >= 1, "a device's count names the streams its handles were bound to");
  }
  Check(counted == handles_created, "the pool counts every handle it made");

  for (const std::string& violation : violations) Check(false, violation);
  std::printf("handles created: %d, cudnnSetStream calls: %d\n", handles_created, set_stream_calls);
  return checks::Report("handle pool");
}
