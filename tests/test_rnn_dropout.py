"""Dropout between the layers of RNNBlock (PyTorch's nn.LSTM(dropout=p)): against a NumPy
float64 oracle that runs the layers one at a time with the same masks
(tests/oracles/rnn.py), the masks drawn here with the jax.random calls RNNBlock.apply
documents; no key or a zero rate against the fused call; keys; gradients in both modes;
cuDNN's per-layer weight blocks; errors; the Flax modules in training and evaluation.
`gpu`-marked tests compare the cuDNN path with the XLA path under the same key and check
the fraction of dropped units."""
from __future__ import annotations

import itertools
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxdnn.flax as jflax
import jaxdnn.flax.nnx as jnnx
from helpers import assert_close, cast, jit_run, to_f64, xla_path
from oracles import rnn as ref
from jaxdnn.rnn import RNNBlock, weight_layout

STEPS, BATCH, INPUT_DIM, HIDDEN = 5, 3, 2, 3
LENGTHS = np.array([5, 1, 3])
RATE = 0.4


@pytest.fixture(autouse=True)
def _gpu_tests_in_full_float32(request):
    """gpu tests compare float32 results at float32's tolerance: no TF32 tensor cores on
    XLA's path either (as tests/test_rnn.py)."""
    if request.node.get_closest_marker("gpu"):
        with jax.default_matmul_precision("highest"):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------
# Cases and the oracle
# ---------------------------------------------------------------------------------------
def make_block(mode, direction="unidirectional", input_mode="linear", depth=3, rate=RATE,
               dtype="float64", hidden=HIDDEN):
    return RNNBlock(dtype, hidden, depth, mode, input_mode, direction, dropout=rate)


def input_dim_of(block):
    return block.hidden_size if block.input_mode == "skip" else INPUT_DIM


def make_case(rng, block, dtype="float64", steps=STEPS, batch=BATCH):
    """(w, (x, hx, cx) in dtype, their float64 copies, per-layer float64 weights)."""
    input_dim = input_dim_of(block)
    w = block.init_params(jax.random.key(int(rng.integers(1 << 30))), (batch, input_dim))
    w = w * 2.0  # larger weights: outputs far from zero, masks visible
    count = block.num_layers * block.num_directions
    layers = [[None if a is None else to_f64(a)
               for a in block.split_params(w, p, (batch, input_dim))] for p in range(count)]
    x = cast(rng.standard_normal((steps, batch, input_dim)), dtype)
    hx = cast(0.5 * rng.standard_normal((count, batch, block.hidden_size)), dtype)
    cx = (cast(0.5 * rng.standard_normal(hx[1].shape), dtype) if block.rnn_mode == "lstm"
          else (None, None))
    return w, (x[0], hx[0], cx[0]), (x[1], hx[1], cx[1]), layers


def masks_for(key, block, steps=STEPS, batch=BATCH):
    """The masks RNNBlock.apply's docstring promises: layer d's (d < num_layers - 1) is
    jax.random.bernoulli(jax.random.fold_in(key, d), float32(1 - p), y_d.shape)."""
    shape = (steps, batch, block.num_directions * block.hidden_size)
    keep = np.float32(1.0 - block.dropout)
    return [np.asarray(jax.random.bernoulli(jax.random.fold_in(key, d), keep, shape))
            for d in range(block.num_layers - 1)]


def oracle(block, layers, x64, hx64, cx64, key, lengths=None):
    return ref.rnn_with_dropout(layers, x64, hx64, cx64, lengths, mode=block.rnn_mode,
                                bidirectional=block.bidirectional,
                                masks=masks_for(key, block, *x64.shape[:2]),
                                rate=block.dropout)


def compare(got, want, dtype="float64", factor=1.0):
    assert len(got) == (3 if want[2] is not None else 2)
    for name, a, b in zip(("y", "hy", "cy"), got, want):
        assert a.dtype == jnp.dtype(dtype), (name, a.dtype)
        assert_close(a, b, dtype, factor=factor, err_msg=name)


def apply_fn(block, key, lengths=None):
    """apply in the differentiable operands (w, x, hx[, cx]), dropout on with `key`."""
    if block.rnn_mode == "lstm":
        return lambda w, x, hx, cx: block.apply(w, x, hx, cx, lengths, dropout_key=key)
    return lambda w, x, hx: block.apply(w, x, hx, None, lengths, dropout_key=key)


def operands(block, w, x, hx, cx):
    return (w, x, hx, cx) if block.rnn_mode == "lstm" else (w, x, hx)


def rnn_calls(fn, *args):
    """The cuDNN path's forward custom calls of fn lowered for CUDA: their num_layers."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"stablehlo\.custom_call @jaxdnn_rnn_fwd\w*\(.*?mhlo\.backend_config "
                       r"= \{(.*?)\}", text)
    return [int(re.search(r"num_layers = (\d+)", c).group(1)) for c in calls]


# ---------------------------------------------------------------------------------------
# cuDNN's weight space, layer by layer
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,direction,input_mode", list(itertools.product(
    ("rnn_tanh", "lstm", "gru"), ("unidirectional", "bidirectional"), ("linear", "skip"))))
def test_a_layers_weights_are_two_ranges_of_the_block(rng, mode, direction, input_mode):
    """cuDNN puts every layer's matrices before every layer's biases: a layer's weights
    are one contiguous range of matrices and one of biases (not one range, for more than
    one layer). The two joined are the block of that layer alone, which a one-layer block
    for the layer's input width accepts: its split_params are the full block's for the
    same layer and direction, and running the layers' blocks one after another gives the
    fused call's results."""
    depth = 3
    block = make_block(mode, direction, input_mode, depth=depth, rate=0.0)
    input_dim, directions = input_dim_of(block), block.num_directions
    w, (x, hx, cx), _, _ = make_case(rng, block)
    layout = weight_layout(mode, HIDDEN, depth, input_dim, input_mode, block.bidirectional)
    layer_input, hy, cy = x, [], []
    for d in range(depth):
        ranges = []
        for kind in ("matrix", "bias"):
            entries = [e for e in layout if e.kind == kind
                       and d * directions <= e.pseudo_layer < (d + 1) * directions]
            for a, b in zip(entries, entries[1:]):  # contiguous, no gap
                assert b.offset == a.offset + a.size
            ranges.append((entries[0].offset, entries[-1].offset + entries[-1].size))
        assert ranges[0][1] != ranges[1][0]  # two ranges apart: a gather is needed
        w_layer = jnp.concatenate([w[a:b] for a, b in ranges])
        layer_dim = input_dim if d == 0 else directions * HIDDEN
        single = RNNBlock("float64", HIDDEN, 1, mode, input_mode if d == 0 else "linear",
                          direction)
        assert w_layer.shape == (single.get_param_size((BATCH, layer_dim)),)
        for k in range(directions):
            for a, b in zip(single.split_params(w_layer, k, (BATCH, layer_dim)),
                            block.split_params(w, d * directions + k, (BATCH, input_dim))):
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(block._layer_weights(w, d, input_dim), w_layer)
        states = slice(d * directions, (d + 1) * directions)
        out = single.apply(w_layer, layer_input, hx[states],
                           None if cx is None else cx[states])
        layer_input = out[0]
        hy.append(out[1])
        cy.append(out[2] if cx is not None else None)
    fused = block.apply(w, x, hx, cx)
    np.testing.assert_allclose(layer_input, fused[0], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(jnp.concatenate(hy), fused[1], rtol=1e-13, atol=1e-13)
    if cx is not None:
        np.testing.assert_allclose(jnp.concatenate(cy), fused[2], rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------
# Values against the oracle
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,direction,input_mode,variable", [
    ("lstm", "unidirectional", "linear", False), ("lstm", "bidirectional", "linear", True),
    ("gru", "unidirectional", "linear", True), ("gru", "bidirectional", "skip", False),
    ("rnn_relu", "bidirectional", "linear", True), ("rnn_tanh", "unidirectional", "skip", True)])
def test_dropout_matches_numpy(rng, mode, direction, input_mode, variable):
    block = make_block(mode, direction, input_mode)
    w, (x, hx, cx), (x64, hx64, cx64), layers = make_case(rng, block)
    key = jax.random.key(7)
    lengths = LENGTHS if variable else None
    got = jax.jit(lambda *a: block.apply(*a, dropout_key=key))(w, x, hx, cx, lengths)
    want = oracle(block, layers, x64, hx64, cx64, key, lengths)
    compare(got, want)
    # The masks acted: the same network without dropout differs.
    assert not np.allclose(got[0], block.apply(w, x, hx, cx, lengths)[0], atol=1e-6)
    if variable:  # padded steps stay zero, as in the fused call
        for n, length in enumerate(LENGTHS):
            np.testing.assert_array_equal(got[0][length:, n], 0)


def test_dropout_with_the_key_traced_and_as_a_raw_key(rng):
    """A key passed through jit as an argument, and the raw uint32 key of the same seed
    (jax.random.PRNGKey), give the masks of the typed key."""
    block = make_block("gru", "bidirectional")
    w, (x, hx, _), (x64, hx64, _), layers = make_case(rng, block)
    fn = jax.jit(lambda w, x, hx, key: block.apply(w, x, hx, dropout_key=key))
    want = oracle(block, layers, x64, hx64, None, jax.random.key(3))
    compare(fn(w, x, hx, jax.random.key(3)), want)
    compare(fn(w, x, hx, jax.random.PRNGKey(3)), want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dropout_in_lower_precision(rng, dtype):
    block = make_block("lstm", "bidirectional", depth=2, dtype=dtype)
    w, (x, hx, cx), (x64, hx64, cx64), _ = make_case(rng, block, dtype)
    layers = [[None if a is None else to_f64(a) for a in block.split_params(
        w, p, (BATCH, INPUT_DIM))] for p in range(4)]
    key = jax.random.key(11)
    got = jax.jit(lambda *a: block.apply(*a, dropout_key=key))(w, x, hx, cx, LENGTHS)
    # each layer's output is rounded to dtype before the next reads it: twice the tolerance
    compare(got, oracle(block, layers, x64, hx64, cx64, key, LENGTHS), dtype, factor=4)


def test_no_key_or_zero_rate_is_the_fused_call(rng):
    """Evaluation (no key) and p = 0 run the one fused call, unchanged (the same program);
    a one-layer block has no layer to drop after."""
    block = make_block("lstm", "bidirectional")
    w, (x, hx, cx), _, _ = make_case(rng, block)
    plain = make_block("lstm", "bidirectional", rate=0.0)
    key = jax.random.key(0)
    fused = jax.make_jaxpr(lambda *a: plain.apply(*a))(w, x, hx, cx, LENGTHS)
    assert str(jax.make_jaxpr(lambda *a: block.apply(*a))(w, x, hx, cx, LENGTHS)) == str(fused)
    assert str(jax.make_jaxpr(lambda *a: plain.apply(*a, dropout_key=key))(
        w, x, hx, cx, LENGTHS)) == str(fused)
    for a, b in zip(block.apply(w, x, hx, cx, LENGTHS), plain.apply(w, x, hx, cx, LENGTHS)):
        np.testing.assert_array_equal(a, b)
    with pytest.warns(UserWarning, match="dropout"):
        single = make_block("gru", depth=1)
    ws, (xs, hs, _), _, _ = make_case(rng, single)
    for a, b in zip(single.apply(ws, xs, hs, dropout_key=key), single.apply(ws, xs, hs)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("direction", ["unidirectional", "bidirectional"])
def test_layer_by_layer_with_projections_equals_the_fused_call(rng, direction):
    """With a projection, layers above the first read proj_size * directions features and
    h has proj_size: at a rate that drops no unit, the per-layer stack (each layer's
    weights gathered, the projection's included) equals the fused call in float64."""
    block = RNNBlock("float64", 5, 3, "lstm", "linear", direction, proj_size=3, dropout=1e-12)
    d = block.num_directions
    w = jnp.asarray(0.3 * rng.standard_normal(block.get_param_size((BATCH, 4))))
    x = jnp.asarray(rng.standard_normal((6, BATCH, 4)))
    hx = jnp.asarray(rng.standard_normal((3 * d, BATCH, 3)))
    cx = jnp.asarray(rng.standard_normal((3 * d, BATCH, 5)))
    for lengths in (None, jnp.asarray([6, 3] + [1] * (BATCH - 2))):
        fused = block.apply(w, x, hx, cx, lengths)
        layered = block.apply(w, x, hx, cx, lengths, dropout_key=jax.random.key(1))
        assert layered[0].shape == (6, BATCH, 3 * d)
        for a, b in zip(layered, fused):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_keys_decide_the_masks(rng):
    block = make_block("gru")
    w, (x, hx, _), _, _ = make_case(rng, block)
    fn = jax.jit(lambda key: block.apply(w, x, hx, dropout_key=key)[0])
    one, again, other = fn(jax.random.key(1)), fn(jax.random.key(1)), fn(jax.random.key(2))
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, other, atol=1e-6)
    # under vmap, each key its own masks: the same as one call per key
    keys = jax.random.split(jax.random.key(5), 3)
    batched = jax.vmap(fn)(keys)
    for k in range(3):
        np.testing.assert_allclose(batched[k], fn(keys[k]), rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------
# Gradients: each layer is an ordinary call, so both modes of AD go through
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,direction,variable,order", [
    ("lstm", "bidirectional", True, 1), ("gru", "unidirectional", False, 2),
    ("rnn_tanh", "bidirectional", True, 1)])
def test_check_grads(rng, mode, direction, variable, order):
    block = make_block(mode, direction, depth=2, hidden=2)
    w, (x, hx, cx), _, _ = make_case(rng, block, steps=3, batch=2)
    lengths = np.array([3, 2]) if variable else None
    fn = jax.jit(apply_fn(block, jax.random.key(4), lengths))
    check_grads(fn, operands(block, w, x, hx, cx), order=order, modes=["fwd", "rev"])


def test_gradient_equals_central_differences_of_the_oracle(rng):
    """d(loss)/dx with dropout on equals central differences of the float64 oracle under
    the same masks (held fixed, as a key holds them)."""
    block = make_block("gru", depth=2)
    w, (x, hx, _), (x64, hx64, _), layers = make_case(rng, block)
    key = jax.random.key(9)
    loss = lambda x: jnp.sum(jnp.sin(block.apply(w, x, hx, dropout_key=key)[0]))
    grad = jax.jit(jax.grad(loss))(x)
    masks = masks_for(key, block)
    numeric = np.zeros_like(x64)
    eps = 1e-6
    for index in np.ndindex(x64.shape):
        plus, minus = x64.copy(), x64.copy()
        plus[index] += eps
        minus[index] -= eps
        value = lambda v: np.sum(np.sin(ref.rnn_with_dropout(
            layers, v, hx64, None, mode="gru", masks=masks, rate=RATE)[0]))
        numeric[index] = (value(plus) - value(minus)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------
# The cuDNN path (its primitives run on the CPU through their reference lowerings)
# ---------------------------------------------------------------------------------------
def test_cudnn_path_runs_one_call_per_layer(rng, cudnn_on_cpu):
    """With dropout the cuDNN path binds one single-layer call per layer (both directions
    in it); without, one call for the whole stack. Values and gradients equal the XLA
    path's under the same key."""
    block = make_block("lstm", "bidirectional")
    w, (x, hx, cx), (x64, hx64, cx64), layers = make_case(rng, block)
    key = jax.random.key(2)
    fn = apply_fn(block, key, LENGTHS)
    assert rnn_calls(fn, w, x, hx, cx) == [1, 1, 1]
    assert rnn_calls(apply_fn(block, None, LENGTHS), w, x, hx, cx) == [3]
    compare(jax.jit(fn)(w, x, hx, cx), oracle(block, layers, x64, hx64, cx64, key, LENGTHS))
    loss = lambda *a: sum(jnp.sum(jnp.sin(o)) for o in fn(*a))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    got = grad(w, x, hx, cx)
    with xla_path():
        want = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(w, x, hx, cx)
    for g, e in zip(got, want):
        assert_close(g, e, "float64")
    # forward mode: the per-layer primitives' JVP rules
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in (w, x, hx, cx))
    jvp = jax.jit(lambda a, t: jax.jvp(fn, a, t)[1])
    got = jvp((w, x, hx, cx), tangents)
    with xla_path():
        want = jax.jit(lambda a, t: jax.jvp(fn, a, t)[1])((w, x, hx, cx), tangents)
    for g, e in zip(got, want):
        assert_close(g, e, "float64")


def test_cudnn_path_under_vmap_over_keys(rng, cudnn_on_cpu):
    """Keys vmapped, data shared: each instance's masks batch the next layer's input, which
    the primitives' batching rule folds into N; the same as one call per key."""
    block = make_block("gru", depth=2)
    w, (x, hx, _), _, _ = make_case(rng, block)
    fn = jax.jit(lambda key: block.apply(w, x, hx, dropout_key=key)[0])
    keys = jax.random.split(jax.random.key(6), 2)
    assert "jaxdnn_rnn_fwd" in str(jax.make_jaxpr(jax.vmap(fn))(keys))
    batched = jax.jit(jax.vmap(fn))(keys)
    for k in range(2):
        np.testing.assert_allclose(batched[k], fn(keys[k]), rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate,error", [(-0.1, ValueError), (1.0, ValueError),
                                        (1.5, ValueError), (float("nan"), ValueError),
                                        ("0.5", TypeError), (True, TypeError),
                                        (None, TypeError)])
def test_bad_rates_raise(rate, error):
    with pytest.raises(error, match="dropout"):
        RNNBlock("float32", 4, 2, "lstm", dropout=rate)
    with pytest.raises(error, match="dropout"):
        jflax.GRU(4, num_layers=2, dropout=rate).init(jax.random.key(0), jnp.ones((1, 2, 3)),
                                                      deterministic=True)
    with pytest.raises(error, match="dropout"):
        jnnx.GRU(3, 4, 2, dropout=rate, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("key,error", [
    (0, TypeError), (np.zeros(2, np.float32), TypeError), (np.zeros(3, np.uint32), TypeError),
    (np.zeros((2, 2), np.uint32), TypeError), ("key", TypeError)])
def test_bad_keys_raise_at_trace_time(rng, key, error):
    block = make_block("gru")
    w, (x, hx, _), _, _ = make_case(rng, block)
    with pytest.raises(error, match="dropout_key"):
        jax.jit(lambda w: block.apply(w, x, hx, dropout_key=key)).trace(w)


def test_a_batch_of_keys_raises(rng):
    block = make_block("gru")
    w, (x, hx, _), _, _ = make_case(rng, block)
    with pytest.raises(ValueError, match="dropout_key"):
        block.apply(w, x, hx, dropout_key=jax.random.split(jax.random.key(0), 2))


def test_repr_names_the_rate():
    assert repr(make_block("gru")).endswith("dropout=0.4)")
    assert "dropout" not in repr(make_block("gru", rate=0.0))


# ---------------------------------------------------------------------------------------
# Flax: linen and NNX
# ---------------------------------------------------------------------------------------
def _flax_inputs(rng):
    x = jnp.asarray(rng.standard_normal((BATCH, STEPS, INPUT_DIM)))
    return x


@pytest.mark.parametrize("module_cls", [jflax.LSTM, jflax.GRU])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_linen_training_and_evaluation(rng, module_cls, bidirectional):
    """deterministic=True is the network without dropout; deterministic=False takes the
    key of the 'dropout' rng stream and computes RNNBlock.apply with that key."""
    x = _flax_inputs(rng)
    module = module_cls(HIDDEN, num_layers=3, bidirectional=bidirectional, dropout=RATE,
                        dtype=jnp.float64, param_dtype=jnp.float64)
    plain = module_cls(HIDDEN, num_layers=3, bidirectional=bidirectional,
                       dtype=jnp.float64, param_dtype=jnp.float64)
    variables = module.init(jax.random.key(0), x, deterministic=True)
    np.testing.assert_array_equal(module.apply(variables, x, deterministic=True),
                                  plain.apply(variables, x))
    key = jax.random.key(5)
    train = module.apply(variables, x, deterministic=False, rngs={"dropout": key})
    # what make_rng gives for that stream, then RNNBlock.apply with it
    drawn = nn.apply(lambda m: m.make_rng("dropout"), plain)({}, rngs={"dropout": key})
    mode = "lstm" if module_cls is jflax.LSTM else "gru"
    block = RNNBlock("float64", HIDDEN, 3, mode,
                     direction_mode="bidirectional" if bidirectional else "unidirectional",
                     dropout=RATE)
    directions = 2 if bidirectional else 1
    zeros = jnp.zeros((3 * directions, BATCH, HIDDEN))
    xt = jnp.swapaxes(x, 0, 1)
    out = block.apply(variables["params"]["weights"], xt, zeros,
                      zeros if mode == "lstm" else None, dropout_key=drawn)
    np.testing.assert_allclose(train, jnp.swapaxes(out[0], 0, 1), rtol=1e-13, atol=1e-13)
    assert not np.allclose(train, plain.apply(variables, x), atol=1e-6)
    # the attribute works as the argument does; both at once raise, as in Flax
    attribute = module.clone(deterministic=False)
    np.testing.assert_array_equal(attribute.apply(variables, x, rngs={"dropout": key}), train)
    np.testing.assert_array_equal(module.clone(deterministic=True).apply(variables, x),
                                  plain.apply(variables, x))
    with pytest.raises(ValueError, match="deterministic"):
        attribute.apply(variables, x, deterministic=True)


def test_linen_needs_deterministic_and_a_stream_only_when_dropout_acts(rng):
    x = _flax_inputs(rng)
    module = jflax.GRU(HIDDEN, num_layers=2, dropout=RATE)
    variables = module.init(jax.random.key(0), x, deterministic=True)
    with pytest.raises(ValueError, match="deterministic"):
        module.apply(variables, x)
    with pytest.raises(Exception, match="dropout"):  # no 'dropout' rng stream
        module.apply(variables, x, deterministic=False)
    # without dropout, nothing of it is asked for
    jflax.GRU(HIDDEN, num_layers=2).apply(variables, x)


def test_linen_train_step_with_lengths(rng):
    """A jitted training step: gradients flow through the dropped-out network, variable
    lengths included (the one-way output path skips the lengths: the same result)."""
    x = _flax_inputs(rng)
    module = jflax.LSTM(HIDDEN, num_layers=2, dropout=RATE, dtype=jnp.float64,
                        param_dtype=jnp.float64)
    variables = module.init(jax.random.key(0), x, deterministic=True)
    key = jax.random.key(3)

    def loss(params, key):
        y = module.apply({"params": params}, x, seq_lengths=LENGTHS, deterministic=False,
                         rngs={"dropout": key})
        return jnp.sum(y ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"], key)
    assert np.all(np.isfinite(grads["weights"])) and np.any(grads["weights"] != 0)
    # the one-way shortcut (no lengths to the block, outputs zeroed past the ends) equals
    # the block run with the lengths and the same key
    y = module.apply(variables, x, seq_lengths=LENGTHS, deterministic=False,
                     rngs={"dropout": key})
    carry, y_carry = module.clone(return_carry=True).apply(
        variables, x, seq_lengths=LENGTHS, deterministic=False, rngs={"dropout": key})
    np.testing.assert_allclose(y, y_carry, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("module_cls", [jnnx.LSTM, jnnx.GRU, jnnx.SimpleRNN])
def test_nnx_training_and_evaluation(rng, module_cls):
    x = _flax_inputs(rng)
    kwargs = dict(bidirectional=True, dtype=jnp.float64, param_dtype=jnp.float64)
    module = module_cls(INPUT_DIM, HIDDEN, 3, dropout=RATE, rngs=nnx.Rngs(0), **kwargs)
    plain = module_cls(INPUT_DIM, HIDDEN, 3, rngs=nnx.Rngs(0), **kwargs)
    # the same parameters as without dropout (the dropout stream is forked after them)
    np.testing.assert_array_equal(module.weights[...], plain.weights[...])
    assert module.deterministic is False  # as nnx.Dropout: training by default
    first, second = module(x), module(x)
    assert not np.allclose(first, second, atol=1e-6)  # the stream advances
    assert not np.allclose(first, plain(x), atol=1e-6)
    module.eval()
    np.testing.assert_array_equal(module(x), plain(x))
    module.train()
    assert module.deterministic is False
    np.testing.assert_array_equal(module(x, deterministic=True), plain(x))
    # a key given to the call is the block's dropout_key
    key = jax.random.key(8)
    mode = {jnnx.LSTM: "lstm", jnnx.GRU: "gru", jnnx.SimpleRNN: "rnn_tanh"}[module_cls]
    block = RNNBlock("float64", HIDDEN, 3, mode, direction_mode="bidirectional", dropout=RATE)
    zeros = jnp.zeros((6, BATCH, HIDDEN))
    out = block.apply(module.weights[...], jnp.swapaxes(x, 0, 1), zeros,
                      zeros if mode == "lstm" else None, dropout_key=key)
    np.testing.assert_allclose(module(x, rngs=key), jnp.swapaxes(out[0], 0, 1),
                               rtol=1e-13, atol=1e-13)
    # the same seed, the same masks; nnx.Rngs given to the call: its 'dropout' stream
    np.testing.assert_array_equal(module(x, rngs=nnx.Rngs(dropout=1)),
                                  module(x, rngs=nnx.Rngs(dropout=1)))
    if hasattr(nnx, "view"):
        np.testing.assert_array_equal(nnx.view(module, deterministic=True)(x), plain(x))


def test_nnx_errors_and_a_jitted_step(rng):
    x = _flax_inputs(rng)
    module = jnnx.GRU(INPUT_DIM, HIDDEN, 2, dropout=RATE, deterministic=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="deterministic"):
        module(x)
    with pytest.raises(TypeError, match="rngs"):
        module(x, deterministic=False, rngs="seed")
    module.deterministic = False

    @nnx.jit
    def step(module, x):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(module)

    grads = step(module, x)
    assert np.all(np.isfinite(grads.weights[...]))
    with pytest.warns(UserWarning, match="dropout"):
        one = jnnx.GRU(INPUT_DIM, HIDDEN, 1, dropout=RATE, rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, at construction
        np.testing.assert_array_equal(one(x), one(x))  # one layer: nothing to drop


# ---------------------------------------------------------------------------------------
# GPU: the cuDNN path against the XLA path under the same key
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode,direction,variable", [
    ("lstm", "unidirectional", False), ("lstm", "bidirectional", True),
    ("gru", "bidirectional", False), ("gru", "unidirectional", True),
    ("rnn_relu", "bidirectional", True)])
def test_gpu_dropout_cudnn_vs_xla_vs_numpy(rng, mode, direction, variable, dtype):
    block = make_block(mode, direction, dtype=dtype)
    w, (x, hx, cx), (x64, hx64, cx64), layers = make_case(rng, block, dtype)
    key = jax.random.key(13)
    lengths = LENGTHS if variable else None
    fn = lambda w, x, hx, cx: block.apply(w, x, hx, cx, lengths, dropout_key=key)
    assert rnn_calls(fn, w, x, hx, cx) == [1, 1, 1]
    cudnn, xla = jit_run(fn, w, x, hx, cx), jit_run(fn, w, x, hx, cx, xla=True)
    want = oracle(block, layers, x64, hx64, cx64, key, lengths)
    compare(cudnn, want, dtype, factor=2)
    compare(xla, want, dtype, factor=2)
    for a, b in zip(cudnn, xla):
        assert_close(a, b, dtype, factor=2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gpu_dropout_gradients_cudnn_vs_xla(rng, mode):
    block = make_block(mode, "bidirectional", dtype="float32")
    w, (x, hx, cx), _, _ = make_case(rng, block, "float32")
    fn = apply_fn(block, jax.random.key(21), jnp.asarray(LENGTHS, jnp.int32))
    args = operands(block, w, x, hx, cx)
    loss = lambda *a: sum(jnp.sum(jnp.sin(o)) for o in fn(*a))
    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    got, want = jit_run(grad, *args), jit_run(grad, *args, xla=True)
    for g, e, name in zip(got, want, ("dw", "dx", "dhx", "dcx")):
        assert_close(g, e, "float32", factor=10, err_msg=name)


def _fraction_dropped(rate, xla):
    """Layer 1 is tanh(x) of what it reads (identity input matrix, no recurrence, zero
    biases) and layer 0's outputs are never zero, so the zeros of y are the dropped units
    of layer 0's output: their fraction estimates the rate."""
    hidden, steps, batch = 64, 40, 32
    block = RNNBlock("float32", hidden, 2, "rnn_tanh", dropout=rate)
    first = [0.5 * np.eye(hidden)[:8], np.full(hidden, 0.3), np.zeros((hidden, hidden)),
             np.zeros(hidden)]
    second = [np.eye(hidden), np.zeros(hidden), np.zeros((hidden, hidden)), np.zeros(hidden)]
    w = block.merge_params([first, second], (batch, 8))
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.0, (steps, batch, 8)), jnp.float32)
    hx = jnp.zeros((2, batch, hidden), jnp.float32)
    fn = lambda w, x, hx: block.apply(w, x, hx, dropout_key=jax.random.key(17))[0]
    y = np.asarray(jit_run(fn, w, x, hx, xla=xla))
    return float(np.mean(y == 0)), y.size


@pytest.mark.parametrize("xla", [True, pytest.param(False, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_fraction_of_dropped_units_is_near_the_rate(rate, xla):
    fraction, count = _fraction_dropped(rate, xla)
    sigma = np.sqrt(rate * (1 - rate) / count)
    assert abs(fraction - rate) < 5 * sigma, (fraction, rate, sigma)
