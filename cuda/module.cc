// The Python extension module `jaxdnn._jaxdnn_cuda`: the FFI handler bundles and State
// types to register with XLA, and the version queries jaxdnn.version() needs.
#include <cuda_runtime_api.h>
#include <cudnn.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "common/registry.h"
#include "rnn.h"
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

// The value of a query, or a RuntimeError carrying its message.
template <typename T>
T ValueOrThrow(xla::ffi::ErrorOr<T> result) {
  if (result.has_error()) throw std::runtime_error(result.error().message());
  return std::move(result).value();
}

jaxdnn::RnnQuery MakeRnnQuery(std::string mode, std::string input_mode, std::string algo,
                              int64_t hidden_size, int64_t num_layers, bool bidirectional,
                              bool allow_tf32, std::string dtype, int64_t input_dim) {
  jaxdnn::RnnQuery q;
  q.mode = std::move(mode);
  q.input_mode = std::move(input_mode);
  q.algo = std::move(algo);
  q.dtype = std::move(dtype);
  q.hidden_size = hidden_size;
  q.num_layers = num_layers;
  q.bidirectional = bidirectional;
  q.allow_tf32 = allow_tf32;
  q.input_dim = input_dim;
  return q;
}

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

  m.def(
      "rnn_temp_space_sizes",
      [](std::string mode, std::string input_mode, std::string algo, int64_t hidden_size,
         int64_t num_layers, bool bidirectional, bool allow_tf32, std::string dtype,
         int64_t max_seq_length, int64_t batch_size, int64_t input_dim, bool training) {
        return ValueOrThrow(jaxdnn::RnnTempSpaceSizes(
            MakeRnnQuery(std::move(mode), std::move(input_mode), std::move(algo), hidden_size,
                         num_layers, bidirectional, allow_tf32, std::move(dtype), input_dim),
            max_seq_length, batch_size, training));
      },
      nb::kw_only(), nb::arg("mode"), nb::arg("input_mode"), nb::arg("algo"),
      nb::arg("hidden_size"), nb::arg("num_layers"), nb::arg("bidirectional"),
      nb::arg("allow_tf32"), nb::arg("dtype"), nb::arg("max_seq_length"), nb::arg("batch_size"),
      nb::arg("input_dim"), nb::arg("training"),
      "(workspace, reserve) bytes cudnnGetRNNTempSpaceSizes gives one RNN configuration "
      "on the current device (reserve 0 unless training).");
  m.def(
      "rnn_weight_params",
      [](std::string mode, std::string input_mode, std::string algo, int64_t hidden_size,
         int64_t num_layers, bool bidirectional, bool allow_tf32, std::string dtype,
         int64_t input_dim) {
        jaxdnn::RnnWeightLayout layout = ValueOrThrow(jaxdnn::RnnWeightParams(
            MakeRnnQuery(std::move(mode), std::move(input_mode), std::move(algo), hidden_size,
                         num_layers, bidirectional, allow_tf32, std::move(dtype), input_dim)));
        nb::list params;
        for (const auto& p : layout.params) {
          nb::list dims;
          for (int64_t d : p.dims) dims.append(d);
          params.append(
              nb::make_tuple(p.pseudo_layer, p.lin_id, p.kind, p.offset, nb::tuple(dims)));
        }
        return nb::make_tuple(layout.weight_bytes, params);
      },
      nb::kw_only(), nb::arg("mode"), nb::arg("input_mode"), nb::arg("algo"),
      nb::arg("hidden_size"), nb::arg("num_layers"), nb::arg("bidirectional"),
      nb::arg("allow_tf32"), nb::arg("dtype"), nb::arg("input_dim"),
      "(weight_space_bytes, [(pseudo_layer, lin_id, kind, offset_in_elements, dims)]) from "
      "cudnnGetRNNWeightParams, on the current device.");

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
