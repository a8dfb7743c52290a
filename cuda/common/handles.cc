#include "common/handles.h"

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <vector>

namespace jaxdnn {
namespace {

// The idle handles of one device, by the stream they are bound to: a handle is bound to one
// stream for good. cudnnSetStream records an event on the handle's previous stream, so moving
// a handle off a stream destroyed since (a GraphCache's capture stream goes with its
// executable; XLA's streams may go too) crashed inside the driver (RELIABILITY.md); a handle
// is therefore only ever bound once, from its creation's null stream, and a stream whose
// handles are all busy takes a spare (jaxlib's own handle pools are keyed by stream too).
struct DeviceHandles {
  std::map<cudaStream_t, std::vector<cudnnHandle_t>> idle;  // nullptr: spares, bound to none
  int waiting = 0;                                          // executions waiting for a handle
};

std::mutex& PoolMutex() {
  static std::mutex mutex;
  return mutex;
}

// Signalled when a handle becomes idle.
std::condition_variable& HandleIdle() {
  static auto* idle = new std::condition_variable();
  return *idle;
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

// A new spare handle of `device` (PoolMutex held).
ffi::Error AddSpare(const char* op, int device, DeviceHandles& handles) {
  ScopedDevice scoped(device);
  cudnnHandle_t created = nullptr;
  JAXDNN_RETURN_IF_CUDNN_ERROR(op, cudnnCreate(&created));
  handles.idle[nullptr].push_back(created);
  return ffi::Error::Success();
}

bool Capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (stream == nullptr) return false;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;  // unknown: assume the worst (no cudnnCreate)
  }
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace

ffi::Error ReserveCudnnHandle(const char* op, int device) {
  std::lock_guard<std::mutex> lock(PoolMutex());
  DeviceHandles& handles = Pool()[device];
  // One spare for a stream execute has not seen yet (under command buffers XLA executes on a
  // stream of its own), and one more for each execution already waiting.
  while (handles.idle[nullptr].size() < static_cast<size_t>(1 + handles.waiting))
    JAXDNN_RETURN_IF_ERROR(AddSpare(op, device, handles));
  if (handles.waiting > 0) HandleIdle().notify_all();
  return ffi::Error::Success();
}

BorrowedCudnnHandle::BorrowedCudnnHandle(const char* op, int device, cudaStream_t stream)
    : device_(device), stream_(stream) {
  std::unique_lock<std::mutex> lock(PoolMutex());
  DeviceHandles& handles = Pool()[device];
  auto& bound = handles.idle[stream];
  auto& spares = handles.idle[nullptr];
  // More executions can run at once than initialize stages reserved spares for: XLA runs one
  // executable from several threads. Outside capture a spare is created here; inside
  // (cudnnCreate allocates), wait for one to come back rather than fail (a failed trace has
  // crashed the process inside XLA); the bound only turns a bug into an error.
  if (bound.empty() && spares.empty() && !Capturing(stream)) {
    error_ = AddSpare(op, device, handles);
    if (error_.failure()) return;
  }
  ++handles.waiting;
  const bool got = HandleIdle().wait_for(lock, std::chrono::seconds(60),
                                         [&] { return !bound.empty() || !spares.empty(); });
  --handles.waiting;
  if (!got) {
    error_ =
        ffi::Error::Internal(std::string("jaxdnn ") + op + ": no cuDNN handle came free in 60 s");
    return;
  }
  auto& from = bound.empty() ? spares : bound;
  handle_ = from.back();
  from.pop_back();
  if (&from == &bound) return;  // bound to `stream` already
  lock.unlock();
  cudnnStatus_t status = cudnnSetStream(handle_, stream);
  if (status != CUDNN_STATUS_SUCCESS) error_ = CudnnError(op, "cudnnSetStream", status);
}

BorrowedCudnnHandle::~BorrowedCudnnHandle() {
  if (handle_ == nullptr) return;
  // A launch may have bound the handle to a stream of its own (a graph capture's, alive
  // here): bind it back, and file it under the stream it is bound to. One whose stream is
  // unknown is retired.
  cudaStream_t bound_to = nullptr;
  if (cudnnGetStream(handle_, &bound_to) != CUDNN_STATUS_SUCCESS) return;
  if (bound_to != stream_ && cudnnSetStream(handle_, stream_) == CUDNN_STATUS_SUCCESS)
    bound_to = stream_;
  {
    std::lock_guard<std::mutex> lock(PoolMutex());
    Pool()[device_].idle[bound_to].push_back(handle_);
  }
  HandleIdle().notify_all();
}

}  // namespace jaxdnn
