"""examples/data_parallel.py runs (short) over 8 forced host devices and learns.

The example runs in a subprocess: XLA_FLAGS must be set before jax is imported, and this
pytest process has imported jax (with one CPU device) already.
"""
import os
import re
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "data_parallel.py")
STEPS = 25


@pytest.fixture(scope="module")
def run():
    """(return code, output) of one short run; the tests below share it."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")  # the forced devices are CPU devices, also on a GPU host
    proc = subprocess.run([sys.executable, EXAMPLE, "--steps", str(STEPS), "--seed", "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def final_losses(output):
    """{model: (first loss, final loss)} from the 'final loss NAME: X (first Y)' lines."""
    found = re.findall(r"final loss (\w+): ([\d.]+) \(first ([\d.]+)\)", output)
    return {name: (float(first), float(last)) for name, last, first in found}


def test_data_parallel_example_learns_on_8_devices(run):
    returncode, output = run
    assert returncode == 0, output
    assert "devices: 8" in output, output
    assert "global batch 128 = 16 per device x 8" in output, output
    assert f"\n{STEPS:5d} " in output, output  # a loss line per step
    losses = final_losses(output)
    assert set(losses) == {"cnn", "cnn_shard_map", "gru"}, output
    for name, (first, last) in losses.items():
        # 4-way classification starts near log 4 = 1.39, the regression near 0.8
        assert last < 0.7 * first, (name, first, last)


def test_shard_map_batch_norm_loss_equals_jit(run):
    """Same parameters, same batch: BatchNorm(axis_name='data') under shard_map gives the
    global-batch loss that the partitioned BatchNorm gives under jit."""
    returncode, output = run
    assert returncode == 0, output
    step1 = re.search(r"^\s+1\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", output, re.MULTILINE)
    assert step1, output
    assert abs(float(step1.group(1)) - float(step1.group(2))) < 1e-3, step1.group(0)


def test_shard_map_training_matches_jit_over_the_first_steps(run):
    """The same training under shard_map and under jit, step by step, until float32
    rounding (different summation orders), amplified by training at lr=1.0, could part
    them."""
    returncode, output = run
    assert returncode == 0, output
    gap = re.search(r"losses differ by at most ([\d.e+-]+)", output)
    assert gap, output
    assert float(gap.group(1)) < 1e-3, gap.group(0)
