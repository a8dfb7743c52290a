"""Flax (linen) modules over jaxdnn's ops: `Conv`, `ConvTranspose`, `BatchNorm`, `max_pool`,
`avg_pool` and `SpatialTransformer`.

Drop-in replacements for Flax's own: the same attributes with the same defaults, the same
parameter and variable names, shapes and dtypes (a `Conv` kernel is stored HWIO,
(*kernel_size, in_features // feature_group_count, features), as `flax.linen.Conv` stores
it), so swapping the import is enough and Flax checkpoints load unchanged. The numbers are
Flax's too, up to floating-point rounding:

* `Conv` is `dnn_conv` with `conv_mode='cross'` on channels-last images; the kernel is
  transposed to jaxdnn's (K, C/groups, spatial...) inside. Padding follows
  `lax.conv_general_dilated` exactly: 'SAME' is `lax.padtype_to_pads` (its extra pixel
  goes after), 'CIRCULAR'/'REFLECT'/'CAUSAL' as Flax pads them. cuDNN pads both sides of
  an axis alike, so an asymmetric padding passes its symmetric part to cuDNN and pads
  (or, negative, crops) the remainder explicitly.
* `ConvTranspose` is `lax.conv_transpose` (Flax's) computed as cuDNN's backward-data pass,
  `dnn_gradinput`: a transposed convolution with lax padding (lo, hi) on an axis of kernel
  extent dk is the backward-data pass of a convolution padded by (dk-1-lo, dk-1-hi) with
  the kernel flipped (`conv_mode='conv'`; `transpose_kernel=True` flips it back:
  'cross'). Again only the symmetric part goes to cuDNN: the image it computes is
  cropped, or padded with the zeros Flax has there, to Flax's output size.
* `BatchNorm` normalizes with `dnn_batch_normalization_train` ('spatial' mode over every
  axis but the feature axes, channels-last) and `dnn_batch_normalization_test` with the
  running averages. The running statistics are Flax's, not Theano's:
  ra = momentum * ra + (1 - momentum) * batch_stat with the biased batch variance
  (recovered from cuDNN's inverse standard deviation, var = invstd**-2 - epsilon).
* `max_pool`/`avg_pool` are `dnn_pool` ('max', 'average_inc_pad', 'average_exc_pad'),
  with explicit -inf/zero padding for what cuDNN's symmetric padding (less than the
  window) cannot express; `count_include_pad=False` with such padding is a 'sum' pool
  divided by the (static) count of real elements per window, as Flax divides.
* `SpatialTransformer` runs a localization network and samples with `dnn_spatialtf`.

The shared functional core (`conv_apply`, `conv_transpose_apply`, `batch_norm_apply`,
`pool_apply`, `spatial_transform_apply`) takes arrays and static options and is what the
linen modules here and the NNX modules of `jaxdnn.flax.nnx` call.

Not matched: `input_dilation` != 1 (raises; use `ConvTranspose`), `axis_index_groups` /
`mask` of `BatchNorm` (raise: grouped-device and masked statistics),
`epsilon` < 1e-5 (cuDNN's minimum; raises), `ConvLocal`, and linen Conv's deprecated
`conv_general_dilated` hooks. `precision` maps onto cuDNN's math mode: anything above
`lax.Precision.DEFAULT` forbids TF32 for float32 data (as XLA's GPU convolutions do);
cuDNN has no bf16_3x, so HIGH and HIGHEST are both full float32 (dot-algorithm presets
raise). `preferred_element_type` convolves the operands widened to that type.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as linen_dtypes
from flax.linen import initializers
from jax import lax

from jaxdnn.batchnorm import (MIN_EPSILON, dnn_batch_normalization_test,
                              dnn_batch_normalization_train)
from jaxdnn.conv import dnn_conv, dnn_conv3d, dnn_gradinput, dnn_gradinput3d
from jaxdnn.pooling import dnn_pool
from jaxdnn.spatial_transformer import dnn_affine_grid, dnn_grid_sampler, dnn_spatialtf

__all__ = ["Conv", "ConvTranspose", "BatchNorm", "max_pool", "avg_pool", "SpatialTransformer",
           "identity_affine_init", "conv_apply", "conv_transpose_apply", "batch_norm_apply",
           "pool_apply", "spatial_transform_apply"]

Array = Any
PaddingLike = Any  # str, int, or a sequence of ints / (low, high) pairs

# Flax's own defaults, so that an unchanged module definition initializes the same numbers.
default_kernel_init = initializers.lecun_normal()
CHANNELS_LAST = {1: "NWC", 2: "NHWC", 3: "NDHWC"}
PAD_STRINGS = ("SAME", "SAME_LOWER", "VALID")
CONV_PAD_STRINGS = PAD_STRINGS + ("CIRCULAR", "REFLECT", "CAUSAL")


# ---- argument handling -------------------------------------------------------------------

def _kernel_size(op: str, kernel_size) -> tuple[int, ...]:
    size = (kernel_size,) if isinstance(kernel_size, (int, np.integer)) else tuple(kernel_size)
    if len(size) not in (1, 2, 3):
        raise ValueError(f"{op}: kernel_size={kernel_size!r} must have 1, 2 or 3 entries "
                         "(cuDNN convolves 1-D, 2-D and 3-D images)")
    return tuple(int(k) for k in size)


def _per_axis(op: str, arg: str, value, nd: int) -> tuple[int, ...]:
    """Flax's maybe_broadcast: None and ints broadcast (None meaning 1)."""
    if value is None:
        value = 1
    if isinstance(value, (int, np.integer)):
        return (int(value),) * nd
    values = tuple(int(v) for v in value)
    if len(values) != nd:
        raise ValueError(f"{op}: {arg}={value!r} must be an int or {nd} ints, one per spatial axis")
    return values


def _padding_spec(op: str, padding, nd: int, strings=PAD_STRINGS):
    """Flax's canonicalize_padding: a padding string, or one (low, high) pair per axis."""
    if isinstance(padding, str):
        if padding not in strings:
            raise ValueError(f"{op}: padding={padding!r} is not one of "
                             f"{', '.join(map(repr, strings))} or explicit (low, high) pairs")
        return padding
    if isinstance(padding, (int, np.integer)):
        return [(int(padding), int(padding))] * nd
    try:
        items = list(padding)
    except TypeError:
        items = None
    if items is not None and len(items) == nd:
        pairs = []
        for p in items:
            if isinstance(p, (int, np.integer)):
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


def _full_float32(op: str, precision) -> bool:
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
    if _full_float32(op, precision):
        return jax.default_matmul_precision("float32")
    return contextlib.nullcontext()


# ---- convolution -------------------------------------------------------------------------

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
    if (not isinstance(feature_group_count, (int, np.integer)) or feature_group_count < 1
            or in_features % feature_group_count):
        raise ValueError(f"{op}: feature_group_count={feature_group_count!r} must be a positive "
                         f"int dividing the {in_features} input features")
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


def _kernel_and_bias(op: str, module: nn.Module, inputs, kernel_shape):
    """(inputs, kernel, bias) of a linen Conv/ConvTranspose: its params (declared here, in
    the module's scope), the weight mask applied, the module's dtype promotion done."""
    if module.mask is not None and module.mask.shape != kernel_shape:
        raise ValueError(f"{op}: mask must have the kernel's shape {kernel_shape}; got "
                         f"{module.mask.shape}")
    kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
    if module.mask is not None:
        kernel = kernel * module.mask
    bias = (module.param("bias", module.bias_init, (module.features,), module.param_dtype)
            if module.use_bias else None)
    return module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)


class Conv(nn.Module):
    """`flax.linen.Conv` on cuDNN (`dnn_conv`): channels-last inputs
    (*batch, spatial..., features), 1-D, 2-D or 3-D by len(kernel_size), the kernel param
    stored as Flax stores it, (*kernel_size, in_features // feature_group_count, features).

    Attributes as Flax's: features, kernel_size, strides, padding ('SAME', 'VALID',
    'CIRCULAR', 'REFLECT', 'CAUSAL', an int, or per-axis ints / (low, high) pairs),
    input_dilation (only 1: cuDNN has none), kernel_dilation, feature_group_count,
    use_bias, mask, dtype, param_dtype, precision (above DEFAULT: no TF32), kernel_init,
    bias_init, promote_dtype, preferred_element_type.
    """
    features: int
    kernel_size: int | Sequence[int]
    strides: None | int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    input_dilation: None | int | Sequence[int] = 1
    kernel_dilation: None | int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    mask: Array | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = initializers.zeros_init()
    promote_dtype: Callable = linen_dtypes.promote_dtype
    preferred_element_type: Any = None

    @nn.compact
    def __call__(self, inputs):
        kernel_size = _kernel_size("Conv", self.kernel_size)
        in_features = inputs.shape[-1]
        if (not isinstance(self.feature_group_count, (int, np.integer))
                or self.feature_group_count < 1 or in_features % self.feature_group_count):
            raise ValueError(f"Conv: feature_group_count={self.feature_group_count!r} must be a "
                             f"positive int dividing the {in_features} input features")
        kernel_shape = kernel_size + (in_features // self.feature_group_count, self.features)
        inputs, kernel, bias = _kernel_and_bias("Conv", self, inputs, kernel_shape)
        return conv_apply(inputs, kernel, bias, strides=self.strides, padding=self.padding,
                          input_dilation=self.input_dilation,
                          kernel_dilation=self.kernel_dilation,
                          feature_group_count=self.feature_group_count,
                          precision=self.precision,
                          preferred_element_type=self.preferred_element_type)


class ConvTranspose(nn.Module):
    """`flax.linen.ConvTranspose` (`lax.conv_transpose`) on cuDNN's backward-data pass
    (`dnn_gradinput`): channels-last inputs, kernel param (*kernel_size, in_features,
    features), or (*kernel_size, features, in_features) with transpose_kernel=True (then
    the layer is the gradient of a `Conv` with that kernel).

    Attributes as Flax's: features, kernel_size, strides, padding ('SAME', 'VALID',
    'CIRCULAR', an int or (low, high) pairs: explicit padding is that of the
    input-dilated convolution, as in lax), kernel_dilation, use_bias, mask, dtype,
    param_dtype, precision, kernel_init, bias_init, transpose_kernel, promote_dtype,
    preferred_element_type.
    """
    features: int
    kernel_size: int | Sequence[int]
    strides: Sequence[int] | None = None
    padding: PaddingLike = "SAME"
    kernel_dilation: Sequence[int] | None = None
    use_bias: bool = True
    mask: Array | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = initializers.zeros_init()
    transpose_kernel: bool = False
    promote_dtype: Callable = linen_dtypes.promote_dtype
    preferred_element_type: Any = None

    @nn.compact
    def __call__(self, inputs):
        kernel_size = _kernel_size("ConvTranspose", self.kernel_size)
        in_features = inputs.shape[-1]
        kernel_shape = kernel_size + ((self.features, in_features) if self.transpose_kernel
                                      else (in_features, self.features))
        inputs, kernel, bias = _kernel_and_bias("ConvTranspose", self, inputs, kernel_shape)
        return conv_transpose_apply(inputs, kernel, bias, strides=self.strides,
                                    padding=self.padding, kernel_dilation=self.kernel_dilation,
                                    transpose_kernel=self.transpose_kernel,
                                    precision=self.precision,
                                    preferred_element_type=self.preferred_element_type)


# ---- batch normalization -------------------------------------------------------------------

def _feature_axes(op: str, ndim: int, axis) -> tuple[int, ...]:
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
    feature_axes = _feature_axes(op, x.ndim, axis)
    features = tuple(x.shape[a] for a in feature_axes)
    out_dtype = linen_dtypes.canonicalize_dtype(
        *[a for a in (x, scale, bias) if a is not None], dtype=dtype)
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


class BatchNorm(nn.Module):
    """`flax.linen.BatchNorm` on cuDNN: the same attributes, the params 'scale' and 'bias'
    and the 'batch_stats' variables 'mean' and 'var', updated as Flax updates them
    (ra = momentum * ra + (1 - momentum) * batch statistic, biased variance; not during
    initialization). epsilon must be >= 1e-5 (cuDNN). axis_name (under shard_map or pmap)
    takes the statistics over every device of the mapped axes, as Flax does; under jit
    with a sharded batch they are the whole batch's without it. axis_index_groups and
    __call__'s mask are not supported and raise.
    use_fast_variance is accepted: cuDNN computes the variance its own (stable) way.
    """
    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = initializers.zeros
    scale_init: Callable = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        check_batch_norm_options("BatchNorm", epsilon=self.epsilon, axis_name=self.axis_name,
                                 axis_index_groups=self.axis_index_groups, mask=mask)
        feature_axes = _feature_axes("BatchNorm", x.ndim, self.axis)
        feature_shape = [x.shape[a] for a in feature_axes]
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable("batch_stats", "mean",
                                lambda s: jnp.zeros(s, stats_dtype), feature_shape)
        ra_var = self.variable("batch_stats", "var",
                               lambda s: jnp.ones(s, stats_dtype), feature_shape)
        scale = (self.param("scale", self.scale_init, feature_shape, self.param_dtype)
                 if self.use_scale else None)
        bias = (self.param("bias", self.bias_init, feature_shape, self.param_dtype)
                if self.use_bias else None)
        if not self.force_float32_reductions:
            scale = None if scale is None else jnp.asarray(scale, self.param_dtype)
            bias = None if bias is None else jnp.asarray(bias, self.param_dtype)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
            if not self.force_float32_reductions:
                mean = jnp.asarray(mean, self.param_dtype)
                var = jnp.asarray(var, self.param_dtype)
            y, _, _ = batch_norm_apply(x, scale, bias, axis=feature_axes, epsilon=self.epsilon,
                                       mean=mean, var=var, dtype=self.dtype)
            return y
        y, mean, var = batch_norm_apply(x, scale, bias, axis=feature_axes, epsilon=self.epsilon,
                                        dtype=self.dtype, axis_name=self.axis_name)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


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


class SpatialTransformer(nn.Module):
    """An affine spatial transformer (Jaderberg et al.) on cuDNN: `localization` maps the
    (N, H, W, C) inputs to 6 numbers per image, theta (N, 2, 3) in normalized coordinates
    ([-1, 1], -1 and 1 the centres of the corner pixels); the inputs are sampled
    bilinearly (zeros outside) on theta's grid of out_size (H_out, W_out), default (H, W).

    Starting at the identity is the localization network's job: give its last layer a
    zero kernel and `identity_affine_init` as bias init, e.g.
    `nn.Dense(6, kernel_init=nn.initializers.zeros, bias_init=identity_affine_init)`.
    """
    localization: nn.Module
    out_size: Sequence[int] | None = None

    @nn.compact
    def __call__(self, inputs):
        theta = self.localization(inputs)
        return spatial_transform_apply(inputs, theta, self.out_size)


# The recurrent modules (one cuDNN parameter block each) live in their own file.
from jaxdnn.flax.recurrent import GRU, LSTM, SimpleRNN, from_flax_cells, to_flax_cells  # noqa: E402

__all__ += ["LSTM", "GRU", "SimpleRNN", "from_flax_cells", "to_flax_cells"]
