// A process-wide pool of cuDNN handles per device, each bound to one stream for good.
//
// cudnnCreate allocates device memory and may synchronize, so a thread capturing a CUDA
// graph never creates a handle itself: initialize (outside capture) keeps a spare ready, and
// execute makes another where more run at once. Execute borrows an idle handle bound to its
// stream, or binds a spare to it (cudnnSetStream; capture-safe), and gives it back when
// done. Streams are not known ahead: under command buffers XLA executes on a capture stream
// that initialize never saw. Handles live as long as the process: destroying them at exit
// races with the CUDA driver's own teardown, and there are few of them.
#pragma once

#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <cstdint>
#include <map>

#include "common/status.h"

namespace jaxdnn {

// What the pool of one device holds: the handles it made, and the streams they were bound
// to (a handle bound to a stream that is gone stays with it, unused; the soak reports these).
struct CudnnHandleCounts {
  int64_t created = 0;
  int64_t streams = 0;
};
std::map<int, CudnnHandleCounts> CountCudnnHandles();  // by device

// Binds `handle` to `stream` unless it is bound there already: cudnnSetStream records an
// event on the stream the handle leaves, so a needless rebind is work, and one off a stream
// destroyed since crashes. What a launch that moves a borrowed handle calls.
cudnnStatus_t BindCudnnHandle(cudnnHandle_t handle, cudaStream_t stream);

// Initialize stage: make sure `device` has a spare handle for the next execute.
ffi::Error ReserveCudnnHandle(const char* op, int device);

// Execute stage: a handle of `device`, exclusively ours while this object lives, bound to
// `stream`; error() says why none could be borrowed.
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
  cudaStream_t stream_;
  cudnnHandle_t handle_ = nullptr;
  ffi::Error error_;
};

}  // namespace jaxdnn
