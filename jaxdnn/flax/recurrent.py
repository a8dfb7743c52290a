"""Multi-layer recurrent Flax (linen) modules over `jaxdnn.RNNBlock`: `LSTM`, `GRU` and
`SimpleRNN`, each holding one cuDNN parameter block (the param 'weights', laid out as
cuDNN lays out its weight space) instead of one Flax cell per layer.

They compute what Flax's `nn.RNN` over `nn.OptimizedLSTMCell` / `nn.GRUCell` /
`nn.SimpleCell` computes (stacked, and `nn.Bidirectional` with concatenated outputs for
`bidirectional=True`): batch-major inputs (N, T, features) by default, `time_major=True`
for (T, N, features); `seq_lengths` for right-padded batches; `return_carry=True` returns
`(carry, outputs)`. The carry is the state of every layer at once: `(c, h)` for LSTM, `h`
otherwise, each (num_layers * directions, N, hidden_size), layer index = 2 * depth +
direction, as cuDNN orders them. `proj_size` (LSTM only; 0 = none) projects each layer's
hidden state to proj_size features, as PyTorch's `nn.LSTM(proj_size=...)` (cuDNN's
projSize): h and the outputs then have proj_size features per direction, c keeps
hidden_size.

`from_flax_cells` and `to_flax_cells` convert between the block and Flax's own cell
parameters (one cell dict per layer and direction, in the same order): cuDNN keeps two
biases per gate where Flax keeps one, so converting to Flax adds them (the function is
unchanged) and converting from Flax puts Flax's bias on the side Flax has it.

`dropout` (a rate in [0, 1)) drops units of every layer's output but the last one's, as
PyTorch's `nn.LSTM(dropout=p)` (`RNNBlock.apply`'s `dropout_key`): in training only,
`deterministic=False`, like `flax.linen.Dropout`: the key comes from the rng stream
`rng_collection` ('dropout': `module.apply(..., rngs={'dropout': key})`) through
`make_rng`, and `deterministic` is the attribute or the call's argument (exactly one of
them must say it when dropout acts, i.e. dropout > 0 and num_layers > 1).
"""
from __future__ import annotations

import warnings
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdnn import _validate
from jaxdnn.rnn import RNNBlock

__all__ = ["LSTM", "GRU", "SimpleRNN", "from_flax_cells", "to_flax_cells"]

# Per cell type, in cuDNN's (and Theano's) gate order: the Flax dense name of each gate's
# input and recurrent matrix, and which of the two carries Flax's bias ('i', 'h', or
# 'both' for GRU's candidate gate, whose recurrent bias sits inside the reset product).
_FLAX_GATES = {
    "lstm": [("ii", "hi", "h"), ("if", "hf", "h"), ("ig", "hg", "h"), ("io", "ho", "h")],
    "gru": [("ir", "hr", "i"), ("iz", "hz", "i"), ("in", "hn", "both")],
    "rnn_tanh": [("i", "h", "i")],
    "rnn_relu": [("i", "h", "i")],
}


def _block(rnn_mode: str, hidden_size: int, num_layers: int, bidirectional: bool,
           dtype, proj_size: int = 0, dropout: float = 0.0) -> RNNBlock:
    return RNNBlock(dtype, hidden_size, num_layers, rnn_mode,
                    direction_mode="bidirectional" if bidirectional else "unidirectional",
                    proj_size=proj_size, dropout=dropout)


def check_dropout(op: str, dropout, num_layers: int) -> float:
    """The dropout rate, checked as RNNBlock checks it, errors naming the module; a
    warning (as RNNBlock's, and PyTorch's) where one layer leaves it nothing to do."""
    dropout = _validate.dropout_rate(op, dropout)
    if dropout and num_layers == 1:
        warnings.warn(f"{op}: dropout={dropout} does nothing with num_layers=1 (dropout "
                      "acts between layers, after every layer but the last)", stacklevel=3)
    return dropout


def dropout_acts(dropout: float, num_layers: int) -> bool:
    """Whether dropout changes anything: it acts between layers only."""
    return bool(dropout) and num_layers > 1


def from_flax_cells(rnn_mode: str, cells: Sequence[dict], *, hidden_size: int, num_layers: int,
                    input_dim: int, bidirectional: bool = False, dtype=jnp.float32):
    """The parameter block of `rnn_mode` ('lstm', 'gru', 'rnn_tanh', 'rnn_relu') from Flax
    cell parameters: `cells[layer]` is one `OptimizedLSTMCell` / `GRUCell` / `SimpleCell`
    params dict ({'ii': {'kernel': ...}, 'hi': {'kernel': ..., 'bias': ...}, ...}), layer
    = 2 * depth + direction for bidirectional blocks."""
    block = _block(rnn_mode, hidden_size, num_layers, bidirectional, dtype)
    gates = _FLAX_GATES[rnn_mode]
    zeros = jnp.zeros((hidden_size,), dtype)
    layers = []
    for cell in cells:
        inputs, recurrents = [], []
        for input_name, recurrent_name, bias_side in gates:
            input_bias = cell[input_name].get("bias", zeros) if bias_side != "h" else zeros
            recurrent_bias = (cell[recurrent_name].get("bias", zeros) if bias_side != "i"
                              else zeros)
            inputs += [cell[input_name]["kernel"], input_bias]
            recurrents += [cell[recurrent_name]["kernel"], recurrent_bias]
        layers.append(inputs + recurrents)
    return block.merge_params(layers, (1, input_dim))


def to_flax_cells(rnn_mode: str, weights, *, hidden_size: int, num_layers: int, input_dim: int,
                  bidirectional: bool = False) -> list[dict]:
    """Flax cell parameters (the inverse of `from_flax_cells`), one dict per layer and
    direction. cuDNN's two biases of a gate become Flax's one (their sum), except GRU's
    candidate gate, which keeps both as Flax does."""
    block = _block(rnn_mode, hidden_size, num_layers, bidirectional, weights.dtype)
    gates = _FLAX_GATES[rnn_mode]
    cells = []
    for layer in range(num_layers * (2 if bidirectional else 1)):
        entries = block.split_params(weights, layer, (1, input_dim))
        half = len(entries) // 2
        cell = {}
        for g, (input_name, recurrent_name, bias_side) in enumerate(gates):
            w_in, b_in = entries[2 * g], entries[2 * g + 1]
            w_rec, b_rec = entries[half + 2 * g], entries[half + 2 * g + 1]
            cell[input_name] = {"kernel": w_in}
            cell[recurrent_name] = {"kernel": w_rec}
            if bias_side == "i":
                cell[input_name]["bias"] = b_in + b_rec
            elif bias_side == "h":
                cell[recurrent_name]["bias"] = b_in + b_rec
            else:
                cell[input_name]["bias"], cell[recurrent_name]["bias"] = b_in, b_rec
        cells.append(cell)
    return cells


def recurrent_apply(mode: str, weights, inputs, initial_carry=None, seq_lengths=None, *,
                    hidden_size: int, num_layers: int, bidirectional: bool, time_major: bool,
                    return_carry: bool, dtype, op: str, proj_size: int = 0,
                    dropout: float = 0.0, dropout_key=None):
    """The computation of the recurrent modules (linen and NNX): the block `weights` of
    `mode` applied to inputs (N, T, F) (or (T, N, F) when time_major), the carry as Flax
    keeps it ((c, h) for lstm, h otherwise; zeros by default; h of proj_size features
    with a projection). A `dropout_key` turns `dropout` on (RNNBlock.apply)."""
    if inputs.ndim != 3:
        raise ValueError(f"{op}: inputs must be 3-D, (batch, time, features) (or (time, "
                         f"batch, features) with time_major=True); got shape {inputs.shape}")
    x = inputs if time_major else jnp.swapaxes(inputs, 0, 1)
    batch = x.shape[1]
    # (checked, and warned about, by the modules)
    block = _block(mode, hidden_size, num_layers, bidirectional, dtype, proj_size,
                   dropout if dropout_acts(dropout, num_layers) else 0.0)
    states = (num_layers * (2 if bidirectional else 1), batch, hidden_size)
    if initial_carry is None:
        zeros = jnp.zeros(states, dtype)
        h0 = jnp.zeros(states[:2] + (proj_size or hidden_size,), dtype)
        initial_carry = (zeros, h0) if mode == "lstm" else zeros
    valid = None
    if seq_lengths is not None and not bidirectional and not return_carry:
        # Only the outputs are wanted, and a one-way network's output at a step depends on
        # the steps before it alone: running every sequence to the end and zeroing what
        # lies past each end gives the same outputs and gradients, without the host copy
        # of the lengths that cuDNN's variable-length calls need (jaxdnn/rnn.py). With
        # dropout too: the masks have the same shape either way, and what a padded step
        # gives (masked or not) reaches only later, padded, steps.
        valid = jnp.arange(x.shape[0])[:, None, None] < jnp.asarray(seq_lengths)[None, :, None]
        seq_lengths = None
    if mode == "lstm":
        c0, h0 = initial_carry
        y, hy, cy = block.apply(weights.astype(dtype), x.astype(dtype), h0, c0,
                                seq_lengths=seq_lengths, dropout_key=dropout_key)
        carry = (cy, hy)
    else:
        y, carry = block.apply(weights.astype(dtype), x.astype(dtype), initial_carry,
                               seq_lengths=seq_lengths, dropout_key=dropout_key)
    if valid is not None:
        y = jnp.where(valid, y, jnp.zeros((), y.dtype))
    outputs = y if time_major else jnp.swapaxes(y, 0, 1)
    return (carry, outputs) if return_carry else outputs


def initial_weights(mode: str, key, *, hidden_size: int, num_layers: int, bidirectional: bool,
                    input_dim: int, dtype, param_dtype, proj_size: int = 0):
    """A fresh block (RNNBlock.init_params) for inputs of `input_dim` features."""
    block = _block(mode, hidden_size, num_layers, bidirectional, dtype, proj_size)
    return block.init_params(key, (1, input_dim)).astype(param_dtype)


class _Recurrent(nn.Module):
    """The shared body of LSTM, GRU and SimpleRNN (`_mode` picks the cell)."""
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    time_major: bool = False
    return_carry: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    proj_size: int = 0  # LSTM only: h's and the outputs' features per direction; 0 = none
    # Dropout between layers (the module docstring); as flax.linen.Dropout's fields.
    dropout: float = 0.0
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    _mode: ClassVar[str] = "lstm"

    def _rnn_mode(self) -> str:
        return self._mode

    @nn.compact
    def __call__(self, inputs, initial_carry=None, seq_lengths=None, *,
                 deterministic: bool | None = None):
        """deterministic: whether dropout is off (evaluation), given here or as the
        attribute (one of the two, as flax.linen.Dropout's: nn.merge_param)."""
        mode = self._rnn_mode()
        op = type(self).__name__
        dropout = check_dropout(op, self.dropout, self.num_layers)
        config = dict(hidden_size=self.hidden_size, num_layers=self.num_layers,
                      bidirectional=self.bidirectional, proj_size=self.proj_size)
        weights = self.param("weights", lambda key: initial_weights(
            mode, key, **config, input_dim=inputs.shape[-1], dtype=self.dtype,
            param_dtype=self.param_dtype))
        dropout_key = None
        if dropout_acts(dropout, self.num_layers) and not nn.merge_param(
                "deterministic", self.deterministic, deterministic):
            dropout_key = self.make_rng(self.rng_collection)
        return recurrent_apply(mode, weights, inputs, initial_carry, seq_lengths, **config,
                               time_major=self.time_major, return_carry=self.return_carry,
                               dtype=self.dtype, op=op, dropout=dropout,
                               dropout_key=dropout_key)


class LSTM(_Recurrent):
    """Multi-layer LSTM (cuDNN's, Flax's `OptimizedLSTMCell` math); carry (c, h)."""
    _mode: ClassVar[str] = "lstm"


class GRU(_Recurrent):
    """Multi-layer GRU (cuDNN's reset-after GRU, Flax's `GRUCell` math); carry h."""
    _mode: ClassVar[str] = "gru"


class SimpleRNN(_Recurrent):
    """Multi-layer Elman RNN (Flax's `SimpleCell`): activation 'tanh' or 'relu'; carry h."""
    activation: str = "tanh"

    def _rnn_mode(self) -> str:
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"SimpleRNN: activation={self.activation!r}; cuDNN's cells take "
                             "'tanh' or 'relu'")
        return "rnn_" + self.activation
