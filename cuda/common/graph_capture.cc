#include "common/graph_capture.h"

#include <iterator>
#include <utility>

namespace jaxdnn {

GraphCaptureStats& GraphCaptureCounters() {
  static auto* stats = new GraphCaptureStats();  // never destroyed, like the caches
  return *stats;
}

namespace {

// Clears this thread's last CUDA runtime error, which a failed graph call leaves behind
// (none of those failures is sticky: the context stays usable).
void ClearCudaError() { (void)cudaGetLastError(); }

// Ends the capture begun on `stream` and returns its graph (null when the capture was
// invalidated), leaving the stream out of capture mode whatever happened.
cudaGraph_t EndCapture(cudaStream_t stream) {
  cudaGraph_t graph = nullptr;
  if (cudaStreamEndCapture(stream, &graph) != cudaSuccess) {
    ClearCudaError();
    if (graph != nullptr) cudaGraphDestroy(graph);
    return nullptr;
  }
  return graph;
}

// A non-blocking stream of `device`, made current for the call (XLA has made it current
// already; this only guards against a thread that switched devices).
cudaStream_t CreateCaptureStream(int device) {
  int previous = -1;
  const bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != device &&
                        cudaSetDevice(device) == cudaSuccess;
  cudaStream_t stream = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) stream = nullptr;
  if (switched) cudaSetDevice(previous);
  return stream;
}

}  // namespace

GraphCache::~GraphCache() {
  // A launch still in flight completes: the driver frees its exec when it is done.
  for (auto& [device, graphs] : devices_) {
    for (Entry& entry : graphs->entries) cudaGraphExecDestroy(entry.exec);
    if (graphs->capture_stream != nullptr) cudaStreamDestroy(graphs->capture_stream);
  }
  ClearCudaError();
}

GraphCache::DeviceGraphs* GraphCache::ForDevice(int device) {
  std::lock_guard<std::mutex> lock(devices_mutex_);
  std::unique_ptr<DeviceGraphs>& graphs = devices_[device];
  if (!graphs) graphs = std::make_unique<DeviceGraphs>();
  return graphs.get();
}

void GraphCache::Prepare(int device) {
  DeviceGraphs* graphs = ForDevice(device);
  std::lock_guard<std::mutex> lock(graphs->mutex);
  if (graphs->capture_stream == nullptr) graphs->capture_stream = CreateCaptureStream(device);
  ClearCudaError();
}

ffi::Error GraphCache::GiveUp(cudaStream_t stream, const Launch& launch) {
  gave_up_.store(true, std::memory_order_relaxed);
  ClearCudaError();
  GraphCaptureCounters().failures++;
  return launch(stream);
}

cudaGraphExec_t GraphCache::Store(DeviceGraphs* graphs, GraphKey key, cudaGraph_t graph) {
  auto& entries = graphs->entries;
  if (entries.size() >= capacity_) {
    // The least recently used exec takes the new graph's parameters: an update costs less
    // than a new instantiation, and the graph usually differs only in its pointers.
    Entry& victim = entries.back();
    cudaGraphExecUpdateResultInfo info;
    if (cudaGraphExecUpdate(victim.exec, graph, &info) == cudaSuccess) {
      victim.key = std::move(key);
      entries.splice(entries.begin(), entries, std::prev(entries.end()));
      GraphCaptureCounters().updates++;
      return entries.front().exec;
    }
    ClearCudaError();  // another topology (cuDNN chose other kernels): a new exec
    cudaGraphExecDestroy(victim.exec);
    entries.pop_back();
  }
  cudaGraphExec_t exec = nullptr;
  if (cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) {
    ClearCudaError();
    return nullptr;
  }
  entries.push_front(Entry{std::move(key), exec});
  GraphCaptureCounters().instantiations++;
  return exec;
}

ffi::Error GraphCache::Run(cudaStream_t stream, int device, GraphKey key, const Launch& launch) {
  GraphCaptureStats& stats = GraphCaptureCounters();
  if (gave_up()) {
    stats.direct++;
    return launch(stream);
  }
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capturing) != cudaSuccess) return GiveUp(stream, launch);
  if (capturing != cudaStreamCaptureStatusNone) {  // XLA's command buffer records the launch
    stats.under_capture++;
    return launch(stream);
  }

  DeviceGraphs* graphs = ForDevice(device);
  std::lock_guard<std::mutex> lock(graphs->mutex);
  if (!graphs->warmed_up) {
    // The first call runs directly: whatever the library does once (loading its kernels'
    // modules, lazy allocations) then happens outside capture, where it is allowed.
    graphs->warmed_up = true;
    stats.warmups++;
    return launch(stream);
  }
  auto& entries = graphs->entries;
  for (auto it = entries.begin(); it != entries.end(); ++it) {
    if (!(it->key == key)) continue;
    entries.splice(entries.begin(), entries, it);
    graphs->misses_in_a_row = 0;
    // A failed launch enqueued nothing: launching directly runs the work once.
    if (cudaGraphLaunch(entries.front().exec, stream) != cudaSuccess) return GiveUp(stream, launch);
    stats.replays++;
    return ffi::Error::Success();
  }

  if (++graphs->misses_in_a_row > kMaxMissesInARow) {
    gave_up_.store(true, std::memory_order_relaxed);
    stats.direct++;
    return launch(stream);
  }
  if (graphs->capture_stream == nullptr) graphs->capture_stream = CreateCaptureStream(device);
  cudaStream_t capture = graphs->capture_stream;
  if (capture == nullptr) return GiveUp(stream, launch);
  // Thread-local mode, as XLA's own command-buffer tracing uses: a call on this thread that
  // is unsafe during capture (a synchronization, cudaMalloc) fails and invalidates the
  // capture, which then falls back below, instead of being recorded wrongly; other threads
  // (XLA's, other devices') are not affected, as they would be in global mode. Relaxed mode
  // would let such calls through unnoticed.
  if (cudaStreamBeginCapture(capture, cudaStreamCaptureModeThreadLocal) != cudaSuccess)
    return GiveUp(stream, launch);
  ffi::Error captured = ffi::Error::Success();
  try {
    captured = launch(capture);
  } catch (...) {  // leave the stream out of capture mode before the exception moves on
    if (cudaGraph_t graph = EndCapture(capture)) cudaGraphDestroy(graph);
    gave_up_.store(true, std::memory_order_relaxed);
    throw;
  }
  cudaGraph_t graph = EndCapture(capture);
  if (captured.failure() || graph == nullptr) {
    // Nothing recorded ran: the direct launch runs the work (or fails with its own error).
    if (graph != nullptr) cudaGraphDestroy(graph);
    return GiveUp(stream, launch);
  }
  cudaGraphExec_t exec = Store(graphs, std::move(key), graph);
  cudaGraphDestroy(graph);  // the exec keeps what it needs
  if (exec == nullptr || cudaGraphLaunch(exec, stream) != cudaSuccess)
    return GiveUp(stream, launch);
  return ffi::Error::Success();
}

}  // namespace jaxdnn
