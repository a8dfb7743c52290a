"""Softmax and log-softmax over the channel axis or over each whole image, in pure JAX."""
from __future__ import annotations

import math

import jax.numpy as jnp

from jaxdnn.layout import channel_axis, spatial_axes
from jaxdnn.reference.dtypes import compute_dtype


def reduction_axes(mode: str, layout: str, ndim: int = 4) -> tuple[int, ...]:
    """'channel' normalizes over C at each pixel; 'instance' over all of C, H, W."""
    if mode == "channel":
        return (channel_axis(layout, ndim),)
    return tuple(range(1, ndim))


def _over_rows(fn):
    """Run `fn` on (N, C*H*W) rows when it normalizes whole images: instance mode, or
    channel mode on 1x1 images (a 2-D (N, C) input). XLA reduces the minor axis of a 2-D
    array far faster than axis 1 of an (N, C, 1, 1) array, on CPU especially."""
    def wrapped(*arrays, algo, mode, layout):
        x = arrays[0]
        one_pixel = all(x.shape[a] == 1 for a in spatial_axes(layout, x.ndim))
        if mode == "instance" or one_pixel:
            # not reshape(N, -1): -1 cannot be inferred when N == 0
            rows = [a.reshape(a.shape[0], math.prod(a.shape[1:])) for a in arrays]
            return fn(*rows, algo=algo, mode="channel", layout="NC").reshape(x.shape)
        return fn(*arrays, algo=algo, mode=mode, layout=layout)
    return wrapped



@_over_rows
def softmax_forward(x, *, algo: str, mode: str, layout: str):
    """algo 'fast' and 'accurate' differ in cuDNN only in whether the maximum is subtracted
    first; the reference always subtracts it (the safe choice, equal where 'fast' is finite)."""
    axes = reduction_axes(mode, layout, x.ndim)
    xc = x.astype(compute_dtype(x.dtype))
    # initial: the maximum of no element (a channel axis of size 0) is -inf, not an error
    shifted = xc - jnp.max(xc, axis=axes, keepdims=True, initial=-jnp.inf)
    if algo == "log":
        y = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=axes, keepdims=True))
    else:
        e = jnp.exp(shifted)
        y = e / jnp.sum(e, axis=axes, keepdims=True)
    return y.astype(x.dtype)


@_over_rows
def softmax_backward(y, dy, *, algo: str, mode: str, layout: str):
    """Gradient with respect to x, given the output y and its cotangent dy."""
    axes = reduction_axes(mode, layout, y.ndim)
    ct = compute_dtype(y.dtype)
    yc, dyc = y.astype(ct), dy.astype(ct)
    if algo == "log":
        dx = dyc - jnp.exp(yc) * jnp.sum(dyc, axis=axes, keepdims=True)
    else:
        dx = yc * (dyc - jnp.sum(dyc * yc, axis=axes, keepdims=True))
    return dx.astype(y.dtype)


@_over_rows
def softmax_tangent(y, t, *, algo: str, mode: str, layout: str):
    """The forward derivative J t of the softmax whose output is y, in the direction t. For
    softmax J is symmetric (J t is softmax_backward(y, t)); for log-softmax J t =
    t - sum(exp(y) * t), whose transpose is softmax_backward's g - exp(y) * sum(g)."""
    axes = reduction_axes(mode, layout, y.ndim)
    ct = compute_dtype(y.dtype)
    yc, tc = y.astype(ct), t.astype(ct)
    if algo == "log":
        dy = tc - jnp.sum(jnp.exp(yc) * tc, axis=axes, keepdims=True)
    else:
        dy = yc * (tc - jnp.sum(tc * yc, axis=axes, keepdims=True))
    return dy.astype(y.dtype)
