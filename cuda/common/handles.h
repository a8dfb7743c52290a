// A process-wide pool of cuDNN handles per device.
//
// cudnnCreate allocates device memory and may synchronize, so handles are only created in
// the initialize stage (outside CUDA-graph capture). Execute borrows a free handle of its
// device, binds it to the stream it runs on (cudnnSetStream only records the stream, which
// is capture-safe) and gives it back when done; handles are not keyed by stream because
// under command buffers XLA executes on a capture stream that initialize never saw.
// Handles live as long as the process: destroying them at exit races with the CUDA
// driver's own teardown, and there are few of them.
#pragma once

#include <cuda_runtime_api.h>
#include <cudnn.h>

#include "common/status.h"

namespace jaxdnn {

// Initialize stage: make sure `device` has a free handle for the next execute.
ffi::Error ReserveCudnnHandle(const char* op, int device);

// Execute stage: a handle of `device`, exclusively ours while this object lives, bound to
// `stream`. Never creates a handle (waits for one in use to come back); error() says why
// none could be borrowed.
class BorrowedCudnnHandle {
 public:
  BorrowedCudnnHandle(const char* op, int device, cudaStream_t stream);
  ~BorrowedCudnnHandle();
  BorrowedCudnnHandle(const BorrowedCudnnHandle&) = delete;
  BorrowedCudnnHandle& operator=(const BorrowedCudnnHandle&) = delete;

  const ffi::Error& error() const { return error_; }
  cudnnHandle_t get() const { return handle_; }

 private:
  int device_;
  cudnnHandle_t handle_ = nullptr;
  ffi::Error error_;
};

}  // namespace jaxdnn
