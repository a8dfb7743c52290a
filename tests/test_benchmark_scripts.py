"""The GPU benchmark scripts benchmarks/rnn_peers.py, benchmarks/flax_training.py and
benchmarks/in_program.py run end to end at their small size (on the CPU: jaxdnn's XLA
path, Flax; the GPU-only peers recorded with a reason) and write their JSON and Markdown
results; the timing and trace-reading helpers they and benchmarks/kernel_times.py share
compute what they say."""
import importlib
import json
import math
import os

import jax
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


@pytest.fixture
def script(monkeypatch):
    """import_module with benchmarks/ on sys.path (the scripts import peers_torch and each
    other from beside them, as when run from there)."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    return importlib.import_module


def _positive(ms) -> bool:
    return ms is not None and math.isfinite(ms) and ms > 0


def _outputs(directory, name):
    with open(directory / f"{name}.json") as f:
        data = json.load(f)
    return data, (directory / f"{name}.md").read_text()


def test_rnn_peers_small(tmp_path, script):
    rnn_peers = script("rnn_peers")
    # One dtype of the two keeps this test near 10 s on a small CPU (each peer compiles its
    # forward and its backward for every cell and dtype); bfloat16, where the peers differ
    # most (jax.experimental.rnn has none; PyTorch and Flax compute in it).
    # --shape and --name as the GPU script's larger shapes use them.
    argv = [str(tmp_path), "--size", "small", "--repeats", "1", "--dtypes", "bfloat16",
            "--shape", "8", "3", "16", "8", "--name", "rnn_peers_h8"]
    assert rnn_peers.main(argv) == 0
    data, markdown = _outputs(tmp_path, "rnn_peers_h8")
    rows = data["rows"]
    assert data["shape"] == "T8 N3 I16 H8 L2"
    assert {r["shape"] for r in rows} == {"T8 N3 I16 H8 L2"}
    assert [(r["cell"], r["dtype"], r["pass"]) for r in rows] == [
        (cell, "bfloat16", pass_) for cell in ("lstm", "gru") for pass_ in ("fwd", "fwd+bwd")]
    on_gpu = jax.default_backend() == "gpu"
    for row in rows:
        for key in ("jaxdnn_ms", "jaxdnn_flax_ms", "flax_ms"):
            assert _positive(row[key]), (key, row)
        assert _positive(row["flax_over_jaxdnn"])
        assert row["path"] in ("cudnn", "xla")
        # a peer without a time says why
        for title, key in (("jax.experimental.rnn", "jax_rnn_ms"), ("PyTorch", "torch_ms")):
            assert _positive(row[key]) or row["not_timed"][title], (title, row)
        if row["cell"] == "gru":
            assert row["not_timed"]["jax.experimental.rnn"] == (
                "jax.experimental.rnn has only an LSTM")
        elif not on_gpu:
            assert "only on a GPU" in row["not_timed"]["jax.experimental.rnn"]
        if row["pass"] == "fwd":
            assert row["targets"] == ""
        else:  # Flax is always timed; no cuDNN peer runs on the CPU
            assert row["targets"] in ("peer -, Flax met", "peer -, Flax missed") or on_gpu
    assert "| cell | dtype | pass | jaxdnn ms |" in markdown
    assert "Not timed:" in markdown or on_gpu
    assert data["info"]["versions"]["flax"]


def test_flax_training_small(tmp_path, script):
    flax_training = script("flax_training")
    assert flax_training.main([str(tmp_path), "--size", "small", "--repeats", "1"]) == 0
    data, markdown = _outputs(tmp_path, "flax_training")
    rows = {row["model"]: row for row in data["rows"]}
    assert set(rows) == {"cnn", "lstm_lm"}
    for row in rows.values():
        assert _positive(row["flax_ms"]) and _positive(row["jaxdnn_ms"]), row
        assert row["speedup"] == pytest.approx(row["flax_ms"] / row["jaxdnn_ms"])
        assert row["path"] in ("cudnn", "xla")
        # both builds compute the same first step
        assert row["losses_agree"] and math.isfinite(row["flax_loss"]), row
    assert rows["cnn"]["dtype"] == "bfloat16" and rows["lstm_lm"]["dtype"] == "float32"
    assert rows["lstm_lm"]["target"] in ("met", "missed")
    assert "| model | shape | dtype | Flax ms/step |" in markdown


def test_in_program_replicates_the_op_on_distinct_buffers(script):
    in_program = script("in_program")
    import jax.numpy as jnp
    import numpy as np
    args = (jnp.arange(6.0).reshape(2, 3), jnp.ones(3))
    groups = in_program.copies_of(args, 3)
    assert len(groups) == 3 and all(len(g) == 2 for g in groups)
    # six distinct buffers, none of them the originals'
    pointers = {a.unsafe_buffer_pointer() for g in groups for a in g}
    assert len(pointers) == 6 and not pointers & {a.unsafe_buffer_pointer() for a in args}
    for group in groups:
        for copy, original in zip(group, args):
            np.testing.assert_array_equal(copy, original)
    outs = jax.jit(in_program.replicate(lambda x, y: x * y, 3))(*groups)
    assert len(outs) == 3
    for out in outs:
        np.testing.assert_array_equal(out, np.arange(6.0).reshape(2, 3))


def test_in_program_small(tmp_path, script):
    in_program = script("in_program")
    argv = [str(tmp_path), "--size", "small", "--ops", "conv", "pool", "--copies", "2",
            "--repeats", "1", "--calls", "1", "--no-torch"]
    assert in_program.main(argv) == 0
    data, markdown = _outputs(tmp_path, "in_program")
    from jaxdnn import bench
    cases = bench.cases("small", ["conv", "pool"])
    rows = data["rows"]
    assert [(r["case"], r["pass"]) for r in rows] == [
        (c.label, p) for c in cases for p in bench.PASSES]
    assert data["copies"] == 2
    for row, (case, _) in zip(rows, [(c, p) for c in cases for p in bench.PASSES]):
        for key in ("jaxdnn_ms", "xla_ms", "jaxdnn_run_ms", "xla_run_ms"):
            assert _positive(row[key]), (key, row)
        assert row["torch_ms"] is None and row["jaxdnn_call_ms"] is None
        assert math.isclose(row["vs_xla"], row["xla_ms"] / row["jaxdnn_ms"])
        # the other layout route is timed for channels-first convolutions only, and not
        # for pointwise kernels (they keep their layout on either policy)
        routable = (case.op == "conv" and not case.layout.endswith("C")
                    and any(k != 1 for k in case.operands[0][0][2:]))
        assert _positive(row["other_route_ms"]) == routable, row
    assert "geomean all: vs XLA" in markdown and rows[0]["case"] in markdown
    # the header names the flags that choose a case's path, the layout route among them
    # (two runs on either route are told apart by it)
    assert "dnn.conv.layout_route=auto" in markdown and "dnn.enabled=auto" in markdown


def test_in_program_filters_pick_cases_and_passes(tmp_path, script):
    in_program = script("in_program")
    argv = [str(tmp_path), "--size", "small", "--ops", "conv", "--match", "tconv", "--pass",
            "fwd", "--copies", "1", "--repeats", "1", "--calls", "1", "--no-torch"]
    assert in_program.main(argv) == 0
    data, _ = _outputs(tmp_path, "in_program")
    from jaxdnn import bench
    expected = [c.label for c in bench.cases("small", ["conv"]) if c.label.startswith("tconv")]
    assert len(expected) == 3  # the 1-D, 2-D and 3-D transposed convolutions
    assert [(r["case"], r["pass"]) for r in data["rows"]] == [(label, "fwd") for label in expected]


class _FakeClock:
    """time.perf_counter for bench.steady_time_ms: every call of the timed function costs
    `per_call` seconds and every wait for its result `once` seconds."""
    def __init__(self, per_call, once):
        self.now, self.per_call, self.once = 0.0, per_call, once

    def perf_counter(self):
        return self.now

    def call(self, *args):
        self.now += self.per_call
        return args

    def wait(self, out):
        self.now += self.once
        return out


@pytest.mark.parametrize("per_call, once", [(2e-3, 0.0), (1e-3, 5e-3), (1e-5, 1e-2)])
def test_steady_time_drops_the_once_per_run_cost(monkeypatch, per_call, once):
    from jaxdnn import bench
    clock = _FakeClock(per_call, once)
    monkeypatch.setattr(bench.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(bench.jax, "block_until_ready", clock.wait)
    steady = bench.steady_time_ms(clock.call, (), repeats=3, calls=4)
    plain = bench.time_ms(clock.call, (), repeats=3, calls=4)
    assert steady == pytest.approx(per_call * 1e3)
    assert plain == pytest.approx((per_call + once / 4) * 1e3)


def test_steady_time_falls_back_to_the_plain_time_when_noise_swamps_it(monkeypatch):
    from jaxdnn import bench
    # a run of 2n calls that takes no longer than a run of n: the difference says nothing
    durations = iter([1.0] * 4 + [3.0, 3.0] * 3)
    clock = {"now": 0.0}

    def perf_counter():
        return clock["now"]

    def wait(out):
        clock["now"] += next(durations)
        return out
    monkeypatch.setattr(bench.time, "perf_counter", perf_counter)
    monkeypatch.setattr(bench.jax, "block_until_ready", wait)
    # the longer runs take 3 s for 2 * 5 calls: 0.3 s, 300 ms, a call
    assert bench.steady_time_ms(lambda: None, (), repeats=3, calls=5) == pytest.approx(300.0)


def test_kernel_times_summarizes_the_gpu_events_of_a_trace(script):
    kernel_times = script("kernel_times")
    events = [
        {"cat": "kernel", "name": "conv", "ts": 100.0, "dur": 30.0},
        {"cat": "kernel", "name": "transpose", "ts": 130.0, "dur": 5.0},
        {"cat": "gpu_memset", "name": "Memset", "ts": 140.0, "dur": 1.0},
        {"cat": "kernel", "name": "conv", "ts": 150.0, "dur": 32.0},
        {"cat": "kernel", "name": "transpose", "ts": 182.0, "dur": 6.0},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 90.0, "dur": 3.0},
        {"ph": "M", "name": "process_name"},
    ]
    result = kernel_times.summarize(events, applications=2)
    assert [(k["name"], k["launches"], k["us"]) for k in result["kernels"]] == [
        ("conv", 1.0, 31.0), ("transpose", 1.0, 5.5), ("Memset", 0.5, 0.5)]
    assert result["busy_us"] == pytest.approx(37.0)
    assert result["span_us"] == pytest.approx((188.0 - 100.0) / 2)
    assert kernel_times.summarize(events[-2:], 2) == {"kernels": [], "busy_us": None,
                                                      "span_us": None}


def test_in_model_small(tmp_path, script):
    in_model = script("in_model")
    argv = [str(tmp_path), "--size", "small", "--quick", "--dtype", "float32", "--copies", "2",
            "--repeats", "1", "--calls", "1"]
    assert in_model.main(argv) == 0
    data, markdown = _outputs(tmp_path, "in_model")
    rows = data["rows"]
    expected = [c for c in in_model.quick(in_model.cases("small")) if c.dtype == "float32"]
    # every kind of case: attention, the classifier head, the bare op, batch norm in
    # training and inference, in both layouts and modes; each timed in a program and per call
    assert {c.kind for c in expected} == {"attention", "head", "bare", "batchnorm"}
    assert {(c.layout, c.mode, c.pass_) for c in expected if c.op == "batchnorm"} == {
        (layout, mode, pass_) for layout in ("NCHW", "NHWC")
        for mode in ("spatial", "per-activation") for pass_ in ("fwd", "fwd+bwd")}
    assert [(r["case"], r["pass"], r["layout"], r["timing"]) for r in rows] == [
        (c.label, c.pass_, c.layout, timing) for c in expected
        for timing in ("program x2", "per call")]
    for row in rows:
        assert _positive(row["auto_ms"]) and _positive(row["xla_ms"]), row
        assert math.isclose(row["auto_vs_xla"], row["xla_ms"] / row["auto_ms"])
        assert row["auto_takes"] in ("cudnn", "xla")
        assert (row["cudnn_ms"] is None) == (not jaxdnn_available())
    if not jaxdnn_available():  # jaxdnn's XLA path: 'auto' ran XLA's lowering
        assert all(row["auto_takes"] == "xla" for row in rows)
    assert "| case | pass | dtype | layout | mode | timing | jaxdnn auto ms |" in markdown
    assert "'auto' slower than XLA by more than 5%" in markdown


def test_in_model_sides_compute_the_same(script):
    """jaxdnn's function and XLA's compute the same values (and gradients) for every
    kind of case, so the two columns time the same work."""
    in_model = script("in_model")
    import numpy as np
    for case in in_model.cases("small"):
        if case.dtype != "float32":
            continue
        jaxdnn_fn, xla_fn, args = in_model.build(case)
        for got, want in zip(jax.tree.leaves(jax.jit(jaxdnn_fn)(*args)),
                             jax.tree.leaves(jax.jit(xla_fn)(*args))):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4,
                                       atol=2e-5, err_msg=f"{case.label} {case.pass_}")


def jaxdnn_available() -> bool:
    import jaxdnn
    return jaxdnn.is_available()


def test_extension_counters_read_what_the_extension_counted(monkeypatch):
    from jaxdnn import _extension, bench

    class Extension:  # the two queries as the extension module answers them
        @staticmethod
        def graph_capture_stats():
            return {"warmups": 2, "replays": 5}

        @staticmethod
        def cudnn_handle_counts():
            return {0: (7, 3), 1: (2, 1)}

    class OlderExtension:  # a build from before the handle counts
        graph_capture_stats = Extension.graph_capture_stats

    monkeypatch.setattr(_extension, "extension", lambda: Extension)
    assert bench.extension_counters() == {"graph_capture": {"warmups": 2, "replays": 5},
                                          "cudnn_handles": {0: [7, 3], 1: [2, 1]}}
    monkeypatch.setattr(_extension, "extension", lambda: OlderExtension)
    assert bench.extension_counters()["cudnn_handles"] is None
    monkeypatch.setattr(_extension, "extension", lambda: None)
    assert bench.extension_counters() is None


def test_extension_counters_of_the_built_extension():
    from jaxdnn import _extension, bench
    if _extension.extension() is None:
        pytest.skip("no jaxdnn extension in this environment")
    counters = bench.extension_counters()
    assert set(counters["graph_capture"]) >= {"warmups", "replays", "failures"}
    for made, streams in counters["cudnn_handles"].values():
        assert made >= 1 and streams >= 0


def test_compare_in_program_takes_medians_of_alternating_runs(tmp_path, script):
    """benchmarks/compare_in_program.py: per row, the median of each build's runs, after /
    before for jaxdnn and for XLA, the spread of each build's runs; rows some run lacks
    are left out; the geometric means are over the rows compared."""
    compare = script("compare_in_program")

    def run(name, times):  # times: {(case, pass): (jaxdnn_ms, xla_ms)}
        directory = tmp_path / name
        directory.mkdir()
        rows = [{"case": case, "pass": pass_, "dtype": "float32", "layout": "NHWC",
                 "jaxdnn_ms": j, "xla_ms": x} for (case, pass_), (j, x) in times.items()]
        (directory / "in_program.json").write_text(
            json.dumps({"device": "card", "date": "today", "rows": rows}))
        return str(directory)

    before = [run("b1", {("a", "fwd"): (1.0, 2.0), ("b", "fwd"): (4.0, 4.0)}),
              run("b2", {("a", "fwd"): (3.0, 2.0), ("b", "fwd"): (4.0, 4.0)}),
              run("b3", {("a", "fwd"): (2.0, 2.0), ("b", "fwd"): (4.0, 4.0),
                         ("only here", "fwd"): (1.0, 1.0)})]
    after = [run("a1", {("a", "fwd"): (1.0, 2.2), ("b", "fwd"): (2.0, 4.0)}),
             run("a2", {("a", "fwd"): (1.0, 2.2), ("b", "fwd"): (6.0, 4.0)})]
    out, data = tmp_path / "ab.md", tmp_path / "ab.json"
    argv = ["--before", *before, "--after", *after, "--out", str(out), "--json", str(data)]
    assert compare.main(argv) == 0
    rows = json.loads(data.read_text())["rows"]
    assert [r["case"] for r in rows] == ["a", "b"]
    a, b = rows
    assert a["jaxdnn_before_ms"] == 2.0 and a["jaxdnn_after_ms"] == 1.0
    assert math.isclose(a["jaxdnn_ratio"], 0.5) and math.isclose(a["xla_ratio"], 1.1)
    assert math.isclose(a["jaxdnn_before_spread"], 1.0) and a["jaxdnn_after_spread"] == 0.0
    assert b["jaxdnn_after_ms"] == 4.0 and math.isclose(b["jaxdnn_after_spread"], 1.0)
    assert math.isclose(b["jaxdnn_ratio"], 1.0)
    text = out.read_text()
    assert "| a | fwd | float32 | NHWC | 2 | 1 | 0.500 | 100.0% / 0.0% | 1.100 |" in text
    assert f"jaxdnn {math.sqrt(0.5):.3f}, XLA {math.sqrt(1.1):.3f} (2 rows)" in text
    # no row timed in every run: a failure, not an empty table
    assert compare.main(["--before", before[0], "--after",
                         run("other", {("c", "fwd"): (1.0, 1.0)})]) == 1
