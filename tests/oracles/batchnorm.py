"""Independent NumPy float64 references for batch normalization (no jax, no jaxdnn).

Written from the definitions in Theano's documentation of `dnn_batch_normalization_train`
/ `_test` (Theano's `theano.gpuarray.dnn`): each statistic is taken over a group of elements (per-activation:
the batch axis N at one activation; spatial: N and every spatial axis of one channel),
visited one element at a time with explicit Python loops and summed with math.fsum.
The gradient is derived step by step with the chain rule (through xhat, var and mean),
not from the closed form the library uses.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = ["CHANNELS_LAST", "normalized_axes", "param_shape", "count", "bn_train", "bn_test",
           "running_averages", "bn_train_grad", "bn_test_grad"]

CHANNELS_LAST = ("NWC", "NHWC", "NDHWC", "b01c", "b012c", "channels_last")


def normalized_axes(ndim: int, mode: str, data_format: str = "NCHW") -> tuple[int, ...]:
    if mode in ("per-activation", "peractivation"):
        return (0,)
    if mode != "spatial":
        raise ValueError(mode)
    channel = ndim - 1 if data_format in CHANNELS_LAST else 1
    return tuple(a for a in range(ndim) if a != channel)


def param_shape(shape, mode: str, data_format: str = "NCHW") -> tuple[int, ...]:
    """gamma's shape: the inputs' shape with 1 on the normalized axes."""
    axes = normalized_axes(len(shape), mode, data_format)
    return tuple(1 if a in axes else s for a, s in enumerate(shape))


def count(shape, mode: str, data_format: str = "NCHW") -> int:
    """m: elements per statistic."""
    return math.prod(shape[a] for a in normalized_axes(len(shape), mode, data_format))


def _groups(shape, mode, data_format):
    """[(index into the parameters, [full indices of the group's elements])]."""
    axes = normalized_axes(len(shape), mode, data_format)
    pshape = param_shape(shape, mode, data_format)
    groups = []
    for p in itertools.product(*(range(s) for s in pshape)):
        members = []
        for free in itertools.product(*(range(shape[a]) for a in axes)):
            idx = list(p)
            for a, i in zip(axes, free):
                idx[a] = i
            members.append(tuple(idx))
        groups.append((p, members))
    return groups


def bn_train(x, gamma, beta, mode: str, epsilon: float, data_format: str = "NCHW"):
    """(out, mean, invstd, var) with var the biased batch variance; mean, invstd and var
    have gamma's shape."""
    x = np.asarray(x, np.float64)
    gamma, beta = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    pshape = param_shape(x.shape, mode, data_format)
    out = np.zeros(x.shape)
    mean, var, invstd = np.zeros(pshape), np.zeros(pshape), np.zeros(pshape)
    for p, members in _groups(x.shape, mode, data_format):
        vals = [float(x[i]) for i in members]
        m = len(vals)
        mu = math.fsum(vals) / m
        v = math.fsum((t - mu) ** 2 for t in vals) / m
        s = 1.0 / math.sqrt(v + epsilon)
        mean[p], var[p], invstd[p] = mu, v, s
        for i, t in zip(members, vals):
            out[i] = (t - mu) * s * gamma[p] + beta[p]
    return out, mean, invstd, var


def bn_test(x, gamma, beta, mean, var, mode: str, epsilon: float, data_format: str = "NCHW"):
    x = np.asarray(x, np.float64)
    gamma, beta, mean, var = (np.asarray(a, np.float64) for a in (gamma, beta, mean, var))
    out = np.zeros(x.shape)
    for p, members in _groups(x.shape, mode, data_format):
        for i in members:
            out[i] = (x[i] - mean[p]) / math.sqrt(var[p] + epsilon) * gamma[p] + beta[p]
    return out


def running_averages(running_mean, running_var, mean, var, m: int, factor: float):
    """Theano's update: the running variance takes the unbiased batch variance."""
    new_mean = np.asarray(running_mean, np.float64) * (1 - factor) + mean * factor
    new_var = np.asarray(running_var, np.float64) * (1 - factor) + (m / (m - 1)) * var * factor
    return new_mean, new_var


def bn_train_grad(x, gamma, dout, mode: str, epsilon: float, data_format: str = "NCHW",
                  dmean=None, dinvstd=None):
    """(dx, dgamma, dbeta): the VJP of bn_train's (out, mean, invstd) with cotangents
    (dout, dmean, dinvstd) (None: zero), by the chain rule, one group at a time:

        xhat_i = (x_i - mu) * s,  s = (v + eps)^(-1/2),  v = sum((x_i - mu)^2) / m
        dxhat_i = dout_i * gamma
        ds = sum(dxhat_i * (x_i - mu)) + dinvstd
        dv = ds * (-1/2) * (v + eps)^(-3/2)
        dmu = sum(-dxhat_i * s) + dv * sum(-2 (x_i - mu)) / m + dmean
        dx_i = dxhat_i * s + dv * 2 (x_i - mu) / m + dmu / m
    """
    x = np.asarray(x, np.float64)
    gamma, dout = np.asarray(gamma, np.float64), np.asarray(dout, np.float64)
    pshape = param_shape(x.shape, mode, data_format)
    dmean = np.zeros(pshape) if dmean is None else np.asarray(dmean, np.float64)
    dinvstd = np.zeros(pshape) if dinvstd is None else np.asarray(dinvstd, np.float64)
    dx, dgamma, dbeta = np.zeros(x.shape), np.zeros(pshape), np.zeros(pshape)
    for p, members in _groups(x.shape, mode, data_format):
        vals = [float(x[i]) for i in members]
        m = len(vals)
        mu = math.fsum(vals) / m
        v = math.fsum((t - mu) ** 2 for t in vals) / m
        s = 1.0 / math.sqrt(v + epsilon)
        dbeta[p] = math.fsum(float(dout[i]) for i in members)
        dgamma[p] = math.fsum(float(dout[i]) * (t - mu) * s for i, t in zip(members, vals))
        dxhat = [float(dout[i]) * float(gamma[p]) for i in members]
        ds = math.fsum(d * (t - mu) for d, t in zip(dxhat, vals)) + float(dinvstd[p])
        dv = ds * -0.5 * (v + epsilon) ** -1.5
        dmu = (math.fsum(-d * s for d in dxhat)
               + dv * math.fsum(-2.0 * (t - mu) for t in vals) / m + float(dmean[p]))
        for i, d, t in zip(members, dxhat, vals):
            dx[i] = d * s + dv * 2.0 * (t - mu) / m + dmu / m
    return dx, dgamma, dbeta


def bn_test_grad(x, gamma, mean, var, dout, mode: str, epsilon: float, data_format: str = "NCHW"):
    """(dx, dgamma, dbeta, dmean, dvar) of bn_test with cotangent dout."""
    x, gamma, mean, var, dout = (np.asarray(a, np.float64) for a in (x, gamma, mean, var, dout))
    pshape = param_shape(x.shape, mode, data_format)
    dx = np.zeros(x.shape)
    dgamma, dbeta, dmean, dvar = (np.zeros(pshape) for _ in range(4))
    for p, members in _groups(x.shape, mode, data_format):
        s = 1.0 / math.sqrt(var[p] + epsilon)
        for i in members:
            dx[i] = dout[i] * gamma[p] * s
            dgamma[p] += dout[i] * (x[i] - mean[p]) * s
            dbeta[p] += dout[i]
            dmean[p] -= dout[i] * gamma[p] * s
            dvar[p] += dout[i] * gamma[p] * (x[i] - mean[p]) * -0.5 * s ** 3
    return dx, dgamma, dbeta, dmean, dvar
