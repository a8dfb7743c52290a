"""The full benchmark for the GPU script: jaxdnn, XLA and (where it runs) PyTorch side by
side, in one process on one card.

    python benchmarks/run.py [OUT_DIR] [--size full|small] [--repeats N] [--ops OP ...]

Writes OUT_DIR/bench.json (environment + rows) and OUT_DIR/bench.md (a Markdown table);
OUT_DIR defaults to bench-logs. Rows are those of `jaxdnn bench` plus torch_ms (None
without PyTorch and CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# Leave GPU memory to PyTorch, which runs in this process after JAX.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

import peers_torch  # noqa: E402  (beside this file)
from jaxdnn import bench  # noqa: E402
from jaxdnn.cli import ProgressBar, collect_info  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="bench-logs")
    parser.add_argument("--size", choices=bench.SIZES, default="full")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ops", nargs="+", choices=bench.OPS, default=None,
                        help="the ops to time (default: all)")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    progress = ProgressBar(sys.stderr)

    info = collect_info()
    bandwidth = bench.measure_bandwidth() if bench.on_gpu() else None
    rows = bench.run(ops=args.ops, size=args.size, repeats=args.repeats, progress=progress,
                     bandwidth_gbs=bandwidth)

    torch_reason = peers_torch.unavailable_reason()
    torch_ms = {}
    if torch_reason is None:
        info["torch"] = peers_torch.torch_versions()
        torch_rows = peers_torch.run(bench.cases(args.size, args.ops), args.repeats,
                                     bench.CALLS[args.size], progress)
        torch_ms = {peers_torch.row_key(r): r["torch_ms"] for r in torch_rows}
    else:
        info["torch"] = {"unavailable": torch_reason}
    for row in rows:
        row["torch_ms"] = torch_ms.get(peers_torch.row_key(row))

    with open(os.path.join(args.out_dir, "bench.json"), "w") as f:
        json.dump({"info": info, "hbm_gbs": bandwidth, "rows": rows}, f, indent=1)
    header = [f"# jaxdnn bench, {rows[0]['date']}",
              "",
              f"Device: {rows[0]['device']} ({jax.default_backend()}); size {args.size}, "
              f"median of {args.repeats} repeats of {bench.CALLS[args.size]} calls.",
              "jaxdnn's cuDNN path: " + (f"unavailable ({info['extension']['reason']}); "
                                         "jaxdnn times its XLA reference path."
                                         if info["extension"]["reason"] else "available."),
              "PyTorch: " + (f"not timed ({torch_reason})." if torch_reason else
                             f"{info['torch']['torch']}, cuDNN {info['torch']['cudnn']}.")]
    if bandwidth:
        header.append(f"Memory bandwidth (1 GiB x+1): {bandwidth:.0f} GB/s.")
    header.append("speedup = XLA ms / jaxdnn ms; above 1 jaxdnn is faster.")
    markdown = "\n".join(header) + "\n\n" + bench.format_table(rows, markdown=True) + "\n"
    with open(os.path.join(args.out_dir, "bench.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
