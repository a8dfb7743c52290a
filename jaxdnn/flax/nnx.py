"""Flax NNX modules over jaxdnn's ops: `Conv`, `ConvTranspose`, `BatchNorm`,
`SpatialTransformer`, the recurrent `LSTM`, `GRU` and `SimpleRNN` (and `max_pool`/
`avg_pool`, which NNX shares with linen).

Drop-in replacements for `flax.nnx.Conv`, `flax.nnx.ConvTranspose` and `flax.nnx.BatchNorm`:
the same constructor arguments and defaults (in_features, out_features, kernel_size, ...,
rngs), the same `nnx.Param`s (kernel stored HWIO, bias) and `nnx.BatchStat`s (mean, var),
drawn from `rngs` in the same order, so the same seed gives the same parameters and
`nnx.state` round-trips with Flax's modules. The arithmetic is the functional core of
`jaxdnn.flax` (`conv_apply`, `conv_transpose_apply`, `batch_norm_apply`,
`spatial_transform_apply`), shared with the linen modules; see that module for how each
maps onto cuDNN and for the Flax options that are not supported. The recurrent modules
hold one cuDNN parameter block (`nnx.Param` 'weights') and compute what the linen ones do
(jaxdnn/flax/recurrent.py), taking `in_features` as NNX modules do; their `dropout`
between layers follows `flax.nnx.Dropout` (`deterministic`, `model.train()` /
`model.eval()`, keys from the `rngs` stream 'dropout').
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn import initializers
from jax import lax

from jaxdnn._functional import (avg_pool, batch_norm_apply, check_batch_norm_options,
                                check_feature_groups, check_kernel_size, conv_apply,
                                conv_transpose_apply, identity_affine_init, max_pool,
                                module_settings, spatial_transform_apply)
from jaxdnn.flax.recurrent import (check_dropout, dropout_acts, initial_weights,
                                   recurrent_apply)

__all__ = ["Conv", "ConvTranspose", "BatchNorm", "SpatialTransformer", "LSTM", "GRU",
           "SimpleRNN", "max_pool", "avg_pool",
           "identity_affine_init"]

default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()
NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _check_flax_only(op: str, arg: str, value, allowed=(None,)) -> None:
    """Options of Flax's modules that only make sense for XLA's own convolution."""
    if not any(value is a for a in allowed):
        raise ValueError(f"{op}: {arg}={value!r} is not supported (jaxdnn computes the "
                         "convolution with cuDNN)")


def _kernel_and_bias(op: str, module, kernel_shape, out_features, *, use_bias, kernel_init,
                     bias_init, param_dtype, rngs, kernel_metadata, bias_metadata) -> None:
    """Flax's params, drawn from rngs in Flax's order (kernel, then bias)."""
    module.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, param_dtype),
                              **kernel_metadata)
    if use_bias:
        module.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype),
                                **bias_metadata)
    else:
        module.bias = nnx.data(None)


def _masked_promoted(op: str, module, inputs):
    """(inputs, kernel, bias) after the weight mask and the module's dtype promotion."""
    if module.mask is not None and module.mask.shape != module.kernel_shape:
        raise ValueError(f"{op}: mask must have the kernel's shape {module.kernel_shape}; got "
                         f"{module.mask.shape}")
    kernel = module.kernel[...]
    if module.mask is not None:
        kernel = kernel * module.mask
    bias = module.bias[...] if module.bias is not None else None
    return module.promote_dtype((inputs, kernel, bias), dtype=module.dtype)


class Conv(nnx.Module):
    """`flax.nnx.Conv` on cuDNN (`dnn_conv`, cross-correlation, channels-last): the same
    arguments; kernel (*kernel_size, in_features // feature_group_count, out_features).
    input_dilation must be 1; conv_general_dilated only lax's (cuDNN computes it);
    precision above DEFAULT forbids TF32."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: None | int | Sequence[int] = 1, *, padding: Any = "SAME",
                 input_dilation: None | int | Sequence[int] = 1,
                 kernel_dilation: None | int | Sequence[int] = 1, feature_group_count: int = 1,
                 use_bias: bool = True, mask: jax.Array | None = None, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Callable = default_kernel_init,
                 bias_init: Callable = default_bias_init,
                 conv_general_dilated: Callable | None = lax.conv_general_dilated,
                 promote_dtype: Callable = nnx_dtypes.promote_dtype,
                 preferred_element_type: Any = None, rngs: nnx.Rngs,
                 kernel_metadata: Mapping[str, Any] = NO_METADATA,
                 bias_metadata: Mapping[str, Any] = NO_METADATA):
        _check_flax_only("Conv", "conv_general_dilated", conv_general_dilated,
                         (None, lax.conv_general_dilated))
        kernel_size = check_kernel_size("Conv", kernel_size)
        groups = check_feature_groups("Conv", feature_group_count, in_features)
        self.kernel_shape = kernel_size + (in_features // groups, out_features)
        _kernel_and_bias("Conv", self, self.kernel_shape, out_features, use_bias=use_bias,
                         kernel_init=kernel_init, bias_init=bias_init, param_dtype=param_dtype,
                         rngs=rngs, kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.input_dilation = input_dilation
        self.kernel_dilation = kernel_dilation
        self.feature_group_count = feature_group_count
        self.use_bias = use_bias
        self.mask = mask
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type

    def __call__(self, inputs, out_sharding=None):
        _check_flax_only("Conv", "out_sharding", out_sharding)
        inputs, kernel, bias = _masked_promoted("Conv", self, inputs)
        return conv_apply(inputs, kernel, bias, **module_settings(self, conv_apply))


class ConvTranspose(nnx.Module):
    """`flax.nnx.ConvTranspose` (`lax.conv_transpose`) on cuDNN's backward-data pass
    (`dnn_gradinput`): the same arguments; kernel (*kernel_size, in_features,
    out_features), or (*kernel_size, out_features, in_features) with transpose_kernel."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] | None = None, *, padding: Any = "SAME",
                 kernel_dilation: int | Sequence[int] | None = None, use_bias: bool = True,
                 mask: jax.Array | None = None, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Callable = default_kernel_init,
                 bias_init: Callable = default_bias_init, transpose_kernel: bool = False,
                 promote_dtype: Callable = nnx_dtypes.promote_dtype,
                 preferred_element_type: Any = None, rngs: nnx.Rngs,
                 kernel_metadata: Mapping[str, Any] = NO_METADATA,
                 bias_metadata: Mapping[str, Any] = NO_METADATA):
        kernel_size = check_kernel_size("ConvTranspose", kernel_size)
        self.kernel_shape = kernel_size + ((out_features, in_features) if transpose_kernel
                                           else (in_features, out_features))
        _kernel_and_bias("ConvTranspose", self, self.kernel_shape, out_features,
                         use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init,
                         param_dtype=param_dtype, rngs=rngs, kernel_metadata=kernel_metadata,
                         bias_metadata=bias_metadata)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.kernel_dilation = kernel_dilation
        self.use_bias = use_bias
        self.mask = mask
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.transpose_kernel = transpose_kernel
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type

    def __call__(self, inputs):
        inputs, kernel, bias = _masked_promoted("ConvTranspose", self, inputs)
        return conv_transpose_apply(inputs, kernel, bias,
                                    **module_settings(self, conv_transpose_apply))


class BatchNorm(nnx.Module):
    """`flax.nnx.BatchNorm` on cuDNN: the same arguments, `nnx.Param`s scale and bias,
    `nnx.BatchStat`s mean and var updated as Flax updates them (momentum, biased batch
    variance) whenever use_running_average is False. epsilon >= 1e-5 (cuDNN); axis_name
    takes the statistics over every device of the mapped axes (shard_map, pmap), as
    Flax's; axis_index_groups and __call__'s mask raise."""

    def __init__(self, num_features: int, *, use_running_average: bool | None = False,
                 axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-5,
                 dtype: Any = None, param_dtype: Any = jnp.float32, use_bias: bool = True,
                 use_scale: bool = True, bias_init: Callable = initializers.zeros_init(),
                 scale_init: Callable = initializers.ones_init(), axis_name: str | None = None,
                 axis_index_groups: Any = None, use_fast_variance: bool = True,
                 promote_dtype: Callable = nnx_dtypes.promote_dtype, rngs: nnx.Rngs,
                 bias_metadata: Mapping[str, Any] = NO_METADATA,
                 scale_metadata: Mapping[str, Any] = NO_METADATA):
        check_batch_norm_options("BatchNorm", epsilon=epsilon, axis_name=axis_name,
                                 axis_index_groups=axis_index_groups)
        feature_shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        # Flax's order of rngs.params() draws: scale, then bias.
        self.scale = (nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype),
                                **scale_metadata) if use_scale else nnx.data(None))
        self.bias = (nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype),
                               **bias_metadata) if use_bias else nnx.data(None))
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_running_average = (self.use_running_average if use_running_average is None
                               else use_running_average)
        if use_running_average is None:
            raise ValueError("BatchNorm: use_running_average was given neither to the "
                             "constructor nor to the call")
        check_batch_norm_options("BatchNorm", epsilon=self.epsilon, mask=mask)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        # Flax NNX promotes the input, the statistics and the params to one dtype first.
        x, ra_mean, ra_var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
        if use_running_average:
            y, _, _ = batch_norm_apply(x, scale, bias, axis=self.axis, epsilon=self.epsilon,
                                       mean=ra_mean, var=ra_var, dtype=self.dtype)
            return y
        y, mean, var = batch_norm_apply(x, scale, bias, axis=self.axis, epsilon=self.epsilon,
                                        dtype=self.dtype, axis_name=self.axis_name)
        # As Flax: no gradient through the running averages of variables it can update in
        # place (the usual case; not, e.g., from another trace level).
        can_update = (getattr(self.mean, "_can_update", False)
                      or getattr(self.var, "_can_update", False))
        stop = jax.lax.stop_gradient if can_update else (lambda v: v)
        self.mean[...] = stop(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
        self.var[...] = stop(self.momentum * self.var[...] + (1 - self.momentum) * var)
        return y

    def set_view(self, use_running_average: bool | None = None):
        """For `nnx.view`, as Flax's BatchNorm."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class SpatialTransformer(nnx.Module):
    """An affine spatial transformer on cuDNN (`dnn_spatialtf`): `localization` (an NNX
    module) maps the (N, H, W, C) inputs to 6 numbers per image, theta (N, 2, 3); the
    inputs are sampled bilinearly on theta's grid of out_size (H_out, W_out), default
    (H, W). Starting at the identity is the localization network's job, e.g. a last layer
    `nnx.Linear(..., 6, kernel_init=nnx.initializers.zeros, bias_init=identity_affine_init)`.
    """

    def __init__(self, localization: nnx.Module, out_size: Sequence[int] | None = None):
        self.localization = localization
        self.out_size = None if out_size is None else tuple(out_size)

    def __call__(self, inputs):
        return spatial_transform_apply(inputs, self.localization(inputs), self.out_size)


class _Recurrent(nnx.Module):
    """The shared body of the NNX LSTM, GRU and SimpleRNN: a multi-layer (optionally
    bidirectional) network on cuDNN's RNN, its parameters one block `weights` (cuDNN's
    layout; jaxdnn.flax.from_flax_cells / to_flax_cells convert from and to Flax's cells).
    Inputs (N, T, in_features), or (T, N, in_features) with time_major; the carry is that
    of every layer, (c, h) for LSTM, h otherwise, each (num_layers * directions, N,
    hidden_size). proj_size (LSTM only; 0 = none): h and the outputs have proj_size
    features per direction (PyTorch's `nn.LSTM(proj_size=...)`, cuDNN's projSize).

    dropout: the rate in [0, 1) at which units of every layer's output but the last one's
    are zeroed in training (PyTorch's `nn.LSTM(dropout=p)`; `RNNBlock.apply`), with
    `flax.nnx.Dropout`'s `deterministic` (False: training; `model.eval()` sets True,
    `model.train()` False; the call's argument overrides it) and keys from
    `rngs[rng_collection]` (forked at construction, or the call's `rngs`: an nnx.Rngs,
    an RngStream or a key)."""

    _mode = "lstm"

    def __init__(self, in_features: int, hidden_size: int, num_layers: int = 1, *,
                 bidirectional: bool = False, time_major: bool = False,
                 return_carry: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, proj_size: int = 0, dropout: float = 0.0,
                 deterministic: bool | None = False, rng_collection: str = "dropout"):
        self.in_features, self.hidden_size, self.num_layers = in_features, hidden_size, num_layers
        self.proj_size = proj_size
        self.bidirectional, self.time_major, self.return_carry = (bidirectional, time_major,
                                                                  return_carry)
        self.dtype = dtype
        self.weights = nnx.Param(initial_weights(
            self._rnn_mode(), rngs.params(), hidden_size=hidden_size, num_layers=num_layers,
            bidirectional=bidirectional, input_dim=in_features, dtype=dtype,
            param_dtype=param_dtype, proj_size=proj_size))
        self.dropout = check_dropout(type(self).__name__, dropout, num_layers)
        self.deterministic, self.rng_collection = deterministic, rng_collection
        # As flax.nnx.Dropout: a stream of its own, forked after the parameters are drawn
        # (so a dropout-free module draws exactly what it drew before dropout existed).
        self.rngs = (rngs[rng_collection].fork() if dropout_acts(self.dropout, num_layers)
                     else nnx.data(None))

    def _rnn_mode(self) -> str:
        return self._mode

    def __call__(self, inputs, initial_carry=None, seq_lengths=None, *,
                 deterministic: bool | None = None, rngs=None):
        """deterministic (overrides the attribute) and rngs (overrides the stream kept at
        construction) as flax.nnx.Dropout's."""
        op = type(self).__name__
        if inputs.ndim == 3 and inputs.shape[-1] != self.in_features:
            raise ValueError(f"{op}: inputs have {inputs.shape[-1]} features; the module was "
                             f"built for in_features={self.in_features}")
        return recurrent_apply(self._rnn_mode(), self.weights[...], inputs, initial_carry,
                               seq_lengths, hidden_size=self.hidden_size,
                               num_layers=self.num_layers, bidirectional=self.bidirectional,
                               time_major=self.time_major, return_carry=self.return_carry,
                               dtype=self.dtype, op=op, proj_size=self.proj_size,
                               dropout=self.dropout,
                               dropout_key=self._dropout_key(op, deterministic, rngs))

    def _dropout_key(self, op: str, deterministic, rngs):
        """The key of this call's masks, None when dropout does not act (as
        flax.nnx.Dropout decides it)."""
        if not dropout_acts(self.dropout, self.num_layers):
            return None
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic is None:
            raise ValueError(f"{op}: dropout={self.dropout} needs deterministic, given to the "
                             "constructor or to the call (or set by model.train() / "
                             "model.eval())")
        if deterministic:
            return None
        rngs = self.rngs if rngs is None else rngs
        if isinstance(rngs, nnx.Rngs):
            return rngs[self.rng_collection]()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        if isinstance(rngs, jax.Array):
            return rngs
        raise TypeError(f"{op}: rngs must be an nnx.Rngs, an nnx.RngStream or a key for "
                        f"dropout; got {type(rngs).__name__}")

    def set_view(self, deterministic: bool | None = None):
        """For `nnx.view`, as flax.nnx.Dropout's."""
        if deterministic is not None:
            self.deterministic = deterministic


class LSTM(_Recurrent):
    """Multi-layer LSTM on cuDNN (Flax's `OptimizedLSTMCell` math); carry (c, h)."""
    _mode = "lstm"


class GRU(_Recurrent):
    """Multi-layer GRU on cuDNN (cuDNN's reset-after GRU, Flax's `GRUCell` math); carry h."""
    _mode = "gru"


class SimpleRNN(_Recurrent):
    """Multi-layer Elman RNN on cuDNN (Flax's `SimpleCell`); activation 'tanh' or 'relu'."""

    def __init__(self, in_features: int, hidden_size: int, num_layers: int = 1, *,
                 activation: str = "tanh", **kwargs):
        if activation not in ("tanh", "relu"):
            raise ValueError(f"SimpleRNN: activation={activation!r}; cuDNN's cells take "
                             "'tanh' or 'relu'")
        self.activation = activation
        super().__init__(in_features, hidden_size, num_layers, **kwargs)

    def _rnn_mode(self) -> str:
        return "rnn_" + self.activation
