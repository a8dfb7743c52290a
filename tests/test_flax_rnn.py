"""jaxdnn.flax's recurrent modules against Flax's own: nn.RNN over OptimizedLSTMCell,
GRUCell and SimpleCell (stacked, and nn.Bidirectional), with parameters converted by
from_flax_cells / to_flax_cells. On the CPU this runs jaxdnn's XLA path; the cuDNN path
computes the same block (tests/test_rnn.py)."""
from typing import Any

import re

import flax.linen as nn
import jax
from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdnn
import jaxdnn.flax.nnx as jnnx
from jaxdnn.rnn import RNNBlock
from jaxdnn.flax.recurrent import GRU, LSTM, SimpleRNN, from_flax_cells, to_flax_cells

CELLS = {"lstm": (LSTM, nn.OptimizedLSTMCell), "gru": (GRU, nn.GRUCell),
         "rnn_tanh": (SimpleRNN, nn.SimpleCell)}
N, T, I, H = 3, 5, 4, 6


class FlaxStack(nn.Module):
    """What a Flax user writes: a stack of nn.RNN layers, each optionally bidirectional."""
    cell: Any = None
    num_layers: int = 1
    bidirectional: bool = False

    @nn.compact
    def __call__(self, x, seq_lengths=None):
        # Cells are named in cuDNN's layer order, 2 * depth + direction.
        directions = 2 if self.bidirectional else 1
        cell = lambda depth, direction: self.cell(H, name=f"cell_{directions * depth + direction}")
        for depth in range(self.num_layers):
            forward = nn.RNN(cell(depth, 0))
            if self.bidirectional:
                x = nn.Bidirectional(forward, nn.RNN(cell(depth, 1)))(x, seq_lengths=seq_lengths)
            else:
                x = forward(x, seq_lengths=seq_lengths)
        return x


def _flax_cells(params, num_layers, bidirectional):
    """Flax's cell dicts in cuDNN's layer order (2 * depth + direction)."""
    count = num_layers * (2 if bidirectional else 1)
    return [params["params"][f"cell_{k}"] for k in range(count)]


def _setup(mode, num_layers, bidirectional):
    jaxdnn_cls, flax_cell = CELLS[mode]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((N, T, I)), jnp.float32)
    stack = FlaxStack(flax_cell, num_layers, bidirectional)
    params = stack.init(jax.random.key(1), x)
    weights = from_flax_cells(mode, _flax_cells(params, num_layers, bidirectional),
                              hidden_size=H, num_layers=num_layers, input_dim=I,
                              bidirectional=bidirectional)
    module = jaxdnn_cls(H, num_layers, bidirectional)
    return x, stack, params, module, {"params": {"weights": weights}}


@pytest.mark.parametrize("mode", list(CELLS))
@pytest.mark.parametrize("num_layers, bidirectional", [(1, False), (2, True)])
def test_same_outputs_as_flax(mode, num_layers, bidirectional):
    x, stack, params, module, ours = _setup(mode, num_layers, bidirectional)
    want = stack.apply(params, x)
    got = jax.jit(module.apply)(ours, x)
    assert got.shape == want.shape == (N, T, H * (2 if bidirectional else 1))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_same_gradients_as_flax(mode):
    x, stack, params, module, ours = _setup(mode, 2, False)
    loss = lambda apply, p, x: jnp.sum(jnp.sin(apply(p, x)))
    gx_want = jax.grad(loss, 2)(stack.apply, params, x)
    gx_got = jax.jit(jax.grad(loss, 2), static_argnums=0)(module.apply, ours, x)
    np.testing.assert_allclose(gx_got, gx_want, rtol=1e-4, atol=1e-5)
    # and the parameter gradients, compared in Flax's terms
    gw = jax.grad(loss, 1)(module.apply, ours, x)["params"]["weights"]
    gp = jax.grad(loss, 1)(stack.apply, params, x)
    back = to_flax_cells(mode, gw, hidden_size=H, num_layers=2, input_dim=I)
    for got_cell, want_cell in zip(back, _flax_cells(gp, 2, False)):
        for name, dense in want_cell.items():
            np.testing.assert_allclose(got_cell[name]["kernel"], dense["kernel"], rtol=1e-4,
                                       atol=1e-5)


@pytest.mark.parametrize("mode", list(CELLS))
def test_to_flax_cells_round_trip_keeps_the_function(mode):
    x, stack, params, module, ours = _setup(mode, 2, True)
    cells = to_flax_cells(mode, ours["params"]["weights"], hidden_size=H, num_layers=2,
                          input_dim=I, bidirectional=True)
    rebuilt = {"params": {f"cell_{k}": cell for k, cell in enumerate(cells)}}
    np.testing.assert_allclose(stack.apply(rebuilt, x), stack.apply(params, x), rtol=2e-5,
                               atol=2e-5)


def test_carry_and_seq_lengths_match_flax():
    x, stack, params, module, ours = _setup("lstm", 1, False)
    lengths = jnp.asarray([5, 2, 3], jnp.int32)
    flax_rnn = nn.RNN(nn.OptimizedLSTMCell(H), return_carry=True)
    (c_want, h_want), y_want = flax_rnn.apply({"params": {"cell": params["params"]["cell_0"]}},
                                              x, seq_lengths=lengths)
    module = LSTM(H, return_carry=True)
    (c_got, h_got), y_got = module.apply(ours, x, seq_lengths=lengths)
    np.testing.assert_allclose(c_got[0], c_want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(h_got[0], h_want, rtol=2e-5, atol=2e-5)
    for n, length in enumerate(np.asarray(lengths)):  # Flax leaves padded steps unspecified
        np.testing.assert_allclose(y_got[n, :length], y_want[n, :length], rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(y_got[n, length:], 0)


def test_time_major_and_initial_carry():
    x, _, _, _, ours = _setup("gru", 1, False)
    h0 = jnp.ones((1, N, H), jnp.float32)
    batch_major = GRU(H).apply(ours, x, h0)
    time_major = GRU(H, time_major=True).apply(ours, jnp.swapaxes(x, 0, 1), h0)
    np.testing.assert_allclose(jnp.swapaxes(time_major, 0, 1), batch_major, rtol=1e-6)
    assert not np.allclose(batch_major, GRU(H).apply(ours, x))  # h0 matters


def test_init_gives_a_block_of_the_right_size():
    params = LSTM(H, num_layers=2, bidirectional=True).init(jax.random.key(0), jnp.ones((N, T, I)))
    w = params["params"]["weights"]
    # per direction: layer 0 4H(I+H) + 8H biases, layer 1 4H(2H+H) + 8H
    assert w.shape == (2 * (4 * H * (I + H) + 8 * H + 4 * H * (2 * H + H) + 8 * H),)
    assert w.dtype == jnp.float32 and bool(jnp.all(jnp.abs(w) <= 1 / np.sqrt(H)))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="inputs must be 3-D"):
        LSTM(H).init(jax.random.key(0), jnp.ones((T, I)))
    with pytest.raises(ValueError, match="activation"):
        SimpleRNN(H, activation="gelu").init(jax.random.key(0), jnp.ones((N, T, I)))


# ---- Flax NNX ---------------------------------------------------------------------------
NNX_CELLS = {"lstm": jnnx.LSTM, "gru": jnnx.GRU, "rnn_tanh": jnnx.SimpleRNN}


def _nnx_module(mode, weights, num_layers, bidirectional, **kwargs):
    """An NNX module holding `weights` (the block converted from Flax's linen cells)."""
    module = NNX_CELLS[mode](I, H, num_layers, bidirectional=bidirectional,
                             rngs=nnx.Rngs(0), **kwargs)
    assert module.weights[...].shape == weights.shape
    module.weights[...] = weights
    return module


@pytest.mark.parametrize("mode", list(CELLS))
def test_nnx_modules_match_flax(mode):
    """The NNX modules against Flax's own stack (linen nn.RNN over its cells), the same
    function: outputs and input gradients, bidirectional, with variable lengths."""
    x, stack, params, _, ours = _setup(mode, 2, True)
    module = _nnx_module(mode, ours["params"]["weights"], 2, True)
    lengths = jnp.array([5, 2, 4], jnp.int32)
    valid = (np.arange(T)[None, :] < np.asarray(lengths)[:, None])[..., None]
    want = stack.apply(params, x, seq_lengths=lengths)
    got = nnx.jit(lambda m, x: m(x, seq_lengths=lengths))(module, x)
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0),
                               rtol=2e-5, atol=2e-5)
    loss = lambda y: jnp.sum(jnp.where(valid, jnp.sin(y), 0))
    gx_want = jax.grad(lambda x: loss(stack.apply(params, x, seq_lengths=lengths)))(x)
    gx_got = nnx.jit(nnx.grad(lambda x, m: loss(m(x, seq_lengths=lengths))))(x, module)
    np.testing.assert_allclose(gx_got, gx_want, rtol=1e-4, atol=1e-5)


def test_nnx_lstm_carry_and_a_training_step():
    x, _, params, _, ours = _setup("lstm", 1, False)
    module = _nnx_module("lstm", ours["params"]["weights"], 1, False, return_carry=True)
    lengths = jnp.asarray([5, 2, 3], jnp.int32)
    flax_rnn = nn.RNN(nn.OptimizedLSTMCell(H), return_carry=True)
    (c_want, h_want), _ = flax_rnn.apply({"params": {"cell": params["params"]["cell_0"]}},
                                         x, seq_lengths=lengths)
    (c_got, h_got), _ = module(x, seq_lengths=lengths)
    np.testing.assert_allclose(c_got[0], c_want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(h_got[0], h_want, rtol=2e-5, atol=2e-5)

    @nnx.jit
    def step(module, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x)[1] ** 2))(module)
        nnx.update(module, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(module, nnx.Param),
                                        grads))
        return loss

    losses = [float(step(module, x)) for _ in range(5)]
    assert losses[-1] < losses[0]


def test_nnx_errors_name_the_argument():
    with pytest.raises(ValueError, match="built for in_features=4"):
        jnnx.GRU(I, H, rngs=nnx.Rngs(0))(jnp.ones((N, T, I + 1)))
    with pytest.raises(ValueError, match="activation"):
        jnnx.SimpleRNN(I, H, activation="gelu", rngs=nnx.Rngs(0))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(CELLS))
def test_gpu_cudnn_modules_match_flax(mode):
    """On the GPU the modules run cuDNN (the gpu marker forces it): still Flax's outputs and
    input gradients, bidirectional, with variable lengths, in full float32."""
    x, stack, params, module, ours = _setup(mode, 2, True)
    lengths = jnp.array([5, 2, 4], jnp.int32)
    valid = (np.arange(T)[None, :] < np.asarray(lengths)[:, None])[..., None]
    loss = lambda apply, p, x: jnp.sum(jnp.where(valid, jnp.sin(apply(p, x, seq_lengths=lengths)), 0))
    with jax.default_matmul_precision("highest"):
        lowered = jax.jit(module.apply).lower(ours, x, seq_lengths=lengths).as_text()
        assert "jaxdnn_rnn_fwd" in lowered
        want = stack.apply(params, x, seq_lengths=lengths)
        got = jax.jit(module.apply)(ours, x, seq_lengths=lengths)
        gx_want = jax.grad(loss, 2)(stack.apply, params, x)
        gx_got = jax.jit(jax.grad(loss, 2), static_argnums=0)(module.apply, ours, x)
    # Flax's nn.RNN leaves outputs past a sequence's end unspecified; jaxdnn zeroes them
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.where(valid, got, 0), got, atol=0)
    np.testing.assert_allclose(gx_got, gx_want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_one_way_outputs_with_lengths_skip_the_lengths_path(mode):
    """Unidirectional, outputs only: the modules run every sequence to the end and zero the
    outputs past each end (no variable-length cuDNN call). The same outputs and gradients as
    RNNBlock with the lengths, and Flax's within each sequence."""
    x, stack, params, module, ours = _setup(mode, 2, False)
    lengths = jnp.array([5, 2, 4], jnp.int32)
    got = module.apply(ours, x, seq_lengths=lengths)
    rnn = RNNBlock("float32", H, 2, mode)
    w = ours["params"]["weights"]
    hx = jnp.zeros((2, N, H))

    def with_lengths(w, x):
        out = rnn.apply(w, jnp.swapaxes(x, 0, 1), hx, hx if mode == "lstm" else None, lengths)
        return jnp.swapaxes(out[0], 0, 1)

    np.testing.assert_allclose(got, with_lengths(w, x), rtol=1e-6, atol=1e-6)
    valid = (np.arange(T)[None, :] < np.asarray(lengths)[:, None])[..., None]
    np.testing.assert_array_equal(np.where(valid, 0, got), 0)
    np.testing.assert_allclose(np.where(valid, got, 0),
                               np.where(valid, stack.apply(params, x, seq_lengths=lengths), 0),
                               rtol=2e-5, atol=2e-5)
    loss = lambda y: jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape))
    gw_got, gx_got = jax.grad(lambda w, x: loss(module.apply({"params": {"weights": w}}, x,
                                                             seq_lengths=lengths)),
                              argnums=(0, 1))(w, x)
    gw_want, gx_want = jax.grad(lambda w, x: loss(with_lengths(w, x)), argnums=(0, 1))(w, x)
    np.testing.assert_allclose(gx_got, gx_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw_got, gw_want, rtol=1e-5, atol=1e-6)


def test_one_way_outputs_with_lengths_lower_to_the_graph_safe_target(monkeypatch):
    """On the cuDNN path (simulated here: the lowering needs no GPU) the same module call
    lowers to jaxdnn_rnn_fwd, not to the host-lengths target; with return_carry it needs
    the lengths' final states, so it takes the host-lengths target."""
    from jaxdnn import _extension
    from jaxdnn import rnn as rnn_module
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_extension, "has_targets", lambda *names: True)
    monkeypatch.setattr(rnn_module, "temp_space_sizes",
                        lambda *, training, **config: (64, 8 if training else 0))
    x, _, _, module, ours = _setup("gru", 1, False)
    lengths = jnp.array([5, 2, 4], jnp.int32)

    def targets(module):
        with jaxdnn.config.override(**{"dnn.enabled": True}):
            text = jax.jit(lambda x, l: module.apply(ours, x, seq_lengths=l)).trace(
                x, lengths).lower(lowering_platforms=("cuda",)).as_text()
        return re.findall(r"custom_call @(jaxdnn_rnn_\w+)", text)

    assert targets(module) == ["jaxdnn_rnn_fwd"]
    assert targets(GRU(H, return_carry=True)) == ["jaxdnn_rnn_fwd_host_lengths"]


# ---- LSTM projections (proj_size) ---------------------------------------------------------
P = 2  # projected features per direction (< H)


def _proj_oracle(weights, x, lengths, c0, h0, num_layers, bidirectional):
    """The NumPy float64 oracle (tests/oracles/rnn.py) on the block's split_params view,
    batch-major in and out like the modules."""
    from oracles import rnn as ref
    block = RNNBlock("float64", H, num_layers, "lstm",
                     direction_mode="bidirectional" if bidirectional else "unidirectional",
                     proj_size=P)
    w = np.asarray(weights, np.float64)
    layers = [[None if a is None else np.asarray(a) for a in block.split_params(w, k, (1, I))]
              for k in range(num_layers * block.num_directions)]
    y, hy, cy = ref.rnn(layers, np.swapaxes(np.asarray(x, np.float64), 0, 1), h0, c0, lengths,
                        mode="lstm", bidirectional=bidirectional)
    return np.swapaxes(y, 0, 1), hy, cy


def test_lstm_projection_linen_and_nnx_match_the_oracle():
    """proj_size: h and the outputs have P features per direction, c keeps H (PyTorch's
    shapes); the linen and NNX modules compute the oracle's values with the same block."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((N, T, I)), jnp.float32)
    lengths = np.array([5, 2, 4])
    linen = LSTM(H, num_layers=2, bidirectional=True, return_carry=True, proj_size=P)
    params = linen.init(jax.random.key(0), x)
    w = params["params"]["weights"]
    block = RNNBlock("float32", H, 2, "lstm", direction_mode="bidirectional", proj_size=P)
    assert w.shape == (block.get_param_size((N, I)),)
    module = jnnx.LSTM(I, H, 2, bidirectional=True, return_carry=True, rngs=nnx.Rngs(0),
                       proj_size=P)
    assert module.weights[...].shape == w.shape
    module.weights[...] = w
    rng = np.random.default_rng(1)
    c0 = 0.5 * rng.standard_normal((4, N, H))
    h0 = 0.5 * rng.standard_normal((4, N, P))
    want = _proj_oracle(w, x, lengths, c0, h0, 2, True)
    carry = (jnp.asarray(c0, jnp.float32), jnp.asarray(h0, jnp.float32))
    runs = {"linen": jax.jit(linen.apply)(params, x, carry, jnp.asarray(lengths)),
            "nnx": nnx.jit(lambda m, x, c: m(x, c, seq_lengths=jnp.asarray(lengths)))(
                module, x, carry)}
    for name, ((c, h), y) in runs.items():
        assert y.shape == (N, T, 2 * P) and h.shape == (4, N, P) and c.shape == (4, N, H), name
        for got, expected in ((y, want[0]), (h, want[1]), (c, want[2])):
            np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5, err_msg=name)
    # the default carry is zeros of those shapes
    (c, h), y = LSTM(H, return_carry=True, proj_size=P).apply(
        {"params": {"weights": jnp.zeros(RNNBlock("float32", H, 1, "lstm", proj_size=P)
                                         .get_param_size((N, I)))}}, x)
    assert y.shape == (N, T, P) and h.shape == (1, N, P) and c.shape == (1, N, H)


def test_proj_size_errors_name_the_argument():
    x = jnp.ones((N, T, I))
    with pytest.raises(ValueError, match="proj_size=2 projects an lstm's hidden state"):
        GRU(H, proj_size=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"proj_size=6 must lie in \[0, hidden_size=6\)"):
        LSTM(H, proj_size=H).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="proj_size=1 projects an lstm's hidden state"):
        jnnx.SimpleRNN(I, H, rngs=nnx.Rngs(0), proj_size=1)
    with pytest.raises(ValueError, match=r"proj_size=-1 must lie in \[0, hidden_size=6\)"):
        jnnx.LSTM(I, H, rngs=nnx.Rngs(0), proj_size=-1)
