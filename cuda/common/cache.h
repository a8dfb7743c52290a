// The process-wide caches of descriptors and plans: one map per value type, keyed by
// everything that shapes the cached object (op, dtype, dims, layout, mode, flags), each key
// built once behind a lock of its own. Values are immutable once built and shared by every
// compiled instance.
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
  // The cached value for `key`, built with `build(Value*)` on a miss. A build holds only its
  // own key's lock, not the map's: calls for other keys go on meanwhile (a plan search may
  // take seconds), calls for the same key wait for it and share its value. A failed build
  // caches nothing: the next call for the key builds again.
  ffi::Error GetOrBuild(const CacheKey& key, const std::function<ffi::Error(Value*)>& build,
                        std::shared_ptr<const Value>* out) {
    std::shared_ptr<Slot> slot;
    {
      std::lock_guard<std::mutex> lock(map_mutex_);
      std::shared_ptr<Slot>& entry = slots_[key.str()];
      if (entry == nullptr) entry = std::make_shared<Slot>();
      slot = entry;
    }
    std::lock_guard<std::mutex> lock(slot->mutex);
    if (slot->value == nullptr) {
      auto value = std::make_shared<Value>();
      JAXDNN_RETURN_IF_ERROR(build(value.get()));
      slot->value = std::move(value);
    }
    *out = slot->value;
    return ffi::Error::Success();
  }

 private:
  struct Slot {
    std::mutex mutex;                    // held while the value is built, and to read it
    std::shared_ptr<const Value> value;  // null until a build succeeds
  };
  std::mutex map_mutex_;  // guards slots_, never held during a build
  std::unordered_map<std::string, std::shared_ptr<Slot>> slots_;
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
