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
`pool_apply`, `spatial_transform_apply`, in `jaxdnn/_functional.py`, which `jaxdnn.nn`
shares) takes arrays and static options and is what the linen modules here and the NNX
modules of `jaxdnn.flax.nnx` call.

Not matched: `input_dilation` != 1 (raises; use `ConvTranspose`), `axis_index_groups` /
`mask` of `BatchNorm` (raise: grouped-device and masked statistics),
`epsilon` < 1e-5 (cuDNN's minimum; raises), `ConvLocal`, and linen Conv's deprecated
`conv_general_dilated` hooks. `precision` maps onto cuDNN's math mode: anything above
`lax.Precision.DEFAULT` forbids TF32 for float32 data (as XLA's GPU convolutions do);
cuDNN has no bf16_3x, so HIGH and HIGHEST are both full float32 (dot-algorithm presets
raise). `preferred_element_type` convolves the operands widened to that type.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

try:
    import flax  # noqa: F401  (an optional dependency: the `flax` extra)
except ImportError as e:
    raise ImportError("jaxdnn.flax needs Flax, an optional dependency of jaxdnn: "
                      "pip install 'jaxdnn[flax]'") from e
import flax.linen as nn
import jax.numpy as jnp
from flax.linen import dtypes as linen_dtypes
from flax.linen import initializers

from jaxdnn._functional import (Array, PaddingLike, avg_pool, batch_norm_apply,
                                check_batch_norm_options, check_feature_groups, check_kernel_size,
                                conv_apply, conv_transpose_apply, feature_axes_of,
                                identity_affine_init, max_pool, module_settings, pool_apply,
                                spatial_transform_apply)

__all__ = ["Conv", "ConvTranspose", "BatchNorm", "max_pool", "avg_pool", "SpatialTransformer",
           "identity_affine_init", "conv_apply", "conv_transpose_apply", "batch_norm_apply",
           "pool_apply", "spatial_transform_apply"]

# Flax's own defaults, so that an unchanged module definition initializes the same numbers.
default_kernel_init = initializers.lecun_normal()


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
        kernel_size = check_kernel_size("Conv", self.kernel_size)
        in_features = inputs.shape[-1]
        groups = check_feature_groups("Conv", self.feature_group_count, in_features)
        kernel_shape = kernel_size + (in_features // groups, self.features)
        inputs, kernel, bias = _kernel_and_bias("Conv", self, inputs, kernel_shape)
        return conv_apply(inputs, kernel, bias, **module_settings(self, conv_apply))


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
        kernel_size = check_kernel_size("ConvTranspose", self.kernel_size)
        in_features = inputs.shape[-1]
        kernel_shape = kernel_size + ((self.features, in_features) if self.transpose_kernel
                                      else (in_features, self.features))
        inputs, kernel, bias = _kernel_and_bias("ConvTranspose", self, inputs, kernel_shape)
        return conv_transpose_apply(inputs, kernel, bias,
                                    **module_settings(self, conv_transpose_apply))


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
        feature_axes = feature_axes_of("BatchNorm", x.ndim, self.axis)
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
