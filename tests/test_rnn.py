"""RNNBlock against the NumPy float64 loops in tests/oracles/rnn.py: cuDNN's weight layout,
split/merge, forward values for every cell, direction, input mode and depth, with and
without variable lengths, gradients (check_grads) in both modes, jit/grad/vmap, errors. The
cuDNN path's primitives (JVP and transpose rules, batching rules, reserve-space plumbing,
CUDA lowering) are also run on the CPU, through their reference lowerings, with the
handlers' presence stubbed.
`gpu`-marked tests compare the cuDNN path with the XLA path and float64."""
from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxdnn
from oracles import rnn as ref
from helpers import FLOAT_DTYPES, assert_close, cast, fake_temp_space_sizes, to_f64, xla_path
from helpers import jit_run as _jit_run
from jaxdnn import _extension
from jaxdnn import rnn as rnn_module
from jaxdnn.rnn import FFI_TARGETS, RNNBlock, WeightEntry, weight_layout

MODES = ("rnn_relu", "rnn_tanh", "lstm", "gru")
DIRECTIONS = ("unidirectional", "bidirectional")
INPUT_MODES = ("linear", "skip")
STEPS, BATCH, INPUT_DIM, HIDDEN = 4, 3, 2, 3
LENGTHS = np.array([4, 1, 3])  # right-padded sequences: full, a single step, in between

every_config = pytest.mark.parametrize(
    "mode,direction,input_mode,depth",
    list(itertools.product(MODES, DIRECTIONS, INPUT_MODES, (1, 2))))


@pytest.fixture(autouse=True)
def _gpu_tests_in_full_float32(request):
    """gpu tests compare float32 results at float32's tolerance: no TF32 tensor cores, on
    the cuDNN path (allow_tf32=0) or on XLA's."""
    if request.node.get_closest_marker("gpu"):
        with jax.default_matmul_precision("highest"):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------
# Building blocks, parameters and inputs
# ---------------------------------------------------------------------------------------
def make_block(mode, direction="unidirectional", input_mode="linear", depth=1,
               dtype="float64", hidden=HIDDEN, proj=0):
    return RNNBlock(dtype, hidden, depth, mode, input_mode, direction, proj)


def input_dim_of(block):
    return block.hidden_size if block.input_mode == "skip" else INPUT_DIM


def seed_shapes(block, layer, input_dim):
    """split_params' shapes for one layer, written out from Theano's description (and, with
    a projection, PyTorch's: h of proj features, read by the recurrence and the next layer,
    and the projection (hidden, proj) last)."""
    gates, hidden = ref.GATES[block.rnn_mode], block.hidden_size
    out = block.proj_size or hidden
    directions = 2 if block.direction_mode == "bidirectional" else 1
    depth = layer // directions
    in_dim = input_dim if depth == 0 else directions * out
    shapes = []
    for k in range(2 * gates):
        if k < gates:
            skipped = block.input_mode == "skip" and depth == 0
            shapes.append(None if skipped else (in_dim, hidden))
        else:
            shapes.append((out, hidden))
        shapes.append((hidden,))
    if block.proj_size:
        shapes.append((hidden, block.proj_size))
    return shapes


def random_layers(rng, block, input_dim, scale=0.6):
    count = block.num_layers * block.num_directions
    return [[None if s is None else scale * rng.standard_normal(s)
             for s in seed_shapes(block, p, input_dim)] for p in range(count)]


def random_states(rng, block, steps=STEPS, batch=BATCH, input_dim=None):
    input_dim = input_dim_of(block) if input_dim is None else input_dim
    count = block.num_layers * block.num_directions
    x = rng.standard_normal((steps, batch, input_dim))
    hx = 0.5 * rng.standard_normal((count, batch, block.proj_size or block.hidden_size))
    cx = (0.5 * rng.standard_normal((count, batch, block.hidden_size))
          if block.rnn_mode == "lstm" else None)
    return x, hx, cx


def make_case(rng, block, dtype="float64", **kwargs):
    """(layers, w, (x, hx, cx), (x64, hx64, cx64)): random parameters as the block holds
    them (in dtype) and as layers in float64, and inputs as jax arrays of dtype with their
    float64 NumPy copies (the same rounded values); cx is None but for lstm."""
    input_dim = input_dim_of(block)
    w = block.merge_params(random_layers(rng, block, input_dim), (BATCH, input_dim))
    count = block.num_layers * block.num_directions
    layers = [[None if a is None else to_f64(a)
               for a in block.split_params(w, p, (BATCH, input_dim))] for p in range(count)]
    pairs = [None if a is None else cast(a, dtype)
             for a in random_states(rng, block, input_dim=input_dim, **kwargs)]
    return (layers, w, tuple(None if p is None else p[0] for p in pairs),
            tuple(None if p is None else p[1] for p in pairs))


def numpy_rnn(block, layers, x, hx, cx=None, seq_lengths=None):
    return ref.rnn(layers, x, hx, cx, seq_lengths, mode=block.rnn_mode,
                   bidirectional=block.direction_mode == "bidirectional")


def compare(got, want, dtype, factor=1.0, what=""):
    """got: apply's (y, hy[, cy]); want: the reference's (y, hy, cy or None)."""
    assert len(got) == (3 if want[2] is not None else 2)
    for name, a, b in zip(("y", "hy", "cy"), got, want):
        assert a.dtype == jnp.dtype(dtype), (name, a.dtype)
        assert_close(a, b, dtype, factor=factor, err_msg=f"{what} {name}")


def apply_fn(block, seq_lengths=None):
    """apply as a function of the differentiable operands only: (w, x, hx[, cx])."""
    if block.rnn_mode == "lstm":
        return lambda w, x, hx, cx: block.apply(w, x, hx, cx, seq_lengths)
    return lambda w, x, hx: block.apply(w, x, hx, None, seq_lengths)


def operands(block, w, x, hx, cx):
    return (w, x, hx, cx) if block.rnn_mode == "lstm" else (w, x, hx)


# ---------------------------------------------------------------------------------------
# cuDNN's weight layout, split and merge
# ---------------------------------------------------------------------------------------
def test_layout_by_hand():
    """One lstm layer, hidden 2, input 3: 4 W (2x3) at 0, 6, 12, 18, 4 R (2x2) at 24 to
    36, then the 8 biases from 40 (W biases first), 56 elements in all."""
    layout = weight_layout("lstm", 2, 1, 3)
    matrices = [(e.lin_id, e.offset, e.shape) for e in layout if e.kind == "matrix"]
    assert matrices == [(0, 0, (2, 3)), (1, 6, (2, 3)), (2, 12, (2, 3)), (3, 18, (2, 3)),
                        (4, 24, (2, 2)), (5, 28, (2, 2)), (6, 32, (2, 2)), (7, 36, (2, 2))]
    biases = [(e.lin_id, e.offset, e.shape) for e in layout if e.kind == "bias"]
    assert biases == [(k, 40 + 2 * k, (2,)) for k in range(8)]
    assert RNNBlock("float32", 2, 1, "lstm").get_param_size((5, 3)) == 56
    assert layout[0] == WeightEntry(0, 0, "matrix", 0, (2, 3))  # plain tuples compare too
    assert layout[0] == (0, 0, "matrix", 0, (2, 3))


def test_layout_by_hand_bidirectional_skip_gru():
    """Two gru layers, both directions, skip input (hidden 2): pseudo-layers 0 and 1 have
    only their R matrices; pseudo-layers 2 and 3 read 4 features (2 x hidden)."""
    layout = weight_layout("gru", 2, 2, 2, "skip", True)
    matrices = [(e.pseudo_layer, e.lin_id, e.offset, e.shape)
                for e in layout if e.kind == "matrix"]
    assert matrices == [
        (0, 3, 0, (2, 2)), (0, 4, 4, (2, 2)), (0, 5, 8, (2, 2)),
        (1, 3, 12, (2, 2)), (1, 4, 16, (2, 2)), (1, 5, 20, (2, 2)),
        (2, 0, 24, (2, 4)), (2, 1, 32, (2, 4)), (2, 2, 40, (2, 4)),
        (2, 3, 48, (2, 2)), (2, 4, 52, (2, 2)), (2, 5, 56, (2, 2)),
        (3, 0, 60, (2, 4)), (3, 1, 68, (2, 4)), (3, 2, 76, (2, 4)),
        (3, 3, 84, (2, 2)), (3, 4, 88, (2, 2)), (3, 5, 92, (2, 2))]
    biases = [(e.pseudo_layer, e.lin_id, e.offset) for e in layout if e.kind == "bias"]
    assert biases == [(p, k, 96 + 12 * p + 2 * k) for p in range(4) for k in range(6)]
    assert RNNBlock("float32", 2, 2, "gru", "skip", "bidirectional").get_param_size((1, 2)) == 144


@every_config
def test_layout_tiles_the_block_in_cudnn_order(mode, direction, input_mode, depth):
    block = make_block(mode, direction, input_mode, depth)
    input_dim = input_dim_of(block)
    layout = block.weight_layout((BATCH, input_dim))
    assert layout == weight_layout(mode, HIDDEN, depth, input_dim, input_mode,
                                   direction == "bidirectional")
    # contiguous from 0 to the parameter count, no gap and no overlap
    offset = 0
    for e in layout:
        assert e.offset == offset
        offset += int(np.prod(e.shape))
    size = block.get_param_size((BATCH, input_dim))
    assert offset == size == ref.param_count(mode, HIDDEN, depth, input_dim,
                                             input_mode == "skip", direction == "bidirectional")
    # every matrix before every bias; within each, by pseudo-layer then linLayerID
    kinds = [e.kind for e in layout]
    assert kinds == sorted(kinds, key=lambda k: k == "bias")
    for kind in ("matrix", "bias"):
        keys = [(e.pseudo_layer, e.lin_id) for e in layout if e.kind == kind]
        assert keys == sorted(keys)
    # cuDNN's shapes: (hidden, in) for W, (hidden, hidden) for R, (hidden,) for biases;
    # with skip input, no W in the first layer
    gates = ref.GATES[mode]
    for e in layout:
        if e.kind == "bias":
            assert e.shape == (HIDDEN,)
            continue
        seed = seed_shapes(block, e.pseudo_layer, input_dim)[2 * e.lin_id]
        assert seed is not None and e.shape == seed[::-1]
    pseudo_layers = depth * block.num_directions
    first = range(block.num_directions)
    expected_matrices = sum(gates if (input_mode == "skip" and p in first) else 2 * gates
                            for p in range(pseudo_layers))
    assert kinds.count("matrix") == expected_matrices
    assert kinds.count("bias") == 2 * gates * pseudo_layers


@every_config
def test_split_and_merge_are_inverses(rng, mode, direction, input_mode, depth):
    block = make_block(mode, direction, input_mode, depth)
    input_dim = input_dim_of(block)
    size = (BATCH, input_dim)
    layers = random_layers(rng, block, input_dim)
    w = block.merge_params(layers, size)
    assert w.shape == (block.get_param_size(size),) and w.dtype == jnp.float64
    for p, entries in enumerate(layers):
        split = block.split_params(w, p, size)
        assert len(split) == len(entries)
        for got, want in zip(split, entries):
            if want is None:
                assert got is None
            else:
                np.testing.assert_array_equal(got, want)
    again = block.merge_params([block.split_params(w, p, size) for p in range(len(layers))], size)
    np.testing.assert_array_equal(again, w)
    # merge writes cuDNN's (hidden, in) matrix, row-major, at the layout's offset
    for e in block.weight_layout(size):
        piece = np.asarray(w[e.offset:e.offset + int(np.prod(e.shape))]).reshape(e.shape)
        value = layers[e.pseudo_layer][2 * e.lin_id + (e.kind == "bias")]
        np.testing.assert_array_equal(piece, value.T if e.kind == "matrix" else value)


def test_split_params_works_under_jit(rng):
    block = make_block("gru", "bidirectional", depth=2)
    layers = random_layers(rng, block, INPUT_DIM)
    w = block.merge_params(layers, (BATCH, INPUT_DIM))
    split = jax.jit(lambda w: block.split_params(w, 3, (BATCH, INPUT_DIM)))(w)
    for got, want in zip(split, layers[3]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_init_params(dtype):
    block = make_block("lstm", "bidirectional", dtype=dtype)
    size = (BATCH, INPUT_DIM)
    w = block.init_params(jax.random.key(0), size)
    assert w.shape == (block.get_param_size(size),) and w.dtype == jnp.dtype(dtype)
    values = to_f64(w)
    bound = 1 / np.sqrt(HIDDEN)
    assert np.all(np.isfinite(values)) and np.all(np.abs(values) <= bound * 1.01)
    assert values.std() > bound / 4  # spread over the range, not constant
    assert not np.array_equal(values, to_f64(block.init_params(jax.random.key(1), size)))
    # usable: a forward pass gives finite outputs
    x, hx, cx = random_states(np.random.default_rng(0), block)
    outs = jax.jit(block.apply)(w, x.astype(dtype), hx.astype(dtype), cx.astype(dtype))
    assert all(np.all(np.isfinite(to_f64(o))) for o in outs)


# ---------------------------------------------------------------------------------------
# Forward values
# ---------------------------------------------------------------------------------------
@every_config
def test_forward_matches_numpy(rng, mode, direction, input_mode, depth):
    block = make_block(mode, direction, input_mode, depth)
    layers, w, (x, hx, cx), (x64, hx64, cx64) = make_case(rng, block)
    got = jax.jit(block.apply)(w, x, hx, cx)
    compare(got, numpy_rnn(block, layers, x64, hx64, cx64), "float64")


@pytest.mark.parametrize("direction,input_mode", [("unidirectional", "linear"),
                                                  ("bidirectional", "skip")])
@pytest.mark.parametrize("mode", MODES)
def test_forward_with_lengths_matches_numpy(rng, mode, direction, input_mode):
    block = make_block(mode, direction, input_mode, depth=2)
    layers, w, (x, hx, cx), (x64, hx64, cx64) = make_case(rng, block)
    got = jax.jit(block.apply)(w, x, hx, cx, jnp.asarray(LENGTHS, jnp.int32))
    compare(got, numpy_rnn(block, layers, x64, hx64, cx64, LENGTHS), "float64")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_forward_dtypes(rng, mode, dtype):
    """Half types compute in float32 and round the results once; compared with float64
    on the same rounded parameters and inputs."""
    block = make_block(mode, "bidirectional", dtype=dtype)
    layers, w, (x, hx, cx), (x64, hx64, cx64) = make_case(rng, block, dtype)
    assert w.dtype == jnp.dtype(dtype)
    got = jax.jit(block.apply)(w, x, hx, cx, LENGTHS)
    compare(got, numpy_rnn(block, layers, x64, hx64, cx64, LENGTHS), dtype, factor=2)


def test_inputs_of_another_dtype_run_in_the_blocks_dtype(rng):
    block = make_block("gru", dtype="float32")
    _, w, (x, hx, _), _ = make_case(rng, block)
    y, hy = block.apply(w.astype(jnp.float64), x, hx)  # float64 inputs, float32 block
    assert y.dtype == hy.dtype == jnp.float32
    y32, _ = block.apply(w.astype(jnp.float32), x.astype(jnp.float32), hx.astype(jnp.float32))
    np.testing.assert_array_equal(y, y32)


def test_variable_lengths_equal_running_each_sequence_alone(rng):
    """Each sequence of a padded batch gives what it gives alone (no lengths), cut to its
    length: the backward direction starts at its own last step, y is zero past it, hy/cy
    are taken there."""
    block = make_block("lstm", "bidirectional", depth=2)
    layers, w, (x, hx, cx), (x64, hx64, cx64) = make_case(rng, block)
    y, hy, cy = jax.jit(block.apply)(w, x, hx, cx, LENGTHS)
    for n, length in enumerate(LENGTHS):
        alone = numpy_rnn(block, layers, x64[:length, n:n + 1], hx64[:, n:n + 1],
                          cx64[:, n:n + 1])
        assert_close(y[:length, n], alone[0][:, 0], "float64")
        np.testing.assert_array_equal(y[length:, n], 0)
        assert_close(hy[:, n], alone[1][:, 0], "float64")
        assert_close(cy[:, n], alone[2][:, 0], "float64")


def test_full_lengths_equal_no_lengths(rng):
    block = make_block("gru", "bidirectional", depth=2)
    _, w, (x, hx, _), _ = make_case(rng, block)
    both = jax.jit(lambda w, x, hx: (block.apply(w, x, hx, seq_lengths=np.full(BATCH, STEPS)),
                                     block.apply(w, x, hx)))
    full, without = both(w, x, hx)
    for a, b in zip(full, without):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)


def test_gru_resets_after_the_recurrent_product():
    """hidden 1, input 1, every weight 1, the new-memory recurrent bias 2, x = 1, h = 0.5:
    cuDNN's n = tanh(W x + b_W + r (R h + b_R)) = tanh(1 + 2.5 r), not tanh(1 + 0.5 r + 2)."""
    block = RNNBlock("float64", 1, 1, "gru")
    one, zero = np.ones((1, 1)), np.zeros(1)
    layer = [one, zero, one, zero, one, zero, one, zero, one, zero, one, np.array([2.0])]
    w = block.merge_params([layer], (1, 1))
    y, hy = block.apply(w, np.ones((1, 1, 1)), np.full((1, 1, 1), 0.5))
    r = z = 1 / (1 + np.exp(-1.5))
    n = np.tanh(1 + r * 2.5)
    np.testing.assert_allclose(y[0, 0, 0], (1 - z) * n + z * 0.5, rtol=1e-14)
    np.testing.assert_allclose(hy[0, 0, 0], y[0, 0, 0], rtol=1e-14)


def test_skip_input_adds_the_input_unprojected(rng):
    """rnn_tanh with skip input, no recurrent weights and zero biases: h_t = tanh(x_t)."""
    block = RNNBlock("float64", 3, 1, "rnn_tanh", "skip")
    zeros = [None, np.zeros(3), np.zeros((3, 3)), np.zeros(3)]
    w = block.merge_params([zeros], (BATCH, 3))
    x = rng.standard_normal((STEPS, BATCH, 3))
    y, hy = block.apply(w, x, np.zeros((1, BATCH, 3)))
    np.testing.assert_allclose(y, np.tanh(x), rtol=1e-14)
    # the input biases are added to x
    biased = block.merge_params([[None, np.full(3, 0.25), np.zeros((3, 3)), np.zeros(3)]],
                                (BATCH, 3))
    np.testing.assert_allclose(block.apply(biased, x, np.zeros((1, BATCH, 3)))[0],
                               np.tanh(x + 0.25), rtol=1e-14)


@pytest.mark.parametrize("steps,batch", [(0, BATCH), (STEPS, 0)])
def test_empty_sequences_keep_the_initial_state(rng, steps, batch):
    block = make_block("lstm", "bidirectional", depth=2)
    w = make_case(rng, block)[1]
    x, hx, cx = random_states(rng, block, steps=steps, batch=batch)
    y, hy, cy = block.apply(w, x, hx, cx)
    assert y.shape == (steps, batch, 2 * HIDDEN)
    np.testing.assert_array_equal(hy, hx)
    np.testing.assert_array_equal(cy, cx)


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------
# Per cell: both directions, both input modes, one and two layers, with and without lengths.
GRAD_CASES = [case for mode in MODES for case in (
    (mode, "unidirectional", "linear", 2, True),
    (mode, "bidirectional", "skip", 1, False))]


@pytest.mark.parametrize("mode,direction,input_mode,depth,variable", GRAD_CASES)
def test_check_grads(rng, mode, direction, input_mode, depth, variable):
    block = make_block(mode, direction, input_mode, depth)
    _, w, (x, hx, cx), _ = make_case(rng, block)
    fn = jax.jit(apply_fn(block, LENGTHS if variable else None))
    check_grads(fn, operands(block, w, x, hx, cx), order=1, modes=["rev"])


# ---------------------------------------------------------------------------------------
# Transformations, on the XLA path and on the cuDNN path's primitives (run on the CPU
# through their reference lowerings)
# ---------------------------------------------------------------------------------------
@pytest.fixture(params=["xla", "cudnn_on_cpu"])
def path(request):
    """Runs a test on the XLA path and on the cuDNN path's primitives."""
    if request.param == "cudnn_on_cpu":
        request.getfixturevalue("cudnn_on_cpu")
    return request.param


def _uses_primitives(fn, *args) -> bool:
    return "jaxdnn_rnn_fwd" in str(jax.make_jaxpr(fn)(*args))


def _sum_of_sines(outputs):
    return sum(jnp.sum(jnp.sin(o)) for o in outputs)


# The blocks of the transformation tests, and their gradients on the XLA path as oracles,
# jitted once for all of them (compiling dominates these tests' time).
LSTM = make_block("lstm", "bidirectional")
GRU = make_block("gru", "bidirectional", "skip")


@functools.lru_cache(maxsize=None)
def xla_gradient(block, with_lengths=True):
    """jit(grad) of the sum of sines of every output, w.r.t. every operand, on the XLA path
    (call it inside `xla_path()`)."""
    fn = apply_fn(block, LENGTHS if with_lengths else None)
    argnums = (0, 1, 2, 3) if block.rnn_mode == "lstm" else (0, 1, 2)
    return jax.jit(jax.grad(lambda *a: _sum_of_sines(fn(*a)), argnums=argnums))


def test_eager_jit_grad_and_the_path_taken(rng, path):
    layers, w, (x, hx, cx), (x64, hx64, cx64) = make_case(rng, LSTM)
    fn = apply_fn(LSTM, LENGTHS)
    assert _uses_primitives(fn, w, x, hx, cx) == (path == "cudnn_on_cpu")
    want = numpy_rnn(LSTM, layers, x64, hx64, cx64, LENGTHS)
    compare(jax.jit(fn)(w, x, hx, cx), want, "float64", what="jit")
    small = make_block("gru")  # op by op is slow to compile: a small block
    small_layers, small_w, (x1, hx1, _), (x64, hx64, _) = make_case(rng, small)
    compare(small.apply(small_w, x1, hx1, None, LENGTHS),
            numpy_rnn(small, small_layers, x64, hx64, None, LENGTHS), "float64", what="eager")
    grads = jax.jit(jax.grad(lambda *a: _sum_of_sines(fn(*a)), argnums=(0, 1, 2, 3)))(
        w, x, hx, cx)
    with xla_path():
        expected = xla_gradient(LSTM)(w, x, hx, cx)
    for g, e in zip(grads, expected):
        assert_close(g, e, "float64")


def test_check_grads_on_the_cudnn_primitives(rng, cudnn_on_cpu):
    _, w, (x, hx, _), _ = make_case(rng, GRU)
    fn = jax.jit(apply_fn(GRU, LENGTHS))
    assert _uses_primitives(fn, w, x, hx)
    check_grads(fn, (w, x, hx), order=1, modes=["rev"])


def test_second_order_on_the_cudnn_path_goes_through_xla(rng, cudnn_on_cpu):
    block = make_block("lstm")
    _, w, (x, hx, cx), _ = make_case(rng, block)
    fn = apply_fn(block, LENGTHS)
    penalty = lambda w: jnp.sum(jax.grad(lambda x: jnp.sum(fn(w, x, hx, cx)[0] ** 2))(x) ** 2)
    got = jax.jit(jax.grad(penalty))(w)
    with xla_path():
        want = jax.jit(jax.grad(penalty))(w)
    assert_close(got, want, "float64")


def test_inside_scan_and_checkpoint(rng, path):
    """The sequences in two halves, a rematerialized lax.scan step each, carrying (h, c):
    the same values and gradients as one pass over the whole sequences."""
    block = make_block("lstm")
    layers, w, (x, hx, cx), (x64, hx64, cx64) = make_case(rng, block)

    def in_halves(w, x, hx, cx):
        def half(state, chunk):
            y, h, c = block.apply(w, chunk, *state)
            return (h, c), y

        halves = x.reshape((2, STEPS // 2) + x.shape[1:])
        (h, c), ys = lax.scan(jax.checkpoint(half), (hx, cx), halves)
        return ys.reshape((STEPS,) + ys.shape[2:]), h, c

    compare(jax.jit(in_halves)(w, x, hx, cx), numpy_rnn(block, layers, x64, hx64, cx64),
            "float64")
    grads = jax.jit(jax.grad(lambda *a: _sum_of_sines(in_halves(*a)), argnums=(0, 1, 2, 3)))(
        w, x, hx, cx)
    with xla_path():
        expected = xla_gradient(block, with_lengths=False)(w, x, hx, cx)
    for g, e in zip(grads, expected):
        assert_close(g, e, "float64")


@pytest.mark.parametrize("mapped", ["data", "weights", "lengths", "all"])
def test_vmap_equals_a_loop(rng, path, mapped):
    """vmap over x/hx/cx (shared weights: folded into N on the cuDNN path), over the
    weights (lax.map on the cuDNN path), over the lengths, or over everything."""
    count = 3
    vmapped = {"w": mapped in ("weights", "all"), "data": mapped in ("data", "all"),
               "lengths": mapped in ("lengths", "all")}
    instances = [make_case(rng, LSTM) for _ in range(count)]  # (layers, w, inputs, inputs64)
    lengths = np.array([[4, 1, 3], [2, 4, 4], [1, 1, 2]])

    def instance(k):
        """Instance k's own value of each vmapped operand, instance 0's of the others."""
        return (instances[k if vmapped["w"] else 0], instances[k if vmapped["data"] else 0],
                lengths[k] if vmapped["lengths"] else LENGTHS)

    def batch(values, group):
        return (jnp.stack(values), 0) if vmapped[group] else (values[0], None)

    ws, w_axis = batch([inst[1] for inst in instances], "w")
    (xs, data_axis), (hxs, _), (cxs, _) = (batch([inst[2][i] for inst in instances], "data")
                                           for i in range(3))
    lengths_arg, lengths_axis = (lengths, 0) if vmapped["lengths"] else (LENGTHS, None)
    args = (ws, xs, hxs, cxs, jnp.asarray(lengths_arg))
    vmapped_apply = jax.vmap(LSTM.apply, in_axes=(w_axis,) + (data_axis,) * 3 + (lengths_axis,))
    assert _uses_primitives(vmapped_apply, *args) == (path == "cudnn_on_cpu")
    out = jax.jit(vmapped_apply)(*args)
    for k in range(count):
        (layers, *_), (_, _, _, (x64, hx64, cx64)), lengths_k = instance(k)
        want = numpy_rnn(LSTM, layers, x64, hx64, cx64, lengths_k)
        compare([o[k] for o in out], want, "float64", what=f"instance {k}")


@pytest.mark.parametrize("in_axes", [(None, 0), (0, None), (0, 0)])
def test_vmap_of_grad_equals_a_loop(rng, path, in_axes):
    """Per-instance gradients: with shared weights, each instance still gets its own dw
    (on the cuDNN path: one forward and backward per instance)."""
    _, w, (x, hx, _), _ = make_case(rng, GRU)
    ws = jnp.stack([w, -w]) if in_axes[0] == 0 else w
    xs = jnp.stack([x, 2 * x]) if in_axes[1] == 0 else x
    grad = lambda w, x: xla_gradient(GRU)(w, x, hx)[:2]  # jit traces again off xla_path()
    assert _uses_primitives(jax.vmap(grad, in_axes=in_axes), ws, xs) == (path == "cudnn_on_cpu")
    got = jax.jit(jax.vmap(grad, in_axes=in_axes))(ws, xs)
    for k in range(2):
        with xla_path():
            want = grad(ws[k] if in_axes[0] == 0 else ws, xs[k] if in_axes[1] == 0 else xs)
        for g, e in zip(got, want):
            assert_close(g[k], e, "float64")


def test_vmap_over_the_cotangents_only(rng, path):
    """The forward runs once, the backward per cotangent (its reserve space is shared)."""
    block = make_block("rnn_tanh", "bidirectional")
    _, w, (x, hx, _), _ = make_case(rng, block)

    def pullback(dy):  # the forward's operands are not vmapped, only dy
        (_, hy), vjp = jax.vjp(lambda w, x: block.apply(w, x, hx, None, LENGTHS), w, x)
        return vjp((dy, jnp.zeros_like(hy)))

    dys = rng.standard_normal((2, STEPS, BATCH, 2 * HIDDEN))
    got = jax.jit(jax.vmap(pullback))(dys)
    one = jax.jit(pullback)
    with xla_path():
        want = [one(dy) for dy in dys]
    for k in range(2):
        for g, e in zip(got, want[k]):
            assert_close(g[k], e, "float64")


def test_grad_of_a_vmapped_rnn_sums_the_instances(rng, path):
    block = make_block("rnn_relu", depth=2)
    _, w, (x, hx, _), _ = make_case(rng, block)
    xs = jnp.stack([x, -x, 0.5 * x])
    loss = lambda w: jnp.sum(jax.vmap(lambda x: block.apply(w, x, hx)[0])(xs) ** 2)
    got = jax.jit(jax.grad(loss))(w)
    single = jax.jit(jax.grad(lambda w, x: jnp.sum(block.apply(w, x, hx)[0] ** 2)))
    with xla_path():
        want = sum(single(w, xs[k]) for k in range(3))
    assert_close(got, want, "float64")


# ---------------------------------------------------------------------------------------
# Forward mode: jvp, jacfwd, hessian (on the cuDNN path: JVP rules on the primitives)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_forward_mode_check_grads_to_second_order(rng, mode, cudnn_on_cpu):
    """check_grads in both modes to second order on the cuDNN path's primitives: each cell,
    2 layers, bidirectional, variable lengths, in every operand."""
    block = make_block(mode, "bidirectional", depth=2, hidden=2)
    _, w, (x, hx, cx), _ = make_case(rng, block)
    args = operands(block, w, x, hx, cx)
    fn = jax.jit(apply_fn(block, LENGTHS))
    assert _uses_primitives(fn, *args)
    check_grads(fn, args, order=2, modes=["fwd", "rev"])


def _oracle_of_operands(block, lengths):
    """The NumPy oracle as a function of (w, x, hx[, cx]), w the parameter block."""
    input_size = (BATCH, input_dim_of(block))

    def oracle(w, x, hx, cx=None):
        layers = [[None if a is None else to_f64(a) for a in block.split_params(
            jnp.asarray(w), p, input_size)] for p in range(block.num_layers * block.num_directions)]
        y, hy, cy = numpy_rnn(block, layers, x, hx, cx, lengths)
        return (y, hy) if cy is None else (y, hy, cy)
    return oracle


def test_jvp_vs_central_differences_of_the_oracle(rng, path):
    """The tangents of y, hy and cy in the direction of every operand at once, against
    central differences of the NumPy oracle."""
    block = make_block("lstm", "bidirectional", depth=2)
    _, w, (x, hx, cx), _ = make_case(rng, block)
    args = operands(block, w, x, hx, cx)
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in args)
    fn = apply_fn(block, LENGTHS)
    assert _uses_primitives(fn, *args) == (path == "cudnn_on_cpu")
    primal, tangent = jax.jit(lambda a, t: jax.jvp(fn, a, t))(args, tangents)
    oracle = _oracle_of_operands(block, LENGTHS)
    args64, t64 = [to_f64(a) for a in args], [to_f64(t) for t in tangents]
    eps = 1e-6
    plus = oracle(*[a + eps * t for a, t in zip(args64, t64)])
    minus = oracle(*[a - eps * t for a, t in zip(args64, t64)])
    for got, want in zip(primal, oracle(*args64)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for got, p, m in zip(tangent, plus, minus):
        np.testing.assert_allclose(got, (p - m) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_forward_mode_on_the_cudnn_path_equals_the_xla_path(rng, cudnn_on_cpu):
    """jvp, jax.linearize, jacfwd (vmap of jvp: the tangent primitive's batching rule) and
    jax.hessian (forward over reverse: the backward passes' JVP rules) equal the XLA
    path's."""
    block = make_block("gru", "bidirectional", depth=2, hidden=2)
    _, w, (x, hx, _), _ = make_case(rng, block)
    fn = apply_fn(block, LENGTHS)
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in (w, x, hx))
    jvp = lambda *a: jax.jvp(fn, a[:3], a[3:])
    linearized = lambda *a: jax.linearize(fn, *a[:3])[1](*a[3:])
    jac = lambda w, x, hx: jax.jacfwd(fn, argnums=(0, 1, 2))(w, x, hx)
    hess = lambda x: jax.hessian(lambda x: jnp.sum(jnp.sin(fn(w, x, hx)[0])))(x)
    for f, a in ((jvp, (w, x, hx) + tangents), (linearized, (w, x, hx) + tangents),
                 (jac, (w, x, hx)), (hess, (x,))):
        assert _uses_primitives(f, *a)
        got = jax.jit(f)(*a)
        with xla_path():
            want = jax.jit(f)(*a)
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12),
                     got, want)


def test_reverse_mode_runs_the_cudnn_backward_passes(rng, cudnn_on_cpu):
    """The gradient transposes rnn_fwd's tangent into rnn_bwd_data and rnn_bwd_weights
    after a training-mode forward, as the custom VJP did; forward mode runs the forward
    (primal) and the XLA tangent primitive, no backward pass; an undifferentiated call runs
    in inference mode."""
    block = make_block("lstm", "bidirectional")
    _, w, (x, hx, cx), _ = make_case(rng, block)
    fn = apply_fn(block, LENGTHS)
    grad = str(jax.make_jaxpr(jax.grad(lambda *a: _sum_of_sines(fn(*a)), argnums=(0, 1, 2, 3)))(
        w, x, hx, cx))
    assert re.findall(r"jaxdnn_rnn_\w+\[", grad) == ["jaxdnn_rnn_fwd[", "jaxdnn_rnn_bwd_data[",
                                                     "jaxdnn_rnn_bwd_weights["], grad
    assert "training=True" in grad
    jvp = str(jax.make_jaxpr(lambda *a: jax.jvp(fn, a, a))(w, x, hx, cx))
    assert re.findall(r"jaxdnn_rnn_\w+\[", jvp) == ["jaxdnn_rnn_fwd[", "jaxdnn_rnn_tangent["]
    assert "training=False" in str(jax.make_jaxpr(fn)(w, x, hx, cx))


# ---------------------------------------------------------------------------------------
# Paths and CUDA lowering
# ---------------------------------------------------------------------------------------
def test_primitives_are_exposed():
    import jaxdnn.primitives as primitives
    for p in (rnn_module.rnn_fwd_p, rnn_module.rnn_bwd_data_p, rnn_module.rnn_bwd_weights_p):
        assert getattr(primitives, p.name.replace("jaxdnn_", "") + "_p") is p
        assert p.name in FFI_TARGETS
    assert jaxdnn.RNNBlock is RNNBlock and "RNNBlock" in jaxdnn.__all__


def test_auto_takes_xla_without_the_handlers_or_without_a_gpu(rng, monkeypatch):
    block = make_block("gru")
    _, w, (x, hx, _), _ = make_case(rng, block)
    fn = apply_fn(block)
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_extension, "has_targets", lambda *names: False)
    assert not _uses_primitives(fn, w, x, hx)
    # handlers built but no GPU visible: cuDNN could not size the reserve space
    monkeypatch.setattr(_extension, "has_targets", lambda *names: True)
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: "no CUDA device")
    assert not _uses_primitives(fn, w, x, hx)


def test_enabled_true_raises_without_a_gpu(rng):
    if _extension.has_targets(*FFI_TARGETS) and _extension.is_available():
        pytest.skip("the cuDNN RNN path can run here")
    block = make_block("gru")
    _, w, (x, hx, _), _ = make_case(rng, block)
    jaxdnn.config.update("dnn.enabled", True)
    with pytest.raises(RuntimeError, match="RNNBlock.apply: dnn.enabled=True requires cuDNN"):
        block.apply(w, x, hx)


def _cuda_hlo(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _rnn_calls(text):
    return re.findall(r"stablehlo\.custom_call @(jaxdnn_rnn_\w+)\(.*?mhlo\.backend_config = "
                      r"\{(.*?)\}", text)


def test_xla_path_has_no_custom_call_even_for_cuda(rng):
    block = make_block("lstm", "bidirectional")
    _, w, (x, hx, cx), _ = make_case(rng, block)
    loss = lambda w, x: jnp.sum(block.apply(w, x, hx, cx)[0])
    with xla_path():
        assert _rnn_calls(_cuda_hlo(jax.grad(loss, argnums=(0, 1)), w, x)) == []


def test_cuda_lowering_once_the_handlers_exist(cudnn_on_cpu):
    block = make_block("lstm", "bidirectional", depth=2, dtype="float16")
    w = jnp.zeros(block.get_param_size((BATCH, INPUT_DIM)), jnp.float16)
    x = jnp.zeros((STEPS, BATCH, INPUT_DIM), jnp.float16)
    hx = cx = jnp.zeros((4, BATCH, HIDDEN), jnp.float16)
    loss = lambda w, x, lengths: jnp.sum(
        block.apply(w, x, hx, cx, lengths)[0].astype(jnp.float32))
    # lengths only the device knows: the host-lengths targets (not command-buffer compatible)
    text = _cuda_hlo(jax.value_and_grad(loss, argnums=(0, 1)), w, x,
                     jnp.asarray(LENGTHS, jnp.int32))
    calls = _rnn_calls(text)
    assert [c[0] for c in calls] == ["jaxdnn_rnn_fwd_host_lengths",
                                     "jaxdnn_rnn_bwd_data_host_lengths",
                                     "jaxdnn_rnn_bwd_weights_host_lengths"]
    assert all("static_lengths = dense<> : tensor<0xi32>" in attrs for _, attrs in calls)
    # lengths as NumPy values: known at trace time, compiled into the call (no host copy)
    static = _cuda_hlo(jax.value_and_grad(lambda w, x: loss(w, x, LENGTHS), argnums=(0, 1)),
                       w, x)
    static_calls = _rnn_calls(static)
    assert [c[0] for c in static_calls] == [c[0] for c in calls]
    assert all("static_lengths = dense<[4, 1, 3]> : tensor<3xi32>" in attrs
               for _, attrs in static_calls)
    assert all("variable_lengths = 1 : i64" in attrs for _, attrs in static_calls)
    for name, attrs in calls:
        for attr in ('mode = "lstm"', 'input_mode = "linear"', 'algo = "standard"',
                     "hidden_size = 3 : i64",
                     "num_layers = 2 : i64", "bidirectional = 1 : i64",
                     "variable_lengths = 1 : i64", "allow_tf32 ="):
            assert attr in attrs, (name, attr, attrs)
        assert ("training = 1 : i64" in attrs) == name.startswith("jaxdnn_rnn_fwd")
    # cuDNN's reserve, laid out per sequence (N equal parts that split with the batch)
    reserve = BATCH * -(-(7 * BATCH * STEPS + 5) // BATCH)
    workspace = 64 + BATCH
    y, state = f"tensor<{STEPS}x{BATCH}x{2 * HIDDEN}xf16>", f"tensor<4x{BATCH}x{HIDDEN}xf16>"
    assert (f"-> ({y}, {state}, {state}, tensor<{reserve}xui8>, tensor<{workspace}xui8>)"
            in text)
    assert f"tensor<{BATCH}xi32>" in text
    # not differentiated: inference mode, no reserve space; bfloat16 reaches cuDNN as float32;
    # a cell without a cell state carries an empty one
    gru = make_block("gru", dtype="bfloat16")
    text = _cuda_hlo(lambda w, x, h: gru.apply(w, x, h),
                     jnp.zeros(gru.get_param_size((BATCH, INPUT_DIM)), jnp.bfloat16),
                     x.astype(jnp.bfloat16), jnp.zeros((1, BATCH, HIDDEN), jnp.bfloat16))
    (name, attrs), = _rnn_calls(text)
    assert name == "jaxdnn_rnn_fwd"  # equal lengths: descriptors built once, graph-safe
    assert "training = 0 : i64" in attrs and "variable_lengths = 0 : i64" in attrs
    assert f"tensor<1x{BATCH}x0xf32>" in text and "tensor<0xui8>" in text
    assert f"tensor<{STEPS}x{BATCH}x{INPUT_DIM}xf32>" in text


def test_space_sizes_are_asked_for_the_targets_layout(cudnn_on_cpu, monkeypatch):
    """The targets with lengths describe the data in another layout than those without
    (cuda/rnn.cc, RnnShape): each call's sizes are asked for its own layout."""
    asked = []

    def recording_sizes(*, variable_lengths=None, **config):
        asked.append(variable_lengths)
        return fake_temp_space_sizes(**config)

    monkeypatch.setattr(rnn_module, "temp_space_sizes", recording_sizes)
    block = make_block("gru")
    w = jnp.zeros(block.get_param_size((BATCH, INPUT_DIM)))
    x, hx = jnp.zeros((STEPS, BATCH, INPUT_DIM)), jnp.zeros((1, BATCH, HIDDEN))
    _cuda_hlo(lambda w, x, h: block.apply(w, x, h), w, x, hx)
    assert asked and set(asked) == {False}
    asked.clear()
    _cuda_hlo(lambda w, x, h, lengths: block.apply(w, x, h, None, lengths), w, x, hx,
              jnp.asarray(LENGTHS, jnp.int32))
    assert asked and set(asked) == {True}


def test_rnn_algo_flag_reaches_the_handlers(cudnn_on_cpu):
    block = make_block("gru")
    w = jnp.zeros(block.get_param_size((BATCH, INPUT_DIM)))
    x, hx = jnp.zeros((STEPS, BATCH, INPUT_DIM)), jnp.zeros((1, BATCH, HIDDEN))
    with jaxdnn.config.override(**{"dnn.rnn.algo": "persist_static"}):
        text = _cuda_hlo(lambda w, x, h: block.apply(w, x, h), w, x, hx)
    (name, attrs), = _rnn_calls(text)
    assert 'algo = "persist_static"' in attrs


@pytest.mark.parametrize("value", [True, False])
def test_rnn_cuda_graph_flag_reaches_the_forward_targets_only(rng, value, cudnn_on_cpu):
    """dnn.rnn.cuda_graph is the forward's attribute, in inference and training mode and on
    the host-lengths target (whose handler decodes it and never captures); the backward
    targets do not carry it (their handlers do not decode it)."""
    block = make_block("lstm", depth=2)
    _, w, (x, hx, cx), _ = make_case(rng, block)
    expected = f"cuda_graph = {int(value)} : i64"
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    with jaxdnn.config.override(**{"dnn.rnn.cuda_graph": value}):
        (name, attrs), = _rnn_calls(_cuda_hlo(lambda w, x: block.apply(w, x, hx, cx)[0], w, x))
        assert name == "jaxdnn_rnn_fwd" and "training = 0 : i64" in attrs
        assert expected in attrs
        for lengths_args in ((), (lengths,)):
            loss = lambda w, x, *n: jnp.sum(block.apply(w, x, hx, cx, *n)[0])
            calls = _rnn_calls(_cuda_hlo(jax.grad(loss, (0, 1)), w, x, *lengths_args))
            suffix = "_host_lengths" if lengths_args else ""
            assert [c[0] for c in calls] == [f"jaxdnn_rnn_{t}{suffix}" for t in
                                             ("fwd", "bwd_data", "bwd_weights")]
            assert expected in calls[0][1] and "training = 1 : i64" in calls[0][1]
            assert all("cuda_graph" not in attrs for _, attrs in calls[1:])


def test_rnn_cuda_graph_defaults_on_and_reaches_the_jaxpr(rng, cudnn_on_cpu):
    assert jaxdnn.config.read("dnn.rnn.cuda_graph") is True
    block = make_block("gru")
    _, w, (x, hx, _), _ = make_case(rng, block)
    fn = lambda w, x: block.apply(w, x, hx)[0]
    assert "cuda_graph=True" in str(jax.make_jaxpr(fn)(w, x))
    with jaxdnn.config.override(**{"dnn.rnn.cuda_graph": False}):
        assert "cuda_graph=False" in str(jax.make_jaxpr(fn)(w, x))


def test_rnn_cuda_graph_on_the_forwards_vmapped_gradients_rerun(rng, cudnn_on_cpu):
    """vmap of grad with shared weights runs each instance's forward again inside the
    backward-weights batching rule: that forward carries the flag as well."""
    block = make_block("gru")
    _, w, (x, hx, _), _ = make_case(rng, block)
    xs = jnp.stack([x, 2 * x])
    grad = jax.grad(lambda w, x: jnp.sum(block.apply(w, x, hx)[0]))
    with jaxdnn.config.override(**{"dnn.rnn.cuda_graph": False}):
        calls = _rnn_calls(_cuda_hlo(jax.vmap(grad, in_axes=(None, 0)), w, xs))
    # (the folded forward's results go unused and XLA drops it: the forward left is the
    # per-instance one of the batching rule)
    forwards = [attrs for name, attrs in calls if name == "jaxdnn_rnn_fwd"]
    assert forwards and all("cuda_graph = 0 : i64" in attrs for attrs in forwards), calls


def test_vmap_tiles_static_lengths_when_folding(cudnn_on_cpu):
    block = make_block("gru")
    w = jnp.zeros(block.get_param_size((BATCH, INPUT_DIM)))
    xs, hx = jnp.zeros((2, STEPS, BATCH, INPUT_DIM)), jnp.zeros((1, BATCH, HIDDEN))
    fn = jax.vmap(lambda x: block.apply(w, x, hx, None, LENGTHS)[0])
    (name, attrs), = _rnn_calls(_cuda_hlo(fn, xs))
    assert name == "jaxdnn_rnn_fwd_host_lengths"
    # the instances are N's minor part: each sequence's length repeats, once per instance
    assert "static_lengths = dense<[4, 4, 1, 1, 3, 3]> : tensor<6xi32>" in attrs


def test_vmap_folds_into_the_batch_on_the_cudnn_path(rng, cudnn_on_cpu):
    """Shared weights: one rnn_fwd call over B * N sequences; batched weights: a loop."""
    block = make_block("gru")
    _, w, (x, hx, _), _ = make_case(rng, block)
    xs = jnp.stack([x, x, x])
    folded = str(jax.make_jaxpr(jax.vmap(block.apply, in_axes=(None, 0, None)))(w, xs, hx))
    assert f"f64[{STEPS},{3 * BATCH},{INPUT_DIM}]" in folded and "scan" not in folded
    mapped = str(jax.make_jaxpr(jax.vmap(block.apply, in_axes=(0, None, None)))(
        jnp.stack([w, w]), x, hx))
    assert "scan" in mapped


# ---------------------------------------------------------------------------------------
# Errors: raised at trace time, naming the argument
# ---------------------------------------------------------------------------------------
def _error_cases():
    gru = make_block("gru")
    lstm = make_block("lstm")
    skip = make_block("rnn_tanh", input_mode="skip")
    size = (BATCH, INPUT_DIM)
    w = jnp.zeros(gru.get_param_size(size))
    w_lstm = jnp.zeros(lstm.get_param_size(size))
    x = jnp.zeros((STEPS, BATCH, INPUT_DIM))
    hx = jnp.zeros((1, BATCH, HIDDEN))
    layers = [[np.zeros(s) for s in seed_shapes(gru, 0, INPUT_DIM)]]
    return {
        "dtype": (lambda: RNNBlock("int32", 3, 1, "gru"), TypeError,
                  "RNNBlock: dtype must be float16, bfloat16, float32 or float64; got int32"),
        "dtype-garbage": (lambda: RNNBlock("floaty", 3, 1, "gru"), TypeError, "dtype must be"),
        "hidden_size": (lambda: RNNBlock("float32", 0, 1, "gru"), ValueError,
                        "hidden_size=0 must be a positive int"),
        "hidden_size-type": (lambda: RNNBlock("float32", 2.0, 1, "gru"), TypeError,
                             "hidden_size must be a positive int; got 2.0"),
        "num_layers": (lambda: RNNBlock("float32", 3, -1, "gru"), ValueError,
                       "num_layers=-1 must be a positive int"),
        "rnn_mode": (lambda: RNNBlock("float32", 3, 1, "lstm2"), ValueError,
                     "rnn_mode='lstm2' is not one of 'rnn_relu', 'rnn_tanh', 'lstm', 'gru'"),
        "input_mode": (lambda: RNNBlock("float32", 3, 1, "gru", "linear_input"), ValueError,
                       "input_mode='linear_input' is not one of 'linear', 'skip'"),
        "direction_mode": (lambda: RNNBlock("float32", 3, 1, "gru", "linear", "bi"), ValueError,
                           "direction_mode='bi' is not one of"),
        "input_size": (lambda: gru.get_param_size(3), TypeError,
                       r"get_param_size: input_size must be \(batch_size, input_dim\); got 3"),
        "input_size-ints": (lambda: gru.get_param_size((2, 3.0)), TypeError,
                            "input_size must hold two ints"),
        "input_size-dim": (lambda: gru.get_param_size((2, 0)), ValueError, "input_dim >= 1"),
        "skip-size": (lambda: skip.get_param_size((2, 4)), ValueError,
                      "input_mode='skip' .* input_dim must equal hidden_size=3; got 4"),
        "split-w": (lambda: gru.split_params(w[:-1], 0, size), ValueError,
                    rf"split_params: w has {w.size - 1} elements but this block needs"),
        "split-layer": (lambda: gru.split_params(w, 1, size), ValueError,
                        r"layer=1 must lie in \[0, 1\)"),
        "split-layer-type": (lambda: gru.split_params(w, 0.0, size), TypeError,
                             "layer must be an int"),
        "merge-count": (lambda: gru.merge_params(layers * 2, size), ValueError,
                        "layers must hold 1 lists"),
        "merge-length": (lambda: gru.merge_params([layers[0][:-1]], size), ValueError,
                         r"layers\[0\] must hold 12 arrays"),
        "merge-shape": (lambda: gru.merge_params([[layers[0][0].T] + layers[0][1:]], size),
                        ValueError, r"layers\[0\]\[0\] must have shape \(2, 3\); got \(3, 2\)"),
        "merge-skip": (lambda: skip.merge_params([[np.zeros((3, 3))] + [np.zeros(3)]
                                                  + [np.zeros((3, 3)), np.zeros(3)]], (1, 3)),
                       ValueError, r"layers\[0\]\[0\] must be None"),
        "x-rank": (lambda: gru.apply(w, x[0], hx), ValueError,
                   r"apply: x must be 3-D \(timesteps, batch, input_dim\); got shape"),
        "x-dtype": (lambda: gru.apply(w, x.astype(jnp.int32), hx), TypeError,
                    "x must be float16, bfloat16, float32 or float64; got int32"),
        "x-skip": (lambda: skip.apply(jnp.zeros(skip.get_param_size((1, 3))), x, hx),
                   ValueError, r"x.shape\[2\] \(input_dim\) must equal hidden_size=3; got 2"),
        "w-size": (lambda: gru.apply(w_lstm, x, hx), ValueError,
                   rf"apply: w has {w_lstm.size} elements but this block needs "
                   rf"get_param_size\(\(batch_size, 2\)\) = {w.size}"),
        "w-rank": (lambda: gru.apply(w[None], x, hx), ValueError, "w must be 1-D"),
        "hx-shape": (lambda: gru.apply(w, x, hx[:, :2]), ValueError,
                     r"hx must have shape \(num_layers \* directions, batch, hidden\) = "
                     r"\(1, 3, 3\); got \(1, 2, 3\)"),
        "hx-rank": (lambda: gru.apply(w, x, hx[0]), ValueError, "hx must be 3-D"),
        "cx-missing": (lambda: lstm.apply(w_lstm, x, hx), ValueError,
                       "rnn_mode='lstm' needs the initial cell state cx"),
        "cx-unexpected": (lambda: gru.apply(w, x, hx, hx), ValueError,
                          "cx is the initial cell state of an lstm; rnn_mode='gru' has none"),
        "cx-shape": (lambda: lstm.apply(w_lstm, x, hx, hx[:, :1]), ValueError,
                     r"cx must have shape .* = \(1, 3, 3\); got \(1, 1, 3\)"),
        "lengths-shape": (lambda: gru.apply(w, x, hx, seq_lengths=[1, 2]), ValueError,
                          r"seq_lengths must have shape \(batch,\) = \(3,\)"),
        "lengths-dtype": (lambda: gru.apply(w, x, hx, seq_lengths=[1.0, 2.0, 3.0]), TypeError,
                          r"seq_lengths must hold ints \(int32\); got float"),
        "lengths-values": (lambda: gru.apply(w, x, hx, seq_lengths=[1, 5, 2]), ValueError,
                           r"seq_lengths must lie in \[1, 4\] .*; got \[1, 5, 2\]"),
        "lengths-zero": (lambda: gru.apply(w, x, hx, seq_lengths=np.array([0, 1, 1])),
                         ValueError, r"must lie in \[1, 4\]"),
    }


ERROR_CASES = _error_cases()


def test_errors_are_raised_at_trace_time():
    block = make_block("lstm")
    w = jnp.zeros(block.get_param_size((BATCH, INPUT_DIM)))
    x = jnp.zeros((STEPS, BATCH, INPUT_DIM))
    hx = jnp.zeros((1, BATCH, HIDDEN))
    with pytest.raises(ValueError, match="cx must have shape"):
        jax.jit(block.apply).trace(w, x, hx, hx[:, :2])
    # traced lengths cannot be checked: they trace fine (and the XLA path clips them)
    jax.jit(block.apply).trace(w, x, hx, hx, jnp.zeros(BATCH, jnp.int32))


# ---------------------------------------------------------------------------------------
# GPU: the cuDNN path (dnn.enabled=True) against the XLA path and float64
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("mode,direction,input_mode", [
    ("rnn_relu", "unidirectional", "linear"), ("rnn_tanh", "bidirectional", "skip"),
    ("lstm", "bidirectional", "linear"), ("lstm", "unidirectional", "skip"),
    ("gru", "bidirectional", "linear"), ("gru", "bidirectional", "skip")])
@pytest.mark.parametrize("variable", [False, True])
def test_gpu_forward_cudnn_vs_xla_vs_numpy(rng, mode, direction, input_mode, dtype, variable):
    """The skip-input cases test the layout's assumption about the first layer's biases."""
    check_forward_cudnn_vs_xla_vs_numpy(
        rng, make_block(mode, direction, input_mode, depth=2, dtype=dtype), dtype, variable)


def check_forward_cudnn_vs_xla_vs_numpy(rng, block, dtype, variable):
    """The block's forward on cuDNN (its custom calls in the program) and on the XLA path,
    each against the float64 oracle, with full or variable (device) lengths."""
    layers, w, (x, hx, cx), (x64, hx64, cx64) = make_case(rng, block, dtype)
    lengths = jnp.asarray(LENGTHS, jnp.int32) if variable else None
    fn = lambda w, x, hx, cx: block.apply(w, x, hx, cx, lengths)
    assert _rnn_calls(jax.jit(fn).lower(w, x, hx, cx).as_text())
    cudnn, xla = _jit_run(fn, w, x, hx, cx), _jit_run(fn, w, x, hx, cx, xla=True)
    want = numpy_rnn(block, layers, x64, hx64, cx64, LENGTHS if variable else None)
    compare(cudnn, want, dtype, factor=2, what="cuDNN vs float64")
    compare(xla, want, dtype, factor=2, what="XLA vs float64")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_gradients_cudnn_vs_xla(rng, mode, dtype):
    block = make_block(mode, "bidirectional", depth=2, dtype=dtype)
    _, w, (x, hx, cx), _ = make_case(rng, block, dtype)
    fn = apply_fn(block, jnp.asarray(LENGTHS, jnp.int32))
    args = operands(block, w, x, hx, cx)
    loss = lambda *a: sum(jnp.sum(jnp.sin(o)) for o in fn(*a))
    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    calls = [c[0] for c in _rnn_calls(jax.jit(grad).lower(*args).as_text())]
    assert calls == ["jaxdnn_rnn_fwd_host_lengths", "jaxdnn_rnn_bwd_data_host_lengths",
                     "jaxdnn_rnn_bwd_weights_host_lengths"]
    got, want = _jit_run(grad, *args), _jit_run(grad, *args, xla=True)
    for g, e, name in zip(got, want, ("dw", "dx", "dhx", "dcx")):
        assert_close(g, e, dtype, factor=10, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_check_grads(rng, mode):
    block = make_block(mode, "bidirectional", "skip", depth=2)
    _, w, (x, hx, cx), _ = make_case(rng, block)
    check_grads(jax.jit(apply_fn(block, LENGTHS)), operands(block, w, x, hx, cx),
                order=1, modes=["rev"])


@pytest.mark.gpu
@pytest.mark.parametrize("in_axes", [(None, 0), (0, None), (0, 0)])
def test_gpu_vmap_of_grad(rng, in_axes):
    block = make_block("lstm", "bidirectional", depth=2, dtype="float32")
    _, w, (x, hx, cx), _ = make_case(rng, block, "float32")
    ws = jnp.stack([w, -w]) if in_axes[0] == 0 else w
    xs = jnp.stack([x, 2 * x]) if in_axes[1] == 0 else x
    loss = lambda w, x: jnp.sum(jnp.sin(block.apply(w, x, hx, cx, LENGTHS)[0]))
    grad = jax.grad(loss, argnums=(0, 1))
    got = _jit_run(jax.vmap(grad, in_axes=in_axes), ws, xs)
    for k in range(2):
        want = _jit_run(grad, ws[k] if in_axes[0] == 0 else ws,
                        xs[k] if in_axes[1] == 0 else xs, xla=True)
        for g, e in zip(got, want):
            assert_close(g[k], e, "float32", factor=10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("mode,direction,input_mode",
                         list(itertools.product(MODES, DIRECTIONS, INPUT_MODES)))
def test_gpu_weight_layout_is_cudnns(mode, direction, input_mode, dtype):
    """jaxdnn's layout (known without a GPU) against cudnnGetRNNWeightParams: every matrix
    and bias at the same offset with the same shape, nothing else, the same total size."""
    if dtype == "bfloat16" and not rnn_module._cudnn_takes_bfloat16():
        pytest.skip("this cuDNN has no bfloat16 RNN (jaxdnn computes bfloat16 in float32)")
    hidden, depth = 4, 2
    input_dim = hidden if input_mode == "skip" else 5
    bidirectional = direction == "bidirectional"
    nbytes, params = rnn_module.cudnn_weight_params(
        mode=mode, input_mode=input_mode, hidden_size=hidden, num_layers=depth,
        bidirectional=bidirectional, dtype=dtype, input_dim=input_dim)
    layout = weight_layout(mode, hidden, depth, input_dim, input_mode, bidirectional)
    cudnn = sorted((p, lin, kind, offset, tuple(d for d in dims if d != 1))
                   for p, lin, kind, offset, dims in params)
    ours = sorted((e.pseudo_layer, e.lin_id, e.kind, e.offset, e.shape) for e in layout)
    assert cudnn == ours
    block = RNNBlock(dtype, hidden, depth, mode, input_mode, direction)
    assert nbytes == block.get_param_size((1, input_dim)) * jnp.dtype(dtype).itemsize


@pytest.mark.gpu
@pytest.mark.parametrize("algo", jaxdnn.config.RNN_ALGOS)
def test_gpu_every_rnn_algo_runs_or_says_why_not(rng, algo):
    """A persistent algorithm cuDNN refuses for a configuration fails at trace time with
    cuDNN's message; one it accepts gives the standard algorithm's results."""
    block = make_block("lstm", depth=2, dtype="float32")
    _, w, (x, hx, cx), (x64, hx64, cx64) = make_case(rng, block, "float32")
    fn = apply_fn(block)
    want = _jit_run(fn, w, x, hx, cx, xla=True)
    with jaxdnn.config.override(**{"dnn.rnn.algo": algo}):
        try:
            got = _jit_run(fn, w, x, hx, cx)
        except RuntimeError as e:
            assert algo != "standard", e
            assert "cuDNN cannot run this configuration" in str(e) and "CUDNN_STATUS" in str(e)
            return
    for g, e in zip(got, want):
        assert_close(g, e, "float32", factor=10)


@pytest.mark.gpu
def test_gpu_lengths_change_without_recompiling(rng):
    """The lengths are data, not part of the compiled call: one executable serves several
    length vectors, each with its own zero tail and final states."""
    block = make_block("gru", "bidirectional", depth=2, dtype="float32")
    layers, w, (x, hx, _), (x64, hx64, _) = make_case(rng, block, "float32")
    traces = []

    def apply(w, x, hx, lengths):
        traces.append(1)
        return block.apply(w, x, hx, None, lengths)

    fn = jax.jit(apply)
    for lengths in ([4, 1, 3], [2, 4, 4], [1, 1, 1]):
        lengths = np.array(lengths)
        got = fn(w, x, hx, jnp.asarray(lengths, jnp.int32))
        want = numpy_rnn(block, layers, x64, hx64, None, lengths)
        compare(got, want, "float32", factor=2, what=f"lengths {lengths.tolist()}")
    assert len(traces) == 1


@pytest.mark.gpu
def test_gpu_lengths_out_of_range_raise_and_the_next_call_runs(rng):
    """Traced lengths cannot be checked at trace time; the host-lengths handler checks
    them and fails the call with a message, leaving the process able to run the next."""
    block = make_block("gru", dtype="float32")
    layers, w, (x, hx, _), (x64, hx64, _) = make_case(rng, block, "float32")
    fn = jax.jit(lambda w, x, hx, lengths: block.apply(w, x, hx, None, lengths))
    with pytest.raises(Exception, match=r"seq_lengths\[1\] = 0 is outside \[1, 4\]"):
        jax.block_until_ready(fn(w, x, hx, jnp.array([4, 0, 3], jnp.int32)))
    got = fn(w, x, hx, jnp.asarray(LENGTHS, jnp.int32))
    compare(got, numpy_rnn(block, layers, x64, hx64, None, LENGTHS), "float32", factor=2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_forward_mode_cudnn_vs_xla(rng, mode):
    """jvp and the hessian-vector product on the cuDNN path equal the XLA path's in
    float64 (2 layers, bidirectional, lengths); the primal comes from cuDNN's forward."""
    block = make_block(mode, "bidirectional", depth=2)
    _, w, (x, hx, cx), _ = make_case(rng, block)
    fn = apply_fn(block, jnp.asarray(LENGTHS, jnp.int32))
    args = operands(block, w, x, hx, cx)
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in args)
    jvp = lambda a, t: jax.jvp(fn, a, t)
    calls = [c[0] for c in _rnn_calls(jax.jit(jvp).lower(args, tangents).as_text())]
    assert calls == ["jaxdnn_rnn_fwd_host_lengths"]
    grad = jax.grad(lambda *a: sum(jnp.sum(jnp.sin(o)) for o in fn(*a)),
                    argnums=tuple(range(len(args))))
    hvp = lambda a, t: jax.jvp(grad, a, t)[1]
    for f in (jvp, hvp):
        got, want = _jit_run(f, args, tangents), _jit_run(f, args, tangents, xla=True)
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-10),
                     got, want)


# ---------------------------------------------------------------------------------------
# LSTM projections (proj_size; cuDNN's projSize, PyTorch's nn.LSTM(proj_size=...)): h and
# y have PROJ features per direction, c keeps HIDDEN; checked against the NumPy oracle
# (which ends each layer's list with the projection) and, where installed, PyTorch.
# ---------------------------------------------------------------------------------------
PROJ = 2
PROJ_CASES = [("unidirectional", "linear"), ("bidirectional", "linear"),
              ("bidirectional", "skip")]


def proj_block(direction="bidirectional", input_mode="linear", depth=2, dtype="float64"):
    return make_block("lstm", direction, input_mode, depth, dtype, proj=PROJ)


def test_proj_layout_by_hand():
    """One layer, hidden 3, proj 2, input 2: 4 W (3x2) at 0..18, 4 R (3x2: they read the
    projected h) at 24..42, the projection (2x3) at 48, then the 8 biases (3,) from 54."""
    layout = weight_layout("lstm", 3, 1, 2, proj_size=2)
    matrices = [(e.lin_id, e.offset, e.shape) for e in layout if e.kind == "matrix"]
    assert matrices == [(k, 6 * k, (3, 2)) for k in range(8)] + [(8, 48, (2, 3))]
    biases = [(e.lin_id, e.offset, e.shape) for e in layout if e.kind == "bias"]
    assert biases == [(k, 54 + 3 * k, (3,)) for k in range(8)]
    assert RNNBlock("float32", 3, 1, "lstm", proj_size=2).get_param_size((5, 2)) == 78
    # two layers, both directions: the second layer reads 2 * proj = 4 features
    second = [e for e in weight_layout("lstm", 3, 2, 2, "linear", True, 2)
              if e.pseudo_layer == 2 and e.kind == "matrix"]
    assert [e.shape for e in second] == [(3, 4)] * 4 + [(3, 2)] * 4 + [(2, 3)]


@pytest.mark.parametrize("direction,input_mode", PROJ_CASES)
@pytest.mark.parametrize("depth", [1, 2])
def test_proj_layout_tiles_the_block_and_split_merge_invert(rng, direction, input_mode, depth):
    block = proj_block(direction, input_mode, depth)
    input_dim = input_dim_of(block)
    size = (BATCH, input_dim)
    layout = block.weight_layout(size)
    offset = 0
    for e in layout:  # contiguous, every matrix first, by pseudo-layer then linLayerID
        assert e.offset == offset
        offset += int(np.prod(e.shape))
    assert offset == block.get_param_size(size) == ref.param_count(
        "lstm", HIDDEN, depth, input_dim, input_mode == "skip", direction == "bidirectional",
        PROJ)
    kinds = [e.kind for e in layout]
    assert kinds == sorted(kinds, key=lambda k: k == "bias")
    for kind in ("matrix", "bias"):
        keys = [(e.pseudo_layer, e.lin_id) for e in layout if e.kind == kind]
        assert keys == sorted(keys)
    pseudo_layers = depth * block.num_directions
    assert sum(e.lin_id == 8 for e in layout) == pseudo_layers  # one projection each
    for e in layout:
        if e.kind == "matrix":
            assert e.shape == seed_shapes(block, e.pseudo_layer, input_dim)[2 * e.lin_id][::-1]
    layers = random_layers(rng, block, input_dim)
    w = block.merge_params(layers, size)
    for p, entries in enumerate(layers):
        split = block.split_params(w, p, size)
        assert len(split) == 17
        for got, want in zip(split, entries):
            if want is None:
                assert got is None
            else:
                np.testing.assert_array_equal(got, want)


def test_proj_repr_and_zero_is_no_projection(rng):
    assert "proj_size=2" in repr(proj_block())
    assert "proj_size" not in repr(make_block("lstm"))
    plain, zero = make_block("lstm", depth=2), make_block("lstm", depth=2, proj=0)
    assert zero.weight_layout((1, INPUT_DIM)) == plain.weight_layout((1, INPUT_DIM))


@pytest.mark.parametrize("direction,input_mode", PROJ_CASES)
@pytest.mark.parametrize("variable", [False, True])
def test_proj_forward_matches_numpy(rng, direction, input_mode, variable):
    block = proj_block(direction, input_mode)
    layers, w, (x, hx, cx), (x64, hx64, cx64) = make_case(rng, block)
    lengths = LENGTHS if variable else None
    y, hy, cy = jax.jit(block.apply)(w, x, hx, cx, lengths)
    count = 2 * block.num_directions
    assert y.shape == (STEPS, BATCH, block.num_directions * PROJ)
    assert hy.shape == (count, BATCH, PROJ) and cy.shape == (count, BATCH, HIDDEN)
    compare((y, hy, cy), numpy_rnn(block, layers, x64, hx64, cx64, lengths), "float64")


def test_proj_empty_sequences_keep_the_initial_state(rng):
    block = proj_block()
    w = make_case(rng, block)[1]
    x, hx, cx = random_states(rng, block, steps=0)
    y, hy, cy = block.apply(w, x, hx, cx)
    assert y.shape == (0, BATCH, 2 * PROJ)
    np.testing.assert_array_equal(hy, hx)
    np.testing.assert_array_equal(cy, cx)


@pytest.mark.parametrize("direction,input_mode,depth,variable", [
    ("unidirectional", "linear", 2, True), ("bidirectional", "skip", 1, False)])
def test_proj_check_grads(rng, direction, input_mode, depth, variable):
    block = proj_block(direction, input_mode, depth)
    _, w, (x, hx, cx), _ = make_case(rng, block, batch=2)
    fn = jax.jit(apply_fn(block, LENGTHS[:2] if variable else None))
    check_grads(fn, (w, x, hx, cx), order=1, modes=["fwd", "rev"])


def test_proj_on_the_cudnn_primitives(rng, cudnn_on_cpu):
    """The cuDNN path's primitives with a projection (their abstract evals, JVP and transpose
    rules, batching rule; run on the CPU through their references): the XLA path's values,
    gradients, tangents and vmap, and check_grads through them in both modes."""
    block = proj_block()
    layers, w, (x, hx, cx), (x64, hx64, cx64) = make_case(rng, block)
    fn = apply_fn(block, LENGTHS)
    assert _uses_primitives(fn, w, x, hx, cx)
    compare(jax.jit(fn)(w, x, hx, cx), numpy_rnn(block, layers, x64, hx64, cx64, LENGTHS),
            "float64")
    args = (w, x, hx, cx)
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in args)
    programs = [
        (jax.grad(lambda *a: _sum_of_sines(fn(*a)), argnums=(0, 1, 2, 3)), args),
        (lambda a, t: jax.jvp(fn, a, t), (args, tangents)),
        (jax.vmap(lambda x: fn(w, x, hx, cx)), (jnp.stack([x, -x]),)),
    ]
    for f, a in programs:
        got = jax.jit(f)(*a)
        with xla_path():
            want = jax.jit(f)(*a)
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12),
                     got, want)
    small = proj_block("unidirectional", depth=1)
    _, w, (x, hx, cx), _ = make_case(rng, small, batch=2)
    check_grads(jax.jit(apply_fn(small, LENGTHS[:2])), (w, x, hx, cx), order=1,
                modes=["fwd", "rev"])


def test_proj_cuda_lowering_carries_proj_size(cudnn_on_cpu):
    """Every target gets proj_size and the shapes cuDNN takes with a projection: y (T, N,
    D * proj), hx and hy (L * D, N, proj), cx and cy (L * D, N, hidden)."""
    block = proj_block(dtype="float32")
    w = jnp.zeros(block.get_param_size((BATCH, INPUT_DIM)), jnp.float32)
    x = jnp.zeros((STEPS, BATCH, INPUT_DIM), jnp.float32)
    hx, cx = jnp.zeros((4, BATCH, PROJ)), jnp.zeros((4, BATCH, HIDDEN))
    loss = lambda w, x, *lengths: jnp.sum(block.apply(w, x, hx, cx, *lengths)[0])
    for lengths in ((), (jnp.asarray(LENGTHS, jnp.int32),)):
        text = _cuda_hlo(jax.grad(loss, argnums=(0, 1)), w, x, *lengths)
        calls = _rnn_calls(text)
        assert len(calls) == 3
        assert all("proj_size = 2 : i64" in attrs for _, attrs in calls), calls
        assert (f"-> (tensor<{STEPS}x{BATCH}x{2 * PROJ}xf32>, tensor<4x{BATCH}x{PROJ}xf32>, "
                f"tensor<4x{BATCH}x{HIDDEN}xf32>") in text
    plain = make_block("lstm", dtype="float32")
    text = _cuda_hlo(lambda w, x, h: plain.apply(w, x, h, h)[0],
                     jnp.zeros(plain.get_param_size((BATCH, INPUT_DIM)), jnp.float32), x,
                     jnp.zeros((1, BATCH, HIDDEN)))
    (_, attrs), = _rnn_calls(text)
    assert "proj_size = 0 : i64" in attrs


def test_proj_needs_the_standard_algorithm(rng, cudnn_on_cpu):
    block = proj_block(dtype="float32")
    _, w, (x, hx, cx), _ = make_case(rng, block, "float32")
    with jaxdnn.config.override(**{"dnn.rnn.algo": "persist_static"}):
        with pytest.raises(ValueError, match=r"proj_size=2 runs on cuDNN's standard algorithm "
                                             r"only; dnn.rnn.algo='persist_static'"):
            block.apply(w, x, hx, cx)


def _proj_error_cases():
    block = proj_block("unidirectional", depth=1)
    w = jnp.zeros(block.get_param_size((BATCH, INPUT_DIM)))
    x = jnp.zeros((STEPS, BATCH, INPUT_DIM))
    h, c = jnp.zeros((1, BATCH, PROJ)), jnp.zeros((1, BATCH, HIDDEN))
    return {
        "negative": (lambda: RNNBlock("float32", 3, 1, "lstm", proj_size=-1), ValueError,
                     r"RNNBlock: proj_size=-1 must lie in \[0, hidden_size=3\)"),
        "equal-to-hidden": (lambda: RNNBlock("float32", 3, 1, "lstm", proj_size=3), ValueError,
                            r"proj_size=3 must lie in \[0, hidden_size=3\)"),
        "above-hidden": (lambda: RNNBlock("float32", 3, 1, "lstm", proj_size=5), ValueError,
                         r"proj_size=5 must lie in \[0, hidden_size=3\)"),
        "type": (lambda: RNNBlock("float32", 3, 1, "lstm", proj_size=1.0), TypeError,
                 r"proj_size must be an int in \[0, hidden_size\); got 1.0"),
        "gru": (lambda: RNNBlock("float32", 3, 1, "gru", proj_size=2), ValueError,
                r"proj_size=2 projects an lstm's hidden state; rnn_mode='gru'"),
        "rnn_tanh": (lambda: RNNBlock("float32", 3, 1, "rnn_tanh", proj_size=1), ValueError,
                     "proj_size=1 projects an lstm's hidden state"),
        "hx-of-hidden": (lambda: block.apply(w, x, c, c), ValueError,
                         r"hx must have shape \(num_layers \* directions, batch, proj_size\) = "
                         r"\(1, 3, 2\); got \(1, 3, 3\)"),
        "cx-of-proj": (lambda: block.apply(w, x, h, h), ValueError,
                       r"cx must have shape \(num_layers \* directions, batch, hidden\) = "
                       r"\(1, 3, 3\); got \(1, 3, 2\)"),
        "w-unprojected": (lambda: block.apply(jnp.zeros(make_block("lstm").get_param_size(
            (BATCH, INPUT_DIM))), x, h, c), ValueError,
            r"w has 84 elements but this block needs get_param_size\(\(batch_size, 2\)\) = 78"),
        "merge-no-projection": (lambda: block.merge_params(
            [[np.zeros(s) for s in seed_shapes(block, 0, INPUT_DIM)][:16]], (BATCH, INPUT_DIM)),
            ValueError, r"layers\[0\] must hold 17 arrays"),
        "merge-projection-shape": (lambda: block.merge_params(
            [[np.zeros(s) for s in seed_shapes(block, 0, INPUT_DIM)][:16]
             + [np.zeros((PROJ, HIDDEN))]], (BATCH, INPUT_DIM)),
            ValueError, r"layers\[0\]\[16\] must have shape \(3, 2\); got \(2, 3\)"),
    }


ERROR_CASES.update({f"proj-{name}": case for name, case in _proj_error_cases().items()})


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_the_argument(case):
    fn, error, message = ERROR_CASES[case]
    with pytest.raises(error, match=message):
        fn()


def torch_lstm(block, layers, x64, hx64, cx64, seq_lengths=None):
    """PyTorch's nn.LSTM (float64, on the CPU) with the block's weights: per layer and
    direction, weight_ih = [W_i; W_f; W_g; W_o] (cuDNN's gate order, PyTorch's too),
    weight_hh = [R_k], bias_ih = [b_Wk], bias_hh = [b_Rk], weight_hr = P (transposed from
    split_params' x @ W view). Variable lengths go through pack_padded_sequence."""
    torch = pytest.importorskip("torch")
    lstm = torch.nn.LSTM(x64.shape[-1], block.hidden_size, block.num_layers,
                         bidirectional=block.bidirectional, proj_size=block.proj_size,
                         dtype=torch.float64)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    with torch.no_grad():
        for p, entries in enumerate(layers):
            depth, direction = divmod(p, block.num_directions)
            suffix = f"_l{depth}" + ("_reverse" if direction else "")
            params = {"weight_ih": np.concatenate([entries[2 * k].T for k in range(4)]),
                      "bias_ih": np.concatenate([entries[2 * k + 1] for k in range(4)]),
                      "weight_hh": np.concatenate([entries[8 + 2 * k].T for k in range(4)]),
                      "bias_hh": np.concatenate([entries[9 + 2 * k] for k in range(4)]),
                      "weight_hr": entries[16].T}
            for name, value in params.items():
                getattr(lstm, name + suffix).copy_(t(value))
        state = (t(hx64), t(cx64))
        if seq_lengths is None:
            y, (hy, cy) = lstm(t(x64), state)
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                t(x64), torch.as_tensor(np.asarray(seq_lengths)), enforce_sorted=False)
            out, (hy, cy) = lstm(packed, state)
            y, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=x64.shape[0])
    return y.numpy(), hy.numpy(), cy.numpy()


@pytest.mark.parametrize("path", ["xla", pytest.param("cudnn", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("variable", [False, True])
def test_proj_matches_torch(rng, path, dtype, direction, variable):
    """PyTorch's nn.LSTM(proj_size=...) (float64, CPU) on the same weights: the oracle
    itself agrees with it, and so do the XLA path and (gpu) the cuDNN path."""
    block = proj_block(direction, dtype=dtype)
    layers, w, (x, hx, cx), (x64, hx64, cx64) = make_case(rng, block, dtype)
    lengths = LENGTHS if variable else None
    want = torch_lstm(block, layers, x64, hx64, cx64, lengths)
    oracle = numpy_rnn(block, layers, x64, hx64, cx64, lengths)
    for a, b in zip(oracle, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    fn = lambda w, x, hx, cx: block.apply(w, x, hx, cx, lengths)
    got = _jit_run(fn, w, x, hx, cx, xla=path == "xla")
    compare(got, want, dtype, factor=2, what=f"{path} vs PyTorch")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("direction,input_mode", PROJ_CASES)
@pytest.mark.parametrize("variable", [False, True])
def test_gpu_proj_forward_cudnn_vs_xla_vs_numpy(rng, direction, input_mode, dtype, variable):
    check_forward_cudnn_vs_xla_vs_numpy(rng, proj_block(direction, input_mode, dtype=dtype),
                                        dtype, variable)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("direction,input_mode", PROJ_CASES)
def test_gpu_proj_gradients_cudnn_vs_xla(rng, direction, input_mode, dtype):
    block = proj_block(direction, input_mode, dtype=dtype)
    _, w, (x, hx, cx), _ = make_case(rng, block, dtype)
    fn = apply_fn(block, jnp.asarray(LENGTHS, jnp.int32))
    loss = lambda *a: sum(jnp.sum(jnp.sin(o)) for o in fn(*a))
    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    got, want = _jit_run(grad, w, x, hx, cx), _jit_run(grad, w, x, hx, cx, xla=True)
    for g, e, name in zip(got, want, ("dw", "dx", "dhx", "dcx")):
        assert_close(g, e, dtype, factor=10, err_msg=name)


@pytest.mark.gpu
def test_gpu_proj_check_grads(rng):
    block = proj_block()
    _, w, (x, hx, cx), _ = make_case(rng, block)
    check_grads(jax.jit(apply_fn(block, LENGTHS)), (w, x, hx, cx), order=1,
                modes=["fwd", "rev"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("direction,input_mode", list(itertools.product(DIRECTIONS,
                                                                        INPUT_MODES)))
def test_gpu_proj_weight_layout_is_cudnns(direction, input_mode, dtype):
    """The projection's place in the block (after each pseudo-layer's recurrent matrices:
    an assumption of jaxdnn/reference/rnn.py's weight_layout) against
    cudnnGetRNNWeightParams, with every other matrix and bias."""
    hidden, proj, depth = 5, 3, 2
    input_dim = hidden if input_mode == "skip" else 4
    bidirectional = direction == "bidirectional"
    nbytes, params = rnn_module.cudnn_weight_params(
        mode="lstm", input_mode=input_mode, hidden_size=hidden, num_layers=depth,
        bidirectional=bidirectional, dtype=dtype, input_dim=input_dim, proj_size=proj)
    layout = weight_layout("lstm", hidden, depth, input_dim, input_mode, bidirectional, proj)
    cudnn = sorted((p, lin, kind, offset, tuple(d for d in dims if d != 1))
                   for p, lin, kind, offset, dims in params)
    ours = sorted((e.pseudo_layer, e.lin_id, e.kind, e.offset, e.shape) for e in layout)
    assert cudnn == ours
    block = RNNBlock(dtype, hidden, depth, "lstm", input_mode, direction, proj)
    assert nbytes == block.get_param_size((1, input_dim)) * jnp.dtype(dtype).itemsize


# GPU: dnn.rnn.cuda_graph, the forward handler's own CUDA graphs (cuda/common/graph_capture.h)
# ---------------------------------------------------------------------------------------
def _graph_stats() -> dict:
    return dict(_extension.extension().graph_capture_stats())


def _graph_delta(before: dict) -> dict:
    after = _graph_stats()
    return {k: after[k] - before[k] for k in after}


def _jit_xla_graphs(fn, xla_graphs: bool):
    """jit with XLA's CUDA graphs (command buffers) forced: around every command (minimum
    graph size 1), or around none (a minimum no program reaches): the handler then runs
    eagerly, as in a small program, and captures its own graph."""
    return jax.jit(fn, compiler_options={"xla_gpu_graph_min_graph_size":
                                         1 if xla_graphs else 1 << 30})


def _graph_case(rng, mode="lstm"):
    block = make_block(mode, "bidirectional", depth=2, dtype="float32")
    _, w, (x, hx, cx), _ = make_case(rng, block, "float32")
    return block, operands(block, w, x, hx, cx)


def _assert_bitwise_equal(got, want, what=""):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e), err_msg=what)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("xla_graphs", [False, True])
def test_gpu_rnn_cuda_graph_equals_direct_launches_bitwise(rng, mode, xla_graphs):
    """The same cuDNN kernels captured and replayed, or launched one by one: bitwise-equal
    results, both close to the XLA path. Run eagerly by XLA, the handler's graph is
    captured once and then replayed; inside XLA's graphs, the handler leaves the capture
    to XLA. No step of the graph machinery fails (a failure would fall back silently)."""
    block, args = _graph_case(rng, mode)
    fn = apply_fn(block)
    before = _graph_stats()
    with jaxdnn.config.override(**{"dnn.rnn.cuda_graph": True}):
        on = _jit_xla_graphs(fn, xla_graphs)
        for _ in range(6):  # earlier results freed: XLA reuses their buffers, the key repeats
            got = jax.block_until_ready(on(*args))
    delta = _graph_delta(before)
    assert delta["failures"] == 0 and delta["direct"] == 0, delta
    if not xla_graphs:  # the first call runs directly (a warm-up), then capture and replays
        assert delta["warmups"] == 1, delta
        assert delta["instantiations"] >= 1 and delta["replays"] >= 1, delta
        assert delta["under_capture"] == 0, delta
    before = _graph_stats()
    with jaxdnn.config.override(**{"dnn.rnn.cuda_graph": False}):
        off = jax.block_until_ready(_jit_xla_graphs(fn, xla_graphs)(*args))
    delta = _graph_delta(before)
    assert delta["instantiations"] == delta["updates"] == delta["replays"] == 0, delta
    _assert_bitwise_equal(got, off, "cuda_graph on vs off")
    want = _jit_run(fn, *args, xla=True)
    for g, e in zip(got, want):
        assert_close(g, e, "float32", factor=2)


@pytest.mark.gpu
def test_gpu_rnn_cuda_graph_new_buffers_every_call(rng):
    """Every call on new input arrays whose results stay alive: new pointers each time, so
    every call after the first (a direct warm-up) misses the cache (4 execs instantiated,
    then updated in place, least recently used first); later calls on a few inputs in turn
    reuse them. Every result is the XLA path's for its own input."""
    block, (w, x, hx, cx) = _graph_case(rng)
    fn = apply_fn(block)
    xs = [x * (1.0 + 0.125 * k) for k in range(8)]
    wants = [_jit_run(fn, w, xk, hx, cx, xla=True) for xk in xs]
    before = _graph_stats()
    with jaxdnn.config.override(**{"dnn.rnn.cuda_graph": True}):
        on = _jit_xla_graphs(fn, False)
        kept = [on(w, xk, hx, cx) for xk in xs]
        jax.block_until_ready(kept)
        delta = _graph_delta(before)
        assert delta["failures"] == 0 and delta["replays"] == 0, delta
        assert delta["warmups"] == 1, delta
        assert delta["instantiations"] + delta["updates"] == len(xs) - 1, delta
        for k, (got, want) in enumerate(zip(kept, wants)):
            for g, e in zip(got, want):
                assert_close(g, e, "float32", factor=2, err_msg=f"call {k}")
        del kept
        for _ in range(3):  # three inputs in turn, results dropped: hits and misses mixed
            for k in (5, 6, 7):
                got = jax.block_until_ready(on(w, xs[k], hx, cx))
                for g, e in zip(got, wants[k]):
                    assert_close(g, e, "float32", factor=2, err_msg=f"input {k} again")
    assert _graph_delta(before)["failures"] == 0


@pytest.mark.gpu
def test_gpu_rnn_cuda_graph_gives_up_after_misses_in_a_row(rng):
    """New buffers at every call make capture pure cost: after GraphCache's limit of misses
    in a row the state launches directly, and every result stays right."""
    block, (w, x, hx) = _graph_case(rng, "gru")
    fn = apply_fn(block)
    xs = [x * (1.0 + 0.0625 * k) for k in range(24)]  # more than 4 * the cache's capacity
    before = _graph_stats()
    with jaxdnn.config.override(**{"dnn.rnn.cuda_graph": True}):
        on = _jit_xla_graphs(fn, False)
        kept = [on(w, xk, hx) for xk in xs]
        jax.block_until_ready(kept)
    delta = _graph_delta(before)
    assert delta["failures"] == 0 and delta["direct"] >= 1, delta
    calls = sum(delta[k] for k in ("warmups", "instantiations", "updates", "direct"))
    assert calls == len(xs), delta
    for k in (0, 15, 16, 23):
        want = _jit_run(fn, w, xs[k], hx, xla=True)
        for g, e in zip(kept[k], want):
            assert_close(g, e, "float32", factor=2, err_msg=f"call {k}")


@pytest.mark.gpu
def test_gpu_rnn_cuda_graph_training_forward(rng):
    """The gradient program run eagerly: the training-mode forward replays its graph, which
    writes the reserve space the backward passes read. The forward's outputs bitwise equal
    to the direct launches'; the gradients close to theirs and to the XLA path's."""
    block, args = _graph_case(rng)
    fn = apply_fn(block)

    def loss(*a):
        outs = fn(*a)
        return sum(jnp.sum(jnp.sin(o)) for o in outs), outs

    grad = jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True)
    before = _graph_stats()
    with jaxdnn.config.override(**{"dnn.rnn.cuda_graph": True}):
        on = _jit_xla_graphs(grad, False)
        for _ in range(4):
            got, outs = jax.block_until_ready(on(*args))
    delta = _graph_delta(before)
    assert delta["failures"] == 0 and delta["replays"] >= 1, delta
    with jaxdnn.config.override(**{"dnn.rnn.cuda_graph": False}):
        off, outs_off = jax.block_until_ready(_jit_xla_graphs(grad, False)(*args))
    _assert_bitwise_equal(outs, outs_off, "training forward, cuda_graph on vs off")
    want, _ = _jit_run(grad, *args, xla=True)
    for g, o, e, name in zip(got, off, want, ("dw", "dx", "dhx", "dcx")):
        assert_close(g, o, "float32", err_msg=f"{name} vs cuda_graph off")
        assert_close(g, e, "float32", factor=10, err_msg=f"{name} vs XLA")


@pytest.mark.gpu
def test_gpu_rnn_cuda_graph_from_several_threads(rng):
    """One compiled forward (one handler state, one graph cache) called from 8 threads at
    once, each on its own input, 12 times: every result is the XLA path's for its input,
    whether it came from a capture, an exec update, a replay or (once the misses pile up:
    8 threads' keys in a cache of 4) a direct launch."""
    import threading
    block, (w, x, hx, cx) = _graph_case(rng)
    fn = apply_fn(block)
    threads_count, calls = 8, 12
    xs = [x * (1.0 + 0.125 * k) for k in range(threads_count)]
    wants = [_jit_run(fn, w, xk, hx, cx, xla=True) for xk in xs]
    # Flags and matmul precision are read at trace time, per thread for override blocks
    # and precision contexts: set the flag process-wide (the autouse fixture restores it)
    # and give every thread the main thread's precision, so that all share one executable.
    jaxdnn.config.update("dnn.rnn.cuda_graph", True)
    on = _jit_xla_graphs(fn, False)
    jax.block_until_ready(on(w, x, hx, cx))  # compile once, before the threads
    barrier = threading.Barrier(threads_count)
    errors, checked = [], []

    def worker(k):
        try:
            with jax.default_matmul_precision("highest"):
                barrier.wait()
                for call in range(calls):
                    # checked at once and dropped, so that XLA may reuse the result buffers
                    # (the keys then repeat: replays as well as captures run concurrently)
                    got = jax.block_until_ready(on(w, xs[k], hx, cx))
                    for g, e in zip(got, wants[k]):
                        assert_close(g, e, "float32", factor=2,
                                     err_msg=f"thread {k} call {call}")
                    checked.append((k, call))
        except Exception as e:  # noqa: BLE001 -- reported below, with the thread
            errors.append((k, e))

    before = _graph_stats()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(checked) == threads_count * calls
    assert on._cache_size() == 1  # one executable served every thread
    assert _graph_delta(before)["failures"] == 0
