#include "common/handles.h"

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

namespace jaxdnn {
namespace {

struct DeviceHandles {
  std::vector<cudnnHandle_t> free;
  int created = 0;
};

std::mutex& PoolMutex() {
  static std::mutex mutex;
  return mutex;
}

// Signalled when a handle goes back to the pool.
std::condition_variable& HandleReturned() {
  static auto* returned = new std::condition_variable();
  return *returned;
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

// JAXDNN_MAX_CUDNN_HANDLES, a diagnosis: at most this many handles per device, so that at
// most this many jaxdnn cuDNN calls of a device are enqueued at once (1: one at a time, as
// PyTorch runs its cuDNN RNN calls); unset or 0: a handle for every call that runs at once.
int MaxHandles() {
  static const int max_handles = [] {
    const char* value = std::getenv("JAXDNN_MAX_CUDNN_HANDLES");
    return value != nullptr ? std::atoi(value) : 0;
  }();
  return max_handles;
}

}  // namespace

ffi::Error ReserveCudnnHandle(const char* op, int device) {
  std::lock_guard<std::mutex> lock(PoolMutex());
  DeviceHandles& handles = Pool()[device];
  if (!handles.free.empty()) return ffi::Error::Success();
  // At the bound, execute waits for a handle in use to come back.
  if (MaxHandles() > 0 && handles.created >= MaxHandles()) return ffi::Error::Success();
  ScopedDevice scoped(device);
  cudnnHandle_t created = nullptr;
  JAXDNN_RETURN_IF_CUDNN_ERROR(op, cudnnCreate(&created));
  handles.free.push_back(created);
  ++handles.created;
  return ffi::Error::Success();
}

BorrowedCudnnHandle::BorrowedCudnnHandle(const char* op, int device, cudaStream_t stream)
    : device_(device) {
  {
    std::unique_lock<std::mutex> lock(PoolMutex());
    DeviceHandles& handles = Pool()[device];
    // More executions can run at once than initialize stages reserved handles for: XLA
    // runs one executable from several threads, and inside command buffers it may trace
    // the handler without a fresh initialize. A handle is held only while the launches
    // are enqueued, so wait for one to come back rather than fail (a failed trace has
    // crashed the process inside XLA); the bound only turns a bug into an error.
    bool got = handles.created > 0 &&
               HandleReturned().wait_for(lock, std::chrono::seconds(60),
                                         [&handles] { return !handles.free.empty(); });
    if (!got) {
      error_ = ffi::Error::Internal(
          std::string("jaxdnn ") + op +
          (handles.created == 0
               ? ": no cuDNN handle for this device; the initialize stage did not run "
                 "before execute"
               : ": no cuDNN handle came free in 60 s"));
      return;
    }
    handle_ = handles.free.back();
    handles.free.pop_back();
  }
  cudnnStatus_t status = cudnnSetStream(handle_, stream);
  if (status != CUDNN_STATUS_SUCCESS) error_ = CudnnError(op, "cudnnSetStream", status);
}

BorrowedCudnnHandle::~BorrowedCudnnHandle() {
  if (handle_ == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(PoolMutex());
    Pool()[device_].free.push_back(handle_);
  }
  HandleReturned().notify_one();
}

}  // namespace jaxdnn
