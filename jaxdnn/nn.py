"""JAX's own signatures on cuDNN: swap `jax.lax.conv_general_dilated`,
`jax.lax.conv_transpose`, `jax.nn.softmax`/`log_softmax` and `flax.linen.max_pool`/
`avg_pool` for these and get the same results (within the dtype's rounding) from cuDNN.

* `conv_general_dilated` / `conv_transpose`: any `dimension_numbers` (strings or a
  `lax.ConvDimensionNumbers`), padding strings or (low, high) pairs, `rhs_dilation`,
  `feature_group_count`, `precision` (a `lax.Precision` or its name: above DEFAULT
  forbids TF32) and `preferred_element_type`. The operands are brought to channels-last
  (N, spatial..., C) and HWIO kernels, which is how cuDNN runs them fastest, and the
  result back to the output layout asked for.
* `softmax` / `log_softmax`: `axis` an int or a tuple of ints; the normalized axes are
  made one (a transpose where they are not the last or, on a 4-D array, axis 1).
* `max_pool` / `avg_pool`: `flax.linen.max_pool` / `avg_pool`'s signatures.
* `batch_norm`: the functional batch norm of `jaxdnn.flax.BatchNorm`.

What cuDNN cannot do runs `jax.lax`'s own operation (XLA) with the same arguments: input
(lhs) dilation other than 1 in `conv_general_dilated`, `batch_group_count` other than 1,
non-floating operands, operands of two dtypes, dot-algorithm precisions, 4-D and larger
spatial ranks, `conv_transpose(..., use_consistent_padding=True)` and softmax `where`.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdnn import _functional
from jaxdnn._functional import avg_pool, max_pool
from jaxdnn.softmax import dnn_log_softmax, dnn_softmax

__all__ = ["conv_general_dilated", "conv_transpose", "softmax", "log_softmax", "max_pool",
           "avg_pool", "batch_norm"]


def _cudnn_takes(op: str, lhs, rhs, precision) -> bool:
    """Whether the operands and precision are ones cuDNN's convolutions take."""
    if lhs.ndim != rhs.ndim or lhs.ndim - 2 not in (1, 2, 3):
        return False
    if lhs.dtype != rhs.dtype or not jnp.issubdtype(lhs.dtype, jnp.floating):
        return False
    try:
        _functional.full_float32(op, precision)
    except ValueError:  # a dot algorithm: XLA's own
        return False
    return True


def _to_channels_last(lhs, rhs, dn: lax.ConvDimensionNumbers):
    """lhs as (N, spatial..., C), rhs as (spatial..., I, O), and the permutation that takes
    a (N, spatial..., C) result to the output layout `dn` names."""
    lhs_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])
    rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
    out_perm = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
    return (_transpose(lhs, lhs_perm), _transpose(rhs, rhs_perm),
            tuple(int(i) for i in np.argsort(out_perm)))


def _channels_last_call(apply, lhs, rhs, dimension_numbers, strides, padding, rhs_dilation,
                        **options):
    """apply(x, kernel, ...) (a functional-core convolution on (N, spatial..., C) images
    and HWIO kernels) on operands laid out as `dimension_numbers` says, the result in the
    output layout it names."""
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    x, kernel, out_perm = _to_channels_last(lhs, rhs, dn)
    y = apply(x, kernel, strides=tuple(strides),
              padding=padding if isinstance(padding, str) else [tuple(p) for p in padding],
              kernel_dilation=(1,) * (lhs.ndim - 2) if rhs_dilation is None
              else tuple(rhs_dilation), **options)
    return _transpose(y, out_perm)


def _transpose(x, perm):
    return x if tuple(perm) == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
    """`jax.lax.conv_general_dilated` on cuDNN (same arguments, same result)."""
    op = "jaxdnn.nn.conv_general_dilated"
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    xla = functools.partial(lax.conv_general_dilated, lhs, rhs, window_strides, padding,
                            lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                            batch_group_count, precision, preferred_element_type)
    if (not _cudnn_takes(op, lhs, rhs, precision) or batch_group_count != 1
            or (lhs_dilation is not None and any(d != 1 for d in lhs_dilation))):
        return xla()
    return _channels_last_call(_functional.conv_apply, lhs, rhs, dimension_numbers,
                               window_strides, padding, rhs_dilation, op=op,
                               feature_group_count=feature_group_count, precision=precision,
                               preferred_element_type=preferred_element_type)


def conv_transpose(lhs, rhs, strides: Sequence[int], padding,
                   rhs_dilation: Sequence[int] | None = None, dimension_numbers=None,
                   transpose_kernel: bool = False, precision=None, preferred_element_type=None,
                   use_consistent_padding: bool = False):
    """`jax.lax.conv_transpose` on cuDNN (its backward-data pass; same arguments, same
    result, the same default layouts: NHWC images and HWIO kernels)."""
    op = "jaxdnn.nn.conv_transpose"
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    xla = functools.partial(lax.conv_transpose, lhs, rhs, strides, padding, rhs_dilation,
                            dimension_numbers, transpose_kernel, precision,
                            preferred_element_type, use_consistent_padding)
    if not _cudnn_takes(op, lhs, rhs, precision) or use_consistent_padding:
        return xla()
    if dimension_numbers is None:  # lax.conv_transpose's defaults
        dimension_numbers = {1: ("NHC", "HIO", "NHC"), 2: ("NHWC", "HWIO", "NHWC"),
                             3: ("NHWDC", "HWDIO", "NHWDC")}[lhs.ndim - 2]
    return _channels_last_call(_functional.conv_transpose_apply, lhs, rhs, dimension_numbers,
                               strides, padding, rhs_dilation, op=op,
                               transpose_kernel=transpose_kernel, precision=precision,
                               preferred_element_type=preferred_element_type)


def _normalized(x, axis, where, jax_fn, dnn_fn):
    """softmax-like `dnn_fn` over `axis` of x, as `jax_fn` (jax.nn's) computes it."""
    x = jnp.asarray(x)
    if where is not None or x.ndim == 0 or not jnp.issubdtype(x.dtype, jnp.floating):
        return jax_fn(x, axis=axis, where=where)
    axes = tuple(sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    if x.ndim == 4 and axes in ((1,), (3,)):  # an image batch's channels: no transpose
        return dnn_fn(x, data_format="NCHW" if axes == (1,) else "NHWC")
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    moved = _transpose(x, rest + axes)
    rows = (int(np.prod([x.shape[a] for a in rest])), int(np.prod([x.shape[a] for a in axes])))
    y = dnn_fn(moved.reshape(rows))  # (rows, C): one row normalized at a time
    return _transpose(y.reshape(moved.shape), tuple(int(i) for i in np.argsort(rest + axes)))


def softmax(x, axis: int | tuple[int, ...] = -1, where=None):
    """`jax.nn.softmax` on cuDNN."""
    return _normalized(x, axis, where, jax.nn.softmax, dnn_softmax)


def log_softmax(x, axis: int | tuple[int, ...] = -1, where=None):
    """`jax.nn.log_softmax` on cuDNN."""
    return _normalized(x, axis, where, jax.nn.log_softmax, dnn_log_softmax)


def batch_norm(x, scale=None, bias=None, *, axis: int | tuple[int, ...] = -1,
               epsilon: float = 1e-5, mean=None, var=None, dtype=None, axis_name=None):
    """Batch normalization of x over every axis but `axis` (the features), as
    `flax.linen.BatchNorm` computes it: with the batch's statistics when mean and var are
    None (and then over the devices of `axis_name` too), else with the given ones.

    Returns (y, batch_mean, batch_var): the batch statistics (biased variance, at least
    float32), None when mean and var were given."""
    _functional.check_batch_norm_options("jaxdnn.nn.batch_norm", epsilon=epsilon,
                                         axis_name=axis_name)
    return _functional.batch_norm_apply(x, scale, bias, axis=axis, epsilon=epsilon, mean=mean,
                                        var=var, dtype=dtype, axis_name=axis_name,
                                        op="jaxdnn.nn.batch_norm")
