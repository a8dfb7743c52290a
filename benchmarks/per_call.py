"""Host time per call: the smallest benchmark case of each op, one jitted call at a time.

At these sizes the GPU finishes each kernel in a few microseconds, so a steady stream of
jitted single-op calls measures what each call costs on the host: JAX's dispatch, then
the handler's own work (for jaxdnn: borrowing a cuDNN handle, the plan's variant pack).
jaxdnn's cuDNN path (dnn.enabled=True) runs beside XLA's lowering of the same op in one
process; the difference is the handler's overhead over XLA's own call. The RNN rows also
time the cuDNN path with `dnn.rnn.cuda_graph` off ("no graph" column): a lone forward
runs outside XLA's CUDA graphs, where the handler replays cuDNN's per-step kernels as one
graph of its own unless the flag is off (the fwd+bwd program runs inside XLA's graphs).

    python benchmarks/per_call.py [OUT_DIR] [--ops conv pool] [--calls 200]

writes OUT_DIR/per_call.{md,json} and prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jaxdnn  # noqa: E402
from jaxdnn import bench  # noqa: E402


def smallest_case(op: str) -> bench.Case:
    return min(bench.cases("small", [op]),
               key=lambda case: sum(math.prod(shape) for shape, _ in case.inputs))


def measure(op: str, pass_: str, calls: int, repeats: int) -> dict:
    case = smallest_case(op)
    jaxdnn_fn, xla_fn, args = bench.build(case, pass_)
    with jaxdnn.config.override(**{"dnn.enabled": True}):
        cudnn_call = jax.jit(jaxdnn_fn)
        cudnn_us = bench.steady_time_ms(cudnn_call, args, repeats, calls) * 1e3
        path = bench.lowered_path(jaxdnn_fn, args)
    no_graph_us = None
    if op == "rnn":  # a fresh jit: flags are read at trace time
        with jaxdnn.config.override(**{"dnn.enabled": True, "dnn.rnn.cuda_graph": False}):
            no_graph_call = jax.jit(lambda *a: jaxdnn_fn(*a))
            no_graph_us = bench.steady_time_ms(no_graph_call, args, repeats, calls) * 1e3
    xla_us = bench.steady_time_ms(jax.jit(xla_fn), args, repeats, calls) * 1e3
    return {"op": op, "case": case.label, "pass": pass_, "dtype": case.dtype,
            "layout": case.layout, "cudnn_us": cudnn_us, "xla_us": xla_us,
            "overhead_us": cudnn_us - xla_us, "cudnn_no_graph_us": no_graph_us, "path": path}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=os.environ.get("OUT", "bench-logs"))
    parser.add_argument("--ops", nargs="+", choices=bench.OPS, default=list(bench.OPS))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not jaxdnn.is_available():
        print("jaxdnn per_call: cuDNN is not available here; nothing to compare")
        return 0
    rows = [measure(op, pass_, args.calls, args.repeats)
            for op in args.ops for pass_ in bench.PASSES]
    device = jax.devices()[0].device_kind
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [f"Host time per call, {device}, {date} (jax {jax.__version__}, "
             f"cuDNN {jaxdnn.version()}): a steady stream of jitted single-op calls.", "",
             "| op | case | pass | cuDNN path us | XLA us | overhead us | "
             "cuDNN no graph us |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        no_graph = "-" if r["cudnn_no_graph_us"] is None else f"{r['cudnn_no_graph_us']:.1f}"
        lines.append(f"| {r['op']} | {r['case']} {r['dtype']} {r['layout']} | {r['pass']} | "
                     f"{r['cudnn_us']:.1f} | {r['xla_us']:.1f} | {r['overhead_us']:+.1f} | "
                     f"{no_graph} |")
    table = "\n".join(lines)
    print(table)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "per_call.md").write_text(table + "\n")
    (out / "per_call.json").write_text(json.dumps(
        {"device": device, "date": date, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
