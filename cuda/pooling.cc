// Pooling through cudnnPoolingForward / cudnnPoolingBackward (legacy API; deprecated in
// cuDNN 9 but with no graph-API replacement for max_deterministic, kept behind this file).
// Targets (jaxdnn/pooling.py is the contract; 2-D and 3-D, either layout through strides):
//   jaxdnn_pool_fwd         x -> y
//   jaxdnn_pool_bwd         x, y, dy -> dx        (max modes need x and y)
//   jaxdnn_pool_bwd_linear  dy -> dx              (average/sum: the transpose of pooling)
#include "common/descriptors.h"
#include "common/staged_op.h"

using Ints = xla::ffi::Span<const int64_t>;
#define JAXDNN_POOL_ATTRS(X)                                                                 \
  X(std::string_view, mode) /* max | max_deterministic | average_inc_pad | average_exc_pad | \
                               sum */                                                        \
  X(std::string_view, layout)                                                                \
  X(Ints, ws) /* the window (Theano's name); one entry per spatial axis, like stride, pad */ \
  X(Ints, stride)                                                                            \
  X(Ints, pad)
JAXDNN_DEFINE_ATTRS(PoolAttrs, JAXDNN_POOL_ATTRS);

namespace jaxdnn {
namespace {

constexpr char kFwd[] = "pool_fwd";
constexpr char kBwd[] = "pool_bwd";
constexpr char kBwdLinear[] = "pool_bwd_linear";

using PoolingDescriptor = Descriptor<cudnnPoolingDescriptor_t, cudnnDestroyPoolingDescriptor>;

struct PoolConfig {
  cudnnPoolingMode_t mode;
  double alpha;  // 1, or the window size for 'sum' (average_inc_pad scaled through alpha)
  Layout layout;
  std::vector<int> ws, stride, pad;  // ws: the window
};

struct PoolingDescriptors {
  cudnnDataType_t type;
  TensorDescriptor input;   // x and dx
  TensorDescriptor output;  // y and dy
  PoolingDescriptor pooling;
};

using PoolingState = StagedState<PoolConfig, PoolingDescriptors>;

ffi::Error Parse(const PoolAttrs& a, PoolConfig* c) {
  c->ws.assign(a.ws.begin(), a.ws.end());
  c->stride.assign(a.stride.begin(), a.stride.end());
  c->pad.assign(a.pad.begin(), a.pad.end());
  const size_t rank = c->ws.size();
  if ((rank != 2 && rank != 3) || c->stride.size() != rank || c->pad.size() != rank)
    return InvalidArgument(kFwd, "ws, stride and pad must each have 2 or 3 entries");
  JAXDNN_RETURN_IF_ERROR(ParseChoice<cudnnPoolingMode_t>(
      kFwd, "mode", a.mode,
      {{"max", CUDNN_POOLING_MAX},
       {"max_deterministic", CUDNN_POOLING_MAX_DETERMINISTIC},
       {"average_inc_pad", CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING},
       {"sum", CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING},
       {"average_exc_pad", CUDNN_POOLING_AVERAGE_COUNT_EXCLUDE_PADDING}},
      &c->mode));
  c->alpha = 1.0;
  if (a.mode == "sum")
    for (int w : c->ws) c->alpha *= w;
  return ParseLayout(kFwd, a.layout, &c->layout);
}

// The descriptors for an `input` pooled to `output_dims`.
ffi::Error Initialize(const char* op, cudaStream_t stream, int device, PoolingState* state,
                      const ffi::AnyBuffer& input, Ints output_dims) {
  const PoolConfig& c = state->config;
  return InitializeState(op, stream, device, state, [&](cudnnHandle_t, auto* out) -> ffi::Error {
    if (HasZeroSize(input.dimensions()) || HasZeroSize(output_dims)) return ffi::Error::Success();
    if (input.dimensions().size() != c.ws.size() + 2)
      return InvalidArgument(op, "buffer rank does not match the window");
    JAXDNN_ASSIGN_OR_RETURN(FloatType type, FloatTypeOf(op, input.element_type()));
    std::vector<int> in_dims = LogicalDims(input.dimensions(), c.layout);
    std::vector<int> out_dims = LogicalDims(output_dims, c.layout);
    CacheKey key;
    key.Add(type.name).Add(static_cast<int64_t>(c.layout)).Add(c.mode).AddAll(in_dims);
    key.AddAll(out_dims).AddAll(c.ws).AddAll(c.stride).AddAll(c.pad);
    auto build = [&](PoolingDescriptors* d) -> ffi::Error {
      d->type = type.cudnn;
      JAXDNN_RETURN_IF_ERROR(MakeTensorDescriptor(op, d->type, in_dims, c.layout, &d->input));
      JAXDNN_RETURN_IF_ERROR(MakeTensorDescriptor(op, d->type, out_dims, c.layout, &d->output));
      JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreatePoolingDescriptor, &d->pooling));
      // Padding never wins a max, like XLA's -inf padding; NaNs propagate, as in XLA.
      return JAXDNN_CUDNN_CALL(
          op, cudnnSetPoolingNdDescriptor(d->pooling.get(), c.mode, CUDNN_PROPAGATE_NAN,
                                          static_cast<int>(c.ws.size()), c.ws.data(), c.pad.data(),
                                          c.stride.data()));
    };
    return ProcessCache<PoolingDescriptors>().GetOrBuild(key, build, out);
  });
}

// ---- jaxdnn_pool_fwd: x -> y ----

ffi::Error InitializeFwd(cudaStream_t stream, int device, PoolingState* state, ffi::AnyBuffer x,
                         ffi::Result<ffi::AnyBuffer> y) {
  return Initialize(kFwd, stream, device, state, x, y->dimensions());
}

ffi::Error ExecuteFwd(cudaStream_t stream, int device, PoolingState* state, ffi::AnyBuffer x,
                      ffi::Result<ffi::AnyBuffer> y) {
  if (AnyEmpty({x, *y})) return ffi::Error::Success();
  return ExecuteState(kFwd, stream, device, state, [&](cudnnHandle_t handle, const auto& d) {
    Scaling scaling(state->config.alpha);
    return JAXDNN_CUDNN_CALL(
        kFwd, cudnnPoolingForward(handle, d.pooling.get(), scaling.alpha(d.type), d.input.get(),
                                  x.untyped_data(), scaling.beta(d.type), d.output.get(),
                                  y->untyped_data()));
  });
}

// The one backward launch: for the linear modes cuDNN reads neither x nor y, so
// pool_bwd_linear passes dy and dx in their places.
ffi::Error LaunchBackward(const char* op, cudaStream_t stream, int device, PoolingState* state,
                          const void* x, const void* y, const void* dy, void* dx) {
  return ExecuteState(op, stream, device, state, [&](cudnnHandle_t handle, const auto& d) {
    Scaling scaling(state->config.alpha);
    return JAXDNN_CUDNN_CALL(
        op, cudnnPoolingBackward(handle, d.pooling.get(), scaling.alpha(d.type), d.output.get(), y,
                                 d.output.get(), dy, d.input.get(), x, scaling.beta(d.type),
                                 d.input.get(), dx));
  });
}

// ---- jaxdnn_pool_bwd: x, y, dy -> dx ----

ffi::Error InitializeBwd(cudaStream_t stream, int device, PoolingState* state, ffi::AnyBuffer x,
                         ffi::AnyBuffer y, ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>) {
  return Initialize(kBwd, stream, device, state, x, y.dimensions());
}

ffi::Error ExecuteBwd(cudaStream_t stream, int device, PoolingState* state, ffi::AnyBuffer x,
                      ffi::AnyBuffer y, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx) {
  if (AnyEmpty({x, y})) return ffi::Error::Success();
  return LaunchBackward(kBwd, stream, device, state, x.untyped_data(), y.untyped_data(),
                        dy.untyped_data(), dx->untyped_data());
}

// ---- jaxdnn_pool_bwd_linear: dy -> dx ----

ffi::Error InitializeBwdLinear(cudaStream_t stream, int device, PoolingState* state,
                               ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx) {
  return Initialize(kBwdLinear, stream, device, state, *dx, dy.dimensions());
}

ffi::Error ExecuteBwdLinear(cudaStream_t stream, int device, PoolingState* state, ffi::AnyBuffer dy,
                            ffi::Result<ffi::AnyBuffer> dx) {
  if (HasZeroSize(dx->dimensions())) return ffi::Error::Success();
  if (HasZeroSize(dy.dimensions())) {
    // No window touched the input: its gradient is zero.
    JAXDNN_RETURN_IF_CUDA_ERROR(kBwdLinear,
                                cudaMemsetAsync(dx->untyped_data(), 0, dx->size_bytes(), stream));
    return ffi::Error::Success();
  }
  return LaunchBackward(kBwdLinear, stream, device, state, dx->untyped_data(), dy.untyped_data(),
                        dy.untyped_data(), dx->untyped_data());
}

}  // namespace

void AddPoolingHandlers(Registry& registry) {
  registry.Add<Parse, InitializeFwd, ExecuteFwd>(kFwd);
  registry.Add<Parse, InitializeBwd, ExecuteBwd>(kBwd);
  registry.Add<Parse, InitializeBwdLinear, ExecuteBwdLinear>(kBwdLinear);
}

}  // namespace jaxdnn
