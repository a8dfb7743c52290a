// Shared shape of the legacy-API ops (softmax, pooling): a per-instance State parsed from
// the attributes at instantiate, whose descriptors are fetched from the process-wide cache
// at initialize (they depend on buffer shapes, which instantiate cannot see) and then only
// read by execute.
#pragma once

#include <memory>
#include <mutex>

#include "common/handles.h"

namespace jaxdnn {

template <typename Descriptors>
class DescriptorSlot {
 public:
  // Idempotent: the first initialize stores the descriptors, later ones keep them.
  void Set(std::shared_ptr<const Descriptors> descriptors) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!descriptors_) descriptors_ = std::move(descriptors);
  }
  bool empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    return descriptors_ == nullptr;
  }
  // Null when initialize has not run.
  const Descriptors* get() {
    std::lock_guard<std::mutex> lock(mutex_);
    return descriptors_.get();
  }

 private:
  std::mutex mutex_;
  std::shared_ptr<const Descriptors> descriptors_;
};

// The descriptors initialize stored, or an error if it did not run.
template <typename Descriptors>
ffi::Error InitializedDescriptors(const char* op, DescriptorSlot<Descriptors>& slot,
                                  const Descriptors** descriptors) {
  *descriptors = slot.get();
  if (*descriptors == nullptr) {
    return ffi::Error::Internal(std::string("jaxdnn ") + op +
                                ": descriptors missing; the initialize stage did not run");
  }
  return ffi::Error::Success();
}

}  // namespace jaxdnn
