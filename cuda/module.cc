// The Python extension module `jaxdnn._jaxdnn_cuda`: the FFI handler bundles and State
// types to register with XLA, the RNN family's trace-time queries, and the version queries
// jaxdnn.version() needs.
#include <cuda_runtime_api.h>
#include <cudnn.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "common/graph_capture.h"
#include "common/handles.h"
#include "common/registry.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

namespace {

const jaxdnn::Registry& AllOps() {
  static const jaxdnn::Registry* registry = [] {
    auto* r = new jaxdnn::Registry();
    jaxdnn::AddSoftmaxHandlers(*r);
    jaxdnn::AddPoolingHandlers(*r);
    jaxdnn::AddConvHandlers(*r);
    jaxdnn::AddBatchNormHandlers(*r);
    jaxdnn::AddSpatialTransformerHandlers(*r);
    jaxdnn::AddRnnHandlers(*r);
    return r;
  }();
  return *registry;
}

nb::capsule Capsule(const void* pointer) { return nb::capsule(const_cast<void*>(pointer)); }

// A host handler that accepts any jaxdnn call and leaves its results unwritten. Registered
// under the jaxdnn targets for the CPU only on request (jaxdnn._extension.
// register_host_placeholders), it lets XLA compile a program lowered for CUDA on a machine
// without a GPU, which runs the SPMD partitioner: the partitioned program can then be read
// (the sharding tests do). Never a way to compute anything.
XLA_FFI_DEFINE_HANDLER(
    kHostPlaceholder,
    [](xla::ffi::RemainingArgs, xla::ffi::RemainingRets, xla::ffi::Dictionary) {
      return xla::ffi::Error::Success();
    },
    xla::ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attrs());

}  // namespace

NB_MODULE(_jaxdnn_cuda, m) {
  m.doc() = "jaxdnn's cuDNN FFI handlers";

  m.def(
      "registrations",
      [] {
        nb::dict targets;
        for (const auto& h : AllOps().handlers) {
          nb::dict stages;
          stages["instantiate"] = Capsule(reinterpret_cast<const void*>(h.instantiate));
          stages["initialize"] = Capsule(reinterpret_cast<const void*>(h.initialize));
          stages["execute"] = Capsule(reinterpret_cast<const void*>(h.execute));
          targets[h.name.c_str()] = stages;
        }
        return targets;
      },
      "FFI target name -> {stage: handler capsule}, for jax.ffi.register_ffi_target.");

  m.def(
      "target_attributes",
      [] {
        nb::dict targets;
        for (const auto& h : AllOps().handlers) {
          nb::list names;
          for (const auto& name : h.attributes) names.append(name);
          targets[h.name.c_str()] = names;
        }
        return targets;
      },
      "FFI target name -> the attribute names its handlers decode (for tests).");

  m.def(
      "host_placeholder", [] { return Capsule(reinterpret_cast<const void*>(kHostPlaceholder)); },
      "A CPU handler that accepts any call and computes nothing (reading partitioned "
      "CUDA programs on a machine without a GPU).");

  m.def(
      "state_types",
      [] {
        nb::list types;
        for (const auto& t : AllOps().state_types)
          types.append(nb::make_tuple(t.name, Capsule(t.type_id), Capsule(t.type_info)));
        return types;
      },
      "(name, type_id capsule, type_info capsule) for jax.ffi.register_ffi_type.");

  jaxdnn::AddRnnQueries(m);

  m.def(
      "graph_capture_stats",
      [] {
        const jaxdnn::GraphCaptureStats& s = jaxdnn::GraphCaptureCounters();
        nb::dict stats;
        stats["warmups"] = s.warmups.load();
        stats["replays"] = s.replays.load();
        stats["instantiations"] = s.instantiations.load();
        stats["updates"] = s.updates.load();
        stats["under_capture"] = s.under_capture.load();
        stats["failures"] = s.failures.load();
        stats["direct"] = s.direct.load();
        return stats;
      },
      "Process-wide counts of the handlers' own CUDA graphs (common/graph_capture.h): first "
      "calls run directly, replays of a cached graph, instantiations and updates after a "
      "capture, launches left to XLA's capture, failures that fell back to a direct launch, "
      "and direct launches of states that gave capture up (for tests and benchmarks).");

  m.def(
      "cudnn_handle_counts",
      [] {
        nb::dict counts;
        for (const auto& [device, c] : jaxdnn::CountCudnnHandles())
          counts[nb::int_(device)] = nb::make_tuple(c.created, c.streams);
        return counts;
      },
      "device -> (cuDNN handles made, streams they were bound to): the handle pool's size "
      "(common/handles.h), for the soak.");

  m.def(
      "cudnn_runtime_version", [] { return static_cast<int64_t>(cudnnGetVersion()); },
      "cudnnGetVersion() of the loaded library (9.19.0 -> 91900).");
  m.def(
      "cudnn_compiled_version", [] { return static_cast<int64_t>(CUDNN_VERSION); },
      "CUDNN_VERSION of the headers jaxdnn was built against.");
  m.def(
      "cuda_runtime_version",
      [] {
        int version = 0;
        cudaRuntimeGetVersion(&version);
        return version;
      },
      "The CUDA runtime version linked into jaxdnn (13000 = 13.0).");
}
