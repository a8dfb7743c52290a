"""One full training step of two models, each built twice, from flax.linen's modules and
from jaxdnn.flax's drop-ins, timed in one process on one card.

    python benchmarks/flax_training.py [OUT_DIR] [--size full|small] [--repeats N]
                                       [--models cnn lstm_lm]

A step is what a training loop jits: forward, loss, `jax.value_and_grad`, a plain SGD
update of every parameter (written inline, no optax), the new BatchNorm statistics; it
returns (params, model state, loss) and donates nothing, so every timed call starts from
the same state. Both builds of a model start from the same parameters, and the first
step's losses are compared (a sanity check that the two compute the same function; the
script raises after writing its outputs when they disagree).

* cnn: a small ResNet, NHWC, bfloat16 compute with float32 parameters: stem Conv 3x3 +
  BatchNorm + relu, max_pool 3x3/2, two stages of two basic residual blocks (Conv-BN-relu-
  Conv-BN plus an identity or 1x1 projection shortcut; the second stage stride 2 and twice
  the channels), global average pool, Dense to 10 classes, softmax cross-entropy;
  BatchNorm in training mode (mutable batch_stats). Flax: nn.Conv, nn.BatchNorm,
  nn.max_pool, nn.avg_pool; jaxdnn: jaxdnn.flax's Conv, BatchNorm, max_pool, avg_pool
  (the same parameter tree). Full: batch 128 of 32x32x3, channels 64/128; small: batch 4
  of 8x8x3, channels 8/16.
* lstm_lm: Embed, a 2-layer LSTM, Dense to the vocabulary, next-token cross-entropy,
  float32. Flax: two nn.RNN(nn.OptimizedLSTMCell(H)); jaxdnn: jaxdnn.flax.LSTM(H,
  num_layers=2), its parameter block converted from the Flax cells by `from_flax_cells`.
  Full: vocabulary 1000, H 512, batch 64 x 128 tokens; small: 50, 16, 4 x 8.

Timed by `jaxdnn.bench.time_ms` (compile and warm-up, then the median of repeats of
back-to-back steps). Writes OUT_DIR/flax_training.json and OUT_DIR/flax_training.md
(speedup = Flax ms / jaxdnn ms; above 1 jaxdnn is faster). OUT_DIR defaults to bench-logs.
"""
from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace
from typing import Any, Callable, ClassVar, Sequence

# As in the other GPU benchmarks: allocate GPU memory as needed.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxdnn.flax as jdflax  # noqa: E402
from jaxdnn import bench  # noqa: E402
from jaxdnn.cli import ProgressBar  # noqa: E402
# beside this file: the header, table and output helpers of the RNN benchmark
from rnn_peers import environment, fmt, markdown_table, write_outputs  # noqa: E402

LEARNING_RATE = 0.1
CNN_SIZES = {"full": dict(batch=128, image=32, widths=(64, 128)),
             "small": dict(batch=4, image=8, widths=(8, 16))}
LM_SIZES = {"full": dict(vocab=1000, hidden=512, batch=64, length=128),
            "small": dict(vocab=50, hidden=16, batch=4, length=8)}
# The target: the LSTM language model's step at least 1.5x faster with jaxdnn.
TARGETS = {"lstm_lm": 1.5}
# Largest relative difference of the two builds' first losses: bfloat16 rounding for the
# CNN; for the float32 LM, TF32 matmuls on a GPU (cuDNN's and XLA's differ in order).
LOSS_RTOL = {"bfloat16": 2e-2, "float32": 2e-3}

FLAX_OPS = SimpleNamespace(Conv=nn.Conv, BatchNorm=nn.BatchNorm, max_pool=nn.max_pool,
                           avg_pool=nn.avg_pool)
JAXDNN_OPS = SimpleNamespace(Conv=jdflax.Conv, BatchNorm=jdflax.BatchNorm,
                             max_pool=jdflax.max_pool, avg_pool=jdflax.avg_pool)
PAD1 = ((1, 1), (1, 1))  # symmetric padding of a 3x3 window (what cuDNN pads natively)


# --- the CNN ------------------------------------------------------------------------------------

def _conv_bn(ops, x, features, kernel, strides, padding, dtype):
    """Conv (no bias) then BatchNorm in training mode, as ResNets pair them."""
    x = ops.Conv(features, kernel, strides, padding=padding, use_bias=False, dtype=dtype)(x)
    return ops.BatchNorm(use_running_average=False, momentum=0.9, dtype=dtype)(x)


def _residual_block(ops, x, features: int, strides: int, dtype):
    y = nn.relu(_conv_bn(ops, x, features, (3, 3), strides, PAD1, dtype))
    y = _conv_bn(ops, y, features, (3, 3), 1, PAD1, dtype)
    if strides != 1 or x.shape[-1] != features:  # projection shortcut
        x = _conv_bn(ops, x, features, (1, 1), strides, "VALID", dtype)
    return nn.relu(x + y)


class ResNet(nn.Module):
    """The small ResNet on flax.linen's layers; `JaxdnnResNet` swaps in jaxdnn.flax's."""
    widths: Sequence[int]
    num_classes: int = 10
    dtype: Any = jnp.bfloat16

    ops: ClassVar = FLAX_OPS

    @nn.compact
    def __call__(self, x):
        ops, dtype = self.ops, self.dtype
        x = nn.relu(_conv_bn(ops, x, self.widths[0], (3, 3), 1, PAD1, dtype))
        x = ops.max_pool(x, (3, 3), (2, 2), padding=PAD1)
        for stage, features in enumerate(self.widths):
            for block in range(2):
                x = _residual_block(ops, x, features, 2 if stage and not block else 1, dtype)
        x = ops.avg_pool(x, x.shape[1:3])  # global average pool: (N, 1, 1, C)
        return nn.Dense(self.num_classes, dtype=dtype)(x.reshape(x.shape[0], -1))


class JaxdnnResNet(ResNet):
    ops: ClassVar = JAXDNN_OPS


# --- the LSTM language model --------------------------------------------------------------------

class LM(nn.Module):
    """Embed, a `layers`-deep LSTM, Dense: the LSTM as Flax's stack of nn.RNN cells
    (cell_k) or, with `jaxdnn`, as one jaxdnn.flax.LSTM (one cuDNN block)."""
    vocab: int
    hidden: int
    layers: int = 2
    jaxdnn: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.hidden)(tokens)
        if self.jaxdnn:
            x = jdflax.LSTM(hidden_size=self.hidden, num_layers=self.layers)(x)
        else:
            for k in range(self.layers):
                x = nn.RNN(nn.OptimizedLSTMCell(self.hidden, name=f"cell_{k}"))(x)
        return nn.Dense(self.vocab)(x)


def lm_params_for_jaxdnn(params: dict, hidden: int, layers: int) -> dict:
    """The Flax LM's params as the jaxdnn LM's: the Flax cells (cell_k) become one block."""
    cells = [params[f"cell_{k}"] for k in range(layers)]
    weights = jdflax.from_flax_cells("lstm", cells, hidden_size=hidden, num_layers=layers,
                                     input_dim=hidden)
    return {"Embed_0": params["Embed_0"], "LSTM_0": {"weights": weights},
            "Dense_0": params["Dense_0"]}


# --- the training step ---------------------------------------------------------------------------

def cross_entropy(logits, labels):
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], axis=-1))


def next_token_loss(logits, tokens):
    return cross_entropy(logits[:, :-1], tokens[:, 1:])


def train_step(model: nn.Module, loss_of: Callable) -> Callable:
    """The jitted step(params, state, inputs, targets) -> (params, state, loss): state holds
    the mutable collections (BatchNorm's batch_stats), empty for the LM."""
    return jax.jit(sgd_step(model, loss_of))


def sgd_step(model: nn.Module, loss_of: Callable) -> Callable:
    """train_step's step, not jitted (scaling.py jits it with shardings)."""
    def loss_fn(params, state, inputs, targets):
        variables = {"params": params, **state}
        if state:
            out, state = model.apply(variables, inputs, mutable=list(state))
        else:
            out = model.apply(variables, inputs)
        return loss_of(out, targets), state

    def step(params, state, inputs, targets):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, inputs, targets)
        params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g.astype(p.dtype), params, grads)
        return params, state, loss

    return step


def init_variables(model: nn.Module, inputs) -> tuple[dict, dict]:
    """(params, the other collections) in the tree, shapes and dtypes of model.init, drawn
    by NumPy at the scale of Flax's default initializers (kernels and embeddings normal
    with variance 1 / fan-in, biases and means 0, scales and variances 1): on a CPU,
    compiling init (with Flax's orthogonal recurrent kernels, a QR) costs seconds, and the
    times do not depend on the values."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            value = np.ones(leaf.shape)
        elif name in ("bias", "mean"):
            value = np.zeros(leaf.shape)
        else:  # a kernel (fan-in: every axis but the last) or an embedding (its features)
            fan_in = np.prod(leaf.shape[1:] if name == "embedding" else leaf.shape[:-1])
            value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        return jnp.asarray(value.astype(np.float32), leaf.dtype)

    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)
    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def _check_same_tree(model: nn.Module, inputs, variables: dict) -> None:
    """variables have the tree, shapes and dtypes that model.init would give."""
    def spec(tree):
        return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)
    expected = spec(jax.eval_shape(model.init, jax.random.key(0), inputs))
    if spec(variables) != expected:
        raise AssertionError(f"{type(model).__name__}: the variables do not match its init")


def _cnn(size: str):
    """(description, dtype, flax (model, args), jaxdnn (model, args), loss)."""
    p = CNN_SIZES[size]
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((p["batch"], p["image"], p["image"], 3)),
                         jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, p["batch"]), jnp.int32)
    flax_model, jaxdnn_model = ResNet(p["widths"]), JaxdnnResNet(p["widths"])
    params, state = init_variables(flax_model, images)
    _check_same_tree(jaxdnn_model, images, {"params": params, **state})
    args = (params, state, images, labels)
    label = (f"N{p['batch']} {p['image']}x{p['image']}x3, channels "
             f"{'/'.join(map(str, p['widths']))}")
    return label, "bfloat16", (flax_model, args), (jaxdnn_model, args), cross_entropy


def _lstm_lm(size: str):
    p = LM_SIZES[size]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, p["vocab"],
                                                           (p["batch"], p["length"])),
                         jnp.int32)
    flax_model = LM(p["vocab"], p["hidden"])
    jaxdnn_model = LM(p["vocab"], p["hidden"], jaxdnn=True)
    params, _ = init_variables(flax_model, tokens)
    converted = lm_params_for_jaxdnn(params, p["hidden"], flax_model.layers)
    _check_same_tree(jaxdnn_model, tokens, {"params": converted})
    label = f"vocab {p['vocab']}, H{p['hidden']} x2, N{p['batch']} x {p['length']} tokens"
    return (label, "float32", (flax_model, (params, {}, tokens, tokens)),
            (jaxdnn_model, (converted, {}, tokens, tokens)), next_token_loss)


MODELS = {"cnn": _cnn, "lstm_lm": _lstm_lm}


def run(size: str = "small", repeats: int = 5, models=tuple(MODELS),
        progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """One row per model: Flax and jaxdnn ms per step, speedup, jaxdnn's path and the two
    first-step losses."""
    calls = bench.CALLS[size]
    rows = []
    for done, name in enumerate(models):
        if progress:
            progress(done, len(models), name)
        label, dtype, (flax_model, flax_args), (jaxdnn_model, jaxdnn_args), loss_of = (
            MODELS[name](size))
        flax_step, jaxdnn_step = train_step(flax_model, loss_of), train_step(jaxdnn_model, loss_of)
        flax_loss = float(flax_step(*flax_args)[2])
        jaxdnn_loss = float(jaxdnn_step(*jaxdnn_args)[2])
        flax_ms = bench.time_ms(flax_step, flax_args, repeats, calls)
        jaxdnn_ms = bench.time_ms(jaxdnn_step, jaxdnn_args, repeats, calls)
        difference = abs(jaxdnn_loss - flax_loss)
        speedup = flax_ms / jaxdnn_ms
        target = TARGETS.get(name)
        rows.append({
            "model": name, "shape": label, "dtype": dtype, "flax_ms": flax_ms,
            "jaxdnn_ms": jaxdnn_ms, "speedup": speedup,
            "path": bench.lowered_path(jaxdnn_step, jaxdnn_args),
            "flax_loss": flax_loss, "jaxdnn_loss": jaxdnn_loss, "loss_difference": difference,
            "losses_agree": difference <= LOSS_RTOL[dtype] * max(1.0, abs(flax_loss)),
            "target_speedup": target,
            "target": "" if target is None else ("met" if speedup >= target else "missed"),
        })
    if progress:
        progress(len(models), len(models), "done")
    return rows


def format_rows(rows: list[dict]) -> str:
    header = ["model", "shape", "dtype", "Flax ms/step", "jaxdnn ms/step", "speedup", "path",
              "first loss Flax", "first loss jaxdnn", "loss difference", "target"]
    body = [[r["model"], r["shape"], r["dtype"], fmt(r["flax_ms"]), fmt(r["jaxdnn_ms"]),
             fmt(r["speedup"], ".2f", "x"), r["path"], f"{r['flax_loss']:.6g}",
             f"{r['jaxdnn_loss']:.6g}",
             f"{r['loss_difference']:.2g}" + ("" if r["losses_agree"] else " MISMATCH"),
             "" if r["target_speedup"] is None
             else f">= {r['target_speedup']}x: {r['target']}"]
            for r in rows]
    return markdown_table(header, body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="bench-logs")
    parser.add_argument("--size", choices=bench.SIZES, default="full")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected at least 1")

    info, header = environment()
    rows = run(args.size, args.repeats, args.models, ProgressBar(sys.stderr))
    header = [f"# Flax training step: flax.linen vs jaxdnn.flax, size {args.size}", "",
              *header,
              f"Median of {args.repeats} repeats of {bench.CALLS[args.size]} steps "
              "(forward, loss, grad, SGD update; jitted, nothing donated).",
              "speedup = Flax ms / jaxdnn ms: above 1 jaxdnn is faster. Both builds start "
              "from the same parameters; their first-step losses are compared."]
    markdown = "\n".join(header) + "\n\n" + format_rows(rows) + "\n"
    write_outputs(args.out_dir, "flax_training", {"info": info, "size": args.size,
                                                  "repeats": args.repeats, "rows": rows},
                  markdown)
    mismatched = [r["model"] for r in rows if not r["losses_agree"]]
    if mismatched:
        raise AssertionError(f"first-step losses of Flax and jaxdnn differ for "
                             f"{', '.join(mismatched)} (see flax_training.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
