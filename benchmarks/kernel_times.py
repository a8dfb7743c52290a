"""Where the GPU time of one op goes: every kernel each side launches, per application.

benchmarks/in_program.py gives one number per side; when jaxdnn and a peer differ by a
few microseconds, this says which kernels (cuDNN's, the transposes around them, memsets)
and which idle gaps make the difference. It runs each side as in_program.py does (K
copies in one jitted program; PyTorch K back-to-back calls) under PyTorch's profiler,
whose CUPTI activity trace records the kernels of every library in the process, JAX's
included, and reports per application:

- each kernel's name (shortened), launches and mean microseconds;
- "busy": the sum of kernel times, and "span": first kernel start to last kernel end over
  the applications (span - busy is the GPU's idle time between kernels).

    python benchmarks/kernel_times.py [OUT_DIR] [--match tconv2d] [--dtype float32]
                                      [--layout NCHW] [--pass fwd] [--copies 8] [--calls 5]

Needs PyTorch and a CUDA GPU; writes OUT_DIR/kernel_times.md. Timings under a profiler
run slightly slower than without; compare sides within one run, not with other tables.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import sys
import tempfile

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jaxdnn  # noqa: E402
from jaxdnn import bench  # noqa: E402
from in_program import (add_case_filters, copies_of, has_other_route, other_route,  # noqa: E402
                        replicate, selected)  # noqa: E402

GPU_CATEGORIES = ("kernel", "gpu_memset", "gpu_memcpy")


def _short(name: str, width: int = 90) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def profile(run, applications: int) -> dict:
    """Run `run()` under PyTorch's profiler; the GPU activity per application."""
    import torch
    from torch.profiler import ProfilerActivity
    torch.cuda.synchronize()
    # CUDA activity only: recording PyTorch's CPU-side ops would slow its launches alone.
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(pathlib.Path(path).read_text())["traceEvents"]
    return summarize(events, applications)


def summarize(events, applications: int) -> dict:
    """The GPU activity of a Chrome trace's events, per application: each kernel's name,
    launches and microseconds (longest first), their sum ("busy") and the span from the
    first start to the last end."""
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e]
    if not gpu:
        return {"kernels": [], "busy_us": None, "span_us": None}
    per_name = collections.defaultdict(lambda: [0, 0.0])
    for e in gpu:
        entry = per_name[e["name"]]
        entry[0] += 1
        entry[1] += float(e["dur"])
    start = min(float(e["ts"]) for e in gpu)
    end = max(float(e["ts"]) + float(e["dur"]) for e in gpu)
    kernels = sorted(({"name": name, "launches": count / applications,
                       "us": total / applications} for name, (count, total) in per_name.items()),
                     key=lambda k: -k["us"])
    return {"kernels": kernels, "busy_us": sum(k["us"] for k in kernels),
            "span_us": (end - start) / applications}


def _jax_side(fn, fn_args, copies: int, calls: int):
    program = jax.jit(replicate(fn, copies))
    groups = copies_of(fn_args, copies)
    jax.block_until_ready(program(*groups))  # compile, and time_once's search, out of view
    jax.block_until_ready(program(*groups))

    def run():
        out = None
        for _ in range(calls):
            out = program(*groups)
        jax.block_until_ready(out)
    return profile(run, copies * calls)


def _torch_side(case, pass_: str, copies: int, calls: int):
    import peers_torch
    step = peers_torch.step_for(case, pass_)
    for _ in range(3):
        step()

    def run():
        for _ in range(copies * calls):
            step()
    return profile(run, copies * calls)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=os.environ.get("OUT", "bench-logs"))
    add_case_filters(parser)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args(argv)
    import torch
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{jax.devices()[0].device_kind}, {datetime.date.today().isoformat()}, jax "
             f"{jax.__version__}, torch {torch.__version__}, jaxdnn {jaxdnn.__version__}; "
             f"{args.copies} copies x {args.calls} programs; microseconds per application"]
    for case, pass_ in selected(bench.cases("full", ["conv", "pool"]), args):
        jaxdnn_fn, xla_fn, fn_args = bench.build(case, pass_)
        sides = {"jaxdnn": lambda: _jax_side(jaxdnn_fn, fn_args, args.copies, args.calls),
                 "xla": lambda: _jax_side(xla_fn, fn_args, args.copies, args.calls),
                 "torch": lambda: _torch_side(case, pass_, args.copies, args.calls)}
        if has_other_route(case):
            def other(case=case, fn=jaxdnn_fn, fn_args=fn_args):
                with other_route(case):
                    return _jax_side(fn, fn_args, args.copies, args.calls)
            sides["jaxdnn other route"] = other
        lines.append(f"\n### {case.label} {case.dtype} {case.layout} {pass_}\n")
        lines.append("| side | busy us | span us | kernel | launches | us |")
        lines.append("|---|---|---|---|---|---|")
        for side, measure in sides.items():
            result = measure()
            busy, span = result["busy_us"], result["span_us"]
            lines.append(f"| **{side}** | {bench.format_ms(busy)} | {bench.format_ms(span)} | | | |")
            for k in result["kernels"]:
                lines.append(f"| | | | `{_short(k['name'])}` | {k['launches']:.2f} | "
                             f"{k['us']:.2f} |")
        print("\n".join(lines[-40:]), flush=True)
    text = "\n".join(lines)
    (out_dir / "kernel_times.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
