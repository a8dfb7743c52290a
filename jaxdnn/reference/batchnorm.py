"""Batch normalization in pure JAX: training forward (batch statistics), inference forward
(given statistics) and the analytic backward of the training forward.

The arrays are those the primitives see: 4-D or 5-D images (lower ranks are padded with
unit spatial axes by jaxdnn.batchnorm), gamma-shaped parameters and statistics (the
image's rank, 1 on every normalized axis). Half-precision images are normalized in
float32, as cuDNN does; gamma, beta and the statistics arrive in the parameter dtype
(float32 for half images, the image's dtype otherwise) and the statistics leave in it.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from jaxdnn.layout import channel_axis
from jaxdnn.reference.dtypes import compute_dtype

MODES = ("per-activation", "spatial")


def reduction_axes(mode: str, layout: str, ndim: int) -> tuple[int, ...]:
    """'per-activation' normalizes each activation over the batch axis N only; 'spatial'
    normalizes each channel over N and every spatial axis."""
    if mode == "per-activation":
        return (0,)
    if mode == "spatial":
        c = channel_axis(layout, ndim)
        return tuple(a for a in range(ndim) if a != c)
    raise ValueError(f"unknown batch normalization mode {mode!r}")


def count(shape, mode: str, layout: str) -> int:
    """m: the number of elements each statistic is taken over."""
    return math.prod(shape[a] for a in reduction_axes(mode, layout, len(shape)))



def batch_statistics(x, *, mode: str, layout: str, axis_name=None):
    """(mean, biased variance) over the normalized axes, in the compute dtype. With
    `axis_name` (mapped axes, each device holding an equal part of the batch) they are
    those of the devices' concatenated batches: the mean is averaged across devices
    first, then each device's mean square deviation from it (two passes, no
    cancellation)."""
    axes = reduction_axes(mode, layout, x.ndim)
    xc = x.astype(compute_dtype(x.dtype))
    mean = jnp.mean(xc, axis=axes, keepdims=True)
    if axis_name is not None:
        mean = lax.pmean(mean, axis_name)
    var = jnp.mean(jnp.square(xc - mean), axis=axes, keepdims=True)
    if axis_name is not None:
        var = lax.pmean(var, axis_name)
    return mean, var


def bn_forward_train(x, gamma, beta, *, mode: str, layout: str, epsilon: float):
    """[out, mean, invstd]: mean and biased variance over the normalized axes,
    invstd = 1 / sqrt(var + epsilon), out = (x - mean) * gamma * invstd + beta."""
    ct = compute_dtype(x.dtype)
    mean, var = batch_statistics(x, mode=mode, layout=layout)
    invstd = lax.rsqrt(var + jnp.asarray(epsilon, ct))
    out = (x.astype(ct) - mean) * (gamma.astype(ct) * invstd) + beta.astype(ct)
    return [out.astype(x.dtype), mean.astype(gamma.dtype), invstd.astype(gamma.dtype)]


def bn_forward_infer(x, gamma, beta, mean, var, *, mode: str, layout: str, epsilon: float):
    """(x - mean) * gamma / sqrt(var + epsilon) + beta, with the given statistics."""
    del mode, layout  # the parameters' shapes carry the mode
    ct = compute_dtype(x.dtype)
    scale = gamma.astype(ct) * lax.rsqrt(var.astype(ct) + jnp.asarray(epsilon, ct))
    out = (x.astype(ct) - mean.astype(ct)) * scale + beta.astype(ct)
    return out.astype(x.dtype)



def _normalized(x, mean, invstd, mode: str, layout: str):
    """What the backward and the tangent share: the reduction axes, the count m over them,
    the compute dtype, invstd in it, and xhat = (x - mean) * invstd."""
    axes = reduction_axes(mode, layout, x.ndim)
    ct = compute_dtype(x.dtype)
    invstd_c = invstd.astype(ct)
    return (axes, count(x.shape, mode, layout), ct, invstd_c,
            (x.astype(ct) - mean.astype(ct)) * invstd_c)

def bn_backward(x, dy, gamma, mean, invstd, *, mode: str, layout: str, epsilon: float,
                axis_name=None):
    """[dx, dgamma, dbeta]: the VJP of bn_forward_train's `out` with respect to x, gamma
    and beta, given the cotangent dy and the statistics the forward saved (mean and invstd
    are those of x: their own dependence on x is part of dx, as in cuDNN's backward).

        xhat = (x - mean) * invstd
        dbeta = sum(dy), dgamma = sum(dy * xhat)
        dx = gamma * invstd * (dy - dbeta / m - xhat * dgamma / m)

    With `axis_name` (statistics over the devices' concatenated batches), the two sums
    and m run over every device.
    """
    del epsilon  # the saved invstd already holds it
    axes, m, ct, invstd_c, xhat = _normalized(x, mean, invstd, mode, layout)
    dyc = dy.astype(ct)
    dbeta = jnp.sum(dyc, axis=axes, keepdims=True)
    dgamma = jnp.sum(dyc * xhat, axis=axes, keepdims=True)
    if axis_name is not None:
        dbeta, dgamma = lax.psum((dbeta, dgamma), axis_name)
        m = m * lax.psum(1, axis_name)
    dx = (gamma.astype(ct) * invstd_c) * (dyc - (dbeta + xhat * dgamma) / jnp.maximum(m, 1))
    return [dx.astype(x.dtype), dgamma.astype(gamma.dtype), dbeta.astype(gamma.dtype)]


def bn_train_tangent(x, gamma, mean, invstd, tx, tgamma, tbeta, *, mode: str, layout: str,
                     epsilon: float, axis_name=None):
    """The tangent of bn_forward_train's `out` at (x, gamma) in the direction (tx, tgamma,
    tbeta), given the statistics of x (mean and invstd move with x: their tangents are
    part of it):

        xhat = (x - mean) * invstd
        d out = gamma * invstd * (tx - mean(tx) - xhat * mean(tx * xhat)) + tgamma * xhat + tbeta

    Linear in (tx, tgamma, tbeta); its transpose is bn_backward (d out / dx is symmetric:
    its tx part is bn_backward's dx for dy = tx). With `axis_name` the two means run over
    every device's batch."""
    del epsilon  # invstd already holds it
    axes, m, ct, invstd_c, xhat = _normalized(x, mean, invstd, mode, layout)
    txc = tx.astype(ct)
    sums = (jnp.sum(txc, axis=axes, keepdims=True),
            jnp.sum(txc * xhat, axis=axes, keepdims=True))
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
        m = m * lax.psum(1, axis_name)
    m = jnp.maximum(m, 1)
    dout = ((gamma.astype(ct) * invstd_c) * (txc - (sums[0] + xhat * sums[1]) / m)
            + tgamma.astype(ct) * xhat + tbeta.astype(ct))
    return dout.astype(x.dtype)
