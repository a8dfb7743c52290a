"""dnn_batch_normalization_train / _test against independent NumPy float64 loop references
(tests/oracles/batchnorm.py), on CPU through the XLA path and, in the `gpu`-marked tests, through
cuDNN against the XLA path and the references."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from oracles import batchnorm as ref
import jaxdnn
from helpers import FLOAT_DTYPES, assert_close, cast, to_f64, xla_path
from helpers import jit_run as _jit_run
from jaxdnn import _extension
from jaxdnn.batchnorm import (FFI_TARGETS, bn_bwd_p, bn_fwd_infer_p, bn_fwd_train_p,
                              dnn_batch_normalization_test, dnn_batch_normalization_train)

EPS = 1e-4
# name -> (inputs' shape, mode, data_format): every rank 2..5, both layouts in spatial mode
# (per-activation normalizes over N alone, so its layout does not matter).
CASES = {
    "pa-2d": ((5, 3), "per-activation", "NCHW"),
    "pa-3d": ((4, 3, 2), "per-activation", "NCW"),
    "pa-4d": ((4, 2, 3, 2), "per-activation", "NCHW"),
    "pa-4d-nhwc": ((4, 3, 2, 2), "per-activation", "NHWC"),
    "pa-5d": ((3, 2, 2, 2, 2), "per-activation", "NCDHW"),
    "sp-2d": ((6, 3), "spatial", "NCHW"),
    "sp-3d-ncw": ((3, 4, 5), "spatial", "NCW"),
    "sp-3d-nwc": ((3, 5, 4), "spatial", "NWC"),
    "sp-4d-nchw": ((2, 3, 4, 5), "spatial", "NCHW"),
    "sp-4d-nhwc": ((2, 4, 5, 3), "spatial", "NHWC"),
    "sp-5d-ncdhw": ((2, 3, 2, 3, 2), "spatial", "NCDHW"),
    "sp-5d-ndhwc": ((2, 2, 3, 2, 3), "spatial", "NDHWC"),
}
cases = pytest.mark.parametrize("case", list(CASES))
dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES)
# A few cases for the costlier checks: both modes, 2-D, both spatial layouts, 5-D.
FEW = ["pa-2d", "pa-5d", "sp-4d-nchw", "sp-4d-nhwc", "sp-3d-nwc"]
few_cases = pytest.mark.parametrize("case", FEW)


def _spec(case):
    return CASES[case] if case in CASES else GPU_CASES[case]


def _data(rng, case, dtype="float64", stacked=None):
    """(jax arrays, float64 NumPy copies) of inputs, gamma, beta, running mean, running var;
    `stacked`: {argument index: (size, axis)} adds a vmapped axis."""
    shape, mode, fmt = _spec(case)
    pshape = ref.param_shape(shape, mode, fmt)
    stacked = stacked or {}

    def make(i, base, fn):
        if i in stacked:
            size, axis = stacked[i]
            base = list(base)
            base.insert(axis, size)
        return cast(fn(tuple(base)), dtype)

    gens = [lambda s: rng.standard_normal(s) * 2.0 + 0.5,
            lambda s: rng.uniform(0.5, 1.5, s) * rng.choice([-1, 1], s),
            lambda s: rng.standard_normal(s),
            lambda s: rng.standard_normal(s) * 0.1,
            lambda s: rng.uniform(0.5, 2.0, s)]
    pairs = [make(i, shape if i == 0 else pshape, g) for i, g in enumerate(gens)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _train(case, **kwargs):
    _, mode, fmt = _spec(case)
    return functools.partial(dnn_batch_normalization_train, mode=mode, data_format=fmt, **kwargs)


def _test(case, **kwargs):
    _, mode, fmt = _spec(case)
    return functools.partial(dnn_batch_normalization_test, mode=mode, data_format=fmt, **kwargs)


# =======================================================================================
# The oracle itself
# =======================================================================================
@cases
def test_reference_matches_theano_formula(rng, case):
    """The loop reference against the vectorized formula of Theano's documentation."""
    shape, mode, fmt = CASES[case]
    _, (x, g, b, rm, rv) = _data(rng, case)
    axes = ref.normalized_axes(len(shape), mode, fmt)
    mean, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
    invstd = 1 / np.sqrt(var + EPS)
    out, mean_r, invstd_r, var_r = ref.bn_train(x, g, b, mode, EPS, fmt)
    np.testing.assert_allclose(out, (x - mean) * g * invstd + b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mean_r, mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var_r, var, rtol=1e-12)
    np.testing.assert_allclose(invstd_r, invstd, rtol=1e-12)
    m = x.size // mean.size
    assert ref.count(shape, mode, fmt) == m
    new_mean, new_var = ref.running_averages(rm, rv, mean, var, m, 0.3)
    np.testing.assert_allclose(new_mean, rm * 0.7 + 0.3 * mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(new_var, rv * 0.7 + 0.3 * x.var(axes, ddof=1, keepdims=True),
                               rtol=1e-12)
    np.testing.assert_allclose(ref.bn_test(x, g, b, rm, rv, mode, EPS, fmt),
                               (x - rm) * g / np.sqrt(rv + EPS) + b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["pa-3d", "sp-4d-nhwc"])
def test_reference_gradients_vs_finite_differences(rng, case):
    _, (x, g, b, rm, rv) = _data(rng, case)
    _, mode, fmt = CASES[case]
    dout = rng.standard_normal(x.shape)
    dmean, dinvstd = rng.standard_normal(g.shape), rng.standard_normal(g.shape)

    def loss(x, g, b):
        out, mean, invstd, _ = ref.bn_train(x, g, b, mode, EPS, fmt)
        return np.sum(out * dout) + np.sum(mean * dmean) + np.sum(invstd * dinvstd)

    grads = ref.bn_train_grad(x, g, dout, mode, EPS, fmt, dmean=dmean, dinvstd=dinvstd)
    args = [x, g, b]
    for k in range(3):
        v = rng.standard_normal(args[k].shape)
        h = 1e-6
        plus = [a + h * v if j == k else a for j, a in enumerate(args)]
        minus = [a - h * v if j == k else a for j, a in enumerate(args)]
        fd = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(np.sum(grads[k] * v), fd, rtol=1e-6)
    # the test-mode gradient
    test_grads = ref.bn_test_grad(x, g, rm, rv, dout, mode, EPS, fmt)
    args = [x, g, b, rm, rv]
    for k in range(5):
        v = rng.standard_normal(args[k].shape)
        h = 1e-6
        f = lambda *a: np.sum(ref.bn_test(*a, mode, EPS, fmt) * dout)
        plus = [a + h * v if j == k else a for j, a in enumerate(args)]
        minus = [a - h * v if j == k else a for j, a in enumerate(args)]
        np.testing.assert_allclose(np.sum(test_grads[k] * v),
                                   (f(*plus) - f(*minus)) / (2 * h), rtol=1e-6)


# =======================================================================================
# Forward
#
# XLA's CPU compiler costs ~0.1 s per fusion here, so every check below is one jit and the
# dtype x case grid is covered without its full product: float32 runs every case (both
# modes, ranks 2..5, both spatial layouts), float64, float16 and bfloat16 four cases each,
# together covering every case a second time.
# =======================================================================================
FORWARD = [("float32", c) for c in CASES] + [
    ("float64", c) for c in ("pa-2d", "pa-5d", "sp-3d-ncw", "sp-4d-nhwc")] + [
    ("float16", c) for c in ("pa-3d", "pa-4d", "sp-4d-nchw", "sp-5d-ndhwc")] + [
    ("bfloat16", c) for c in ("pa-4d-nhwc", "sp-2d", "sp-3d-nwc", "sp-5d-ncdhw")]


@pytest.mark.parametrize("dtype,case", FORWARD)
def test_forward_train_running_averages_and_test(rng, dtype, case):
    shape, mode, fmt = CASES[case]
    (xj, gj, bj, rmj, rvj), (x, g, b, rm, rv) = _data(rng, case, dtype)

    @jax.jit
    def run(x, g, b, rm, rv):
        train = _train(case, epsilon=EPS, running_average_factor=0.25)(
            x, g, b, running_mean=rm, running_var=rv)
        return train, _test(case, epsilon=1e-3)(x, g, b, rm, rv)

    (out, mean, invstd, new_rm, new_rv), test_out = run(xj, gj, bj, rmj, rvj)
    for o in (out, test_out):
        assert o.shape == shape and o.dtype == jnp.dtype(dtype)
    for s in (mean, invstd, new_rm, new_rv):
        assert s.shape == g.shape and s.dtype == jnp.dtype(dtype)
    out_r, mean_r, invstd_r, var_r = ref.bn_train(x, g, b, mode, EPS, fmt)
    assert_close(out, out_r, dtype, err_msg="out")
    assert_close(mean, mean_r, dtype, err_msg="mean")
    assert_close(invstd, invstd_r, dtype, err_msg="invstd")
    rm_r, rv_r = ref.running_averages(rm, rv, mean_r, var_r, ref.count(shape, mode, fmt), 0.25)
    assert_close(new_rm, rm_r, dtype, err_msg="running mean")
    assert_close(new_rv, rv_r, dtype, err_msg="running var")
    assert_close(test_out, ref.bn_test(x, g, b, rm, rv, mode, 1e-3, fmt), dtype,
                 err_msg="test mode")


def test_defaults_and_eager_calls(rng):
    """Defaults: mode 'per-activation', epsilon 1e-4, running_average_factor 0.1; without
    running averages, three outputs. Run eagerly (no jit)."""
    (xj, gj, bj, rmj, rvj), (x, g, b, rm, rv) = _data(rng, "pa-4d")
    result = dnn_batch_normalization_train(xj, gj, bj)
    assert isinstance(result, tuple) and len(result) == 3
    out, mean, invstd, new_rm, new_rv = dnn_batch_normalization_train(
        xj, gj, bj, running_mean=rmj, running_var=rvj)
    out_r, mean_r, invstd_r, var_r = ref.bn_train(x, g, b, "per-activation", 1e-4)
    rm_r, rv_r = ref.running_averages(rm, rv, mean_r, var_r, x.shape[0], 0.1)
    for a, e in zip(result + (new_rm, new_rv), (out_r, mean_r, invstd_r, rm_r, rv_r)):
        np.testing.assert_allclose(to_f64(a), e, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_f64(dnn_batch_normalization_test(xj, gj, bj, rmj, rvj)),
                               ref.bn_test(x, g, b, rm, rv, "per-activation", 1e-4),
                               rtol=1e-12, atol=1e-12)


def test_peractivation_spelling_layouts_and_2d_spatial(rng):
    """'peractivation' is 'per-activation'; per-activation ignores the layout; on (N, C)
    spatial mode is per-activation whatever the data_format."""
    (xj, gj, bj, _, _), _ = _data(rng, "pa-4d")
    (x2, g2, b2, _, _), _ = _data(rng, "sp-2d")

    @jax.jit
    def run(xj, gj, bj, x2, g2, b2):
        four = [dnn_batch_normalization_train(xj, gj, bj, mode=m, data_format=f)
                for m, f in [("per-activation", "NCHW"), ("peractivation", "NCHW"),
                             ("per-activation", "NHWC"), ("peractivation", "bc01"),
                             ("per-activation", "channels_last")]]
        two = [dnn_batch_normalization_train(x2, g2, b2, mode=m, data_format=f)
               for m, f in [("per-activation", "NCHW"), ("spatial", "NCHW"),
                            ("spatial", "NHWC"), ("spatial", "NC"),
                            ("spatial", "channels_last")]]
        return four, two

    for results in run(xj, gj, bj, x2, g2, b2):
        for got in results[1:]:
            for a, e in zip(got, results[0]):
                np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_with_float32_parameters_keep_float32_statistics(rng, dtype):
    """Half-precision inputs are normalized in float32: with float32 gamma, mean and invstd
    come back in float32 at float32 accuracy (of the rounded inputs)."""
    (xj, _, _, _, _), (x, _, _, _, _) = _data(rng, "sp-4d-nhwc", dtype)
    (_, gj, bj, rmj, rvj), (_, g, b, rm, rv) = _data(rng, "sp-4d-nhwc", "float32")
    out, mean, invstd, new_rm, new_rv = jax.jit(_train("sp-4d-nhwc"))(
        xj, gj, bj, running_mean=rmj, running_var=rvj)
    assert out.dtype == jnp.dtype(dtype)
    assert mean.dtype == invstd.dtype == new_rm.dtype == new_rv.dtype == jnp.float32
    out_r, mean_r, invstd_r, var_r = ref.bn_train(x, g, b, "spatial", EPS, "NHWC")
    assert_close(out, out_r, dtype)
    assert_close(mean, mean_r, "float32", factor=10)
    assert_close(invstd, invstd_r, "float32", factor=10)
    rm_r, rv_r = ref.running_averages(rm, rv, mean_r, var_r, 2 * 4 * 5, 0.1)
    assert_close(new_rv, rv_r, "float32", factor=10)


def test_running_average_factor_extremes_and_traced(rng):
    """Factors 0 and 1 are allowed; a traced factor (a schedule) works."""
    (xj, gj, bj, rmj, rvj), (x, g, b, rm, rv) = _data(rng, "sp-3d-ncw")
    _, mean_r, _, var_r = ref.bn_train(x, g, b, "spatial", EPS)
    m = ref.count(x.shape, "spatial")
    run = jax.jit(lambda f: dnn_batch_normalization_train(
        xj, gj, bj, "spatial", running_average_factor=f, running_mean=rmj, running_var=rvj)[3:])
    static = jax.jit(lambda: [dnn_batch_normalization_train(
        xj, gj, bj, "spatial", running_average_factor=f, running_mean=rmj, running_var=rvj)[3:]
        for f in (0.0, 1.0, 0.6)])()
    for factor, (s_rm, s_rv) in zip((0.0, 1.0, 0.6), static):
        rm_r, rv_r = ref.running_averages(rm, rv, mean_r, var_r, m, factor)
        for new_rm, new_rv in (run(factor), (s_rm, s_rv)):
            np.testing.assert_allclose(to_f64(new_rm), rm_r, rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(to_f64(new_rv), rv_r, rtol=1e-12, atol=1e-13)


def test_tiny_variance_running_var(rng):
    """The running variance is recovered from invstd (1/invstd**2 - epsilon): accurate to
    float32 even where the variance is far below epsilon."""
    x = rng.standard_normal((8, 3)) * 1e-3 + 5.0
    xj, x64 = cast(x, "float32")
    ones = jnp.ones((1, 3), jnp.float32)
    zeros = jnp.zeros((1, 3), jnp.float32)
    new_rv = jax.jit(lambda t: dnn_batch_normalization_train(
        t, ones, zeros, running_average_factor=1.0, running_mean=zeros, running_var=zeros)[4])(xj)
    np.testing.assert_allclose(to_f64(new_rv)[0], x64.var(0, ddof=1), rtol=1e-3, atol=1e-9)


# =======================================================================================
# Gradients
# =======================================================================================
def _cotangents(rng, case, dtype, stats=True):
    shape, mode, fmt = _spec(case)
    pshape = ref.param_shape(shape, mode, fmt)
    dout = cast(rng.standard_normal(shape), dtype)
    dmean = cast(rng.standard_normal(pshape) if stats else np.zeros(pshape), dtype)
    dinvstd = cast(rng.standard_normal(pshape) if stats else np.zeros(pshape), dtype)
    return dout, dmean, dinvstd


GRADIENTS = [("float64", c) for c in CASES] + [
    ("float32", c) for c in ("pa-3d", "pa-4d-nhwc", "sp-2d", "sp-5d-ndhwc")] + [
    ("float16", c) for c in ("pa-5d", "sp-4d-nhwc")] + [
    ("bfloat16", c) for c in ("pa-2d", "sp-3d-nwc")]


@pytest.mark.parametrize("dtype,case", GRADIENTS)
def test_gradients_from_all_three_outputs(rng, dtype, case):
    """The VJP with cotangents on out, mean and invstd, against the NumPy chain rule."""
    _, mode, fmt = CASES[case]
    (xj, gj, bj, _, _), (x, g, b, _, _) = _data(rng, case, dtype)
    (doj, do), (dmj, dm), (dij, di) = _cotangents(rng, case, dtype)

    @jax.jit
    def vjp(x, g, b, cts):
        return jax.vjp(_train(case, epsilon=EPS), x, g, b)[1](cts)

    dx, dg, db = vjp(xj, gj, bj, (doj, dmj, dij))
    for a, s in ((dx, xj), (dg, gj), (db, bj)):
        assert a.shape == s.shape and a.dtype == s.dtype
    dx_r, dg_r, db_r = ref.bn_train_grad(x, g, do, mode, EPS, fmt, dmean=dm, dinvstd=di)
    factor = 2 if jnp.dtype(dtype).itemsize < 4 else 1
    assert_close(dx, dx_r, dtype, factor=factor, err_msg="d inputs")
    assert_close(dg, dg_r, dtype, factor=factor, err_msg="d gamma")
    assert_close(db, db_r, dtype, factor=factor, err_msg="d beta")


@pytest.mark.parametrize("case", ["pa-4d", "sp-4d-nhwc"])
def test_gradients_from_each_output_alone(rng, case):
    """Each output's cotangent alone (the others are symbolic zeros, which skip work)."""
    _, mode, fmt = CASES[case]
    (xj, gj, bj, _, _), (x, g, b, _, _) = _data(rng, case)
    (doj, do), (dmj, dm), (dij, di) = _cotangents(rng, case, "float64")
    f = _train(case)

    @jax.jit
    def grads(x, g, b):
        return [jax.grad(lambda *a: jnp.sum(f(*a)[k] * ct), argnums=(0, 1, 2))(x, g, b)
                for k, ct in enumerate((doj, dmj, dij))]

    zeros = np.zeros(x.shape)
    expected = [ref.bn_train_grad(x, g, do, mode, EPS, fmt),
                ref.bn_train_grad(x, g, zeros, mode, EPS, fmt, dmean=dm),
                ref.bn_train_grad(x, g, zeros, mode, EPS, fmt, dinvstd=di)]
    for got, exp in zip(grads(xj, gj, bj), expected):
        for a, e in zip(got, exp):
            np.testing.assert_allclose(to_f64(a), e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["pa-2d", "pa-5d", "sp-3d-nwc", "sp-4d-nchw", "sp-5d-ndhwc"])
def test_check_grads_float64(rng, case):
    """check_grads (order 1, reverse) of all five outputs, the running averages included
    (the batch variance reaches them through invstd), in all five arguments."""
    (xj, gj, bj, rmj, rvj), _ = _data(rng, case)
    f = jax.jit(lambda x, g, b, a, v: _train(case, epsilon=1e-3)(x, g, b, running_mean=a,
                                                                 running_var=v))
    check_grads(f, (xj, gj, bj, rmj, rvj), order=1, modes=["rev"])


def test_check_grads_second_order(rng):
    """grad of grad: bn_bwd is differentiable again, through the reference."""
    (xj, gj, bj, _, _), _ = _data(rng, "sp-4d-nhwc")
    check_grads(jax.jit(_train("sp-4d-nhwc")), (xj, gj, bj), order=2, modes=["rev"])


@pytest.mark.parametrize("case", ["pa-3d", "pa-4d-nhwc", "sp-2d", "sp-4d-nchw", "sp-5d-ndhwc"])
def test_test_mode_gradients(rng, case):
    _, mode, fmt = CASES[case]
    (xj, gj, bj, mj, vj), (x, g, b, m, v) = _data(rng, case)
    dout = rng.standard_normal(x.shape)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(_test(case)(*a) * dout), argnums=range(5)))(
        xj, gj, bj, mj, vj)
    dx, dg, db, dm, dv = ref.bn_test_grad(x, g, m, v, dout, mode, EPS, fmt)
    for a, e in zip(grads, (dx, dg, db, dm, dv)):
        np.testing.assert_allclose(to_f64(a), e, rtol=1e-10, atol=1e-12)
    if case == "sp-4d-nchw":
        check_grads(jax.jit(_test(case)), (xj, gj, bj, mj, vj), order=1, modes=["rev"])


# =======================================================================================
# Forward mode: jvp, jacfwd, hessian (JVP rules on the primitives)
# =======================================================================================
def _train_all(case, epsilon=EPS):
    """Training with running averages: all five outputs, as a function of all five inputs."""
    f = _train(case, epsilon=epsilon)
    return lambda x, g, b, a, v: f(x, g, b, running_mean=a, running_var=v)


def _central_difference(fn, args, tangents, eps=1e-6):
    plus = fn(*[a + eps * t for a, t in zip(args, tangents)])
    minus = fn(*[a - eps * t for a, t in zip(args, tangents)])
    return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]


@pytest.mark.parametrize("case", ["pa-2d", "pa-4d-nhwc", "sp-3d-nwc", "sp-4d-nchw"])
def test_forward_mode_check_grads_to_second_order(rng, case):
    """check_grads in both modes to second order, training (every output, running averages
    included) and inference, each in all five arguments."""
    (xj, gj, bj, rmj, rvj), _ = _data(rng, case)
    check_grads(jax.jit(_train_all(case, 1e-3)), (xj, gj, bj, rmj, rvj), order=2,
                modes=["fwd", "rev"])
    check_grads(jax.jit(_test(case)), (xj, gj, bj, rmj, rvj), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("case", ["pa-4d", "sp-4d-nhwc", "sp-5d-ndhwc"])
def test_jvp_vs_central_differences_of_the_oracle(rng, case):
    """The tangents of every output against central differences of the NumPy oracle."""
    shape, mode, fmt = CASES[case]
    args, args64 = _data(rng, case)
    tangents = [rng.standard_normal(a.shape) for a in args64]
    m = ref.count(shape, mode, fmt)

    def oracle_train(x, g, b, rm, rv):
        out, mean, invstd, var = ref.bn_train(x, g, b, mode, EPS, fmt)
        return (out, mean, invstd) + ref.running_averages(rm, rv, mean, var, m, 0.1)

    def oracle_test(x, g, b, mean, var):
        return [ref.bn_test(x, g, b, mean, var, mode, EPS, fmt)]

    for f, oracle in ((_train_all(case), oracle_train),
                      (lambda *a: [_test(case)(*a)], oracle_test)):
        primal, tangent = jax.jit(lambda a, t: jax.jvp(f, a, t))(
            tuple(args), tuple(jnp.asarray(t) for t in tangents))
        for got, want in zip(primal, oracle(*args64)):
            np.testing.assert_allclose(to_f64(got), want, rtol=1e-10, atol=1e-12)
        for got, want in zip(tangent, _central_difference(oracle, args64, tangents)):
            np.testing.assert_allclose(to_f64(got), want, rtol=1e-6, atol=1e-7)


def test_jacfwd_linearize_and_hessian(rng):
    """jacfwd equals jacrev; jax.linearize's linear function equals jvp; jax.hessian
    (forward over reverse) equals reverse over reverse."""
    case = "sp-4d-nchw"
    (xj, gj, bj, _, _), _ = _data(rng, case)
    w = jnp.asarray(rng.standard_normal(xj.shape))
    f = lambda x, g: _train(case)(x, g, bj)
    for argnums in (0, 1, (0, 1)):
        fwd = jax.jit(jax.jacfwd(f, argnums=argnums))(xj, gj)
        rev = jax.jit(jax.jacrev(f, argnums=argnums))(xj, gj)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
                     fwd, rev)
    t = jnp.asarray(rng.standard_normal(xj.shape))
    _, linear = jax.linearize(f, xj, gj)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
                 linear(t, gj), jax.jvp(f, (xj, gj), (t, gj))[1])
    loss = lambda x: jnp.sum(jnp.sin(_train(case)(x, gj, bj)[0]) * w)
    np.testing.assert_allclose(jax.jit(jax.hessian(loss))(xj),
                               jax.jit(jax.jacrev(jax.grad(loss)))(xj), rtol=1e-9, atol=1e-11)


def test_reverse_mode_runs_the_batch_norm_backward_pass(rng):
    """The gradient transposes the training forward's tangent into bn_bwd (cuDNN's backward
    on the cuDNN path); the XLA tangent primitive stays out of it. The forward mode's
    program holds the forward primitive, whose result is the primal, and the tangent."""
    (xj, gj, bj, _, _), _ = _data(rng, "sp-4d-nhwc")
    f = _train("sp-4d-nhwc")
    grad = str(jax.make_jaxpr(jax.grad(lambda x, g: jnp.sum(jnp.sin(f(x, g, bj)[0])),
                                       argnums=(0, 1)))(xj, gj))
    assert grad.count("jaxdnn_bn_bwd[") == 1 and "jaxdnn_bn_tangent" not in grad, grad
    jvp = str(jax.make_jaxpr(lambda x, t: jax.jvp(lambda a: f(a, gj, bj), (x,), (t,)))(xj, xj))
    assert "jaxdnn_bn_fwd_train[" in jvp and "jaxdnn_bn_tangent[" in jvp, jvp
    assert "jaxdnn_bn_bwd" not in jvp


def test_jvp_of_vmap_and_vmap_of_jvp(rng):
    """Forward mode through the batching rules: vmap of jvp (the tangent primitive folded
    into the channels) and jvp of vmap equal a loop of jvps."""
    case = "sp-4d-nchw"
    (xj, gj, bj, _, _), _ = _data(rng, case, stacked={0: (3, 0)})
    ts = jnp.asarray(rng.standard_normal(xj.shape))
    jvp = lambda x, t: jax.jvp(lambda a: _train(case)(a, gj, bj), (x,), (t,))
    want = _loop(jvp, (xj, ts), (0, 0), 3)
    for got in (jax.jit(jax.vmap(jvp))(xj, ts),
                jax.jit(lambda x, t: jax.jvp(jax.vmap(lambda a: _train(case)(a, gj, bj)), (x,),
                                             (t,)))(xj, ts)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
                     got, want)


def test_jvp_with_axis_name_under_shard_map(rng):
    """axis_name (statistics across devices: XLA's moments and the inference primitive):
    forward mode too, equal on one device to the batch norm without it."""
    case = "sp-4d-nhwc"
    (xj, gj, bj, _, _), _ = _data(rng, case)
    t = jnp.asarray(rng.standard_normal(xj.shape))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    P = jax.sharding.PartitionSpec
    outs = (P("d"), P(), P())
    across = jax.shard_map(lambda x, t: jax.jvp(lambda a: _train(case, axis_name="d")(a, gj, bj),
                                                (x,), (t,)),
                           mesh=mesh, in_specs=(P("d"), P("d")), out_specs=(outs, outs))
    got = jax.jit(across)(xj, t)
    want = jax.jit(lambda x, t: jax.jvp(lambda a: _train(case)(a, gj, bj), (x,), (t,)))(xj, t)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
                 got, want)


# =======================================================================================
# jit, vmap, checkpoint, scan
# =======================================================================================
def test_jit_with_static_arguments(rng):
    (xj, gj, bj, rmj, rvj), (x, g, b, rm, rv) = _data(rng, "sp-5d-ndhwc")
    f = jax.jit(dnn_batch_normalization_train,
                static_argnames=("mode", "epsilon", "data_format"))
    out = f(xj, gj, bj, mode="spatial", epsilon=1e-3, running_average_factor=0.5,
            running_mean=rmj, running_var=rvj, data_format="NDHWC")
    out_r, mean_r, invstd_r, var_r = ref.bn_train(x, g, b, "spatial", 1e-3, "NDHWC")
    rm_r, rv_r = ref.running_averages(rm, rv, mean_r, var_r, 2 * 2 * 3 * 2, 0.5)
    for a, e in zip(out, (out_r, mean_r, invstd_r, rm_r, rv_r)):
        np.testing.assert_allclose(to_f64(a), e, rtol=1e-12, atol=1e-12)


def _loop(fn, args, in_axes, size):
    """fn on each instance in turn (one jit, `size` calls), stacked."""
    fn = jax.jit(fn)
    outs = [fn(*[a if ax is None else jnp.take(a, i, axis=ax) for a, ax in zip(args, in_axes)])
            for i in range(size)]
    return jax.tree.map(lambda *o: jnp.stack(o), *outs)


def _find_eqns(jaxpr, prim):
    """Every equation of `prim` in `jaxpr` and the jaxprs nested in its equations."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is prim:
            found.append(eqn)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found.extend(_find_eqns(inner, prim))
    return found


# (in_axes of inputs, gamma, beta, running_mean, running_var), case
VMAP_TRAIN = [
    ((0, None, None, None, None), "sp-4d-nchw"),   # inputs only
    ((2, None, None, None, None), "sp-3d-nwc"),    # inputs only, a middle axis
    ((0, 0, 0, 0, 0), "pa-5d"),                    # everything
    ((1, 0, 0, None, None), "sp-4d-nhwc"),         # inputs, gamma and beta
    ((None, 0, 0, None, 1), "pa-2d"),              # parameters only
]


@pytest.mark.parametrize("in_axes,case", VMAP_TRAIN)
def test_vmap_train_equals_loop(rng, in_axes, case):
    """Statistics belong to each vmapped instance: vmap equals a Python loop, and the
    batching rule folds the vmapped axis into the channels/features in one primitive call
    (never into N, never a loop)."""
    shape, mode, fmt = CASES[case]
    b = 3
    stacked = {i: (b, ax) for i, ax in enumerate(in_axes) if ax is not None}
    args, _ = _data(rng, case, stacked=stacked)
    f = lambda x, g, bt, a, v: _train(case)(x, g, bt, running_average_factor=0.3,
                                            running_mean=a, running_var=v)
    vf = jax.vmap(f, in_axes=in_axes)
    got = jax.jit(vf)(*args)
    expected = _loop(f, args, in_axes, b)
    assert len(got) == 5
    for a, e in zip(got, expected):
        assert a.shape == e.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-12, atol=1e-12)
    eqns = _find_eqns(jax.make_jaxpr(vf)(*args).jaxpr, bn_fwd_train_p)
    assert len(eqns) == 1, "one primitive call for all instances"
    x_in, mean_out = eqns[0].invars[0].aval.shape, eqns[0].outvars[1].aval.shape
    assert len(x_in) == max(len(shape), 4) and x_in[0] == shape[0], "the vmapped axis joined N"
    assert np.prod(mean_out) == b * np.prod(ref.param_shape(shape, mode, fmt))


@pytest.mark.parametrize("in_axes,case", [((0, None, None, None, None), "sp-5d-ncdhw"),
                                          ((2, 0, 0, 0, 0), "pa-3d"),
                                          ((None, 0, None, None, 0), "sp-4d-nhwc")])
def test_vmap_test_equals_loop(rng, in_axes, case):
    """With only the inputs vmapped they join N (the statistics are given); otherwise the
    vmapped axis joins the features as in training."""
    b = 3
    stacked = {i: (b, ax) for i, ax in enumerate(in_axes) if ax is not None}
    args, _ = _data(rng, case, stacked=stacked)
    f = _test(case)
    got = jax.jit(jax.vmap(f, in_axes=in_axes))(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_loop(f, args, in_axes, b)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_axes,case", [((0, None, None, 0), "sp-4d-nchw"),
                                          ((0, 0, 0, 0), "pa-2d"),
                                          ((2, None, 0, 1), "sp-3d-nwc")])
def test_vmap_of_grad_equals_loop(rng, in_axes, case):
    shape, mode, fmt = CASES[case]
    b = 3
    stacked = {i: (b, ax) for i, ax in enumerate(in_axes[:3]) if ax is not None}
    (xj, gj, bj, _, _), _ = _data(rng, case, stacked=stacked)
    w_shape = list(shape)
    if in_axes[3] is not None:
        w_shape.insert(in_axes[3], b)
    w = jnp.asarray(rng.standard_normal(w_shape))

    def loss(x, g, bt, w):
        out, mean, invstd = _train(case)(x, g, bt)
        return jnp.sum(out * w) + jnp.sum(mean * jnp.sum(w)) + jnp.sum(jnp.cos(invstd))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    got = jax.jit(jax.vmap(grad, in_axes=in_axes))(xj, gj, bj, w)
    expected = _loop(grad, (xj, gj, bj, w), in_axes, b)
    for a, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-10, atol=1e-12)
    # and against the NumPy reference for the first instance
    take = lambda a, ax: np.asarray(a) if ax is None else np.take(np.asarray(a), 0, axis=ax)
    x0, g0, w0 = take(xj, in_axes[0]), take(gj, in_axes[1]), take(w, in_axes[3])
    _, _, invstd0, _ = ref.bn_train(x0, g0, take(bj, in_axes[2]), mode, EPS, fmt)
    expected0 = ref.bn_train_grad(x0, g0, w0, mode, EPS, fmt,
                                  dmean=np.full(g0.shape, w0.sum()), dinvstd=-np.sin(invstd0))
    for a, e in zip(got, expected0):
        np.testing.assert_allclose(to_f64(a[0]), e, rtol=1e-10, atol=1e-12)


def test_grad_of_vmap_and_nested_vmap(rng):
    case = "sp-4d-nchw"
    (xs, gj, bj, _, _), (x64, g, bt, _, _) = _data(rng, case, stacked={0: (2, 0)})
    xs2 = jnp.stack([xs, xs[::-1] * 2.0])  # (2, 2, N, C, H, W)
    w = rng.standard_normal(xs.shape)
    f = lambda x: _train(case)(x, gj, bj)[0]

    @jax.jit
    def run(xs, xs2):
        return (jax.grad(lambda t: jnp.sum(jax.vmap(f)(t) * w))(xs),
                jax.vmap(jax.vmap(f))(xs2))

    grads, nested = run(xs, xs2)
    for i in range(2):
        np.testing.assert_allclose(
            to_f64(grads[i]), ref.bn_train_grad(x64[i], g, w[i], "spatial", EPS)[0],
            rtol=1e-10, atol=1e-12)
        for j in range(2):
            np.testing.assert_allclose(to_f64(nested[i, j]),
                                       ref.bn_train(to_f64(xs2[i, j]), g, bt, "spatial", EPS)[0],
                                       rtol=1e-12, atol=1e-12)


def test_inside_checkpoint_and_scan(rng):
    case = "sp-3d-nwc"
    (xs, gj, bj, rmj, rvj), (x64, g, bt, rm, rv) = _data(rng, case, stacked={0: (3, 0)})
    f = _train(case)

    def step(carry, x):
        rm, rv, total = carry
        out, _, _, rm, rv = jax.checkpoint(lambda t: f(t, gj, bj, running_mean=rm,
                                                       running_var=rv))(x)
        return (rm, rv, total + jnp.sum(out * out[::-1])), out

    @jax.jit
    def run(xs):
        return (jax.lax.scan(step, (rmj, rvj, 0.0), xs),
                jax.grad(lambda t: jax.lax.scan(step, (rmj, rvj, 0.0), t)[0][2])(xs))

    ((rm_s, rv_s, _), outs), grads = run(xs)
    m = ref.count(x64.shape[1:], "spatial", "NWC")
    for i in range(3):
        out_r, mean_r, _, var_r = ref.bn_train(x64[i], g, bt, "spatial", EPS, "NWC")
        np.testing.assert_allclose(to_f64(outs[i]), out_r, rtol=1e-12, atol=1e-12)
        rm, rv = ref.running_averages(rm, rv, mean_r, var_r, m, 0.1)
        expected = ref.bn_train_grad(x64[i], g, out_r[::-1] * 2, "spatial", EPS, "NWC")[0]
        np.testing.assert_allclose(to_f64(grads[i]), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_f64(rm_s), rm, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(to_f64(rv_s), rv, rtol=1e-12, atol=1e-13)


def test_zero_size_batch_test_mode_and_train_outputs_shapes():
    x = jnp.zeros((0, 3, 2, 2), jnp.float32)
    p = jnp.ones((1, 3, 1, 1), jnp.float32)
    out_test, (out, mean, invstd) = jax.jit(lambda t: (
        dnn_batch_normalization_test(t, p, p, p, p, "spatial"),
        dnn_batch_normalization_train(t, p, p, "spatial")))(x)
    assert out_test.shape == out.shape == (0, 3, 2, 2)
    assert mean.shape == invstd.shape == (1, 3, 1, 1)


# =======================================================================================
# Bad arguments
# =======================================================================================
X4 = jnp.zeros((4, 3, 2, 2), jnp.float32)
PA = jnp.ones((1, 3, 2, 2), jnp.float32)  # per-activation parameters of X4
SP = jnp.ones((1, 3, 1, 1), jnp.float32)  # spatial parameters of X4


@pytest.mark.parametrize("arg", ["gamma", "beta", "running_mean", "running_var"])
@pytest.mark.parametrize("mode,good,bad", [
    ("per-activation", PA, SP), ("spatial", SP, PA),
    ("spatial", SP, jnp.ones((3,), jnp.float32)),           # not of the inputs' rank
    ("spatial", SP, jnp.ones((1, 1, 1, 3), jnp.float32)),   # channels-last shape, NCHW data
    ("per-activation", PA, jnp.ones((4, 3, 2, 2), jnp.float32))])
def test_train_parameter_shape_mismatch(arg, mode, good, bad):
    kwargs = dict(gamma=good, beta=good, running_mean=good, running_var=good)
    kwargs[arg] = bad
    with pytest.raises(ValueError, match=rf"\b{arg}\b.*shape"):
        dnn_batch_normalization_train(X4, mode=mode, **kwargs)


@pytest.mark.parametrize("arg", ["gamma", "beta", "mean", "var"])
@pytest.mark.parametrize("mode,good,bad", [("per-activation", PA, SP), ("spatial", SP, PA)])
def test_test_parameter_shape_mismatch(arg, mode, good, bad):
    kwargs = dict(gamma=good, beta=good, mean=good, var=good)
    kwargs[arg] = bad
    with pytest.raises(ValueError, match=rf"\b{arg}\b.*shape"):
        dnn_batch_normalization_test(X4, mode=mode, **kwargs)


def test_channels_last_parameter_shapes():
    x = jnp.zeros((4, 2, 2, 3), jnp.float32)
    p = jnp.ones((1, 1, 1, 3), jnp.float32)
    dnn_batch_normalization_train(x, p, p, "spatial", data_format="NHWC")
    with pytest.raises(ValueError, match="gamma"):
        dnn_batch_normalization_train(x, p, p, "spatial")  # NCHW would need (1, 2, 1, 1)


@pytest.mark.parametrize("epsilon", [1e-6, 0.0, -1.0, 9.99e-6, float("nan"), float("inf")])
def test_epsilon_too_small(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        dnn_batch_normalization_train(X4, SP, SP, "spatial", epsilon=epsilon)
    with pytest.raises(ValueError, match="epsilon"):
        dnn_batch_normalization_test(X4, SP, SP, SP, SP, "spatial", epsilon=epsilon)


def test_epsilon_minimum_is_allowed_and_type_checked():
    dnn_batch_normalization_train(X4, SP, SP, "spatial", epsilon=1e-5)
    dnn_batch_normalization_test(X4, SP, SP, SP, SP, "spatial", epsilon=1e-5)
    for bad in ("1e-3", None, True):
        with pytest.raises(TypeError, match="epsilon"):
            dnn_batch_normalization_train(X4, SP, SP, "spatial", epsilon=bad)
    with pytest.raises(TypeError, match="epsilon"):  # epsilon is static: not traceable
        jax.jit(lambda e: dnn_batch_normalization_train(X4, SP, SP, "spatial", epsilon=e))(1e-3)


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_running_stats_must_come_together(given):
    with pytest.raises(ValueError, match="running_mean and running_var"):
        dnn_batch_normalization_train(X4, SP, SP, "spatial", **{given: SP})


@pytest.mark.parametrize("factor", [-0.1, 1.5, float("nan")])
def test_running_average_factor_out_of_range(factor):
    with pytest.raises(ValueError, match="running_average_factor"):
        dnn_batch_normalization_train(X4, SP, SP, "spatial", running_average_factor=factor,
                                      running_mean=SP, running_var=SP)
    with pytest.raises(ValueError, match="running_average_factor"):
        dnn_batch_normalization_train(X4, SP, SP, "spatial", running_average_factor=factor)
    with pytest.raises(TypeError, match="running_average_factor"):
        dnn_batch_normalization_train(X4, SP, SP, "spatial", running_average_factor="0.1")


@pytest.mark.parametrize("shape", [(3,), (), (2, 3, 2, 2, 2, 2)])
def test_rank_outside_2_to_5(shape):
    x = jnp.zeros(shape, jnp.float32)
    p = jnp.ones((1,) + shape[1:], jnp.float32)
    with pytest.raises(ValueError, match="inputs"):
        dnn_batch_normalization_train(x, p, p)
    with pytest.raises(ValueError, match="inputs"):
        dnn_batch_normalization_test(x, p, p, p, p)


@pytest.mark.parametrize("mode", ["per_activation", "instance", "Spatial", None])
def test_unknown_mode(mode):
    with pytest.raises(ValueError, match="mode"):
        dnn_batch_normalization_train(X4, SP, SP, mode)
    with pytest.raises(ValueError, match="mode"):
        dnn_batch_normalization_test(X4, SP, SP, SP, SP, mode)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
@pytest.mark.parametrize("arg", ["inputs", "gamma", "beta", "running_mean", "running_var"])
def test_integer_dtype(dtype, arg):
    kwargs = dict(inputs=X4, gamma=SP, beta=SP, running_mean=SP, running_var=SP)
    kwargs[arg] = kwargs[arg].astype(dtype)
    with pytest.raises(TypeError, match=rf"\b{arg}\b"):
        dnn_batch_normalization_train(mode="spatial", **kwargs)


@pytest.mark.parametrize("arg", ["inputs", "gamma", "beta", "mean", "var"])
def test_integer_dtype_test_mode(arg):
    kwargs = dict(inputs=X4, gamma=SP, beta=SP, mean=SP, var=SP)
    kwargs[arg] = kwargs[arg].astype(jnp.int32)
    with pytest.raises(TypeError, match=rf"\b{arg}\b"):
        dnn_batch_normalization_test(mode="spatial", **kwargs)


@pytest.mark.parametrize("fmt", ["HWCN", "NCHWc", None, 4, "nchw"])
def test_bad_data_format(fmt):
    with pytest.raises(ValueError, match="data_format"):
        dnn_batch_normalization_train(X4, SP, SP, "spatial", data_format=fmt)


def test_running_var_needs_two_values_per_statistic():
    x = jnp.zeros((1, 3), jnp.float32)
    p = jnp.ones((1, 3), jnp.float32)
    dnn_batch_normalization_train(x, p, p)  # fine without running averages
    with pytest.raises(ValueError, match="m >= 2"):
        dnn_batch_normalization_train(x, p, p, running_mean=p, running_var=p)


def test_errors_raise_at_trace_time_under_jit():
    f = jax.jit(lambda x, g: dnn_batch_normalization_train(x, g, g, "spatial", epsilon=1e-7))
    with pytest.raises(ValueError, match="epsilon"):
        f(X4, SP)
    g = jax.jit(lambda x, g: dnn_batch_normalization_test(x, g, g, g, g, "spatial"))
    with pytest.raises(ValueError, match="gamma"):
        g(X4, PA)


# =======================================================================================
# Paths and lowering
# =======================================================================================

def test_primitives_are_exposed():
    import jaxdnn.primitives as primitives
    for p in (bn_fwd_train_p, bn_fwd_infer_p, bn_bwd_p):
        assert getattr(primitives, p.name.replace("jaxdnn_", "") + "_p") is p
    assert set(FFI_TARGETS) == {"jaxdnn_bn_fwd_train", "jaxdnn_bn_fwd_infer", "jaxdnn_bn_bwd"}


def test_xla_path_gives_the_same_numbers(rng):
    (xj, gj, bj, rmj, rvj), _ = _data(rng, "sp-4d-nhwc", "float32")
    f = lambda *a: _train("sp-4d-nhwc")(*a[:3], running_mean=a[3], running_var=a[4])
    default = f(xj, gj, bj, rmj, rvj)
    with xla_path():
        xla = f(xj, gj, bj, rmj, rvj)
        text = jax.jit(jax.grad(lambda t: jnp.sum(f(t, gj, bj, rmj, rvj)[0] ** 2))).lower(
            xj).as_text()
    assert "jaxdnn_bn" not in text
    for a, e in zip(default, xla):
        assert_close(a, e, "float32")


def _without_the_handlers(monkeypatch):
    """As in a build of the extension without the batch-norm handlers (an old or CPU-only
    one), on a machine where cuDNN could otherwise run: only the missing targets count."""
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_extension, "has_targets", lambda *names: False)


def test_dnn_enabled_true_raises_without_the_handlers(monkeypatch):
    _without_the_handlers(monkeypatch)
    with jaxdnn.config.override(**{"dnn.enabled": True}):
        with pytest.raises(RuntimeError, match=r"dnn_batch_normalization_train: dnn\.enabled="
                           r"True requires cuDNN.*no cuDNN handler 'jaxdnn_bn_fwd_train'"):
            dnn_batch_normalization_train(X4, SP, SP, "spatial")
        with pytest.raises(RuntimeError, match=r"dnn_batch_normalization_test: dnn\.enabled="
                           r"True requires cuDNN.*no cuDNN handler 'jaxdnn_bn_fwd_infer'"):
            dnn_batch_normalization_test(X4, SP, SP, SP, SP, "spatial")


_needs_extension = pytest.mark.skipif(
    _extension.extension() is None,
    reason=f"jaxdnn CUDA extension not built: {_extension.unavailable_reason()}")


def _cuda_hlo(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@_needs_extension
def test_cuda_lowering_takes_the_reference_without_the_handlers(monkeypatch):
    """Under 'auto' a float64 batch norm (the dtype 'auto' keeps on cuDNN) lowers to the
    cuDNN calls where the extension has the handlers, and to the XLA reference, without a
    jaxdnn call, where it lacks them."""
    jaxdnn.config.update("dnn.enabled", "auto")
    x, p = X4.astype(jnp.float64), SP.astype(jnp.float64)

    def hlo():  # a fresh function each time: the path is chosen at trace time
        return _cuda_hlo(jax.grad(lambda x: jnp.sum(
            dnn_batch_normalization_train(x, p, p, "spatial")[0] ** 2)), x)

    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_extension, "has_targets", lambda *names: True)
    assert "custom_call @jaxdnn_bn_fwd_train" in hlo()
    _without_the_handlers(monkeypatch)
    assert "jaxdnn_bn" not in hlo()


@_needs_extension
@pytest.mark.parametrize("mode,fmt,shape", [("spatial", "NHWC", (4, 2, 2, 3)),
                                            ("per-activation", "NWC", (4, 2, 3)),
                                            ("spatial", "NCDHW", (2, 3, 2, 2, 2))])
def test_cuda_lowering_custom_calls_once_handlers_exist(monkeypatch, mode, fmt, shape):
    """With the handlers registered (stubbed here), the CUDA lowering emits the three FFI
    calls with their attributes, on 4-D/5-D tensors and float32 parameters for half data."""
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_extension, "has_targets", lambda *names: True)
    jaxdnn.config.update("dnn.enabled", True)
    x = jnp.zeros(shape, jnp.float16)
    p = jnp.ones(ref.param_shape(shape, mode, fmt), jnp.float16)
    train = _cuda_hlo(jax.grad(lambda t: jnp.sum(dnn_batch_normalization_train(
        t, p, p, mode, 1e-3, data_format=fmt)[0].astype(jnp.float32))), x)
    infer = _cuda_hlo(lambda t: dnn_batch_normalization_test(t, p, p, p, p, mode, 1e-3,
                                                             data_format=fmt), x)
    calls = re.findall(r"stablehlo\.custom_call @(\w+)\(.*?mhlo\.backend_config = \{(.*?)\}",
                       train + infer)
    assert [c[0] for c in calls] == ["jaxdnn_bn_fwd_train", "jaxdnn_bn_bwd", "jaxdnn_bn_fwd_infer"]
    layout = {"NHWC": "NHWC", "NWC": "NCHW", "NCDHW": "NCDHW"}[fmt]
    for _, attrs in calls:
        assert f'mode = "{mode}"' in attrs and f'layout = "{layout}"' in attrs
        assert "epsilon = 1.000000e-03 : f64" in attrs
    four = {(4, 2, 2, 3): "4x2x2x3", (4, 2, 3): "4x2x3x1", (2, 3, 2, 2, 2): "2x3x2x2x2"}[shape]
    assert f"tensor<{four}xf16>" in train and "xf32>" in train


@_needs_extension
def test_cuda_lowering_of_forward_mode_keeps_the_cudnn_forward(cudnn_on_cpu):
    """On the cuDNN path, jvp's program runs the primal on cuDNN (the training and
    inference forwards' custom calls) and the tangents on XLA (no other jaxdnn call), and
    the gradient's program still runs the cuDNN forward and backward only."""
    x, p = jnp.zeros((4, 3, 2, 2), jnp.float32), jnp.ones((1, 3, 1, 1), jnp.float32)
    train = lambda x: dnn_batch_normalization_train(x, p, p, "spatial")
    test = lambda x: dnn_batch_normalization_test(x, p, p, p, p, "spatial")
    for fn, target in ((train, "jaxdnn_bn_fwd_train"), (test, "jaxdnn_bn_fwd_infer")):
        hlo = _cuda_hlo(lambda x, t: jax.jvp(fn, (x,), (t,)), x, x)
        assert re.findall(r"custom_call @(jaxdnn_\w+)", hlo) == [target], hlo
    hlo = _cuda_hlo(jax.grad(lambda x: jnp.sum(jnp.sin(train(x)[0]))), x)
    assert re.findall(r"custom_call @(jaxdnn_\w+)", hlo) == ["jaxdnn_bn_fwd_train",
                                                            "jaxdnn_bn_bwd"], hlo


# =======================================================================================
# GPU: the cuDNN path against the XLA path and the float64 reference
# =======================================================================================
GPU_CASES = {
    "gpu-pa-2d": ((64, 33), "per-activation", "NCHW"),
    "gpu-pa-4d": ((16, 8, 5, 6), "per-activation", "NCHW"),
    "gpu-sp-4d-nchw": ((8, 16, 9, 10), "spatial", "NCHW"),
    "gpu-sp-4d-nhwc": ((8, 9, 10, 16), "spatial", "NHWC"),
    "gpu-sp-5d-ndhwc": ((4, 5, 6, 7, 8), "spatial", "NDHWC"),
}
gpu_cases = pytest.mark.parametrize("case", list(GPU_CASES))


def _gpu_compare(cudnn, xla, expected, dtype, what):
    assert cudnn.dtype == xla.dtype and cudnn.shape == expected.shape
    assert_close(cudnn, expected, dtype, err_msg=f"{what}: cuDNN vs float64 reference")
    assert_close(xla, expected, dtype, err_msg=f"{what}: XLA path vs float64 reference")
    assert_close(cudnn, xla, dtype, factor=2, err_msg=f"{what}: cuDNN vs XLA")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@gpu_cases
def test_gpu_train_forward_cudnn_vs_xla_vs_reference(rng, dtype, case):
    shape, mode, fmt = GPU_CASES[case]
    (xj, gj, bj, rmj, rvj), (x, g, b, rm, rv) = _data(rng, case, dtype)
    f = lambda *a: _train(case)(*a[:3], running_mean=a[3], running_var=a[4])
    assert "custom_call @jaxdnn_bn_fwd_train" in jax.jit(f).lower(xj, gj, bj, rmj, rvj).as_text()
    cudnn = _jit_run(f, xj, gj, bj, rmj, rvj)
    xla = _jit_run(f, xj, gj, bj, rmj, rvj, xla=True)
    out_r, mean_r, invstd_r, var_r = ref.bn_train(x, g, b, mode, EPS, fmt)
    rm_r, rv_r = ref.running_averages(rm, rv, mean_r, var_r, ref.count(shape, mode, fmt), 0.1)
    for c, a, e, what in zip(cudnn, xla, (out_r, mean_r, invstd_r, rm_r, rv_r),
                             ("out", "mean", "invstd", "running mean", "running var")):
        _gpu_compare(c, a, e, dtype, what)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@gpu_cases
def test_gpu_gradients_and_test_mode_cudnn_vs_xla_vs_reference(rng, dtype, case):
    shape, mode, fmt = GPU_CASES[case]
    (xj, gj, bj, mj, vj), (x, g, b, m, v) = _data(rng, case, dtype)
    (doj, do), (dmj, dm), (dij, di) = _cotangents(rng, case, dtype)

    def vjp(x, g, b, do, dm, di):
        return jax.vjp(_train(case), x, g, b)[1]((do, dm, di))

    assert "custom_call @jaxdnn_bn_bwd" in jax.jit(vjp).lower(xj, gj, bj, doj, dmj, dij).as_text()
    cudnn = _jit_run(vjp, xj, gj, bj, doj, dmj, dij)
    xla = _jit_run(vjp, xj, gj, bj, doj, dmj, dij, xla=True)
    expected = ref.bn_train_grad(x, g, do, mode, EPS, fmt, dmean=dm, dinvstd=di)
    for c, a, e, what in zip(cudnn, xla, expected, ("d inputs", "d gamma", "d beta")):
        _gpu_compare(c, a, e, dtype, what)
    t = _test(case)
    _gpu_compare(_jit_run(t, xj, gj, bj, mj, vj), _jit_run(t, xj, gj, bj, mj, vj, xla=True),
                 ref.bn_test(x, g, b, m, v, mode, EPS, fmt), dtype, "test mode")


@pytest.mark.gpu
@gpu_cases
def test_gpu_check_grads_and_vmap(rng, case):
    (xj, gj, bj, _, _), _ = _data(rng, case, "float64")
    f = jax.jit(_train(case))
    xs = jnp.stack([xj, xj * 2.0 + 1.0, -xj])
    got = jax.jit(jax.vmap(f, in_axes=(0, None, None)))(xs, gj, bj)
    expected = _loop(f, (xs, gj, bj), (0, None, None), 3)
    for a, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-10, atol=1e-12)
    check_grads(f, (xj, gj, bj), order=1, modes=["rev"])



@pytest.mark.gpu
@pytest.mark.parametrize("case", ["gpu-pa-4d", "gpu-sp-4d-nchw", "gpu-sp-4d-nhwc"])
def test_gpu_forward_mode_cudnn_vs_xla(rng, case):
    """jvp (every output, running averages included; inference too) and the hessian-vector
    product on the cuDNN path equal the XLA path's, in float64, and the primal comes from
    the cuDNN forward."""
    args, _ = _data(rng, case, "float64")
    args = tuple(args)  # jax.jvp wants primals and tangents of one tree structure
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in args)
    train, test = _train_all(case), _test(case)
    jvp_train = lambda a, t: jax.jvp(train, a, t)
    jvp_test = lambda a, t: jax.jvp(test, a, t)
    assert "custom_call @jaxdnn_bn_fwd_train" in jax.jit(jvp_train).lower(args, tangents).as_text()
    assert "custom_call @jaxdnn_bn_fwd_infer" in jax.jit(jvp_test).lower(args, tangents).as_text()
    w = jnp.asarray(rng.standard_normal(args[0].shape))
    loss = lambda x: jnp.sum(jnp.sin(train(x, *args[1:])[0]) * w)
    hvp = lambda x, t: jax.jvp(jax.grad(loss), (x,), (t,))[1]
    for fn, operands in ((jvp_train, (args, tangents)), (jvp_test, (args, tangents)),
                         (hvp, (args[0], tangents[0]))):
        cudnn, xla = _jit_run(fn, *operands), _jit_run(fn, *operands, xla=True)
        jax.tree.map(lambda c, a: np.testing.assert_allclose(c, a, rtol=1e-9, atol=1e-10),
                     cudnn, xla)
