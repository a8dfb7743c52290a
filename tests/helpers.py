"""Helpers the jaxdnn tests share: float64 comparisons with per-dtype tolerances, running
an op on the XLA path, and the cuDNN path's RNN primitives on a CPU. (Fixtures live in
conftest.py; the float64 oracles in oracles/.)"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdnn
from jaxdnn import _extension
from jaxdnn import rnn as rnn_module

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


def fake_temp_space_sizes(*, batch_size, max_seq_length, training, **config):
    """Sizes as cuDNN might give them: the reserve grows with the batch, not by a multiple
    of any vmapped batch size (the folded reserve's padding is exercised)."""
    return 64 + batch_size, (7 * batch_size * max_seq_length + 5) if training else 0


def use_cudnn_path_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a GPU machine whose extension registers every handler: dnn.enabled=True takes
    the cuDNN path, whose primitives lower to their references on the CPU."""
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_extension, "has_targets", lambda *names: True)
    monkeypatch.setattr(rnn_module, "temp_space_sizes", fake_temp_space_sizes)
    jaxdnn.config.update("dnn.enabled", True)
