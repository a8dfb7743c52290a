"""Shared pytest setup for the jaxdnn tests.

* float64 is enabled before any test runs (the references are float64, check_grads needs it);
* TF32 is disabled for the whole process (NVIDIA_TF32_OVERRIDE=0, set before jax loads),
  so float32 comparisons on the GPU are not blurred by tensor-core rounding;
* tests marked `gpu` need a CUDA device and the cuDNN path; elsewhere they are skipped
  with `jaxdnn.unavailable_reason()` as the reason;
* every test starts and ends with the same jaxdnn flags (an autouse fixture restores them).
"""
from __future__ import annotations

import os
import sys

os.environ["NVIDIA_TF32_OVERRIDE"] = "0"  # before jax is imported

# The modules beside this file (helpers.py, oracles/) import as top-level modules whatever
# pytest's import mode.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:
    import jaxdnn  # noqa: E402
except ImportError:  # not installed: test the source tree this file sits in
    sys.path.insert(0, os.path.dirname(_HERE))
    import jaxdnn  # noqa: E402

from helpers import (assert_close, run_default, run_xla, tolerance,  # noqa: E402
                     use_cudnn_path_on_cpu, xla_path)


# ---------------------------------------------------------------------------------------
# pytest hooks
# ---------------------------------------------------------------------------------------
def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device and the jaxdnn cuDNN path (skipped elsewhere)")
    config.addinivalue_line("markers", "slow: a slow test")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or jaxdnn.is_available():
        return
    reason = jaxdnn.unavailable_reason() or "jaxdnn's cuDNN path is not available"
    skip = pytest.mark.skip(reason=f"cuDNN path unavailable: {reason}")
    for item in gpu_items:
        item.add_marker(skip)


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _restore_jaxdnn_flags(request):
    """Every test sees (and leaves behind) the flags the session started with; `gpu` tests
    run with dnn.enabled=True, so the cuDNN path is what they test even where 'auto' would
    pick XLA as the faster path."""
    saved = jaxdnn.config.values()
    if request.node.get_closest_marker("gpu") is not None:
        jaxdnn.config.update("dnn.enabled", True)
    yield
    for name, value in saved.items():
        jaxdnn.config.update(name, value)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def tol():
    """tol(dtype) -> relative tolerance for results computed in dtype."""
    return tolerance


@pytest.fixture(name="assert_close")
def _assert_close_fixture():
    return assert_close


@pytest.fixture(name="xla_path")
def _xla_path_fixture():
    """A context manager factory: `with xla_path(): ...` runs with dnn.enabled=False."""
    return xla_path


@pytest.fixture(name="run_xla")
def _run_xla_fixture():
    return run_xla


@pytest.fixture(name="run_default")
def _run_default_fixture():
    return run_default


@pytest.fixture(params=["default", "xla"])
def run_path(request):
    """Parametrizes a test over both paths: a runner `run_path(fn, *args, **kwargs)`."""
    return run_default if request.param == "default" else run_xla


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    """As on a GPU machine: dnn.enabled=True takes the cuDNN path, whose primitives lower
    to their references on the CPU (helpers.use_cudnn_path_on_cpu)."""
    use_cudnn_path_on_cpu(monkeypatch)


@pytest.fixture
def gpu_device():
    """The first CUDA device (for gpu-marked tests)."""
    return jax.devices("cuda")[0]
