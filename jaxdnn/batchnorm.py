"""Batch normalization: `dnn_batch_normalization_train`, `dnn_batch_normalization_test`
(cudnnBatchNormalizationForwardTraining/Inference/Backward, or the frontend's batchnorm,
batchnorm_inference and dbn nodes).

Four primitives:

* `bn_fwd_train` (x, gamma, beta) -> (out, mean, invstd), the batch statistics of x;
* `bn_bwd` (x, dy, gamma, mean, invstd) -> (dx, dgamma, dbeta): the VJP of `out`, from the
  statistics the forward saved (the residuals are x, gamma, mean and invstd only);
* `bn_fwd_infer` (x, gamma, beta, mean, var) -> out, with given statistics;
* `bn_tangent` (x, gamma, mean, invstd, tx, tgamma, tbeta) -> the tangent of `out` (XLA
  only: cuDNN has no such pass), linear in (tx, tgamma, tbeta), whose transpose is `bn_bwd`.

What the primitives see, and the FFI handlers will get: 4-D or 5-D images (a 2-D (N, C)
input runs as (N, C, 1, 1), a 3-D one with a unit spatial axis added), `layout` one of
NCHW, NHWC, NCDHW, NDHWC, `mode` 'per-activation' or 'spatial', `epsilon` a float.
Per-activation mode normalizes over N alone, so its layout does not matter and is always
the channels-first name. gamma, beta and the statistics have the image's rank with 1 on
every normalized axis; for half-precision images they are float32 (the type cuDNN
derives for them, `cudnnDeriveBNTensorDescriptor`) and the statistics are computed in
float32; otherwise they have the image's dtype. The public functions cast to and from the
caller's dtypes. The running averages are computed here, functionally, in plain JAX
(never cuDNN's in-place running statistics).

Differentiation (both modes, any order) is JVP rules on the primitives. The training
forward's tangent is `bn_tangent` for `out` plus, in plain JAX, those of `mean` and
`invstd` (d mean = mean(tx), d invstd = -invstd**3 * mean((x - mean) * tx)); reverse mode
transposes `bn_tangent` into `bn_bwd`, the cuDNN backward, and JAX transposes the plain-JAX
statistics tangents (under jit nothing of them runs when their cotangents are zero, the
usual case). `bn_bwd` and `bn_fwd_infer` are nonlinear and no cuDNN pass computes their
tangents: those are jax.jvp of their references (XLA), which reverse mode transposes, as
their VJPs were the references' before.

Batching: the training statistics belong to each vmapped instance, so the vmapped axis
is folded into the channel axis (spatial mode) or the feature axes (per-activation: axis
1), never into N: B instances of C channels are one call with B*C channels. Inference
with only the image vmapped folds into N instead (the statistics are given).

On CUDA the primitives run cuDNN's batch-norm calls (cuda/batchnorm.cc) where that
measured at least as fast as XLA's fusion of the reference (jaxdnn/reference/batchnorm.py)
inside a program, and the reference elsewhere; see `_xla_is_faster`. dnn.enabled=True
forces cuDNN.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxdnn import _validate
from jaxdnn._compat import ShapedArray, ad, batching, zero_tangent_like
from jaxdnn._batching import merge_into, split_from
from jaxdnn._primitive import (choose_impl, define_linear_in_last, define_primitive,
                               define_reference_jvp)
from jaxdnn._sharding import Partitioning, layout_factors
from jaxdnn.layout import CHANNELS_FIRST, CHANNELS_LAST, channel_axis, data_format_is_channels_last
from jaxdnn.reference import batchnorm as reference

__all__ = ["dnn_batch_normalization_train", "dnn_batch_normalization_test", "bn_fwd_train_p",
           "bn_fwd_infer_p", "bn_bwd_p", "bn_tangent_p"]

TRAIN_FFI_TARGETS = ("jaxdnn_bn_fwd_train", "jaxdnn_bn_bwd")
INFER_FFI_TARGETS = ("jaxdnn_bn_fwd_infer",)
FFI_TARGETS = TRAIN_FFI_TARGETS + INFER_FFI_TARGETS
MODES = ("per-activation", "peractivation", "spatial")
MIN_EPSILON = 1e-5  # Theano's (and cuDNN <= 7's CUDNN_BN_MIN_EPSILON) lower bound


# ---- primitives ------------------------------------------------------------------------

def _train_abstract(x, gamma, beta, **params):
    stat = ShapedArray(gamma.shape, gamma.dtype)
    return [ShapedArray(x.shape, x.dtype), stat, stat]


def _infer_abstract(x, gamma, beta, mean, var, **params):
    return ShapedArray(x.shape, x.dtype)


def _bwd_abstract(x, dy, gamma, mean, invstd, **params):
    param = ShapedArray(gamma.shape, gamma.dtype)
    return [ShapedArray(x.shape, x.dtype), param, param]


def _tangent_abstract(x, *operands, **params):
    return ShapedArray(x.shape, x.dtype)


def _attributes(*, mode, layout, epsilon):
    return dict(mode=mode, layout=layout, epsilon=np.float64(epsilon))


def _xla_is_faster(layout: str, dtype, mode: str, training: bool) -> bool:
    """Where dnn.enabled='auto' takes XLA's fusion of the reference: every half-precision
    and float32 case, from measurements (BENCHMARKS.md, "Softmax and batch norm where
    models use them"; benchmarks/in_model.py). float64 is unmeasured and kept on cuDNN.

    Inside a jitted program XLA fuses batch norm's reductions and its elementwise
    normalization with the convolution, activation and residual add around it; a cuDNN
    call reads and writes the whole image on its own. In the spatial training cases
    measured, per call or inside a program, cuDNN ran slower than XLA (BENCHMARKS.md,
    "Batch normalization" and "Softmax and batch norm where models use them") but for one
    per-call win, float32 NHWC through cuDNN's graph API; a float32 CNN training step that
    ran its batch norm there was slower than Flax's (BENCHMARKS.md, "Data-parallel
    training steps on one device"), so it takes XLA too; so do per-activation mode
    (unmeasured) and inference, an elementwise pass XLA folds into its neighbours.
    in_model.py times each case beside cuDNN forced: a case goes back to cuDNN once that
    shows cuDNN ahead inside a program.
    """
    del layout, mode, training  # one answer for every non-float64 case measured so far
    return jnp.dtype(dtype) != jnp.float64


def _workspace_bytes(x, *args, mode, layout, epsilon):
    """The u8 workspace of the training forward and the backward: spatial mode on
    channels-last images runs cuDNN's graph API (cuda/batchnorm.cc), whose reductions keep
    partial sums there; the legacy calls elsewhere need none."""
    if mode != "spatial" or layout not in CHANNELS_LAST.values():
        return 0
    return min(256 << 20, max(16 << 20, x.size * np.dtype(x.dtype).itemsize // 4))


def _feature_axis(mode: str, layout: str, ndim: int) -> int:
    """The axis a vmapped axis joins: the channels in spatial mode, axis 1 (the first
    feature axis) in per-activation mode."""
    return channel_axis(layout, ndim) if mode == "spatial" else 1


def _to_features(a, axis: int):
    """(B, ...) -> the same array with B merged into `axis`, B-major: (.., B*F, ..)."""
    a = jnp.moveaxis(a, 0, axis)
    return a.reshape(a.shape[:axis] + (a.shape[axis] * a.shape[axis + 1],) + a.shape[axis + 2:])


def _from_features(a, size: int, features: int, axis: int):
    """The inverse of _to_features: (.., B*F, ..) -> (B, .., F, ..)."""
    a = a.reshape(a.shape[:axis] + (size, features) + a.shape[axis + 1:])
    return jnp.moveaxis(a, axis, 0)


def _fold_into_features(prim, args, dims, *, mode, layout, **params):
    """Batching rule of every batch-norm primitive: B vmapped instances are one call over
    B times the channels (spatial) or features (per-activation), so that each instance
    keeps statistics of its own. Unbatched operands are broadcast."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    rank = args[0].ndim - (dims[0] is not None)
    axis = _feature_axis(mode, layout, rank)
    x_shape = list(args[0].shape)
    if dims[0] is not None:
        del x_shape[dims[0]]
    features = x_shape[axis]
    folded = [_to_features(batching.bdim_at_front(a, d, size), axis) for a, d in zip(args, dims)]
    outs = prim.bind(*folded, mode=mode, layout=layout, **params)
    if prim.multiple_results:
        return [_from_features(o, size, features, axis) for o in outs], [0] * len(outs)
    return _from_features(outs, size, features, axis), 0


def _batch_infer(prim, args, dims, **params):
    """Inference normalizes with given statistics: when only the image is vmapped, the
    instances simply join N; otherwise fold into the features like training."""
    if any(d is not None for d in dims[1:]):
        return _fold_into_features(prim, args, dims, **params)
    size = args[0].shape[dims[0]]
    out = prim.bind(merge_into(args[0], dims[0], size, 0), *args[1:], **params)
    return split_from(out, size, 0)


# ---- partitioning (jaxdnn/_sharding.py) --------------------------------------------------
# The image's factors are its layout's; a statistic (gamma-shaped) keeps the factors of
# the axes it is per-element on and a unit factor of its own on each normalized axis.
# Those feature axes split freely. A split batch (N) needs the statistics of the whole
# batch, as on one device: each shard's float32 moments are averaged across the devices
# of N (two C-sized all-reduces) and cuDNN's inference kernel applies them; the backward
# is XLA's fusion of the analytic gradient with its two sums psummed (cuDNN's backward
# can only reduce over its own shard).

def _factors(x, mode: str, layout: str) -> tuple[str, str, frozenset]:
    image = layout_factors(layout).split()
    normalized = reference.reduction_axes(mode, layout, x.ndim)
    stat = [f"u{a}" if a in normalized else f for a, f in enumerate(image)]
    features = frozenset(f for a, f in enumerate(image) if a not in normalized)
    return " ".join(image), " ".join(stat), features | {"n"}


def _global_train(axes, bind, x, gamma, beta, *, mode, layout, epsilon, impl):
    if "n" not in axes:
        return bind(x, gamma, beta, mode=mode, layout=layout, epsilon=epsilon, impl=impl)
    mean, var = reference.batch_statistics(x, mode=mode, layout=layout, axis_name=axes["n"])
    out = bn_fwd_infer_p.bind(x, gamma, beta, mean.astype(gamma.dtype), var.astype(gamma.dtype),
                              mode=mode, layout=layout, epsilon=epsilon, impl=impl)
    invstd = jax.lax.rsqrt(var + jnp.asarray(epsilon, var.dtype))
    return [out, mean.astype(gamma.dtype), invstd.astype(gamma.dtype)]


def _global_backward(axes, bind, x, dy, gamma, mean, invstd, **params):
    if "n" not in axes:
        return bind(x, dy, gamma, mean, invstd, **params)
    params.pop("impl")
    return reference.bn_backward(x, dy, gamma, mean, invstd, axis_name=axes["n"], **params)


def _global_tangent(axes, bind, x, gamma, mean, invstd, tx, tgamma, tbeta, **params):
    if "n" not in axes:
        return bind(x, gamma, mean, invstd, tx, tgamma, tbeta, **params)
    params.pop("impl")
    return [reference.bn_train_tangent(x, gamma, mean, invstd, tx, tgamma, tbeta,
                                       axis_name=axes["n"], **params)]


def _train_partitioning(x, gamma, beta, *, mode, layout, epsilon):
    image, stat, shardable = _factors(x, mode, layout)
    return Partitioning((image, stat, stat), (image, stat, stat), shardable, local=_global_train)


def _infer_partitioning(x, *params, mode, layout, epsilon):
    image, stat, _ = _factors(x, mode, layout)  # elementwise: every axis of x splits
    return Partitioning((image,) + (stat,) * 4, (image,), frozenset(image.split()))


def _bwd_partitioning(x, dy, gamma, mean, invstd, *, mode, layout, epsilon):
    image, stat, shardable = _factors(x, mode, layout)
    return Partitioning((image, image, stat, stat, stat), (image, stat, stat), shardable,
                        local=_global_backward)


def _tangent_partitioning(x, *operands, mode, layout, epsilon):
    image, stat, shardable = _factors(x, mode, layout)
    return Partitioning((image, stat, stat, stat, image, stat, stat), (image,), shardable,
                        local=_global_tangent)


bn_fwd_train_p = define_primitive(
    "jaxdnn_bn_fwd_train", abstract_eval=_train_abstract, reference=reference.bn_forward_train,
    attributes=_attributes,
    workspace_bytes=_workspace_bytes, batch_rule=_fold_into_features,
    partitioning=_train_partitioning, multiple_results=True)

bn_fwd_infer_p = define_primitive(
    "jaxdnn_bn_fwd_infer", abstract_eval=_infer_abstract, reference=reference.bn_forward_infer,
    attributes=_attributes, batch_rule=_batch_infer,
    partitioning=_infer_partitioning)

bn_bwd_p = define_primitive(
    "jaxdnn_bn_bwd", abstract_eval=_bwd_abstract, reference=reference.bn_backward,
    attributes=_attributes, workspace_bytes=_workspace_bytes,
    batch_rule=_fold_into_features, partitioning=_bwd_partitioning, multiple_results=True)

# On XLA whatever its impl (cuDNN has no such pass); impl is its transpose's, bn_bwd.
bn_tangent_p = define_primitive(
    "jaxdnn_bn_tangent", abstract_eval=_tangent_abstract, reference=reference.bn_train_tangent,
    ffi_target=None, batch_rule=_fold_into_features, partitioning=_tangent_partitioning)


# ---- differentiation: JVP rules on the primitives; reverse mode transposes them ------------
# bn_fwd_train's tangent: bn_tangent for out (transposed into bn_bwd, the cuDNN backward,
# with the residuals x, gamma, mean and invstd as before) and plain JAX for the statistics.
# bn_tangent is linear in its tangents; its derivative in x, gamma and the statistics
# (second order) is its reference's. bn_bwd and bn_fwd_infer: their references' JVPs.

def _statistics_tangent(x, mean, invstd, tx, *, mode, layout):
    """(d mean, d invstd) in the direction tx (in the statistics' dtype):
        d mean = mean(tx),  d invstd = -invstd**3 * mean((x - mean) * tx)."""
    axes = reference.reduction_axes(mode, layout, x.ndim)
    ct = reference.compute_dtype(x.dtype)
    txc = tx.astype(ct)
    dmean = jnp.mean(txc, axis=axes, keepdims=True)
    inv = invstd.astype(ct)
    centred = x.astype(ct) - mean.astype(ct)
    dinvstd = -(inv * inv * inv) * jnp.mean(centred * txc, axis=axes, keepdims=True)
    return dmean.astype(mean.dtype), dinvstd.astype(invstd.dtype)


def _train_jvp(primals, tangents, **params):
    x, gamma, beta = primals
    tx, tgamma, tbeta = tangents
    out, mean, invstd = bn_fwd_train_p.bind(x, gamma, beta, **params)
    if all(type(t) is ad.Zero for t in tangents):
        return [out, mean, invstd], [zero_tangent_like(v) for v in (out, mean, invstd)]
    tout = bn_tangent_p.bind(x, gamma, mean, invstd, *map(ad.instantiate_zeros, tangents),
                             **params)
    if type(tx) is ad.Zero:
        tmean, tinvstd = zero_tangent_like(mean), zero_tangent_like(invstd)
    else:
        tmean, tinvstd = _statistics_tangent(x, mean, invstd, tx, mode=params["mode"],
                                             layout=params["layout"])
    return [out, mean, invstd], [tout, tmean, tinvstd]


def _tangent_cotangent(x, gamma, mean, invstd, ct, **params):
    """The transpose of bn_tangent: (dx, dgamma, dbeta) = bn_bwd, the cuDNN backward."""
    return bn_bwd_p.bind(x, ct, gamma, mean, invstd, **params)


ad.primitive_jvps[bn_fwd_train_p] = _train_jvp
define_linear_in_last(bn_tangent_p, _tangent_cotangent, reference=reference.bn_train_tangent,
                      linear=3)
define_reference_jvp(bn_bwd_p, reference.bn_backward)
define_reference_jvp(bn_fwd_infer_p, reference.bn_forward_infer)


def _bn_train_across(x, gamma, beta, *, axis_name, mode, layout, epsilon, impl):
    """Training batch norm over the batches of every device of `axis_name`: XLA's moments,
    averaged across the devices, applied by the inference primitive. Plain JAX around
    differentiable primitives: AD carries the gradients across the devices (the pmeans'
    transposes)."""
    mean, var = reference.batch_statistics(x, mode=mode, layout=layout, axis_name=axis_name)
    out = bn_fwd_infer_p.bind(x, gamma, beta, mean.astype(gamma.dtype), var.astype(gamma.dtype),
                              mode=mode, layout=layout, epsilon=epsilon, impl=impl)
    invstd = jax.lax.rsqrt(var + jnp.asarray(epsilon, var.dtype))
    return out, mean.astype(gamma.dtype), invstd.astype(gamma.dtype)


# ---- argument handling -------------------------------------------------------------------

def _mode(op: str, mode) -> str:
    _validate.check_choice(op, "mode", mode, MODES)
    return "per-activation" if mode == "peractivation" else mode


def _check_array(op: str, arg: str, value) -> None:
    if value is None:
        raise TypeError(f"{op}: {arg} must be an array; got None")
    _validate.check_floating(op, arg, value)


def _real_scalar(op: str, arg: str, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (numbers.Real, np.ndarray, jax.Array)):
        raise TypeError(f"{op}: {arg} must be a real number; got {value!r}")
    if np.ndim(value) != 0 or not (isinstance(value, numbers.Real)
                                   or jnp.issubdtype(value.dtype, jnp.floating)
                                   or jnp.issubdtype(value.dtype, jnp.integer)):
        raise TypeError(f"{op}: {arg} must be a real scalar; got {value!r}")


def _epsilon(op: str, epsilon) -> float:
    """A static (Python) float >= 1e-5: it is an attribute of the cuDNN call."""
    _real_scalar(op, "epsilon", epsilon)
    try:
        eps = float(epsilon)
    except jax.errors.ConcretizationTypeError:
        raise TypeError(f"{op}: epsilon must be a static number (a Python float), not a traced "
                        "value") from None
    if not eps >= MIN_EPSILON or not np.isfinite(eps):
        raise ValueError(f"{op}: epsilon={epsilon!r} must be a finite number >= {MIN_EPSILON:g} "
                         "(cuDNN's minimum, as in Theano)")
    return eps


def _average_factor(op: str, factor):
    """A number in [0, 1], or a traced scalar (a schedule, left unchecked: the running
    averages are computed in plain JAX)."""
    _real_scalar(op, "running_average_factor", factor)
    try:
        value = float(factor)
    except jax.errors.ConcretizationTypeError:
        return factor
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{op}: running_average_factor={factor!r} must be in [0, 1]")
    return value


def _normalized_axes(mode: str, channels_last: bool, rank: int) -> tuple[int, ...]:
    if mode == "per-activation":
        return (0,)
    channel = rank - 1 if channels_last else 1
    return tuple(a for a in range(rank) if a != channel)


def _check_param(op: str, arg: str, value, expected: tuple[int, ...], mode: str) -> None:
    _check_array(op, arg, value)
    shape = tuple(np.shape(value))
    if shape != expected:
        what = "axis 0" if mode == "per-activation" else "every axis but the channels"
        raise ValueError(
            f"{op}: {arg} must have shape {expected} (the inputs' rank, with 1 on {what}, "
            f"which mode={mode!r} normalizes over); got {shape}")


def _canonical(mode: str, channels_last: bool, rank: int) -> tuple[str, tuple[int, ...]]:
    """(the primitives' layout, the unit axes that take a rank-`rank` array to 4-D)."""
    if mode == "per-activation" or rank == 2:
        channels_last = False  # layout-free (per-activation) or (N, C) either way
    if rank == 2:
        return "NCHW", (2, 3)
    if rank == 3:
        return ("NHWC", (2,)) if channels_last else ("NCHW", (3,))
    return (CHANNELS_LAST if channels_last else CHANNELS_FIRST)[rank], ()


def _prepare(op, mode, inputs, data_format, epsilon, params: dict):
    """Validate the arguments shared by both functions. Returns (mode, x, the parameter
    shape, the normalized axes, the primitives' layout, the axes to add, epsilon)."""
    mode = _mode(op, mode)
    _validate.check_rank(op, "inputs", inputs, (2, 3, 4, 5),
                         " ((N, C) or a batch of 1-D, 2-D or 3-D images)")
    _check_array(op, "inputs", inputs)
    rank = np.ndim(inputs)
    channels_last = data_format_is_channels_last(data_format, rank, op=op, any_rank=True)
    normalized = _normalized_axes(mode, channels_last, rank)
    expected = tuple(1 if a in normalized else s for a, s in enumerate(np.shape(inputs)))
    for arg, value in params.items():
        _check_param(op, arg, value, expected, mode)
    eps = _epsilon(op, epsilon)
    layout, unit_axes = _canonical(mode, channels_last, rank)
    return mode, jnp.asarray(inputs), expected, normalized, layout, unit_axes, eps


def _to_primitive(value, unit_axes, dtype):
    """`value` in `dtype`, with the unit axes that make it 4-D."""
    value = jnp.asarray(value).astype(dtype)
    return jnp.expand_dims(value, unit_axes) if unit_axes else value


# ---- public functions ----------------------------------------------------------------------

def dnn_batch_normalization_train(inputs, gamma, beta, mode: str = "per-activation",
                                  epsilon: float = 1e-4, running_average_factor=0.1,
                                  running_mean=None, running_var=None,
                                  data_format: str = "NCHW", axis_name=None):
    """Batch normalization with the statistics of the batch.

    inputs: 2-D to 5-D, channels-first ((N, C, ...), the default) or channels-last with
    data_format='NHWC' (any channels-last name: 'NWC', 'NHWC', 'NDHWC', 'channels_last').
    mode 'per-activation' (or 'peractivation') normalizes each activation over N;
    'spatial' each channel over N and every spatial axis. gamma, beta (and running_mean,
    running_var) have the inputs' rank with size 1 on the normalized axes.

    Returns (out, mean, invstd) with
        mean = inputs.mean(axes), var = inputs.var(axes) (biased),
        invstd = 1 / sqrt(var + epsilon), out = (inputs - mean) * gamma * invstd + beta;
    with both running stats given, also
        new_running_mean = running_mean * (1 - f) + mean * f,
        new_running_var = running_var * (1 - f) + var * m / (m - 1) * f
    (f = running_average_factor, m = the number of elements per statistic). out has the
    inputs' dtype; mean and invstd gamma's shape and dtype (computed in float32 for half
    inputs); the running stats keep their own dtypes. epsilon >= 1e-5. out, mean and invstd
    are differentiable with respect to inputs, gamma and beta; so are the running stats.
    running_average_factor may be a traced scalar (a schedule).

    axis_name: under `shard_map` (or `pmap`), a mapped axis name or a tuple of names over
    which the statistics are taken, as `flax.linen.BatchNorm(axis_name=...)` does: every
    result (running averages and gradients too) equals that of one batch norm over the
    devices' concatenated batches (each device's part of the batch of equal size). The
    statistics are then computed by XLA (float32 moments, averaged across the devices)
    and applied by cuDNN's inference kernel. Under `jit` with a sharded batch, no
    axis_name is needed: the statistics are always those of the whole batch.
    """
    op = "dnn_batch_normalization_train"
    if (running_mean is None) != (running_var is None):
        given, missing = (("running_mean", "running_var") if running_var is None
                          else ("running_var", "running_mean"))
        raise ValueError(f"{op}: running_mean and running_var must be given together; got "
                         f"{given} without {missing}")
    params = {"gamma": gamma, "beta": beta}
    if running_mean is not None:
        params.update(running_mean=running_mean, running_var=running_var)
    mode, x, stat_shape, normalized, layout, unit_axes, eps = _prepare(
        op, mode, inputs, data_format, epsilon, params)
    factor = _average_factor(op, running_average_factor)
    m = math.prod(x.shape[a] for a in normalized)
    if running_mean is not None and m < 2:
        raise ValueError(f"{op}: inputs of shape {tuple(x.shape)} give m={m} value(s) per "
                         f"statistic in mode={mode!r}; running_var needs m >= 2 (it scales the "
                         "variance by m / (m - 1))")
    pdtype = reference.compute_dtype(x.dtype)
    operands = (_to_primitive(x, unit_axes, x.dtype), _to_primitive(gamma, unit_axes, pdtype),
                _to_primitive(beta, unit_axes, pdtype))
    if axis_name is None:
        impl = choose_impl(op, _xla_is_faster(layout, x.dtype, mode, training=True),
                           ffi_targets=TRAIN_FFI_TARGETS, shapes=[x.shape])
        out, mean, invstd = bn_fwd_train_p.bind(*operands, mode=mode, layout=layout,
                                                epsilon=eps, impl=impl)
    else:
        impl = choose_impl(op, _xla_is_faster(layout, x.dtype, mode, training=True),
                           ffi_targets=INFER_FFI_TARGETS, shapes=[x.shape])
        out, mean, invstd = _bn_train_across(*operands, axis_name=axis_name, mode=mode,
                                             layout=layout, epsilon=eps, impl=impl)
        m = m * jax.lax.psum(1, axis_name)
    out = out.reshape(x.shape)
    mean, invstd = mean.reshape(stat_shape), invstd.reshape(stat_shape)
    gdtype = jnp.result_type(gamma)
    result = (out, mean.astype(gdtype), invstd.astype(gdtype))
    if running_mean is None:
        return result
    var = 1 / jnp.square(invstd) - jnp.asarray(eps, pdtype)  # the biased batch variance
    new_stats = []
    for running, batch, scale in ((running_mean, mean, 1.0), (running_var, var, m / (m - 1))):
        running = jnp.asarray(running)
        ct = jnp.promote_types(running.dtype, pdtype)
        new = running.astype(ct) * (1 - factor) + batch.astype(ct) * (scale * factor)
        new_stats.append(new.astype(running.dtype))
    return result + tuple(new_stats)


def dnn_batch_normalization_test(inputs, gamma, beta, mean, var, mode: str = "per-activation",
                                 epsilon: float = 1e-4, data_format: str = "NCHW"):
    """Batch normalization with given statistics (usually running averages):
        out = (inputs - mean) * gamma / sqrt(var + epsilon) + beta.

    inputs, mode, data_format and epsilon as in `dnn_batch_normalization_train`; gamma,
    beta, mean and var have the inputs' rank with size 1 on the normalized axes. out has
    the inputs' dtype (computed in float32 for half inputs) and is differentiable with
    respect to every argument.
    """
    op = "dnn_batch_normalization_test"
    mode, x, _, _, layout, unit_axes, eps = _prepare(
        op, mode, inputs, data_format, epsilon,
        {"gamma": gamma, "beta": beta, "mean": mean, "var": var})
    pdtype = reference.compute_dtype(x.dtype)
    impl = choose_impl(op, _xla_is_faster(layout, x.dtype, mode, training=False),
                       ffi_targets=INFER_FFI_TARGETS, shapes=[x.shape])
    args = [_to_primitive(x, unit_axes, x.dtype)] + [
        _to_primitive(p, unit_axes, pdtype) for p in (gamma, beta, mean, var)]
    out = bn_fwd_infer_p.bind(*args, mode=mode, layout=layout, epsilon=eps, impl=impl)
    return out.reshape(x.shape)
