"""The spatial transformer in pure JAX: cuDNN's affine grid generator and bilinear sampler.

Conventions (cuDNN's, and Theano's `dnn_spatialtf`):

* grid (N, H, W, 2): grid[..., 0] is the x (width) and grid[..., 1] the y (height)
  coordinate, normalized to [-1, 1] with -1 and 1 the centres of the corner pixels
  (align_corners=True): pixel x = (gx + 1) * (W - 1) / 2, pixel y = (gy + 1) * (H - 1) / 2.
* the affine grid is theta @ [x_t, y_t, 1] for x_t on linspace(-1, 1, W) and y_t on
  linspace(-1, 1, H) (a single column or row sits at -1, as numpy.linspace puts it).
* bilinear sampling with zeros outside the image: each of the four neighbours of a sample
  point that lies outside the image contributes 0.

The sampler gathers the four neighbours of every sample point at once (one vectorized
gather, no loop over pixels). float16 and bfloat16 are computed in float32 and rounded
once at the end. The image gradient is the transpose of that gather; it is computed either
with a scatter-add (fast; deterministic on the CPU, but XLA's GPU scatter-add uses atomics
and is not bitwise reproducible) or, with `deterministic=True`, without any scatter: the
contributions are sorted by destination pixel, summed with a segmented scan whose order
is fixed, and each pixel gathers the total of its run (see `_sorted_segment_sum`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxdnn.reference.dtypes import compute_dtype

__all__ = ["grid_forward", "grid_backward", "sampler_forward", "sampler_backward",
           "sampler_tangent", "compute_dtype", "target_coordinates"]



def target_coordinates(height: int, width: int, dtype):
    """(x_t on linspace(-1, 1, width), y_t on linspace(-1, 1, height)), in `dtype`."""
    return (jnp.linspace(-1.0, 1.0, width, dtype=dtype),
            jnp.linspace(-1.0, 1.0, height, dtype=dtype))


# ---- grid generator (linear in theta) -----------------------------------------------------

def grid_forward(theta, *, out_dims):
    """theta (N, 2, 3) -> grid (N, H, W, 2), out_dims = (N, C, H, W)."""
    _, _, height, width = out_dims
    ct = compute_dtype(theta.dtype)
    t = theta.astype(ct)
    xs, ys = target_coordinates(height, width, ct)
    x, y = xs[None, None, :], ys[None, :, None]

    def row(i):  # theta[:, i] @ [x, y, 1] at every target pixel: (N, H, W)
        return (t[:, i, 0, None, None] * x + t[:, i, 1, None, None] * y
                + t[:, i, 2, None, None])

    return jnp.stack([row(0), row(1)], axis=-1).astype(theta.dtype)


def grid_backward(dgrid, *, out_dims):
    """The transpose of grid_forward: dgrid (N, H, W, 2) -> dtheta (N, 2, 3)."""
    _, _, height, width = out_dims
    ct = compute_dtype(dgrid.dtype)
    d = dgrid.astype(ct)
    xs, ys = target_coordinates(height, width, ct)
    x, y = xs[None, None, :], ys[None, :, None]

    def row(i):  # d theta[:, i] = sum over target pixels of dgrid[..., i] * [x, y, 1]
        di = d[..., i]
        return jnp.stack([jnp.sum(di * x, axis=(1, 2)), jnp.sum(di * y, axis=(1, 2)),
                          jnp.sum(di, axis=(1, 2))], axis=-1)

    return jnp.stack([row(0), row(1)], axis=1).astype(dgrid.dtype)


# ---- sampler ------------------------------------------------------------------------------

class _Neighbours(NamedTuple):
    """The four neighbours of each of the P = H_out * W_out sample points of every image,
    stacked on an axis of 4 in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1)."""
    index: jax.Array   # (N, 4, P) int32 flat pixel index y * W + x (0 where outside)
    inside: jax.Array  # (N, 4, P) bool: the neighbour lies in the image
    wy: jax.Array      # (N, 4, P) bilinear weight along y (1 - fy or fy)
    wx: jax.Array      # (N, 4, P) bilinear weight along x (1 - fx or fx)
    sy: jax.Array      # (1, 4, 1) d wy / d y: -1 or +1
    sx: jax.Array      # (1, 4, 1) d wx / d x: -1 or +1


def _neighbours(grid, height: int, width: int, ct) -> _Neighbours:
    n = grid.shape[0]
    g = grid.astype(ct).reshape(n, -1, 2)
    x = (g[..., 0] + 1) * ((width - 1) / 2)
    y = (g[..., 1] + 1) * ((height - 1) / 2)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    dy = jnp.asarray([0, 0, 1, 1], ct)[None, :, None]
    dx = jnp.asarray([0, 1, 0, 1], ct)[None, :, None]
    yi = y0[:, None, :] + dy                                  # (N, 4, P)
    xi = x0[:, None, :] + dx
    # Comparisons in floating point (NaN and huge coordinates fall outside, and nothing
    # out of the int32 range is ever converted).
    inside = (yi >= 0) & (yi <= height - 1) & (xi >= 0) & (xi <= width - 1)
    flat = (jnp.clip(yi, 0, height - 1).astype(jnp.int32) * width
            + jnp.clip(xi, 0, width - 1).astype(jnp.int32))
    index = jnp.where(inside, flat, 0)
    wy = jnp.where(dy == 1, fy[:, None, :], 1 - fy[:, None, :])
    wx = jnp.where(dx == 1, fx[:, None, :], 1 - fx[:, None, :])
    return _Neighbours(index, inside, wy, wx, 2 * dy - 1, 2 * dx - 1)


def _gather(img_flat, index):
    """img_flat (N, C, HW), index (N, 4, P) -> (N, C, 4, P): img_flat[n, c, index[n, k, p]]."""
    n, c, _ = img_flat.shape
    flat = index.reshape(n, -1)
    out = jax.vmap(lambda im, ix: im.at[:, ix].get(mode="promise_in_bounds"))(img_flat, flat)
    return out.reshape((n, c) + index.shape[1:])


def sampler_forward(img, grid):
    """Bilinear sampling of img (N, C, H, W) at grid (N, H_out, W_out, 2) ->
    (N, C, H_out, W_out), zeros outside the image."""
    n, c, height, width = img.shape
    h_out, w_out = grid.shape[1:3]
    ct = compute_dtype(img.dtype)
    nb = _neighbours(grid, height, width, ct)
    values = _gather(img.reshape(n, c, height * width), nb.index).astype(ct)
    weights = (nb.wy * nb.wx)[:, None]                        # (N, 1, 4, P)
    out = jnp.sum(jnp.where(nb.inside[:, None], values * weights, 0), axis=2)
    return out.reshape(n, c, h_out, w_out).astype(img.dtype)


def sampler_backward(img, grid, dout, *, deterministic: bool = False):
    """[dimg, dgrid]: the gradients of sum(sampler_forward(img, grid) * dout).

    dgrid is the derivative of the bilinear weights (piecewise: it jumps where a sample
    point crosses a pixel row or column) through x = (gx + 1) * (W - 1) / 2.
    dimg scatters dout * weight onto the four neighbours; with `deterministic` the sum
    uses no scatter and its order is fixed (bitwise reproducible on every backend).
    """
    n, c, height, width = img.shape
    p = grid.shape[1] * grid.shape[2]
    ct = compute_dtype(img.dtype)
    nb = _neighbours(grid, height, width, ct)
    d = dout.astype(ct).reshape(n, c, 1, p)
    inside = nb.inside[:, None]                                # (N, 1, 4, P)

    # image gradient: dout * weight, onto each neighbour inside the image
    contributions = jnp.where(inside, d * (nb.wy * nb.wx)[:, None], 0).reshape(n, c, 4 * p)
    keys = jnp.where(nb.inside, nb.index, height * width).reshape(n, 4 * p)
    accumulate = _sorted_segment_sum if deterministic else _scatter_add
    dimg = accumulate(contributions, keys, height * width)

    # grid gradient: sum over channels of dout * neighbour, times d weight / d coordinate
    values = _gather(img.reshape(n, c, height * width), nb.index).astype(ct)
    s = jnp.sum(jnp.where(inside, values * d, 0), axis=1)      # (N, 4, P)
    d_x = jnp.sum(s * nb.wy * nb.sx, axis=1) * ((width - 1) / 2)
    d_y = jnp.sum(s * nb.sy * nb.wx, axis=1) * ((height - 1) / 2)
    dgrid = jnp.stack([d_x, d_y], axis=-1).reshape(grid.shape)
    return [dimg.reshape(img.shape).astype(img.dtype), dgrid.astype(grid.dtype)]


def sampler_tangent(img, grid, timg, tgrid, *, deterministic: bool = False):
    """The tangent of sampler_forward at (img, grid) in the direction (timg, tgrid), linear
    in (timg, tgrid); its transpose is sampler_backward (`deterministic` is its flag):

        d out = sampler_forward(timg, grid)
                + sum over the 4 neighbours of img[neighbour] * (d w / d x * dx + d w / d y * dy)

    with w = wy * wx the bilinear weight and dx = tgrid[..., 0] * (W - 1) / 2 (dy alike):
    the grid term is piecewise, as the grid gradient is (the neighbours are fixed between
    pixel rows and columns)."""
    del deterministic  # the transpose's
    n, c, height, width = img.shape
    p = grid.shape[1] * grid.shape[2]
    ct = compute_dtype(img.dtype)
    nb = _neighbours(grid, height, width, ct)
    inside = nb.inside[:, None]                                # (N, 1, 4, P)
    flat = (n, c, height * width)
    values = _gather(img.reshape(flat), nb.index).astype(ct)
    tvalues = _gather(timg.reshape(flat), nb.index).astype(ct)
    tg = tgrid.astype(ct).reshape(n, 1, p, 2)
    dx = tg[..., 0] * ((width - 1) / 2)                        # (N, 1, P)
    dy = tg[..., 1] * ((height - 1) / 2)
    dweights = nb.wy * nb.sx * dx + nb.sy * nb.wx * dy         # (N, 4, P)
    terms = tvalues * (nb.wy * nb.wx)[:, None] + values * dweights[:, None]
    out = jnp.sum(jnp.where(inside, terms, 0), axis=2)
    return out.reshape(n, c, grid.shape[1], grid.shape[2]).astype(img.dtype)


def _scatter_add(values, keys, size: int):
    """values (N, C, M) added into (N, C, size) at keys (N, M); keys == size are dropped.
    XLA's scatter-add: sequential (deterministic) on the CPU, atomic adds on the GPU."""
    def one(v, k):
        return jnp.zeros((v.shape[0], size), v.dtype).at[:, k].add(v, mode="drop")
    return jax.vmap(one)(values, keys)


def _shift_right(x, offset, fill):
    """x shifted right by `offset` (a traced int < x.shape[-1]) along its last axis, `fill`
    entering from the left."""
    m = x.shape[-1]
    padded = jnp.concatenate([jnp.full(x.shape[:-1] + (m,), fill, x.dtype), x], axis=-1)
    return lax.dynamic_slice_in_dim(padded, m - offset, m, axis=-1)


def _segmented_inclusive_sum(start, values):
    """Inclusive sums of `values` along the last axis, restarting wherever `start` is True
    (start broadcasts against values). Hillis-Steele doubling: after the step of offset d
    each element holds the sum of its segment over its last 2d elements; ceil(log2(M))
    steps in a fori_loop (one small loop body to compile, a fixed order of additions)."""
    m = values.shape[-1]
    steps = max(1, (m - 1).bit_length())   # 2 ** steps >= m

    def step(i, carry):
        start, total = carry
        offset = jnp.left_shift(jnp.int32(1), i)
        total = jnp.where(start, total, total + _shift_right(total, offset, 0))
        start = start | _shift_right(start, offset, True)
        return start, total

    return lax.fori_loop(0, steps, step, (start, values))[1]


def _sorted_segment_sum(values, keys, size: int):
    """What _scatter_add computes, with no scatter and a fixed order of summation, so the
    result is bitwise reproducible on every backend (XLA's GPU scatter-add is not):

    1. sort each image's keys (stable: ties keep their order) and permute the values alike;
    2. a segmented inclusive sum (`_segmented_inclusive_sum`: elementwise adds in a fixed
       pattern) over each run of equal keys; the last element of a run holds its total;
    3. every pixel finds the end of its run by binary search (`searchsorted`) and gathers
       that total (0 where no sample point touches it).
    Sort, elementwise arithmetic, binary search and gather are all deterministic in XLA."""
    n, c, m = values.shape
    if m == 0:
        return jnp.zeros((n, c, size), values.dtype)
    order = jnp.argsort(keys, axis=-1, stable=True)
    keys = jnp.take_along_axis(keys, order, axis=-1)                   # (N, M), sorted
    values = jnp.take_along_axis(values, order[:, None, :], axis=-1)   # (N, C, M)
    start = jnp.concatenate([jnp.ones((n, 1), bool), keys[:, 1:] != keys[:, :-1]], axis=1)
    sums = _segmented_inclusive_sum(start[:, None, :], values)
    pixels = jnp.arange(size, dtype=keys.dtype)
    end = jax.vmap(lambda k: jnp.searchsorted(k, pixels, side="right"))(keys) - 1
    end = jnp.maximum(end, 0)                                          # last key <= pixel
    hit = jnp.take_along_axis(keys, end, axis=-1) == pixels            # (N, size)
    totals = jnp.take_along_axis(sums, end[:, None, :], axis=-1)       # (N, C, size)
    return jnp.where(hit[:, None, :], totals, 0)
