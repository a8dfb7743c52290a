// Softmax and log-softmax through cudnnSoftmaxForward / cudnnSoftmaxBackward (legacy API,
// current in cuDNN 9). FFI targets: jaxdnn_softmax_fwd (x -> y) and jaxdnn_softmax_bwd
// (y, dy -> dx). Attributes: algo ("fast" | "accurate" | "log"), mode ("channel" |
// "instance"), layout ("NCHW" | "NHWC"); buffers are 4-D.
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "common/cache.h"
#include "common/descriptors.h"
#include "common/handles.h"
#include "common/legacy_op.h"
#include "common/registry.h"
#include "common/status.h"

namespace jaxdnn {
namespace {

constexpr char kFwd[] = "softmax_fwd";
constexpr char kBwd[] = "softmax_bwd";

struct SoftmaxDescriptors {
  cudnnDataType_t type;
  TensorDescriptor tensor;  // x, y, dy and dx share one shape and layout
};

KeyedCache<SoftmaxDescriptors>& DescriptorCache() {
  static auto* cache = new KeyedCache<SoftmaxDescriptors>();
  return *cache;
}

struct SoftmaxState {
  static ffi::TypeId id;
  cudnnSoftmaxAlgorithm_t algo;
  cudnnSoftmaxMode_t mode;
  Layout layout;
  DescriptorSlot<SoftmaxDescriptors> descriptors;
};
ffi::TypeId SoftmaxState::id = {};
const XLA_FFI_TypeInfo kSoftmaxStateInfo = ffi::MakeTypeInfo<SoftmaxState>();

template <typename Binding>
auto WithAttributes(Binding binding) {
  return std::move(binding)
      .template Attr<std::string_view>("algo")
      .template Attr<std::string_view>("mode")
      .template Attr<std::string_view>("layout");
}

ffi::ErrorOr<std::unique_ptr<SoftmaxState>> Instantiate(std::string_view algo,
                                                        std::string_view mode,
                                                        std::string_view layout) {
  return Guarded(kFwd, [&]() -> ffi::ErrorOr<std::unique_ptr<SoftmaxState>> {
    auto state = std::make_unique<SoftmaxState>();
    if (algo == "fast")
      state->algo = CUDNN_SOFTMAX_FAST;
    else if (algo == "accurate")
      state->algo = CUDNN_SOFTMAX_ACCURATE;
    else if (algo == "log")
      state->algo = CUDNN_SOFTMAX_LOG;
    else
      return ffi::Unexpected(InvalidArgument(kFwd, "unknown algo '" + std::string(algo) + "'"));
    if (mode == "channel")
      state->mode = CUDNN_SOFTMAX_MODE_CHANNEL;
    else if (mode == "instance")
      state->mode = CUDNN_SOFTMAX_MODE_INSTANCE;
    else
      return ffi::Unexpected(InvalidArgument(kFwd, "unknown mode '" + std::string(mode) + "'"));
    ffi::Error error = ParseLayout(kFwd, layout, &state->layout);
    if (error.failure()) return ffi::Unexpected(std::move(error));
    return state;
  });
}

// Reserves a cuDNN handle and fetches the tensor descriptor for `x` (any of the op's buffers).
ffi::Error Initialize(const char* op, int device, SoftmaxState* state, ffi::AnyBuffer x) {
  return Guarded(op, [&]() -> ffi::Error {
    JAXDNN_RETURN_IF_ERROR(ReserveCudnnHandle(op, device));
    if (!state->descriptors.empty() || HasZeroSize(x.dimensions())) return ffi::Error::Success();
    if (x.dimensions().size() != 4) return InvalidArgument(op, "expected a 4-D buffer");
    cudnnDataType_t type;
    JAXDNN_RETURN_IF_ERROR(CudnnDataType(op, x.element_type(), &type));
    std::vector<int> dims = LogicalDims(x.dimensions(), state->layout);
    CacheKey key;
    key.Add(type).Add(static_cast<int64_t>(state->layout)).AddAll(dims);
    std::shared_ptr<const SoftmaxDescriptors> descriptors;
    JAXDNN_RETURN_IF_ERROR(DescriptorCache().GetOrBuild(
        key,
        [&](SoftmaxDescriptors* d) {
          d->type = type;
          return MakeTensorDescriptor(op, type, dims, state->layout, &d->tensor);
        },
        &descriptors));
    state->descriptors.Set(std::move(descriptors));
    return ffi::Error::Success();
  });
}

ffi::Error InitializeFwd(cudaStream_t stream, int device, SoftmaxState* state, ffi::AnyBuffer x,
                         ffi::Result<ffi::AnyBuffer>, std::string_view, std::string_view,
                         std::string_view) {
  return Initialize(kFwd, device, state, x);
}

ffi::Error InitializeBwd(cudaStream_t stream, int device, SoftmaxState* state, ffi::AnyBuffer y,
                         ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>, std::string_view,
                         std::string_view, std::string_view) {
  return Initialize(kBwd, device, state, y);
}

ffi::Error ExecuteFwd(cudaStream_t stream, int device, SoftmaxState* state, ffi::AnyBuffer x,
                      ffi::Result<ffi::AnyBuffer> y, std::string_view, std::string_view,
                      std::string_view) {
  if (HasZeroSize(x.dimensions())) return ffi::Error::Success();
  BorrowedCudnnHandle handle(kFwd, device, stream);
  JAXDNN_RETURN_IF_ERROR(handle.error());
  const SoftmaxDescriptors* d;
  JAXDNN_RETURN_IF_ERROR(InitializedDescriptors(kFwd, state->descriptors, &d));
  Scaling scaling;
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      kFwd, cudnnSoftmaxForward(handle.get(), state->algo, state->mode, scaling.alpha(d->type),
                                d->tensor.get(), x.untyped_data(), scaling.beta(d->type),
                                d->tensor.get(), y->untyped_data()));
  return ffi::Error::Success();
}

ffi::Error ExecuteBwd(cudaStream_t stream, int device, SoftmaxState* state, ffi::AnyBuffer y,
                      ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx, std::string_view,
                      std::string_view, std::string_view) {
  if (HasZeroSize(y.dimensions())) return ffi::Error::Success();
  BorrowedCudnnHandle handle(kBwd, device, stream);
  JAXDNN_RETURN_IF_ERROR(handle.error());
  const SoftmaxDescriptors* d;
  JAXDNN_RETURN_IF_ERROR(InitializedDescriptors(kBwd, state->descriptors, &d));
  Scaling scaling;
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      kBwd,
      cudnnSoftmaxBackward(handle.get(), state->algo, state->mode, scaling.alpha(d->type),
                           d->tensor.get(), y.untyped_data(), d->tensor.get(), dy.untyped_data(),
                           scaling.beta(d->type), d->tensor.get(), dx->untyped_data()));
  return ffi::Error::Success();
}

template <ffi::ExecutionStage stage, size_t kOperands>
auto Binding() {
  return WithAttributes(LegacyOpBinding<SoftmaxState, stage, kOperands>());
}

XLA_FFI_DEFINE_HANDLER(kSoftmaxInstantiate, Instantiate,
                       WithAttributes(ffi::Ffi::BindInstantiate()));
XLA_FFI_DEFINE_HANDLER(kSoftmaxFwdInitialize, InitializeFwd, (Binding<kInitializeStage, 1>()));
XLA_FFI_DEFINE_HANDLER(kSoftmaxFwdExecute, ExecuteFwd, (Binding<kExecuteStage, 1>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kSoftmaxBwdInitialize, InitializeBwd, (Binding<kInitializeStage, 2>()));
XLA_FFI_DEFINE_HANDLER(kSoftmaxBwdExecute, ExecuteBwd, (Binding<kExecuteStage, 2>()),
                       {ffi::Traits::kCmdBufferCompatible});

}  // namespace

void AddSoftmaxHandlers(Registry& registry) {
  registry.state_types.push_back({"jaxdnn_softmax_state", &SoftmaxState::id, &kSoftmaxStateInfo});
  registry.handlers.push_back(
      {"jaxdnn_softmax_fwd", kSoftmaxInstantiate, kSoftmaxFwdInitialize, kSoftmaxFwdExecute});
  registry.handlers.push_back(
      {"jaxdnn_softmax_bwd", kSoftmaxInstantiate, kSoftmaxBwdInitialize, kSoftmaxBwdExecute});
}

}  // namespace jaxdnn
