"""The functional core of `jaxdnn.nn` and of the Flax modules: arrays and static options
in, arrays out, with Flax's (and `jax.lax`'s) conventions.

`jaxdnn.nn`, `jaxdnn.flax` (linen) and `jaxdnn.flax.nnx` (NNX) all build on these
functions, so they compute the same numbers by one code path; `jaxdnn.flax`'s docstring
says how each matches Flax's own modules. Nothing here imports flax.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdnn import _validate
from jaxdnn.batchnorm import (MIN_EPSILON, dnn_batch_normalization_test,
                              dnn_batch_normalization_train)
from jaxdnn.conv import dnn_conv, dnn_conv3d, dnn_gradinput, dnn_gradinput3d
from jaxdnn.pooling import dnn_pool
from jaxdnn.spatial_transformer import dnn_affine_grid, dnn_grid_sampler, dnn_spatialtf

Array = Any
PaddingLike = Any  # str, int, or a sequence of ints / (low, high) pairs
CHANNELS_LAST = {1: "NWC", 2: "NHWC", 3: "NDHWC"}
PAD_STRINGS = ("SAME", "SAME_LOWER", "VALID")
CONV_PAD_STRINGS = PAD_STRINGS + ("CIRCULAR", "REFLECT", "CAUSAL")


# ---- argument handling -------------------------------------------------------------------

def canonical_dtype(*args, dtype=None):
    """Flax's canonicalize_dtype: `dtype`, else the arrays' promoted type, at least a
    floating type (integers promote with float32)."""
    if dtype is None:
        dtype = jnp.result_type(*args)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"dtype must be a floating type; got {dtype}")
    return jnp.dtype(dtype)


def check_kernel_size(op: str, kernel_size) -> tuple[int, ...]:
    try:
        size = (kernel_size,) if _validate.is_int(kernel_size) else tuple(kernel_size)
    except TypeError:
        raise TypeError(f"{op}: kernel_size must be an int or a sequence of ints; got "
                        f"{kernel_size!r}") from None
    if len(size) not in (1, 2, 3):
        raise ValueError(f"{op}: kernel_size={kernel_size!r} must have 1, 2 or 3 entries "
                         "(cuDNN convolves 1-D, 2-D and 3-D images)")
    size = _validate.int_tuple(op, "kernel_size", size, len(size))
    if min(size) < 1:
        raise ValueError(f"{op}: kernel_size={kernel_size!r} must be positive")
    return size


def check_feature_groups(op: str, feature_group_count, in_features: int) -> int:
    """feature_group_count as an int: positive, dividing the input features."""
    if (not _validate.is_int(feature_group_count) or feature_group_count < 1
            or in_features % feature_group_count):
        raise ValueError(f"{op}: feature_group_count={feature_group_count!r} must be a positive "
                         f"int dividing the {in_features} input features")
    return int(feature_group_count)


def _per_axis(op: str, arg: str, value, nd: int) -> tuple[int, ...]:
    """Flax's maybe_broadcast: None and ints broadcast (None meaning 1)."""
    return _validate.int_tuple(op, arg, 1 if value is None else value, nd)


def _padding_spec(op: str, padding, nd: int, strings=PAD_STRINGS):
    """Flax's canonicalize_padding: a padding string, or one (low, high) pair per axis."""
    if isinstance(padding, str):
        if padding not in strings:
            raise ValueError(f"{op}: padding={padding!r} is not one of "
                             f"{', '.join(map(repr, strings))} or explicit (low, high) pairs")
        return padding
    if _validate.is_int(padding):
        return [(int(padding), int(padding))] * nd
    try:
        items = list(padding)
    except TypeError:
        items = None
    if items is not None and len(items) == nd:
        pairs = []
        for p in items:
            if _validate.is_int(p):
                pairs.append((int(p), int(p)))
            elif isinstance(p, Sequence) and len(p) == 2:
                pairs.append((int(p[0]), int(p[1])))
            else:
                break
        if len(pairs) == nd:
            return pairs
    raise ValueError(f"{op}: padding={padding!r} must be a string, an int, or {nd} entries "
                     "(an int or a (low, high) pair per spatial axis)")


def _split_padding(pads, limits) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    """Split per-axis (low, high) padding into the symmetric part cuDNN takes (at least 0,
    at most limit) and the rest, which the caller pads (or, negative, crops) explicitly."""
    symmetric = tuple(max(0, min(lo, hi, limit)) for (lo, hi), limit in zip(pads, limits))
    rest = [(lo - s, hi - s) for (lo, hi), s in zip(pads, symmetric)]
    return symmetric, rest


def _pad_spatial(x, rest, value):
    """Pad (negative: crop) the spatial axes of a channels-last batch x."""
    if all(lo == 0 and hi == 0 for lo, hi in rest):
        return x
    config = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in rest] + [(0, 0, 0)]
    return lax.pad(x, jnp.asarray(value, x.dtype), config)


def _flatten_batch(op: str, inputs, nd: int):
    """Flax's batch handling: every leading axis before the nd spatial axes and the
    features is one batch axis (none: a batch of one). Returns (x, restore)."""
    num_batch = inputs.ndim - (nd + 1)
    if num_batch < 0:
        raise ValueError(f"{op}: inputs of shape {inputs.shape} lack the {nd} spatial axes and "
                         f"the feature axis that a {nd}-D window needs")
    if num_batch == 1:
        return inputs, lambda y: y
    batch_shape = inputs.shape[:num_batch]
    x = inputs.reshape((-1,) + inputs.shape[num_batch:])
    return x, lambda y: y.reshape(batch_shape + y.shape[1:])


def full_float32(op: str, precision) -> bool:
    """Whether a lax precision asks for more than DEFAULT (XLA's GPU convolutions then give
    up TF32; cuDNN's only other float32 mode is full float32)."""
    if precision is None:
        return False
    levels = precision if isinstance(precision, (tuple, list)) else (precision,)
    try:
        levels = [lax.Precision(p) for p in levels if p is not None]
    except (TypeError, ValueError):
        raise ValueError(f"{op}: precision={precision!r} must be None, a lax.Precision (or its "
                         "name) or a pair of them; dot algorithms do not apply to cuDNN's "
                         "convolutions") from None
    return any(p != lax.Precision.DEFAULT for p in levels)


def _math_mode(op: str, precision):
    """jaxdnn reads jax.default_matmul_precision at trace time to allow or forbid TF32."""
    if full_float32(op, precision):
        return jax.default_matmul_precision("float32")
    return contextlib.nullcontext()


# ---- convolution -------------------------------------------------------------------------

def module_settings(module, apply) -> dict:
    """The keyword arguments of `apply` (conv_apply, conv_transpose_apply) that the Flax
    modules (linen and NNX alike) keep as attributes of the same names, read off `module`:
    the one place the modules forward them."""
    return {name: getattr(module, name) for name in _MODULE_SETTINGS[apply.__name__]}


def conv_apply(inputs, kernel, bias=None, *, strides=1, padding="SAME", input_dilation=1,
               kernel_dilation=1, feature_group_count: int = 1, precision=None,
               preferred_element_type=None, op: str = "Conv"):
    """What `flax.linen.Conv` computes, on cuDNN: inputs (*batch, spatial..., in_features),
    kernel in Flax's layout (*kernel_size, in_features // groups, features), bias
    (features,) or None; the operands already promoted to one dtype."""
    nd = kernel.ndim - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"{op}: kernel of shape {kernel.shape} must have 1, 2 or 3 spatial axes")
    kernel_size = kernel.shape[:nd]
    if any(d != 1 for d in _per_axis(op, "input_dilation", input_dilation, nd)):
        raise ValueError(f"{op}: input_dilation={input_dilation!r} is not supported (cuDNN "
                         "convolutions have no input dilation); use ConvTranspose")
    strides = _per_axis(op, "strides", strides, nd)
    dilation = _per_axis(op, "kernel_dilation", kernel_dilation, nd)
    x, restore = _flatten_batch(op, inputs, nd)
    in_features = x.shape[-1]
    feature_group_count = check_feature_groups(op, feature_group_count, in_features)
    if kernel.shape[-2] * feature_group_count != in_features:
        raise ValueError(f"{op}: kernel of shape {kernel.shape} takes {kernel.shape[-2]} features "
                         f"per group, but inputs have {in_features} in {feature_group_count} "
                         "groups")
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    spec = _padding_spec(op, padding, nd, CONV_PAD_STRINGS)
    if spec in ("CIRCULAR", "REFLECT"):
        # Flax pads these itself and convolves VALID; so do we.
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[spec])
        spec = "VALID"
    elif spec == "CAUSAL":
        if nd != 1:
            raise ValueError(f"{op}: padding='CAUSAL' is only implemented for 1-D convolutions")
        x = jnp.pad(x, [(0, 0), (dilated[0] - 1, 0), (0, 0)])
        spec = "VALID"
    if isinstance(spec, str):
        spec = lax.padtype_to_pads(x.shape[1:-1], dilated, strides, spec)
    # cuDNN's 'full' padding (dk - 1) is the most any engine must accept; beyond it, pad here.
    symmetric, rest = _split_padding(spec, [k - 1 for k in dilated])
    x = _pad_spatial(x, rest, 0)
    if preferred_element_type is not None:
        # Accumulating in a wider type = convolving the exactly widened operands.
        x, kernel = x.astype(preferred_element_type), kernel.astype(preferred_element_type)
    # Flax's HWIO kernel -> jaxdnn's (K, C/groups, spatial...), whatever the image layout.
    kerns = jnp.transpose(kernel, (nd + 1, nd) + tuple(range(nd)))
    convolve = dnn_conv3d if nd == 3 else dnn_conv
    with _math_mode(op, precision):
        y = convolve(x, kerns, border_mode=symmetric, subsample=strides, dilation=dilation,
                     conv_mode="cross", num_groups=int(feature_group_count),
                     data_format=CHANNELS_LAST[nd])
    if bias is not None:
        y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape).astype(y.dtype)
    return restore(y)


def _transpose_padding(dk: int, stride: int, padding) -> tuple[int, int]:
    """lax.conv_transpose's padding of the input-dilated convolution (jax's
    _conv_transpose_padding): 'SAME'/'VALID' name the forward convolution's padding,
    explicit pairs are the dilated convolution's own."""
    if padding == "SAME":
        total = dk + stride - 2
        low = dk - 1 if stride > dk - 1 else int(math.ceil(total / 2))
        return low, total - low
    if padding == "VALID":
        total = dk + stride - 2 + max(dk - stride, 0)
        return dk - 1, total - (dk - 1)
    return padding


def conv_transpose_apply(inputs, kernel, bias=None, *, strides=None, padding="SAME",
                         kernel_dilation=None, transpose_kernel: bool = False, precision=None,
                         preferred_element_type=None, op: str = "ConvTranspose"):
    """What `flax.linen.ConvTranspose` (`lax.conv_transpose`) computes, as cuDNN's
    backward-data pass: inputs (*batch, spatial..., in_features), kernel
    (*kernel_size, in_features, features), or (*kernel_size, features, in_features) with
    transpose_kernel=True."""
    nd = kernel.ndim - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"{op}: kernel of shape {kernel.shape} must have 1, 2 or 3 spatial axes")
    kernel_size = kernel.shape[:nd]
    strides = _per_axis(op, "strides", strides, nd)
    dilation = _per_axis(op, "kernel_dilation", kernel_dilation, nd)
    x, restore = _flatten_batch(op, inputs, nd)
    in_axis, out_axis = (nd + 1, nd) if transpose_kernel else (nd, nd + 1)
    if kernel.shape[in_axis] != x.shape[-1]:
        raise ValueError(f"{op}: kernel of shape {kernel.shape} takes {kernel.shape[in_axis]} "
                         f"input features (transpose_kernel={transpose_kernel}), inputs have "
                         f"{x.shape[-1]}")
    features = kernel.shape[out_axis]
    spec = _padding_spec(op, padding, nd, ("SAME", "VALID", "CIRCULAR"))
    circular = spec == "CIRCULAR"
    if circular:
        spec = "VALID"  # then wrapped around below, as Flax does it
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    lax_pads = [_transpose_padding(dk, s, spec if isinstance(spec, str) else spec[i])
                for i, (dk, s) in enumerate(zip(dilated, strides))]
    n_in = x.shape[1:-1]
    # lax: out = (n-1)*s + 1 + lo + hi - dk + 1. The backward-data pass of a convolution
    # padded by (dk-1-lo, dk-1-hi) with stride s gives exactly that image; cuDNN takes one
    # pad p per axis, so compute the image of the convolution padded (p, p) with
    # p <= both sides and total extent (n-1)*s + dk, then crop / zero-pad it to lax's.
    conv_pads = [(dk - 1 - lo, dk - 1 - hi) for dk, (lo, hi) in zip(dilated, lax_pads)]
    out_size = [(n - 1) * s + lo + hi - dk + 2
                for n, s, (lo, hi), dk in zip(n_in, strides, lax_pads, dilated)]
    if any(o < 1 for o in out_size):
        raise ValueError(f"{op}: padding={padding!r} leaves no output for inputs of spatial "
                         f"shape {tuple(n_in)} (output {tuple(out_size)})")
    symmetric, _ = _split_padding(conv_pads, [dk - 1 for dk in dilated])
    computed = [(n - 1) * s + dk - 2 * p for n, s, dk, p in zip(n_in, strides, dilated, symmetric)]
    # Computed image index i sits at padded position i + p; lax's output starts at plo.
    adjust = [(p - plo, (plo - p + o) - c)
              for p, (plo, _), o, c in zip(symmetric, conv_pads, out_size, computed)]
    # Flax's kernel (..., in, out) flipped by conv_mode='conv' is lax's dilated convolution;
    # with transpose_kernel Flax flips it itself and 'cross' undoes the flip.
    kerns = jnp.transpose(kernel, (in_axis, out_axis) + tuple(range(nd)))
    if preferred_element_type is not None:
        x, kerns = x.astype(preferred_element_type), kerns.astype(preferred_element_type)
    gradinput = dnn_gradinput3d if nd == 3 else dnn_gradinput
    with _math_mode(op, precision):
        y = gradinput(kerns, x, (x.shape[0], *computed, features), border_mode=symmetric,
                      subsample=strides, dilation=dilation,
                      conv_mode="cross" if transpose_kernel else "conv",
                      data_format=CHANNELS_LAST[nd])
    y = _pad_spatial(y, adjust, 0)
    if circular:
        y = _wrap_circular(y, n_in, strides, transpose_kernel)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)
    return restore(y)


def _wrap_circular(y, n_in, strides, transpose_kernel: bool):
    """Flax's 'CIRCULAR' ConvTranspose: pad the VALID output to whole periods of n*s and
    fold it onto one period."""
    periods = [n * s for n, s in zip(n_in, strides)]
    diffs = [-(size - period) % (2 * period) for size, period in zip(y.shape[1:-1], periods)]
    if transpose_kernel:
        pads = [(d // 2, (d + 1) // 2) for d in diffs]
    else:
        pads = [((d + 1) // 2, d // 2) for d in diffs]
    y = jnp.pad(y, [(0, 0)] + pads + [(0, 0)])
    for axis in range(1, y.ndim - 1):
        y = y.reshape(y.shape[:axis] + (-1, periods[axis - 1]) + y.shape[axis + 1:]).sum(axis=axis)
    return y



_MODULE_SETTINGS = {
    "conv_apply": ("strides", "padding", "input_dilation", "kernel_dilation",
                   "feature_group_count", "precision", "preferred_element_type"),
    "conv_transpose_apply": ("strides", "padding", "kernel_dilation", "transpose_kernel",
                             "precision", "preferred_element_type"),
}

# ---- batch normalization -------------------------------------------------------------------

def feature_axes_of(op: str, ndim: int, axis) -> tuple[int, ...]:
    axes = axis if isinstance(axis, Sequence) else (axis,)
    try:
        canonical = tuple(sorted({int(a) % ndim if -ndim <= int(a) < ndim else None for a in axes}))
    except TypeError:
        canonical = (None,)
    if None in canonical:
        raise ValueError(f"{op}: axis={axis!r} is not an axis (or axes) of {ndim}-D inputs")
    return canonical


def check_batch_norm_options(op: str, *, epsilon, axis_name=None, axis_index_groups=None,
                             mask=None) -> None:
    """The options jaxdnn's batch normalization cannot honour, each rejected by name."""
    del axis_name  # statistics across the devices of a mapped axis: supported
    if axis_index_groups is not None:
        raise ValueError(f"{op}: axis_index_groups (statistics over groups of devices) is not "
                         "supported; axis_name takes them over every device of the axis")
    if mask is not None:
        raise ValueError(f"{op}: mask (masked batch statistics) is not supported")
    if not float(epsilon) >= MIN_EPSILON:
        raise ValueError(f"{op}: epsilon={epsilon!r} must be >= {MIN_EPSILON:g} (cuDNN's minimum)")


def batch_norm_apply(x, scale, bias, *, axis=-1, epsilon: float = 1e-5, mean=None, var=None,
                     dtype=None, axis_name=None, op: str = "BatchNorm"):
    """Flax's batch normalization on cuDNN. Normalizes x over every axis but `axis` (the
    feature axis or axes): with the batch's statistics when mean and var are None, else
    with the given ones. scale and bias: the features' shape, or None (1 and 0). dtype:
    the result's dtype (Flax's canonicalize_dtype of x, scale and bias). axis_name: the
    batch statistics are those of every device of these mapped axes (shard_map, pmap).

    Returns (y, batch_mean, batch_var): the batch statistics (biased variance, at least
    float32, as Flax's _compute_stats) or None with given statistics."""
    feature_axes = feature_axes_of(op, x.ndim, axis)
    features = tuple(x.shape[a] for a in feature_axes)
    out_dtype = canonical_dtype(*[a for a in (x, scale, bias) if a is not None], dtype=dtype)
    # Flax's statistics: at least float32, from `dtype` or else x's.
    stat_dtype = jnp.promote_types(x.dtype if dtype is None else dtype, jnp.float32)
    # Compute in the wider of x's and the result's types: Flax normalizes float16 inputs
    # with float32 parameters in float32.
    work = x.astype(jnp.promote_types(x.dtype, out_dtype))
    # jaxdnn returns the statistics in gamma's dtype: give it at least float32.
    dnn_param_dtype = jnp.promote_types(work.dtype, jnp.float32)
    # Features last, as one axis; cuDNN takes 2-D to 5-D channels-last inputs directly,
    # anything else as (everything else, features).
    others = tuple(a for a in range(x.ndim) if a not in feature_axes)
    moved = jnp.transpose(work, others + feature_axes)
    num_features = math.prod(features)
    if len(feature_axes) == 1 and 2 <= x.ndim <= 5:
        flat = moved
    else:
        flat = moved.reshape(-1, num_features)
    param_shape = (1,) * (flat.ndim - 1) + (num_features,)

    def as_param(value, default):
        value = default if value is None else value
        return jnp.reshape(value, param_shape).astype(dnn_param_dtype)

    gamma = as_param(scale, jnp.ones(features, dnn_param_dtype))
    beta = as_param(bias, jnp.zeros(features, dnn_param_dtype))
    if mean is None:
        y, batch_mean, invstd = dnn_batch_normalization_train(
            flat, gamma, beta, mode="spatial", epsilon=epsilon, data_format="channels_last",
            axis_name=axis_name)
        batch_mean = batch_mean.reshape(features).astype(stat_dtype)
        # cuDNN returns 1/sqrt(var + eps); Flax's running var wants the biased var itself.
        invstd = invstd.reshape(features)
        batch_var = jnp.maximum(0.0, 1.0 / (invstd * invstd) - epsilon).astype(stat_dtype)
    else:
        y = dnn_batch_normalization_test(flat, gamma, beta, as_param(mean, None),
                                         as_param(var, None), mode="spatial", epsilon=epsilon,
                                         data_format="channels_last")
        batch_mean = batch_var = None
    y = y.reshape(moved.shape)
    y = jnp.transpose(y, np.argsort(others + feature_axes))
    return y.astype(out_dtype), batch_mean, batch_var


# ---- pooling ---------------------------------------------------------------------------------

def pool_apply(inputs, window_shape, strides=None, padding="VALID", *, mode: str,
               count_include_pad: bool = True, op: str = "pool"):
    """Flax's pooling (lax.reduce_window) on `dnn_pool`: inputs (*batch, spatial...,
    features), 1 to 3 spatial axes; mode 'max' or 'avg'."""
    window = tuple(int(w) for w in window_shape)
    nd = len(window)
    if nd not in (1, 2, 3):
        raise ValueError(f"{op}: window_shape={window_shape!r} must have 1, 2 or 3 entries")
    strides = tuple(int(s) for s in strides) if strides is not None else (1,) * nd
    if len(strides) != nd:
        raise ValueError(f"{op}: strides={strides!r} must have {nd} entries like window_shape")
    x, restore = _flatten_batch(op, inputs, nd)
    spec = _padding_spec(op, padding, nd)
    spatial = x.shape[1:-1]
    pads = lax.padtype_to_pads(spatial, window, strides, spec) if isinstance(spec, str) else spec
    # cuDNN pads both sides alike and by less than the window; the rest is padded here with
    # what Flax pads with (-inf never wins a max; zeros add nothing to a sum).
    symmetric, rest = _split_padding(pads, [w - 1 for w in window])
    exact = all(r == (0, 0) for r in rest)
    if mode == "max":
        fill, pool_mode = -jnp.inf, "max"
    elif count_include_pad:
        fill, pool_mode = 0, "average_inc_pad"
    else:
        # cuDNN leaves only its own padding out of the count: with explicit padding, sum
        # and divide by the count of real elements per window (static).
        fill, pool_mode = 0, ("average_exc_pad" if exact else "sum")
    padded = _pad_spatial(x, rest, fill)
    if nd == 1:  # cuDNN pools 2-D and 3-D windows: a 1-D one is (1, w)
        padded = padded[:, None]
        y = dnn_pool(padded, (1,) + window, (1,) + strides, pool_mode, (0,) + symmetric,
                     data_format="NHWC")[:, 0]
    else:
        y = dnn_pool(padded, window, strides, pool_mode, symmetric, data_format=CHANNELS_LAST[nd])
    if pool_mode == "sum":
        counts = _window_counts(spatial, window, strides, pads, y.shape[1:-1])
        y = y / jnp.asarray(counts.reshape((1,) + counts.shape + (1,)), y.dtype)
    return restore(y)


def _window_counts(spatial, window, strides, pads, out_shape) -> np.ndarray:
    """How many real (unpadded) elements each window holds: the product over axes of the
    per-axis counts (padding is separable)."""
    counts = np.ones((), np.float64)
    for n, w, s, (lo, hi), m in zip(spatial, window, strides, pads, out_shape):
        start = np.arange(m) * s  # window start in padded coordinates
        first, last = max(lo, 0), min(lo + n, n + lo + hi)  # the real elements kept
        per_axis = np.clip(np.minimum(start + w, last) - np.maximum(start, first), 0, None)
        counts = np.multiply.outer(counts, per_axis)
    return counts


def max_pool(inputs, window_shape, strides=None, padding="VALID"):
    """`flax.linen.max_pool` on cuDNN: inputs (*batch, window dims..., features); padding
    'SAME', 'VALID' or (low, high) pairs (padded with -inf)."""
    return pool_apply(inputs, window_shape, strides, padding, mode="max", op="max_pool")


def avg_pool(inputs, window_shape, strides=None, padding="VALID", count_include_pad=True):
    """`flax.linen.avg_pool` on cuDNN: the padding counts in the average unless
    count_include_pad=False."""
    return pool_apply(inputs, window_shape, strides, padding, mode="avg",
                      count_include_pad=count_include_pad, op="avg_pool")


# ---- spatial transformer ---------------------------------------------------------------------

def identity_affine_init(key, shape, dtype=jnp.float32):
    """A bias initializer giving the identity transform [[1, 0, 0], [0, 1, 0]], for the last
    (6-unit) layer of a localization network whose kernel starts at zero (so that the
    transformer starts as the identity, as Jaderberg et al. do)."""
    del key
    if math.prod(shape) != 6:
        raise ValueError(f"identity_affine_init: shape {shape} must hold 6 values (a 2x3 theta)")
    return jnp.asarray([1, 0, 0, 0, 1, 0], dtype).reshape(shape)


def spatial_transform_apply(inputs, theta, out_size=None, op: str = "SpatialTransformer"):
    """Sample channels-last images (N, H, W, C) on the affine grids of theta (N, 2, 3, or
    anything of 6 values per image) with `dnn_spatialtf`; out_size (H_out, W_out) defaults
    to the input's."""
    if inputs.ndim != 4:
        raise ValueError(f"{op}: inputs must be (N, H, W, C) images; got shape {inputs.shape}")
    n, height, width, channels = inputs.shape
    if theta.size != 6 * n:
        raise ValueError(f"{op}: the localization network must give 6 numbers (a 2x3 affine "
                         f"matrix) per image; got shape {theta.shape} for {n} images")
    theta = theta.reshape(n, 2, 3)
    img = jnp.transpose(inputs, (0, 3, 1, 2))  # cuDNN's transformer samples NCHW images
    if out_size is None:
        y = dnn_spatialtf(img, theta)
    else:
        size = tuple(int(s) for s in out_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"{op}: out_size={out_size!r} must be (height, width), positive")
        dtype = jnp.promote_types(img.dtype, theta.dtype)
        grid = dnn_affine_grid(theta.astype(dtype), (n, channels) + size)
        y = dnn_grid_sampler(img.astype(dtype), grid)
    return jnp.transpose(y, (0, 2, 3, 1))
