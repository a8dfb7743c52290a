"""Device-bound timings: each op timed as it runs inside a larger jitted program.

`jaxdnn bench` and benchmarks/run.py time one jitted call at a time, so every JAX number
they report carries JAX's per-call dispatch (the Python call, argument checks, the
executable's launch). For an op that runs for tens of microseconds that cost is most of
the time, and it is the same for jaxdnn and for XLA's own lowering; PyTorch's eager
dispatch is cheaper, and its CUDA-event timing hides it whenever the GPU is the slower
side. In a training step the op is one of many inside one executable and pays none of it.

This script times the op the way a training step runs it: one jitted program applies
the op to K independent inputs (distinct buffers, so XLA can neither merge nor skip any
of them) and the time per op is the program's time divided by K. PyTorch runs the same
K back-to-back calls between CUDA events. All peers run in one process on one card.

A program's time is taken in a steady stream of programs (`bench.steady_time_ms`: the
difference between runs of 2n and n programs), so that what a run pays once, the first
dispatch before the GPU starts and the wait for the last result, drops out of the JAX
sides as CUDA events leave it out of PyTorch's. The "run" columns keep the simpler
timing (n programs from the first dispatch to the last result, divided by n), which
charges that once-per-run cost to the JAX sides alone: 4-35 us per op on an H200
(BENCHMARKS.md, the steady-stream run).

    python benchmarks/in_program.py [OUT_DIR] [--ops conv pool] [--copies 8]
                                    [--match tconv] [--dtype float32] [--pass fwd]

writes OUT_DIR/in_program.{md,json} and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jaxdnn  # noqa: E402
from jaxdnn import bench  # noqa: E402
from jaxdnn.layout import is_channels_last  # noqa: E402


def replicate(fn, copies: int):
    """A function of `copies` argument tuples that applies `fn` to each and returns every
    result, so the program runs `fn` `copies` times on distinct buffers."""
    def many(*groups):
        return tuple(fn(*args) for args in groups)
    return many


def copies_of(args: tuple, copies: int) -> tuple:
    """`copies` distinct device copies of `args` (a different buffer each time, so no two
    applications of the op read the same memory from cache or are merged by XLA)."""
    return tuple(tuple(jnp.array(a, copy=True) for a in args)
                 for _ in range(copies))


def time_in_program_ms(fn, args: tuple, copies: int, repeats: int, calls: int,
                       timers=(bench.steady_time_ms,)) -> list[float]:
    """Milliseconds per application of `fn` inside one program of `copies` applications,
    by each of `timers` (one program and one set of copies serve them all)."""
    program, groups = jax.jit(replicate(fn, copies)), copies_of(args, copies)
    return [timer(program, groups, repeats, calls) / copies for timer in timers]


def add_case_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--match", default="", help="a substring of the case labels")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--layout", default=None)
    parser.add_argument("--pass", dest="pass_", choices=bench.PASSES, default=None)


def selected(cases, args):
    """(case, pass) pairs that the filters of add_case_filters let through."""
    return [(case, pass_) for case in cases for pass_ in bench.PASSES
            if args.match in case.label and args.dtype in (None, case.dtype)
            and args.layout in (None, case.layout) and args.pass_ in (None, pass_)]


def has_other_route(case) -> bool:
    """Whether jaxdnn.conv's route policy decides this case: a channels-first convolution
    with kernels larger than 1x1 (pointwise kernels keep their layout whatever the
    policy)."""
    return (case.op == "conv" and not is_channels_last(case.layout)
            and not all(k == 1 for k in case.operands[0][0][2:]))


@contextlib.contextmanager
def other_route(case):
    """Within: jaxdnn takes the route its policy does not take for the case's dtype
    (channels-last through transposes, or the image's own layout), for functions traced
    there. How that policy was chosen."""
    policy = case.dtype in jaxdnn.conv.CHANNELS_LAST_DTYPES
    with jaxdnn.config.override(**{"dnn.conv.layout_route": "own" if policy else "channels_last"}):
        yield


def _other_route_ms(case, fn, fn_args, args) -> float | None:
    """The in-program time of jaxdnn on the other route, None where there is none."""
    if not has_other_route(case):
        return None
    with other_route(case):
        return time_in_program_ms(fn, fn_args, args.copies, args.repeats, args.calls)[0]


def _conv_flags() -> str:
    """The flags that choose what a case runs: the algorithms, the layout route, the path."""
    return ", ".join(f"{k}={v}" for k, v in jaxdnn.config.values().items()
                     if k.startswith("dnn.conv.algo")
                     or k in ("dnn.conv.layout_route", "dnn.enabled"))


def _geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=os.environ.get("OUT", "bench-logs"))
    parser.add_argument("--ops", nargs="+", choices=bench.OPS, default=["conv", "pool"])
    parser.add_argument("--size", choices=bench.SIZES, default=None)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5)
    add_case_filters(parser)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--per-call", action="store_true",
                        help="also time one jitted call at a time, as jaxdnn bench does")
    args = parser.parse_args(argv)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = args.size or bench.default_size()
    torch_peer = None
    if not args.no_torch and bench.on_gpu():
        try:
            import peers_torch as torch_peer  # noqa: F401
            import torch
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        except ImportError:
            torch_peer = None
    rows = []
    chosen_cases = selected(bench.cases(size, args.ops), args)
    for number, (case, pass_) in enumerate(chosen_cases):
        jaxdnn_fn, xla_fn, fn_args = bench.build(case, pass_)
        row = {"case": case.label, "pass": pass_, "dtype": case.dtype, "layout": case.layout,
               "path": bench.lowered_path(jaxdnn_fn, fn_args)}
        for name, fn in (("jaxdnn", jaxdnn_fn), ("xla", xla_fn)):
            row[f"{name}_call_ms"] = (bench.time_ms(jax.jit(fn), fn_args, args.repeats,
                                                    args.calls * args.copies)
                                      if args.per_call else None)
            row[f"{name}_ms"], row[f"{name}_run_ms"] = time_in_program_ms(
                fn, fn_args, args.copies, args.repeats, args.calls,
                timers=(bench.steady_time_ms, bench.time_ms))
        row["other_route_ms"] = _other_route_ms(case, jaxdnn_fn, fn_args, args)
        row["torch_ms"] = None
        if torch_peer is not None:
            try:
                row["torch_ms"] = torch_peer.time_case(case, pass_, args.repeats,
                                                       args.calls * args.copies)
            except (KeyError, NotImplementedError):
                pass
        peers = [v for v in (row["xla_ms"], row["torch_ms"]) if v]
        row["vs_xla"] = row["xla_ms"] / row["jaxdnn_ms"]
        row["vs_best"] = min(peers) / row["jaxdnn_ms"]
        rows.append(row)
        print(f"[{number + 1}/{len(chosen_cases)}] {case.label} {case.dtype} {case.layout} "
              f"{pass_}: " + ", ".join(f"{key} {bench.format_ms(value)}" for key, value in row.items()
                                       if key.endswith("_ms")), flush=True)
    device = jax.devices()[0].device_kind
    date = datetime.date.today().isoformat()
    header = ("| case | pass | dtype | layout | jaxdnn ms | XLA ms | PyTorch ms | vs XLA | "
              "vs faster peer | jaxdnn run ms | XLA run ms | jaxdnn per-call ms | "
              "XLA per-call ms | jaxdnn other route ms |")
    lines = [f"{device}, {date}, jax {jax.__version__}, jaxdnn {jaxdnn.__version__}, "
             f"{args.copies} copies per program, flags {_conv_flags()}", "",
             header, "|" + "---|" * 14]
    fmt = bench.format_ms
    for r in rows:
        lines.append(f"| {r['case']} | {r['pass']} | {r['dtype']} | {r['layout']} | "
                     f"{fmt(r['jaxdnn_ms'])} | {fmt(r['xla_ms'])} | {fmt(r['torch_ms'])} | "
                     f"{r['vs_xla']:.2f}x | {r['vs_best']:.2f}x | {fmt(r['jaxdnn_run_ms'])} | "
                     f"{fmt(r['xla_run_ms'])} | {fmt(r['jaxdnn_call_ms'])} | "
                     f"{fmt(r['xla_call_ms'])} | {fmt(r['other_route_ms'])} |")
    for pass_ in (*bench.PASSES, None):
        chosen = [r for r in rows if pass_ in (None, r["pass"])]
        lines.append(f"\ngeomean {pass_ or 'all'}: vs XLA "
                     f"{_geomean([r['vs_xla'] for r in chosen]):.3f}x, vs faster peer "
                     f"{_geomean([r['vs_best'] for r in chosen]):.3f}x")
    text = "\n".join(lines)
    print(text)
    (out_dir / "in_program.md").write_text(text + "\n")
    (out_dir / "in_program.json").write_text(json.dumps(
        {"device": device, "date": date, "copies": args.copies, "rows": rows}, indent=1,
        default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
