"""The reliability scripts: benchmarks/fuzz_run.py, benchmarks/soak.py and
scripts/reliability_report.py. On the CPU they run on jaxdnn's XLA path; these tests check
that they detect what they claim to (a wrong result, a dead worker), that the soak's model
computes what jax.lax computes, and (slow) that a short run of each writes the figures
RELIABILITY.md is made from."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fuzz_cases import make_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
SCRIPTS = os.path.join(ROOT, "scripts")


@pytest.fixture
def module(monkeypatch):
    """import_module with benchmarks/ and scripts/ on sys.path."""
    import importlib
    monkeypatch.syspath_prepend(BENCHMARKS)
    monkeypatch.syspath_prepend(SCRIPTS)
    return importlib.import_module


# ---- fuzz_run -----------------------------------------------------------------------------

def test_fuzz_run_flags_a_wrong_result_and_passes_a_right_one(module, xla_path):
    fuzz_run = module("fuzz_run")
    case = make_case("softmax", 3)
    with xla_path():
        (outs, xla), = fuzz_run.run_cases([case], cudnn=False)
    assert xla is None
    assert fuzz_run._compare(case, outs, None) == ("ok", "")
    first = outs[0][0]
    wrong = [(first.ravel().at[0].add(0.25).reshape(first.shape),)] + outs[1:]  # softmax <= 1
    status, detail = fuzz_run._compare(case, wrong, None)
    assert status == "mismatch" and "forward" in detail and "seed=3" in detail


def test_fuzz_run_counts_a_dead_worker_as_a_crash(module, tmp_path):
    fuzz_run = module("fuzz_run")
    log = tmp_path / "w.jsonl"
    lines = [{"op": "conv", "seed": 0, "status": "started"},
             {"op": "conv", "seed": 0, "status": "ok", "detail": "", "seconds": 0.1},
             {"op": "pool", "seed": 0, "status": "started"}]
    log.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"op": "po')
    died = fuzz_run.read_log(str(log), died=True)
    assert [(r["op"], r["status"]) for r in died] == [("conv", "ok"), ("pool", "crash")]
    stopped = fuzz_run.read_log(str(log), died=False)
    assert stopped[-1]["status"] == "timeout"
    per_op = fuzz_run.tally(died, ["conv", "pool"])
    assert per_op["conv"]["ok"] == 1 and per_op["pool"]["crash"] == 1
    assert per_op["pool"]["configurations"] == 1
    per_op = fuzz_run.tally(stopped, ["conv", "pool"])  # a configuration cut off: not counted
    assert per_op["pool"]["timeout"] == 1 and per_op["pool"]["configurations"] == 0
    assert per_op["conv"]["configurations"] == 1


def test_fuzz_run_schedule_reproduces_seeds(module):
    fuzz_run = module("fuzz_run")
    args = fuzz_run._parse(["out", "--configs", "7", "--ops", "conv", "rnn", "--first-seed", "5"])
    assert fuzz_run.schedule(args) == [("conv", 5), ("rnn", 5), ("conv", 6), ("rnn", 6),
                                       ("conv", 7), ("rnn", 7), ("conv", 8)]
    args = fuzz_run._parse(["out", "--ops", "pool", "--seeds", "3", "17"])
    assert fuzz_run.schedule(args) == [("pool", 3), ("pool", 17)]


# ---- soak ---------------------------------------------------------------------------------

def _lax_cnn_loss(params, key, batch, side, classes):
    """The soak's CNN written with jax.lax and jax.nn alone (Theano's 'conv' mode flips
    the kernels; batch norm normalizes by the biased variance, epsilon 1e-4)."""
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch, 3, side, side))
    labels = jax.random.randint(ky, (batch,), 0, classes)
    conv = lambda a, w: jax.lax.conv_general_dilated(
        a, w[:, :, ::-1, ::-1], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"), precision="highest")
    h = conv(x, params["w1"])
    mean = h.mean(axis=(0, 2, 3), keepdims=True)
    var = ((h - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    h = (h - mean) / jnp.sqrt(var + 1e-4) * params["gamma"] + params["beta"]
    window = lambda a, op, init: jax.lax.reduce_window(a, init, op, (1, 1, 2, 2), (1, 1, 2, 2),
                                                       "VALID")
    h = jax.nn.relu(window(h, jax.lax.max, -jnp.inf))
    h = jax.nn.relu(conv(h, params["w2"]))
    h = window(h, jax.lax.add, 0.0) / 4
    logp = jax.nn.log_softmax(h.mean(axis=(2, 3)) @ params["dense"], axis=1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=1).mean()


@pytest.mark.slow
def test_soak_cnn_is_the_lax_cnn_and_a_wrong_gradient_is_flagged(module, xla_path):
    soak = module("soak")
    size = soak.SIZES["small"]
    params = soak.cnn_params(jax.random.key(0), size)  # float64 here (x64 is on)
    key = jax.random.key(1)
    batch, side = size["cnn_buckets"][1]
    loss_fn = lambda p, k: soak.cnn_loss(p, k, batch, side, size["classes"])
    with xla_path():
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, key)
    lax_loss = lambda p, k: _lax_cnn_loss(p, k, batch, side, size["classes"])
    want, want_grads = jax.jit(jax.value_and_grad(lax_loss))(params, key)
    np.testing.assert_allclose(loss, want, rtol=1e-10)
    for name in grads:
        np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-8, atol=1e-12,
                                   err_msg=name)
    assert soak.disagreement((loss, grads), (want, want_grads)) is None
    wrong = dict(grads, w2=grads["w2"].at[0, 0, 1, 1].add(0.05 * jnp.abs(grads["w2"]).max()
                                                         + 1e-3))
    assert "w2" in soak.disagreement((loss, wrong), (want, want_grads))
    assert "loss" in soak.disagreement((loss * 1.01 + 0.01, grads), (want, want_grads))


def test_soak_memory_growth_is_late_median_less_early_median(module):
    soak = module("soak")
    assert soak.growth([100, 101, 99, 100, 100, 102, 101, 102]) == pytest.approx(1.0)
    assert soak.growth([100] * 8 + [200] * 8) == 100
    assert soak.host_rss_bytes() > 1 << 20


def test_soak_rss_growth_counts_from_the_settled_sample(module):
    """A start-up step while the threads start is reported apart; what the slack bounds is
    the growth after --settle-seconds."""
    soak = module("soak")
    samples = [{"t": t, "rss": rss} for t, rss in
               [(0.5, 150), (2.0, 290), (9.9, 300), (10.0, 301), (20.0, 302), (30.0, 303)]]
    quiet = [{"rss": 100}, {"rss": 304}]
    whole = soak.summarize(samples, quiet, "rss")
    assert whole["growth"] == 204 and "startup" not in whole
    settled = soak.summarize(samples, quiet, "rss", settle_seconds=10.0)
    assert (settled["settled"], settled["startup"], settled["growth"]) == (301, 201, 3)
    assert settled["max"] == 304 and settled["start"] == 100 and settled["end"] == 304
    # no sample that late: the growth is counted from the start
    early = soak.summarize(samples[:2], quiet, "rss", settle_seconds=10.0)
    assert (early["startup"], early["growth"]) == (0, 204)


# ---- the report ---------------------------------------------------------------------------

def test_report_replaces_only_its_own_section(module):
    report = module("reliability_report")
    text = "# Reliability\n\nhand-written\n"
    once = report.update(text, "CPU", "### CPU: a\n")
    assert once.startswith(text.rstrip()) and "<!-- run: CPU -->\n### CPU: a\n<!-- end run: CPU -->" in once
    twice = report.update(report.update(once, "GPU", "### GPU: b\n"), "CPU", "### CPU: c\n")
    assert "### CPU: a" not in twice and "### CPU: c" in twice and "### GPU: b" in twice
    assert twice.count("hand-written") == 1


def test_report_gives_the_soaks_cudnn_handle_counts(module):
    report = module("reliability_report")
    soak = {"injected": {"tried": 1, "raised": 1, "recovered": 1, "per_kind": {}},
            "settings": {"buckets": {"cnn": [], "lstm": []}, "flag_sets": [], "flip_every": 2},
            "passed": True, "steps": 2, "steps_per_model": {"cnn": 1, "lstm": 1},
            "threads": 8, "devices": 2, "seconds": 1, "warmup_seconds": 1,
            "steps_per_second": 2, "checks": 1, "mismatches": 0, "unexpected_exceptions": 0,
            "rss_bytes": None, "device_bytes": None}
    rows = "\n".join(report.soak_section(soak))
    assert "cuDNN handles" not in rows  # the XLA path has none
    soak["cudnn_handles"] = {"after_warmup": {"0": [7, 3], "1": [2, 1]},
                             "end": {"0": [27, 17], "1": [2, 1]}}
    rows = "\n".join(report.soak_section(soak))
    assert ("| cuDNN handles made, on how many streams: after the warm-up -> during the run "
            "-> at the end | device 0: 7 on 3, device 1: 2 on 1 -> device 0: 27 on 17, "
            "device 1: 2 on 1 |") in rows
    # with samples: their counts at a quarter, half and three quarters of the run
    soak["samples"] = [{"t": t, "cudnn_handles": {"0": [7 + t, 3 + t]}} for t in range(8)]
    rows = "\n".join(report.soak_section(soak))
    assert ("| device 0: 7 on 3, device 1: 2 on 1 -> device 0: 9 on 5 at 2 s -> "
            "device 0: 11 on 7 at 4 s -> device 0: 13 on 9 at 6 s -> device 0: 27 on 17, "
            "device 1: 2 on 1 |") in rows


@pytest.mark.slow
def test_short_runs_write_the_figures_and_the_report(tmp_path, module):
    """fuzz_run (14 configurations) and soak (3 s) as scripts, then the report."""
    env = {k: v for k, v in os.environ.items() if k != "JAXDNN_FLAGS"}
    run = lambda *argv: subprocess.run([sys.executable, *argv], env=env, cwd=ROOT,
                                       capture_output=True, text=True, timeout=600)
    fuzz = run(os.path.join(BENCHMARKS, "fuzz_run.py"), str(tmp_path), "--configs", "14",
               "--workers", "1", "--group", "7")
    assert fuzz.returncode == 0, fuzz.stdout + fuzz.stderr
    data = json.loads((tmp_path / "fuzz_run.json").read_text())
    assert data["totals"]["configurations"] == 12 and data["totals"]["ok"] == 12
    assert all(r["configurations"] == 2 and r["ok"] == 2 for r in data["per_op"].values())
    assert data["findings"] == []
    soak = run(os.path.join(BENCHMARKS, "soak.py"), str(tmp_path), "--seconds", "3",
               "--threads", "2", "--buckets", "1", "--flag-sets", "2", "--flip-every", "0",
               "--check-every", "3", "--inject-every", "0.5", "--sample-every", "0.2")
    assert soak.returncode == 0, soak.stdout + soak.stderr
    s = json.loads((tmp_path / "soak.json").read_text())
    assert s["passed"] and s["failures"] == []
    assert s["steps_per_model"]["cnn"] > 0 and s["steps_per_model"]["lstm"] > 0
    assert s["steps"] == sum(s["steps_per_model"].values())
    assert s["checks"] > 0 and s["mismatches"] == 0 and s["unexpected_exceptions"] == 0
    assert s["injected"]["tried"] >= 1 and s["injected"]["recovered"] == s["injected"]["tried"]
    assert s["rss_bytes"]["samples"] >= 4 and s["rss_bytes"]["max"] >= s["rss_bytes"]["start"]
    markdown = tmp_path / "R.md"
    markdown.write_text("# Reliability\n")
    assert module("reliability_report").main([str(tmp_path), "--markdown", str(markdown)]) == 0
    text = markdown.read_text()
    label = "GPU" if jax.default_backend() == "gpu" else "CPU"
    assert f"<!-- run: {label} -->" in text
    assert "| **all** | **12** | 12 | 0 | 0 | 0 |" in text
    assert f"| steps | {s['steps']} (cnn " in text
    assert "Not run (no huge.json or huge.xml)." in text


@pytest.mark.parametrize("op", ["conv", "batch_norm", "rnn"])
def test_fuzz_run_one_program_runs_both_paths(module, cudnn_on_cpu, op):
    """The GPU profile's program: the configurations' passes with dnn.enabled=True and
    again traced under dnn.enabled=False, in one jit (here the cuDNN primitives lower to
    their references, as on a CPU they must); both sets of results meet the oracles."""
    fuzz_run = module("fuzz_run")
    cases = [make_case(op, seed) for seed in (0, 1)]
    ran = fuzz_run.run_cases(cases, cudnn=True)
    for case, (outs, xla) in zip(cases, ran):
        assert xla is not None and len(xla) == len(case.passes)
        assert fuzz_run._compare(case, outs, xla) == ("ok", "")
    assert fuzz_run.check_group([(op, 0), ("invalid", 0), (op, 1)], cudnn=True) == [
        ("ok", "")] * 3
    (_, xla0), (_, xla1) = fuzz_run.run_cases(cases, cudnn=True, with_xla=[True, False])
    assert xla0 is not None and xla1 is None
