"""Max, average and sum pooling over 2 or 3 spatial axes, in pure JAX (lax.reduce_window)."""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxdnn._compat import zeros_varying_like
from jaxdnn.layout import spatial_axes
from jaxdnn.reference.dtypes import compute_dtype

MAX_MODES = ("max", "max_deterministic")


def _window(values, layout: str, ndim: int, fill: int):
    """Spread per-spatial-axis `values` over all `ndim` axes, `fill` on N and C."""
    full = [fill] * ndim
    for axis, v in zip(spatial_axes(layout, ndim), values):
        full[axis] = v
    return tuple(full)


def pool_forward(x, *, mode: str, ws, stride, pad, layout: str):
    """Output size per spatial axis: (in + 2*pad - ws) // stride + 1. Padding never wins a
    max; 'average_inc_pad' divides by the window size, 'average_exc_pad' by the number of
    elements of the window inside the image, 'sum' does not divide."""
    nd = x.ndim
    window = _window(ws, layout, nd, 1)
    strides = _window(stride, layout, nd, 1)
    padding = tuple(zip(_window(pad, layout, nd, 0), _window(pad, layout, nd, 0)))
    if mode in MAX_MODES:
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding).astype(x.dtype)
    acc = compute_dtype(x.dtype)
    sums = lax.reduce_window(x.astype(acc), 0.0, lax.add, window, strides, padding)
    if mode == "sum":
        out = sums
    elif mode == "average_inc_pad":
        out = sums / math.prod(ws)
    else:  # average_exc_pad: count the in-image elements of each window
        ones = jnp.ones(tuple(x.shape[a] for a in spatial_axes(layout, nd)), acc)
        shape = _window(ones.shape, layout, nd, 1)
        counts = lax.reduce_window(ones.reshape(shape), 0.0, lax.add, window, strides, padding)
        out = sums / counts
    return out.astype(x.dtype)


def pool_backward(x, y, dy, *, mode: str, ws, stride, pad, layout: str):
    """Gradient with respect to x of pool_forward, given its output y and cotangent dy.
    The max modes gather (max_pool_backward_gather); the others transpose the forward."""
    if mode in MAX_MODES:
        return max_pool_backward_gather(x, y, dy, ws=ws, stride=stride, pad=pad, layout=layout)
    _, vjp = jax.vjp(lambda t: pool_forward(t, mode=mode, ws=ws, stride=stride, pad=pad,
                                            layout=layout), x)
    return vjp(dy)[0]


def max_pool_backward_gather(x, y, dy, *, ws, stride, pad, layout: str):
    """The max-pool gradient as gathers: each window's cotangent goes to the first element
    (in row-major window order, XLA's rule for ties) that equals the window's maximum y.

    XLA differentiates reduce_window(max) into select-and-scatter, which on a GPU scatters
    with atomic adds (not bitwise reproducible) and rereads every window. Here the first
    maximum's offset in each window is found from x and y (one pass over the windows),
    and dx is the sum over window offsets of dy placed by a strided pad (negative padding
    crops the image's own padding): only elementwise ops, slices and pads, which XLA fuses
    into gathers with a fixed order of additions, so the result is deterministic."""
    nd = x.ndim
    acc = compute_dtype(dy.dtype)
    # per axis (N and C too: window 1, stride 1, no padding)
    strides, padding = _window(stride, layout, nd, 1), _window(pad, layout, nd, 0)
    padded = lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(p, p, 0) for p in padding])
    offsets = [_window(offset, layout, nd, 0)
               for offset in itertools.product(*(range(w) for w in ws))]

    def window_element(start):  # x at offset `start` within every window, shaped like y
        limit = [d + (o - 1) * s + 1 for d, o, s in zip(start, y.shape, strides)]
        return lax.slice(padded, start, limit, strides)

    first = jnp.full(y.shape, len(offsets), jnp.int32)  # the first maximum's offset number
    for k in reversed(range(len(offsets))):
        first = jnp.where(window_element(offsets[k]) == y, k, first)
    dy = dy.astype(acc)
    zero = jnp.array(0, acc)
    dx = None
    for k, offset in enumerate(offsets):
        # window o's element d sits at image index o * s + d - p: pad (negative: crop) there
        lows = [d - p for d, p in zip(offset, padding)]
        config = [(low, n - low - (o - 1) * s - 1, s - 1)
                  for low, n, o, s in zip(lows, x.shape, y.shape, strides)]
        term = lax.pad(jnp.where(first == k, dy, zero), zero, config)
        dx = term if dx is None else dx + term
    return dx.astype(x.dtype)


def pool_backward_linear(dy, *, mode: str, ws, stride, pad, layout: str, input_shape):
    """Transpose of the linear modes (average_*, sum): needs no x or y, only its shape."""
    forward = lambda t: pool_forward(t, mode=mode, ws=ws, stride=stride, pad=pad, layout=layout)
    (dx,) = jax.linear_transpose(forward, zeros_varying_like(input_shape, dy.dtype, dy))(dy)
    return dx


def pool_max_tangent(x, y, t, *, mode: str, ws, stride, pad, layout: str):
    """The forward derivative of max pooling at x in the direction t: each window's
    tangent at its maximum (XLA's select-and-gather). Its transpose is pool_backward."""
    del y
    forward = lambda a: pool_forward(a, mode=mode, ws=ws, stride=stride, pad=pad, layout=layout)
    return jax.jvp(forward, (x,), (t,))[1]
