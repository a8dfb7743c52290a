// Runs an execute stage's launches through a CUDA graph of the op's own when XLA does not
// already capture them.
//
// XLA captures a custom call into its CUDA graphs (command buffers) only where a graph would
// hold at least xla_gpu_graph_min_graph_size commands, so in a small program (a jitted RNN
// forward alone) the handler runs eagerly and a cuDNN call that launches hundreds of small
// kernels pays a host launch for each. GraphCache captures such a launch once into a graph
// and replays it (one cudaGraphLaunch) on later calls with the same key.
//
// The capture runs on a private stream of the cache's, never on XLA's stream: another thread
// may enqueue work on XLA's stream meanwhile (one compute stream serves every execution on a
// device), and that work would be recorded into the graph instead of running. (XLA traces
// its own command buffers on a separate stream for the same reason.) The launch function
// therefore takes the stream to enqueue on and binds its library handle to it.
//
// The key must name everything the captured work depends on: every device pointer and size
// handed to the library, the handle, the descriptors, and any host-side value that may
// change between calls. A launch that reads host data which changes per call, or that
// synchronizes, must not go through here at all (the caller decides).
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "common/status.h"

namespace jaxdnn {

// Identifies one captured launch: the values it was captured with, in order.
class GraphKey {
 public:
  GraphKey() { values_.reserve(32); }
  GraphKey& Add(const void* pointer) {
    values_.push_back(static_cast<uint64_t>(reinterpret_cast<uintptr_t>(pointer)));
    return *this;
  }
  GraphKey& Add(uint64_t value) {
    values_.push_back(value);
    return *this;
  }
  bool operator==(const GraphKey& other) const { return values_ == other.values_; }

 private:
  std::vector<uint64_t> values_;
};

// Process-wide counts of what GraphCache::Run did (for jaxdnn's tests and benchmarks, which
// read them through the extension's graph_capture_stats()).
struct GraphCaptureStats {
  std::atomic<int64_t> warmups{0};         // a cache's first call on a device: direct
  std::atomic<int64_t> replays{0};         // a cached exec launched
  std::atomic<int64_t> instantiations{0};  // a capture instantiated into a new exec
  std::atomic<int64_t> updates{0};         // a capture written into a cached exec
  std::atomic<int64_t> under_capture{0};   // the stream was being captured (XLA's graph)
  std::atomic<int64_t> failures{0};        // a capture step failed: launched directly
  std::atomic<int64_t> direct{0};          // capture given up for the state: launched directly
};
GraphCaptureStats& GraphCaptureCounters();

// One op State's cache of graph execs: per device, the `capacity` most recently used keys
// (an LRU, so that a few buffers used in turn all stay cached). Thread-safe: one State may
// serve several threads and devices at once.
class GraphCache {
 public:
  static constexpr size_t kDefaultCapacity = 4;
  // After this many misses in a row on one device (new buffers at every call), capturing
  // costs more than it saves: the state launches directly from then on.
  static constexpr int kMaxMissesInARow = 4 * kDefaultCapacity;

  explicit GraphCache(size_t capacity = kDefaultCapacity) : capacity_(capacity) {}
  ~GraphCache();
  GraphCache(const GraphCache&) = delete;
  GraphCache& operator=(const GraphCache&) = delete;

  // `launch(s)` enqueues the work on stream s (binding its library handle to s).
  using Launch = std::function<ffi::Error(cudaStream_t)>;

  // Initialize stage (outside capture): creates the private capture stream of `device`
  // ahead of execute. Best effort: without it, execute creates it at its first capture.
  void Prepare(int device);

  // Enqueues `launch`'s work on `stream`, a stream of `device` (current on this thread):
  // directly (launch(stream)) when the stream is being captured already (XLA's command
  // buffer records it), capture was given up, or at the first call on the device (a
  // warm-up); otherwise through the cached graph exec of `key`, capturing
  // launch(private stream) into a graph on a miss (its work then runs only through the
  // graph). Any failure of the graph machinery falls back to
  // launch(stream), once, and gives up capture for this cache; an error of `launch` is
  // returned as it is.
  ffi::Error Run(cudaStream_t stream, int device, GraphKey key, const Launch& launch);

  bool gave_up() const { return gave_up_.load(std::memory_order_relaxed); }

 private:
  struct Entry {
    GraphKey key;
    cudaGraphExec_t exec = nullptr;
  };
  struct DeviceGraphs {
    std::mutex mutex;          // execs are not thread-safe: one user at a time
    std::list<Entry> entries;  // most recently used first
    bool warmed_up = false;    // the first call ran directly
    int misses_in_a_row = 0;
    cudaStream_t capture_stream = nullptr;  // created by Prepare or the first capture
  };

  DeviceGraphs* ForDevice(int device);
  // The exec that now holds `graph`: a cached one updated in place (the least recently used,
  // when the cache is full), or a new one. Null on failure.
  cudaGraphExec_t Store(DeviceGraphs* graphs, GraphKey key, cudaGraph_t graph);
  ffi::Error GiveUp(cudaStream_t stream, const Launch& launch);

  const size_t capacity_;
  std::atomic<bool> gave_up_{false};
  std::mutex devices_mutex_;
  std::map<int, std::unique_ptr<DeviceGraphs>> devices_;
};

}  // namespace jaxdnn
