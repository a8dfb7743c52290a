#include "common/handles.h"

#include <map>
#include <mutex>
#include <utility>

namespace jaxdnn {
namespace {

using Key = std::pair<int, cudaStream_t>;

std::mutex& PoolMutex() {
  static std::mutex mutex;
  return mutex;
}

// Never destroyed (see handles.h): a leaked heap map outlives static destruction.
std::map<Key, cudnnHandle_t>& Pool() {
  static auto* pool = new std::map<Key, cudnnHandle_t>();
  return *pool;
}

// Makes `device` current for the lifetime of the object, restoring the previous one.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    if (cudaGetDevice(&previous_) == cudaSuccess && previous_ != device &&
        cudaSetDevice(device) == cudaSuccess) {
      restore_ = true;
    }
  }
  ~ScopedDevice() {
    if (restore_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
  bool restore_ = false;
};

}  // namespace

ffi::Error AcquireCudnnHandle(const char* op, int device, cudaStream_t stream,
                              cudnnHandle_t* handle) {
  std::lock_guard<std::mutex> lock(PoolMutex());
  auto it = Pool().find({device, stream});
  if (it != Pool().end()) {
    *handle = it->second;
    return ffi::Error::Success();
  }
  ScopedDevice scoped(device);
  cudnnHandle_t created = nullptr;
  JAXDNN_RETURN_IF_CUDNN_ERROR(op, cudnnCreate(&created));
  cudnnStatus_t status = cudnnSetStream(created, stream);
  if (status != CUDNN_STATUS_SUCCESS) {
    cudnnDestroy(created);
    return CudnnError(op, "cudnnSetStream", status);
  }
  Pool().emplace(Key{device, stream}, created);
  *handle = created;
  return ffi::Error::Success();
}

ffi::Error LookupCudnnHandle(const char* op, int device, cudaStream_t stream,
                             cudnnHandle_t* handle) {
  std::lock_guard<std::mutex> lock(PoolMutex());
  auto it = Pool().find({device, stream});
  if (it == Pool().end()) {
    return ffi::Error::Internal(std::string("jaxdnn ") + op +
                                ": no cuDNN handle for this device and stream; the "
                                "initialize stage did not run before execute");
  }
  *handle = it->second;
  return ffi::Error::Success();
}

}  // namespace jaxdnn
