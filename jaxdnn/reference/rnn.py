"""Recurrent networks in pure JAX: cuDNN's four cells, stacked layers, both directions,
right-padded variable-length batches, and cuDNN's weight-space layout.

Cells (cuDNN's formulas; W applies to the layer's input, R to the previous hidden state,
every gate with its own input bias b_W and recurrent bias b_R: CUDNN_RNN_DOUBLE_BIAS):

  rnn_relu  h' = relu(W x + b_W + R h + b_R)
  rnn_tanh  h' = tanh(W x + b_W + R h + b_R)
  lstm      i, f, g, o = W_k x + b_Wk + R_k h + b_Rk       (k = i, f, g, o)
            c' = sigmoid(f) * c + sigmoid(i) * tanh(g);  h' = sigmoid(o) * tanh(c')
  gru       r, z = sigmoid(W_k x + b_Wk + R_k h + b_Rk)    (k = r, z)
            n = tanh(W_n x + b_Wn + r * (R_n h + b_Rn))    (reset after the product)
            h' = (1 - z) * n + z * h

lstm with a projection (proj_size P, 0 < P < H; cuDNN's projSize, PyTorch's proj_size):
            h' = P_r (sigmoid(o) * tanh(c'))  (P_r (P, H), no bias)
            the hidden state h and the output have P features, the cell state c keeps H,
            R_k maps P features, and layers above the first read P * directions features.

input_mode 'skip' (CUDNN_SKIP_INPUT): the first layer has no input matrices; x itself (of
size hidden) stands in for every gate's W x, its input biases still added (an assumption
on the biases the GPU tests must confirm: see `weight_layout`).

Layers and directions: pseudo-layer p = depth * directions + direction; the backward
direction reads each sequence from its own last valid step back to the first; layer
depth + 1 reads the concatenation [forward, backward] of layer depth's outputs.

Variable lengths (`seq_lengths`, (N,) int): sequence n holds steps t < seq_lengths[n];
past its end the output is zero and the state stops changing, so hy/cy are the state at
the last valid step. Lengths are not checked here: a length of 0 (or less) leaves the
state at hx and the output zero, a length above T counts as T.

float16 and bfloat16 are computed in float32 and rounded once at the end.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxdnn.reference.dtypes import compute_dtype

__all__ = ["MODES", "GATES", "WeightEntry", "weight_layout", "param_size", "layer_input_size",
           "compute_dtype", "rnn", "forward", "backward_data", "backward_weights",
           "forward_tangent"]

MODES = ("rnn_relu", "rnn_tanh", "lstm", "gru")
# Gates per cell, in cuDNN's linLayerID order (W ids 0..G-1, R ids G..2G-1):
# lstm i, f, g (new memory), o; gru r (reset), z (update), n (new memory).
GATES = {"rnn_relu": 1, "rnn_tanh": 1, "lstm": 4, "gru": 3}


# ---- cuDNN's weight space ----------------------------------------------------------------

class WeightEntry(NamedTuple):
    """One matrix or bias vector of the block, as cudnnGetRNNWeightParams describes it."""
    pseudo_layer: int   # depth * directions + direction
    lin_id: int         # cuDNN's linLayerID: W gates 0..G-1, then R gates G..2G-1
    kind: str           # 'matrix' or 'bias'
    offset: int         # in elements, from the start of the block
    shape: tuple        # matrices (hidden, in), row-major (cuDNN's W x); biases (hidden,);
                        # the projection (lin_id 2G, lstm only) (proj, hidden)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def layer_input_size(depth: int, input_dim: int, hidden_size: int, directions: int) -> int:
    """The width of what layer `depth` reads: x for the first, the previous layer's
    concatenated directions for the others (`hidden_size`: a layer's output width per
    direction, the projection size where there is one)."""
    return input_dim if depth == 0 else hidden_size * directions


@functools.lru_cache(maxsize=None)
def weight_layout(mode: str, hidden_size: int, num_layers: int, input_dim: int,
                  input_mode: str = "linear", bidirectional: bool = False,
                  proj_size: int = 0) -> tuple[WeightEntry, ...]:
    """cuDNN's layout of the parameter block (CUDNN_RNN_DOUBLE_BIAS), in order of offset:
    every matrix of every pseudo-layer first (pseudo-layers in order, and within one the
    linLayerIDs in order), then every bias vector in the same order. Nothing is padded
    between entries.

    proj_size > 0 (lstm only): each pseudo-layer's recurrent matrices are (hidden, proj),
    layers above the first read proj * directions features, and each pseudo-layer has one
    more matrix, the projection (linLayerID 8, (proj, hidden), no bias), assumed to follow
    that pseudo-layer's recurrent matrices (the order of linLayerIDs, as for the others):
    the GPU test against cudnnGetRNNWeightParams decides.

    input_mode 'skip': the input matrices of the first layer (both directions) do not
    exist (cudnnGetRNNWeightParams returns no matrix for them) and take no space. Their
    bias vectors are assumed to exist and to be added to x like any input bias: the GPU
    test that compares this layout with cudnnGetRNNWeightParams decides.
    """
    gates, directions = GATES[mode], 2 if bidirectional else 1
    out_size = proj_size or hidden_size  # what the recurrence and the next layer read
    pseudo_layers = range(num_layers * directions)
    entries, offset = [], 0
    for kind in ("matrix", "bias"):
        for p in pseudo_layers:
            depth = p // directions
            in_dim = layer_input_size(depth, input_dim, out_size, directions)
            for lin_id in range(2 * gates):
                is_input = lin_id < gates
                if kind == "bias":
                    shape = (hidden_size,)
                elif is_input and depth == 0 and input_mode == "skip":
                    continue
                else:
                    shape = (hidden_size, in_dim if is_input else out_size)
                entries.append(WeightEntry(p, lin_id, kind, offset, shape))
                offset += math.prod(shape)
            if kind == "matrix" and proj_size:
                entries.append(WeightEntry(p, 2 * gates, kind, offset, (proj_size, hidden_size)))
                offset += proj_size * hidden_size
    return tuple(entries)


def param_size(*layout_args, **layout_kwargs) -> int:
    """The number of elements of the block (weight_layout's arguments)."""
    last = weight_layout(*layout_args, **layout_kwargs)[-1]
    return last.offset + last.size


class _LayerParams(NamedTuple):
    """One layer's parameters, the directions stacked on a leading axis D and the gates
    stacked gate-major (as in the block): W (D, G*H, in) or None (skip input),
    R (D, G*H, H) ((D, G*H, P) with a projection), b_W and b_R (D, G*H), and the
    projection (D, P, H) or None."""
    w: jax.Array | None
    r: jax.Array
    b_w: jax.Array
    b_r: jax.Array
    proj: jax.Array | None = None


def _unpack(w, layout, gates: int, num_layers: int, directions: int) -> list[_LayerParams]:
    pieces = {(e.pseudo_layer, e.lin_id, e.kind): w[e.offset:e.offset + e.size].reshape(e.shape)
              for e in layout}

    def stacked(depth, ids, kind):
        pseudo_layers = range(depth * directions, (depth + 1) * directions)
        parts = [[pieces.get((p, i, kind)) for i in ids] for p in pseudo_layers]
        if parts[0][0] is None:
            return None
        return jnp.stack([jnp.concatenate(gate_parts, axis=0) for gate_parts in parts])

    inputs, recurrent = range(gates), range(gates, 2 * gates)
    projection = (2 * gates,)  # absent without a projection: None
    return [_LayerParams(stacked(d, inputs, "matrix"), stacked(d, recurrent, "matrix"),
                         stacked(d, inputs, "bias"), stacked(d, recurrent, "bias"),
                         stacked(d, projection, "matrix"))
            for d in range(num_layers)]


# ---- cells ---------------------------------------------------------------------------------

def _cell(mode: str, projected_input, recurrent, h, c):
    """One step: projected_input = W x + b_W and recurrent = R h + b_R, both (..., G*H)."""
    if mode == "rnn_relu":
        return jax.nn.relu(projected_input + recurrent), c
    if mode == "rnn_tanh":
        return jnp.tanh(projected_input + recurrent), c
    if mode == "lstm":
        i, f, g, o = jnp.split(projected_input + recurrent, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c
    x_r, x_z, x_n = jnp.split(projected_input, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(recurrent, 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)  # cuDNN's GRU: the reset gate scales R_n h + b_Rn
    return (1 - z) * n + z * h, c


def _reverse_sequences(a, seq_lengths):
    """a (T, N, ...) with each sequence's valid steps in reverse order (padding stays in
    place). Its own inverse."""
    if seq_lengths is None:
        return a[::-1]
    steps = jnp.arange(a.shape[0])[:, None]
    source = jnp.where(steps < seq_lengths[None, :], seq_lengths[None, :] - 1 - steps, steps)
    return jnp.take_along_axis(a, source.reshape(source.shape + (1,) * (a.ndim - 2)), axis=0)


def _run_layer(mode, inputs, h0, c0, params: _LayerParams, seq_lengths):
    """One layer, its directions side by side in one scan over time: inputs (T, N, in),
    h0 and c0 (D, N, H) -> (outputs (T, N, D*H), h_T, c_T). The backward direction runs
    forward over each sequence reversed. With a projection h0, h_T and the outputs have P
    features where c keeps H."""
    gates, directions = GATES[mode], h0.shape[0]
    if params.w is None:  # skip input: x stands in for every gate's W x
        projected = jnp.tile(inputs, (1, 1, gates))[None] + params.b_w[:, None, None]
    else:  # every step's input projection at once, outside the recurrence: (D, T, N, G*H)
        projected = jnp.einsum("tni,dgi->dtng", inputs, params.w) + params.b_w[:, None, None]
    if directions == 2:
        projected = jnp.stack([projected[0], _reverse_sequences(projected[1], seq_lengths)])
    steps = projected.shape[1]
    valid = (None if seq_lengths is None
             else jnp.arange(steps)[:, None] < seq_lengths[None, :])  # (T, N)

    def step(carry, t):
        h, c = carry
        recurrent = jnp.einsum("dnh,dgh->dng", h, params.r) + params.b_r[:, None]
        h_new, c_new = _cell(mode, projected[:, t], recurrent, h, c)
        if params.proj is not None:  # lstm's projected hidden state: P_r (o * tanh(c))
            h_new = jnp.einsum("dnh,dph->dnp", h_new, params.proj)
        if valid is None:
            return (h_new, c_new), h_new
        keep = valid[t][None, :, None]  # past a sequence's end: state frozen, output zero
        h_new = jnp.where(keep, h_new, h)
        c_new = None if c is None else jnp.where(keep, c_new, c)
        return (h_new, c_new), jnp.where(keep, h_new, 0)

    (h_last, c_last), outputs = lax.scan(step, (h0, c0), jnp.arange(steps))  # (T, D, N, H)
    per_direction = [outputs[:, 0]]
    if directions == 2:
        per_direction.append(_reverse_sequences(outputs[:, 1], seq_lengths))
    return jnp.concatenate(per_direction, axis=-1), h_last, c_last



def rnn(x, hx, cx, w, seq_lengths=None, *, mode: str, input_mode: str, hidden_size: int,
        num_layers: int, bidirectional: bool, proj_size: int = 0):
    """x (T, N, I), hx (and cx for lstm, else None) (num_layers * directions, N, H), w the
    block in cuDNN's layout -> (y (T, N, H * directions), hy, cy or None). With proj_size
    P > 0 (lstm): hx, hy and y have P features per direction where cx and cy keep H."""
    dtype = x.dtype
    ct = compute_dtype(dtype)
    directions = 2 if bidirectional else 1
    layout = weight_layout(mode, hidden_size, num_layers, x.shape[-1], input_mode, bidirectional,
                           proj_size)
    params = _unpack(w.astype(ct), layout, GATES[mode], num_layers, directions)
    lstm = mode == "lstm"
    hx = hx.astype(ct)
    cx = cx.astype(ct) if lstm else None
    if seq_lengths is not None:  # a length past T counts as T (and keeps gathers in bounds)
        seq_lengths = jnp.clip(seq_lengths.astype(jnp.int32), 0, x.shape[0])
    layer_input, hy, cy = x.astype(ct), [], []
    for depth in range(num_layers):
        states = slice(depth * directions, (depth + 1) * directions)
        layer_input, h, c = _run_layer(mode, layer_input, hx[states],
                                       cx[states] if lstm else None, params[depth], seq_lengths)
        hy.append(h)
        cy.append(c)
    y = layer_input.astype(dtype)
    hy = jnp.concatenate(hy).astype(dtype)
    return y, hy, (jnp.concatenate(cy).astype(dtype) if lstm else None)


# ---- the primitives' reference lowerings ---------------------------------------------------
# The primitives always carry a cell state: for the cells without one, cx and cy are
# placeholders of shape (num_layers * directions, N, 0). The reserve space is cuDNN's; here
# it is zeros (nothing reads it: the backward passes recompute the forward).

_CELL_PARAMS = ("mode", "input_mode", "hidden_size", "num_layers", "bidirectional", "proj_size")


def _cell_params(params: dict) -> dict:
    return {k: params[k] for k in _CELL_PARAMS}


def _forward_outputs(x, hx, cx, w, seq_lengths, params):
    """(y, hy, cy) of the primitive view: the placeholder cell state passes through."""
    lstm = params["mode"] == "lstm"
    lengths = seq_lengths if params["variable_lengths"] else None
    y, hy, cy = rnn(x, hx, cx if lstm else None, w, lengths, **_cell_params(params))
    return y, hy, (cy if lstm else jnp.zeros_like(cx))


def forward(x, hx, cx, w, seq_lengths, *, reserve_bytes: int, **params):
    """rnn_fwd: [y, hy, cy, reserve]."""
    y, hy, cy = _forward_outputs(x, hx, cx, w, seq_lengths, params)
    return [y, hy, cy, jnp.zeros((reserve_bytes,), jnp.uint8)]


def _forward_vjp(x, hx, cx, w, seq_lengths, dy, dhy, dcy, params):
    _, vjp = jax.vjp(lambda *a: _forward_outputs(*a, seq_lengths, params), x, hx, cx, w)
    return vjp((dy, dhy, dcy))


def backward_data(x, hx, cx, w, seq_lengths, y, dy, dhy, dcy, reserve, **params):
    """rnn_bwd_data: [dx, dhx, dcx, reserve] (the reserve passes through)."""
    dx, dhx, dcx, _ = _forward_vjp(x, hx, cx, w, seq_lengths, dy, dhy, dcy, params)
    return [dx, dhx, dcx, reserve]


def backward_weights(x, hx, cx, w, seq_lengths, y, dy, dhy, dcy, reserve, **params):
    """rnn_bwd_weights: dw."""
    return _forward_vjp(x, hx, cx, w, seq_lengths, dy, dhy, dcy, params)[3]


def forward_tangent(x, hx, cx, w, seq_lengths, y, reserve, tx, thx, tcx, tw, **params):
    """rnn_tangent: [dy, dhy, dcy], the tangent of rnn_fwd's (y, hy, cy) at (x, hx, cx, w)
    in the direction (tx, thx, tcx, tw): the forward differentiated in forward mode (the
    forward's outputs y and reserve are operands for the transpose, the cuDNN backward
    passes; unused here)."""
    del y, reserve
    _, tangent = jax.jvp(lambda *a: _forward_outputs(*a, seq_lengths, params), (x, hx, cx, w),
                         (tx, thx, tcx, tw))
    return list(tangent)
