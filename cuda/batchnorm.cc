// Batch normalization through cudnnBatchNormalizationForwardTraining /
// cudnnBatchNormalizationForwardInference / cudnnBatchNormalizationBackward (legacy API;
// deprecated in cuDNN 9, kept behind this file like pooling), modes
// CUDNN_BATCHNORM_PER_ACTIVATION and CUDNN_BATCHNORM_SPATIAL.
//
// FFI targets (4-D or 5-D images, channels-first or channels-last through strides):
//   jaxdnn_bn_fwd_train  x, gamma, beta -> out, mean, invstd   (the batch statistics)
//   jaxdnn_bn_fwd_infer  x, gamma, beta, mean, var -> out      (given statistics)
//   jaxdnn_bn_bwd        x, dy, gamma, mean, invstd -> dx, dgamma, dbeta
// Attributes: mode ("per-activation" | "peractivation" | "spatial"), layout ("NCHW" |
// "NHWC" | "NCDHW" | "NDHWC"), epsilon (double, >= CUDNN_BN_MIN_EPSILON).
// out, dy and dx have x's shape and dtype. The parameters and statistics (gamma, beta,
// mean, var, invstd, dgamma, dbeta) have x's rank with 1 on the normalized axes and the
// type cudnnDeriveBNTensorDescriptor derives (float32 for half images, x's dtype
// otherwise); their descriptor is that derived one, logical (1,C,1,1[,1]) or (1,C,H,W[,D]).
// A spatial channels-last buffer (1,1,1,C) holds the same C contiguous values as
// (1,C,1,1), so the derived (packed) descriptor fits it too; per-activation mode must be
// channels-first (jaxdnn/batchnorm.py always passes the channels-first name).
//
// cuDNN's running averages are not used (resultRunningMean/Variance are NULL, which cuDNN
// allows when both are): jaxdnn/batchnorm.py computes them functionally in JAX.
//
// CUDNN_BATCHNORM_SPATIAL_PERSISTENT has faster kernels (notably for NHWC half), but cuDNN
// documents that it "imposes some limits on the range of values" (on NCHW a scaled
// atomic-integer reduction that can overflow to Inf/NaN where SPATIAL stays finite,
// reported only through cudnnQueryRuntimeError). It is not numerically equivalent to
// SPATIAL in general, so it is not used; an opt-in attribute restricted to NHWC half
// inputs would be the way to add it.
#include <cmath>
#include <cstdint>
#include <initializer_list>
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

constexpr char kName[] = "batchnorm";
constexpr char kTrain[] = "bn_fwd_train";
constexpr char kInfer[] = "bn_fwd_infer";
constexpr char kBwd[] = "bn_bwd";

struct BatchNormDescriptors {
  cudnnDataType_t type;        // x's type: it picks the type of alpha/beta
  cudnnDataType_t param_type;  // the derived parameter type
  int64_t param_count;         // the elements of one parameter/statistics buffer
  TensorDescriptor x;          // x, out, dy and dx share one shape and layout
  TensorDescriptor param;      // gamma, beta, mean, var, invstd, dgamma, dbeta
};

KeyedCache<BatchNormDescriptors>& DescriptorCache() {
  static auto* cache = new KeyedCache<BatchNormDescriptors>();
  return *cache;
}

// One state for the three targets: they take the same attributes and descriptors.
struct BatchNormState {
  static ffi::TypeId id;
  cudnnBatchNormMode_t mode;
  Layout layout;
  double epsilon;
  DescriptorSlot<BatchNormDescriptors> descriptors;
};
ffi::TypeId BatchNormState::id = {};
const XLA_FFI_TypeInfo kBatchNormStateInfo = ffi::MakeTypeInfo<BatchNormState>();

using Buffer = ffi::AnyBuffer;
using Out = ffi::Result<ffi::AnyBuffer>;
using Str = std::string_view;

template <typename Binding>
auto WithAttributes(Binding binding) {
  return std::move(binding).template Attr<Str>("mode")
      .template Attr<Str>("layout")
      .template Attr<double>("epsilon");
}

ffi::ErrorOr<std::unique_ptr<BatchNormState>> Instantiate(Str mode, Str layout, double epsilon) {
  return Guarded(kName, [&]() -> ffi::ErrorOr<std::unique_ptr<BatchNormState>> {
    auto fail = [](const std::string& message) {
      return ffi::Unexpected(InvalidArgument(kName, message));
    };
    auto state = std::make_unique<BatchNormState>();
    if (mode == "per-activation" || mode == "peractivation")
      state->mode = CUDNN_BATCHNORM_PER_ACTIVATION;
    else if (mode == "spatial")
      state->mode = CUDNN_BATCHNORM_SPATIAL;
    else
      return fail("unknown mode '" + std::string(mode) + "'");
    ffi::Error error = ParseLayout(kName, layout, &state->layout);
    if (error.failure()) return ffi::Unexpected(std::move(error));
    // The derived per-activation descriptor is packed channels-first, (1,C,H,W): a
    // channels-last parameter buffer (1,H,W,C) would be read in the wrong order.
    if (state->mode == CUDNN_BATCHNORM_PER_ACTIVATION && state->layout == Layout::kChannelsLast)
      return fail("per-activation mode needs a channels-first layout");
    if (!(epsilon >= CUDNN_BN_MIN_EPSILON) || !std::isfinite(epsilon))
      return fail("epsilon must be finite and >= CUDNN_BN_MIN_EPSILON");
    state->epsilon = epsilon;
    return state;
  });
}

// Builds the x descriptor and the parameter descriptor cuDNN derives from it.
ffi::Error BuildDescriptors(const char* op, const BatchNormState& state, cudnnDataType_t type,
                            const std::vector<int>& dims, BatchNormDescriptors* d) {
  d->type = type;
  JAXDNN_RETURN_IF_ERROR(MakeTensorDescriptor(op, type, dims, state.layout, &d->x));
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateTensorDescriptor, &d->param));
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      op, cudnnDeriveBNTensorDescriptor(d->param.get(), d->x.get(), state.mode));
  // Read back what was derived, to check the parameter buffers against it.
  int rank = 0;
  std::vector<int> param_dims(dims.size()), param_strides(dims.size());
  JAXDNN_RETURN_IF_CUDNN_ERROR(
      op, cudnnGetTensorNdDescriptor(d->param.get(), static_cast<int>(dims.size()), &d->param_type,
                                     &rank, param_dims.data(), param_strides.data()));
  d->param_count = 1;
  for (int i = 0; i < rank; ++i) d->param_count *= param_dims[i];
  return ffi::Error::Success();
}

// The parameter/statistics buffers must have the derived type and element count: XLA
// would not notice a float16 gamma for a float16 image, say, and cuDNN would read it as
// float32.
ffi::Error CheckParameters(const char* op, const BatchNormDescriptors& d,
                           std::initializer_list<Buffer> params) {
  for (const Buffer& param : params) {
    cudnnDataType_t type;
    JAXDNN_RETURN_IF_ERROR(CudnnDataType(op, param.element_type(), &type));
    if (type != d.param_type)
      return InvalidArgument(op, "parameters and statistics must have the type "
                                 "cudnnDeriveBNTensorDescriptor derives for the image (float32 "
                                 "for half-precision images, the image's dtype otherwise)");
    if (static_cast<int64_t>(param.element_count()) != d.param_count)
      return InvalidArgument(op, "parameters and statistics must have the image's rank with 1 "
                                 "on every normalized axis");
  }
  return ffi::Error::Success();
}

// Reserves a cuDNN handle and fetches the descriptors for image `x` and its parameter and
// statistics buffers `params`.
ffi::Error Initialize(const char* op, int device, BatchNormState* state, const Buffer& x,
                      std::initializer_list<Buffer> params) {
  return Guarded(op, [&]() -> ffi::Error {
    JAXDNN_RETURN_IF_ERROR(ReserveCudnnHandle(op, device));
    if (!state->descriptors.empty() || HasZeroSize(x.dimensions())) return ffi::Error::Success();
    const size_t rank = x.dimensions().size();
    if (rank != 4 && rank != 5) return InvalidArgument(op, "expected a 4-D or 5-D image");
    cudnnDataType_t type;
    JAXDNN_RETURN_IF_ERROR(CudnnDataType(op, x.element_type(), &type));
    std::vector<int> dims = LogicalDims(x.dimensions(), state->layout);
    CacheKey key;
    key.Add(type).Add(static_cast<int64_t>(state->layout)).Add(state->mode).AddAll(dims);
    std::shared_ptr<const BatchNormDescriptors> descriptors;
    JAXDNN_RETURN_IF_ERROR(DescriptorCache().GetOrBuild(
        key, [&](BatchNormDescriptors* d) { return BuildDescriptors(op, *state, type, dims, d); },
        &descriptors));
    JAXDNN_RETURN_IF_ERROR(CheckParameters(op, *descriptors, params));
    state->descriptors.Set(std::move(descriptors));
    return ffi::Error::Success();
  });
}

// Borrows a handle and runs `launch(handle, descriptors)`, which makes the cuDNN call.
template <typename Launch>
ffi::Error Execute(const char* op, cudaStream_t stream, int device, BatchNormState* state,
                   Launch&& launch) {
  BorrowedCudnnHandle handle(op, device, stream);
  JAXDNN_RETURN_IF_ERROR(handle.error());
  const BatchNormDescriptors* d;
  JAXDNN_RETURN_IF_ERROR(InitializedDescriptors(op, state->descriptors, &d));
  return launch(handle.get(), *d);
}

// An empty image has no statistics to compute, but its parameter-shaped results may
// be non-empty (spatial mode with N = 0): fill them with `byte` repeated, as XLA would
// compute them (0xFF: NaN in float32 and float64, the mean of nothing; 0: a sum of
// nothing).
ffi::Error FillEmpty(const char* op, cudaStream_t stream, int byte,
                     std::initializer_list<Buffer> results) {
  for (const Buffer& result : results)
    JAXDNN_RETURN_IF_CUDA_ERROR(
        op, cudaMemsetAsync(result.untyped_data(), byte, result.size_bytes(), stream));
  return ffi::Error::Success();
}

// ---- jaxdnn_bn_fwd_train: x, gamma, beta -> out, mean, invstd ----

ffi::Error InitializeTrain(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                           Buffer gamma, Buffer beta, Out out, Out mean, Out invstd, Str, Str,
                           double) {
  return Initialize(kTrain, device, state, x, {gamma, beta, *mean, *invstd});
}

ffi::Error ExecuteTrain(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                        Buffer gamma, Buffer beta, Out out, Out mean, Out invstd, Str, Str,
                        double) {
  if (HasZeroSize(x.dimensions())) return FillEmpty(kTrain, stream, 0xFF, {*mean, *invstd});
  return Execute(kTrain, stream, device, state,
                 [&](cudnnHandle_t handle, const BatchNormDescriptors& d) -> ffi::Error {
    Scaling scaling;
    JAXDNN_RETURN_IF_CUDNN_ERROR(
        kTrain, cudnnBatchNormalizationForwardTraining(
                    handle, state->mode, scaling.alpha(d.type), scaling.beta(d.type), d.x.get(),
                    x.untyped_data(), d.x.get(), out->untyped_data(), d.param.get(),
                    gamma.untyped_data(), beta.untyped_data(),
                    /*exponentialAverageFactor=*/0.0, /*resultRunningMean=*/nullptr,
                    /*resultRunningVariance=*/nullptr, state->epsilon, mean->untyped_data(),
                    invstd->untyped_data()));
    return ffi::Error::Success();
  });
}

// ---- jaxdnn_bn_fwd_infer: x, gamma, beta, mean, var -> out ----

ffi::Error InitializeInfer(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                           Buffer gamma, Buffer beta, Buffer mean, Buffer var, Out out, Str, Str,
                           double) {
  return Initialize(kInfer, device, state, x, {gamma, beta, mean, var});
}

ffi::Error ExecuteInfer(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                        Buffer gamma, Buffer beta, Buffer mean, Buffer var, Out out, Str, Str,
                        double) {
  if (HasZeroSize(x.dimensions())) return ffi::Error::Success();
  return Execute(kInfer, stream, device, state,
                 [&](cudnnHandle_t handle, const BatchNormDescriptors& d) -> ffi::Error {
    Scaling scaling;
    JAXDNN_RETURN_IF_CUDNN_ERROR(
        kInfer, cudnnBatchNormalizationForwardInference(
                    handle, state->mode, scaling.alpha(d.type), scaling.beta(d.type), d.x.get(),
                    x.untyped_data(), d.x.get(), out->untyped_data(), d.param.get(),
                    gamma.untyped_data(), beta.untyped_data(), mean.untyped_data(),
                    var.untyped_data(), state->epsilon));
    return ffi::Error::Success();
  });
}

// ---- jaxdnn_bn_bwd: x, dy, gamma, mean, invstd -> dx, dgamma, dbeta ----

ffi::Error InitializeBwd(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                         Buffer dy, Buffer gamma, Buffer mean, Buffer invstd, Out dx, Out dgamma,
                         Out dbeta, Str, Str, double) {
  return Initialize(kBwd, device, state, x, {gamma, mean, invstd, *dgamma, *dbeta});
}

ffi::Error ExecuteBwd(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                      Buffer dy, Buffer gamma, Buffer mean, Buffer invstd, Out dx, Out dgamma,
                      Out dbeta, Str, Str, double) {
  if (HasZeroSize(x.dimensions())) return FillEmpty(kBwd, stream, 0, {*dgamma, *dbeta});
  return Execute(kBwd, stream, device, state,
                 [&](cudnnHandle_t handle, const BatchNormDescriptors& d) -> ffi::Error {
    // beta = 0 for both the data and the parameter gradients: the results are overwritten,
    // never accumulated into. The saved statistics are the forward's, so cuDNN does not
    // recompute them (epsilon is then unused, but cuDNN asks for the forward's).
    Scaling scaling;
    JAXDNN_RETURN_IF_CUDNN_ERROR(
        kBwd, cudnnBatchNormalizationBackward(
                  handle, state->mode, scaling.alpha(d.type), scaling.beta(d.type),
                  scaling.alpha(d.type), scaling.beta(d.type), d.x.get(), x.untyped_data(),
                  d.x.get(), dy.untyped_data(), d.x.get(), dx->untyped_data(), d.param.get(),
                  gamma.untyped_data(), dgamma->untyped_data(), dbeta->untyped_data(),
                  state->epsilon, mean.untyped_data(), invstd.untyped_data()));
    return ffi::Error::Success();
  });
}

template <ffi::ExecutionStage stage, size_t kOperands, size_t kResults>
auto Binding() {
  return WithAttributes(LegacyOpBinding<BatchNormState, stage, kOperands, kResults>());
}

XLA_FFI_DEFINE_HANDLER(kBnInstantiate, Instantiate, WithAttributes(ffi::Ffi::BindInstantiate()));
XLA_FFI_DEFINE_HANDLER(kBnTrainInitialize, InitializeTrain, (Binding<kInitializeStage, 3, 3>()));
XLA_FFI_DEFINE_HANDLER(kBnTrainExecute, ExecuteTrain, (Binding<kExecuteStage, 3, 3>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kBnInferInitialize, InitializeInfer, (Binding<kInitializeStage, 5, 1>()));
XLA_FFI_DEFINE_HANDLER(kBnInferExecute, ExecuteInfer, (Binding<kExecuteStage, 5, 1>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kBnBwdInitialize, InitializeBwd, (Binding<kInitializeStage, 5, 3>()));
XLA_FFI_DEFINE_HANDLER(kBnBwdExecute, ExecuteBwd, (Binding<kExecuteStage, 5, 3>()),
                       {ffi::Traits::kCmdBufferCompatible});

}  // namespace

void AddBatchNormHandlers(Registry& registry) {
  registry.state_types.push_back({"jaxdnn_bn_state", &BatchNormState::id, &kBatchNormStateInfo});
  registry.handlers.push_back(
      {"jaxdnn_bn_fwd_train", kBnInstantiate, kBnTrainInitialize, kBnTrainExecute});
  registry.handlers.push_back(
      {"jaxdnn_bn_fwd_infer", kBnInstantiate, kBnInferInitialize, kBnInferExecute});
  registry.handlers.push_back({"jaxdnn_bn_bwd", kBnInstantiate, kBnBwdInitialize, kBnBwdExecute});
}

}  // namespace jaxdnn
