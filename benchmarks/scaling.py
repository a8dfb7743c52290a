"""Data-parallel weak scaling of a training step: jaxdnn.flax beside flax.linen on 1..D devices.

    python benchmarks/scaling.py [--steps N] [--repeats N] [--batch-per-device B]
                                 [--models cnn,lstm] [--dtypes float32,bfloat16]
                                 [--max-devices D] [--small] [--json PATH]

The models are benchmarks/flax_training.py's (imported from beside this file):

* cnn: the small ResNet, NHWC, BatchNorm in training mode, computed in each of --dtypes
  (float32 parameters); Flax's nn.Conv/BatchNorm/max_pool/avg_pool or jaxdnn.flax's.
* lstm: the LSTM language model (Embed, a 2-layer LSTM, Dense), float32; Flax's two
  nn.RNN(nn.OptimizedLSTMCell) or one jaxdnn.flax.LSTM(num_layers=2) from the same
  parameters.

For k = 1, 2, 4, ... up to D = len(jax.devices()) (and D itself), a Mesh over the first k
devices with the axis 'data'; the batch (B per device, so k * B in all: weak scaling) is
sharded NamedSharding(mesh, P('data')), parameters and BatchNorm statistics replicated. One
step (forward, loss, value_and_grad, inline SGD update; nothing donated) is jitted with
those in/out shardings, compiled, warmed up and timed by `jaxdnn.bench.time_ms` (median of
--repeats runs of --steps back-to-back steps, each ending in block_until_ready). Reported:
samples/s, the ratio to the same model, dtype and side's 1-device samples/s (ideal: k), and
from the compiled program's text the all-gather and all-reduce ops (the asynchronous
*-start forms counted once) and the bytes all-reduced (the sum of the all-reduce results).
A batch-parallel step needs all-reduces of the gradients (and BatchNorm's statistics) but
no all-gather: one means some op gathered the sharded batch.

Runs on a CPU with forced host devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/scaling.py --small
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys

# As in the other GPU benchmarks: allocate GPU memory as needed.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # flax_training beside us

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jaxdnn  # noqa: E402
from jaxdnn import bench  # noqa: E402
import flax_training as ft  # noqa: E402

MODELS = ("cnn", "lstm")
DTYPES = ("float32", "bfloat16")
SIDES = ("flax", "jaxdnn")

# --- the compiled program's collectives ---------------------------------------------------

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# `%name = SHAPE op(`, SHAPE one array type (f32[16,3,3,16]{3,2,1,0}) or a tuple of them.
_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>all-reduce-start|all-reduce|all-gather-start|all-gather)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO result type: 'f32[16,3,3,16]{3,2,1,0}' or '(bf16[8], f32[])'."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(hlo_text: str) -> dict:
    """all_gathers, all_reduces (ops; an async *-start counts once, its *-done not at all)
    and all_reduce_bytes (the sum of the all-reduce results' sizes) of compiled HLO."""
    counts = {"all_gathers": 0, "all_reduces": 0, "all_reduce_bytes": 0}
    for match in _COLLECTIVE.finditer(hlo_text):
        if match["op"].startswith("all-gather"):
            counts["all_gathers"] += 1
        else:
            counts["all_reduces"] += 1
            counts["all_reduce_bytes"] += shape_bytes(match["shape"])
    return counts


# --- the models ---------------------------------------------------------------------------

def _cnn(dtype: str, batch: int, small: bool):
    """(flax model, jaxdnn model, params, state, inputs, targets, loss, converted params)."""
    p = ft.CNN_SIZES["small" if small else "full"]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, p["image"], p["image"], 3)).astype(np.float32)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    flax_model = ft.ResNet(p["widths"], dtype=jnp.dtype(dtype))
    jaxdnn_model = ft.JaxdnnResNet(p["widths"], dtype=jnp.dtype(dtype))
    params, state = ft.init_variables(flax_model, jnp.asarray(images))
    label = f"{p['image']}x{p['image']}x3, channels {'/'.join(map(str, p['widths']))}"
    return label, {"flax": (flax_model, params), "jaxdnn": (jaxdnn_model, params)}, state, \
        images, labels, ft.cross_entropy


def _lstm(dtype: str, batch: int, small: bool):
    p = ft.LM_SIZES["small" if small else "full"]
    tokens = np.random.default_rng(0).integers(0, p["vocab"], (batch, p["length"]))
    tokens = tokens.astype(np.int32)
    flax_model = ft.LM(p["vocab"], p["hidden"])
    jaxdnn_model = ft.LM(p["vocab"], p["hidden"], jaxdnn=True)
    params, _ = ft.init_variables(flax_model, jnp.asarray(tokens))
    converted = ft.lm_params_for_jaxdnn(params, p["hidden"], flax_model.layers)
    label = f"vocab {p['vocab']}, H{p['hidden']} x2, {p['length']} tokens"
    return label, {"flax": (flax_model, params), "jaxdnn": (jaxdnn_model, converted)}, {}, \
        tokens, tokens, ft.next_token_loss


def default_batch(model: str, small: bool) -> int:
    sizes = ft.CNN_SIZES if model == "cnn" else ft.LM_SIZES
    return sizes["small" if small else "full"]["batch"]


def device_counts(total: int, limit: int | None) -> list[int]:
    top = min(total, limit or total)
    counts, k = [], 1
    while k <= top:
        counts.append(k)
        k *= 2
    if counts[-1] != top:
        counts.append(top)
    return counts


def run_one(model, params, state, inputs, targets, loss_of, k: int, steps: int,
            repeats: int) -> dict:
    """Shard, compile, time one side's step on the first k devices."""
    mesh = Mesh(np.array(jax.devices()[:k]), ("data",))
    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    args = (jax.device_put(params, replicated), jax.device_put(state, replicated),
            jax.device_put(inputs, batched), jax.device_put(targets, batched))
    step = jax.jit(ft.sgd_step(model, loss_of),
                   in_shardings=(replicated, replicated, batched, batched),
                   out_shardings=(replicated, replicated, replicated))
    lowered = step.lower(*args)
    compiled = lowered.compile()
    counts = collectives(compiled.as_text())
    loss = float(compiled(*args)[2])
    ms = bench.time_ms(compiled, args, repeats, steps)
    path = "cudnn" if re.search(r"custom_call @jaxdnn_", lowered.as_text()) else "xla"
    return {"ms_per_step": ms, "samples_per_s": inputs.shape[0] / (ms * 1e-3),
            "first_loss": loss, "path": path, **counts}


def run(models=MODELS, dtypes=DTYPES, steps: int = 10, repeats: int = 3,
        batch_per_device: int | None = None, max_devices: int | None = None,
        small: bool = False, progress=None) -> list[dict]:
    counts = device_counts(len(jax.devices()), max_devices)
    rows = []
    for name in models:
        batch = batch_per_device or default_batch(name, small)
        for dtype in (dtypes if name == "cnn" else ("float32",)):
            builder = _cnn if name == "cnn" else _lstm
            for k in counts:
                label, sides, state, inputs, targets, loss_of = builder(dtype, batch * k, small)
                for side in SIDES:
                    if progress:
                        progress(f"{name} {dtype} {side} {k} device(s)")
                    model, params = sides[side]
                    result = run_one(model, params, state, inputs, targets, loss_of, k,
                                     steps, repeats)
                    rows.append({"model": name, "shape": label, "dtype": dtype, "side": side,
                                 "devices": k, "batch_per_device": batch,
                                 "global_batch": batch * k, **result})
    for row in rows:
        base = next(r for r in rows if r["devices"] == 1 and all(
            r[key] == row[key] for key in ("model", "dtype", "side")))
        row["scaling"] = row["samples_per_s"] / base["samples_per_s"]
    return rows


def format_rows(rows: list[dict]) -> str:
    header = ["model", "dtype", "side", "devices", "samples/s", "scaling vs 1 device",
              "all-gathers", "all-reduces", "all-reduce bytes", "path"]
    body = [[r["model"], r["dtype"], r["side"], str(r["devices"]), f"{r['samples_per_s']:.4g}",
             f"{r['scaling']:.2f}x", str(r["all_gathers"]), str(r["all_reduces"]),
             str(r["all_reduce_bytes"]), r["path"]] for r in rows]
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def environment() -> dict:
    reason = jaxdnn.unavailable_reason() if not jaxdnn.is_available() else None
    return {"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "device_count": len(jax.devices()), "jax": jax.__version__,
            "flax": flax.__version__, "jaxdnn_cudnn": reason or "available",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _split(values: list[str]) -> list[str]:
    return [v for value in values for v in value.split(",") if v]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-per-device", type=int, default=None,
                        help="default: flax_training's batch (cnn 128, lstm 64; small 4)")
    parser.add_argument("--models", nargs="+", default=["cnn,lstm"])
    parser.add_argument("--dtypes", nargs="+", default=["float32,bfloat16"],
                        help="the CNN's compute dtypes (the LSTM LM runs in float32)")
    parser.add_argument("--max-devices", type=int, default=None)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU test)")
    parser.add_argument("--json", metavar="PATH", default=None)
    args = parser.parse_args(argv)
    models, dtypes = _split(args.models), _split(args.dtypes)
    for value, allowed, flag in ((models, MODELS, "--models"), (dtypes, DTYPES, "--dtypes")):
        if not value or set(value) - set(allowed):
            parser.error(f"{flag} {','.join(value)}: expected some of {','.join(allowed)}")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")

    info = environment()
    rows = run(models, dtypes, args.steps, args.repeats, args.batch_per_device,
               args.max_devices, args.small,
               progress=lambda what: print(what, file=sys.stderr, flush=True))
    header = [
        f"# Data-parallel weak scaling: flax.linen vs jaxdnn.flax"
        f"{' (small shapes)' if args.small else ''}", "",
        f"Device: {info['device_kind']} ({info['backend']}, {info['device_count']} devices), "
        f"{info['date']}.",
        f"Versions: jax {info['jax']}, flax {info['flax']}. jaxdnn's cuDNN path: "
        f"{info['jaxdnn_cudnn']}.",
        f"Batch sharded P('data'), params replicated; median of {args.repeats} repeats of "
        f"{args.steps} steps. scaling = samples/s / the same side's 1-device samples/s "
        "(ideal: the device count).", ""]
    print("\n".join(header) + "\n" + format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
