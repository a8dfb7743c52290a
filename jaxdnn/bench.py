"""Benchmarks: each jaxdnn op beside the XLA code a JAX user would write without jaxdnn.

    rows = jaxdnn.bench.run(["softmax"], size="small")

A case is one op on one shape, dtype and layout, timed for two passes: 'fwd' (the op)
and 'fwd+bwd' (`jax.vjp` of the op applied to a fixed random cotangent, returning the
output and the input gradient, as a training step needs both). Both sides are jitted,
warmed up (compile + 3 calls) and timed as the median over `repeats` repeats of `calls`
back-to-back calls, each repeat ending in `jax.block_until_ready`.

`jaxdnn bench` (jaxdnn/cli.py) prints these rows; benchmarks/run.py adds PyTorch.
"""
from __future__ import annotations

import datetime
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxdnn
from jaxdnn.layout import spatial_axes

__all__ = ["Case", "OPS", "SIZES", "PASSES", "FIELDS", "CALLS", "cases", "build", "run",
           "time_ms", "measure_bandwidth", "lowered_path", "default_size", "on_gpu",
           "format_table"]

OPS = ("softmax", "pool")
SIZES = ("small", "full")
PASSES = ("fwd", "fwd+bwd")
# The fields of a result row, in order; hbm_* are None off GPU.
# jaxdnn_ms is jaxdnn on its default flags (dnn.enabled='auto', which may pick XLA where
# that measured faster); cudnn_ms forces the cuDNN path (dnn.enabled=True), None where
# cuDNN cannot run.
FIELDS = ("op", "case", "pass", "dtype", "layout", "jaxdnn_ms", "cudnn_ms", "xla_ms", "ratio",
          "path", "hbm_floor_ms", "hbm_fraction", "hbm_gbs", "device", "date")

# Calls per timed repeat: enough to hide launch gaps on a GPU, few enough that the small
# preset stays quick on a CPU.
CALLS = {"small": 5, "full": 20}


@dataclass(frozen=True)
class Case:
    op: str                  # 'softmax' or 'pool'
    label: str
    shape: tuple[int, ...]   # of the input, in `layout`
    dtype: str
    layout: str              # 'NC' (2-D softmax input), 'NCHW', 'NHWC', 'NCDHW', ...
    params: dict[str, Any] = field(default_factory=dict)  # dnn_pool's ws, stride, pad, mode


def _softmax_case(n, c, spatial=None, layout="NC", mode="channel"):
    if spatial is None:
        return Case("softmax", f"softmax {n}x{c}", (n, c), "float32", "NC")
    shape = (n, *spatial, c) if layout == "NHWC" else (n, c, *spatial)
    label = f"softmax {mode} N{n} C{c} {'x'.join(map(str, spatial))}"
    return Case("softmax", label, shape, "float32", layout, dict(mode=mode))


def _pool_case(mode, ws, stride, pad, n, c, spatial, dtype="float32", layout=None):
    nd = len(spatial)
    layout = layout or ("NCHW" if nd == 2 else "NCDHW")
    shape = (n, *spatial, c) if layout.endswith("C") else (n, c, *spatial)
    dims = "x".join(map(str, ws))
    label = (f"{mode} {dims}/{stride} pad {pad} N{n} C{c} "
             f"{'x'.join(map(str, spatial))}")
    return Case("pool", label, shape, dtype, layout,
                dict(mode=mode, ws=ws, stride=(stride,) * nd, pad=(pad,) * nd))


def cases(size: str = "small", ops=None) -> list[Case]:
    """The cases of a preset: 'full' holds the ANCHORS.md shapes, 'small' the same
    variants on shapes tiny enough for a CPU."""
    if size not in SIZES:
        raise ValueError(f"size={size!r}; expected one of {', '.join(SIZES)}")
    ops = OPS if ops is None else tuple(ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; expected among {', '.join(OPS)}")
    full = size == "full"
    n, c, hw = (64, 64, 112) if full else (4, 8, 32)
    n3, c3, d3 = (8, 32, 32) if full else (2, 4, 8)
    pool2d = dict(ws=(3, 3), stride=2, pad=1, n=n, c=c, spatial=(hw, hw))
    every = [
        _softmax_case(*((8192, 4096) if full else (256, 512))),
        _softmax_case(n, c, (hw // 2, hw // 2), "NCHW"),
        _softmax_case(n, c, (hw // 2, hw // 2), "NHWC"),
        _softmax_case(n, c, (hw // 2, hw // 2), "NCHW", mode="instance"),
        _pool_case("max", **pool2d),
        _pool_case("average_inc_pad", **pool2d),
        _pool_case("max", **pool2d, dtype="bfloat16"),
        _pool_case("max", **pool2d, dtype="float16"),
        _pool_case("max", **pool2d, layout="NHWC"),
        _pool_case("max", (2, 2, 2), 2, 0, n3, c3, (d3, d3, d3)),
    ]
    return [case for case in every if case.op in ops]


# --- the two sides of each op ------------------------------------------------------------

def _softmax_functions(case: Case) -> tuple[Callable, Callable]:
    mode = case.params.get("mode", "channel")
    data_format = "NHWC" if case.layout == "NHWC" else "NCHW"
    axis = (1, 2, 3) if mode == "instance" else (-1 if data_format == "NHWC" else 1)
    return (lambda x: jaxdnn.dnn_softmax(x, mode=mode, data_format=data_format),
            lambda x: jax.nn.softmax(x, axis=axis))


def _xla_pool(x, *, mode, ws, stride, pad, layout):
    """What a JAX user writes without jaxdnn: lax.reduce_window, differentiated by XLA."""
    ndim = x.ndim

    def spread(values, fill):
        full = [fill] * ndim
        for axis, v in zip(spatial_axes(layout, ndim), values):
            full[axis] = v
        return tuple(full)

    window, strides = spread(ws, 1), spread(stride, 1)
    padding = tuple((p, p) for p in spread(pad, 0))
    # Python-scalar init values: JAX then recognizes the max/add monoid and differentiates
    # it (an array init value gives a generic, non-differentiable reduce_window).
    if mode == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)
    if mode == "average_inc_pad":
        sums = lax.reduce_window(x, 0.0, lax.add, window, strides, padding)
        return sums / math.prod(ws)
    raise ValueError(f"no XLA peer for pooling mode {mode!r}")


def _pool_functions(case: Case) -> tuple[Callable, Callable]:
    p = case.params

    def jaxdnn_pool(x):
        return jaxdnn.dnn_pool(x, p["ws"], p["stride"], p["mode"], p["pad"],
                               data_format=case.layout)

    def xla_pool(x):
        return _xla_pool(x, **p, layout=case.layout)

    return jaxdnn_pool, xla_pool


_FUNCTIONS = {"softmax": _softmax_functions, "pool": _pool_functions}


def _forward_backward(forward: Callable) -> Callable:
    """One training step's worth of the op: output and input gradient for a cotangent."""
    def step(x, cotangent):
        y, vjp = jax.vjp(forward, x)
        return y, vjp(cotangent)[0]
    return step


def _random(seed: int, shape, dtype: str):
    # Drawn by NumPy: jax.random would compile a sampler for every new shape, seconds each
    # on a small CPU.
    values = np.random.default_rng(seed).standard_normal(shape, np.float32)
    return jnp.asarray(values.astype(jnp.dtype(dtype)))


def build(case: Case, pass_: str) -> tuple[Callable, Callable, tuple]:
    """(jaxdnn_fn, xla_fn, args) for one pass of `case`, neither jitted yet."""
    if pass_ not in PASSES:
        raise ValueError(f"pass={pass_!r}; expected one of {', '.join(PASSES)}")
    jaxdnn_fn, xla_fn = _FUNCTIONS[case.op](case)
    x = _random(0, case.shape, case.dtype)
    if pass_ == "fwd":
        return jaxdnn_fn, xla_fn, (x,)
    out = jax.eval_shape(jaxdnn_fn, x)
    cotangent = _random(1, out.shape, case.dtype)
    return _forward_backward(jaxdnn_fn), _forward_backward(xla_fn), (x, cotangent)


def _bytes_moved(case: Case, pass_: str) -> int:
    """The least HBM traffic a pass can get by with: read x and write y; the backward adds
    reading the cotangent (y's size) and writing dx (x's size)."""
    itemsize = np.dtype(jnp.dtype(case.dtype)).itemsize
    jaxdnn_fn, _ = _FUNCTIONS[case.op](case)
    out = jax.eval_shape(jaxdnn_fn, jax.ShapeDtypeStruct(case.shape, case.dtype))
    once = (math.prod(case.shape) + math.prod(out.shape)) * itemsize
    return once if pass_ == "fwd" else 2 * once


# --- timing -------------------------------------------------------------------------------

def time_ms(fn: Callable, args: tuple, repeats: int = 5, calls: int = 10) -> float:
    """Milliseconds per call of an already-jitted `fn`: compile and 3 warm-up calls, then
    the median over `repeats` of the mean of `calls` back-to-back calls."""
    out = fn(*args)
    for _ in range(3):
        out = fn(*args)
    jax.block_until_ready(out)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def measure_bandwidth(repeats: int = 5, calls: int = 10) -> float:
    """Achievable memory bandwidth in GB/s: an `x + 1` over 1 GiB of float32 reads 1 GiB
    and writes 1 GiB."""
    x = jnp.zeros(1 << 28, jnp.float32)
    ms = time_ms(jax.jit(lambda a: a + 1), (x,), repeats, calls)
    return 2 * x.nbytes / (ms * 1e-3) / 1e9


_CUSTOM_CALL = re.compile(r"custom_call @jaxdnn_")


def lowered_path(fn: Callable, args: tuple) -> str:
    """'cudnn' when `fn` lowers to a jaxdnn custom call on the default backend, else 'xla'."""
    text = jax.jit(fn).lower(*args).as_text()
    return "cudnn" if _CUSTOM_CALL.search(text) else "xla"


def default_size() -> str:
    return "full" if jaxdnn.is_available() else "small"


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def run(ops=None, size: str | None = None, repeats: int = 5, calls: int | None = None,
        progress: Callable[[int, int, str], None] | None = None,
        bandwidth_gbs: float | None = None) -> list[dict]:
    """Time every case of `size` (default: 'full' where cuDNN can serve, else 'small') for
    `ops` (default: all), both passes, and return one row per (case, pass) with FIELDS.

    progress(done, total, what) is called before each timing and once at the end. On a
    GPU the memory bandwidth is measured first (unless given) for the HBM floor.
    """
    size = size or default_size()
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; expected at least 1")
    calls = calls or CALLS[size]
    selected = cases(size, ops)
    if bandwidth_gbs is None and on_gpu():
        bandwidth_gbs = measure_bandwidth()
    device = jax.devices()[0].device_kind
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    steps = [(case, pass_) for case in selected for pass_ in PASSES]
    rows = []
    for done, (case, pass_) in enumerate(steps):
        if progress:
            progress(done, len(steps), f"{case.label} {case.dtype} {case.layout} {pass_}")
        jaxdnn_fn, xla_fn, args = build(case, pass_)
        jaxdnn_ms = time_ms(jax.jit(jaxdnn_fn), args, repeats, calls)
        cudnn_ms = None
        if jaxdnn.is_available():
            with jaxdnn.config.override(**{"dnn.enabled": True}):
                cudnn_ms = time_ms(jax.jit(jaxdnn_fn), args, repeats, calls)
        xla_ms = time_ms(jax.jit(xla_fn), args, repeats, calls)
        floor_ms = (_bytes_moved(case, pass_) / (bandwidth_gbs * 1e9) * 1e3
                    if bandwidth_gbs else None)
        rows.append({
            "op": case.op, "case": case.label, "pass": pass_, "dtype": case.dtype,
            "layout": case.layout, "jaxdnn_ms": jaxdnn_ms, "cudnn_ms": cudnn_ms, "xla_ms": xla_ms,
            "ratio": xla_ms / jaxdnn_ms, "path": lowered_path(jaxdnn_fn, args),
            "hbm_floor_ms": floor_ms,
            "hbm_fraction": floor_ms / jaxdnn_ms if floor_ms else None,
            "hbm_gbs": bandwidth_gbs, "device": device, "date": date,
        })
    if progress:
        progress(len(steps), len(steps), "done")
    return rows


# --- presentation ---------------------------------------------------------------------------

def _ms(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The rows as an aligned text table (or a Markdown one). A torch_ms column appears when
    the rows carry one, the HBM columns when the floor was measured."""
    columns = [("case", "case", str), ("pass", "pass", str), ("dtype", "dtype", str),
               ("layout", "layout", str), ("jaxdnn ms", "jaxdnn_ms", _ms),
               ("cuDNN-forced ms", "cudnn_ms", _ms), ("XLA ms", "xla_ms", _ms)]
    if any(row.get("torch_ms") is not None for row in rows):
        columns.append(("torch ms", "torch_ms", _ms))
    columns.append(("speedup", "ratio", lambda r: f"{r:.2f}x"))
    if any(row.get("hbm_floor_ms") is not None for row in rows):
        columns += [("HBM floor ms", "hbm_floor_ms", _ms),
                    ("of HBM", "hbm_fraction", lambda f: "-" if f is None else f"{f:.0%}")]
    columns.append(("path", "path", str))
    header = [title for title, _, _ in columns]
    body = [[fmt(row.get(key)) for _, key, fmt in columns] for row in rows]
    if markdown:
        lines = [header, ["---"] * len(header), *body]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    numeric = {i for i, (_, key, _) in enumerate(columns) if key.endswith(("_ms", "ratio", "fraction"))}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, body)])
