"""Turn the reliability runs' JSON into RELIABILITY.md's tables.

    python scripts/reliability_report.py LOG_DIR [--markdown RELIABILITY.md] [--label GPU]

Reads LOG_DIR/fuzz_run.json (benchmarks/fuzz_run.py), LOG_DIR/soak.json
(benchmarks/soak.py), LOG_DIR/huge.json and LOG_DIR/huge.xml (tests/test_huge.py's
figures and pytest's JUnit report); any of them may be missing (the section says so).
Writes one section, between the markers `<!-- run: LABEL -->` and `<!-- end run: LABEL -->`
of the Markdown file (replaced if there, appended otherwise); the rest of the file is
kept. LABEL defaults to GPU when the runs were on a GPU, else CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _mib(b):
    return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def _versions(env: dict) -> str:
    v = env.get("versions", {})
    cudnn = (env.get("cudnn") or {}).get("loaded")
    cudnn_text = (f"cuDNN {cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}"
                  if isinstance(cudnn, int) and cudnn > 0 else "cuDNN not loaded")
    if env.get("path") == "xla" and isinstance(cudnn, int) and cudnn > 0:
        cudnn_text += " (loaded, not used)"
    return (f"Python {v.get('python')}, jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
            f"{cudnn_text}, jaxdnn {v.get('jaxdnn')}")


def fuzz_section(data) -> list[str]:
    out = ["#### Differential fuzzing (`benchmarks/fuzz_run.py`)", ""]
    if data is None:
        return out + ["Not run (no fuzz_run.json).", ""]
    env, t = data["environment"], data["totals"]
    other = (f"cuDNN against the float64 oracles, {t.get('xla_compared', 0)} of them also "
             "against the XLA path" if env["path"] == "cudnn"
             else "the XLA path against the float64 oracles")
    out += [f"{t['configurations']} valid configurations on {env['card']} ({other}) in "
            f"{data['seconds']} s with {data['workers']} worker processes "
            f"({data['configs_per_second']} configurations/s).", "",
            "| op family | configurations | ok | mismatches | errors | crashes |",
            "|---|---:|---:|---:|---:|---:|"]
    for op, r in data["per_op"].items():
        if op == "invalid":
            continue
        out.append(f"| {op} | {r['configurations']} | {r['ok']} | {r['mismatch']} | "
                   f"{r['error']} | {r['crash']} |")
    out.append(f"| **all** | **{t['configurations']}** | {t['ok']} | {t['mismatch']} | "
               f"{t['error']} | {t['crash']} |")
    inv = data["per_op"].get("invalid")
    if inv:
        out += ["", f"Invalid calls (about 20 per seed, each must raise ValueError/TypeError "
                f"at trace time): {inv['configurations']} seeds, {inv['ok']} raised as "
                f"required, {inv['mismatch']} did not."]
    findings = data.get("findings") or []
    out += ["", "Findings: " + ("none." if not findings else f"{len(findings)}:")]
    for r in findings[:30]:
        detail = " ".join(str(r.get("detail", "")).split())[:240]
        out.append(f"- {r['op']} seed {r['seed']}: {r['status']}: {detail}")
    return out + [""]


def soak_section(data) -> list[str]:
    out = ["#### Soak and concurrency (`benchmarks/soak.py`)", ""]
    if data is None:
        return out + ["Not run or did not finish (no soak.json).", ""]
    inj = data["injected"]
    kinds = ", ".join(f"{k} {v['recovered']}/{v['tried']}" for k, v in inj["per_kind"].items())
    rss, dev = data.get("rss_bytes"), data.get("device_bytes")
    s = data["settings"]
    rows = [
        ("passed", "yes" if data["passed"] else "no: " + "; ".join(data["failures"])),
        ("steps", f"{data['steps']} ({', '.join(f'{k} {v}' for k, v in data['steps_per_model'].items())})"),
        ("threads, devices", f"{data['threads']}, {data['devices']}"),
        ("seconds (after a warm-up of)", f"{data['seconds']} ({data['warmup_seconds']})"),
        ("steps per second", data["steps_per_second"]),
        ("shape buckets", f"cnn {s['buckets']['cnn']}, lstm {s['buckets']['lstm']}"),
        ("flag sets (thread-local), global flips", f"{len(s['flag_sets'])}, "
         f"dnn.deterministic every {s['flip_every']} s"),
        ("checks against the XLA path", data["checks"]),
        ("mismatches", data["mismatches"]),
        ("unexpected exceptions (crashes)", data["unexpected_exceptions"]),
        ("injected failures: tried, raised, recovered", f"{inj['tried']}, {inj['raised']}, "
         f"{inj['recovered']} ({kinds})"),
        ("host RSS: before the threads -> settled -> after them (growth after the "
         "threads' start-up; max while they ran)",
         "n/a" if rss is None else
         f"{_mib(rss['start'])} -> {_mib(rss.get('settled', rss['start']))} at "
         f"{rss.get('settle_seconds', 0)} s -> {_mib(rss['end'])} ({_mib(rss['growth'])}, "
         f"slack {s['rss_slack_mib']} MiB; {_mib(rss['max'])})"),
        ("device memory in use: before -> after the threads (growth; max while they ran)",
         "n/a (the backend reports none)" if dev is None else
         f"{_mib(dev['start'])} -> {_mib(dev['end'])} ({_mib(dev['growth'])}, slack "
         f"{s['device_slack_mib']} MiB; {_mib(dev['max'])})"),
    ]
    handles = data.get("cudnn_handles") or {}
    if handles.get("end"):
        def per_device(counts):
            return ", ".join(f"device {d}: {made} on {streams}"
                             for d, (made, streams) in sorted(counts.items()))
        # the samples' counts at a quarter, half and three quarters of the run: growth that
        # levels off (streams XLA keeps in a pool) or goes on (streams it makes anew)
        counted = [x for x in data.get("samples", []) if x.get("cudnn_handles")]
        quarters = [counted[len(counted) * q // 4] for q in (1, 2, 3)] if counted else []
        middle = [f"{per_device(x['cudnn_handles'])} at {x['t']:.0f} s" for x in quarters]
        rows.append(("cuDNN handles made, on how many streams: after the warm-up -> during "
                     "the run -> at the end",
                     " -> ".join([per_device(handles.get("after_warmup") or {}), *middle,
                                  per_device(handles["end"])])))
    out += ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return out + [""]


def huge_section(data, junit_path) -> list[str]:
    out = ["#### Arrays past 2^31 elements (`tests/test_huge.py`)", ""]
    outcomes = []
    if os.path.exists(junit_path):
        try:
            for case in ET.parse(junit_path).getroot().iter("testcase"):
                status = "passed"
                for tag in ("failure", "error", "skipped"):
                    child = case.find(tag)
                    if child is not None:
                        reason = " ".join((child.get("message") or "").split())[:160]
                        status = f"{tag}: {reason}" if reason else tag
                outcomes.append((case.get("name"), status))
        except ET.ParseError:
            pass
    if data is None and not outcomes:
        return out + ["Not run (no huge.json or huge.xml).", ""]
    if data is not None and data.get("records"):
        out += [f"On {data['card']}: each array has more than {data['max_cudnn_elements']} "
                "elements (cuDNN's 32-bit limit).", "",
                "| op | shape | dtype | elements | dnn.enabled='auto' | dnn.enabled=True | s |",
                "|---|---|---|---:|---|---|---:|"]
        for r in data["records"]:
            out.append(f"| {r['op']} | {tuple(r['shape'])} | {r['dtype']} | {r['elements']} | "
                       f"{r['auto']} | {r['forced_cudnn']} | {r['seconds']} |")
        out.append("")
    if outcomes:
        out += ["| test | outcome |", "|---|---|"]
        out += [f"| {name} | {status} |" for name, status in outcomes]
    return out + [""]


def section(log_dir: str, label: str | None) -> tuple[str, str]:
    fuzz = _load(os.path.join(log_dir, "fuzz_run.json"))
    soak = _load(os.path.join(log_dir, "soak.json"))
    huge = _load(os.path.join(log_dir, "huge.json"))
    env = (fuzz or soak or {}).get("environment", {})
    on_gpu = env.get("platform") == "gpu" or (huge or {}).get("platform") == "gpu"
    label = label or ("GPU" if on_gpu else "CPU")
    card = env.get("card") or (huge or {}).get("card") or "unknown device"
    lines = [f"### {label}: {card}, {str(env.get('date', 'date unknown'))[:10]}", "",
             f"Versions: {_versions(env)}." if env else "Versions: unknown.", ""]
    if env.get("path") == "xla":
        lines += ["Without a cuDNN path every op ran on jaxdnn's XLA path: these figures test "
                  "that path and the harness (the soak's checks compare the XLA path with "
                  "itself), not cuDNN. Arrays past 2^31 elements are GPU tests; here the "
                  "guard is tested on abstract shapes (`tests/test_lowering.py`, "
                  "`tests/test_huge.py`).", ""]
    lines += fuzz_section(fuzz) + soak_section(soak) + huge_section(
        huge, os.path.join(log_dir, "huge.xml"))
    return label, "\n".join(lines).rstrip() + "\n"


def update(markdown: str, label: str, body: str) -> str:
    begin, end = f"<!-- run: {label} -->", f"<!-- end run: {label} -->"
    block = f"{begin}\n{body}{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(markdown):
        return pattern.sub(lambda _: block, markdown)
    return markdown.rstrip() + "\n\n" + block + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log_dir")
    p.add_argument("--markdown", default=os.path.join(ROOT, "RELIABILITY.md"))
    p.add_argument("--label", default=None, help="the section's name (default GPU or CPU)")
    args = p.parse_args(argv)
    label, body = section(args.log_dir, args.label)
    try:
        with open(args.markdown) as f:
            text = f.read()
    except OSError:
        text = "# Reliability\n"
    with open(args.markdown, "w") as f:
        f.write(update(text, label, body))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
