// Pooling through cudnnPoolingForward / cudnnPoolingBackward (legacy API; deprecated in
// cuDNN 9 but with no graph-API replacement for max_deterministic, kept behind this file).
//
// FFI targets (2-D and 3-D, channels-first or channels-last through strides):
//   jaxdnn_pool_fwd         x -> y
//   jaxdnn_pool_bwd         x, y, dy -> dx        (max modes need x and y)
//   jaxdnn_pool_bwd_linear  dy -> dx              (average/sum: the transpose of pooling)
// Attributes: mode ("max" | "max_deterministic" | "average_inc_pad" | "average_exc_pad" |
// "sum"), layout, window, stride, pad (int64 arrays, one entry per spatial axis).
// 'sum' is average_inc_pad scaled by the window size through cuDNN's alpha.
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/cache.h"
#include "common/descriptors.h"
#include "common/handles.h"
#include "common/legacy_op.h"
#include "common/registry.h"
#include "common/status.h"

namespace jaxdnn {
namespace {

constexpr char kFwd[] = "pool_fwd";
constexpr char kBwd[] = "pool_bwd";
constexpr char kBwdLinear[] = "pool_bwd_linear";

using PoolingDescriptor = Descriptor<cudnnPoolingDescriptor_t, cudnnDestroyPoolingDescriptor>;

struct PoolingDescriptors {
  cudnnDataType_t type;
  TensorDescriptor input;   // x and dx
  TensorDescriptor output;  // y and dy
  PoolingDescriptor pooling;
};

KeyedCache<PoolingDescriptors>& DescriptorCache() {
  static auto* cache = new KeyedCache<PoolingDescriptors>();
  return *cache;
}

struct PoolingState {
  static ffi::TypeId id;
  cudnnPoolingMode_t mode;
  double alpha;  // 1, or the window size for 'sum'
  Layout layout;
  std::vector<int> window, stride, pad;
  DescriptorSlot<PoolingDescriptors> descriptors;
};
ffi::TypeId PoolingState::id = {};
const XLA_FFI_TypeInfo kPoolingStateInfo = ffi::MakeTypeInfo<PoolingState>();

using Ints = ffi::Span<const int64_t>;

template <typename Binding>
auto WithAttributes(Binding binding) {
  return std::move(binding)
      .template Attr<std::string_view>("mode")
      .template Attr<std::string_view>("layout")
      .template Attr<Ints>("window")
      .template Attr<Ints>("stride")
      .template Attr<Ints>("pad");
}

ffi::ErrorOr<std::unique_ptr<PoolingState>> Instantiate(std::string_view mode,
                                                        std::string_view layout, Ints window,
                                                        Ints stride, Ints pad) {
  return Guarded(kFwd, [&]() -> ffi::ErrorOr<std::unique_ptr<PoolingState>> {
    auto fail = [](const std::string& message) {
      return ffi::Unexpected(InvalidArgument(kFwd, message));
    };
    auto state = std::make_unique<PoolingState>();
    state->window.assign(window.begin(), window.end());
    state->stride.assign(stride.begin(), stride.end());
    state->pad.assign(pad.begin(), pad.end());
    const size_t rank = state->window.size();
    if ((rank != 2 && rank != 3) || state->stride.size() != rank || state->pad.size() != rank)
      return fail("window, stride and pad must each have 2 or 3 entries");
    state->alpha = 1.0;
    if (mode == "max") {
      state->mode = CUDNN_POOLING_MAX;
    } else if (mode == "max_deterministic") {
      state->mode = CUDNN_POOLING_MAX_DETERMINISTIC;
    } else if (mode == "average_inc_pad" || mode == "sum") {
      state->mode = CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING;
      if (mode == "sum")
        for (int w : state->window) state->alpha *= w;
    } else if (mode == "average_exc_pad") {
      state->mode = CUDNN_POOLING_AVERAGE_COUNT_EXCLUDE_PADDING;
    } else {
      return fail("unknown mode '" + std::string(mode) + "'");
    }
    ffi::Error error = ParseLayout(kFwd, layout, &state->layout);
    if (error.failure()) return ffi::Unexpected(std::move(error));
    return state;
  });
}

// Reserves a cuDNN handle and fetches the descriptors for an input of `input` dims pooled to
// `output` dims.
ffi::Error Initialize(const char* op, int device, PoolingState* state, const ffi::AnyBuffer& input,
                      Ints output_dims) {
  return Guarded(op, [&]() -> ffi::Error {
    JAXDNN_RETURN_IF_ERROR(ReserveCudnnHandle(op, device));
    if (!state->descriptors.empty() || HasZeroSize(input.dimensions()) || HasZeroSize(output_dims))
      return ffi::Error::Success();
    if (input.dimensions().size() != state->window.size() + 2)
      return InvalidArgument(op, "buffer rank does not match the window");
    cudnnDataType_t type;
    JAXDNN_RETURN_IF_ERROR(CudnnDataType(op, input.element_type(), &type));
    std::vector<int> in_dims = LogicalDims(input.dimensions(), state->layout);
    std::vector<int> out_dims = LogicalDims(output_dims, state->layout);
    CacheKey key;
    key.Add(type)
        .Add(static_cast<int64_t>(state->layout))
        .Add(state->mode)
        .AddAll(in_dims)
        .AddAll(out_dims)
        .AddAll(state->window)
        .AddAll(state->stride)
        .AddAll(state->pad);
    std::shared_ptr<const PoolingDescriptors> descriptors;
    JAXDNN_RETURN_IF_ERROR(DescriptorCache().GetOrBuild(
        key,
        [&](PoolingDescriptors* d) -> ffi::Error {
          d->type = type;
          JAXDNN_RETURN_IF_ERROR(MakeTensorDescriptor(op, type, in_dims, state->layout, &d->input));
          JAXDNN_RETURN_IF_ERROR(
              MakeTensorDescriptor(op, type, out_dims, state->layout, &d->output));
          JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreatePoolingDescriptor, &d->pooling));
          // Padding never wins a max, like XLA's -inf padding; NaNs propagate, as in XLA.
          JAXDNN_RETURN_IF_CUDNN_ERROR(
              op, cudnnSetPoolingNdDescriptor(d->pooling.get(), state->mode, CUDNN_PROPAGATE_NAN,
                                              static_cast<int>(state->window.size()),
                                              state->window.data(), state->pad.data(),
                                              state->stride.data()));
          return ffi::Error::Success();
        },
        &descriptors));
    state->descriptors.Set(std::move(descriptors));
    return ffi::Error::Success();
  });
}

// ---- jaxdnn_pool_fwd: x -> y ----

ffi::Error InitializeFwd(cudaStream_t stream, int device, PoolingState* state, ffi::AnyBuffer x,
                         ffi::Result<ffi::AnyBuffer> y, std::string_view, std::string_view, Ints,
                         Ints, Ints) {
  return Initialize(kFwd, device, state, x, y->dimensions());
}

ffi::Error ExecuteFwd(cudaStream_t stream, int device, PoolingState* state, ffi::AnyBuffer x,
                      ffi::Result<ffi::AnyBuffer> y, std::string_view, std::string_view, Ints, Ints,
                      Ints) {
  if (HasZeroSize(x.dimensions()) || HasZeroSize(y->dimensions())) return ffi::Error::Success();
  BorrowedCudnnHandle handle(kFwd, device, stream);
  JAXDNN_RETURN_IF_ERROR(handle.error());
  const PoolingDescriptors* d;
  JAXDNN_RETURN_IF_ERROR(InitializedDescriptors(kFwd, state->descriptors, &d));
  Scaling scaling(state->alpha);
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      kFwd, cudnnPoolingForward(handle.get(), d->pooling.get(), scaling.alpha(d->type),
                                d->input.get(), x.untyped_data(), scaling.beta(d->type),
                                d->output.get(), y->untyped_data()));
  return ffi::Error::Success();
}

// The one backward launch: for the linear modes cuDNN reads neither x nor y, so
// pool_bwd_linear passes dy and dx in their places.
ffi::Error LaunchBackward(const char* op, cudaStream_t stream, int device, PoolingState* state,
                          const void* x, const void* y, const void* dy, void* dx) {
  BorrowedCudnnHandle handle(op, device, stream);
  JAXDNN_RETURN_IF_ERROR(handle.error());
  const PoolingDescriptors* d;
  JAXDNN_RETURN_IF_ERROR(InitializedDescriptors(op, state->descriptors, &d));
  Scaling scaling(state->alpha);
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      op, cudnnPoolingBackward(handle.get(), d->pooling.get(), scaling.alpha(d->type),
                               d->output.get(), y, d->output.get(), dy, d->input.get(), x,
                               scaling.beta(d->type), d->input.get(), dx));
  return ffi::Error::Success();
}

// ---- jaxdnn_pool_bwd: x, y, dy -> dx ----

ffi::Error InitializeBwd(cudaStream_t stream, int device, PoolingState* state, ffi::AnyBuffer x,
                         ffi::AnyBuffer y, ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>,
                         std::string_view, std::string_view, Ints, Ints, Ints) {
  return Initialize(kBwd, device, state, x, y.dimensions());
}

ffi::Error ExecuteBwd(cudaStream_t stream, int device, PoolingState* state, ffi::AnyBuffer x,
                      ffi::AnyBuffer y, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                      std::string_view, std::string_view, Ints, Ints, Ints) {
  if (HasZeroSize(x.dimensions()) || HasZeroSize(y.dimensions())) return ffi::Error::Success();
  return LaunchBackward(kBwd, stream, device, state, x.untyped_data(), y.untyped_data(),
                        dy.untyped_data(), dx->untyped_data());
}

// ---- jaxdnn_pool_bwd_linear: dy -> dx ----

ffi::Error InitializeBwdLinear(cudaStream_t stream, int device, PoolingState* state,
                               ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx, std::string_view,
                               std::string_view, Ints, Ints, Ints) {
  ffi::AnyBuffer input = *dx;
  return Initialize(kBwdLinear, device, state, input, dy.dimensions());
}

ffi::Error ExecuteBwdLinear(cudaStream_t stream, int device, PoolingState* state, ffi::AnyBuffer dy,
                            ffi::Result<ffi::AnyBuffer> dx, std::string_view, std::string_view,
                            Ints, Ints, Ints) {
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

template <ffi::ExecutionStage stage, size_t kOperands>
auto Binding() {
  return WithAttributes(LegacyOpBinding<PoolingState, stage, kOperands>());
}

XLA_FFI_DEFINE_HANDLER(kPoolInstantiate, Instantiate, WithAttributes(ffi::Ffi::BindInstantiate()));
XLA_FFI_DEFINE_HANDLER(kPoolFwdInitialize, InitializeFwd, (Binding<kInitializeStage, 1>()));
XLA_FFI_DEFINE_HANDLER(kPoolFwdExecute, ExecuteFwd, (Binding<kExecuteStage, 1>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kPoolBwdInitialize, InitializeBwd, (Binding<kInitializeStage, 3>()));
XLA_FFI_DEFINE_HANDLER(kPoolBwdExecute, ExecuteBwd, (Binding<kExecuteStage, 3>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kPoolBwdLinearInitialize, InitializeBwdLinear,
                       (Binding<kInitializeStage, 1>()));
XLA_FFI_DEFINE_HANDLER(kPoolBwdLinearExecute, ExecuteBwdLinear, (Binding<kExecuteStage, 1>()),
                       {ffi::Traits::kCmdBufferCompatible});

}  // namespace

void AddPoolingHandlers(Registry& registry) {
  registry.state_types.push_back({"jaxdnn_pooling_state", &PoolingState::id, &kPoolingStateInfo});
  registry.handlers.push_back(
      {"jaxdnn_pool_fwd", kPoolInstantiate, kPoolFwdInitialize, kPoolFwdExecute});
  registry.handlers.push_back(
      {"jaxdnn_pool_bwd", kPoolInstantiate, kPoolBwdInitialize, kPoolBwdExecute});
  registry.handlers.push_back({"jaxdnn_pool_bwd_linear", kPoolInstantiate, kPoolBwdLinearInitialize,
                               kPoolBwdLinearExecute});
}

}  // namespace jaxdnn
