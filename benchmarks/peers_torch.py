"""PyTorch peer timings for the cases of `jaxdnn.bench`: torch.softmax and
torch.nn.functional max/avg pooling on the same shapes, dtypes and layouts, forward and
forward+backward (autograd.grad of the output with a fixed random cotangent), with
torch.backends.cudnn.benchmark on, timed with CUDA events (median of repeats).

    python benchmarks/peers_torch.py [--size full|small] [--repeats N]

Prints one JSON row per (case, pass) with a torch_ms field. Without PyTorch or CUDA it
says so and exits with status 0. benchmarks/run.py imports it to put PyTorch beside
jaxdnn and XLA in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

# JAX (imported for the case list) must not grab most of the GPU memory before PyTorch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from jaxdnn import bench  # noqa: E402


def unavailable_reason() -> str | None:
    """Why PyTorch cannot be timed here, or None."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} sees no CUDA device"
    return None


def torch_versions() -> dict:
    import torch
    return {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
            "device": torch.cuda.get_device_name()}


def time_torch_ms(fn, repeats: int, calls: int) -> float:
    """Milliseconds per call: 4 warm-up calls, then the median over `repeats` of `calls`
    back-to-back calls between two CUDA events."""
    import torch
    for _ in range(4):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


def _input(case: bench.Case):
    """The case's input as PyTorch sees it: always logically channels-first; a
    channels-last layout becomes PyTorch's channels_last memory format."""
    import torch
    dtype = getattr(torch, case.dtype)
    if case.layout in ("NC", "NCHW", "NCDHW"):
        return torch.randn(case.shape, device="cuda", dtype=dtype)
    n, *spatial, c = case.shape
    x = torch.randn((n, c, *spatial), device="cuda", dtype=dtype)
    fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
    return x.to(memory_format=fmt)


def _forward(case: bench.Case):
    import torch
    import torch.nn.functional as F
    if case.op == "softmax":
        return lambda x: torch.softmax(x, dim=1)
    p = case.params
    nd = len(p["ws"])
    args = (p["ws"], p["stride"], p["pad"])
    if p["mode"] == "max":
        pool = F.max_pool2d if nd == 2 else F.max_pool3d
        return lambda x: pool(x, *args)
    if p["mode"] == "average_inc_pad":
        pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
        return lambda x: pool(x, *args, count_include_pad=True)
    raise ValueError(f"no PyTorch peer for pooling mode {p['mode']!r}")


def time_case(case: bench.Case, pass_: str, repeats: int, calls: int) -> float:
    import torch
    forward = _forward(case)
    x = _input(case)
    if pass_ == "fwd":  # x needs no gradient, so autograd records nothing
        def step():
            return forward(x)
    else:
        x.requires_grad_(True)
        with torch.no_grad():
            cotangent = torch.randn_like(forward(x))  # keeps the output's memory format

        def step():
            y = forward(x)
            return y, torch.autograd.grad(y, x, cotangent)[0]
    return time_torch_ms(step, repeats, calls)


def run(cases, repeats: int = 5, calls: int = bench.CALLS["full"], progress=None) -> list[dict]:
    """One row per (case, pass): the case's identifying fields and torch_ms."""
    import torch
    torch.backends.cudnn.benchmark = True
    steps = [(case, pass_) for case in cases for pass_ in bench.PASSES]
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
