"""Convolution forward, backward-data and backward-filter in pure JAX
(lax.conv_general_dilated and its exact transposes).

Parameters shared by the three passes (the primitives' static parameters):
  padding   ((lo, hi), ...) per spatial axis      strides, dilation: per spatial axis
  flip      True for conv_mode='conv' (kernels flipped spatially), False for 'cross'
  groups    feature groups                        layout: 'NCW', 'NCHW', 'NCDHW', 'NWC', ...
  compute_dtype  the dtype the products and sums are computed in (the precision setting)
Kernels follow the image layout: (K, C/groups, spatial...) beside channels-first images,
(K, spatial..., C/groups) beside channels-last ones (what cuDNN's fastest NHWC engines
read; the public functions in jaxdnn/conv.py take and return the former and reorder).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxdnn._compat import zeros_varying_like
from jaxdnn.layout import is_channels_last, spatial_axes

def _dimension_numbers(layout: str) -> tuple[str, str, str]:
    spatial = layout.replace("N", "").replace("C", "")
    return (layout, "OI" + spatial, layout)


def _kernels_first(kerns, layout: str):
    """(K, C/g, spatial...) kernels from the primitives' layout. XLA then sees the kernels
    as a JAX user passes them (the public functions' reordering cancels out); given
    (K, spatial..., C) kernels XLA's channels-last backward ran several times slower
    (BENCHMARKS-history.md)."""
    return jnp.moveaxis(kerns, -1, 1) if is_channels_last(layout) else kerns


def kernel_spatial(kerns_shape, layout: str) -> tuple[int, ...]:
    """The spatial extents of kernels laid out for `layout`."""
    return tuple(kerns_shape[1:-1] if is_channels_last(layout) else kerns_shape[2:])


def kernel_shape_for(kerns_shape, layout: str) -> tuple[int, ...]:
    """(K, C/groups, spatial...) -> the kernel shape the primitives take for `layout`."""
    kerns_shape = tuple(kerns_shape)
    if is_channels_last(layout):
        return (kerns_shape[0], *kerns_shape[2:], kerns_shape[1])
    return kerns_shape


def conv_forward(img, kerns, *, padding, strides, dilation, flip, groups, layout,
                 compute_dtype, **plan):
    del plan
    nd = img.ndim - 2
    kerns = _kernels_first(kerns, layout)
    if flip:
        kerns = jnp.flip(kerns, axis=tuple(range(2, 2 + nd)))
    dtype = jnp.dtype(compute_dtype)
    out = lax.conv_general_dilated(
        img.astype(dtype), kerns.astype(dtype), window_strides=strides, padding=padding,
        rhs_dilation=dilation, dimension_numbers=_dimension_numbers(layout),
        feature_group_count=groups)
    return out.astype(img.dtype)


def conv_backward_data(kerns, topgrad, *, img_shape, padding, strides, dilation, flip, groups,
                       layout, compute_dtype, **plan):
    """The image gradient: the transpose of conv_forward in its image (a transposed
    convolution of topgrad), written out as a stride-1 convolution of the zero-stuffed,
    re-padded topgrad with the spatially flipped, in/out-swapped kernels. (Not
    jax.linear_transpose of the forward: for some strided shapes XLA:CPU's transposed
    convolution aborts the process, in jaxlib 0.10.2.)"""
    del plan
    nd = topgrad.ndim - 2
    dtype = jnp.dtype(compute_dtype)
    w = _kernels_first(kerns, layout).astype(dtype)
    if not flip:  # the forward correlates with w; its transpose correlates with flipped w
        w = jnp.flip(w, axis=tuple(range(2, 2 + nd)))
    k, cg = w.shape[0], w.shape[1]
    # (K, C/g, ...) -> (C, K/g, ...): within each group, swap the in and out channels.
    w = w.reshape((groups, k // groups, cg) + w.shape[2:]).swapaxes(1, 2)
    w = w.reshape((groups * cg, k // groups) + w.shape[3:])
    axes = spatial_axes(layout, topgrad.ndim)
    stuffed = topgrad.astype(dtype)
    config = [(0, 0, 0)] * topgrad.ndim
    for axis, (lo, hi), kernel, d, s in zip(axes, padding, w.shape[2:], dilation, strides):
        extent = (kernel - 1) * d + 1
        leftover = img_shape[axis] + lo + hi - extent - (topgrad.shape[axis] - 1) * s
        stuffed = _interleave_zeros(stuffed, axis, s)
        config[axis] = (extent - 1 - lo, extent - 1 - hi + leftover, 0)
    stuffed = lax.pad(stuffed, jnp.zeros((), dtype), config)
    out = lax.conv_general_dilated(
        stuffed, w, window_strides=(1,) * nd, padding=[(0, 0)] * nd, rhs_dilation=dilation,
        dimension_numbers=_dimension_numbers(layout), feature_group_count=groups)
    return out.astype(topgrad.dtype)


def _interleave_zeros(a, axis: int, s: int):
    """s - 1 zeros between neighbours along `axis` (what an interior pad does), written as
    a reshape: XLA's algebraic simplifier folds an interior pad into the convolution as a
    base dilation and, for some strided shapes, then rewrites it into a convolution its
    own check rejects, aborting the process (jaxlib 0.10-0.11, CPU and GPU; regression
    cases in tests/test_conv.py)."""
    if s == 1 or a.shape[axis] == 0:
        return a
    n = a.shape[axis]
    a = jnp.expand_dims(a, axis + 1)
    zeros = jnp.zeros(a.shape[:axis + 1] + (s - 1,) + a.shape[axis + 2:], a.dtype)
    a = jnp.concatenate([a, zeros], axis=axis + 1)
    a = a.reshape(a.shape[:axis] + (n * s,) + a.shape[axis + 2:])
    return lax.slice_in_dim(a, 0, (n - 1) * s + 1, axis=axis)


def conv_backward_filter(img, topgrad, *, kerns_shape, **params):
    """The kernel gradient: the transpose of conv_forward in its kernels."""
    forward = lambda kerns: conv_forward(img, kerns, **params)
    primal = zeros_varying_like(kerns_shape, img.dtype, topgrad)
    (dkerns,) = jax.linear_transpose(forward, primal)(topgrad)
    return dkerns


def output_shape(img_shape, kerns_shape, *, padding, strides, dilation, layout, **params):
    """The output shape of conv_forward, in `layout`."""
    nd = len(img_shape) - 2
    last = is_channels_last(layout)
    spatial_in = img_shape[1:1 + nd] if last else img_shape[2:]
    spatial = tuple((n + lo + hi - (k - 1) * d - 1) // s + 1
                    for n, (lo, hi), k, d, s in zip(spatial_in, padding,
                                                    kernel_spatial(kerns_shape, layout), dilation,
                                                    strides))
    channels = kerns_shape[0]
    return (img_shape[0], *spatial, channels) if last else (img_shape[0], channels, *spatial)
