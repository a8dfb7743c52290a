"""Two builds of jaxdnn side by side: the in-program timings (benchmarks/in_program.py's
in_program.json) of runs of a "before" build and an "after" build on one card, taken in
alternation (scripts/gpu_check.sh stage `abtest`), reduced to one table.

For each case and pass: the median of each build's runs of jaxdnn's time, the ratio
after / before, and the same ratio of XLA's time, which is the same code in both builds
and so shows how far the card alone moves a row. The spread columns give each build's
runs as (max - min) / median: a change smaller than the spreads is noise.

    python benchmarks/compare_in_program.py --before DIR [DIR ...] --after DIR [DIR ...]
                                            [--out FILE] [--json FILE]

Each DIR holds one run's in_program.json; rows are matched by (case, pass, dtype, layout)
and only the rows every run holds are compared. Prints the table (and writes it to
--out); --json writes every run's rows and the comparison.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

KEY = ("case", "pass", "dtype", "layout")


def load_run(directory: str) -> dict:
    with open(os.path.join(directory, "in_program.json")) as f:
        return json.load(f)


def _row_key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def _median_and_spread(values: list[float]) -> tuple[float, float]:
    median = statistics.median(values)
    return median, (max(values) - min(values)) / median


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def compare(before: list[dict], after: list[dict]) -> list[dict]:
    """One row per (case, pass, dtype, layout) that every run timed on both sides, in the
    order of the first "before" run."""
    runs = before + after
    shared = set.intersection(*({_row_key(r) for r in run["rows"]} for run in runs))
    indexed = [{_row_key(r): r for r in run["rows"]} for run in runs]
    rows = []
    for key in (_row_key(r) for r in before[0]["rows"]):
        if key not in shared:
            continue
        row = dict(zip(KEY, key))
        for side, side_runs in (("before", indexed[:len(before)]),
                                ("after", indexed[len(before):])):
            for peer in ("jaxdnn", "xla"):
                median, spread = _median_and_spread([run[key][f"{peer}_ms"] for run in side_runs])
                row[f"{peer}_{side}_ms"], row[f"{peer}_{side}_spread"] = median, spread
        row["jaxdnn_ratio"] = row["jaxdnn_after_ms"] / row["jaxdnn_before_ms"]
        row["xla_ratio"] = row["xla_after_ms"] / row["xla_before_ms"]
        rows.append(row)
    return rows


def markdown(rows: list[dict], before: list[dict], after: list[dict]) -> str:
    first = before[0]
    lines = [f"{first.get('device', '?')}, {first.get('date', '?')}: {len(before)} runs of the "
             f"build before and {len(after)} of the build after, in alternation; ms per "
             f"application, median of each build's runs; ratio = after / before; spread = "
             f"(max - min) / median of a build's runs.", "",
             "| case | pass | dtype | layout | jaxdnn before | jaxdnn after | jaxdnn after / "
             "before | spread before / after | XLA after / before |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['pass']} | {r['dtype']} | {r['layout']} | "
                     f"{r['jaxdnn_before_ms']:.4g} | {r['jaxdnn_after_ms']:.4g} | "
                     f"{r['jaxdnn_ratio']:.3f} | {r['jaxdnn_before_spread']:.1%} / "
                     f"{r['jaxdnn_after_spread']:.1%} | {r['xla_ratio']:.3f} |")
    if rows:
        lines += ["", f"geomean after / before: jaxdnn "
                  f"{_geomean([r['jaxdnn_ratio'] for r in rows]):.3f}, XLA "
                  f"{_geomean([r['xla_ratio'] for r in rows]):.3f} ({len(rows)} rows)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", nargs="+", required=True, metavar="DIR")
    parser.add_argument("--after", nargs="+", required=True, metavar="DIR")
    parser.add_argument("--out", metavar="FILE", help="also write the table here")
    parser.add_argument("--json", metavar="FILE", help="write every run and the comparison")
    args = parser.parse_args(argv)
    before = [load_run(d) for d in args.before]
    after = [load_run(d) for d in args.after]
    rows = compare(before, after)
    if not rows:
        print("compare_in_program: no row is timed in every run", file=sys.stderr)
        return 1
    text = markdown(rows, before, after)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"before": before, "after": after, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
