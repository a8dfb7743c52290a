// Shared shape of the legacy-API ops (softmax, pooling): a per-instance State parsed from
// the attributes at instantiate, whose descriptors are fetched from the process-wide cache
// at initialize (they depend on buffer shapes, which instantiate cannot see) and then only
// read by execute.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>

#include "common/handles.h"

namespace jaxdnn {

// Adds `kResults` (>= 1) buffer results. (Bindings cannot be copied or returned as they
// are, so each step works on the temporary the previous one returned.)
template <size_t kResults, typename Binding>
auto WithResults(Binding&& binding) {
  if constexpr (kResults == 1) {
    return std::move(binding).template Ret<ffi::AnyBuffer>();
  } else {
    return WithResults<kResults - 1>(std::move(binding).template Ret<ffi::AnyBuffer>());
  }
}

// Adds `kOperands` buffer operands, then `kResults` buffer results.
template <size_t kOperands, size_t kResults, typename Binding>
auto WithBuffers(Binding&& binding) {
  if constexpr (kOperands == 0) {
    return WithResults<kResults>(std::move(binding));
  } else {
    return WithBuffers<kOperands - 1, kResults>(std::move(binding).template Arg<ffi::AnyBuffer>());
  }
}

// The binding the initialize and execute stages of a legacy op share: stream, device
// ordinal, the op's State, `kOperands` buffers and `kResults` results (the op's
// attributes follow, added by the op).
template <typename State, ffi::ExecutionStage stage, size_t kOperands, size_t kResults = 1>
auto LegacyOpBinding() {
  return WithBuffers<kOperands, kResults>(ffi::Ffi::Bind<stage>()
                                              .template Ctx<ffi::PlatformStream<cudaStream_t>>()
                                              .template Ctx<ffi::DeviceOrdinal>()
                                              .template Ctx<ffi::State<State>>());
}

constexpr auto kInitializeStage = ffi::ExecutionStage::kInitialize;
constexpr auto kExecuteStage = ffi::ExecutionStage::kExecute;

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
