// Affine spatial transformer through cudnnSpatialTfGridGenerator{Forward,Backward} and
// cudnnSpatialTfSampler{Forward,Backward} (legacy API, current in cuDNN 9), bilinear
// sampler. Targets (jaxdnn/spatial_transformer.py is the contract; one dtype per call,
// float16, float32 or float64; images NCHW):
//   jaxdnn_stn_grid_fwd     theta (N, 2, 3) -> grid (N, H, W, 2)
//   jaxdnn_stn_grid_bwd     dgrid (N, H, W, 2) -> dtheta (N, 2, 3)
//   jaxdnn_stn_sampler_fwd  img (N, C, H, W), grid (N, H_out, W_out, 2) -> out (N, C, H_out, W_out)
//   jaxdnn_stn_sampler_bwd  img, grid, dout (N, C, H_out, W_out) -> dimg, dgrid
// The transformer descriptor needs the sampler's output dims: the grid targets take them
// as an attribute (theta alone cannot give them); the sampler's are those of `out`.
#include "common/descriptors.h"
#include "common/staged_op.h"

#define JAXDNN_STN_GRID_ATTRS(X) \
  X(xla::ffi::Span<const int64_t>, out_dims) /* int64[4]: N, C, H, W of the output */
#define JAXDNN_STN_SAMPLER_ATTRS(X)
JAXDNN_DEFINE_ATTRS(StnGridAttrs, JAXDNN_STN_GRID_ATTRS);
JAXDNN_DEFINE_ATTRS(StnSamplerAttrs, JAXDNN_STN_SAMPLER_ATTRS);

namespace jaxdnn {
namespace {

constexpr char kGridFwd[] = "stn_grid_fwd";
constexpr char kGridBwd[] = "stn_grid_bwd";
constexpr char kSamplerFwd[] = "stn_sampler_fwd";
constexpr char kSamplerBwd[] = "stn_sampler_bwd";

using SpatialTransformerDescriptor =
    Descriptor<cudnnSpatialTransformerDescriptor_t, cudnnDestroySpatialTransformerDescriptor>;

struct StnConfig {
  std::vector<int> out_dims;  // the grid targets' attribute; empty for the sampler
};

struct StnDescriptors {
  cudnnDataType_t type;
  SpatialTransformerDescriptor transformer;
  TensorDescriptor img;  // img and dimg; unset for the grid generator, which has no tensors
  TensorDescriptor out;  // out and dout; likewise
};

using StnState = StagedState<StnConfig, StnDescriptors>;

ffi::Error ParseGrid(const StnGridAttrs& a, StnConfig* c) {
  if (a.out_dims.size() != 4)
    return InvalidArgument(kGridFwd, "out_dims must have 4 entries (N, C, H, W)");
  for (int64_t d : a.out_dims) {
    // Python never sends an empty array, so 0 is a caller bug too.
    if (d < 1 || !FitsInt(d))
      return InvalidArgument(kGridFwd, "out_dims entries must be in [1, INT_MAX]");
    c->out_dims.push_back(static_cast<int>(d));
  }
  return ffi::Error::Success();
}

ffi::Error ParseSampler(const StnSamplerAttrs&, StnConfig*) { return ffi::Error::Success(); }

bool HasDims(const ffi::AnyBuffer& buffer, const std::vector<int64_t>& dims) {
  return buffer.dimensions() == ffi::Span<const int64_t>(dims);
}

// What the descriptors are built from, once an op's buffers are checked against each other.
struct Shapes {
  std::vector<int> out;  // (N, C, H_out, W_out): the transformer descriptor's dims
  std::vector<int> img;  // (N, C, H, W); empty for the grid generator
};

// theta (N, 2, 3) and grid (N, H, W, 2) against out_dims, in either direction.
ffi::Error GridShapes(const char* op, const StnState& state, const ffi::AnyBuffer& theta,
                      const ffi::AnyBuffer& grid, Shapes* shapes) {
  const std::vector<int>& o = state.config.out_dims;
  if (!HasDims(theta, {o[0], 2, 3}))
    return InvalidArgument(op, "theta/dtheta must have shape (N, 2, 3) with N from out_dims");
  if (!HasDims(grid, {o[0], o[2], o[3], 2}))
    return InvalidArgument(op, "grid/dgrid must have shape (N, H, W, 2) from out_dims");
  shapes->out = o;
  return ffi::Error::Success();
}

// img (N, C, H, W), grid (N, H_out, W_out, 2) and out/dout (N, C, H_out, W_out).
ffi::Error SamplerShapes(const char* op, const ffi::AnyBuffer& img, const ffi::AnyBuffer& grid,
                         const ffi::AnyBuffer& out, Shapes* shapes) {
  ffi::Span<const int64_t> i = img.dimensions(), g = grid.dimensions();
  if (i.size() != 4) return InvalidArgument(op, "img must be 4-D (N, C, H, W)");
  if (g.size() != 4 || g[0] != i[0] || g[3] != 2)
    return InvalidArgument(op, "grid must have shape (N, H_out, W_out, 2) with img's N");
  if (!HasDims(out, {i[0], i[1], g[1], g[2]}))
    return InvalidArgument(op, "out/dout must have shape (N, C, H_out, W_out)");
  shapes->img = LogicalDims(i, Layout::kChannelsFirst);
  shapes->out = LogicalDims(out.dimensions(), Layout::kChannelsFirst);
  return ffi::Error::Success();
}

// The descriptors for `buffers` (all of the op's operands and results), whose shapes
// `check_shapes(Shapes*)` validates.
template <typename CheckShapes>
ffi::Error Initialize(const char* op, cudaStream_t stream, int device, StnState* state,
                      std::initializer_list<ffi::AnyBuffer> buffers, CheckShapes check_shapes) {
  return InitializeState(op, stream, device, state, [&](cudnnHandle_t, auto* out) -> ffi::Error {
    if (AnyEmpty(buffers)) return ffi::Error::Success();
    const ffi::DataType dtype = buffers.begin()->element_type();
    for (const ffi::AnyBuffer& b : buffers)
      if (b.element_type() != dtype) return InvalidArgument(op, "all buffers must share one dtype");
    JAXDNN_ASSIGN_OR_RETURN(FloatType type, FloatTypeOf(op, dtype));
    // The Python side computes bfloat16 in float32; fail clearly rather than in cuDNN.
    if (type.cudnn == CUDNN_DATA_BFLOAT16)
      return InvalidArgument(op, "unsupported dtype (expected float16, float32 or float64)");
    Shapes shapes;
    JAXDNN_RETURN_IF_ERROR(check_shapes(&shapes));
    CacheKey key;
    key.Add(type.name).AddAll(shapes.out).AddAll(shapes.img);
    auto build = [&](StnDescriptors* d) -> ffi::Error {
      d->type = type.cudnn;
      JAXDNN_RETURN_IF_ERROR(
          CreateDescriptor(op, cudnnCreateSpatialTransformerDescriptor, &d->transformer));
      JAXDNN_RETURN_IF_CUDNN_ERROR(
          op, cudnnSetSpatialTransformerNdDescriptor(d->transformer.get(), CUDNN_SAMPLER_BILINEAR,
                                                     d->type, 4, shapes.out.data()));
      if (shapes.img.empty()) return ffi::Error::Success();
      JAXDNN_RETURN_IF_ERROR(
          MakeTensorDescriptor(op, d->type, shapes.img, Layout::kChannelsFirst, &d->img));
      return MakeTensorDescriptor(op, d->type, shapes.out, Layout::kChannelsFirst, &d->out);
    };
    return ProcessCache<StnDescriptors>().GetOrBuild(key, build, out);
  });
}

// ---- jaxdnn_stn_grid_fwd: theta -> grid ----

ffi::Error InitializeGridFwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer theta,
                             ffi::Result<ffi::AnyBuffer> grid) {
  return Initialize(kGridFwd, stream, device, state, {theta, *grid}, [&](Shapes* shapes) {
    return GridShapes(kGridFwd, *state, theta, *grid, shapes);
  });
}

ffi::Error ExecuteGridFwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer theta,
                          ffi::Result<ffi::AnyBuffer> grid) {
  if (AnyEmpty({theta, *grid})) return ffi::Error::Success();
  return ExecuteState(kGridFwd, stream, device, state, [&](cudnnHandle_t handle, const auto& d) {
    return JAXDNN_CUDNN_CALL(
        kGridFwd, cudnnSpatialTfGridGeneratorForward(handle, d.transformer.get(),
                                                     theta.untyped_data(), grid->untyped_data()));
  });
}

// ---- jaxdnn_stn_grid_bwd: dgrid -> dtheta ----

ffi::Error InitializeGridBwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer dgrid,
                             ffi::Result<ffi::AnyBuffer> dtheta) {
  return Initialize(kGridBwd, stream, device, state, {dgrid, *dtheta}, [&](Shapes* shapes) {
    return GridShapes(kGridBwd, *state, *dtheta, dgrid, shapes);
  });
}

ffi::Error ExecuteGridBwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer dgrid,
                          ffi::Result<ffi::AnyBuffer> dtheta) {
  if (AnyEmpty({dgrid, *dtheta})) return ffi::Error::Success();
  return ExecuteState(kGridBwd, stream, device, state, [&](cudnnHandle_t handle, const auto& d) {
    return JAXDNN_CUDNN_CALL(
        kGridBwd, cudnnSpatialTfGridGeneratorBackward(
                      handle, d.transformer.get(), dgrid.untyped_data(), dtheta->untyped_data()));
  });
}

// ---- jaxdnn_stn_sampler_fwd: img, grid -> out ----

ffi::Error InitializeSamplerFwd(cudaStream_t stream, int device, StnState* state,
                                ffi::AnyBuffer img, ffi::AnyBuffer grid,
                                ffi::Result<ffi::AnyBuffer> out) {
  return Initialize(kSamplerFwd, stream, device, state, {img, grid, *out}, [&](Shapes* shapes) {
    return SamplerShapes(kSamplerFwd, img, grid, *out, shapes);
  });
}

ffi::Error ExecuteSamplerFwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer img,
                             ffi::AnyBuffer grid, ffi::Result<ffi::AnyBuffer> out) {
  if (AnyEmpty({img, grid, *out})) return ffi::Error::Success();
  return ExecuteState(kSamplerFwd, stream, device, state, [&](cudnnHandle_t handle, const auto& d) {
    Scaling scaling;
    return JAXDNN_CUDNN_CALL(
        kSamplerFwd,
        cudnnSpatialTfSamplerForward(handle, d.transformer.get(), scaling.alpha(d.type),
                                     d.img.get(), img.untyped_data(), grid.untyped_data(),
                                     scaling.beta(d.type), d.out.get(), out->untyped_data()));
  });
}

// ---- jaxdnn_stn_sampler_bwd: img, grid, dout -> dimg, dgrid ----

ffi::Error InitializeSamplerBwd(cudaStream_t stream, int device, StnState* state,
                                ffi::AnyBuffer img, ffi::AnyBuffer grid, ffi::AnyBuffer dout,
                                ffi::Result<ffi::AnyBuffer> dimg,
                                ffi::Result<ffi::AnyBuffer> dgrid) {
  return Initialize(
      kSamplerBwd, stream, device, state, {img, grid, dout, *dimg, *dgrid},
      [&](Shapes* shapes) -> ffi::Error {
        if (!(dimg->dimensions() == img.dimensions() && dgrid->dimensions() == grid.dimensions()))
          return InvalidArgument(kSamplerBwd, "dimg and dgrid must match img and grid");
        return SamplerShapes(kSamplerBwd, img, grid, dout, shapes);
      });
}

ffi::Error ExecuteSamplerBwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer img,
                             ffi::AnyBuffer grid, ffi::AnyBuffer dout,
                             ffi::Result<ffi::AnyBuffer> dimg, ffi::Result<ffi::AnyBuffer> dgrid) {
  if (AnyEmpty({img, grid, dout, *dimg, *dgrid})) return ffi::Error::Success();
  return ExecuteState(kSamplerBwd, stream, device, state, [&](cudnnHandle_t handle, const auto& d) {
    // beta = betaDgrid = 0: XLA's result buffers hold garbage to overwrite.
    Scaling scaling;
    return JAXDNN_CUDNN_CALL(
        kSamplerBwd,
        cudnnSpatialTfSamplerBackward(handle, d.transformer.get(), scaling.alpha(d.type),
                                      d.img.get(), img.untyped_data(), scaling.beta(d.type),
                                      d.img.get(), dimg->untyped_data(), scaling.alpha(d.type),
                                      d.out.get(), dout.untyped_data(), grid.untyped_data(),
                                      scaling.beta(d.type), dgrid->untyped_data()));
  });
}

}  // namespace

void AddSpatialTransformerHandlers(Registry& registry) {
  registry.Add<ParseGrid, InitializeGridFwd, ExecuteGridFwd>(kGridFwd);
  registry.Add<ParseGrid, InitializeGridBwd, ExecuteGridBwd>(kGridBwd);
  registry.Add<ParseSampler, InitializeSamplerFwd, ExecuteSamplerFwd>(kSamplerFwd);
  registry.Add<ParseSampler, InitializeSamplerBwd, ExecuteSamplerBwd>(kSamplerBwd);
}

}  // namespace jaxdnn
