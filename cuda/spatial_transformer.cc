// Affine spatial transformer through cudnnSpatialTfGridGenerator{Forward,Backward} and
// cudnnSpatialTfSampler{Forward,Backward} (legacy API, current in cuDNN 9), with the
// bilinear sampler (CUDNN_SAMPLER_BILINEAR).
//
// FFI targets (every buffer of one call in float16, float32 or float64; images NCHW):
//   jaxdnn_stn_grid_fwd     theta (N, 2, 3) -> grid (N, H, W, 2)
//   jaxdnn_stn_grid_bwd     dgrid (N, H, W, 2) -> dtheta (N, 2, 3)
//   jaxdnn_stn_sampler_fwd  img (N, C, H, W), grid (N, H_out, W_out, 2) -> out (N, C, H_out, W_out)
//   jaxdnn_stn_sampler_bwd  img, grid, dout (N, C, H_out, W_out) -> dimg, dgrid
// Attributes: the grid targets take out_dims (int64[4]: N, C, H, W of the sampler's output),
// which the transformer descriptor needs and theta alone cannot give; the sampler targets
// take none, the descriptor's dims being those of `out`.
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
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

constexpr char kGridFwd[] = "stn_grid_fwd";
constexpr char kGridBwd[] = "stn_grid_bwd";
constexpr char kSamplerFwd[] = "stn_sampler_fwd";
constexpr char kSamplerBwd[] = "stn_sampler_bwd";

using SpatialTransformerDescriptor =
    Descriptor<cudnnSpatialTransformerDescriptor_t, cudnnDestroySpatialTransformerDescriptor>;

struct StnDescriptors {
  cudnnDataType_t type;
  SpatialTransformerDescriptor transformer;
  TensorDescriptor img;  // img and dimg; unset for the grid generator, which has no tensors
  TensorDescriptor out;  // out and dout; likewise
};

KeyedCache<StnDescriptors>& DescriptorCache() {
  static auto* cache = new KeyedCache<StnDescriptors>();
  return *cache;
}

// One State type for all four targets: they differ only in where the descriptor's dims
// come from (the attribute, or the sampler's buffers) and in which descriptors they use.
struct StnState {
  static ffi::TypeId id;
  std::vector<int> out_dims;  // the grid targets' attribute; empty for the sampler
  DescriptorSlot<StnDescriptors> descriptors;
};
ffi::TypeId StnState::id = {};
const XLA_FFI_TypeInfo kStnStateInfo = ffi::MakeTypeInfo<StnState>();

using Ints = ffi::Span<const int64_t>;
using Buffers = std::initializer_list<ffi::AnyBuffer>;

ffi::ErrorOr<std::unique_ptr<StnState>> InstantiateGrid(Ints out_dims) {
  return Guarded(kGridFwd, [&]() -> ffi::ErrorOr<std::unique_ptr<StnState>> {
    auto fail = [](const char* message) {
      return ffi::Unexpected(InvalidArgument(kGridFwd, message));
    };
    if (out_dims.size() != 4) return fail("out_dims must have 4 entries (N, C, H, W)");
    auto state = std::make_unique<StnState>();
    for (int64_t d : out_dims) {
      // cuDNN takes int dims; Python never sends an empty array, so 0 is a caller bug too.
      if (d < 1 || d > std::numeric_limits<int>::max())
        return fail("out_dims entries must be in [1, INT_MAX]");
      state->out_dims.push_back(static_cast<int>(d));
    }
    return state;
  });
}

ffi::ErrorOr<std::unique_ptr<StnState>> InstantiateSampler() {
  return Guarded(kSamplerFwd, []() -> ffi::ErrorOr<std::unique_ptr<StnState>> {
    return std::make_unique<StnState>();
  });
}

bool AnyZeroSize(Buffers buffers) {
  for (const ffi::AnyBuffer& b : buffers)
    if (HasZeroSize(b.dimensions())) return true;
  return false;
}

bool HasDims(const ffi::AnyBuffer& buffer, const std::vector<int64_t>& dims) {
  return buffer.dimensions() == Ints(dims);
}

// What the descriptors are built from, once an op's buffers are checked against each other.
struct Shapes {
  std::vector<int> out;  // (N, C, H_out, W_out): the transformer descriptor's dims
  std::vector<int> img;  // (N, C, H, W); empty for the grid generator
};

// theta (N, 2, 3) and grid (N, H, W, 2) against out_dims, in either direction.
ffi::Error GridShapes(const char* op, const StnState& state, const ffi::AnyBuffer& theta,
                      const ffi::AnyBuffer& grid, Shapes* shapes) {
  const std::vector<int>& o = state.out_dims;
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
  Ints i = img.dimensions(), g = grid.dimensions();
  if (i.size() != 4) return InvalidArgument(op, "img must be 4-D (N, C, H, W)");
  if (g.size() != 4 || g[0] != i[0] || g[3] != 2)
    return InvalidArgument(op, "grid must have shape (N, H_out, W_out, 2) with img's N");
  if (!HasDims(out, {i[0], i[1], g[1], g[2]}))
    return InvalidArgument(op, "out/dout must have shape (N, C, H_out, W_out)");
  shapes->img = LogicalDims(i, Layout::kChannelsFirst);
  shapes->out = LogicalDims(out.dimensions(), Layout::kChannelsFirst);
  return ffi::Error::Success();
}

// Reserves a cuDNN handle and fetches the descriptors for `buffers` (all of the op's
// operands and results), whose shapes `check_shapes(Shapes*)` validates.
template <typename CheckShapes>
ffi::Error Initialize(const char* op, int device, StnState* state, Buffers buffers,
                      CheckShapes check_shapes) {
  return Guarded(op, [&]() -> ffi::Error {
    JAXDNN_RETURN_IF_ERROR(ReserveCudnnHandle(op, device));
    if (!state->descriptors.empty() || AnyZeroSize(buffers)) return ffi::Error::Success();
    const ffi::DataType dtype = buffers.begin()->element_type();
    for (const ffi::AnyBuffer& b : buffers)
      if (b.element_type() != dtype) return InvalidArgument(op, "all buffers must share one dtype");
    cudnnDataType_t type;
    JAXDNN_RETURN_IF_ERROR(CudnnDataType(op, dtype, &type));
    // The Python side computes bfloat16 in float32; fail clearly rather than in cuDNN.
    if (type == CUDNN_DATA_BFLOAT16)
      return InvalidArgument(op, "unsupported dtype (expected float16, float32 or float64)");
    Shapes shapes;
    JAXDNN_RETURN_IF_ERROR(check_shapes(&shapes));
    CacheKey key;
    key.Add(type).AddAll(shapes.out).AddAll(shapes.img);
    std::shared_ptr<const StnDescriptors> descriptors;
    JAXDNN_RETURN_IF_ERROR(DescriptorCache().GetOrBuild(
        key,
        [&](StnDescriptors* d) -> ffi::Error {
          d->type = type;
          JAXDNN_RETURN_IF_ERROR(
              CreateDescriptor(op, cudnnCreateSpatialTransformerDescriptor, &d->transformer));
          JAXDNN_RETURN_IF_CUDNN_ERROR(
              op, cudnnSetSpatialTransformerNdDescriptor(
                      d->transformer.get(), CUDNN_SAMPLER_BILINEAR, type, 4, shapes.out.data()));
          if (shapes.img.empty()) return ffi::Error::Success();
          JAXDNN_RETURN_IF_ERROR(
              MakeTensorDescriptor(op, type, shapes.img, Layout::kChannelsFirst, &d->img));
          return MakeTensorDescriptor(op, type, shapes.out, Layout::kChannelsFirst, &d->out);
        },
        &descriptors));
    state->descriptors.Set(std::move(descriptors));
    return ffi::Error::Success();
  });
}

// Borrows a handle and runs `launch(handle, descriptors)`, which makes the cuDNN call
// (inside JAXDNN_RETURN_IF_CUDNN_ERROR, so that errors name it).
template <typename Launch>
ffi::Error Execute(const char* op, cudaStream_t stream, int device, StnState* state,
                   Buffers buffers, Launch launch) {
  if (AnyZeroSize(buffers)) return ffi::Error::Success();
  BorrowedCudnnHandle handle(op, device, stream);
  JAXDNN_RETURN_IF_ERROR(handle.error());
  const StnDescriptors* d;
  JAXDNN_RETURN_IF_ERROR(InitializedDescriptors(op, state->descriptors, &d));
  return launch(handle.get(), *d);
}

// ---- jaxdnn_stn_grid_fwd: theta -> grid ----

ffi::Error InitializeGridFwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer theta,
                             ffi::Result<ffi::AnyBuffer> grid, Ints) {
  return Initialize(kGridFwd, device, state, {theta, *grid}, [&](Shapes* shapes) {
    return GridShapes(kGridFwd, *state, theta, *grid, shapes);
  });
}

ffi::Error ExecuteGridFwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer theta,
                          ffi::Result<ffi::AnyBuffer> grid, Ints) {
  return Execute(
      kGridFwd, stream, device, state, {theta, *grid},
      [&](cudnnHandle_t handle, const StnDescriptors& d) -> ffi::Error {
        JAXDNN_RETURN_IF_CUDNN_ERROR(
            kGridFwd, cudnnSpatialTfGridGeneratorForward(
                          handle, d.transformer.get(), theta.untyped_data(), grid->untyped_data()));
        return ffi::Error::Success();
      });
}

// ---- jaxdnn_stn_grid_bwd: dgrid -> dtheta ----

ffi::Error InitializeGridBwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer dgrid,
                             ffi::Result<ffi::AnyBuffer> dtheta, Ints) {
  return Initialize(kGridBwd, device, state, {dgrid, *dtheta}, [&](Shapes* shapes) {
    return GridShapes(kGridBwd, *state, *dtheta, dgrid, shapes);
  });
}

ffi::Error ExecuteGridBwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer dgrid,
                          ffi::Result<ffi::AnyBuffer> dtheta, Ints) {
  return Execute(kGridBwd, stream, device, state, {dgrid, *dtheta},
                 [&](cudnnHandle_t handle, const StnDescriptors& d) -> ffi::Error {
                   JAXDNN_RETURN_IF_CUDNN_ERROR(
                       kGridBwd, cudnnSpatialTfGridGeneratorBackward(handle, d.transformer.get(),
                                                                     dgrid.untyped_data(),
                                                                     dtheta->untyped_data()));
                   return ffi::Error::Success();
                 });
}

// ---- jaxdnn_stn_sampler_fwd: img, grid -> out ----

ffi::Error InitializeSamplerFwd(cudaStream_t stream, int device, StnState* state,
                                ffi::AnyBuffer img, ffi::AnyBuffer grid,
                                ffi::Result<ffi::AnyBuffer> out) {
  return Initialize(kSamplerFwd, device, state, {img, grid, *out}, [&](Shapes* shapes) {
    return SamplerShapes(kSamplerFwd, img, grid, *out, shapes);
  });
}

ffi::Error ExecuteSamplerFwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer img,
                             ffi::AnyBuffer grid, ffi::Result<ffi::AnyBuffer> out) {
  return Execute(kSamplerFwd, stream, device, state, {img, grid, *out},
                 [&](cudnnHandle_t handle, const StnDescriptors& d) -> ffi::Error {
                   Scaling scaling;
                   JAXDNN_RETURN_IF_CUDNN_ERROR(
                       kSamplerFwd, cudnnSpatialTfSamplerForward(
                                        handle, d.transformer.get(), scaling.alpha(d.type),
                                        d.img.get(), img.untyped_data(), grid.untyped_data(),
                                        scaling.beta(d.type), d.out.get(), out->untyped_data()));
                   return ffi::Error::Success();
                 });
}

// ---- jaxdnn_stn_sampler_bwd: img, grid, dout -> dimg, dgrid ----

ffi::Error InitializeSamplerBwd(cudaStream_t stream, int device, StnState* state,
                                ffi::AnyBuffer img, ffi::AnyBuffer grid, ffi::AnyBuffer dout,
                                ffi::Result<ffi::AnyBuffer> dimg,
                                ffi::Result<ffi::AnyBuffer> dgrid) {
  return Initialize(
      kSamplerBwd, device, state, {img, grid, dout, *dimg, *dgrid},
      [&](Shapes* shapes) -> ffi::Error {
        if (!(dimg->dimensions() == img.dimensions() && dgrid->dimensions() == grid.dimensions()))
          return InvalidArgument(kSamplerBwd, "dimg and dgrid must match img and grid");
        return SamplerShapes(kSamplerBwd, img, grid, dout, shapes);
      });
}

ffi::Error ExecuteSamplerBwd(cudaStream_t stream, int device, StnState* state, ffi::AnyBuffer img,
                             ffi::AnyBuffer grid, ffi::AnyBuffer dout,
                             ffi::Result<ffi::AnyBuffer> dimg, ffi::Result<ffi::AnyBuffer> dgrid) {
  return Execute(kSamplerBwd, stream, device, state, {img, grid, dout, *dimg, *dgrid},
                 [&](cudnnHandle_t handle, const StnDescriptors& d) -> ffi::Error {
                   // beta = betaDgrid = 0: XLA's result buffers hold garbage to overwrite.
                   Scaling scaling;
                   JAXDNN_RETURN_IF_CUDNN_ERROR(
                       kSamplerBwd, cudnnSpatialTfSamplerBackward(
                                        handle, d.transformer.get(), scaling.alpha(d.type),
                                        d.img.get(), img.untyped_data(), scaling.beta(d.type),
                                        d.img.get(), dimg->untyped_data(), scaling.alpha(d.type),
                                        d.out.get(), dout.untyped_data(), grid.untyped_data(),
                                        scaling.beta(d.type), dgrid->untyped_data()));
                   return ffi::Error::Success();
                 });
}

template <ffi::ExecutionStage stage, size_t kOperands>
auto GridBinding() {
  return LegacyOpBinding<StnState, stage, kOperands>().template Attr<Ints>("out_dims");
}

template <ffi::ExecutionStage stage, size_t kOperands>
auto SamplerBinding() {
  return LegacyOpBinding<StnState, stage, kOperands>();
}

// img, grid, dout -> dimg, dgrid
template <ffi::ExecutionStage stage>
auto SamplerBwdBinding() {
  return LegacyOpBinding<StnState, stage, 3, 2>();
}

XLA_FFI_DEFINE_HANDLER(kGridInstantiate, InstantiateGrid,
                       ffi::Ffi::BindInstantiate().Attr<Ints>("out_dims"));
XLA_FFI_DEFINE_HANDLER(kSamplerInstantiate, InstantiateSampler, ffi::Ffi::BindInstantiate());
XLA_FFI_DEFINE_HANDLER(kGridFwdInitialize, InitializeGridFwd, (GridBinding<kInitializeStage, 1>()));
XLA_FFI_DEFINE_HANDLER(kGridFwdExecute, ExecuteGridFwd, (GridBinding<kExecuteStage, 1>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kGridBwdInitialize, InitializeGridBwd, (GridBinding<kInitializeStage, 1>()));
XLA_FFI_DEFINE_HANDLER(kGridBwdExecute, ExecuteGridBwd, (GridBinding<kExecuteStage, 1>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kSamplerFwdInitialize, InitializeSamplerFwd,
                       (SamplerBinding<kInitializeStage, 2>()));
XLA_FFI_DEFINE_HANDLER(kSamplerFwdExecute, ExecuteSamplerFwd, (SamplerBinding<kExecuteStage, 2>()),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kSamplerBwdInitialize, InitializeSamplerBwd,
                       SamplerBwdBinding<kInitializeStage>());
XLA_FFI_DEFINE_HANDLER(kSamplerBwdExecute, ExecuteSamplerBwd, SamplerBwdBinding<kExecuteStage>(),
                       {ffi::Traits::kCmdBufferCompatible});

}  // namespace

void AddSpatialTransformerHandlers(Registry& registry) {
  registry.state_types.push_back({"jaxdnn_stn_state", &StnState::id, &kStnStateInfo});
  registry.handlers.push_back(
      {"jaxdnn_stn_grid_fwd", kGridInstantiate, kGridFwdInitialize, kGridFwdExecute});
  registry.handlers.push_back(
      {"jaxdnn_stn_grid_bwd", kGridInstantiate, kGridBwdInitialize, kGridBwdExecute});
  registry.handlers.push_back(
      {"jaxdnn_stn_sampler_fwd", kSamplerInstantiate, kSamplerFwdInitialize, kSamplerFwdExecute});
  registry.handlers.push_back(
      {"jaxdnn_stn_sampler_bwd", kSamplerInstantiate, kSamplerBwdInitialize, kSamplerBwdExecute});
}

}  // namespace jaxdnn
