"""Differential fuzzing: random valid configurations of every op family, each checked
against the float64 oracles in tests/oracles/, and random invalid ones, each of which must
raise ValueError/TypeError at trace time.

The configurations and their checks are drawn in tests/fuzz_cases.py (shared with
benchmarks/fuzz_run.py, which runs thousands in one go): a seeded generator, so a
failure names its seed and reproduces; the tolerance is derived from the dtype and the
size of the op's reduction (`fuzz_tolerance`).

Profiles: on the CPU (CI) jaxdnn's XLA path against the oracles, JAXDNN_FUZZ_CASES
configurations per op family (default 10, bounded time); gpu-marked, the cuDNN path
against the oracles and against the XLA path (scripts/gpu_check.sh sets
JAXDNN_FUZZ_CASES higher).
"""
from __future__ import annotations

import os

import jax
import pytest
from fuzz_cases import (compare, fuzz_tolerance, invalid_call_error, invalid_calls,
                        make_case, rng_for)

import jaxdnn

CASES = int(os.environ.get("JAXDNN_FUZZ_CASES", "10"))
SEEDS = range(CASES)


@pytest.fixture(params=["xla", pytest.param("cudnn", marks=pytest.mark.gpu)])
def path(request):
    """Which path runs jaxdnn: on 'cudnn' (gpu tests run with dnn.enabled=True) each result
    is also compared with the XLA path's."""
    if request.param == "xla":
        jaxdnn.config.update("dnn.enabled", False)
    return request.param


def run(path, fn, *args):
    """fn(*args) jitted on the path; on cuDNN also on XLA's, returned as a second result.
    XLA's float32 matmuls run at full precision there: on a GPU its default is TF32
    (whatever NVIDIA_TF32_OVERRIDE says), which the float32 tolerance does not cover."""
    out = jax.jit(fn)(*args)
    if path != "cudnn":
        return out, None
    with jaxdnn.config.override(**{"dnn.enabled": False}), \
            jax.default_matmul_precision("highest"):
        return out, jax.jit(lambda *a: fn(*a))(*args)


def fuzz(op, seed, path):
    case = make_case(op, seed)
    for p in case.passes:
        got, xla = run(path, p.fn, *p.args)
        compare(case, p, got)
        if xla is not None:
            compare(case, p, xla, " (XLA path)")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", ["conv", "pool", "softmax", "batch_norm",
                                    "spatial_transformer", "rnn"])
def test_fuzz(family, seed, path):
    fuzz(family, seed, path)


# Configurations the GPU fuzz run found (RELIABILITY.md), kept as regression cases:
# conv 1310/1323: the XLA path's image gradient aborted the process inside XLA's algebraic
# simplifier (jaxdnn/reference/conv.py, _interleave_zeros); batch_norm 491: a two-sample
# per-activation gradient that cancels to 1e-13 of its terms in float64 (the tolerance now
# scales with the terms, tests/fuzz_cases.py).
FOUND = [("conv", 1310), ("conv", 1323), ("batch_norm", 491)]


@pytest.mark.parametrize("family,seed", FOUND)
def test_fuzz_found_configurations(family, seed, path):
    fuzz(family, seed, path)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_invalid_configurations_raise_at_trace_time(seed):
    """Each call is traced only (jax.eval_shape): the error comes before any device work,
    and it is a ValueError or TypeError naming the op."""
    rng = rng_for("invalid", seed)
    for name, fn, args in invalid_calls(rng):
        assert invalid_call_error(fn, args) is None, (name, invalid_call_error(fn, args))


def test_fuzz_tolerance_grows_with_the_reduction_and_the_type():
    assert fuzz_tolerance("float32", 1) < fuzz_tolerance("float32", 10_000)
    assert fuzz_tolerance("float64", 100) < fuzz_tolerance("float32", 100) < \
        fuzz_tolerance("bfloat16", 100)
