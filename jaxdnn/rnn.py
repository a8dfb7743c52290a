"""Recurrent networks: `RNNBlock` (Theano's RNNBlock), after cuDNN's RNN v8 API
(cudnnRNNForward, cudnnRNNBackwardData_v8, cudnnRNNBackwardWeights_v8).

An RNNBlock is a configuration (cell, hidden size, depth, input mode, directions, and for
lstm an optional projection of the hidden state, `proj_size`) applied
to an opaque parameter block `w`: a flat vector laid out as cuDNN lays out its weight
space (`weight_layout`), so a block made anywhere runs unchanged on cuDNN and on the XLA
path. `split_params` / `merge_params` convert between the block and each layer's matrices
and biases in Theano's view (`x @ W`, W of shape (input_dim, hidden)). The cell formulas
are in jaxdnn/reference/rnn.py.

Two paths, chosen at trace time by `dnn.enabled`:

* XLA: the pure-JAX reference (`lax.scan` over time) called directly. JAX differentiates it
  (to any order) and vmaps it natively, batched weights included.
* cuDNN: three primitives, one per cuDNN call,

    rnn_fwd          x, hx, cx, w, seq_lengths                       -> y, hy, cy, reserve
    rnn_bwd_data     x, hx, cx, w, seq_lengths, y, dy, dhy, dcy, reserve -> dx, dhx, dcx, reserve
    rnn_bwd_weights  x, hx, cx, w, seq_lengths, y, dy, dhy, dcy, reserve -> dw

  and their derivatives as JVP rules (both modes of AD, any order). rnn_fwd's tangent is a
  fourth primitive, rnn_tangent (XLA only: cuDNN has no forward-mode pass; its reference
  is jax.jvp of the XLA path's forward), linear in the tangents of x, hx, cx and w and
  taking y and the reserve space as operands, so that reverse mode transposes it into
  rnn_bwd_data and rnn_bwd_weights, the cuDNN backward, with the residuals (the inputs, y
  and the reserve) of the custom VJP it replaces. Differentiated, the forward runs in
  cuDNN's training mode (it writes the reserve); otherwise in inference mode. The
  backward passes' tangents (second order) are jax.jvp of their references (XLA).

What the cuDNN handlers (cuda/rnn.cc) receive:

* x (T, N, I), hx and cx (L*D, N, H), y and dy (T, N, D*H), w and dw (P,), all of one dtype
  (with a projection, proj_size R > 0: hx, hy and their gradients (L*D, N, R), y and dy
  (T, N, D*R); cx and cy keep H):
  float16 or bfloat16 (stored so, with float32 math on tensor cores), float32 (TF32 tensor
  cores unless `allow_tf32` is 0) or float64. bfloat16 reaches them only where cuDNN takes
  it (asked once, `_cudnn_takes_bfloat16`); elsewhere the public function computes it in
  float32. Never an empty array (T = 0 or N = 0 returns without binding).
* For cells without a cell state, cx, cy, dcy and dcx have shape (L*D, N, 0): the handlers
  pass NULL.
* seq_lengths: int32 (N,), on the device, always (all T when no lengths were given, then
  variable_lengths=0). cuDNN plans each call from lengths on the host (given devSeqLengths
  but host lengths all T, it starts the backward direction at T: measured on the GPU), so:
  - without lengths (variable_lengths=0) the targets jaxdnn_rnn_* build their descriptors
    once, at initialize, describing x and y as cuDNN's packed layout with padded IO off;
    execute only launches, with no host synchronization, and may run inside CUDA graphs;
  - with lengths (variable_lengths=1) the primitives lower to jaxdnn_rnn_*_host_lengths,
    which XLA runs outside CUDA graphs (not command-buffer compatible: cuDNN's
    variable-length calls failed inside graphs, measured on the GPU). Lengths given as host data
    (NumPy arrays, lists) are known at trace time and travel as the attribute
    static_lengths (int32[N]; empty otherwise): the descriptors describe them, built
    once, and execute only launches, with no synchronization (each distinct lengths
    vector is its own compiled call). Lengths given as jax arrays (traced under jit, or
    living on the device) are copied to the host by each execute, which synchronizes the
    stream (once per call: three times per training step), checks them (each in [1, T],
    else an error) and sets the call's data descriptors to them. This is the documented cost
    of lengths only the device knows: where dispatch must stay asynchronous, pass the
    lengths as NumPy values (e.g. one compiled step per bucket of lengths) or pad to
    equal lengths.
* reserve: u8. rnn_fwd produces `reserve_bytes` of it (cudnnGetRNNTempSpaceSizes in the
  mode `training` says, the larger of the two layouts' sizes, as is the workspace;
  training=0 is cuDNN's inference mode and writes none).
  rnn_bwd_data reads and updates it (its reserveSpace is in/out) and returns the updated
  copy (the operand is not aliased to the result: the handler copies it there first),
  which rnn_bwd_weights reads: that data dependency orders the two calls as cuDNN
  requires. rnn_bwd_weights zeroes dw first (cuDNN adds into it, CUDNN_WGRAD_MODE_ADD).
* Operands a call does not need (x for rnn_bwd_data; cx, w, dy, dhy, dcy for
  rnn_bwd_weights) are there for the reference lowering, which recomputes the forward.
* The workspace is a trailing u8 result of `workspace_bytes` (see `_primitive.py`).
* Attributes: mode, input_mode, algo (the `dnn.rnn.algo` flag) (strings); hidden_size,
  num_layers, bidirectional, variable_lengths, allow_tf32, proj_size (0: no projection;
  cuDNN's projSize is then hidden_size) and (rnn_fwd) training and cuda_graph (the
  `dnn.rnn.cuda_graph` flag) (int64); static_lengths (int32[N], empty unless the lengths
  were host data).
* cuda_graph=1: where XLA runs jaxdnn_rnn_fwd outside its command buffers (it puts a custom
  call into a CUDA graph only in a program with enough commands; a jitted forward alone has
  too few), the handler captures cudnnRNNForward's per-step kernels into a CUDA graph of
  its own and replays it, cached per call site by every pointer and size the call passes
  (cuda/common/graph_capture.h). The _host_lengths targets never do.
  The handlers check every buffer's shape and byte size against cuDNN's at initialize.

Dropout between layers (`RNNBlock(dropout=p)`, on when `apply` is given `dropout_key`)
draws its masks with jax.random, not with cuDNN's dropout descriptor (whose generator XLA
cannot reproduce), so both paths drop the same units: the stack then runs one call per
layer (`_layer_block`, `_layer_weights`: cuDNN keeps a layer's matrices and its biases in
two ranges of the block) with the masks applied between the calls.

The reserve and workspace sizes come from cuDNN, so the cuDNN path needs a GPU at trace
time: `temp_space_sizes` asks the extension once per configuration.
With 'auto' and no GPU visible, the XLA path is taken.

Batching (the primitives' rules; the XLA path needs none):

* rnn_fwd and rnn_bwd_data with shared weights fold the vmapped axis into N (exact: the
  sequences of a batch are independent). The folded call's reserve space cannot be split
  by instance; it travels as B zero-padded rows and is joined again by the backward.
* Batched weights: a sequential `lax.map` over the instances (cuDNN takes one weight
  space per call).
* rnn_bwd_weights with shared weights must still give each instance its own dw, which no
  folding gives: it runs the forward, backward-data and backward-weights once per instance
  (`lax.map`, sequential). `jax.grad` of a vmapped RNN takes this path too (JAX sums the
  per-instance dw), so for training put the sequences on the batch axis N, not under vmap.
* rnn_tangent (forward mode under vmap, jacfwd) computes on XLA: its reference is vmapped.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdnn import _extension, _validate
from jaxdnn import config as config_module
from jaxdnn._batching import merge_into, split_from
from jaxdnn._compat import ShapedArray, ad, zero_tangent_like
from jaxdnn._primitive import (choose_impl, define_linear_in_last, define_primitive,
                               define_reference_jvp)
from jaxdnn._sharding import Partitioning
from jaxdnn.reference import rnn as reference
from jaxdnn.reference.rnn import WeightEntry, weight_layout

__all__ = ["RNNBlock", "weight_layout", "WeightEntry", "temp_space_sizes", "cudnn_weight_params",
           "rnn_fwd_p",
           "rnn_bwd_data_p", "rnn_bwd_weights_p", "rnn_tangent_p", "FFI_TARGETS"]

_BASE_TARGETS = ("jaxdnn_rnn_fwd", "jaxdnn_rnn_bwd_data", "jaxdnn_rnn_bwd_weights")
# Variable lengths go to the *_host_lengths targets (see the module docstring).
FFI_TARGETS = _BASE_TARGETS + tuple(t + "_host_lengths" for t in _BASE_TARGETS)
RNN_MODES = reference.MODES
INPUT_MODES = ("linear", "skip")
DIRECTION_MODES = ("unidirectional", "bidirectional")


# ---- trace-time sizes from cuDNN ----------------------------------------------------------

def temp_space_sizes(*, mode: str, input_mode: str, algo: str, hidden_size: int,
                     num_layers: int, bidirectional: bool, allow_tf32: bool, dtype: str,
                     max_seq_length: int, batch_size: int, input_dim: int,
                     training: bool, proj_size: int = 0,
                     variable_lengths: bool = False) -> tuple[int, int]:
    """(workspace, reserve) bytes that cudnnGetRNNTempSpaceSizes gives one configuration
    (data descriptors of max_seq_length x batch_size, every length max_seq_length, as the
    handlers build them), asked of the extension once per configuration (it needs a GPU).
    The reserve is 0 unless `training`. `variable_lengths` sizes the layout of the calls
    with lengths (the *_host_lengths targets; see the module docstring), whose shorter
    lengths get the same sizes (full-length sequences are the longest; the GPU tests run
    variable lengths with them)."""
    return _query_temp_space_sizes(
        mode=mode, input_mode=input_mode, algo=algo, hidden_size=hidden_size,
        num_layers=num_layers, bidirectional=bool(bidirectional), allow_tf32=bool(allow_tf32),
        dtype=dtype, max_seq_length=max_seq_length, batch_size=batch_size,
        input_dim=input_dim, training=bool(training), proj_size=int(proj_size),
        variable_lengths=bool(variable_lengths))


def _extension_query(name: str):
    query = getattr(_extension.extension(), name, None)
    if query is None:
        raise RuntimeError(f"jaxdnn RNNBlock: this build of jaxdnn has no cuDNN RNN query "
                           f"{name!r}")
    return query


@functools.lru_cache(maxsize=None)
def _query_temp_space_sizes(**config) -> tuple[int, int]:
    try:
        workspace, reserve = _extension_query("rnn_temp_space_sizes")(**config)
    except RuntimeError as e:  # cuDNN's refusal (say, a persistent algo for this size)
        raise RuntimeError(f"jaxdnn RNNBlock.apply: cuDNN cannot run this configuration "
                           f"({', '.join(f'{k}={v!r}' for k, v in config.items())}): {e}"
                           ) from None
    return int(workspace), int(reserve)


def cudnn_weight_params(*, mode: str, input_mode: str, hidden_size: int, num_layers: int,
                        bidirectional: bool, dtype: str, input_dim: int,
                        algo: str = "standard", proj_size: int = 0) -> tuple[int, list[tuple]]:
    """cuDNN's own description of the weight space (it needs a GPU): (bytes,
    [(pseudo_layer, lin_id, kind, offset in elements, dims)]), from cudnnGetRNNWeightParams,
    to test `weight_layout` against."""
    return _extension_query("rnn_weight_params")(
        mode=mode, input_mode=input_mode, algo=algo, hidden_size=hidden_size,
        num_layers=num_layers, bidirectional=bool(bidirectional), allow_tf32=True, dtype=dtype,
        input_dim=input_dim, proj_size=int(proj_size))


@functools.lru_cache(maxsize=None)
def _cudnn_takes_bfloat16() -> bool:
    """Whether cuDNN's RNN takes bfloat16 data here (asked once, of the extension)."""
    try:
        _extension_query("rnn_temp_space_sizes")(
            mode="lstm", input_mode="linear", algo="standard", hidden_size=8, num_layers=1,
            bidirectional=False, allow_tf32=True, dtype="bfloat16", max_seq_length=2,
            batch_size=2, input_dim=8, training=True, proj_size=0)
    except RuntimeError:
        return False
    return True


class _Config(NamedTuple):
    """The static configuration of one cuDNN-path call (the primitives' parameters, less
    the sizes, which depend on the shapes)."""
    mode: str
    input_mode: str
    algo: str
    hidden_size: int
    num_layers: int
    bidirectional: bool
    variable_lengths: bool
    allow_tf32: bool
    static_lengths: tuple  # the lengths, where known at trace time; else ()
    impl: str
    proj_size: int = 0     # lstm's projection of the hidden state; 0: none


# What the sizes depend on: whether there are lengths (the data's layout), not their
# values (sized for full-length sequences).
_SIZE_KEYS = tuple(k for k in _Config._fields if k not in ("impl", "static_lengths"))


def _space_sizes(params: dict, x, training: bool) -> tuple[int, int]:
    """(workspace, reserve) bytes of a call on x (T, N, I) with these parameters.

    The reserve is laid out per sequence, N equal parts, each large enough for any split
    of N over up to as many devices as there are: a batch split across devices splits its
    reserve with it (jaxdnn/_sharding.py), and every shard holds what cuDNN needs for its
    own N / s sequences."""
    if params["impl"] != "cudnn":  # the reference lowering needs neither
        return 0, 0
    t, n, i = x.shape

    def sizes(batch):
        return temp_space_sizes(**{k: params[k] for k in _SIZE_KEYS},
                                dtype=jnp.dtype(x.dtype).name, max_seq_length=t,
                                batch_size=batch, input_dim=i, training=training)

    workspace, reserve = sizes(n)
    if not reserve:
        return workspace, 0
    splits = [s for s in range(2, min(n, jax.device_count()) + 1) if n % s == 0]
    per_sequence = max([-(-reserve // n)] + [-(-sizes(n // s)[1] // (n // s)) for s in splits])
    return workspace, n * per_sequence


def _forward_params(config: _Config, x, training: bool, cuda_graph: bool) -> dict:
    workspace, reserve = _space_sizes(config._asdict(), x, training)
    return dict(config._asdict(), training=training, cuda_graph=cuda_graph,
                workspace_bytes=workspace, reserve_bytes=reserve)


def _backward_params(config: _Config, x) -> dict:
    workspace, _ = _space_sizes(config._asdict(), x, training=True)
    return dict(config._asdict(), workspace_bytes=workspace)


def _resized(params: dict, x) -> tuple[dict, int]:
    """params for a call on x of another batch size (instances folded into N, instance-
    major), and that call's reserve bytes."""
    workspace, reserve = _space_sizes(params, x, params.get("training", True))
    params = dict(params, workspace_bytes=workspace)
    if params["static_lengths"]:  # every instance shares them (they are not vmapped);
        # the instances are N's minor part (jaxdnn/_batching.py): each length repeats
        copies = x.shape[1] // len(params["static_lengths"])
        params["static_lengths"] = tuple(n for n in params["static_lengths"]
                                         for _ in range(copies))
    if "reserve_bytes" in params:
        params["reserve_bytes"] = reserve
    return params, reserve


# ---- primitives ---------------------------------------------------------------------------

def _forward_abstract(x, hx, cx, w, seq_lengths, *, hidden_size, bidirectional, reserve_bytes,
                      proj_size, **params):
    steps, batch, _ = x.shape
    directions = 2 if bidirectional else 1
    return [ShapedArray((steps, batch, directions * (proj_size or hidden_size)), x.dtype),
            ShapedArray(hx.shape, hx.dtype), ShapedArray(cx.shape, cx.dtype),
            ShapedArray((reserve_bytes,), np.uint8)]


def _backward_data_abstract(x, hx, cx, w, seq_lengths, y, dy, dhy, dcy, reserve, **params):
    return [ShapedArray(a.shape, a.dtype) for a in (x, hx, cx, reserve)]


def _backward_weights_abstract(x, hx, cx, w, *operands, **params):
    return ShapedArray(w.shape, w.dtype)


def _tangent_abstract(x, hx, cx, w, seq_lengths, y, *operands, **params):
    return [ShapedArray(a.shape, a.dtype) for a in (y, hx, cx)]


# ---- partitioning (jaxdnn/_sharding.py) ---------------------------------------------------
# The sequences of a batch are independent: N (axis 1 of the data, axis 0 of the lengths)
# splits; the weights stay whole and their gradient, a sum over N, is psummed. The reserve
# space splits with N (its per-sequence layout: `_space_sizes`). Lengths compiled into the
# call (static_lengths) describe the whole batch: such calls run whole.
_DATA = ("t n i", "l n h", "l n hc", "p", "n")             # x, hx, cx, w, seq_lengths
_BACKWARD_DATA = _DATA + ("t n o", "t n o", "l n h", "l n hc", "r")  # y, dy, dhy, dcy, reserve


def _shardable(static_lengths) -> frozenset:
    return frozenset() if static_lengths else frozenset({"n", "r"})


def _forward_partitioning(*avals, static_lengths, **params):
    return Partitioning(_DATA, ("t n o", "l n h", "l n hc", "r"), _shardable(static_lengths),
                        shape_params={"reserve_bytes": "r"}, tied={"r": "n"})


def _backward_data_partitioning(*avals, static_lengths, **params):
    return Partitioning(_BACKWARD_DATA, ("t n i", "l n h", "l n hc", "r"),
                        _shardable(static_lengths), tied={"r": "n"})


def _backward_weights_partitioning(*avals, static_lengths, **params):
    return Partitioning(_BACKWARD_DATA, ("p",), _shardable(static_lengths), tied={"r": "n"})


def _tangent_partitioning(*avals, static_lengths, **params):
    return Partitioning(_DATA + ("t n o", "r", "t n i", "l n h", "l n hc", "p"),
                        ("t n o", "l n h", "l n hc"), _shardable(static_lengths), tied={"r": "n"})


def _attributes(*, workspace_bytes, reserve_bytes=None, static_lengths, **params):
    del workspace_bytes, reserve_bytes  # the handlers read them from their buffers
    attributes = {k: (v if isinstance(v, str) else np.int64(v)) for k, v in params.items()}
    attributes["static_lengths"] = np.asarray(static_lengths, np.int32)
    return attributes


def _workspace_bytes(*avals, workspace_bytes, **params):
    return workspace_bytes


# Where each operand keeps its batch axis N (None: w, which has none).
_FORWARD_N_AXES = (1, 1, 1, None, 0)                 # x, hx, cx, w, seq_lengths
_BACKWARD_N_AXES = _FORWARD_N_AXES + (1, 1, 1, 1)    # y, dy, dhy, dcy (then the reserve)
_W, _RESERVE = 3, 9                                  # operand indices


def _batch_size(args, dims) -> int:
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _fold(a, dim, n_axis, size):
    """a with its vmapped axis (broadcast if unmapped) merged into its N axis."""
    return a if n_axis is None else merge_into(a, dim, size, n_axis)


def _unfold(a, n_axis, size):
    """The inverse of _fold: the instances' axis comes back just after n_axis."""
    return split_from(a, size, n_axis)[0]


def _reserve_rows(reserve, size):
    """A folded call's reserve space as `size` zero-padded rows: vmap wants the batch axis on
    every result, though the rows mean nothing apart."""
    rows = -(-reserve.shape[0] // size)
    return jnp.pad(reserve, (0, rows * size - reserve.shape[0])).reshape(size, rows)


def _join_reserve_rows(rows, dim, nbytes):
    rows = jnp.moveaxis(rows, dim, 0)
    return rows.reshape(rows.shape[0] * rows.shape[1])[:nbytes]


def _map_instances(fn, args, dims, multiple_results: bool):
    """fn(*operands) once per vmapped instance (a sequential lax.map); unmapped operands
    are shared."""
    mapped = [i for i, d in enumerate(dims) if d is not None]

    def one(instance):
        operands = list(args)
        for i, a in zip(mapped, instance):
            operands[i] = a
        return fn(*operands)

    outs = lax.map(one, [jnp.moveaxis(args[i], dims[i], 0) for i in mapped])
    return outs, ([0] * len(outs) if multiple_results else 0)


def _map_prim(prim, args, dims, params):
    return _map_instances(functools.partial(prim.bind, **params), args, dims,
                          prim.multiple_results)


def _batch_forward(prim, args, dims, **params):
    if dims[_W] is not None:  # one weight space per cuDNN call
        return _map_prim(prim, args, dims, params)
    size = _batch_size(args, dims)
    folded = [_fold(a, d, ax, size) for a, d, ax in zip(args, dims, _FORWARD_N_AXES)]
    params, _ = _resized(params, folded[0])
    y, hy, cy, reserve = prim.bind(*folded, **params)
    return ([_unfold(y, 1, size), _unfold(hy, 1, size), _unfold(cy, 1, size),
             _reserve_rows(reserve, size)], [2, 2, 2, 0])


def _batch_backward_data(prim, args, dims, **params):
    # Batched weights mean the forward ran per instance; an unbatched reserve means the
    # forward was not vmapped (only the cotangents are): either way the reserve belongs to
    # one instance's call, so run per instance. Otherwise the forward folded the instances
    # into N, and so does this.
    if dims[_W] is not None or dims[_RESERVE] is None:
        return _map_prim(prim, args, dims, params)
    size = _batch_size(args, dims)
    folded = [_fold(a, d, ax, size) for a, d, ax in zip(args, dims, _BACKWARD_N_AXES)]
    params, reserve_bytes = _resized(params, folded[0])
    reserve = _join_reserve_rows(args[_RESERVE], dims[_RESERVE], reserve_bytes)
    dx, dhx, dcx, reserve = prim.bind(*folded, reserve, **params)
    return ([_unfold(dx, 1, size), _unfold(dhx, 1, size), _unfold(dcx, 1, size),
             _reserve_rows(reserve, size)], [2, 2, 2, 0])


def _batch_backward_weights(prim, args, dims, **params):
    if dims[_W] is not None:  # the forward and rnn_bwd_data ran per instance too
        return _map_prim(prim, args, dims, params)

    # Shared weights, yet each instance needs its own dw: a folded call would sum them.
    # The reserve space of a folded forward cannot be split by instance, so each instance
    # runs its own forward and backward-data first.
    def one_instance(x, hx, cx, w, seq_lengths, folded_y, dy, dhy, dcy, folded_reserve):
        del folded_y, folded_reserve  # of the folded forward: recomputed for this instance
        workspace, reserve_bytes = _space_sizes(params, x, training=True)
        y, _, _, reserve = rnn_fwd_p.bind(
            x, hx, cx, w, seq_lengths, training=True, reserve_bytes=reserve_bytes,
            cuda_graph=config_module.read("dnn.rnn.cuda_graph"),
            **dict(params, workspace_bytes=workspace))
        operands = (x, hx, cx, w, seq_lengths, y, dy, dhy, dcy)
        *_, reserve = rnn_bwd_data_p.bind(*operands, reserve, **params)
        return prim.bind(*operands, reserve, **params)

    return _map_instances(one_instance, args, dims, multiple_results=False)


def _target(name: str):
    """The FFI target of a call: `name`, or its host-lengths twin for variable lengths."""
    return lambda *, variable_lengths, **params: (
        name + "_host_lengths" if variable_lengths else name)


rnn_fwd_p = define_primitive(
    "jaxdnn_rnn_fwd", abstract_eval=_forward_abstract, reference=reference.forward,
    ffi_target=_target("jaxdnn_rnn_fwd"), attributes=_attributes, workspace_bytes=_workspace_bytes,
    batch_rule=_batch_forward, partitioning=_forward_partitioning, multiple_results=True)

rnn_bwd_data_p = define_primitive(
    "jaxdnn_rnn_bwd_data", abstract_eval=_backward_data_abstract,
    reference=reference.backward_data, ffi_target=_target("jaxdnn_rnn_bwd_data"),
    attributes=_attributes, workspace_bytes=_workspace_bytes, batch_rule=_batch_backward_data,
    partitioning=_backward_data_partitioning, multiple_results=True)

rnn_bwd_weights_p = define_primitive(
    "jaxdnn_rnn_bwd_weights", abstract_eval=_backward_weights_abstract,
    reference=reference.backward_weights, ffi_target=_target("jaxdnn_rnn_bwd_weights"),
    attributes=_attributes, workspace_bytes=_workspace_bytes,
    batch_rule=_batch_backward_weights, partitioning=_backward_weights_partitioning)


def _batch_tangent(prim, args, dims, **params):
    """rnn_tangent computes on XLA whatever its impl: batching it batches its reference
    (vmap of a lax.scan: native, no loop over the instances)."""
    del prim
    kwargs = {k: v for k, v in params.items() if k != "impl"}
    out = jax.vmap(functools.partial(reference.forward_tangent, **kwargs), in_axes=dims)(*args)
    return list(out), [0] * len(out)


# The forward's derivative (on XLA whatever its impl: cuDNN has no forward-mode pass; impl
# and the other parameters are its transpose's, the backward passes'):
#   x, hx, cx, w, seq_lengths, y, reserve, tx, thx, tcx, tw -> dy, dhy, dcy.
rnn_tangent_p = define_primitive(
    "jaxdnn_rnn_tangent", abstract_eval=_tangent_abstract, reference=reference.forward_tangent,
    ffi_target=None, batch_rule=_batch_tangent, partitioning=_tangent_partitioning,
    multiple_results=True)


# ---- differentiation: JVP rules on the primitives; reverse mode transposes them -----------
# rnn_fwd's tangent is rnn_tangent (linear in the tangents), whose transpose is
# rnn_bwd_data then rnn_bwd_weights (cuDNN), given the forward's y and reserve space: what
# the gradient ran before. The RNN is nonlinear and no cuDNN pass computes its tangent, so
# forward mode computes it on XLA (jax.jvp of the reference, which runs the recurrence
# again beside cuDNN's primal). The backward passes' and rnn_tangent's derivatives in
# their nonlinear operands (second order) are their references' (XLA).

def _config(params: dict) -> _Config:
    return _Config(**{k: params[k] for k in _Config._fields})


def _forward_jvp(primals, tangents, **params):
    x = primals[0]
    if all(type(t) is ad.Zero for t in tangents):
        out = rnn_fwd_p.bind(*primals, **params)
        return out, [zero_tangent_like(o) for o in out]
    config = _config(params)
    # Differentiated, the forward runs in cuDNN's training mode: it writes the reserve space
    # the backward passes read (an undifferentiated call runs in inference mode, without).
    training = (params if params["training"]
                else _forward_params(config, x, True, params["cuda_graph"]))
    y, hy, cy, reserve = rnn_fwd_p.bind(*primals, **training)
    floats = [ad.instantiate_zeros(t) for t in tangents[:4]]
    dy, dhy, dcy = rnn_tangent_p.bind(*primals, y, reserve, *floats,
                                      **_backward_params(config, x))
    # The primal reserve is that of the call as bound (empty in inference mode).
    primal_reserve = (reserve if params["training"]
                      else jnp.zeros((params["reserve_bytes"],), np.uint8))
    return [y, hy, cy, primal_reserve], [dy, dhy, dcy, zero_tangent_like(primal_reserve)]


def _tangent_cotangent(x, hx, cx, w, seq_lengths, y, reserve, cts, **params):
    """The transpose of rnn_tangent: [dx, dhx, dcx, dw] by cuDNN's backward passes (the
    reserve rnn_bwd_data updates is the one rnn_bwd_weights reads)."""
    operands = (x, hx, cx, w, seq_lengths, y, *cts)
    dx, dhx, dcx, reserve = rnn_bwd_data_p.bind(*operands, reserve, **params)
    dw = rnn_bwd_weights_p.bind(*operands, reserve, **params)
    return dx, dhx, dcx, dw


ad.primitive_jvps[rnn_fwd_p] = _forward_jvp
define_linear_in_last(rnn_tangent_p, _tangent_cotangent, reference=reference.forward_tangent,
                      linear=4)
define_reference_jvp(rnn_bwd_data_p, reference.backward_data)
define_reference_jvp(rnn_bwd_weights_p, reference.backward_weights)


def _cudnn_rnn(x, hx, cx, w, seq_lengths, config: _Config, cuda_graph: bool):
    """The cuDNN path: rnn_fwd in inference mode (its JVP rule runs training mode)."""
    y, hy, cy, _ = rnn_fwd_p.bind(x, hx, cx, w, seq_lengths,
                                  **_forward_params(config, x, False, cuda_graph))
    return y, hy, cy


def _implementation(op: str, *shapes) -> str:
    impl = choose_impl(op, ffi_targets=FFI_TARGETS, shapes=shapes)
    if impl == "cudnn" and _extension.unavailable_reason() is not None:
        # 'auto' with the handlers built but no GPU: cuDNN cannot size the reserve space
        return "xla"
    return impl


# ---- argument handling --------------------------------------------------------------------

def _positive_int(op: str, arg: str, value) -> int:
    if not _validate.is_int(value):
        raise TypeError(f"{op}: {arg} must be a positive int; got {value!r}")
    if value < 1:
        raise ValueError(f"{op}: {arg}={value!r} must be a positive int")
    return int(value)


def _proj_size(op: str, value, hidden_size: int, mode: str) -> int:
    if not _validate.is_int(value):
        raise TypeError(f"{op}: proj_size must be an int in [0, hidden_size); got {value!r}")
    if not 0 <= value < hidden_size:
        raise ValueError(f"{op}: proj_size={value!r} must lie in [0, hidden_size={hidden_size})"
                         " (0: no projection)")
    if value and mode != "lstm":
        raise ValueError(f"{op}: proj_size={value!r} projects an lstm's hidden state; "
                         f"rnn_mode={mode!r} has no projection (proj_size=0)")
    return int(value)


def _block_dtype(op: str, dtype):
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{op}: dtype must be float16, bfloat16, float32 or float64; "
                        f"got {dtype!r}") from None
    _validate.check_floating(op, "dtype", np.zeros((), dtype))
    return dtype


def _check_key(op: str, arg: str, key):
    """A PRNG key: a typed key of shape () (jax.random.key) or a raw uint32 key of shape
    (k,) (jax.random.PRNGKey; k depends on the PRNG implementation)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{op}: {arg} must be a single PRNG key (shape ()); got shape "
                             f"{key.shape}")
        return key
    raw = _raw_key_shape()
    if dtype is None or jnp.dtype(dtype) != jnp.uint32 or np.shape(key) != raw:
        got = type(key).__name__ if dtype is None else f"dtype {dtype}, shape {np.shape(key)}"
        raise TypeError(f"{op}: {arg} must be a JAX PRNG key (jax.random.key, or "
                        f"jax.random.PRNGKey: uint32 of shape {raw}); got {got}")
    return key


def _raw_key_shape() -> tuple:
    """The shape of a raw key of the default PRNG implementation (threefry: (2,))."""
    return jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape


def _check_array(op: str, arg: str, a, rank: int, what: str):
    a = jnp.asarray(a)
    _validate.check_rank(op, arg, a, (rank,), what)
    _validate.check_floating(op, arg, a)
    return a


def _seq_lengths(op: str, seq_lengths, steps: int, batch: int):
    """(the lengths as int32, the lengths as a tuple of ints where they are host data
    (NumPy, lists): known at trace time, they become part of the compiled call; () for
    jax arrays, whose values the device holds)."""
    host_data = isinstance(seq_lengths, (np.ndarray, list, tuple))
    lengths = jnp.asarray(seq_lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"{op}: seq_lengths must have shape (batch,) = ({batch},), one length "
                         f"per sequence of x; got shape {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{op}: seq_lengths must hold ints (int32); got {lengths.dtype}")
    try:  # traced lengths cannot be checked here (the reference clips them to [0, T])
        # (host data read as such: under jit, jnp.asarray of a NumPy array is a tracer)
        values = np.asarray(seq_lengths if host_data else lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        values = None
    shortest = min(1, steps)  # x of no timesteps holds sequences of length 0
    if values is not None and values.size and not (shortest <= values.min()
                                                   and values.max() <= steps):
        raise ValueError(f"{op}: seq_lengths must lie in [{shortest}, {steps}] (the timesteps "
                         f"of x); got {values.tolist()}")
    static = tuple(int(v) for v in values) if host_data and values is not None else ()
    return lengths.astype(jnp.int32), static


# ---- the public class ---------------------------------------------------------------------

class RNNBlock:
    """A multi-layer recurrent network on cuDNN's RNN API (Theano's RNNBlock).

    dtype: of the parameters and of the computation (float16, bfloat16, float32,
    float64; the 16-bit types compute in float32). hidden_size, num_layers: positive
    ints. rnn_mode: 'rnn_relu', 'rnn_tanh', 'lstm' or 'gru' (cuDNN's GRU: the reset gate
    scales R h + b_R). input_mode: 'linear' (the first layer multiplies its input by W) or
    'skip' (it has no input matrices and adds x itself: input_dim must equal hidden_size).
    direction_mode: 'unidirectional' or 'bidirectional' (each layer also runs from the last
    step to the first; outputs are [forward, backward] along the features).
    proj_size: lstm only, in [0, hidden_size): 0 for none, else each layer's hidden state
    is projected to proj_size features, h = P (o * tanh(c)) (cuDNN's projSize, PyTorch's
    `nn.LSTM(proj_size=...)`): hx, hy and y then have proj_size features per direction, the
    cell states cx and cy keep hidden_size, and layers above the first read
    proj_size * directions features.

    dropout: the probability p in [0, 1) of zeroing each output unit of every layer but
    the last, as PyTorch's `nn.LSTM(dropout=p)`; it acts only in calls given a
    `dropout_key` (training), see `apply`.

    `input_size` is (batch_size, input_dim), as in Theano; the parameters do not depend
    on batch_size.
    """

    def __init__(self, dtype, hidden_size, num_layers, rnn_mode, input_mode="linear",
                 direction_mode="unidirectional", proj_size=0, dropout=0.0):
        op = "RNNBlock"
        self.dtype = _block_dtype(op, dtype)
        self.hidden_size = _positive_int(op, "hidden_size", hidden_size)
        self.num_layers = _positive_int(op, "num_layers", num_layers)
        _validate.check_choice(op, "rnn_mode", rnn_mode, RNN_MODES)
        _validate.check_choice(op, "input_mode", input_mode, INPUT_MODES)
        _validate.check_choice(op, "direction_mode", direction_mode, DIRECTION_MODES)
        self.rnn_mode, self.input_mode, self.direction_mode = rnn_mode, input_mode, direction_mode
        self.proj_size = _proj_size(op, proj_size, self.hidden_size, rnn_mode)
        self.dropout = _validate.dropout_rate(op, dropout)
        if self.dropout and self.num_layers == 1:
            # As PyTorch: dropout acts between layers, so one layer has nowhere to apply it.
            warnings.warn(f"{op}: dropout={self.dropout} does nothing with num_layers=1 "
                          "(dropout acts between layers, after every layer but the last)",
                          stacklevel=2)

    def __repr__(self):
        extra = f", proj_size={self.proj_size}" if self.proj_size else ""
        extra += f", dropout={self.dropout}" if self.dropout else ""
        return (f"RNNBlock({self.dtype.name!r}, hidden_size={self.hidden_size}, "
                f"num_layers={self.num_layers}, rnn_mode={self.rnn_mode!r}, "
                f"input_mode={self.input_mode!r}, direction_mode={self.direction_mode!r}"
                f"{extra})")

    @property
    def bidirectional(self) -> bool:
        return self.direction_mode == "bidirectional"

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _out_size(self) -> int:
        """The features per direction of h and y: proj_size where there is a projection."""
        return self.proj_size or self.hidden_size

    @property
    def _gates(self) -> int:
        return reference.GATES[self.rnn_mode]

    @property
    def _cell(self) -> dict:
        return dict(mode=self.rnn_mode, input_mode=self.input_mode,
                    hidden_size=self.hidden_size, num_layers=self.num_layers,
                    bidirectional=self.bidirectional, proj_size=self.proj_size)

    def _check_input_dim(self, op: str, arg: str, input_dim: int) -> None:
        if self.input_mode == "skip" and input_dim != self.hidden_size:
            raise ValueError(f"{op}: input_mode='skip' adds the input to the first layer "
                             f"unprojected, so {arg} must equal hidden_size="
                             f"{self.hidden_size}; got {input_dim}")

    def _input_dim(self, op: str, input_size) -> int:
        try:
            batch_size, input_dim = input_size
        except (TypeError, ValueError):
            raise TypeError(f"{op}: input_size must be (batch_size, input_dim); "
                            f"got {input_size!r}") from None
        if not (_validate.is_int(batch_size) and _validate.is_int(input_dim)):
            raise TypeError(f"{op}: input_size must hold two ints (batch_size, input_dim); "
                            f"got {input_size!r}")
        if batch_size < 0 or input_dim < 1:
            raise ValueError(f"{op}: input_size=(batch_size, input_dim) needs batch_size >= 0 "
                             f"and input_dim >= 1; got {tuple(input_size)!r}")
        self._check_input_dim(op, "input_dim", int(input_dim))
        return int(input_dim)

    def _layout(self, input_dim: int) -> tuple[WeightEntry, ...]:
        return weight_layout(self.rnn_mode, self.hidden_size, self.num_layers, input_dim,
                             self.input_mode, self.bidirectional, self.proj_size)

    def _layer_input_dim(self, depth: int, input_dim: int) -> int:
        """The width of what layer `depth` reads (input_dim for the first layer): the one
        place that says so for the per-layer shapes and the per-layer calls of dropout."""
        return reference.layer_input_size(depth, input_dim, self._out_size,
                                          self.num_directions)

    def _layer_block(self, depth: int) -> "RNNBlock":
        """Layer `depth` alone (both directions), as a one-layer block: the same
        configuration (a copy, so that every attribute carries over), with the input mode
        only the first layer has and no dropout."""
        block = copy.copy(self)
        block.num_layers, block.dropout = 1, 0.0
        if depth > 0:
            block.input_mode = "linear"
        return block

    def _layer_weights(self, w, depth: int, input_dim: int):
        """Layer `depth`'s part of the block w, as the block of `_layer_block(depth)` for
        inputs of `_layer_input_dim(depth, input_dim)`. cuDNN puts every matrix of every
        layer before every bias, so a layer's weights are two ranges of w (its matrices,
        its biases), not one: each entry of the one-layer layout is taken from the matching
        entry (pseudo-layer, linLayerID, kind) of the full one, adjacent ranges joined."""
        directions = self.num_directions
        full = {(e.pseudo_layer, e.lin_id, e.kind): e for e in self._layout(input_dim)}
        single = self._layer_block(depth)._layout(self._layer_input_dim(depth, input_dim))
        runs: list[list[int]] = []
        for e in single:
            source = full[(depth * directions + e.pseudo_layer, e.lin_id, e.kind)]
            assert source.shape == e.shape, (source, e)
            if runs and runs[-1][1] == source.offset:
                runs[-1][1] += source.size
            else:
                runs.append([source.offset, source.offset + source.size])
        pieces = [w[start:stop] for start, stop in runs]
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)

    def _layer_shapes(self, layer: int, input_dim: int) -> list[tuple | None]:
        """Shapes of split_params(w, layer, ...), in Theano's view (None: absent)."""
        gates, hidden, out = self._gates, self.hidden_size, self._out_size
        depth = layer // self.num_directions
        in_dim = self._layer_input_dim(depth, input_dim)
        skipped = depth == 0 and self.input_mode == "skip"
        shapes = []
        for lin_id in range(2 * gates):
            is_input = lin_id < gates
            shapes.append(None if is_input and skipped else
                          (in_dim if is_input else out, hidden))
            shapes.append((hidden,))
        if self.proj_size:  # the projection, applied as (o * tanh(c)) @ P
            shapes.append((hidden, self.proj_size))
        return shapes

    def weight_layout(self, input_size) -> tuple[WeightEntry, ...]:
        """cuDNN's layout of the block: (pseudo_layer, lin_id, kind, offset, shape) for every
        matrix and bias, offsets in elements (see jaxdnn.rnn.weight_layout)."""
        return self._layout(self._input_dim("RNNBlock.weight_layout", input_size))

    def get_param_size(self, input_size) -> int:
        """The number of elements of the parameter block for inputs of `input_size` =
        (batch_size, input_dim)."""
        input_dim = self._input_dim("RNNBlock.get_param_size", input_size)
        return reference.param_size(self.rnn_mode, self.hidden_size, self.num_layers,
                                    input_dim, self.input_mode, self.bidirectional,
                                    self.proj_size)

    def _check_block(self, op: str, w, input_dim: int):
        w = _check_array(op, "w", w, 1, " (the opaque parameter block)")
        size = reference.param_size(self.rnn_mode, self.hidden_size, self.num_layers,
                                    input_dim, self.input_mode, self.bidirectional,
                                    self.proj_size)
        if w.shape[0] != size:
            raise ValueError(f"{op}: w has {w.shape[0]} elements but this block needs "
                             f"get_param_size((batch_size, {input_dim})) = {size} for "
                             f"input_dim {input_dim}")
        return w

    def split_params(self, w, layer, input_size) -> list:
        """Layer `layer`'s weights and biases, `[W0, b0, W1, b1, ...]` in Theano's order
        (cuDNN's linLayerIDs: input matrices for every gate, then recurrent ones; lstm
        gates i, f, newmem, o; gru reset, update, newmem). Each W is (input_dim, hidden)
        (input) or (hidden, hidden) (recurrent), applied as x @ W; each b is (hidden,).
        A bidirectional block has 2 * num_layers layers (layer = 2 * depth + direction).
        With input_mode='skip', the first layer's input matrices do not exist: None.
        With proj_size > 0 the recurrent W are (proj_size, hidden), the input W of layers
        above the first (proj_size * directions, hidden), and the list ends with the
        projection P (hidden, proj_size) (cuDNN's linLayerID 8), applied as
        (o * tanh(c)) @ P, without a bias.
        """
        op = "RNNBlock.split_params"
        input_dim = self._input_dim(op, input_size)
        w = self._check_block(op, w, input_dim)
        layer = self._layer_index(op, layer)
        result = [None] * (4 * self._gates + (1 if self.proj_size else 0))
        for e in self._layout(input_dim):
            if e.pseudo_layer == layer:
                piece = w[e.offset:e.offset + e.size].reshape(e.shape)
                result[2 * e.lin_id + (e.kind == "bias")] = piece.T if e.kind == "matrix" else piece
        return result

    def _layer_index(self, op: str, layer) -> int:
        layers = self.num_layers * self.num_directions
        if not _validate.is_int(layer):
            raise TypeError(f"{op}: layer must be an int; got {layer!r}")
        if not 0 <= layer < layers:
            raise ValueError(f"{op}: layer={layer} must lie in [0, {layers}) "
                             f"(num_layers * directions)")
        return int(layer)

    def merge_params(self, layers: Sequence[Sequence], input_size):
        """The parameter block from every layer's `split_params` list (the inverse of
        split_params): `layers[i]` for layer i, arrays in Theano's view."""
        op = "RNNBlock.merge_params"
        input_dim = self._input_dim(op, input_size)
        layers = [list(entries) for entries in layers]
        expected_layers = self.num_layers * self.num_directions
        if len(layers) != expected_layers:
            raise ValueError(f"{op}: layers must hold {expected_layers} lists, one per layer "
                             f"(num_layers * directions); got {len(layers)}")
        for i, entries in enumerate(layers):
            shapes = self._layer_shapes(i, input_dim)
            if len(entries) != len(shapes):
                raise ValueError(f"{op}: layers[{i}] must hold {len(shapes)} arrays "
                                 f"[W0, b0, W1, b1, ...]; got {len(entries)}")
            for k, (value, shape) in enumerate(zip(entries, shapes)):
                if shape is None and value is not None:
                    raise ValueError(f"{op}: layers[{i}][{k}] must be None: with "
                                     "input_mode='skip' the first layer has no input matrices")
                if shape is not None and np.shape(value) != shape:
                    raise ValueError(f"{op}: layers[{i}][{k}] must have shape {shape}; got "
                                     f"{None if value is None else np.shape(value)}")
        pieces = []
        for e in self._layout(input_dim):  # in order of offset
            value = jnp.asarray(layers[e.pseudo_layer][2 * e.lin_id + (e.kind == "bias")])
            pieces.append((value.T if e.kind == "matrix" else value).reshape(e.size))
        return jnp.concatenate([p.astype(self.dtype) for p in pieces])

    def init_params(self, key, input_size):
        """A random block: every weight and bias uniform in [-1/sqrt(hidden),
        1/sqrt(hidden)] (the usual initialization of these cells)."""
        size = self.get_param_size(input_size)
        bound = 1.0 / math.sqrt(self.hidden_size)
        values = jax.random.uniform(key, (size,), reference.compute_dtype(self.dtype),
                                    -bound, bound)
        return values.astype(self.dtype)

    def apply(self, w, x, hx, cx=None, seq_lengths=None, *, dropout_key=None):
        """Run the network: w the block, x (timesteps, batch, input_dim), hx (and, for
        lstm, cx) (num_layers * directions, batch, hidden). Returns (y, hy), or (y, hy, cy)
        for lstm: y (timesteps, batch, hidden * directions), the forward direction's
        features first; hy and cy the final states, layer by layer. With proj_size > 0,
        hx, hy and y have proj_size features per direction in place of hidden (as in
        PyTorch); cx and cy keep hidden.

        seq_lengths: optional ints (batch,) for right-padded batches: sequence n has
        seq_lengths[n] valid steps; y is zero past them and hy/cy are the states at each
        sequence's last valid step; the backward direction starts at that step. Concrete
        lengths must lie in [1, timesteps]; traced ones cannot be checked at trace time
        (outside that range the XLA path treats a length as clipped to [0, timesteps],
        where 0 leaves the state at hx; the cuDNN path fails the call with an error). On
        cuDNN, lengths given as a jax array cost one host synchronization per call; lengths
        given as NumPy values (known at trace time, compiled into the call) and calls
        without seq_lengths cost none (see the module docstring).

        dropout_key: a JAX PRNG key (`jax.random.key` or `jax.random.PRNGKey`) turns the
        block's `dropout` on, as PyTorch's training mode does: training = give a key;
        evaluation = give none. With a key, dropout > 0 and num_layers > 1, the output of
        layer d (every layer but the last) is multiplied by `mask / (1 - dropout)` before
        layer d + 1 reads it, mask = `jax.random.bernoulli(jax.random.fold_in(dropout_key,
        d), np.float32(1 - dropout), y_d.shape)`, y_d (timesteps, batch, hidden *
        directions) that layer's output; y (the last layer's output), hy and cy are not
        masked. The same key gives the same masks on both paths: cuDNN's own dropout draws
        them from a generator XLA cannot reproduce, so the layers then run one call each
        (one cuDNN call per layer, both directions in it) and jax.random draws the masks
        between them. Without a key, or with dropout 0, the network runs as one call.

        The computation runs in the block's dtype: floating inputs of another dtype are
        converted to it, and so are the results. Differentiable in w, x, hx and cx.
        """
        op = "RNNBlock.apply"
        x = _check_array(op, "x", x, 3, " (timesteps, batch, input_dim)")
        steps, batch, input_dim = x.shape
        self._check_input_dim(op, "x.shape[2] (input_dim)", input_dim)
        w = self._check_block(op, w, input_dim)
        cell_shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        state_shape = cell_shape[:2] + (self._out_size,)
        h_size = "proj_size" if self.proj_size else "hidden"
        hx = _check_array(op, "hx", hx, 3, f" (num_layers * directions, batch, {h_size})")
        if hx.shape != state_shape:
            raise ValueError(f"{op}: hx must have shape (num_layers * directions, batch, "
                             f"{h_size}) = {state_shape}; got {hx.shape}")
        lstm = self.rnn_mode == "lstm"
        if lstm and cx is None:
            raise ValueError(f"{op}: rnn_mode='lstm' needs the initial cell state cx")
        if not lstm and cx is not None:
            raise ValueError(f"{op}: cx is the initial cell state of an lstm; "
                             f"rnn_mode={self.rnn_mode!r} has none")
        if lstm:
            cx = _check_array(op, "cx", cx, 3, " (num_layers * directions, batch, hidden)")
            if cx.shape != cell_shape:
                raise ValueError(f"{op}: cx must have shape (num_layers * directions, batch, "
                                 f"hidden) = {cell_shape}; got {cx.shape}")
        static_lengths = ()
        if seq_lengths is not None:
            seq_lengths, static_lengths = _seq_lengths(op, seq_lengths, steps, batch)
        if dropout_key is not None:
            dropout_key = _check_key(op, "dropout_key", dropout_key)

        dtype = self.dtype
        x, hx, w = x.astype(dtype), hx.astype(dtype), w.astype(dtype)
        cx = cx.astype(dtype) if lstm else None
        if steps == 0 or batch == 0:  # no step to take: the states stay the initial ones
            y = jnp.zeros((steps, batch, self.num_directions * self._out_size), dtype)
            return (y, hx, cx) if lstm else (y, hx)
        if dropout_key is not None and self.dropout and self.num_layers > 1:
            y, hy, cy = self._run_with_dropout(op, w, x, hx, cx, seq_lengths, static_lengths,
                                               dropout_key)
        else:
            y, hy, cy = self._run(op, w, x, hx, cx, seq_lengths, static_lengths)
        return (y, hy, cy) if lstm else (y, hy)

    def _run(self, op, w, x, hx, cx, seq_lengths, static_lengths):
        """The whole network as one call (cuDNN's or the XLA path's) on checked operands
        of the block's dtype, not empty -> (y, hy, cy or None)."""
        steps, batch, _ = x.shape
        impl = _implementation(op, x.shape, (steps, batch, self.num_directions * self._out_size),
                               w.shape)
        if impl == "xla":
            return reference.rnn(x, hx, cx, w, seq_lengths, **self._cell)
        return self._apply_cudnn(w, x, hx, cx, seq_lengths, static_lengths, impl)

    def _run_with_dropout(self, op, w, x, hx, cx, seq_lengths, static_lengths, key):
        """The network one layer at a time (`_run` of each layer's one-layer block on its
        part of w), each output but the last one's dropped out with masks from `key`
        (see `apply`). hy and cy are the layers' final states in the fused call's order
        (layer by layer, directions within); a padded step's output is zero in every
        layer, so it stays zero through the mask, as in the fused call."""
        directions, input_dim = self.num_directions, x.shape[2]
        keep = np.float32(1.0 - self.dropout)  # float32 whatever jax_enable_x64 says
        layer_input, hy, cy = x, [], []
        for depth in range(self.num_layers):
            states = slice(depth * directions, (depth + 1) * directions)
            y, h, c = self._layer_block(depth)._run(
                op, self._layer_weights(w, depth, input_dim), layer_input, hx[states],
                None if cx is None else cx[states], seq_lengths, static_lengths)
            hy.append(h)
            cy.append(c)
            if depth < self.num_layers - 1:
                mask = jax.random.bernoulli(jax.random.fold_in(key, depth), keep, y.shape)
                # Scaled in the compute dtype (float32 for the 16-bit types), rounded once.
                scaled = y.astype(reference.compute_dtype(y.dtype)) / (1.0 - self.dropout)
                y = jnp.where(mask, scaled, 0).astype(y.dtype)
            layer_input = y
        return layer_input, jnp.concatenate(hy), (None if cx is None else jnp.concatenate(cy))

    def _apply_cudnn(self, w, x, hx, cx, seq_lengths, static_lengths, impl):
        dtype = self.dtype
        work = (jnp.dtype(jnp.float32) if dtype == jnp.bfloat16 and not _cudnn_takes_bfloat16()
                else dtype)
        if cx is None:  # the primitives always carry a cell state; empty without one
            cx = jnp.zeros(hx.shape[:2] + (0,), work)
        lengths = (jnp.full((x.shape[1],), x.shape[0], jnp.int32) if seq_lengths is None
                   else seq_lengths)
        algo = config_module.read("dnn.rnn.algo")
        if self.proj_size and algo != "standard":
            raise ValueError(f"RNNBlock.apply: proj_size={self.proj_size} runs on cuDNN's "
                             f"standard algorithm only; dnn.rnn.algo={algo!r}")
        config = _Config(**self._cell, algo=algo,
                         variable_lengths=seq_lengths is not None, allow_tf32=config_module.allows_tf32(),
                         static_lengths=static_lengths, impl=impl)
        y, hy, cy = _cudnn_rnn(x.astype(work), hx.astype(work), cx.astype(work),
                               w.astype(work), lengths, config,
                               config_module.read("dnn.rnn.cuda_graph"))
        return y.astype(dtype), hy.astype(dtype), cy.astype(dtype)
