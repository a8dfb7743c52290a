"""Convolution forward, backward-data and backward-filter in pure JAX
(lax.conv_general_dilated and its exact transposes).

Parameters shared by the three passes (the primitives' static parameters):
  padding   ((lo, hi), ...) per spatial axis      strides, dilation: per spatial axis
  flip      True for conv_mode='conv' (kernels flipped spatially), False for 'cross'
  groups    feature groups                        layout: 'NCW', 'NCHW', 'NCDHW', 'NWC', ...
  compute_dtype  the dtype the products and sums are computed in (the precision setting)
Kernels are (K, C/groups, spatial...) whatever the image layout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxdnn.layout import is_channels_last

def _dimension_numbers(layout: str) -> tuple[str, str, str]:
    spatial = layout.replace("N", "").replace("C", "")
    return (layout, "OI" + spatial, layout)


def conv_forward(img, kerns, *, padding, strides, dilation, flip, groups, layout,
                 compute_dtype, **plan):
    del plan
    nd = img.ndim - 2
    if flip:
        kerns = jnp.flip(kerns, axis=tuple(range(2, 2 + nd)))
    dtype = jnp.dtype(compute_dtype)
    out = lax.conv_general_dilated(
        img.astype(dtype), kerns.astype(dtype), window_strides=strides, padding=padding,
        rhs_dilation=dilation, dimension_numbers=_dimension_numbers(layout),
        feature_group_count=groups)
    return out.astype(img.dtype)


def conv_backward_data(kerns, topgrad, *, img_shape, **params):
    """The image gradient: the transpose of conv_forward in its image (a transposed
    convolution of topgrad)."""
    forward = lambda img: conv_forward(img, kerns, **params)
    (dimg,) = jax.linear_transpose(forward, jax.ShapeDtypeStruct(tuple(img_shape), topgrad.dtype))(topgrad)
    return dimg


def conv_backward_filter(img, topgrad, *, kerns_shape, **params):
    """The kernel gradient: the transpose of conv_forward in its kernels."""
    forward = lambda kerns: conv_forward(img, kerns, **params)
    (dkerns,) = jax.linear_transpose(forward, jax.ShapeDtypeStruct(tuple(kerns_shape), img.dtype))(topgrad)
    return dkerns


def output_shape(img_shape, kerns_shape, *, padding, strides, dilation, layout, **params):
    """The output shape of conv_forward, in `layout`."""
    nd = len(img_shape) - 2
    last = is_channels_last(layout)
    spatial_in = img_shape[1:1 + nd] if last else img_shape[2:]
    spatial = tuple((n + lo + hi - (k - 1) * d - 1) // s + 1
                    for n, (lo, hi), k, d, s in zip(spatial_in, padding, kerns_shape[2:], dilation, strides))
    channels = kerns_shape[0]
    return (img_shape[0], *spatial, channels) if last else (img_shape[0], channels, *spatial)
