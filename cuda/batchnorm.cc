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
// Spatial mode on channels-last images takes the frontend graph API instead (batchnorm and
// batchnorm_backward nodes): the legacy kernels read NHWC through strides and measured
// 15-30x slower than XLA's fusion there (H100, BENCHMARKS.md). The training forward and the
// backward therefore carry a trailing u8 workspace result (sized in jaxdnn/batchnorm.py;
// empty where the legacy calls run). Where the graph API has no engine for a case (float64,
// say), those calls fall back to the legacy ones, with a warning.
//
// CUDNN_BATCHNORM_SPATIAL_PERSISTENT has faster kernels (notably for NHWC half), but cuDNN
// documents that it "imposes some limits on the range of values" (on NCHW a scaled
// atomic-integer reduction that can overflow to Inf/NaN where SPATIAL stays finite,
// reported only through cudnnQueryRuntimeError). It is not numerically equivalent to
// SPATIAL in general, so it is not used; an opt-in attribute restricted to NHWC half
// inputs would be the way to add it.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/cache.h"
#include "common/descriptors.h"
#include "common/frontend.h"
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
#ifdef JAXDNN_HAVE_CUDNN_FRONTEND
  // Spatial channels-last only: the graph-API plan, or one without a graph when the graph
  // API cannot run the case (the legacy calls then run).
  DescriptorSlot<FrontendPlan> plan;
#endif
};
ffi::TypeId BatchNormState::id = {};
const XLA_FFI_TypeInfo kBatchNormStateInfo = ffi::MakeTypeInfo<BatchNormState>();

using Buffer = ffi::AnyBuffer;
using Out = ffi::Result<ffi::AnyBuffer>;
using Str = std::string_view;

template <typename Binding>
auto WithAttributes(Binding binding) {
  return std::move(binding)
      .template Attr<Str>("mode")
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
      return InvalidArgument(op,
                             "parameters and statistics must have the type "
                             "cudnnDeriveBNTensorDescriptor derives for the image (float32 "
                             "for half-precision images, the image's dtype otherwise)");
    if (static_cast<int64_t>(param.element_count()) != d.param_count)
      return InvalidArgument(op,
                             "parameters and statistics must have the image's rank with 1 "
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

#ifdef JAXDNN_HAVE_CUDNN_FRONTEND
// ---- the graph-API path (spatial mode, channels-last images) ----

// Tensor uids of the graphs, for the variant packs.
enum GraphUid : int64_t { kX = 1, kScale, kBias, kY, kMean, kInvstd, kDy, kDx, kDscale, kDbias };

bool UsesGraph(const BatchNormState& state) {
  return state.mode == CUDNN_BATCHNORM_SPATIAL && state.layout == Layout::kChannelsLast;
}

KeyedCache<FrontendPlan>& PlanCache() {
  static auto* cache = new KeyedCache<FrontendPlan>();
  return *cache;
}

std::shared_ptr<fe::graph::Tensor_attributes> GraphTensor(fe::graph::Graph& graph, int64_t uid,
                                                          const TensorShape& shape,
                                                          fe::DataType_t type) {
  return graph.tensor(fe::graph::Tensor_attributes()
                          .set_uid(uid)
                          .set_name(std::to_string(uid))
                          .set_dim(shape.dims)
                          .set_stride(shape.strides)
                          .set_data_type(type));
}

void SetOutput(const std::shared_ptr<fe::graph::Tensor_attributes>& tensor, int64_t uid,
               const TensorShape& shape, fe::DataType_t type) {
  tensor->set_output(true)
      .set_uid(uid)
      .set_dim(shape.dims)
      .set_stride(shape.strides)
      .set_data_type(type);
}

// The training forward (`backward` false) or the backward of spatial batch norm over the
// channels-last image `x`, built into `plan`; a plan without a graph when no engine runs it.
ffi::Error BuildGraphPlan(const char* op, cudnnHandle_t handle, bool backward, fe::DataType_t io,
                          fe::DataType_t param_type, const TensorShape& x, double epsilon,
                          int64_t workspace_bytes, FrontendPlan* plan) {
  // Parameters (1, C, 1, 1[, 1]): C contiguous values.
  TensorShape param{std::vector<int64_t>(x.dims.size(), 1),
                    std::vector<int64_t>(x.dims.size(), x.dims[1])};
  param.dims[1] = x.dims[1];
  param.strides[1] = 1;
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(io)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  auto image = GraphTensor(*graph, kX, x, io);
  auto scale = GraphTensor(*graph, kScale, param, param_type);
  if (!backward) {
    auto bias = GraphTensor(*graph, kBias, param, param_type);
    auto eps = graph->tensor(fe::graph::Tensor_attributes(static_cast<float>(epsilon)));
    auto outputs =
        graph->batchnorm(image, scale, bias, fe::graph::Batchnorm_attributes().set_epsilon(eps));
    SetOutput(outputs[0], kY, x, io);
    SetOutput(outputs[1], kMean, param, param_type);
    SetOutput(outputs[2], kInvstd, param, param_type);
  } else {
    auto dy = GraphTensor(*graph, kDy, x, io);
    auto mean = GraphTensor(*graph, kMean, param, param_type);
    auto invstd = GraphTensor(*graph, kInvstd, param, param_type);
    auto outputs = graph->batchnorm_backward(
        dy, image, scale,
        fe::graph::Batchnorm_backward_attributes().set_saved_mean_and_inv_variance(mean, invstd));
    SetOutput(outputs[0], kDx, x, io);
    SetOutput(outputs[1], kDscale, param, param_type);
    SetOutput(outputs[2], kDbias, param, param_type);
  }
  fe::error_t status = graph->validate();
  if (status.is_good()) status = graph->build_operation_graph(handle);
  if (status.is_good())
    status = graph->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
  if (status.is_good()) {
    graph->deselect_workspace_greater_than(workspace_bytes);
    status = graph->check_support();
  }
  if (status.is_good()) status = graph->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE);
  if (status.is_good()) status = graph->get_workspace_size(plan->workspace_size);
  if (status.is_bad()) {
    std::fprintf(stderr,
                 "jaxdnn %s: cuDNN's graph API cannot run this batch norm (%s); using "
                 "the legacy calls\n",
                 op, status.get_message().c_str());
    return ffi::Error::Success();  // a plan without a graph: the legacy path runs
  }
  plan->graph = std::move(graph);
  return ffi::Error::Success();
}

// Fetches (or builds) the graph plan of a spatial channels-last call into the state.
ffi::Error InitializeGraph(const char* op, cudaStream_t stream, int device, BatchNormState* state,
                           bool backward, const Buffer& x, const Buffer& param,
                           const Buffer& workspace) {
  if (!UsesGraph(*state) || !state->plan.empty() || HasZeroSize(x.dimensions()))
    return ffi::Error::Success();
  fe::DataType_t io, param_type;
  JAXDNN_RETURN_IF_ERROR(FrontendType(op, DtypeName(x.element_type()), &io));
  JAXDNN_RETURN_IF_ERROR(FrontendType(op, DtypeName(param.element_type()), &param_type));
  TensorShape shape = ShapeOf(x.dimensions(), state->layout);
  int64_t workspace_bytes = static_cast<int64_t>(workspace.size_bytes());
  CacheKey key;
  key.Add(op)
      .Add(static_cast<int64_t>(cudnnGetVersion()))
      .Add(device)
      .Add(DtypeName(x.element_type()))
      .Add(DtypeName(param.element_type()))
      .AddAll(shape.dims)
      .AddAll(shape.strides)
      .Add(std::to_string(state->epsilon))
      .Add(workspace_bytes);
  BorrowedCudnnHandle handle(op, device, stream);
  JAXDNN_RETURN_IF_ERROR(handle.error());
  std::shared_ptr<const FrontendPlan> plan;
  JAXDNN_RETURN_IF_ERROR(PlanCache().GetOrBuild(
      key,
      [&](FrontendPlan* p) {
        return BuildGraphPlan(op, handle.get(), backward, io, param_type, shape, state->epsilon,
                              workspace_bytes, p);
      },
      &plan));
  state->plan.Set(std::move(plan));
  return ffi::Error::Success();
}

// The graph plan to run, or null where the legacy calls run.
const FrontendPlan* GraphPlan(BatchNormState* state) {
  const FrontendPlan* plan = UsesGraph(*state) ? state->plan.get() : nullptr;
  return plan != nullptr && plan->graph != nullptr ? plan : nullptr;
}

ffi::Error ExecuteGraph(const char* op, cudaStream_t stream, int device, const FrontendPlan& plan,
                        std::unordered_map<int64_t, void*> pack, const Buffer& workspace) {
  BorrowedCudnnHandle handle(op, device, stream);
  JAXDNN_RETURN_IF_ERROR(handle.error());
  return ExecutePlan(op, plan, handle.get(), pack, workspace.untyped_data());
}
#else
// Without the frontend headers every call takes the legacy path.
struct FrontendPlan {};
ffi::Error InitializeGraph(const char*, cudaStream_t, int, BatchNormState*, bool, const Buffer&,
                           const Buffer&, const Buffer&) {
  return ffi::Error::Success();
}
const FrontendPlan* GraphPlan(BatchNormState*) { return nullptr; }
#endif

// ---- jaxdnn_bn_fwd_train: x, gamma, beta -> out, mean, invstd (+ workspace) ----

ffi::Error InitializeTrain(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                           Buffer gamma, Buffer beta, Out out, Out mean, Out invstd, Out workspace,
                           Str, Str, double) {
  JAXDNN_RETURN_IF_ERROR(Initialize(kTrain, device, state, x, {gamma, beta, *mean, *invstd}));
  return Guarded(kTrain, [&] {
    return InitializeGraph(kTrain, stream, device, state, false, x, gamma, *workspace);
  });
}

ffi::Error ExecuteTrain(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                        Buffer gamma, Buffer beta, Out out, Out mean, Out invstd, Out workspace,
                        Str, Str, double) {
  if (HasZeroSize(x.dimensions())) return FillEmpty(kTrain, stream, 0xFF, {*mean, *invstd});
#ifdef JAXDNN_HAVE_CUDNN_FRONTEND
  if (const FrontendPlan* plan = GraphPlan(state)) {
    return ExecuteGraph(kTrain, stream, device, *plan,
                        {{kX, x.untyped_data()},
                         {kScale, gamma.untyped_data()},
                         {kBias, beta.untyped_data()},
                         {kY, out->untyped_data()},
                         {kMean, mean->untyped_data()},
                         {kInvstd, invstd->untyped_data()}},
                        *workspace);
  }
#endif
  return Execute(kTrain, stream, device, state,
                 [&](cudnnHandle_t handle, const BatchNormDescriptors& d) -> ffi::Error {
                   Scaling scaling;
                   JAXDNN_RETURN_IF_CUDNN_ERROR(
                       kTrain, cudnnBatchNormalizationForwardTraining(
                                   handle, state->mode, scaling.alpha(d.type), scaling.beta(d.type),
                                   d.x.get(), x.untyped_data(), d.x.get(), out->untyped_data(),
                                   d.param.get(), gamma.untyped_data(), beta.untyped_data(),
                                   /*exponentialAverageFactor=*/0.0, /*resultRunningMean=*/nullptr,
                                   /*resultRunningVariance=*/nullptr, state->epsilon,
                                   mean->untyped_data(), invstd->untyped_data()));
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
                                   handle, state->mode, scaling.alpha(d.type), scaling.beta(d.type),
                                   d.x.get(), x.untyped_data(), d.x.get(), out->untyped_data(),
                                   d.param.get(), gamma.untyped_data(), beta.untyped_data(),
                                   mean.untyped_data(), var.untyped_data(), state->epsilon));
                   return ffi::Error::Success();
                 });
}

// ---- jaxdnn_bn_bwd: x, dy, gamma, mean, invstd -> dx, dgamma, dbeta ----

ffi::Error InitializeBwd(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                         Buffer dy, Buffer gamma, Buffer mean, Buffer invstd, Out dx, Out dgamma,
                         Out dbeta, Out workspace, Str, Str, double) {
  JAXDNN_RETURN_IF_ERROR(
      Initialize(kBwd, device, state, x, {gamma, mean, invstd, *dgamma, *dbeta}));
  return Guarded(kBwd, [&] {
    return InitializeGraph(kBwd, stream, device, state, true, x, gamma, *workspace);
  });
}

ffi::Error ExecuteBwd(cudaStream_t stream, int device, BatchNormState* state, Buffer x, Buffer dy,
                      Buffer gamma, Buffer mean, Buffer invstd, Out dx, Out dgamma, Out dbeta,
                      Out workspace, Str, Str, double) {
  if (HasZeroSize(x.dimensions())) return FillEmpty(kBwd, stream, 0, {*dgamma, *dbeta});
#ifdef JAXDNN_HAVE_CUDNN_FRONTEND
  if (const FrontendPlan* plan = GraphPlan(state)) {
    return ExecuteGraph(kBwd, stream, device, *plan,
                        {{kX, x.untyped_data()},
                         {kDy, dy.untyped_data()},
                         {kScale, gamma.untyped_data()},
                         {kMean, mean.untyped_data()},
                         {kInvstd, invstd.untyped_data()},
                         {kDx, dx->untyped_data()},
                         {kDscale, dgamma->untyped_data()},
                         {kDbias, dbeta->untyped_data()}},
                        *workspace);
  }
#endif
  return Execute(
      kBwd, stream, device, state,
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
XLA_FFI_DEFINE_HANDLER(kBnTrainInitialize, InitializeTrain, (Binding<kInitializeStage, 3, 4>()));
XLA_FFI_DEFINE_HANDLER(kBnTrainExecute, ExecuteTrain, (Binding<kExecuteStage, 3, 4>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kBnInferInitialize, InitializeInfer, (Binding<kInitializeStage, 5, 1>()));
XLA_FFI_DEFINE_HANDLER(kBnInferExecute, ExecuteInfer, (Binding<kExecuteStage, 5, 1>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kBnBwdInitialize, InitializeBwd, (Binding<kInitializeStage, 5, 4>()));
XLA_FFI_DEFINE_HANDLER(kBnBwdExecute, ExecuteBwd, (Binding<kExecuteStage, 5, 4>()),
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
