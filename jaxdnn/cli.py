"""The `jaxdnn` command (also `python -m jaxdnn`).

    jaxdnn info [--json]          versions, cuDNN, devices, extension status, flags
    jaxdnn bench [ops...]         jaxdnn beside XLA (see jaxdnn.bench)
    jaxdnn bench --peers [ops...] also PyTorch where installed, per call and in one program
    jaxdnn --version
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import json
import os
import platform
import signal
import sys
from typing import Callable, Iterator, Sequence, TextIO

import jax
import jaxlib
import numpy as np

import jaxdnn
from jaxdnn import _extension, bench, config

__all__ = ["main"]


def _cudnn_version_text(number: int | None) -> str:
    if number is None or number < 0:
        return "none"
    # cuDNN 9 numbers its versions MAJOR*10000 + MINOR*100 + PATCH.
    return f"{number // 10000}.{number % 10000 // 100}.{number % 100} ({number})"


def collect_info() -> dict:
    """Everything `jaxdnn info` reports, as plain data."""
    try:
        loaded = jaxdnn.version(raises=False)
        mismatch = None
    except RuntimeError as e:  # the compiled and loaded majors differ
        loaded, mismatch = None, str(e)
    docs = config.describe()
    return {
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": jaxlib.__version__, "numpy": np.__version__,
                     "jaxdnn": jaxdnn.__version__},
        "cudnn": {"compiled": _extension.compiled_version(), "loaded": loaded,
                  "library": _extension.cudnn_library_path(), "error": mismatch},
        "devices": [{"id": d.id, "platform": d.platform, "kind": d.device_kind}
                    for d in jax.devices()],
        "extension": {"available": jaxdnn.is_available(),
                      "reason": jaxdnn.unavailable_reason(), **_extension.extension_source()},
        "flags": {name: {"value": config.read(name), "doc": docs.get(name, "")}
                  for name in config.flags()},
        "JAXDNN_FLAGS": os.environ.get("JAXDNN_FLAGS", ""),
    }


def _print_info(info: dict, out: TextIO) -> None:
    versions = info["versions"]
    print("versions:  " + ", ".join(f"{k} {v}" for k, v in versions.items()), file=out)
    cudnn = info["cudnn"]
    print(f"cuDNN:     compiled {_cudnn_version_text(cudnn['compiled'])}, "
          f"loaded {_cudnn_version_text(cudnn['loaded'])}", file=out)
    print(f"           library {cudnn['library'] or 'not loaded'}", file=out)
    if cudnn["error"]:
        print(f"           error: {cudnn['error']}", file=out)
    devices = ", ".join(f"{d['platform']}:{d['id']} ({d['kind']})" for d in info["devices"])
    print(f"devices:   {devices}", file=out)
    ext = info["extension"]
    if ext["path"] is None:
        print("extension: none loaded", file=out)
    else:
        where = f"plugin {ext['plugin']}" if ext["plugin"] else "built into jaxdnn"
        print(f"extension: {where}, {ext['path']}", file=out)
    jax_major = ext["jax_cuda_major"]
    print(f"           jax's CUDA plugin: {f'CUDA {jax_major}' if jax_major else 'none'}",
          file=out)
    for why in ext["skipped"]:
        print(f"           not loaded: {why}", file=out)
    status = "yes" if ext["available"] else f"no: {ext['reason']}"
    print(f"cuDNN path available: {status}", file=out)
    print(f"flags (JAXDNN_FLAGS={info['JAXDNN_FLAGS']!r}):", file=out)
    width = max(len(name) for name in info["flags"])
    for name, flag in info["flags"].items():
        print(f"  {name:<{width}} = {flag['value']!r}", file=out)
        print(f"  {'':<{width}}   {flag['doc']}", file=out)


class ProgressBar:
    """A one-line text progress bar on a terminal; one line per step elsewhere (logs)."""

    def __init__(self, stream: TextIO, width: int = 24):
        self.stream, self.width = stream, width
        self.redraw = stream.isatty()

    def __call__(self, done: int, total: int, what: str) -> None:
        filled = self.width * done // max(total, 1)
        bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {what}"
        if self.redraw:
            end = "\n" if done == total else ""
            self.stream.write(f"\r\033[K{bar}{end}")
        else:
            self.stream.write(bar + "\n")
        self.stream.flush()


# The exit status of a bench that was interrupted (as a shell reports SIGINT).
INTERRUPTED = 130


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (what `timeout` and job schedulers send) raises KeyboardInterrupt while
    timing, as Ctrl-C does, so that the rows timed so far are still printed."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _time_rows(timing: Callable[[Callable[[dict], None]], list[dict]],
               human: TextIO) -> tuple[list[dict], bool]:
    """(rows, interrupted): `timing(on_row)`'s rows, or after Ctrl-C or SIGTERM the rows it
    had timed by then."""
    timed: list[dict] = []
    with _terminate_as_interrupt():
        try:
            return timing(timed.append), False
        except KeyboardInterrupt:
            pass
    sys.stderr.write("\n")  # past the progress bar's line
    print(f"interrupted; rows timed before it: {len(timed)}", file=human)
    return timed, True


def _bench_header(size: str, repeats: int, bandwidth_gbs: float | None,
                  ratio: str = "speedup = XLA ms / jaxdnn ms (above 1: jaxdnn is faster)") -> str:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [f"jaxdnn {jaxdnn.__version__} bench on {jax.devices()[0].device_kind} "
             f"({jax.default_backend()}), {now}; size {size}, median of {repeats} repeats"]
    reason = jaxdnn.unavailable_reason()
    if reason:
        lines.append(f"cuDNN path unavailable: {reason}.")
        lines.append("jaxdnn runs its XLA reference path here, so both columns time XLA.")
    elif config.read("dnn.enabled") is False:
        lines.append("dnn.enabled=False: jaxdnn takes its XLA reference path.")
    if bandwidth_gbs:
        lines.append(f"memory bandwidth (1 GiB x+1): {bandwidth_gbs:.0f} GB/s")
    lines.append(ratio)
    return "\n".join(lines)


def rows_to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else list(bench.FIELDS))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _bench(args: argparse.Namespace) -> int:
    if args.peers:
        # PyTorch, where it runs beside JAX on the GPU, needs memory JAX would otherwise
        # take when its backend starts (75% of the card): set before anything starts it.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    ops = args.ops or list(bench.OPS)
    unknown = [op for op in ops if op not in bench.OPS]
    if unknown:  # checked here: argparse's `choices` rejects an empty nargs='*' list
        args.bench_parser.error(f"unknown op {', '.join(map(repr, unknown))} "
                                f"(choose from {', '.join(bench.OPS)})")
    if args.repeats < 1:
        args.bench_parser.error(f"--repeats {args.repeats}: expected at least 1")
    size = args.size or bench.default_size()
    if args.tolerance < 0:
        args.bench_parser.error(f"--tolerance {args.tolerance}: expected a fraction >= 0")
    before = None
    if args.compare:  # read first: a missing or malformed file fails before the timings
        try:
            with open(args.compare) as f:
                before = json.load(f)
        except (OSError, ValueError) as e:
            args.bench_parser.error(f"--compare {args.compare}: {e}")
    if args.copies < 1:
        args.bench_parser.error(f"--copies {args.copies}: expected at least 1")
    # With machine-readable rows on stdout, the human-readable part goes to stderr.
    human = sys.stderr if (args.json or args.csv) and not args.out else sys.stdout
    if args.peers:
        rows, interrupted = _bench_peers(args, ops, size, human)
    else:
        bandwidth = bench.measure_bandwidth() if bench.on_gpu() else None
        print(_bench_header(size, args.repeats, bandwidth), file=human, flush=True)
        rows, interrupted = _time_rows(
            lambda on_row: bench.run(ops, size=size, repeats=args.repeats, calls=args.calls,
                                     progress=ProgressBar(sys.stderr), bandwidth_gbs=bandwidth,
                                     on_row=on_row), human)
        print(bench.format_table(rows), file=human)
        _write_rows(args, rows, bench.format_table(rows, markdown=True), human)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"saved {len(rows)} rows to {args.save}", file=human)
    if args.compare:
        compared = bench.compare(before, rows, args.tolerance)
        print(f"\nagainst {args.compare} ({len(compared)} rows timed in both runs):", file=human)
        print(bench.format_comparison(compared), file=human)
        regressions = sum(r["regression"] for r in compared)
        if regressions:
            print(f"{regressions} regression(s): jaxdnn slower by more than "
                  f"{args.tolerance:.0%} while XLA was not", file=human)
            return 1
    return INTERRUPTED if interrupted else 0


def _write_rows(args: argparse.Namespace, rows: list[dict], markdown: str,
                human: TextIO) -> None:
    """--json / --csv / --out: the rows where they were asked for."""
    if args.json:
        text = json.dumps(rows, indent=1) + "\n"
    elif args.csv:
        text = rows_to_csv(rows)
    else:  # --out alone keeps a Markdown table
        text = markdown + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=human)
    elif args.json or args.csv:
        sys.stdout.write(text)


def _bench_peers(args: argparse.Namespace, ops: list[str], size: str,
                 human: TextIO) -> tuple[list[dict], bool]:
    """jaxdnn bench --peers: jaxdnn beside XLA and PyTorch, per call and in one program;
    (rows, interrupted)."""
    ratio = (f"per call: one jitted call at a time; program x{args.copies}: {args.copies} "
             "applications in one jitted program (PyTorch: as many back-to-back calls), ms per "
             "application; vs best peer = the faster peer's ms / jaxdnn ms (above 1: jaxdnn "
             "is faster)")
    print(_bench_header(size, args.repeats, None, ratio), file=human, flush=True)
    rows, interrupted = _time_rows(
        lambda on_row: bench.peers(ops, size=size, repeats=args.repeats, calls=args.calls,
                                   copies=args.copies, progress=ProgressBar(sys.stderr),
                                   on_row=on_row,
                                   on_note=lambda note: print(note, file=human, flush=True))[0],
        human)
    print(bench.format_peers(rows), file=human)
    _write_rows(args, rows, bench.format_peers(rows, markdown=True), human)
    return rows, interrupted


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxdnn", description="jaxdnn: cuDNN operations for JAX.")
    parser.add_argument("--version", action="version",
                        version=f"jaxdnn {jaxdnn.__version__} (jax {jax.__version__}, "
                                f"jaxlib {jaxlib.__version__})")
    commands = parser.add_subparsers(dest="command", metavar="command")

    info = commands.add_parser("info", help="versions, cuDNN, devices, extension status, flags")
    info.add_argument("--json", action="store_true", help="print as JSON")

    b = commands.add_parser(
        "bench", help="time jaxdnn ops against XLA",
        description="Time each jaxdnn op (forward, and forward+backward) beside the XLA "
                    "code it replaces, in this process, on the default device.")
    b.add_argument("ops", nargs="*", metavar="op",
                   help=f"ops to time, among {', '.join(bench.OPS)} (default: all)")
    b.add_argument("--size", choices=bench.SIZES,
                   help="shapes: 'full' (the reference shapes of BENCHMARKS.md; default where cuDNN can serve) "
                        "or 'small' (tiny, for a CPU; default elsewhere)")
    b.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is kept")
    b.add_argument("--calls", type=int, default=None,
                   help="back-to-back calls per repeat (default: 20 full, 5 small)")
    b.set_defaults(bench_parser=b)
    fmt = b.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="write the rows as JSON")
    fmt.add_argument("--csv", action="store_true", help="write the rows as CSV")
    b.add_argument("--out", metavar="FILE",
                   help="write the JSON/CSV rows (or a Markdown table) to FILE, not stdout")
    b.add_argument("--save", metavar="FILE", help="also save the rows as JSON, for --compare")
    b.add_argument("--compare", metavar="FILE",
                   help="compare with the rows a run saved (--save; with --peers, each "
                        "timing with its own): exit 1 where jaxdnn got slower by more than "
                        "--tolerance while XLA did not")
    b.add_argument("--tolerance", type=float, default=0.10,
                   help="the slowdown --compare accepts, as a fraction (default 0.10)")
    b.add_argument("--peers", action="store_true",
                   help="jaxdnn beside XLA and, where importable, PyTorch, each per call and "
                        "inside one program of --copies applications, with the ratio to the "
                        "faster peer")
    b.add_argument("--copies", type=int, default=8,
                   help="applications per program with --peers (default 8)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe is still caught below
        return status
    except BrokenPipeError:
        # The reader left (`jaxdnn info --json | head -1`): stop quietly, as Unix tools do.
        # Point stdout at /dev/null so that Python's flush at exit raises nothing either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        info = collect_info()
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            _print_info(info, sys.stdout)
        return 0
    if args.command == "bench":
        return _bench(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
