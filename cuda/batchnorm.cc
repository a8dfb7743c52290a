// Batch normalization through cudnnBatchNormalizationForwardTraining / ForwardInference /
// Backward (legacy API; deprecated in cuDNN 9, kept behind this file like pooling), modes
// CUDNN_BATCHNORM_PER_ACTIVATION and CUDNN_BATCHNORM_SPATIAL. Targets (jaxdnn/batchnorm.py
// is the contract; 4-D or 5-D images, either layout through strides):
//   jaxdnn_bn_fwd_train  x, gamma, beta -> out, mean, invstd, workspace (batch statistics)
//   jaxdnn_bn_fwd_infer  x, gamma, beta, mean, var -> out             (given statistics)
//   jaxdnn_bn_bwd        x, dy, gamma, mean, invstd -> dx, dgamma, dbeta, workspace
// The parameter and statistics buffers take the descriptor cudnnDeriveBNTensorDescriptor
// derives, logical (1,C,1,1[,1]) or (1,C,H,W[,D]); a spatial channels-last buffer
// (1,1,1,C) holds the same C contiguous values as (1,C,1,1), so it fits too. cuDNN's
// running averages are not used (NULL, allowed when both are): Python computes them.
//
// Spatial mode on channels-last images takes the frontend graph API (batchnorm and
// batchnorm_backward nodes): the legacy kernels read NHWC through strides, far slower than
// XLA's fusion there (BENCHMARKS.md); the workspace results serve it (empty where the
// legacy calls run). Where the graph API has no engine (float64, say), those calls fall
// back to the legacy ones, with a warning.
//
// CUDNN_BATCHNORM_SPATIAL_PERSISTENT is not used: cuDNN documents that it "imposes some
// limits on the range of values" (a scaled atomic-integer reduction on NCHW that can
// overflow to Inf/NaN where SPATIAL stays finite, reported only through
// cudnnQueryRuntimeError), so it is not numerically equivalent to SPATIAL.
#include <cmath>
#include <cstdio>
#include <unordered_map>

#include "common/descriptors.h"
#include "common/frontend.h"
#include "common/staged_op.h"

#define JAXDNN_BN_ATTRS(X)                                                 \
  X(std::string_view, mode) /* per-activation | peractivation | spatial */ \
  X(std::string_view, layout)                                              \
  X(double, epsilon) /* >= CUDNN_BN_MIN_EPSILON */
JAXDNN_DEFINE_ATTRS(BatchNormAttrs, JAXDNN_BN_ATTRS);

namespace jaxdnn {
namespace {

constexpr char kTrain[] = "bn_fwd_train";
constexpr char kInfer[] = "bn_fwd_infer";
constexpr char kBwd[] = "bn_bwd";

struct BatchNormConfig {
  cudnnBatchNormMode_t mode;
  Layout layout;
  double epsilon;
};

struct BatchNormDescriptors {
  cudnnDataType_t type;        // x's type: it picks the type of alpha/beta
  cudnnDataType_t param_type;  // the derived parameter type
  int64_t param_count;         // the elements of one parameter/statistics buffer
  TensorDescriptor x;          // x, out, dy and dx share one shape and layout
  TensorDescriptor param;      // gamma, beta, mean, var, invstd, dgamma, dbeta
};

#ifndef JAXDNN_HAVE_CUDNN_FRONTEND
struct FrontendPlan {};  // without the frontend headers every call takes the legacy path
#endif

struct BatchNormPrepared {
  std::shared_ptr<const BatchNormDescriptors> legacy;
  // Spatial channels-last only: the graph-API plan; null, or without a graph, where the
  // graph API cannot run the case and the legacy calls run.
  std::shared_ptr<const FrontendPlan> graph;
};

using BatchNormState = StagedState<BatchNormConfig, BatchNormPrepared>;

ffi::Error Parse(const BatchNormAttrs& a, BatchNormConfig* c) {
  JAXDNN_RETURN_IF_ERROR(
      ParseChoice<cudnnBatchNormMode_t>(kTrain, "mode", a.mode,
                                        {{"per-activation", CUDNN_BATCHNORM_PER_ACTIVATION},
                                         {"peractivation", CUDNN_BATCHNORM_PER_ACTIVATION},
                                         {"spatial", CUDNN_BATCHNORM_SPATIAL}},
                                        &c->mode));
  JAXDNN_RETURN_IF_ERROR(ParseLayout(kTrain, a.layout, &c->layout));
  // The derived per-activation descriptor is packed channels-first, (1,C,H,W): a
  // channels-last parameter buffer (1,H,W,C) would be read in the wrong order.
  if (c->mode == CUDNN_BATCHNORM_PER_ACTIVATION && c->layout == Layout::kChannelsLast)
    return InvalidArgument(kTrain, "per-activation mode needs a channels-first layout");
  if (!(a.epsilon >= CUDNN_BN_MIN_EPSILON) || !std::isfinite(a.epsilon))
    return InvalidArgument(kTrain, "epsilon must be finite and >= CUDNN_BN_MIN_EPSILON");
  c->epsilon = a.epsilon;
  return ffi::Error::Success();
}

// The x descriptor and the parameter descriptor cuDNN derives from it.
ffi::Error BuildDescriptors(const char* op, const BatchNormConfig& c, cudnnDataType_t type,
                            const std::vector<int>& dims, BatchNormDescriptors* d) {
  d->type = type;
  JAXDNN_RETURN_IF_ERROR(MakeTensorDescriptor(op, type, dims, c.layout, &d->x));
  JAXDNN_RETURN_IF_ERROR(CreateDescriptor(op, cudnnCreateTensorDescriptor, &d->param));
  JAXDNN_RETURN_IF_CUDNN_ERROR(op,
                               cudnnDeriveBNTensorDescriptor(d->param.get(), d->x.get(), c.mode));
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
                           std::initializer_list<ffi::AnyBuffer> params) {
  for (const ffi::AnyBuffer& param : params) {
    JAXDNN_ASSIGN_OR_RETURN(FloatType type, FloatTypeOf(op, param.element_type()));
    if (type.cudnn != d.param_type)
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

// ---- the graph-API path (spatial mode, channels-last images) ----

// Tensor uids of the graphs, for the variant packs.
enum GraphUid : int64_t { kX = 1, kScale, kBias, kY, kMean, kInvstd, kDy, kDx, kDscale, kDbias };
using VariantPack = std::unordered_map<int64_t, void*>;

#ifdef JAXDNN_HAVE_CUDNN_FRONTEND

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
  auto image = GraphInput(*graph, kX, x, io);
  auto scale = GraphInput(*graph, kScale, param, param_type);
  if (!backward) {
    auto bias = GraphInput(*graph, kBias, param, param_type);
    auto eps = graph->tensor(fe::graph::Tensor_attributes(static_cast<float>(epsilon)));
    auto outputs =
        graph->batchnorm(image, scale, bias, fe::graph::Batchnorm_attributes().set_epsilon(eps));
    MarkOutput(outputs[0], kY, x, io);
    MarkOutput(outputs[1], kMean, param, param_type);
    MarkOutput(outputs[2], kInvstd, param, param_type);
  } else {
    auto dy = GraphInput(*graph, kDy, x, io);
    auto mean = GraphInput(*graph, kMean, param, param_type);
    auto invstd = GraphInput(*graph, kInvstd, param, param_type);
    auto outputs = graph->batchnorm_backward(
        dy, image, scale,
        fe::graph::Batchnorm_backward_attributes().set_saved_mean_and_inv_variance(mean, invstd));
    MarkOutput(outputs[0], kDx, x, io);
    MarkOutput(outputs[1], kDscale, param, param_type);
    MarkOutput(outputs[2], kDbias, param, param_type);
  }
  fe::error_t status = CreatePlans(*graph, handle, {fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
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

// The graph plan of a spatial channels-last call (null for other calls).
ffi::Error GraphPlan(const char* op, cudnnHandle_t handle, int device, const BatchNormConfig& c,
                     bool backward, const ffi::AnyBuffer& x, const ffi::AnyBuffer& param,
                     const ffi::AnyBuffer& workspace, std::shared_ptr<const FrontendPlan>* out) {
  if (c.mode != CUDNN_BATCHNORM_SPATIAL || c.layout != Layout::kChannelsLast)
    return ffi::Error::Success();
  JAXDNN_ASSIGN_OR_RETURN(fe::DataType_t io, FrontendType(op, x.element_type()));
  JAXDNN_ASSIGN_OR_RETURN(fe::DataType_t param_type, FrontendType(op, param.element_type()));
  TensorShape shape = ShapeOf(x.dimensions(), c.layout);
  int64_t workspace_bytes = static_cast<int64_t>(workspace.size_bytes());
  CacheKey key;
  key.Add(op).Add(static_cast<int64_t>(cudnnGetVersion())).Add(device);
  key.Add(static_cast<int64_t>(x.element_type())).Add(static_cast<int64_t>(param.element_type()));
  key.AddAll(shape.dims).AddAll(shape.strides).Add(std::to_string(c.epsilon)).Add(workspace_bytes);
  return ProcessCache<FrontendPlan>().GetOrBuild(
      key,
      [&](FrontendPlan* p) {
        return BuildGraphPlan(op, handle, backward, io, param_type, shape, c.epsilon,
                              workspace_bytes, p);
      },
      out);
}

// The graph plan to run, or null where the legacy calls run.
const FrontendPlan* GraphOf(const BatchNormPrepared& p) {
  return p.graph != nullptr && p.graph->graph != nullptr ? p.graph.get() : nullptr;
}

ffi::Error ExecuteGraph(const char* op, cudnnHandle_t handle, const FrontendPlan& plan,
                        VariantPack pack, const ffi::AnyBuffer& workspace) {
  return ExecutePlan(op, plan, handle, pack, workspace.untyped_data());
}
#else
ffi::Error GraphPlan(const char*, cudnnHandle_t, int, const BatchNormConfig&, bool,
                     const ffi::AnyBuffer&, const ffi::AnyBuffer&, const ffi::AnyBuffer&,
                     std::shared_ptr<const FrontendPlan>*) {
  return ffi::Error::Success();
}
const FrontendPlan* GraphOf(const BatchNormPrepared&) { return nullptr; }
ffi::Error ExecuteGraph(const char*, cudnnHandle_t, const FrontendPlan&, VariantPack,
                        const ffi::AnyBuffer&) {
  return ffi::Error::Success();
}
#endif

// Prepares the descriptors for image `x` and its parameter and statistics buffers
// `params`, and for the training forward (`graph_backward` false) and the backward
// (true) the graph plan where it applies.
ffi::Error Initialize(const char* op, cudaStream_t stream, int device, BatchNormState* state,
                      const ffi::AnyBuffer& x, std::initializer_list<ffi::AnyBuffer> params,
                      const ffi::AnyBuffer* workspace = nullptr, bool graph_backward = false) {
  const BatchNormConfig& c = state->config;
  return InitializeState(
      op, stream, device, state, [&](cudnnHandle_t handle, auto* out) -> ffi::Error {
        if (HasZeroSize(x.dimensions())) return ffi::Error::Success();
        const size_t rank = x.dimensions().size();
        if (rank != 4 && rank != 5) return InvalidArgument(op, "expected a 4-D or 5-D image");
        JAXDNN_ASSIGN_OR_RETURN(FloatType type, FloatTypeOf(op, x.element_type()));
        std::vector<int> dims = LogicalDims(x.dimensions(), c.layout);
        CacheKey key;
        key.Add(type.name).Add(static_cast<int64_t>(c.layout)).Add(c.mode).AddAll(dims);
        auto prepared = std::make_shared<BatchNormPrepared>();
        JAXDNN_RETURN_IF_ERROR(ProcessCache<BatchNormDescriptors>().GetOrBuild(
            key,
            [&](BatchNormDescriptors* d) { return BuildDescriptors(op, c, type.cudnn, dims, d); },
            &prepared->legacy));
        JAXDNN_RETURN_IF_ERROR(CheckParameters(op, *prepared->legacy, params));
        if (workspace != nullptr)
          JAXDNN_RETURN_IF_ERROR(GraphPlan(op, handle, device, c, graph_backward, x,
                                           *params.begin(), *workspace, &prepared->graph));
        *out = std::move(prepared);
        return ffi::Error::Success();
      });
}

// An empty image has no statistics to compute, but its parameter-shaped results may
// be non-empty (spatial mode with N = 0): fill them with `byte` repeated, as XLA would
// compute them (0xFF: NaN in float32 and float64, the mean of nothing; 0: a sum of
// nothing).
ffi::Error FillEmpty(const char* op, cudaStream_t stream, int byte,
                     std::initializer_list<ffi::AnyBuffer> results) {
  for (const ffi::AnyBuffer& result : results)
    JAXDNN_RETURN_IF_CUDA_ERROR(
        op, cudaMemsetAsync(result.untyped_data(), byte, result.size_bytes(), stream));
  return ffi::Error::Success();
}

using Buffer = ffi::AnyBuffer;
using Out = ffi::Result<ffi::AnyBuffer>;

// ---- jaxdnn_bn_fwd_train: x, gamma, beta -> out, mean, invstd, workspace ----

ffi::Error InitializeTrain(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                           Buffer gamma, Buffer beta, Out, Out mean, Out invstd, Out workspace) {
  return Initialize(kTrain, stream, device, state, x, {gamma, beta, *mean, *invstd}, &*workspace);
}

ffi::Error ExecuteTrain(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                        Buffer gamma, Buffer beta, Out out, Out mean, Out invstd, Out workspace) {
  if (HasZeroSize(x.dimensions())) return FillEmpty(kTrain, stream, 0xFF, {*mean, *invstd});
  const BatchNormConfig& c = state->config;
  return ExecuteState(kTrain, stream, device, state, [&](cudnnHandle_t handle, const auto& p) {
    if (const FrontendPlan* plan = GraphOf(p))
      return ExecuteGraph(kTrain, handle, *plan,
                          {{kX, x.untyped_data()},
                           {kScale, gamma.untyped_data()},
                           {kBias, beta.untyped_data()},
                           {kY, out->untyped_data()},
                           {kMean, mean->untyped_data()},
                           {kInvstd, invstd->untyped_data()}},
                          *workspace);
    const BatchNormDescriptors& d = *p.legacy;
    Scaling scaling;
    return JAXDNN_CUDNN_CALL(
        kTrain, cudnnBatchNormalizationForwardTraining(
                    handle, c.mode, scaling.alpha(d.type), scaling.beta(d.type), d.x.get(),
                    x.untyped_data(), d.x.get(), out->untyped_data(), d.param.get(),
                    gamma.untyped_data(), beta.untyped_data(), /*exponentialAverageFactor=*/0.0,
                    /*resultRunningMean=*/nullptr, /*resultRunningVariance=*/nullptr, c.epsilon,
                    mean->untyped_data(), invstd->untyped_data()));
  });
}

// ---- jaxdnn_bn_fwd_infer: x, gamma, beta, mean, var -> out ----

ffi::Error InitializeInfer(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                           Buffer gamma, Buffer beta, Buffer mean, Buffer var, Out) {
  return Initialize(kInfer, stream, device, state, x, {gamma, beta, mean, var});
}

ffi::Error ExecuteInfer(cudaStream_t stream, int device, BatchNormState* state, Buffer x,
                        Buffer gamma, Buffer beta, Buffer mean, Buffer var, Out out) {
  if (HasZeroSize(x.dimensions())) return ffi::Error::Success();
  const BatchNormConfig& c = state->config;
  return ExecuteState(kInfer, stream, device, state, [&](cudnnHandle_t handle, const auto& p) {
    const BatchNormDescriptors& d = *p.legacy;
    Scaling scaling;
    return JAXDNN_CUDNN_CALL(
        kInfer,
        cudnnBatchNormalizationForwardInference(
            handle, c.mode, scaling.alpha(d.type), scaling.beta(d.type), d.x.get(),
            x.untyped_data(), d.x.get(), out->untyped_data(), d.param.get(), gamma.untyped_data(),
            beta.untyped_data(), mean.untyped_data(), var.untyped_data(), c.epsilon));
  });
}

// ---- jaxdnn_bn_bwd: x, dy, gamma, mean, invstd -> dx, dgamma, dbeta, workspace ----

ffi::Error InitializeBwd(cudaStream_t stream, int device, BatchNormState* state, Buffer x, Buffer,
                         Buffer gamma, Buffer mean, Buffer invstd, Out, Out dgamma, Out dbeta,
                         Out workspace) {
  return Initialize(kBwd, stream, device, state, x, {gamma, mean, invstd, *dgamma, *dbeta},
                    &*workspace, /*graph_backward=*/true);
}

ffi::Error ExecuteBwd(cudaStream_t stream, int device, BatchNormState* state, Buffer x, Buffer dy,
                      Buffer gamma, Buffer mean, Buffer invstd, Out dx, Out dgamma, Out dbeta,
                      Out workspace) {
  if (HasZeroSize(x.dimensions())) return FillEmpty(kBwd, stream, 0, {*dgamma, *dbeta});
  const BatchNormConfig& c = state->config;
  return ExecuteState(kBwd, stream, device, state, [&](cudnnHandle_t handle, const auto& p) {
    if (const FrontendPlan* plan = GraphOf(p))
      return ExecuteGraph(kBwd, handle, *plan,
                          {{kX, x.untyped_data()},
                           {kDy, dy.untyped_data()},
                           {kScale, gamma.untyped_data()},
                           {kMean, mean.untyped_data()},
                           {kInvstd, invstd.untyped_data()},
                           {kDx, dx->untyped_data()},
                           {kDscale, dgamma->untyped_data()},
                           {kDbias, dbeta->untyped_data()}},
                          *workspace);
    // beta = 0 for both the data and the parameter gradients: the results are overwritten,
    // never accumulated into. The saved statistics are the forward's, so cuDNN does not
    // recompute them (epsilon is then unused, but cuDNN asks for the forward's).
    const BatchNormDescriptors& d = *p.legacy;
    Scaling scaling;
    return JAXDNN_CUDNN_CALL(
        kBwd, cudnnBatchNormalizationBackward(
                  handle, c.mode, scaling.alpha(d.type), scaling.beta(d.type),
                  scaling.alpha(d.type), scaling.beta(d.type), d.x.get(), x.untyped_data(),
                  d.x.get(), dy.untyped_data(), d.x.get(), dx->untyped_data(), d.param.get(),
                  gamma.untyped_data(), dgamma->untyped_data(), dbeta->untyped_data(), c.epsilon,
                  mean.untyped_data(), invstd.untyped_data()));
  });
}

}  // namespace

void AddBatchNormHandlers(Registry& registry) {
  registry.Add<Parse, InitializeTrain, ExecuteTrain>(kTrain);
  registry.Add<Parse, InitializeInfer, ExecuteInfer>(kInfer);
  registry.Add<Parse, InitializeBwd, ExecuteBwd>(kBwd);
}

}  // namespace jaxdnn
