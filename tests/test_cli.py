"""The `jaxdnn` command: info, bench (small shapes, so it runs on a CPU), argument errors."""
import csv
import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxdnn
from jaxdnn import _extension, bench, config
from jaxdnn.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "bench" in out


def test_info_prints_flags_and_extension_status(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in config.flags():
        assert name in out
    assert config.describe()["dnn.enabled"] in out
    assert "cuDNN path available: " + ("yes" if jaxdnn.is_available() else "no") in out
    if not jaxdnn.is_available():
        assert jaxdnn.unavailable_reason() in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["flags"]) == set(config.flags())
    assert info["flags"]["dnn.enabled"]["value"] == config.read("dnn.enabled")
    assert info["flags"]["dnn.enabled"]["doc"]
    assert info["extension"] == {"available": jaxdnn.is_available(),
                                 "reason": jaxdnn.unavailable_reason(),
                                 **_extension.extension_source()}
    assert info["versions"]["jaxdnn"] == jaxdnn.__version__
    assert info["devices"]


@pytest.fixture(scope="module")
def softmax_json(tmp_path_factory):
    """One small softmax run, shared: JSON rows and what went to stderr."""
    capture = pytest.MonkeyPatch()
    out, err = io.StringIO(), io.StringIO()
    capture.setattr("sys.stdout", out)
    capture.setattr("sys.stderr", err)
    try:
        assert main(["bench", "softmax", "--size", "small", "--repeats", "2", "--json"]) == 0
    finally:
        capture.undo()
    return json.loads(out.getvalue()), err.getvalue()


def test_bench_json_rows(softmax_json):
    rows, _ = softmax_json
    softmax_cases = bench.cases("small", ["softmax"])
    assert [row["pass"] for row in rows] == list(bench.PASSES) * len(softmax_cases)
    assert [row["layout"] for row in rows[::2]] == [c.layout for c in softmax_cases]
    for row in rows:
        assert list(row) == list(bench.FIELDS)
        assert row["op"] == "softmax" and row["dtype"] == "float32"
        assert row["jaxdnn_ms"] > 0 and row["xla_ms"] > 0
        assert (row["cudnn_ms"] is not None) == jaxdnn.is_available()
        assert row["ratio"] == pytest.approx(row["xla_ms"] / row["jaxdnn_ms"])
        assert row["path"] in ("cudnn", "xla")
        assert row["device"] and row["date"]
        if not bench.on_gpu():
            assert row["hbm_floor_ms"] is None and row["hbm_fraction"] is None
    # every softmax takes XLA under 'auto' (it measured faster inside programs)
    assert rows[0]["layout"] == "NC"
    assert all(row["path"] == "xla" for row in rows)


def test_bench_header_says_why_cudnn_is_unavailable(softmax_json):
    _, err = softmax_json
    assert "softmax 256x512" in err  # the table, beside the JSON on stdout
    if not jaxdnn.is_available():
        assert "cuDNN path unavailable: " + jaxdnn.unavailable_reason() in err


def test_bench_csv(capsys, tmp_path):
    out_file = tmp_path / "rows.csv"
    assert main(["bench", "softmax", "--size", "small", "--repeats", "1", "--calls", "1",
                 "--csv", "--out", str(out_file)]) == 0
    rows = list(csv.DictReader(out_file.open()))
    assert [row["pass"] for row in rows] == list(bench.PASSES) * len(bench.cases("small", ["softmax"]))
    assert list(rows[0]) == list(bench.FIELDS)
    assert all(float(row["jaxdnn_ms"]) > 0 and float(row["xla_ms"]) > 0 for row in rows)
    assert "speedup" in capsys.readouterr().out  # with --out, the table goes to stdout


def test_every_case_has_both_passes_and_its_layout():
    full = bench.cases("full")
    # the same ops in both presets; the full one times convolutions in more variants
    assert sorted(set(c.op for c in full)) == sorted(set(c.op for c in bench.cases("small")))
    assert [c.op for c in full] == sorted((c.op for c in full), key=bench.OPS.index)
    assert {(c.dtype, c.layout) for c in full if c.label.startswith("res4")} == {
        (dtype, layout) for dtype in ("float32", "bfloat16") for layout in ("NCHW", "NHWC")}
    assert {c.dtype for c in full if c.label.startswith("tconv1d")} == {"float32", "bfloat16"}
    assert {(c.dtype, c.layout) for c in full if c.op == "pool"} == {
        ("float32", "NCHW"), ("bfloat16", "NCHW"), ("float16", "NCHW"), ("float32", "NHWC"),
        ("float32", "NCDHW")}
    assert {(c.dtype, c.layout) for c in full if c.op == "batchnorm"} == {
        (dtype, layout) for dtype in ("float32", "bfloat16") for layout in ("NCHW", "NHWC")}
    assert full[0].shape == (8192, 4096)
    by_label = {c.label: c for c in full
                if c.op == "stn" or (c.op == "conv" and c.layout in ("NHWC", "NCDHW", "NCW")
                                     and c.dtype == ("float32" if "res2" in c.label else "bfloat16"))}
    assert by_label["res2 3x3 64->64 56^2 N64"].inputs == (
        ((64, 56, 56, 64), "float32"), ((64, 64, 3, 3), "float32"))
    assert by_label["stem 7x7/2 3->64 224^2 N64"].params == dict(stride=(2, 2), pad=(3, 3))
    tconv = by_label["tconv1d 512->256 k16 s8 L1024 N16"]
    assert tconv.inputs == (((16, 512, 1024), "bfloat16"), ((512, 256, 16), "bfloat16"))
    assert tconv.params["image_shape"] == (16, 256, 8192)
    assert by_label["tconv3d 64->32 k4 s2 16^3 N4"].params["image_shape"] == (4, 32, 32, 32, 32)
    assert by_label["affine grid + bilinear N64 C32 128^2"].inputs == (
        ((64, 32, 128, 128), "float32"), ((64, 2, 3), "float32"))


def test_fwd_bwd_returns_the_output_and_every_input_gradient():
    case = bench.cases("small", ["batchnorm"])[1]  # NHWC: gamma and beta (1, 1, 1, C)
    _, _, args = bench.build(case, "fwd")
    assert [a.shape for a in args] == [shape for shape, _ in case.inputs]
    jaxdnn_fn, xla_fn, args = bench.build(case, "fwd+bwd")
    for fn in (jaxdnn_fn, xla_fn):
        out, grads = fn(*args)
        assert out.shape == case.shape == args[-1].shape
        assert [(g.shape, g.dtype) for g in grads] == [(a.shape, a.dtype) for a in args[:-1]]


def test_bytes_moved_counts_every_input():
    case = bench.cases("small", ["conv"])[0]
    (x_shape, _), (w_shape, _) = case.inputs
    out_shape = x_shape  # 3x3, pad 1, stride 1, C -> C
    once = 4 * (np.prod(x_shape) + np.prod(w_shape) + np.prod(out_shape))
    assert bench._bytes_moved(case, "fwd") == once
    assert bench._bytes_moved(case, "fwd+bwd") == 2 * once


def test_stn_theta_is_near_the_identity():
    theta = bench.inputs(bench.cases("small", ["stn"])[0])[1]
    assert np.abs(theta - np.eye(2, 3)).max() < 0.6


def test_unknown_op_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "lstm"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "lstm" in err and all(op in err for op in bench.OPS)


def test_bad_size_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--size", "huge"])
    assert exit_info.value.code != 0
    assert "small" in capsys.readouterr().err


@pytest.mark.parametrize("op", bench.OPS)
def test_peers_compute_what_jaxdnn_computes(op):
    """Both sides of every case give the same values (the output and every input's
    gradient), so the timings compare like with like. Under full float32 matmul precision:
    on a GPU both would otherwise convolve float32 in TF32, each rounding its own way."""
    with jax.default_matmul_precision("highest"):
        for case in bench.cases("small", [op]):
            _check_sides_agree(case)


def _check_sides_agree(case):
    tol = {"bfloat16": 2e-2, "float16": 2e-3}.get(case.dtype, 1e-5)
    # Random half-precision inputs tie within pooling windows, and cuDNN and XLA may
    # send a tied maximum's gradient to different elements: compare per-image sums there.
    ties = case.op == "pool" and case.params["mode"] == "max" and tol > 1e-5
    for pass_ in bench.PASSES:
        jaxdnn_fn, xla_fn, args = bench.build(case, pass_)
        ours = jax.tree.leaves(jax.jit(jaxdnn_fn)(*args))
        theirs = jax.tree.leaves(jax.jit(xla_fn)(*args))
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            what = f"{case.label} {case.dtype} {case.layout} {pass_} result {i}"
            assert a.shape == b.shape and a.dtype == b.dtype, what
            if ties and i == 1:  # the input gradient
                a, b = (np.asarray(t, np.float32).sum(axis=(2, 3)) for t in (a, b))
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            # Sums of many terms (convolutions, the gradients of kernels, gamma, theta) round
            # relative to their largest terms, not to each element's own size.
            scale = max(1.0, float(np.abs(b).max()))
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=what)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"jaxdnn {jaxdnn.__version__} (jax ")


def test_closed_pipe_exits_quietly():
    """`jaxdnn info --json | head -1`: the reader leaves before the writer is done. Here it
    leaves before the first write (the read end is closed at once), which is the same error
    every time; a traceback on stderr is the failure."""
    proc = subprocess.Popen([sys.executable, "-m", "jaxdnn", "info", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err.decode() and "Exception ignored" not in err.decode(), err.decode()
    assert proc.returncode == 1


def _row(case, pass_, jaxdnn_ms, xla_ms):
    return {"op": "conv", "case": case, "pass": pass_, "dtype": "float32", "layout": "NHWC",
            "jaxdnn_ms": jaxdnn_ms, "xla_ms": xla_ms}


def test_compare_flags_only_jaxdnn_slowdowns_xla_did_not_share():
    before = [_row("a", "fwd", 1.0, 2.0), _row("b", "fwd", 1.0, 2.0), _row("c", "fwd", 1.0, 2.0),
              _row("gone", "fwd", 1.0, 1.0)]
    after = [_row("a", "fwd", 1.25, 2.0),   # jaxdnn 25% slower, XLA not: a regression
             _row("b", "fwd", 1.25, 2.5),   # both 25% slower: the machine, not jaxdnn
             _row("c", "fwd", 1.05, 2.0),   # within the 10% tolerance
             _row("new", "fwd", 9.0, 1.0)]  # not timed before: left out
    compared = {r["case"]: r for r in bench.compare(before, after, tolerance=0.10)}
    assert set(compared) == {"a", "b", "c"}
    assert [compared[c]["regression"] for c in "abc"] == [True, False, False]
    np.testing.assert_allclose(compared["a"]["slowdown"], 1.25)
    assert compared["a"]["before_ms"] == 1.0 and compared["a"]["after_ms"] == 1.25
    assert "REGRESSION" in bench.format_comparison([compared["a"]])
    with pytest.raises(ValueError, match="tolerance"):
        bench.compare(before, after, tolerance=-0.1)


def test_bench_save_then_compare(capsys, tmp_path):
    saved = tmp_path / "before.json"
    args = ["bench", "softmax", "--size", "small", "--repeats", "1", "--calls", "1"]
    assert main([*args, "--save", str(saved)]) == 0
    rows = json.loads(saved.read_text())
    assert rows and all(r["op"] == "softmax" for r in rows)
    # Against a run where everything took no time, every row regresses unless XLA did too:
    # both sides so, the slowdown is shared and nothing is flagged (whatever the rerun's
    # noise)...
    fast = [dict(r, jaxdnn_ms=1e-9, xla_ms=1e-9) for r in rows]
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    assert main([*args, "--compare", str(tmp_path / "fast.json")]) == 0
    # ...then jaxdnn alone, XLA having taken forever: every row is a regression and the
    # command fails.
    fast_jaxdnn = [dict(r, jaxdnn_ms=1e-9, xla_ms=1e9) for r in rows]
    (tmp_path / "fast_jaxdnn.json").write_text(json.dumps(fast_jaxdnn))
    capsys.readouterr()
    assert main([*args, "--compare", str(tmp_path / "fast_jaxdnn.json")]) == 1
    assert "regression(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--compare", str(tmp_path / "missing.json")])


def _peers_json(capsys, *extra):
    argv = ["bench", "--peers", "softmax", "--size", "small", "--repeats", "1", "--calls", "1",
            "--copies", "2", "--json", *extra]
    assert main(argv) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_bench_peers_times_per_call_and_in_one_program(capsys):
    import importlib.util
    rows, err = _peers_json(capsys)
    cases = bench.cases("small", ["softmax"])
    assert [(r["case"], r["pass"], r["timing"]) for r in rows] == [
        (c.label, p, t) for c in cases for p in bench.PASSES for t in ("per call", "program x2")]
    for row in rows:
        assert list(row) == list(bench.PEER_FIELDS)
        assert row["jaxdnn_ms"] > 0 and row["xla_ms"] > 0
        best = min(t for t in (row["xla_ms"], row["torch_ms"]) if t is not None)
        assert row["vs_best_peer"] == pytest.approx(best / row["jaxdnn_ms"])
        assert row["best_peer"] == ("XLA" if best == row["xla_ms"] else "PyTorch")
    if importlib.util.find_spec("torch") is None:  # no PyTorch column, and the table says why
        assert all(row["torch_ms"] is None and row["best_peer"] == "XLA" for row in rows)
        assert "PyTorch: none (PyTorch is not installed), so no PyTorch column" in err
        assert "PyTorch ms" not in err
    else:  # CPU PyTorch where JAX runs on the CPU, named as such
        device = "cuda" if bench.on_gpu() else "cpu"
        assert f" on {device}" in err and "PyTorch ms" in err
    assert "program x2" in err and "vs best peer" in err


def test_bench_peers_puts_pytorch_beside_xla(capsys, monkeypatch):
    """With a PyTorch peer (stubbed here: its timings fixed, so that it is the faster peer
    on one pass and the slower on the other) the table gains its column and the ratio is
    to the faster peer."""
    from jaxdnn import torch_peer
    monkeypatch.setattr(torch_peer, "unavailable_reason", lambda: None)
    monkeypatch.setattr(torch_peer, "device", lambda want_cuda: "cpu")
    monkeypatch.setattr(torch_peer, "configure", lambda where: None)
    monkeypatch.setattr(torch_peer, "versions", lambda where: {"torch": "9.9", "device": where})
    monkeypatch.setattr(torch_peer, "step_for", lambda case, pass_, where: pass_)
    timed = []

    def time_ms(step, repeats, calls, where):
        timed.append(calls)
        return 1e-9 if step == "fwd" else 1e9  # fastest of all forward, slowest backward
    monkeypatch.setattr(torch_peer, "time_ms", time_ms)
    rows, err = _peers_json(capsys)
    assert "PyTorch 9.9 on cpu" in err and "PyTorch ms" in err
    for row in rows:
        torch_ms = 1e-9 if row["pass"] == "fwd" else 1e9
        assert row["torch_ms"] == torch_ms
        assert row["best_peer"] == ("PyTorch" if row["pass"] == "fwd" else "XLA")
        best = min(torch_ms, row["xla_ms"])
        assert row["vs_best_peer"] == pytest.approx(best / row["jaxdnn_ms"])
    # PyTorch's 'program' is as many back-to-back calls as the program's applications
    assert sorted(set(timed)) == [1, 2]


class _InterruptAt:
    """A progress bar that raises KeyboardInterrupt (Ctrl-C) when step `at` begins."""

    def __init__(self, at):
        self.at = at

    def __call__(self, stream):
        def progress(done, total, what):
            if done == self.at:
                raise KeyboardInterrupt
        return progress


@pytest.mark.parametrize("peers", [False, True])
def test_an_interrupted_bench_prints_the_rows_timed_before_it(capsys, monkeypatch, peers):
    from jaxdnn import cli
    monkeypatch.setattr(cli, "ProgressBar", _InterruptAt(1 if peers else 2))
    argv = ["bench", "softmax", "--size", "small", "--repeats", "1", "--calls", "1", "--json"]
    assert main(argv + (["--peers", "--copies", "2"] if peers else [])) == cli.INTERRUPTED
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    case = bench.cases("small", ["softmax"])[0]
    expected = ([(case.label, "fwd", t) for t in ("per call", "program x2")] if peers
                else [(case.label, p, None) for p in bench.PASSES[:2]])
    assert [(r["case"], r["pass"], r.get("timing")) for r in rows] == expected
    assert all(r["jaxdnn_ms"] > 0 and r["xla_ms"] > 0 for r in rows)
    assert "interrupted; rows timed before it: 2" in captured.err
    if peers:  # the PyTorch column's line comes before the timing, so it survives too
        before = captured.err.split("interrupted")[0]
        assert re.search(r"^PyTorch(: not asked|: none| \S+ on )", before, re.M), before


def test_sigterm_interrupts_a_bench_as_ctrl_c_does():
    import signal
    import time
    from jaxdnn import cli
    before = signal.getsignal(signal.SIGTERM)
    with cli._terminate_as_interrupt():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
    assert signal.getsignal(signal.SIGTERM) is before


def test_bench_peers_save_then_compare_per_timing(capsys, tmp_path):
    """--peers rows save and compare as the plain ones do, each timing (per call, in one
    program) against its own."""
    saved = tmp_path / "before.json"
    args = ["bench", "--peers", "softmax", "--size", "small", "--repeats", "1", "--calls", "1",
            "--copies", "2"]
    assert main([*args, "--save", str(saved)]) == 0
    rows = json.loads(saved.read_text())
    assert {r["timing"] for r in rows} == {"per call", "program x2"}
    # before, per call: jaxdnn took no time and XLA forever (the rerun's jaxdnn regressed and
    # its XLA did not, whatever the noise); in one program jaxdnn took forever: only the
    # per-call rows regress
    before = [dict(r, jaxdnn_ms=1e-9, xla_ms=1e9) if r["timing"] == "per call" else
              dict(r, jaxdnn_ms=1e9) for r in rows]
    (tmp_path / "fast.json").write_text(json.dumps(before))
    capsys.readouterr()
    assert main([*args, "--compare", str(tmp_path / "fast.json")]) == 1
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if line.endswith("REGRESSION")]
    assert len(flagged) == sum(r["timing"] == "per call" for r in rows), "\n".join(flagged)
    assert all(" per call " in line for line in flagged)
    compared = bench.compare(before, rows)
    assert len(compared) == len(rows)
    assert all(c["regression"] == (c["timing"] == "per call") for c in compared)


def test_bench_peers_refuses_too_few_copies(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--peers", "--copies", "0"])
    assert "--copies 0" in capsys.readouterr().err
