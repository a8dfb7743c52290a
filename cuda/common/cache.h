// The process-wide caches of descriptors and plans: one map per value type, keyed by
// everything that shapes the cached object (op, dtype, dims, layout, mode, flags), behind
// a mutex. Values are immutable once built and shared by every compiled instance.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "common/status.h"

namespace jaxdnn {

// Builds a cache key by appending fields; every field is followed by a separator so that
// different field sequences never collide.
class CacheKey {
 public:
  CacheKey& Add(std::string_view text) {
    key_.append(text);
    key_.push_back('|');
    return *this;
  }
  CacheKey& Add(int64_t value) { return Add(std::string_view(std::to_string(value))); }
  template <typename Sequence>
  CacheKey& AddAll(const Sequence& values) {
    for (auto v : values) {
      key_.append(std::to_string(v));
      key_.push_back(',');
    }
    key_.push_back('|');
    return *this;
  }
  const std::string& str() const { return key_; }

 private:
  std::string key_;
};

template <typename Value>
class KeyedCache {
 public:
  // The cached value for `key`, built with `build(Value*)` on a miss.
  ffi::Error GetOrBuild(const CacheKey& key, const std::function<ffi::Error(Value*)>& build,
                        std::shared_ptr<const Value>* out) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(key.str());
    if (it == entries_.end()) {
      auto value = std::make_shared<Value>();
      JAXDNN_RETURN_IF_ERROR(build(value.get()));
      it = entries_.emplace(key.str(), std::move(value)).first;
    }
    *out = it->second;
    return ffi::Error::Success();
  }

 private:
  std::mutex mutex_;
  std::unordered_map<std::string, std::shared_ptr<const Value>> entries_;
};

// The one cache of `Value`s in the process (keys of values shared by several ops, such
// as frontend plans, begin with the op's name). Never destroyed: values may hold cuDNN
// objects, which must not be destroyed after the driver's own teardown.
template <typename Value>
KeyedCache<Value>& ProcessCache() {
  static auto* cache = new KeyedCache<Value>();
  return *cache;
}

}  // namespace jaxdnn
