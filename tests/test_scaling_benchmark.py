"""benchmarks/scaling.py runs end to end on a CPU with 4 forced host devices at its small
size: a row per model, dtype, side (Flax, jaxdnn) and device count 1, 2 and 4, and
jaxdnn's data-parallel steps gather nothing (its ops run on their shard of the batch); its
HLO reader counts collectives and all-reduced bytes."""
import importlib
import json
import math
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "scaling.py")


@pytest.fixture
def scaling(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    return importlib.import_module("scaling")


def test_scaling_small_on_four_host_devices(tmp_path):
    out = tmp_path / "scaling.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    # One CNN dtype of the two keeps this near a minute on a 2-core CPU (every row compiles
    # a training step); bfloat16, flax_training's.
    argv = [sys.executable, SCRIPT, "--small", "--steps", "2", "--repeats", "1",
            "--dtypes", "bfloat16", "--json", str(out)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["info"]["device_count"] == 4 and data["info"]["device_kind"]
    keys = {(r["model"], r["dtype"], r["side"], r["devices"]) for r in rows}
    assert keys == {(model, dtype, side, k)
                    for model, dtype in (("cnn", "bfloat16"), ("lstm", "float32"))
                    for side in ("flax", "jaxdnn") for k in (1, 2, 4)}
    for r in rows:
        assert r["global_batch"] == r["batch_per_device"] * r["devices"]
        assert r["samples_per_s"] > 0 and math.isfinite(r["first_loss"]), r
        if r["devices"] == 1:
            assert r["scaling"] == pytest.approx(1.0)
            assert r["all_reduces"] == r["all_gathers"] == r["all_reduce_bytes"] == 0, r
        else:  # the gradients are summed over the devices
            assert r["all_reduces"] > 0 and r["all_reduce_bytes"] > 0, r
        if r["side"] == "jaxdnn" and r["devices"] > 1:
            assert r["all_gathers"] == 0, r  # no op gathered the sharded batch
    assert "| model | dtype | side | devices | samples/s |" in done.stdout
    assert "Device: cpu" in done.stdout and "jax " in done.stdout


def test_collectives_reads_sync_async_and_tuple_results(scaling):
    hlo = """
  %all-reduce.1 = f32[16,3,3,16]{3,2,1,0} all-reduce(f32[16,3,3,16]{3,2,1,0} %p), to_apply=%add
  %ars = (bf16[8]{0}, f32[]) all-reduce-start(bf16[8]{0} %a, f32[] %b), to_apply=%add
  %ard = (bf16[8]{0}, f32[]) all-reduce-done((bf16[8]{0}, f32[]) %ars)
  %ag = f32[8,4]{1,0} all-gather(f32[2,4]{1,0} %x), dimensions={0}
  %ags = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %y), dimensions={0}
  %agd = f32[8]{0} all-gather-done((f32[2]{0}, f32[8]{0}) %ags)
"""
    assert scaling.collectives(hlo) == {
        "all_gathers": 2, "all_reduces": 2, "all_reduce_bytes": 16 * 9 * 16 * 4 + 8 * 2 + 4}
    assert scaling.device_counts(4, None) == [1, 2, 4]
    assert scaling.device_counts(6, None) == [1, 2, 4, 6]
    assert scaling.device_counts(8, 2) == [1, 2]
