"""Softmax and batch norm where models use them: jaxdnn on 'auto', jaxdnn forced onto
cuDNN and the XLA code a JAX user writes, each inside the program a model compiles.

Inside a jitted program XLA fuses softmax and batch norm with their neighbours (the
scaling before an attention softmax, the matrix product after it, a ReLU after batch
norm, their gradients); a cuDNN call cannot join such a fusion and reads and writes whole
arrays on its own. Per-call timings (`jaxdnn bench`) miss that, so this script times each
op in its usual company:

* softmax: attention, softmax(Q Kᵀ / sqrt(d)) V over the last axis (`jaxdnn.nn.softmax`
  against `jax.nn.softmax`); a classifier head, the mean cross-entropy of
  log_softmax(x W + b) (`jaxdnn.nn.log_softmax` against `jax.nn.log_softmax`); and the
  bare op on 8192x4096 rows and on a channels-last image (`dnn_softmax`);
* batch norm: ReLU(batch norm(x)), training (forward and the gradients of x, gamma, beta)
  and inference (forward with given statistics), in every dtype (float32, bfloat16,
  float16), layout (NCHW, NHWC) and mode (spatial, per-activation), against the plain-jnp
  batch norm XLA fuses (statistics in float32). No convolution sits before it: a
  convolution is a library call in XLA too, so it fuses with neither side, and its time
  would bury the difference.

Each case is timed twice: "program xK" runs K independent applications (distinct
buffers) in one jitted program and reports the time per application (in_program.py's
`time_in_program_ms`, a steady stream of programs: `jaxdnn.bench.steady_time_ms`);
"per call" one application per jitted call, in a steady stream of calls. "auto takes" is
where jaxdnn's 'auto' went (`jaxdnn.bench.lowered_path`); where 'auto' lowers to the
same program as cuDNN forced, that time is reused. Ratios are XLA ms / jaxdnn ms: above
1 jaxdnn is faster. The rows where 'auto' is slower than XLA by more than --tolerance are
listed at the end: 'auto' should have none (jaxdnn/softmax.py and jaxdnn/batchnorm.py,
`_xla_is_faster`, route from these figures).

    python benchmarks/in_model.py [OUT_DIR] [--quick] [--size full|small]
        [--ops softmax batchnorm] [--match attention] [--timing program call]
        [--copies 8] [--repeats 5] [--calls 5]

writes OUT_DIR/in_model.{md,json} and prints the table. --quick times one shape of each
kind (the 32000-class head, the smaller batch norm image) and softmax only in the
training pass, with 3 repeats: 32 of the 72 cases. --size small (the default without
cuDNN) runs the same kinds on tiny shapes, for a CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jaxdnn  # noqa: E402
from in_program import time_in_program_ms  # noqa: E402
from jaxdnn import bench  # noqa: E402

OPS = ("softmax", "batchnorm")
TIMINGS = ("program", "call")
BN_EPSILON = 1e-5
BN_DTYPES = ("float32", "bfloat16", "float16")
BN_MODES = ("spatial", "per-activation")


@dataclass(frozen=True)
class ModelCase:
    op: str                # 'softmax' or 'batchnorm'
    kind: str              # 'attention', 'head', 'bare', 'batchnorm'
    label: str
    pass_: str             # 'fwd', 'fwd+bwd' (training: every input's gradient)
    dtype: str
    layout: str
    params: dict = field(default_factory=dict)
    in_quick: bool = True  # one shape of each kind is what --quick times

    @property
    def mode(self) -> str:
        return self.params.get("mode", "-")


# ---- the functions each side runs ---------------------------------------------------------

def _attention(softmax):
    def attention(q, k, v):
        scale = jnp.asarray(1 / math.sqrt(q.shape[-1]), q.dtype)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
        return jnp.einsum("bhqk,bhkd->bhqd", softmax(scores, axis=-1), v)
    return attention


def _head(log_softmax):
    """The mean cross-entropy of a dense layer's logits; labels (int32) come last and are
    not differentiated."""
    def head(x, w, b, labels):
        logp = log_softmax(x @ w + b, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
    return head


def _channel_axis(layout: str, ndim: int) -> int:
    return ndim - 1 if layout == "NHWC" else 1


def _bn_axes(mode: str, layout: str, ndim: int) -> tuple[int, ...]:
    if mode == "per-activation":
        return (0,)
    channel = _channel_axis(layout, ndim)
    return tuple(a for a in range(ndim) if a != channel)


def _xla_bn_train(x, gamma, beta, *, axes):
    """The plain-jnp training batch norm XLA fuses, statistics in float32 as cuDNN keeps
    them for half-precision images."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axes, keepdims=True)
    var = x32.var(axes, keepdims=True)
    return ((x32 - mean) * gamma * lax.rsqrt(var + BN_EPSILON) + beta).astype(x.dtype)


def _xla_bn_infer(x, gamma, beta, mean, var):
    x32 = x.astype(jnp.float32)
    return ((x32 - mean) * gamma * lax.rsqrt(var + BN_EPSILON) + beta).astype(x.dtype)


def _functions(case: ModelCase) -> tuple[Callable, Callable, int]:
    """(jaxdnn's function, XLA's, how many leading inputs are differentiated)."""
    p = case.params
    if case.kind == "attention":
        return _attention(jaxdnn.nn.softmax), _attention(jax.nn.softmax), 3
    if case.kind == "head":
        return _head(jaxdnn.nn.log_softmax), _head(jax.nn.log_softmax), 3
    if case.kind == "bare":
        fmt = "NHWC" if case.layout == "NHWC" else "NCHW"
        axis = -1 if case.layout in ("NC", "NHWC") else 1
        return (lambda x: jaxdnn.dnn_softmax(x, data_format=fmt),
                lambda x: jax.nn.softmax(x, axis=axis), 1)
    mode, layout = p["mode"], case.layout
    if p["training"]:
        axes = _bn_axes(mode, layout, 4)

        def jaxdnn_bn(x, gamma, beta):
            out = jaxdnn.dnn_batch_normalization_train(x, gamma, beta, mode, BN_EPSILON,
                                                       data_format=layout)[0]
            return jax.nn.relu(out)

        def xla_bn(x, gamma, beta):
            return jax.nn.relu(_xla_bn_train(x, gamma, beta, axes=axes))

        return jaxdnn_bn, xla_bn, 3

    def jaxdnn_infer(x, gamma, beta, mean, var):
        return jax.nn.relu(jaxdnn.dnn_batch_normalization_test(
            x, gamma, beta, mean, var, mode, BN_EPSILON, data_format=layout))

    def xla_infer(x, gamma, beta, mean, var):
        return jax.nn.relu(_xla_bn_infer(x, gamma, beta, mean, var))

    return jaxdnn_infer, xla_infer, 5


def _random(seed: int, shape, dtype, scale: float = 1.0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(shape, np.float32) * scale
    return values.astype(jnp.dtype(dtype))


def _inputs(case: ModelCase) -> tuple:
    p, dt = case.params, case.dtype
    if case.kind == "attention":
        shape = (p["b"], p["h"], p["l"], p["d"])
        return tuple(_random(seed, shape, dt) for seed in range(3))
    if case.kind == "head":
        n, features, classes = p["n"], p["features"], p["classes"]
        labels = np.random.default_rng(3).integers(0, classes, n).astype(np.int32)
        return (_random(0, (n, features), dt), _random(1, (features, classes), dt,
                                                         1 / math.sqrt(features)),
                _random(2, (classes,), dt), labels)
    if case.kind == "bare":
        return (_random(0, p["shape"], dt),)
    n, c, size, mode, layout = p["n"], p["c"], p["size"], p["mode"], case.layout
    shape = (n, size, size, c) if layout == "NHWC" else (n, c, size, size)
    if mode == "per-activation":
        stat = (1,) + shape[1:]
    else:
        stat = (1, 1, 1, c) if layout == "NHWC" else (1, c, 1, 1)
    # float32 parameters for every image dtype, as mixed-precision training keeps them
    params = [_random(1, stat, "float32", 0.1) + 1, _random(2, stat, "float32", 0.1)]
    if not p["training"]:
        params += [_random(3, stat, "float32", 0.1), np.abs(_random(4, stat, "float32")) + 0.5]
    return (_random(0, shape, dt), *params)


def _forward_backward(forward: Callable, differentiated: int) -> Callable:
    """The output and the gradients of the first `differentiated` inputs for a cotangent
    (the last argument), as a training step needs them."""
    def step(*args):
        *operands, cotangent = args
        diff, rest = operands[:differentiated], operands[differentiated:]
        y, vjp = jax.vjp(lambda *d: forward(*d, *rest), *diff)
        return y, vjp(cotangent)
    return step


def build(case: ModelCase) -> tuple[Callable, Callable, tuple]:
    """(jaxdnn_fn, xla_fn, args) for the case's pass, neither jitted."""
    jaxdnn_fn, xla_fn, differentiated = _functions(case)
    args = tuple(jnp.asarray(a) for a in _inputs(case))
    if case.pass_ == "fwd":
        return jaxdnn_fn, xla_fn, args
    out = jax.eval_shape(jaxdnn_fn, *args)
    cotangent = jnp.asarray(_random(len(args), out.shape, out.dtype))
    return (_forward_backward(jaxdnn_fn, differentiated),
            _forward_backward(xla_fn, differentiated), (*args, cotangent))


# ---- the cases --------------------------------------------------------------------------

def cases(size: str = "full", ops=OPS) -> list[ModelCase]:
    """Every case of `size`: 'full' the shapes models run (BENCHMARKS.md), 'small' the same
    kinds on shapes a CPU finishes in seconds."""
    full = size == "full"
    out = []
    if "softmax" in ops:
        # (B, H, L, d): B8 H16 L4096 would be 2**31 scores, past cuDNN's 32-bit sizes.
        attention = ([(8, 16, 1024, 64), (1, 16, 4096, 64)] if full else [(2, 2, 16, 8)])
        heads = [(1024, 1024, 1000), (1024, 1024, 32000)] if full else [(8, 16, 10)]
        bare = ([((8192, 4096), "NC"), ((64, 56, 56, 64), "NHWC")] if full
                else [((16, 32), "NC"), ((2, 4, 4, 8), "NHWC")])
        for dtype in ("float32", "bfloat16"):
            for pass_ in ("fwd+bwd", "fwd"):
                for i, (b, h, length, d) in enumerate(attention):
                    out.append(ModelCase("softmax", "attention",
                                         f"attention B{b} H{h} L{length} d{d}", pass_, dtype,
                                         "rows", dict(b=b, h=h, l=length, d=d), in_quick=i == 0))
                for i, (n, features, classes) in enumerate(heads):
                    out.append(ModelCase("softmax", "head",
                                         f"cross-entropy head N{n} {features}->{classes}",
                                         pass_, dtype, "rows",
                                         dict(n=n, features=features, classes=classes),
                                         in_quick=i == len(heads) - 1))  # 32000
                for shape, layout in bare:
                    label = ("softmax " + "x".join(map(str, shape)) if layout == "NC" else
                             f"softmax channel N{shape[0]} C{shape[3]} {shape[1]}x{shape[2]}")
                    out.append(ModelCase("softmax", "bare", label, pass_, dtype, layout,
                                         dict(shape=shape)))
    if "batchnorm" in ops:
        shapes = [(64, 256, 28), (64, 64, 112)] if full else [(4, 8, 4)]
        for i, (n, c, size_) in enumerate(shapes):
            for training in (True, False):
                for dtype in BN_DTYPES:
                    for layout in ("NCHW", "NHWC"):
                        for mode in BN_MODES:
                            what = "train" if training else "infer"
                            out.append(ModelCase(
                                "batchnorm", "batchnorm",
                                f"relu(bn) {what} {mode} N{n} C{c} {size_}^2",
                                "fwd+bwd" if training else "fwd", dtype, layout,
                                dict(n=n, c=c, size=size_, mode=mode, training=training),
                                in_quick=i == 0))
    return out


def quick(selected: list[ModelCase]) -> list[ModelCase]:
    """One shape of each kind; softmax in the training pass only."""
    return [c for c in selected if c.in_quick and (c.op == "batchnorm" or c.pass_ == "fwd+bwd")]


# ---- timing -------------------------------------------------------------------------------

def _flag(value):
    return jaxdnn.config.override(**{"dnn.enabled": value})


def _lowered(fn, args) -> str | None:
    try:
        return jax.jit(fn).lower(*args).as_text()
    except (RuntimeError, ValueError) as error:  # choose_impl's refusal under True
        if "dnn.enabled=True" not in str(error):
            raise
        return None


def _timer(timing: str, copies: int, repeats: int, calls: int):
    if timing == "program":
        return lambda fn, args: time_in_program_ms(fn, args, copies, repeats, calls)[0]
    return lambda fn, args: bench.steady_time_ms(jax.jit(fn), args, repeats, calls)


def measure(case: ModelCase, timings, copies: int, repeats: int, calls: int) -> list[dict]:
    """One row per timing of `case`: auto, cuDNN forced and XLA ms, ratios, the path."""
    jaxdnn_fn, xla_fn, args = build(case)
    with _flag("auto"):
        auto_text = jax.jit(jaxdnn_fn).lower(*args).as_text()
        path = bench.lowered_path(jaxdnn_fn, args)
    forced_text = None
    if jaxdnn.is_available():
        with _flag(True):
            forced_text = _lowered(jaxdnn_fn, args)
    rows = []
    for timing in timings:
        timed = _timer(timing, copies, repeats, calls)
        cudnn_ms = None
        if forced_text is not None:
            with _flag(True):
                cudnn_ms = timed(jaxdnn_fn, args)
        if cudnn_ms is not None and auto_text == forced_text:
            auto_ms = cudnn_ms  # the same program
        else:
            with _flag("auto"):
                auto_ms = timed(jaxdnn_fn, args)
        xla_ms = timed(xla_fn, args)
        rows.append({
            "op": case.op, "kind": case.kind, "case": case.label, "pass": case.pass_,
            "dtype": case.dtype, "layout": case.layout, "mode": case.mode,
            "timing": f"program x{copies}" if timing == "program" else "per call",
            "auto_ms": auto_ms, "cudnn_ms": cudnn_ms, "xla_ms": xla_ms,
            "auto_vs_xla": xla_ms / auto_ms,
            "cudnn_vs_xla": xla_ms / cudnn_ms if cudnn_ms else None,
            "auto_takes": path,
        })
    return rows


# ---- the report --------------------------------------------------------------------------

def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def report(rows: list[dict], header: str, tolerance: float) -> str:
    fmt = bench.format_ms
    lines = [header, "",
             "| case | pass | dtype | layout | mode | timing | jaxdnn auto ms | cuDNN forced ms "
             "| XLA ms | auto vs XLA | cuDNN vs XLA | auto takes |",
             "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['case']} | {r['pass']} | {r['dtype']} | {r['layout']} | "
                     f"{r['mode']} | {r['timing']} | {fmt(r['auto_ms'])} | "
                     f"{fmt(r['cudnn_ms'])} | {fmt(r['xla_ms'])} | {_ratio(r['auto_vs_xla'])} | "
                     f"{_ratio(r['cudnn_vs_xla'])} | {r['auto_takes']} |")
    lines.append("")
    for op in OPS:
        for timing in sorted({r["timing"] for r in rows}):
            chosen = [r for r in rows if r["op"] == op and r["timing"] == timing]
            if chosen:
                lines.append(
                    f"geomean {op}, {timing}: auto vs XLA "
                    f"{_ratio(_geomean([r['auto_vs_xla'] for r in chosen]))}, cuDNN forced "
                    f"vs XLA {_ratio(_geomean([r['cudnn_vs_xla'] for r in chosen]))}")
    slower = [r for r in rows if r["auto_vs_xla"] < 1 / (1 + tolerance)]
    lines.append("")
    lines.append(f"'auto' slower than XLA by more than {tolerance:.0%}: "
                 + ("none" if not slower else f"{len(slower)} row(s)"))
    for r in slower:
        lines.append(f"- {r['case']} {r['pass']} {r['dtype']} {r['layout']} {r['timing']}: "
                     f"{_ratio(r['auto_vs_xla'])} (auto takes {r['auto_takes']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=os.environ.get("OUT", "bench-logs"))
    parser.add_argument("--size", choices=bench.SIZES, default=None,
                        help="default: full where cuDNN can run, else small")
    parser.add_argument("--quick", action="store_true",
                        help="the first shape of each kind, training passes, 3 repeats")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--match", default="", help="a substring of the case labels")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--timing", nargs="+", choices=TIMINGS, default=list(TIMINGS))
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="default 5, --quick 3")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="how much slower than XLA a row may be before it is listed")
    args = parser.parse_args(argv)
    size = args.size or bench.default_size()
    repeats = args.repeats or (3 if args.quick else 5)
    selected = [c for c in cases(size, args.ops)
                if args.match in c.label and args.dtype in (None, c.dtype)]
    if args.quick:
        selected = quick(selected)
    rows = []
    for number, case in enumerate(selected):
        case_rows = measure(case, args.timing, args.copies, repeats, args.calls)
        rows += case_rows
        for r in case_rows:
            print(f"[{number + 1}/{len(selected)}] {r['case']} {r['pass']} {r['dtype']} "
                  f"{r['layout']} {r['timing']}: auto {bench.format_ms(r['auto_ms'])}, cuDNN "
                  f"{bench.format_ms(r['cudnn_ms'])}, XLA {bench.format_ms(r['xla_ms'])} ms, "
                  f"auto takes {r['auto_takes']}", flush=True)
    device = jax.devices()[0].device_kind
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    cudnn = jaxdnn.version(raises=False) if jaxdnn.is_available() else None
    header = (f"{device}, {date}, jax {jax.__version__}, jaxdnn {jaxdnn.__version__}, "
              f"cuDNN {cudnn or 'unavailable: ' + str(jaxdnn.unavailable_reason())}; size "
              f"{size}{', quick' if args.quick else ''}; median of {repeats} repeats")
    text = report(rows, header, args.tolerance)
    print(text)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "in_model.md").write_text(text + "\n")
    (out / "in_model.json").write_text(json.dumps(
        {"device": device, "date": date, "jax": jax.__version__, "cudnn": cudnn, "size": size,
         "quick": args.quick, "copies": args.copies, "repeats": repeats, "rows": rows},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
