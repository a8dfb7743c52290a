// A process-wide pool of cuDNN handles, one per (device, stream).
//
// cudnnCreate allocates device memory and may synchronize, so handles are created in the
// initialize stage (outside CUDA-graph capture) and only looked up in execute. Handles
// live as long as the process: destroying them at exit races with the CUDA driver's own
// teardown, and there are few of them.
#pragma once

#include <cudnn.h>
#include <cuda_runtime_api.h>

#include "common/status.h"

namespace jaxdnn {

// Returns the handle for (device, stream), creating it bound to `stream` if needed.
ffi::Error AcquireCudnnHandle(const char* op, int device, cudaStream_t stream,
                              cudnnHandle_t* handle);

// Returns the handle AcquireCudnnHandle created; an error if there is none (execute must
// never create one).
ffi::Error LookupCudnnHandle(const char* op, int device, cudaStream_t stream,
                             cudnnHandle_t* handle);

}  // namespace jaxdnn
