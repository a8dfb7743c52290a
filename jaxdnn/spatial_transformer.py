"""Spatial transformer: `dnn_spatialtf`, `dnn_affine_grid` (Theano's GpuDnnTransformerGrid)
and `dnn_grid_sampler` (GpuDnnTransformerSampler), after cuDNN's
cudnnSpatialTfGridGenerator{Forward,Backward} and cudnnSpatialTfSampler{Forward,Backward}.

Four primitives, one per cuDNN call, and the sampler's tangent (XLA only):

  stn_grid_fwd      theta (N, 2, 3)                -> grid (N, H, W, 2)
  stn_grid_bwd      dgrid (N, H, W, 2)             -> dtheta (N, 2, 3)
  stn_sampler_fwd   img (N, C, H, W), grid         -> out (N, C, H_out, W_out)
  stn_sampler_bwd   img, grid, dout                -> [dimg, dgrid]
  stn_sampler_tangent  img, grid, timg, tgrid      -> d out

Both modes of AD work to any order, through JVP and transpose rules on the primitives. The
grid generator is linear in theta: each of its primitives is the other's transpose (as
for linear pooling). The sampler's tangent is stn_sampler_tangent, linear in (timg, tgrid),
whose transpose is stn_sampler_bwd, the cuDNN backward, with residuals (img, grid) as
before; stn_sampler_bwd is linear in dout, and its transpose is stn_sampler_tangent. Their
derivatives in img and grid (second order) are their references' (XLA).

What the cuDNN handlers receive (the contract for cuda/spatial_transformer.cc):
  * float16, float32 or float64, and every operand of one call in the same dtype;
    bfloat16 never reaches a primitive (the public functions compute it in float32);
  * stn_grid_fwd/stn_grid_bwd: attribute out_dims (int64[4], (N, C, H, W) of the
    sampler's output, for cudnnSetSpatialTransformerNdDescriptor); the sampler
    primitives: no attributes (the descriptor's dims are those of `out`);
  * never an empty array (the public functions return zeros without binding);
  * stn_sampler_bwd is never sent to cuDNN under dnn.deterministic=True (below).

The cuDNN handlers are in cuda/spatial_transformer.cc. Where the loaded extension lacks
them (an old or CPU-only build that registers no FFI_TARGETS), `choose_impl` sends every
call to the XLA reference path (jaxdnn/reference/spatial_transformer.py) and
dnn.enabled=True raises.

Determinism. dnn.deterministic=True must make the sampler backward bitwise reproducible.
cuDNN's documentation lists cudnnSpatialTfSamplerBackward among its routines without a
reproducibility guarantee (atomic accumulation of the image gradient), and XLA's GPU
scatter-add is atomic too. So under the flag the backward always takes the XLA path with
`deterministic=True`, which computes the image gradient without a scatter: a stable sort of
the contributions by destination pixel, a segmented scan in a fixed order and a gather
(see reference._sorted_segment_sum). dgrid and dtheta are gathers and reductions, which
XLA computes deterministically. Without the flag, the XLA path scatter-adds (which is
sequential, hence deterministic, on the CPU).
"""
from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
import numpy as np

from jaxdnn import _validate, config
from jaxdnn._compat import ShapedArray, ad, zero_tangent_like
from jaxdnn._primitive import (choose_impl, define_linear_in_last, define_linear_pair,
                               define_primitive, fold_into_batch, fold_into_batch_resizing)
from jaxdnn._sharding import Partitioning
from jaxdnn.reference import spatial_transformer as reference

__all__ = ["dnn_spatialtf", "dnn_affine_grid", "dnn_grid_sampler", "stn_grid_fwd_p",
           "stn_grid_bwd_p", "stn_sampler_fwd_p", "stn_sampler_bwd_p", "stn_sampler_tangent_p",
           "FFI_TARGETS"]

FFI_TARGETS = ("jaxdnn_stn_grid_fwd", "jaxdnn_stn_grid_bwd", "jaxdnn_stn_sampler_fwd",
               "jaxdnn_stn_sampler_bwd")


# ---- primitives ---------------------------------------------------------------------------

def _check_same_dtype(name, *avals):
    if any(a.dtype != avals[0].dtype for a in avals):
        raise TypeError(f"{name}: operands must share one dtype; got "
                        f"{', '.join(str(a.dtype) for a in avals)}")


def _grid_fwd_abstract(theta, *, out_dims):
    n, _, height, width = out_dims
    if tuple(theta.shape) != (n, 2, 3):
        raise ValueError(f"stn_grid_fwd: theta of shape {theta.shape} does not match "
                         f"out_dims={out_dims}; expected ({n}, 2, 3)")
    return ShapedArray((n, height, width, 2), theta.dtype)


def _grid_bwd_abstract(dgrid, *, out_dims):
    n, _, height, width = out_dims
    if tuple(dgrid.shape) != (n, height, width, 2):
        raise ValueError(f"stn_grid_bwd: dgrid of shape {dgrid.shape} does not match "
                         f"out_dims={out_dims}; expected ({n}, {height}, {width}, 2)")
    return ShapedArray((n, 2, 3), dgrid.dtype)


def _sampler_fwd_abstract(img, grid):
    _check_same_dtype("stn_sampler_fwd", img, grid)
    return ShapedArray(tuple(img.shape[:2]) + tuple(grid.shape[1:3]), img.dtype)


def _sampler_bwd_abstract(img, grid, dout, *, deterministic):
    _check_same_dtype("stn_sampler_bwd", img, grid, dout)
    return [ShapedArray(img.shape, img.dtype), ShapedArray(grid.shape, grid.dtype)]


def _sampler_tangent_abstract(img, grid, timg, tgrid, *, deterministic):
    _check_same_dtype("stn_sampler_tangent", img, grid, timg, tgrid)
    return ShapedArray(tuple(img.shape[:2]) + tuple(grid.shape[1:3]), img.dtype)


def _grid_attributes(*, out_dims):
    return dict(out_dims=np.asarray(out_dims, np.int64))


def _no_attributes(**params):
    # deterministic=True never reaches cuDNN (see the module docstring)
    return {}


# The grid primitives fold the vmapped axis into N (exact: every image has its own theta),
# and out_dims, which gives the descriptor its N, grows with it.
_batch_grid = fold_into_batch_resizing("out_dims")


# Factor strings: theta (N, 2, 3), grid (N, H, W, 2), images NCHW, the sampled output
# (N, C, H', W'). Every image has its own theta: N splits everywhere; the sampler also
# splits C (the grid gradient sums over C: its per-shard parts are psummed).
_THETA, _GRID, _IMAGE, _SAMPLED = "n a b", "n ho wo t", "n c h w", "n c ho wo"


def _grid_fwd_partitioning(theta, *, out_dims):
    return Partitioning((_THETA,), (_GRID,), frozenset({"n"}),
                        shape_params={"out_dims": "n c ho wo"})


def _grid_bwd_partitioning(dgrid, *, out_dims):
    return Partitioning((_GRID,), (_THETA,), frozenset({"n"}),
                        shape_params={"out_dims": "n c ho wo"})


def _sampler_fwd_partitioning(img, grid):
    return Partitioning((_IMAGE, _GRID), (_SAMPLED,), frozenset({"n", "c"}))


def _sampler_bwd_partitioning(img, grid, dout, *, deterministic):
    return Partitioning((_IMAGE, _GRID, _SAMPLED), (_IMAGE, _GRID), frozenset({"n", "c"}))


def _sampler_tangent_partitioning(img, grid, timg, tgrid, *, deterministic):
    return Partitioning((_IMAGE, _GRID, _IMAGE, _GRID), (_SAMPLED,), frozenset({"n", "c"}))


stn_grid_fwd_p = define_primitive(
    "jaxdnn_stn_grid_fwd", abstract_eval=_grid_fwd_abstract, reference=reference.grid_forward,
    attributes=_grid_attributes, batch_rule=_batch_grid,
    partitioning=_grid_fwd_partitioning)

stn_grid_bwd_p = define_primitive(
    "jaxdnn_stn_grid_bwd", abstract_eval=_grid_bwd_abstract, reference=reference.grid_backward,
    attributes=_grid_attributes, batch_rule=_batch_grid,
    partitioning=_grid_bwd_partitioning)

# The sampler treats the images of a batch independently: vmapped axes fold into N
# (an unmapped operand is broadcast along them).
stn_sampler_fwd_p = define_primitive(
    "jaxdnn_stn_sampler_fwd", abstract_eval=_sampler_fwd_abstract,
    reference=reference.sampler_forward, attributes=_no_attributes, batch_rule=fold_into_batch,
    partitioning=_sampler_fwd_partitioning)

stn_sampler_bwd_p = define_primitive(
    "jaxdnn_stn_sampler_bwd", abstract_eval=_sampler_bwd_abstract,
    reference=reference.sampler_backward, attributes=_no_attributes, batch_rule=fold_into_batch,
    partitioning=_sampler_bwd_partitioning, multiple_results=True)


# The grid generator is linear: JVP and transpose rules on the primitives themselves.
define_linear_pair(stn_grid_fwd_p, stn_grid_bwd_p)


# The sampler's forward derivative (on XLA whatever its impl: cuDNN has no such pass; impl
# and `deterministic` are its transpose's, stn_sampler_bwd).
stn_sampler_tangent_p = define_primitive(
    "jaxdnn_stn_sampler_tangent", abstract_eval=_sampler_tangent_abstract,
    reference=reference.sampler_tangent, ffi_target=None, batch_rule=fold_into_batch,
    partitioning=_sampler_tangent_partitioning)


# ---- the sampler's differentiation: JVP rules; reverse mode transposes them -----------------
# The tangent is one primitive linear in (timg, tgrid) jointly. Its timg part alone is the
# cuDNN sampler forward applied to timg, but reverse mode would then transpose the two parts
# separately, into two sampler backward calls (cuDNN computes dimg and dgrid in one); as one
# primitive it transposes into a single stn_sampler_bwd, what the gradient ran before.

def _sampler_jvp(primals, tangents, *, impl):
    img, grid = primals
    out = stn_sampler_fwd_p.bind(img, grid, impl=impl)
    if all(type(t) is ad.Zero for t in tangents):
        return out, zero_tangent_like(out)
    # The backward's implementation and determinism, as _implementations chose them for
    # this forward: read where the derivative is taken.
    deterministic = bool(config.read("dnn.deterministic"))
    backward_impl = "xla" if deterministic else impl
    return out, stn_sampler_tangent_p.bind(img, grid, *map(ad.instantiate_zeros, tangents),
                                           deterministic=deterministic, impl=backward_impl)


def _sampler_cotangent(img, grid, ct, **params):
    """The transpose of stn_sampler_tangent: [dimg, dgrid], the cuDNN sampler backward."""
    return stn_sampler_bwd_p.bind(img, grid, ct, **params)


def _sampler_backward_transposed(img, grid, cts, **params):
    """The transpose of stn_sampler_bwd in dout: the tangent in the direction of its two
    cotangents."""
    return stn_sampler_tangent_p.bind(img, grid, *cts, **params)


ad.primitive_jvps[stn_sampler_fwd_p] = _sampler_jvp
define_linear_in_last(stn_sampler_tangent_p, _sampler_cotangent,
                      reference=reference.sampler_tangent, linear=2)
define_linear_in_last(stn_sampler_bwd_p, _sampler_backward_transposed,
                      reference=reference.sampler_backward)


def _implementations(op: str, *shapes) -> tuple[str, str, bool]:
    """(sampler-forward impl, impl of the reductions, deterministic). 'auto' takes cuDNN
    wherever its handlers exist. Under dnn.deterministic the sampler backward and the grid
    generator (whose backward is a reduction over the grid, for which cuDNN documents no
    reproducibility guarantee either) run on the deterministic XLA path whatever
    dnn.enabled says; the forward sampler stays where it is."""
    impl = choose_impl(op, ffi_targets=FFI_TARGETS, shapes=shapes)
    deterministic = bool(config.read("dnn.deterministic"))
    return impl, ("xla" if deterministic else impl), deterministic


# ---- argument handling --------------------------------------------------------------------

def _array(x):
    return jnp.asarray(x)


def _check_theta(op: str, theta) -> None:
    _validate.check_rank(op, "theta", theta, (3,), " (N, 2, 3): one 2x3 affine matrix per image")
    if tuple(theta.shape[1:]) != (2, 3):
        raise ValueError(f"{op}: theta must have shape (N, 2, 3), one 2x3 affine matrix per "
                         f"image; got shape {tuple(theta.shape)}")
    _validate.check_floating(op, "theta", theta)


def _check_img(op: str, img) -> None:
    _validate.check_rank(op, "img", img, (4,), " (N, C, H, W)")
    _validate.check_floating(op, "img", img)


def _out_dims(op: str, out_dims) -> tuple[int, int, int, int]:
    try:
        items = tuple(out_dims)
    except TypeError:
        raise TypeError(f"{op}: out_dims must be a tuple of 4 ints (N, C, H, W); "
                        f"got {out_dims!r}") from None
    if len(items) != 4:
        raise ValueError(f"{op}: out_dims={out_dims!r} must have 4 entries (N, C, H, W)")
    if not all(_validate.is_int(v) for v in items):
        raise TypeError(f"{op}: out_dims must hold static ints (N, C, H, W); got {out_dims!r}")
    items = tuple(int(v) for v in items)
    if any(v < 0 for v in items):
        raise ValueError(f"{op}: out_dims={items} must not be negative")
    return items


def _scale(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise TypeError(f"{op}: {name} must be a static positive number (it sets the output "
                        f"shape); got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: {name}={value!r} must be positive and finite")
    return value


def _working_dtype(*arrays):
    """(the result dtype: JAX's promotion of the operands' dtypes, the dtype the primitives
    see: float32 for bfloat16, which cuDNN's spatial transformer does not take)."""
    dtype = jnp.dtype(jnp.result_type(*(a.dtype for a in arrays)))
    return dtype, (jnp.dtype(jnp.float32) if dtype == jnp.bfloat16 else dtype)


def _affine_grid(theta, out_dims, impl):
    n, c, height, width = out_dims
    if n * height * width == 0:
        return jnp.zeros((n, height, width, 2), theta.dtype)
    # C does not shape the grid; the descriptor gets at least 1 (handlers see no empty dim)
    return stn_grid_fwd_p.bind(theta, out_dims=(n, max(c, 1), height, width), impl=impl)


def _grid_sampler(img, grid, impl):
    if img.size == 0 or grid.size == 0:  # nothing to sample, or every sample outside
        return jnp.zeros(tuple(img.shape[:2]) + tuple(grid.shape[1:3]), img.dtype)
    # the backward's implementation is chosen where the derivative is taken (_sampler_jvp)
    return stn_sampler_fwd_p.bind(img, grid, impl=impl)


# ---- public functions ---------------------------------------------------------------------

def dnn_affine_grid(theta, out_dims):
    """The sampling grid of an affine spatial transformer (Theano's GpuDnnTransformerGrid).

    theta: (N, 2, 3) affine matrices in normalized coordinates. out_dims: (N, C, H, W), the
    shape of the transformed images (static ints; C is not used by the grid).
    Returns grid (N, H, W, 2): grid[n, i, j] = theta[n] @ [x_t[j], y_t[i], 1] with x_t on
    linspace(-1, 1, W) and y_t on linspace(-1, 1, H); grid[..., 0] is x (width),
    grid[..., 1] is y (height). Linear in theta (jvp and grad of any order).
    bfloat16 is computed in float32.
    """
    op = "dnn_affine_grid"
    theta = _array(theta)
    _check_theta(op, theta)
    out_dims = _out_dims(op, out_dims)
    if out_dims[0] != theta.shape[0]:
        raise ValueError(f"{op}: out_dims={out_dims} has N={out_dims[0]} but theta holds "
                         f"{theta.shape[0]} matrices (shape {tuple(theta.shape)})")
    dtype, work = _working_dtype(theta)
    _, grid_impl, _ = _implementations(op, (*out_dims[:1], out_dims[2], out_dims[3], 2))
    return _affine_grid(theta.astype(work), out_dims, grid_impl).astype(dtype)


def dnn_grid_sampler(img, grid):
    """Bilinear sampling of img (N, C, H, W) at grid (N, H_out, W_out, 2) -> (N, C, H_out,
    W_out) (Theano's GpuDnnTransformerSampler).

    grid holds normalized coordinates, grid[..., 0] = x (width), grid[..., 1] = y (height),
    with -1 and 1 the centres of the corner pixels: x = (gx + 1) * (W - 1) / 2. Neighbours
    outside the image contribute 0. Differentiable in img and grid (reverse mode; the
    gradient in grid jumps where a sample point crosses a pixel row or column).
    The result has the promoted dtype of img and grid; bfloat16 is computed in float32.
    """
    op = "dnn_grid_sampler"
    img, grid = _array(img), _array(grid)
    _check_img(op, img)
    _validate.check_rank(op, "grid", grid, (4,), " (N, H_out, W_out, 2)")
    if grid.shape[-1] != 2:
        raise ValueError(f"{op}: grid must have shape (N, H_out, W_out, 2) (x, y per sample "
                         f"point); got shape {tuple(grid.shape)}")
    _validate.check_floating(op, "grid", grid)
    if grid.shape[0] != img.shape[0]:
        raise ValueError(f"{op}: grid holds {grid.shape[0]} grids (shape {tuple(grid.shape)}) "
                         f"but img holds {img.shape[0]} images (shape {tuple(img.shape)})")
    dtype, work = _working_dtype(img, grid)
    impl, _, _ = _implementations(op, img.shape, grid.shape, (*img.shape[:2], *grid.shape[1:3]))
    out = _grid_sampler(img.astype(work), grid.astype(work), impl)
    return out.astype(dtype)


def dnn_spatialtf(img, theta, scale_width=1, scale_height=1):
    """Affine spatial transformer (Theano's dnn_spatialtf): sample img (N, C, H, W) on the
    grid of theta (N, 2, 3) -> (N, C, ceil(H * scale_height), ceil(W * scale_width)).

    = dnn_grid_sampler(img, dnn_affine_grid(theta, (N, C, H_out, W_out))): bilinear, zeros
    outside the image, normalized coordinates in [-1, 1] with -1 and 1 the centres of the
    corner pixels (align_corners=True). scale_width/scale_height: static positive numbers
    (above 1 upsamples, below 1 downsamples). Differentiable in img and theta.
    The result has the promoted dtype of img and theta; bfloat16 is computed in float32.
    """
    op = "dnn_spatialtf"
    img, theta = _array(img), _array(theta)
    _check_img(op, img)
    _check_theta(op, theta)
    if theta.shape[0] != img.shape[0]:
        raise ValueError(f"{op}: theta holds {theta.shape[0]} matrices (shape "
                         f"{tuple(theta.shape)}) but img holds {img.shape[0]} images "
                         f"(shape {tuple(img.shape)})")
    sw = _scale(op, "scale_width", scale_width)
    sh = _scale(op, "scale_height", scale_height)
    n, c, height, width = img.shape
    out_dims = (n, c, math.ceil(height * sh), math.ceil(width * sw))
    dtype, work = _working_dtype(img, theta)
    impls = _implementations(op, img.shape, out_dims, (n, out_dims[2], out_dims[3], 2))
    grid = _affine_grid(theta.astype(work), out_dims, impls[1])
    return _grid_sampler(img.astype(work), grid, impls[0]).astype(dtype)
