"""Shared pytest setup for the jaxdnn tests.

* float64 is enabled before any test runs (the references are float64, check_grads needs it);
* TF32 is disabled for the whole process (NVIDIA_TF32_OVERRIDE=0, set before jax loads),
  so float32 comparisons on the GPU are not blurred by tensor-core rounding;
* tests marked `gpu` need a CUDA device and the cuDNN path; elsewhere they are skipped
  with `jaxdnn.unavailable_reason()` as the reason;
* every test starts and ends with the same jaxdnn flags (an autouse fixture restores them).
"""
from __future__ import annotations

import contextlib
import os
import sys

os.environ["NVIDIA_TF32_OVERRIDE"] = "0"  # before jax is imported

# The helpers beside this file (references.py) import as top-level modules whatever
# pytest's import mode.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:
    import jaxdnn  # noqa: E402
except ImportError:  # not installed: test the source tree this file sits in
    sys.path.insert(0, os.path.dirname(_HERE))
    import jaxdnn  # noqa: E402

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# Relative tolerance of a comparison, in float64, of a result computed in `dtype` against
# the float64 reference (computed from the same, already-rounded, inputs).
_TOLERANCES = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-5, "float64": 1e-12}


def tolerance(dtype) -> float:
    """Relative tolerance for results computed in `dtype`."""
    return _TOLERANCES[jnp.dtype(dtype).name]


def to_f64(a) -> np.ndarray:
    """Any array (jax or numpy, bfloat16 included) as a float64 NumPy array."""
    return np.asarray(a).astype(np.float64)


def assert_close(actual, expected, dtype, *, factor: float = 1.0, err_msg: str = ""):
    """Compare in float64 with `dtype`'s tolerance: rtol = tol, atol = tol * max(1, |expected|)."""
    actual, expected = to_f64(actual), to_f64(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = tolerance(dtype) * factor
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=err_msg)


def cast(x, dtype):
    """(x as a jax array of `dtype`, the same rounded values as a float64 NumPy array)."""
    xj = jnp.asarray(np.asarray(x, dtype=np.float64), dtype=dtype)
    return xj, to_f64(xj)


@contextlib.contextmanager
def xla_path():
    """Run jaxdnn ops through the XLA reference path (`dnn.enabled=False`)."""
    with jaxdnn.config.override(**{"dnn.enabled": False}):
        yield


def run_xla(fn, *args, **kwargs):
    """fn(*args, **kwargs), traced under `dnn.enabled=False`. Pass a fresh function (not
    one jit has already traced): flags are read at trace time."""
    with xla_path():
        return fn(*args, **kwargs)


def jit_run(fn, *args, xla=False):
    """Trace a fresh jit of fn and run it: on the XLA path when `xla`, else with the flags in
    force (in `gpu` tests: cuDNN). Fresh, because flags are read at trace time."""
    jitted = jax.jit(lambda *a: fn(*a))
    if xla:
        with xla_path():
            return jitted(*args)
    return jitted(*args)


def run_default(fn, *args, **kwargs):
    """fn(*args, **kwargs) under the flags in force (in `gpu` tests: dnn.enabled=True)."""
    return fn(*args, **kwargs)


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
def gpu_device():
    """The first CUDA device (for gpu-marked tests)."""
    return jax.devices("cuda")[0]
