"""Pooling: `dnn_pool` over 2 or 3 spatial axes (cudnnPoolingForward/Backward).

Every mode has JVP rules, so jvp, jacfwd, hessian and gradients of any order work. The
linear modes (average_inc_pad, average_exc_pad, sum) are linear primitives and stay on
cuDNN: the transpose of pooling is `pool_bwd_linear`, whose transpose is pooling again.
The max modes' tangent is `pool_max_tangent` (XLA), linear in the tangent, whose
transpose is `pool_bwd`, the cuDNN pooling backward (residuals x and y). 'sum' is cuDNN's
average_inc_pad scaled by the window size (alpha of the cuDNN call), as Theano did it.
"""
from __future__ import annotations


import warnings

import numpy as np

from jaxdnn import _validate, config
from jaxdnn._compat import ShapedArray, ad, zero_tangent_like
from jaxdnn._primitive import (choose_impl, define_linear_in_last, define_linear_pair,
                               define_primitive, fold_into_batch, fold_into_batch_resizing)
from jaxdnn._sharding import Partitioning, layout_factors
from jaxdnn.layout import normalize_data_format, spatial_axes
from jaxdnn.reference import pooling as reference

__all__ = ["dnn_pool", "pool_fwd_p", "pool_bwd_p", "pool_bwd_linear_p", "pool_max_tangent_p",
           "pooled_shape"]

MODES = ("max", "max_deterministic", "average_inc_pad", "average_exc_pad", "sum", "average")
MAX_MODES = reference.MAX_MODES


def pooled_shape(shape, *, ws, stride, pad, layout):
    out = list(shape)
    for axis, w, s, p in zip(spatial_axes(layout, len(shape)), ws, stride, pad):
        out[axis] = (shape[axis] + 2 * p - w) // s + 1
    return tuple(out)


def _fwd_abstract(x, *, mode, ws, stride, pad, layout):
    return ShapedArray(pooled_shape(x.shape, ws=ws, stride=stride, pad=pad, layout=layout), x.dtype)


def _bwd_abstract(x, y, dy, **params):
    return ShapedArray(x.shape, x.dtype)


def _bwd_linear_abstract(dy, *, input_shape, **params):
    return ShapedArray(tuple(input_shape), dy.dtype)


def _attributes(*, mode, ws, stride, pad, layout, input_shape=None):
    return dict(mode=mode, layout=layout, ws=np.asarray(ws, np.int64),
                stride=np.asarray(stride, np.int64), pad=np.asarray(pad, np.int64))


# Pooling windows stay within one image and one channel: N and C split freely; the
# spatial axes are gathered (cuDNN has no halo exchange).
_SHARDABLE = frozenset({"n", "c"})


def _fwd_partitioning(x, *, layout, **params):
    return Partitioning((layout_factors(layout),), (layout_factors(layout, spatial_suffix="o"),),
                        _SHARDABLE)


def _bwd_partitioning(x, y, dy, *, layout, **params):
    image, pooled = layout_factors(layout), layout_factors(layout, spatial_suffix="o")
    return Partitioning((image, pooled, pooled), (image,), _SHARDABLE)


def _bwd_linear_partitioning(dy, *, layout, **params):
    image = layout_factors(layout)
    return Partitioning((layout_factors(layout, spatial_suffix="o"),), (image,), _SHARDABLE,
                        shape_params={"input_shape": image})


pool_fwd_p = define_primitive(
    "jaxdnn_pool_fwd", abstract_eval=_fwd_abstract, reference=reference.pool_forward,
    attributes=_attributes, batch_rule=fold_into_batch,
    partitioning=_fwd_partitioning)

pool_bwd_p = define_primitive(
    "jaxdnn_pool_bwd", abstract_eval=_bwd_abstract, reference=reference.pool_backward,
    attributes=_attributes, batch_rule=fold_into_batch,
    partitioning=_bwd_partitioning)

pool_bwd_linear_p = define_primitive(
    "jaxdnn_pool_bwd_linear", abstract_eval=_bwd_linear_abstract,
    reference=reference.pool_backward_linear, attributes=_attributes,
    batch_rule=fold_into_batch_resizing("input_shape"), partitioning=_bwd_linear_partitioning)


def _tangent_abstract(x, y, t, **params):
    return ShapedArray(y.shape, t.dtype)


def _tangent_partitioning(x, y, t, *, layout, **params):
    image, pooled = layout_factors(layout), layout_factors(layout, spatial_suffix="o")
    return Partitioning((image, pooled, image), (pooled,), _SHARDABLE)


# The forward derivative of max pooling (on XLA whatever its impl: cuDNN has no such pass;
# impl is its transpose's, pool_bwd).
pool_max_tangent_p = define_primitive(
    "jaxdnn_pool_max_tangent", abstract_eval=_tangent_abstract,
    reference=reference.pool_max_tangent, ffi_target=None, batch_rule=fold_into_batch,
    partitioning=_tangent_partitioning)


# ---- differentiation: JVP rules on the primitives; reverse mode transposes them --------------
# Linear modes: pooling and pool_bwd_linear are each other's transposes. Max modes: the
# forward's tangent is pool_max_tangent(x, y, t), linear in t, and reverse mode transposes
# it into pool_bwd, the cuDNN backward, on the forward's implementation (_implementation
# gives both halves the same one). pool_bwd and pool_max_tangent are
# linear in their last operand and piecewise constant in x and y (the maxima move only
# where x has ties): their derivatives in x and y are zero.
define_linear_pair(
    pool_fwd_p, pool_bwd_linear_p,
    backward_params=lambda params, x: dict(params, input_shape=tuple(x.shape)),
    forward_params=lambda params: {k: v for k, v in params.items() if k != "input_shape"})
_linear_jvp = ad.primitive_jvps[pool_fwd_p]


def _fwd_jvp(primals, tangents, **params):
    if params["mode"] not in MAX_MODES:
        return _linear_jvp(primals, tangents, **params)
    (x,), (t,) = primals, tangents
    y = pool_fwd_p.bind(x, **params)
    if type(t) is ad.Zero:
        return y, zero_tangent_like(y)
    return y, pool_max_tangent_p.bind(x, y, t, **params)


ad.primitive_jvps[pool_fwd_p] = _fwd_jvp
define_linear_in_last(pool_bwd_p, pool_max_tangent_p.bind)
define_linear_in_last(pool_max_tangent_p, pool_bwd_p.bind)


def dnn_pool(img, ws, stride=None, mode: str = "max", pad=None, data_format: str | None = None):
    """Pool a batch of 2-D or 3-D images (which, by `len(ws)`).

    img: (N, C, H, W) or (N, C, D, H, W); channels-last with data_format='NHWC'/'NDHWC'.
    ws: the window; stride: defaults to 1 on every axis; pad: zeros by default, each
    smaller than the window. mode: 'max', 'max_deterministic', 'average_inc_pad',
    'average_exc_pad', 'sum', or the deprecated 'average' (= 'average_inc_pad').
    Output size per spatial axis: (in + 2*pad - ws) // stride + 1.
    Under `dnn.deterministic=True`, 'max' runs as 'max_deterministic'.
    """
    op = "dnn_pool"
    try:
        nd = len(ws)
    except TypeError:
        raise TypeError(f"{op}: ws must be a sequence of 2 or 3 ints; got {ws!r}") from None
    if nd not in (2, 3):
        raise ValueError(f"{op}: ws={ws!r} must have 2 (2-D pooling) or 3 (3-D pooling) entries")
    ws = _validate.int_tuple(op, "ws", ws, nd)
    stride = _validate.int_tuple(op, "stride", (1,) * nd if stride is None else stride, nd)
    pad = _validate.int_tuple(op, "pad", (0,) * nd if pad is None else pad, nd)
    _validate.check_choice(op, "mode", mode, MODES)
    _validate.check_rank(op, "img", img, (nd + 2,), f" for {nd}-D pooling (len(ws) == {nd})")
    _validate.check_floating(op, "img", img)
    layout = normalize_data_format(data_format or ("NCHW" if nd == 2 else "NCDHW"), nd + 2,
                                   op=op)
    if any(w <= 0 for w in ws):
        raise ValueError(f"{op}: ws={ws} must be positive")
    if any(s <= 0 for s in stride):
        raise ValueError(f"{op}: stride={stride} must be positive")
    if any(p < 0 or p >= w for p, w in zip(pad, ws)):
        raise ValueError(f"{op}: pad={pad} must be >= 0 and smaller than the window ws={ws}")
    spatial = [img.shape[a] for a in spatial_axes(layout, nd + 2)]
    if any(n + 2 * p < w for n, p, w in zip(spatial, pad, ws)):
        raise ValueError(
            f"{op}: img of spatial shape {tuple(spatial)} padded by {pad} is smaller than the "
            f"window ws={ws}")
    if mode == "average":
        warnings.warn("dnn_pool mode='average' is deprecated; use 'average_inc_pad'",
                      DeprecationWarning, stacklevel=2)
        mode = "average_inc_pad"
    if mode == "max" and config.read("dnn.deterministic"):
        mode = "max_deterministic"
    return pool_fwd_p.bind(img, mode=mode, ws=ws, stride=stride, pad=pad, layout=layout,
                           impl=_implementation(op, img.shape))


def _implementation(op, shape) -> str:
    """The implementation of either half of the op (forward, backward): under
    dnn.enabled='auto', whichever of cuDNN and XLA measured faster (BENCHMARKS.md,
    pooling), which is XLA for every mode, dtype and layout today:

    * forward: XLA's reduce_window streams near HBM bandwidth where cuDNN's legacy pooling
      forward reaches about half of it (the forward of max_deterministic is an ordinary
      max, deterministic either way);
    * max and max_deterministic backward: the XLA path's gathers
      (reference.max_pool_backward_gather: deterministic, no atomics) beat cuDNN's
      backward and XLA's own select-and-scatter in every dtype and layout measured
      (BENCHMARKS.md, "Max pooling: the gradient as gathers");
    * average/sum backward: XLA.
    dnn.enabled=True takes cuDNN for both halves, False XLA for both.
    """
    return choose_impl(op, xla_is_faster=True, shapes=[shape])
