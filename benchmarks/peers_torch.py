"""PyTorch peer timings for the cases of `jaxdnn.bench`: torch.softmax, F.max/avg pooling,
F.conv{1,2,3}d and F.conv_transpose{1,2,3}d, F.batch_norm (training) and F.affine_grid +
F.grid_sample, on the same inputs (`bench.inputs`), shapes, dtypes and layouts, forward and
forward+backward (autograd.grad of the output with respect to every input, for a fixed
random cotangent), with torch.backends.cudnn.benchmark on, timed with CUDA events (median
of repeats). The forwards, inputs and settings are `jaxdnn.torch_peer`'s (`jaxdnn bench
--peers` runs the same ones).

    python benchmarks/peers_torch.py [ops...] [--size full|small] [--repeats N]

Prints one JSON row per (case, pass) with a torch_ms field. Without PyTorch or CUDA it
says so and exits with status 0. benchmarks/run.py imports it to put PyTorch beside
jaxdnn and XLA in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


# JAX (imported for the case list) must not grab most of the GPU memory before PyTorch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from jaxdnn import bench, torch_peer  # noqa: E402


def unavailable_reason() -> str | None:
    """Why PyTorch cannot be timed on CUDA here, or None."""
    reason = torch_peer.unavailable_reason()
    if reason:
        return reason
    import torch
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} sees no CUDA device"
    return None


def torch_versions() -> dict:
    return torch_peer.versions("cuda")


def time_torch_ms(fn, repeats: int, calls: int) -> float:
    """Milliseconds per call: 4 warm-up calls, then the median over `repeats` of `calls`
    back-to-back calls between two CUDA events."""
    return torch_peer.time_ms(fn, repeats, calls, "cuda")


def step_for(case: bench.Case, pass_: str):
    """One application of the case's pass on CUDA, a function of nothing (the forwards and
    inputs are `jaxdnn.torch_peer`'s, which `jaxdnn bench --peers` runs too)."""
    return torch_peer.step_for(case, pass_, "cuda")


def time_case(case: bench.Case, pass_: str, repeats: int, calls: int) -> float:
    return time_torch_ms(step_for(case, pass_), repeats, calls)


def run(cases, repeats: int = 5, calls: int = bench.CALLS["full"], progress=None) -> list[dict]:
    """One row per (case, pass): the case's identifying fields and torch_ms."""
    torch_peer.configure("cuda")
    # The recurrent networks' PyTorch peers (nn.LSTM/nn.GRU, own weights) are timed by
    # benchmarks/rnn_peers.py beside jax.experimental.rnn and Flax.
    steps = [(case, pass_) for case in cases if torch_peer.supports(case)
             for pass_ in bench.PASSES]
    rows = []
    for done, (case, pass_) in enumerate(steps):
        if progress:
            progress(done, len(steps), f"torch {case.label} {case.dtype} {case.layout} {pass_}")
        rows.append({"op": case.op, "case": case.label, "pass": pass_, "dtype": case.dtype,
                     "layout": case.layout,
                     "torch_ms": time_case(case, pass_, repeats, calls)})
    if progress:
        progress(len(steps), len(steps), "done")
    return rows


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("op", "case", "pass", "dtype", "layout"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ops", nargs="*", help=f"among {', '.join(bench.OPS)} (default: all)")
    parser.add_argument("--size", choices=bench.SIZES, default="full")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"peers_torch: {reason}; no PyTorch timings.", file=sys.stderr)
        return 0
    rows = run(bench.cases(args.size, args.ops or None), args.repeats, bench.CALLS[args.size])
    print(json.dumps({"versions": torch_versions(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
