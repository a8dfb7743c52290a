"""Independent NumPy float64 references for the jaxdnn tests.

Everything here is written from the definitions (cuDNN's / Theano's documentation), with
explicit Python loops over pixels and pooling windows, in float64. Nothing here imports
jax or jaxdnn: these are the oracles the library is checked against.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = [
    "softmax", "softmax_grad",
    "pool", "pool_grad", "pool_output_shape",
    "distinct_values", "CHANNELS_LAST",
]

CHANNELS_LAST = ("NHWC", "NDHWC", "b01c", "b012c", "channels_last")


def _is_channels_last(data_format) -> bool:
    return data_format in CHANNELS_LAST


def _to_channels_first(x, data_format):
    return np.moveaxis(x, -1, 1) if _is_channels_last(data_format) else x


def _from_channels_first(x, data_format):
    return np.moveaxis(x, 1, -1) if _is_channels_last(data_format) else x


# --------------------------------------------------------------------------------------
# Softmax
# --------------------------------------------------------------------------------------
def _softmax_groups(shape_cf, mode):
    """For an (N, C, H, W) array: the list of index groups a softmax normalizes over.

    'channel': one group per (n, h, w), over c. 'instance': one group per n, over c, h, w.
    Each group is a list of full index tuples, in row-major order."""
    n_, c_, h_, w_ = shape_cf
    groups = []
    if mode == "channel":
        for n in range(n_):
            for h in range(h_):
                for w in range(w_):
                    groups.append([(n, c, h, w) for c in range(c_)])
    elif mode == "instance":
        for n in range(n_):
            groups.append([(n, c, h, w) for c in range(c_) for h in range(h_) for w in range(w_)])
    else:
        raise ValueError(mode)
    return groups


def _softmax_cf(x, log, mode):
    """Softmax (or log-softmax) of a float64 (N, C, H, W) array, one group at a time."""
    y = np.zeros_like(x)
    for group in _softmax_groups(x.shape, mode):
        vals = [float(x[i]) for i in group]
        m = max(vals)
        total = math.fsum(math.exp(v - m) for v in vals)
        for i, v in zip(group, vals):
            if log:
                y[i] = (v - m) - math.log(total)
            else:
                y[i] = math.exp(v - m) / total
    return y


def _as_4d(x, data_format):
    """(array in NCHW, a function mapping an NCHW result back to x's layout and rank)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        return x[:, :, None, None], (lambda y: y[:, :, 0, 0])
    if x.ndim != 4:
        raise ValueError(f"softmax reference: x must be 2-D or 4-D, got {x.shape}")
    return _to_channels_first(x, data_format), (lambda y: _from_channels_first(y, data_format))


def softmax(x, algo="accurate", mode="channel", data_format="NCHW"):
    """cuDNN softmax in float64: algo 'fast'/'accurate' -> softmax, 'log' -> log-softmax.

    mode 'channel' normalizes over C at every (n, h, w); 'instance' over all of C, H, W of
    every image. A 2-D (N, C) input is taken as (N, C, 1, 1) and returned as (N, C)."""
    xc, back = _as_4d(x, data_format)
    return back(_softmax_cf(xc, algo == "log", mode))


def softmax_grad(x, dy, algo="accurate", mode="channel", data_format="NCHW"):
    """The vector-Jacobian product dx = J(x)^T dy of `softmax`, written out per group:

    softmax:     dx_i = y_i * (dy_i - sum_j dy_j y_j)
    log-softmax: dx_i = dy_i - softmax_i * sum_j dy_j
    """
    xc, back = _as_4d(x, data_format)
    dyc, _ = _as_4d(dy, data_format)
    s = _softmax_cf(xc, False, mode)
    dx = np.zeros_like(xc)
    for group in _softmax_groups(xc.shape, mode):
        if algo == "log":
            total = math.fsum(float(dyc[i]) for i in group)
            for i in group:
                dx[i] = dyc[i] - s[i] * total
        else:
            dot = math.fsum(float(dyc[i]) * float(s[i]) for i in group)
            for i in group:
                dx[i] = s[i] * (dyc[i] - dot)
    return back(dx)


# --------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------
def _pool_args(ws, stride, pad):
    nd = len(ws)
    stride = (1,) * nd if stride is None else tuple(stride)
    pad = (0,) * nd if pad is None else tuple(pad)
    return tuple(ws), stride, pad


def pool_output_shape(spatial, ws, stride=None, pad=None):
    """Per spatial axis: (in + 2*pad - ws) // stride + 1 (ignore_border=True)."""
    ws, stride, pad = _pool_args(ws, stride, pad)
    return tuple((i + 2 * p - w) // s + 1 for i, w, s, p in zip(spatial, ws, stride, pad))


def _windows(spatial, ws, stride, pad):
    """Yield (output index, [in-image input indices of its window, row-major order])."""
    out_shape = pool_output_shape(spatial, ws, stride, pad)
    for o in itertools.product(*(range(n) for n in out_shape)):
        members = []
        for k in itertools.product(*(range(w) for w in ws)):
            idx = tuple(oi * s - p + ki for oi, s, p, ki in zip(o, stride, pad, k))
            if all(0 <= i < n for i, n in zip(idx, spatial)):
                members.append(idx)
        yield o, members


def _canonical_mode(mode):
    if mode == "average":
        return "average_inc_pad"
    if mode == "max_deterministic":
        return "max"
    if mode not in ("max", "average_inc_pad", "average_exc_pad", "sum"):
        raise ValueError(mode)
    return mode


def pool(x, ws, stride=None, pad=None, mode="max", data_format="NCHW"):
    """Pooling with ignore_border=True over len(ws) spatial axes, in float64.

    max: the largest in-image element (padding never wins); sum: the sum of the in-image
    elements; average_inc_pad: the sum divided by the full window size (padding counts
    as zeros); average_exc_pad: the sum divided by the number of in-image elements."""
    ws, stride, pad = _pool_args(ws, stride, pad)
    mode = _canonical_mode(mode)
    xc = _to_channels_first(np.asarray(x, dtype=np.float64), data_format)
    n_, c_ = xc.shape[:2]
    spatial = xc.shape[2:]
    assert len(spatial) == len(ws)
    y = np.zeros((n_, c_) + pool_output_shape(spatial, ws, stride, pad))
    window_size = math.prod(ws)
    for n in range(n_):
        for c in range(c_):
            img = xc[n, c]
            for o, members in _windows(spatial, ws, stride, pad):
                vals = [float(img[i]) for i in members]
                if mode == "max":
                    y[(n, c) + o] = max(vals)
                elif mode == "sum":
                    y[(n, c) + o] = math.fsum(vals)
                elif mode == "average_inc_pad":
                    y[(n, c) + o] = math.fsum(vals) / window_size
                else:
                    y[(n, c) + o] = math.fsum(vals) / len(vals)
    return _from_channels_first(y, data_format)


def pool_grad(x, dy, ws, stride=None, pad=None, mode="max", data_format="NCHW"):
    """dx = J(x)^T dy of `pool`. For max, each window's cotangent goes to its maximum
    (the first maximum in row-major window order on ties); overlapping windows add up."""
    ws, stride, pad = _pool_args(ws, stride, pad)
    mode = _canonical_mode(mode)
    xc = _to_channels_first(np.asarray(x, dtype=np.float64), data_format)
    dyc = _to_channels_first(np.asarray(dy, dtype=np.float64), data_format)
    n_, c_ = xc.shape[:2]
    spatial = xc.shape[2:]
    assert dyc.shape == (n_, c_) + pool_output_shape(spatial, ws, stride, pad), dyc.shape
    dx = np.zeros_like(xc)
    window_size = math.prod(ws)
    for n in range(n_):
        for c in range(c_):
            img = xc[n, c]
            for o, members in _windows(spatial, ws, stride, pad):
                g = float(dyc[(n, c) + o])
                if mode == "max":
                    best = members[0]
                    for i in members[1:]:
                        if img[i] > img[best]:  # strict: the first maximum wins ties
                            best = i
                    dx[(n, c) + best] += g
                else:
                    if mode == "sum":
                        weight = 1.0
                    elif mode == "average_inc_pad":
                        weight = 1.0 / window_size
                    else:
                        weight = 1.0 / len(members)
                    for i in members:
                        dx[(n, c) + i] += g * weight
    return _from_channels_first(dx, data_format)


def distinct_values(rng, shape, data_format="NCHW", scale=0.25):
    """Random data whose values are distinct within every (n, c) image and exactly
    representable in float16 and bfloat16 (small multiples of a power of two, at most
    256 of them per image), so that max pooling has no ties in any dtype and a finite
    difference step cannot change a window's argmax."""
    shape = tuple(shape)
    cf_shape = (shape[0], shape[-1]) + shape[1:-1] if _is_channels_last(data_format) else shape
    n_, c_ = cf_shape[:2]
    spatial = cf_shape[2:]
    size = math.prod(spatial)
    if size > 256:
        raise ValueError("distinct_values: at most 256 pixels per image stay exact in bfloat16")
    x = np.empty(cf_shape, dtype=np.float64)
    for n in range(n_):
        for c in range(c_):
            x[n, c] = (rng.permutation(size) - size // 2).reshape(spatial) * scale
    return _from_channels_first(x, data_format)
