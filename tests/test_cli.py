"""The `jaxdnn` command: info, bench (small shapes, so it runs on a CPU), argument errors."""
import csv
import io
import json

import jax
import numpy as np
import pytest

import jaxdnn
from jaxdnn import bench, config
from jaxdnn.cli import main


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
                                 "reason": jaxdnn.unavailable_reason()}
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
    # (N, C) rows take cuDNN's softmax under 'auto' wherever it can run
    assert rows[0]["layout"] == "NC"
    assert rows[0]["path"] == ("cudnn" if jaxdnn.is_available() else "xla")


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
    assert [c.op for c in full] == [c.op for c in bench.cases("small")]
    assert {(c.dtype, c.layout) for c in full if c.op == "pool"} == {
        ("float32", "NCHW"), ("bfloat16", "NCHW"), ("float16", "NCHW"), ("float32", "NHWC"),
        ("float32", "NCDHW")}
    assert full[0].shape == (8192, 4096)


def test_unknown_op_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "conv"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "conv" in err and "softmax" in err and "pool" in err


def test_bad_size_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--size", "huge"])
    assert exit_info.value.code != 0
    assert "small" in capsys.readouterr().err


def test_peers_compute_what_jaxdnn_computes():
    """Both sides of every case give the same values, so the timings compare like with like."""
    for case in bench.cases("small"):
        tol = {"bfloat16": 2e-2, "float16": 2e-3}.get(case.dtype, 1e-5)
        # Random half-precision inputs tie within pooling windows, and cuDNN and XLA may
        # send a tied maximum's gradient to different elements: compare per-image sums there.
        ties = case.op == "pool" and case.params["mode"] == "max" and tol > 1e-5
        for pass_ in bench.PASSES:
            jaxdnn_fn, xla_fn, args = bench.build(case, pass_)
            ours = jax.tree.leaves(jax.jit(jaxdnn_fn)(*args))
            theirs = jax.tree.leaves(jax.jit(xla_fn)(*args))
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                assert a.shape == b.shape and a.dtype == b.dtype, (case.label, pass_)
                if ties and i == 1:  # the input gradient
                    a, b = (np.asarray(t, np.float32).sum(axis=(2, 3)) for t in (a, b))
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                           rtol=tol, atol=tol, err_msg=f"{case.label} {pass_}")
