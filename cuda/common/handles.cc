#include "common/handles.h"

#include <map>
#include <mutex>
#include <vector>

namespace jaxdnn {
namespace {

struct DeviceHandles {
  std::vector<cudnnHandle_t> free;
};

std::mutex& PoolMutex() {
  static std::mutex mutex;
  return mutex;
}

// Never destroyed (see handles.h): a leaked heap map outlives static destruction.
std::map<int, DeviceHandles>& Pool() {
  static auto* pool = new std::map<int, DeviceHandles>();
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

ffi::Error ReserveCudnnHandle(const char* op, int device) {
  std::lock_guard<std::mutex> lock(PoolMutex());
  DeviceHandles& handles = Pool()[device];
  if (!handles.free.empty()) return ffi::Error::Success();
  ScopedDevice scoped(device);
  cudnnHandle_t created = nullptr;
  JAXDNN_RETURN_IF_CUDNN_ERROR(op, cudnnCreate(&created));
  handles.free.push_back(created);
  return ffi::Error::Success();
}

BorrowedCudnnHandle::BorrowedCudnnHandle(const char* op, int device, cudaStream_t stream)
    : device_(device) {
  {
    std::lock_guard<std::mutex> lock(PoolMutex());
    auto it = Pool().find(device);
    if (it == Pool().end() || it->second.free.empty()) {
      error_ = ffi::Error::Internal(
          std::string("jaxdnn ") + op +
          ": no free cuDNN handle for this device; the initialize stage did not run before "
          "execute, or more executions run at once than were initialized");
      return;
    }
    handle_ = it->second.free.back();
    it->second.free.pop_back();
  }
  cudnnStatus_t status = cudnnSetStream(handle_, stream);
  if (status != CUDNN_STATUS_SUCCESS) error_ = CudnnError(op, "cudnnSetStream", status);
}

BorrowedCudnnHandle::~BorrowedCudnnHandle() {
  if (handle_ == nullptr) return;
  std::lock_guard<std::mutex> lock(PoolMutex());
  Pool()[device_].free.push_back(handle_);
}

}  // namespace jaxdnn
