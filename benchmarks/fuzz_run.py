"""Differential fuzzing at scale: thousands of random configurations of every op family
in one run, each checked on jaxdnn's path (cuDNN where it can run) against the float64
oracles and, on cuDNN, against jaxdnn's XLA path too.

    python benchmarks/fuzz_run.py OUT_DIR [--configs N] [--seconds S] [--workers W]
                                  [--ops conv pool ...] [--first-seed K] [--seeds 3 17]
                                  [--group G] [--xla-every K] [--path auto|cudnn|xla]

The configurations and their oracles are tests/fuzz_cases.py's (the same generators as
tests/test_fuzz.py); configuration k of the run is op family OPS[k % len(OPS)] with seed
first_seed + k // len(OPS), so any finding reproduces by its op and seed
(`--ops conv --seeds 123`, or JAXDNN_FUZZ_CASES and tests/test_fuzz.py).

What makes it fast where pytest is not (a configuration costs mostly its compilation):
--group configurations (default 8) are one jitted program (all their passes on cuDNN and,
on cuDNN, all of them again on the XLA path, traced under dnn.enabled=False), so one
compilation per group, and where that program fails each configuration of the group runs
alone, so that an error is pinned on its configuration; and W worker processes (default:
the CPU cores less one, at most 12) compile and run groups side by side, sharing the
device (each allocates as it goes: XLA_PYTHON_CLIENT_PREALLOCATE=false). XLA's own
autotuning is off in the workers (--xla_gpu_autotune_level=0; --xla-autotune turns it on):
on a GPU it times candidate kernels for the XLA path's convolutions and matrix products at
every compilation, and the choice changes no result beyond rounding. The run stops
starting configurations at --seconds.

Each worker writes one JSON line per configuration (started, then its result): `ok`,
`mismatch` (a result outside the tolerance: the message names the pass, the result, the
path and the configuration), `error` (a valid configuration raised) or, where a worker
process died, `crash` for the configuration it had started. `invalid` is the family of
invalid calls (tests/fuzz_cases.invalid_calls, about 20 per seed), which must raise
ValueError/TypeError at trace time; it is tallied apart from the valid configurations.

OUT_DIR/fuzz_run.json: environment (versions, device, date), the per-family tallies and
every finding; the process exits 1 when any configuration failed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, "..", "tests")
OPS = ("conv", "pool", "softmax", "batch_norm", "spatial_transformer", "rnn", "invalid")
STATUSES = ("ok", "mismatch", "error", "crash", "timeout")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", default=".")
    p.add_argument("--configs", type=int, default=600,
                   help="configurations in all, spread over the op families (default 600)")
    p.add_argument("--seconds", type=float, default=None,
                   help="start no configuration after this many seconds")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="exactly these seeds of each op family (to reproduce a finding)")
    p.add_argument("--group", type=int, default=8,
                   help="configurations compiled together as one program (default 8)")
    p.add_argument("--xla-every", type=int, default=1,
                   help="on cuDNN, compare with the XLA path too for seeds that are multiples "
                   "of this (default 1: every configuration; the float64 oracle always)")
    p.add_argument("--xla-autotune", action="store_true",
                   help="let XLA time its GPU kernels at each compilation (off by default)")
    p.add_argument("--path", choices=("auto", "cudnn", "xla"), default="auto",
                   help="auto: cuDNN where jaxdnn can run it, else the XLA path")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def schedule(args) -> list[tuple[str, int]]:
    """(op, seed) of every configuration of the run, in order."""
    if args.seeds is not None:
        return [(op, seed) for seed in args.seeds for op in args.ops]
    return [(args.ops[k % len(args.ops)], args.first_seed + k // len(args.ops))
            for k in range(args.configs)]


# ---- a worker: runs configurations i, i + W, i + 2W, ... --------------------------------

def _setup_jax(autotune: bool = True):
    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")  # before jax loads
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not autotune and "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_gpu_autotune_level=0").strip()
    sys.path.insert(0, os.path.abspath(TESTS))
    import jax
    jax.config.update("jax_enable_x64", True)


def run_cases(cases, cudnn: bool, with_xla=None):
    """For each case, the results of its passes on jaxdnn's path and, when `cudnn` (and
    with_xla[i], default all), on the XLA path (float32 matmuls at full precision there;
    None where not run): one jitted program for them all."""
    import jax

    import jaxdnn
    with_xla = [cudnn and (with_xla is None or with_xla[i]) for i in range(len(cases))]

    def passes(case, all_args):
        return [tuple(p.fn(*a)) for p, a in zip(case.passes, all_args)]

    def program(args_per_case):
        outs = [passes(c, a) for c, a in zip(cases, args_per_case)]
        with jaxdnn.config.override(**{"dnn.enabled": False}), \
                jax.default_matmul_precision("highest"):
            xla = [passes(c, a) if x else None
                   for c, a, x in zip(cases, args_per_case, with_xla)]
        return outs, xla

    outs, xla = jax.block_until_ready(
        jax.jit(program)([[p.args for p in c.passes] for c in cases]))
    return list(zip(outs, xla))


def _error(e: Exception) -> tuple[str, str]:
    return "error", f"{type(e).__name__}: {e}"[:2000]


def _compare(case, outs, xla) -> tuple[str, str]:
    import fuzz_cases
    try:
        for p, got in zip(case.passes, outs):
            fuzz_cases.compare(case, p, got)
        for p, got in zip(case.passes, xla or ()):
            fuzz_cases.compare(case, p, got, " (XLA path)")
    except AssertionError as e:
        return "mismatch", str(e)[:2000]
    return "ok", ""


def check_invalid(seed: int) -> tuple[str, str]:
    import fuzz_cases
    rng = fuzz_cases.rng_for("invalid", seed)
    wrong = [f"{name}: {error}" for name, fn, a in fuzz_cases.invalid_calls(rng)
             if (error := fuzz_cases.invalid_call_error(fn, a)) is not None]
    return ("mismatch", "; ".join(wrong)) if wrong else ("ok", "")


def check_group(configs: list[tuple[str, int]], cudnn: bool,
                xla_every: int = 1) -> list[tuple[str, str]]:
    """(status, detail) of each configuration (op, seed) of a group, run as one program;
    where that program fails, each configuration runs alone, so the error is its own. On
    cuDNN the XLA path runs too for the seeds that are multiples of `xla_every`."""
    import fuzz_cases
    results: dict[int, tuple[str, str]] = {}
    cases = {}
    for i, (op, seed) in enumerate(configs):
        if op == "invalid":
            results[i] = check_invalid(seed)
            continue
        try:
            cases[i] = fuzz_cases.make_case(op, seed)
        except Exception as e:  # noqa: BLE001 - a generator or oracle failure: report it
            results[i] = _error(e)
    try:
        with_xla = [c.seed % xla_every == 0 for c in cases.values()]
        ran = (dict(zip(cases, run_cases(list(cases.values()), cudnn, with_xla)))
               if cases else {})
    except Exception:  # noqa: BLE001 - find which configuration fails
        ran = {}
        for i, case in cases.items():
            try:
                ran[i] = run_cases([case], cudnn, [case.seed % xla_every == 0])[0]
            except Exception as e:  # noqa: BLE001 - a valid configuration raised
                results[i] = _error(e)
    for i, (outs, xla) in ran.items():
        results[i] = _compare(cases[i], outs, xla)
    return [results[i] for i in range(len(configs))]


def worker(args) -> int:
    _setup_jax(autotune=args.xla_autotune)
    import jaxdnn
    cudnn = args.path == "cudnn" or (args.path == "auto" and jaxdnn.is_available())
    jaxdnn.config.update("dnn.enabled", True if cudnn else False)
    plan = schedule(args)[args.worker::args.workers]
    with open(args.log, "a") as log:
        for first in range(0, len(plan), args.group):
            if args.deadline is not None and time.time() > args.deadline:
                break
            group = plan[first:first + args.group]
            for op, seed in group:
                print(json.dumps({"op": op, "seed": seed, "status": "started"}), file=log)
            log.flush()
            start = time.perf_counter()
            results = check_group(group, cudnn, args.xla_every)
            seconds = (time.perf_counter() - start) / len(group)
            for (op, seed), (status, detail) in zip(group, results):
                xla = cudnn and op != "invalid" and seed % args.xla_every == 0
                print(json.dumps({"op": op, "seed": seed, "status": status, "detail": detail,
                                  "xla_compared": xla, "seconds": round(seconds, 4)}), file=log)
            log.flush()
    return 0


# ---- the parent: starts the workers, collects their lines -------------------------------

def environment(path: str) -> dict:
    _setup_jax()
    import jax

    from jaxdnn.cli import collect_info
    info = collect_info()
    info.pop("flags", None)
    device = jax.devices()[0]
    cudnn = path == "cudnn" or (path == "auto" and info["extension"]["available"])
    return {**info, "card": device.device_kind, "platform": device.platform,
            "cpu_count": os.cpu_count(),
            "path": "cudnn" if cudnn else "xla",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def tally(records: list[dict], ops) -> dict:
    per_op = {op: {s: 0 for s in STATUSES} for op in ops}
    seconds = {op: 0.0 for op in ops}
    for op in ops:
        per_op[op]["xla_compared"] = 0
    for r in records:
        per_op[r["op"]][r["status"]] += 1
        per_op[r["op"]]["xla_compared"] += bool(r.get("xla_compared"))
        seconds[r["op"]] += r.get("seconds", 0.0)
    for op in ops:
        # configurations checked to the end: a timeout (stopped at the limit) is not one
        done = sum(per_op[op][s] for s in STATUSES if s != "timeout")
        per_op[op]["configurations"] = done
        # a group's time is shared out evenly among its configurations
        per_op[op]["mean_seconds"] = round(seconds[op] / done, 4) if done else None
    return per_op


def read_log(path: str, died: bool) -> list[dict]:
    """Finished configurations of one worker's log; a configuration started and never
    finished is a crash when the worker died, else a timeout (stopped at the deadline)."""
    records, pending = [], {}
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            key = (r["op"], r["seed"])
            if r["status"] == "started":
                pending[key] = r
            else:
                records.append(r)
                pending.pop(key, None)
    for r in pending.values():
        records.append({**r, "status": "crash" if died else "timeout",
                        "detail": "the worker process died in this configuration's group"
                        if died else "stopped at the time limit"})
    return records


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker is not None:
        return worker(args)
    os.makedirs(args.out_dir, exist_ok=True)
    env = environment(args.path)
    workers = args.workers or max(1, min(12, (os.cpu_count() or 2) - 1))
    plan = schedule(args)
    workers = min(workers, max(1, len(plan)))
    start = time.time()
    deadline = start + args.seconds if args.seconds else None
    logs = [os.path.join(args.out_dir, f"fuzz_run.worker{i}.jsonl") for i in range(workers)]
    for log in logs:
        if os.path.exists(log):
            os.remove(log)
    common = [sys.executable, os.path.abspath(__file__), args.out_dir, "--configs",
              str(args.configs), "--workers", str(workers), "--ops", *args.ops,
              "--first-seed", str(args.first_seed), "--path", args.path,
              "--group", str(args.group), "--xla-every", str(args.xla_every)]
    if args.xla_autotune:
        common.append("--xla-autotune")
    if args.seeds is not None:
        common += ["--seeds", *map(str, args.seeds)]
    if deadline is not None:
        common += ["--deadline", str(deadline)]
    procs = [subprocess.Popen(common + ["--worker", str(i), "--log", log])
             for i, log in enumerate(logs)]
    # A configuration in flight at the deadline may finish; one stuck a minute past it is
    # stopped (and counted as a timeout).
    returncodes = []
    for proc in procs:
        try:
            proc.wait(timeout=None if deadline is None else max(1.0, deadline + 60 - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        returncodes.append(proc.returncode)
    records = []
    for log, code in zip(logs, returncodes):
        # killed by us at the deadline (SIGKILL): a timeout; any other death: a crash
        records += read_log(log, died=code not in (0, -9))
    seconds = time.time() - start
    per_op = tally(records, args.ops)
    valid = [op for op in args.ops if op != "invalid"]
    totals = {s: sum(per_op[op][s] for op in valid) for s in STATUSES}
    totals["configurations"] = sum(per_op[op]["configurations"] for op in valid)
    totals["xla_compared"] = sum(per_op[op]["xla_compared"] for op in valid)
    findings = [r for r in records if r["status"] not in ("ok", "timeout")]
    result = {"environment": env, "requested": len(plan), "workers": workers,
              "group": args.group, "xla_every": args.xla_every,
              "seconds": round(seconds, 1), "configs_per_second":
              round(totals["configurations"] / seconds, 2) if seconds else None,
              "worker_exit_codes": returncodes, "per_op": per_op, "totals": totals,
              "findings": findings}
    with open(os.path.join(args.out_dir, "fuzz_run.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"fuzz_run: {totals['configurations']} valid configurations on the "
          f"{env['path']} path ({env['card']}) in {seconds:.0f} s with {workers} workers: "
          f"{totals['mismatch']} mismatches, {totals['error']} errors, {totals['crash']} crashes")
    for op in args.ops:
        t = per_op[op]
        print(f"  {op:20s} {t['configurations']:6d} configurations  ok {t['ok']}  mismatch "
              f"{t['mismatch']}  error {t['error']}  crash {t['crash']}  "
              f"mean {t['mean_seconds']} s")
    for r in findings[:20]:
        print(f"  FINDING {r['op']} seed {r['seed']}: {r['status']}: {r['detail'][:300]}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
