// Softmax and log-softmax through cudnnSoftmaxForward / cudnnSoftmaxBackward (legacy API,
// current in cuDNN 9). Targets (jaxdnn/softmax.py is the contract): jaxdnn_softmax_fwd
// (x -> y) and jaxdnn_softmax_bwd (y, dy -> dx), 4-D buffers.
#include "common/descriptors.h"
#include "common/staged_op.h"

#define JAXDNN_SOFTMAX_ATTRS(X)                         \
  X(std::string_view, algo) /* fast | accurate | log */ \
  X(std::string_view, mode) /* channel | instance */    \
  X(std::string_view, layout)
JAXDNN_DEFINE_ATTRS(SoftmaxAttrs, JAXDNN_SOFTMAX_ATTRS);

namespace jaxdnn {
namespace {

constexpr char kFwd[] = "softmax_fwd";
constexpr char kBwd[] = "softmax_bwd";

struct SoftmaxConfig {
  cudnnSoftmaxAlgorithm_t algo;
  cudnnSoftmaxMode_t mode;
  Layout layout;
};

struct SoftmaxDescriptors {
  cudnnDataType_t type;
  TensorDescriptor tensor;  // x, y, dy and dx share one shape and layout
};

using SoftmaxState = StagedState<SoftmaxConfig, SoftmaxDescriptors>;

ffi::Error Parse(const SoftmaxAttrs& a, SoftmaxConfig* c) {
  JAXDNN_RETURN_IF_ERROR(ParseChoice<cudnnSoftmaxAlgorithm_t>(kFwd, "algo", a.algo,
                                                              {{"fast", CUDNN_SOFTMAX_FAST},
                                                               {"accurate", CUDNN_SOFTMAX_ACCURATE},
                                                               {"log", CUDNN_SOFTMAX_LOG}},
                                                              &c->algo));
  JAXDNN_RETURN_IF_ERROR(ParseChoice<cudnnSoftmaxMode_t>(
      kFwd, "mode", a.mode,
      {{"channel", CUDNN_SOFTMAX_MODE_CHANNEL}, {"instance", CUDNN_SOFTMAX_MODE_INSTANCE}},
      &c->mode));
  return ParseLayout(kFwd, a.layout, &c->layout);
}

// The tensor descriptor of `x` (any of the op's buffers, which share one shape).
ffi::Error Initialize(const char* op, cudaStream_t stream, int device, SoftmaxState* state,
                      ffi::AnyBuffer x) {
  return InitializeState(op, stream, device, state, [&](cudnnHandle_t, auto* out) -> ffi::Error {
    if (HasZeroSize(x.dimensions())) return ffi::Error::Success();
    if (x.dimensions().size() != 4) return InvalidArgument(op, "expected a 4-D buffer");
    JAXDNN_ASSIGN_OR_RETURN(FloatType type, FloatTypeOf(op, x.element_type()));
    std::vector<int> dims = LogicalDims(x.dimensions(), state->config.layout);
    CacheKey key;
    key.Add(type.name).Add(static_cast<int64_t>(state->config.layout)).AddAll(dims);
    return ProcessCache<SoftmaxDescriptors>().GetOrBuild(
        key,
        [&](SoftmaxDescriptors* d) {
          d->type = type.cudnn;
          return MakeTensorDescriptor(op, type.cudnn, dims, state->config.layout, &d->tensor);
        },
        out);
  });
}

ffi::Error InitializeFwd(cudaStream_t stream, int device, SoftmaxState* state, ffi::AnyBuffer x,
                         ffi::Result<ffi::AnyBuffer>) {
  return Initialize(kFwd, stream, device, state, x);
}

ffi::Error ExecuteFwd(cudaStream_t stream, int device, SoftmaxState* state, ffi::AnyBuffer x,
                      ffi::Result<ffi::AnyBuffer> y) {
  if (HasZeroSize(x.dimensions())) return ffi::Error::Success();
  return ExecuteState(kFwd, stream, device, state, [&](cudnnHandle_t handle, const auto& d) {
    const SoftmaxConfig& c = state->config;
    Scaling scaling;
    return JAXDNN_CUDNN_CALL(
        kFwd, cudnnSoftmaxForward(handle, c.algo, c.mode, scaling.alpha(d.type), d.tensor.get(),
                                  x.untyped_data(), scaling.beta(d.type), d.tensor.get(),
                                  y->untyped_data()));
  });
}

ffi::Error InitializeBwd(cudaStream_t stream, int device, SoftmaxState* state, ffi::AnyBuffer y,
                         ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>) {
  return Initialize(kBwd, stream, device, state, y);
}

ffi::Error ExecuteBwd(cudaStream_t stream, int device, SoftmaxState* state, ffi::AnyBuffer y,
                      ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx) {
  if (HasZeroSize(y.dimensions())) return ffi::Error::Success();
  return ExecuteState(kBwd, stream, device, state, [&](cudnnHandle_t handle, const auto& d) {
    const SoftmaxConfig& c = state->config;
    Scaling scaling;
    return JAXDNN_CUDNN_CALL(
        kBwd, cudnnSoftmaxBackward(handle, c.algo, c.mode, scaling.alpha(d.type), d.tensor.get(),
                                   y.untyped_data(), d.tensor.get(), dy.untyped_data(),
                                   scaling.beta(d.type), d.tensor.get(), dx->untyped_data()));
  });
}

}  // namespace

void AddSoftmaxHandlers(Registry& registry) {
  registry.Add<Parse, InitializeFwd, ExecuteFwd>(kFwd);
  registry.Add<Parse, InitializeBwd, ExecuteBwd>(kBwd);
}

}  // namespace jaxdnn
