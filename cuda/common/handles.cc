#include "common/handles.h"

#include <map>
#include <mutex>
#include <thread>
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
  int64_t created = 0;
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

// A new spare handle of `device`.
ffi::Error AddSpare(const char* op, int device) {
  ScopedDevice scoped(device);
  cudnnHandle_t created = nullptr;
  JAXDNN_RETURN_IF_CUDNN_ERROR(op, cudnnCreate(&created));
  std::lock_guard<std::mutex> lock(PoolMutex());
  DeviceHandles& handles = Pool()[device];
  handles.idle[nullptr].push_back(created);
  ++handles.created;
  return ffi::Error::Success();
}

// Whether `stream` is being captured into a CUDA graph, or that cannot be told (a handle
// is then made as if it were). Only the thread that runs on `stream` asks.
bool Capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (stream == nullptr) return false;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace

cudnnStatus_t BindCudnnHandle(cudnnHandle_t handle, cudaStream_t stream) {
  cudaStream_t bound_to = nullptr;
  cudnnStatus_t status = cudnnGetStream(handle, &bound_to);
  if (status != CUDNN_STATUS_SUCCESS || bound_to == stream) return status;
  return cudnnSetStream(handle, stream);
}

std::map<int, CudnnHandleCounts> CountCudnnHandles() {
  std::lock_guard<std::mutex> lock(PoolMutex());
  std::map<int, CudnnHandleCounts> counts;
  for (const auto& [device, handles] : Pool()) {
    CudnnHandleCounts& c = counts[device];
    c.created = handles.created;
    for (const auto& [stream, idle] : handles.idle)
      if (stream != nullptr) ++c.streams;
  }
  return counts;
}

ffi::Error ReserveCudnnHandle(const char* op, int device) {
  {
    std::lock_guard<std::mutex> lock(PoolMutex());
    if (!Pool()[device].idle[nullptr].empty()) return ffi::Error::Success();
  }
  // A spare for a stream execute has not seen yet: under command buffers XLA executes on a
  // stream of its own, being captured, where no handle may be created.
  return AddSpare(op, device);
}

BorrowedCudnnHandle::BorrowedCudnnHandle(const char* op, int device, cudaStream_t stream)
    : device_(device), stream_(stream) {
  std::unique_lock<std::mutex> lock(PoolMutex());
  DeviceHandles& handles = Pool()[device];
  auto& bound = handles.idle[stream];
  auto& spares = handles.idle[nullptr];
  // More executions can run at once than initialize stages reserved spares for (XLA runs
  // one executable from several threads): then a spare is made here. cudnnCreate allocates,
  // which a thread capturing a CUDA graph may not: such a thread has it made on a thread of
  // its own (XLA and jaxdnn capture in thread-local mode, which binds no other thread).
  while (bound.empty() && spares.empty()) {
    lock.unlock();
    if (Capturing(stream)) {
      std::thread([&] { error_ = AddSpare(op, device); }).join();
    } else {
      error_ = AddSpare(op, device);
    }
    if (error_.failure()) return;
    lock.lock();
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
  cudaStream_t bound_to = stream_;
  if (BindCudnnHandle(handle_, stream_) != CUDNN_STATUS_SUCCESS &&
      cudnnGetStream(handle_, &bound_to) != CUDNN_STATUS_SUCCESS)
    return;
  std::lock_guard<std::mutex> lock(PoolMutex());
  Pool()[device_].idle[bound_to].push_back(handle_);
}

}  // namespace jaxdnn
