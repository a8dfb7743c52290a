"""dnn_pool against independent NumPy float64 loop references."""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxdnn
from oracles import pooling_softmax as ref
from helpers import FLOAT_DTYPES, assert_close, cast, to_f64, xla_path
from helpers import jit_run as _jit_run
from jaxdnn import dnn_pool

MODES = ("max", "max_deterministic", "average_inc_pad", "average_exc_pad", "sum")
MAX_MODES = ("max", "max_deterministic")
LINEAR_MODES = ("average_inc_pad", "average_exc_pad", "sum")

# name -> (channels-first input shape, ws, stride, pad)
CONFIGS = {
    "2d-w33-s22-p11": ((2, 3, 7, 6), (3, 3), (2, 2), (1, 1)),
    "2d-w23-s12-p01": ((2, 3, 6, 7), (2, 3), (1, 2), (0, 1)),
    "2d-w22-defaults": ((1, 2, 5, 4), (2, 2), None, None),
    "3d-w222-s211-p100": ((2, 2, 3, 4, 5), (2, 2, 2), (2, 1, 1), (1, 0, 0)),
    "3d-w322-s121-p110": ((1, 2, 4, 5, 3), (3, 2, 2), (1, 2, 1), (1, 1, 0)),
}
LAYOUTS = ("channels_first", "channels_last")

configs = pytest.mark.parametrize("config", list(CONFIGS))
layouts = pytest.mark.parametrize("layout", LAYOUTS)
modes = pytest.mark.parametrize("mode", MODES)
linear_modes = pytest.mark.parametrize("mode", LINEAR_MODES)
dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES)


def _fmt(nd, layout):
    if layout == "channels_first":
        return "NCHW" if nd == 2 else "NCDHW"
    return "NHWC" if nd == 2 else "NDHWC"


def _shape(cf_shape, fmt):
    return (cf_shape[0],) + tuple(cf_shape[2:]) + (cf_shape[1],) if fmt in ("NHWC", "NDHWC") \
        else tuple(cf_shape)


def _setup(config, layout):
    """(input shape in the layout, ws, stride, pad, data_format)."""
    cf_shape, ws, stride, pad = CONFIGS[config]
    fmt = _fmt(len(ws), layout)
    return _shape(cf_shape, fmt), ws, stride, pad, fmt


def _pool_fn(ws, stride, pad, mode, fmt):
    return functools.partial(dnn_pool, ws=ws, stride=stride, mode=mode, pad=pad, data_format=fmt)


def _out_shape(shape, ws, stride, pad, fmt):
    channels_last = fmt in ("NHWC", "NDHWC")
    spatial = shape[1:-1] if channels_last else shape[2:]
    out = ref.pool_output_shape(spatial, ws, stride, pad)
    return (shape[0],) + out + (shape[-1],) if channels_last else shape[:2] + out


# ---------------------------------------------------------------------------------------
# The oracle itself, on hand-computed cases
# ---------------------------------------------------------------------------------------
def test_reference_by_hand():
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    # ws 2, stride 1, pad 1: the corner window sees only x[0, 0] = 1.
    assert ref.pool(x, (2, 2), (1, 1), (1, 1), "max")[0, 0, 0, 0] == 1.0
    assert ref.pool(x, (2, 2), (1, 1), (1, 1), "sum")[0, 0, 0, 0] == 1.0
    assert ref.pool(x, (2, 2), (1, 1), (1, 1), "average_inc_pad")[0, 0, 0, 0] == 0.25
    assert ref.pool(x, (2, 2), (1, 1), (1, 1), "average_exc_pad")[0, 0, 0, 0] == 1.0
    np.testing.assert_array_equal(ref.pool(x, (2, 2), None, None, "max")[0, 0], [[5, 6], [8, 9]])
    np.testing.assert_array_equal(ref.pool(x, (2, 2), (1, 1), None, "sum")[0, 0],
                                  [[12, 16], [24, 28]])
    # padding never wins a max, even when every element is negative
    np.testing.assert_array_equal(ref.pool(-x, (3, 3), (2, 2), (1, 1), "max")[0, 0],
                                  [[-1, -2], [-4, -5]])
    g = ref.pool_grad(x, np.ones((1, 1, 2, 2)), (2, 2), None, None, "max")
    np.testing.assert_array_equal(g[0, 0], [[0, 0, 0], [0, 1, 1], [0, 1, 1]])
    # ties: the first maximum in row-major window order takes the gradient
    g = ref.pool_grad(np.zeros((1, 1, 2, 2)), np.ones((1, 1, 1, 1)), (2, 2), None, None, "max")
    np.testing.assert_array_equal(g[0, 0], [[1, 0], [0, 0]])


@configs
@pytest.mark.parametrize("mode", ["max", "sum", "average_exc_pad"])
def test_reference_gradient_vs_finite_difference(rng, config, mode):
    shape, ws, stride, pad, fmt = _setup(config, "channels_first")
    x = ref.distinct_values(rng, shape, fmt)
    dy = rng.standard_normal(ref.pool(x, ws, stride, pad, mode, fmt).shape)
    v = rng.standard_normal(shape)
    eps = 1e-4
    fd = (np.sum(ref.pool(x + eps * v, ws, stride, pad, mode, fmt) * dy)
          - np.sum(ref.pool(x - eps * v, ws, stride, pad, mode, fmt) * dy)) / (2 * eps)
    np.testing.assert_allclose(np.sum(ref.pool_grad(x, dy, ws, stride, pad, mode, fmt) * v), fd,
                               rtol=1e-8)


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
# Every config, mode and layout in float32; half precision on a subset (each case compiles
# its own XLA program: the full product would make the suite slow). float64 is covered by
# test_forward_continuous_data (channels-first), test_grad_continuous_data and test_jit
# (channels-last, forward and gradient).
FORWARD_CASES = (
    [("float32", c, m, l) for c in CONFIGS for m in MODES for l in LAYOUTS]
    + [(d, c, m, "channels_first") for d in ("float16", "bfloat16")
       for c in ("2d-w33-s22-p11", "3d-w222-s211-p100") for m in MODES]
    + [(d, "2d-w23-s12-p01", m, "channels_last") for d in ("float16", "bfloat16")
       for m in ("max", "average_exc_pad")]
    + [(d, "3d-w322-s121-p110", m, "channels_last") for d in ("float16", "bfloat16")
       for m in ("sum", "average_inc_pad")]
)
GRAD_CASES = (
    [("float32", c, m, l) for c in CONFIGS for m in MODES for l in LAYOUTS]
    + [(d, c, m, "channels_first") for d in ("float16", "bfloat16")
       for c in ("2d-w33-s22-p11", "3d-w222-s211-p100") for m in MODES]
)


@pytest.mark.parametrize("dtype,config,mode,layout", FORWARD_CASES)
def test_forward(rng, dtype, config, mode, layout):
    shape, ws, stride, pad, fmt = _setup(config, layout)
    xj, x64 = cast(ref.distinct_values(rng, shape, fmt), dtype)
    # channels-first goes through the default data_format
    y = dnn_pool(xj, ws, stride=stride, mode=mode, pad=pad,
                 data_format=None if layout == "channels_first" else fmt)
    assert y.shape == _out_shape(shape, ws, stride, pad, fmt)
    assert y.dtype == jnp.dtype(dtype)
    assert_close(y, ref.pool(x64, ws, stride, pad, mode, fmt), dtype)


@configs
@modes
def test_forward_continuous_data(rng, config, mode):
    """Random continuous (not integer-valued) data, float64."""
    shape, ws, stride, pad, fmt = _setup(config, "channels_first")
    x = rng.standard_normal(shape)
    y = dnn_pool(jnp.asarray(x), ws, stride, mode, pad)
    np.testing.assert_allclose(to_f64(y), ref.pool(x, ws, stride, pad, mode), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("fmt", ["NCHW", "bc01", "NHWC"])
def test_explicit_2d_data_formats(rng, fmt):
    shape = _shape((1, 2, 5, 5), "NHWC" if fmt == "NHWC" else "NCHW")
    x = rng.standard_normal(shape)
    y = dnn_pool(jnp.asarray(x), (3, 3), (2, 2), "max", (1, 1), data_format=fmt)
    ref_fmt = "NHWC" if fmt == "NHWC" else "NCHW"
    np.testing.assert_array_equal(to_f64(y), ref.pool(x, (3, 3), (2, 2), (1, 1), "max", ref_fmt))


def test_default_stride_and_pad(rng):
    x = rng.standard_normal((1, 2, 4, 5))
    y = dnn_pool(jnp.asarray(x), (2, 3))
    assert y.shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(to_f64(y), ref.pool(x, (2, 3), (1, 1), (0, 0), "max"))
    x3 = rng.standard_normal((1, 1, 3, 3, 4))
    y3 = dnn_pool(jnp.asarray(x3), (2, 2, 2), mode="sum")
    assert y3.shape == (1, 1, 2, 2, 3)
    np.testing.assert_allclose(to_f64(y3), ref.pool(x3, (2, 2, 2), None, None, "sum"),
                               rtol=1e-12)


def test_ws_stride_pad_accept_lists_and_numpy_ints(rng):
    x = rng.standard_normal((1, 2, 5, 5))
    y = dnn_pool(jnp.asarray(x), [np.int64(3), 3], stride=[2, np.int32(2)], pad=[1, 1],
                 mode="average_exc_pad")
    np.testing.assert_allclose(to_f64(y), ref.pool(x, (3, 3), (2, 2), (1, 1), "average_exc_pad"),
                               rtol=1e-12)


def test_max_padding_never_wins():
    """All-negative images: a zero padding value must never be the maximum."""
    x = -1.0 - np.arange(2 * 5 * 5, dtype=np.float64).reshape(1, 2, 5, 5)
    y = to_f64(dnn_pool(jnp.asarray(x), (3, 3), (2, 2), "max", (2, 2)))
    assert np.all(y < 0)
    np.testing.assert_array_equal(y, ref.pool(x, (3, 3), (2, 2), (2, 2), "max"))


def test_average_deprecated(rng):
    x = rng.standard_normal((2, 3, 5, 6))
    with pytest.warns(DeprecationWarning, match="average"):
        y = dnn_pool(jnp.asarray(x), (3, 3), (2, 2), "average", (1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the other modes do not warn
        y_inc = dnn_pool(jnp.asarray(x), (3, 3), (2, 2), "average_inc_pad", (1, 1))
    np.testing.assert_array_equal(to_f64(y), to_f64(y_inc))
    np.testing.assert_allclose(to_f64(y), ref.pool(x, (3, 3), (2, 2), (1, 1), "average_inc_pad"),
                               rtol=1e-12)
    # 3-D as well, and the gradient
    x3 = rng.standard_normal((1, 2, 3, 4, 4))
    with pytest.warns(DeprecationWarning):
        g = jax.grad(lambda t: jnp.sum(dnn_pool(t, (2, 2, 2), mode="average") ** 2))(
            jnp.asarray(x3))
    y3 = ref.pool(x3, (2, 2, 2), mode="average_inc_pad")
    np.testing.assert_allclose(to_f64(g), ref.pool_grad(x3, 2 * y3, (2, 2, 2),
                                                        mode="average_inc_pad"), rtol=1e-12)


@configs
@modes
def test_xla_path_gives_the_same_numbers(rng, config, mode):
    shape, ws, stride, pad, fmt = _setup(config, "channels_last")
    xj, x64 = cast(ref.distinct_values(rng, shape, fmt), "float32")
    f = _pool_fn(ws, stride, pad, mode, fmt)
    y_default = f(xj)
    with xla_path():
        y_xla = f(xj)
    expected = ref.pool(x64, ws, stride, pad, mode, fmt)
    assert_close(y_default, expected, "float32")
    assert_close(y_xla, expected, "float32")
    assert_close(y_xla, y_default, "float32")


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,config,mode,layout", GRAD_CASES)
def test_vjp_vs_reference(rng, dtype, config, mode, layout):
    """(float64: test_grad_continuous_data, test_jit and test_check_grads.)"""
    shape, ws, stride, pad, fmt = _setup(config, layout)
    xj, x64 = cast(ref.distinct_values(rng, shape, fmt), dtype)
    f = _pool_fn(ws, stride, pad, mode, fmt)
    y, vjp = jax.vjp(f, xj)
    dyj, dy64 = cast(rng.standard_normal(y.shape), dtype)
    (dx,) = vjp(dyj)
    assert dx.shape == shape and dx.dtype == jnp.dtype(dtype)
    assert_close(dx, ref.pool_grad(x64, dy64, ws, stride, pad, mode, fmt), dtype)


@configs
@modes
def test_grad_continuous_data(rng, config, mode):
    shape, ws, stride, pad, fmt = _setup(config, "channels_first")
    x = rng.standard_normal(shape)
    w = rng.standard_normal(_out_shape(shape, ws, stride, pad, fmt))
    g = jax.grad(lambda t: jnp.sum(dnn_pool(t, ws, stride, mode, pad) * w))(jnp.asarray(x))
    np.testing.assert_allclose(to_f64(g), ref.pool_grad(x, w, ws, stride, pad, mode),
                               rtol=1e-12, atol=1e-14)


@configs
@modes
@pytest.mark.parametrize("layout", ["channels_first"])
def test_check_grads(rng, config, mode, layout):
    shape, ws, stride, pad, fmt = _setup(config, layout)
    x = jnp.asarray(ref.distinct_values(rng, shape, fmt))  # well separated: no argmax flips
    f = _pool_fn(ws, stride, pad, mode, fmt)
    check_grads(f, (x,), order=1, modes=["rev"])
    if mode in LINEAR_MODES:
        check_grads(f, (x,), order=2, modes=["fwd", "rev"])
    else:
        check_grads(f, (x,), order=2, modes=["rev"])


@pytest.mark.parametrize("config", ["2d-w33-s22-p11", "3d-w222-s211-p100"])
@modes
def test_check_grads_channels_last(rng, config, mode):
    shape, ws, stride, pad, fmt = _setup(config, "channels_last")
    x = jnp.asarray(ref.distinct_values(rng, shape, fmt))
    order, ad_modes = (2, ["fwd", "rev"]) if mode in LINEAR_MODES else (2, ["rev"])
    check_grads(_pool_fn(ws, stride, pad, mode, fmt), (x,), order=order, modes=ad_modes)


def _reference_jacobian(shape, ws, stride, pad, mode, fmt):
    """The Jacobian of a linear pooling mode, column by column from the reference."""
    size = int(np.prod(shape))
    cols = []
    for j in range(size):
        e = np.zeros(size)
        e[j] = 1.0
        cols.append(ref.pool(e.reshape(shape), ws, stride, pad, mode, fmt).ravel())
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("config,layout", [("2d-w33-s22-p11", "channels_first"),
                                           ("2d-w23-s12-p01", "channels_last"),
                                           ("3d-w222-s211-p100", "channels_first")])
@pytest.mark.parametrize("mode", ["max", "max_deterministic"])
def test_max_modes_jvp_jacfwd_and_hessian(rng, config, mode, layout):
    """Forward mode of max pooling: the tangent at each window's maximum. jacfwd equals the
    oracle's gradient rows (distinct values: one maximum per window), and
    check_grads passes in both modes to second order."""
    cf_shape, ws, stride, pad = CONFIGS[config]
    fmt = _fmt(len(ws), layout)
    shape = _shape((1, 1) + cf_shape[2:], fmt)
    x = ref.distinct_values(rng, shape, fmt)
    t = rng.standard_normal(shape)
    f = _pool_fn(ws, stride, pad, mode, fmt)
    y, ty = jax.jit(lambda a, b: jax.jvp(f, (a,), (b,)))(jnp.asarray(x), jnp.asarray(t))
    np.testing.assert_allclose(to_f64(y), ref.pool(x, ws, stride, pad, mode, fmt), rtol=1e-12)
    eps = 1e-7  # smaller than any gap between values: the maxima do not move
    fd = (ref.pool(x + eps * t, ws, stride, pad, mode, fmt)
          - ref.pool(x - eps * t, ws, stride, pad, mode, fmt)) / (2 * eps)
    np.testing.assert_allclose(to_f64(ty), fd, rtol=1e-6, atol=1e-8)
    jac = to_f64(jax.jit(jax.jacfwd(f))(jnp.asarray(x))).reshape(-1, x.size)
    rows = []
    for i in range(int(np.prod(y.shape))):
        e = np.zeros(y.shape)
        e.flat[i] = 1.0
        rows.append(ref.pool_grad(x, e, ws, stride, pad, mode, fmt).ravel())
    np.testing.assert_allclose(jac, np.stack(rows), rtol=1e-12, atol=1e-14)
    check_grads(f, (jnp.asarray(x),), order=2, modes=["fwd", "rev"], eps=1e-4)


@pytest.mark.parametrize("config,layout", [("2d-w33-s22-p11", "channels_first"),
                                           ("2d-w23-s12-p01", "channels_last"),
                                           ("3d-w222-s211-p100", "channels_last")])
def test_xla_max_gradient_on_ties_goes_to_the_first_maximum(rng, config, layout):
    """The XLA path's max-pool gradient (gathers, not XLA's select-and-scatter) on small
    integers, where most windows have tied maxima: the first maximum in window order takes
    the cotangent, as the float64 oracle's loop does, and overlapping windows add up."""
    cf_shape, ws, stride, pad = CONFIGS[config]
    fmt = _fmt(len(ws), layout)
    shape = _shape(cf_shape, fmt)
    x = rng.integers(-2, 2, shape).astype(np.float64)
    dy = rng.standard_normal(_out_shape(shape, ws, stride, pad, fmt))
    f = _pool_fn(ws, stride, pad, "max", fmt)
    with xla_path():
        dx = jax.jit(lambda a, b: jax.vjp(f, a)[1](b)[0])(jnp.asarray(x), jnp.asarray(dy))
    np.testing.assert_allclose(to_f64(dx), ref.pool_grad(x, dy, ws, stride, pad, "max", fmt),
                               rtol=1e-12, atol=1e-12)


def test_max_pool_gradient_runs_the_pooling_backward_pass():
    """Reverse mode transposes the max-pool tangent into pool_bwd (cudnnPoolingBackward on
    the cuDNN path); the XLA tangent primitive stays out of the gradient."""
    x = jnp.ones((2, 3, 6, 6), jnp.float32)
    text = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(jnp.sin(dnn_pool(x, (2, 2))))))(x))
    assert "jaxdnn_pool_bwd" in text and "jaxdnn_pool_max_tangent" not in text, text


@pytest.mark.parametrize("config,layout", [("2d-w33-s22-p11", "channels_first"),
                                           ("2d-w23-s12-p01", "channels_last"),
                                           ("3d-w222-s211-p100", "channels_first")])
@linear_modes
def test_linear_modes_jvp_and_jacfwd(rng, config, mode, layout):
    cf_shape, ws, stride, pad = CONFIGS[config]
    fmt = _fmt(len(ws), layout)
    shape = _shape((1, 1) + cf_shape[2:], fmt)  # one image, one channel: a small Jacobian
    x = rng.standard_normal(shape)
    t = rng.standard_normal(shape)
    f = _pool_fn(ws, stride, pad, mode, fmt)
    y, ty = jax.jit(lambda a, b: jax.jvp(f, (a,), (b,)))(jnp.asarray(x), jnp.asarray(t))
    np.testing.assert_allclose(to_f64(y), ref.pool(x, ws, stride, pad, mode, fmt), rtol=1e-12)
    np.testing.assert_allclose(to_f64(ty), ref.pool(t, ws, stride, pad, mode, fmt), rtol=1e-12,
                               atol=1e-14)
    jac = to_f64(jax.jit(jax.jacfwd(f))(jnp.asarray(x))).reshape(-1, x.size)
    expected = _reference_jacobian(shape, ws, stride, pad, mode, fmt)
    np.testing.assert_allclose(jac, expected, rtol=1e-12, atol=1e-14)
    jac_rev = to_f64(jax.jit(jax.jacrev(f))(jnp.asarray(x))).reshape(-1, x.size)
    np.testing.assert_allclose(jac_rev, expected, rtol=1e-12, atol=1e-14)
    # the gradient of a linear mode is itself linear and forward-differentiable
    w = rng.standard_normal(y.shape)
    grad_fn = jax.grad(lambda z: jnp.sum(f(z) * w))
    _, tg = jax.jit(lambda a, b: jax.jvp(grad_fn, (a,), (b,)))(jnp.asarray(x), jnp.asarray(t))
    np.testing.assert_allclose(to_f64(tg), 0.0, atol=1e-14)  # a constant gradient


@linear_modes
def test_linear_modes_hessian_is_zero(rng, mode):
    x = rng.standard_normal((1, 1, 4, 4))
    f = lambda t: jnp.sum(dnn_pool(t, (2, 2), (1, 1), mode, (1, 1)) ** 2)
    h = to_f64(jax.jit(jax.hessian(f))(jnp.asarray(x))).reshape(16, 16)
    jac = _reference_jacobian((1, 1, 4, 4), (2, 2), (1, 1), (1, 1), mode, "NCHW")
    np.testing.assert_allclose(h, 2 * jac.T @ jac, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mode", MAX_MODES)
def test_max_grad_of_grad(rng, mode):
    """Second order through the max-pool backward: d/dx of <grad, v> (zero a.e.) and the
    mixed derivative through the cotangent (the gradient routing again)."""
    shape, ws, stride, pad = (1, 2, 5, 5), (3, 3), (2, 2), (1, 1)
    x = ref.distinct_values(rng, shape)
    w = rng.standard_normal(ref.pool(x, ws, stride, pad).shape)
    v = rng.standard_normal(shape)

    def g(z, w_):
        return jax.grad(lambda t: jnp.sum(dnn_pool(t, ws, stride, mode, pad) * w_))(z)

    gx = jax.grad(lambda z: jnp.sum(g(z, jnp.asarray(w)) * v))(jnp.asarray(x))
    np.testing.assert_allclose(to_f64(gx), 0.0, atol=1e-14)
    gw = jax.grad(lambda w_: jnp.sum(g(jnp.asarray(x), w_) * v))(jnp.asarray(w))
    # <pool_grad(x, w), v> is linear in w with coefficient pool_grad(x, e_k) . v = the max-
    # pool of v taken at x's argmax positions
    expected = np.array([np.sum(ref.pool_grad(x, e.reshape(w.shape), ws, stride, pad) * v)
                         for e in np.eye(w.size)]).reshape(w.shape)
    # On GPU, XLA differentiates the reference max-pool backward (select_and_gather_add)
    # with a pair reduction packed into 64 bits: float64 keeps only float32 precision there.
    rtol = 1e-12 if jax.default_backend() == "cpu" else 1e-6
    np.testing.assert_allclose(to_f64(gw), expected, rtol=rtol, atol=1e-14)


# ---------------------------------------------------------------------------------------
# Determinism flag
# ---------------------------------------------------------------------------------------
def _jaxpr_text(fn, x):
    return str(jax.make_jaxpr(fn)(x))


@pytest.mark.parametrize("ws", [(2, 2), (2, 2, 2)])
def test_deterministic_flag_lowers_max_as_max_deterministic(rng, ws):
    shape = (1, 2, 4, 4) if len(ws) == 2 else (1, 2, 3, 4, 4)
    x = ref.distinct_values(rng, shape)
    f = lambda t: dnn_pool(t, ws)
    text = _jaxpr_text(f, jnp.asarray(x))
    assert "max_deterministic" not in text
    assert "mode=max" in text
    with jaxdnn.config.override(**{"dnn.deterministic": True}):
        text = _jaxpr_text(f, jnp.asarray(x))
        assert "max_deterministic" in text
        grad_text = _jaxpr_text(jax.grad(lambda t: jnp.sum(f(t) ** 2)), jnp.asarray(x))
        assert "max_deterministic" in grad_text
        assert "mode=max\n" not in grad_text and "mode=max " not in grad_text
        y = dnn_pool(jnp.asarray(x), ws)
        g = jax.grad(lambda t: jnp.sum(dnn_pool(t, ws) ** 2))(jnp.asarray(x))
    np.testing.assert_array_equal(to_f64(y), ref.pool(x, ws))
    np.testing.assert_allclose(to_f64(g), ref.pool_grad(x, 2 * ref.pool(x, ws), ws), rtol=1e-12)
    # and the flag is restored afterwards
    assert "max_deterministic" not in _jaxpr_text(f, jnp.asarray(x))


@linear_modes
def test_deterministic_flag_leaves_other_modes(mode):
    x = jnp.ones((1, 1, 4, 4))
    with jaxdnn.config.override(**{"dnn.deterministic": True}):
        text = _jaxpr_text(lambda t: dnn_pool(t, (2, 2), mode=mode), x)
    assert f"mode={mode}" in text
    assert "max_deterministic" not in text


def test_deterministic_flag_under_jit_retraces(rng):
    """Flags are trace-time settings: a jitted function traced before the flag changed does
    not keep serving the old choice."""
    x = jnp.asarray(ref.distinct_values(rng, (1, 1, 4, 4)))
    f = jax.jit(lambda t: dnn_pool(t, (2, 2)))
    f(x)
    with jaxdnn.config.override(**{"dnn.deterministic": True}):
        assert "max_deterministic" in str(jax.make_jaxpr(f)(x))
        np.testing.assert_array_equal(to_f64(f(x)), ref.pool(to_f64(x), (2, 2)))
    assert "max_deterministic" not in str(jax.make_jaxpr(f)(x))


# ---------------------------------------------------------------------------------------
# jit and vmap
# ---------------------------------------------------------------------------------------
@configs
@modes
def test_jit(rng, config, mode):
    shape, ws, stride, pad, fmt = _setup(config, "channels_last")
    x = ref.distinct_values(rng, shape, fmt)
    f = jax.jit(dnn_pool, static_argnames=("ws", "stride", "mode", "pad", "data_format"))
    y = f(jnp.asarray(x), ws=ws, stride=stride, mode=mode, pad=pad, data_format=fmt)
    np.testing.assert_allclose(to_f64(y), ref.pool(x, ws, stride, pad, mode, fmt), rtol=1e-12)
    w = rng.standard_normal(y.shape)
    g = jax.jit(jax.grad(lambda t: jnp.sum(dnn_pool(t, ws, stride, mode, pad, fmt) * w)))(
        jnp.asarray(x))
    np.testing.assert_allclose(to_f64(g), ref.pool_grad(x, w, ws, stride, pad, mode, fmt),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("axis", [0, 1, 3, 4])
@pytest.mark.parametrize("mode", ["max", "average_exc_pad", "sum"])
@layouts
def test_vmap_stacked_2d(rng, axis, mode, layout):
    cf_shape, ws, stride, pad = (1, 2, 5, 4), (3, 2), (2, 1), (1, 1)
    fmt = _fmt(2, layout)
    base = _shape(cf_shape, fmt)
    stacked = list(base)
    stacked.insert(axis, 3)
    xs = np.stack([ref.distinct_values(rng, base, fmt) for _ in range(3)], axis=axis)
    assert xs.shape == tuple(stacked)
    f = _pool_fn(ws, stride, pad, mode, fmt)
    ys = jax.vmap(f, in_axes=axis)(jnp.asarray(xs))
    for i in range(3):
        xi = np.take(xs, i, axis=axis)
        np.testing.assert_allclose(to_f64(ys[i]), ref.pool(xi, ws, stride, pad, mode, fmt),
                                   rtol=1e-12)
        np.testing.assert_array_equal(to_f64(ys[i]), to_f64(f(jnp.asarray(xi))))  # = a loop


@pytest.mark.parametrize("axis", [0, 2, 5])
@pytest.mark.parametrize("mode", ["max", "average_inc_pad"])
def test_vmap_stacked_3d(rng, axis, mode):
    base, ws, stride, pad = (1, 2, 3, 4, 4), (2, 2, 2), (2, 1, 1), (1, 0, 0)
    xs = np.stack([ref.distinct_values(rng, base) for _ in range(2)], axis=axis)
    ys = jax.vmap(lambda t: dnn_pool(t, ws, stride, mode, pad), in_axes=axis, out_axes=-1)(
        jnp.asarray(xs))
    for i in range(2):
        np.testing.assert_allclose(to_f64(ys[..., i]),
                                   ref.pool(np.take(xs, i, axis=axis), ws, stride, pad, mode),
                                   rtol=1e-12)


@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0), (3, 1)])
@modes
def test_vmap_of_grad(rng, in_axes, mode):
    base, ws, stride, pad = (1, 2, 5, 5), (3, 3), (2, 2), (1, 1)
    out = ref.pool_output_shape(base[2:], ws, stride, pad)
    out_base = base[:2] + out
    b = 3
    xs = (ref.distinct_values(rng, base) if in_axes[0] is None else
          np.stack([ref.distinct_values(rng, base) for _ in range(b)], axis=in_axes[0]))
    ws_ = (rng.standard_normal(out_base) if in_axes[1] is None else
           np.stack([rng.standard_normal(out_base) for _ in range(b)], axis=in_axes[1]))
    loss = lambda x, w: jnp.sum(dnn_pool(x, ws, stride, mode, pad) * w)
    gs = jax.vmap(jax.grad(loss), in_axes=in_axes)(jnp.asarray(xs), jnp.asarray(ws_))
    assert gs.shape == (b,) + base
    for i in range(b):
        x = xs if in_axes[0] is None else np.take(xs, i, axis=in_axes[0])
        w = ws_ if in_axes[1] is None else np.take(ws_, i, axis=in_axes[1])
        np.testing.assert_allclose(to_f64(gs[i]), ref.pool_grad(x, w, ws, stride, pad, mode),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["max", "average_exc_pad"])
def test_vmap_of_grad_3d_channels_last(rng, mode):
    base, ws, stride, pad, fmt = (1, 3, 4, 3, 2), (2, 2, 2), (2, 1, 1), (1, 0, 0), "NDHWC"
    xs = np.stack([ref.distinct_values(rng, base, fmt) for _ in range(2)], axis=0)
    loss = lambda x: jnp.sum(dnn_pool(x, ws, stride, mode, pad, fmt) ** 2)
    gs = jax.vmap(jax.grad(loss))(jnp.asarray(xs))
    for i in range(2):
        y = ref.pool(xs[i], ws, stride, pad, mode, fmt)
        np.testing.assert_allclose(to_f64(gs[i]),
                                   ref.pool_grad(xs[i], 2 * y, ws, stride, pad, mode, fmt),
                                   rtol=1e-12, atol=1e-14)


@linear_modes
def test_vmap_of_jvp_linear(rng, mode):
    x = rng.standard_normal((2, 1, 2, 4, 4))
    t = rng.standard_normal((2, 1, 2, 4, 4))
    f = lambda z: dnn_pool(z, (2, 2), (2, 2), mode)
    _, ty = jax.vmap(lambda a, b: jax.jvp(f, (a,), (b,)))(jnp.asarray(x), jnp.asarray(t))
    for i in range(2):
        np.testing.assert_allclose(to_f64(ty[i]), ref.pool(t[i], (2, 2), (2, 2), None, mode),
                                   rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Zero-size batch
# ---------------------------------------------------------------------------------------
@modes
@pytest.mark.parametrize("shape,ws,fmt", [((0, 2, 5, 5), (3, 3), None),
                                          ((0, 5, 5, 2), (3, 3), "NHWC"),
                                          ((0, 2, 3, 4, 4), (2, 2, 2), None)])
def test_zero_size_batch(mode, shape, ws, fmt):
    x = jnp.zeros(shape, jnp.float32)
    f = lambda t: dnn_pool(t, ws, mode=mode, data_format=fmt)
    y = f(x)
    assert y.shape == _out_shape(shape, ws, None, None, fmt or ("NCHW" if len(ws) == 2 else "NCDHW"))
    assert jax.jit(f)(x).shape == y.shape
    assert jax.grad(lambda t: jnp.sum(f(t)))(x).shape == shape


# ---------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------
X4 = jnp.zeros((1, 2, 5, 5), jnp.float32)
X5 = jnp.zeros((1, 2, 4, 4, 4), jnp.float32)


@pytest.mark.parametrize("kwargs,name", [
    (dict(ws=(2, 2), stride=(1, 1, 1)), "stride"),
    (dict(ws=(2, 2), stride=(1,)), "stride"),
    (dict(ws=(2, 2), pad=(0, 0, 0)), "pad"),
    (dict(ws=(2, 2), pad=(1,)), "pad"),
    (dict(ws=(2, 2), pad=(2, 0)), "pad"),      # pad == window
    (dict(ws=(3, 3), pad=(1, 3)), "pad"),      # pad > window
    (dict(ws=(2, 2), pad=(-1, 0)), "pad"),
    (dict(ws=(2, 2), stride=(0, 1)), "stride"),
    (dict(ws=(2, 2), stride=(1, -2)), "stride"),
    (dict(ws=(2, 2), mode="maximum"), "mode"),
    (dict(ws=(2, 2), mode="avg"), "mode"),
    (dict(ws=(0, 2)), "ws"),
    (dict(ws=(2,)), "ws"),
    (dict(ws=(2, 2, 2, 2)), "ws"),
    (dict(ws=(2, 2), data_format="NDHWC"), "data_format"),
    (dict(ws=(2, 2), data_format="NCW"), "data_format"),
])
def test_bad_arguments_2d(kwargs, name):
    with pytest.raises(ValueError, match=name):
        dnn_pool(X4, **kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(ws=(2, 2, 2), stride=(1, 1)), "stride"),
    (dict(ws=(2, 2, 2), pad=(1, 1)), "pad"),
    (dict(ws=(2, 2, 2), pad=(0, 2, 0)), "pad"),
    (dict(ws=(2, 2, 2), stride=(1, 0, 1)), "stride"),
    (dict(ws=(2, 2, 2), data_format="NHWC"), "data_format"),
])
def test_bad_arguments_3d(kwargs, name):
    with pytest.raises(ValueError, match=name):
        dnn_pool(X5, **kwargs)


@pytest.mark.parametrize("img,ws", [(X4, (2, 2, 2)), (X5, (2, 2)),
                                    (jnp.zeros((2, 5, 5)), (2, 2)),
                                    (jnp.zeros((1, 1, 1, 5, 5, 5)), (2, 2, 2))])
def test_wrong_rank(img, ws):
    with pytest.raises(ValueError, match="img"):
        dnn_pool(img, ws)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_, jnp.int64])
def test_integer_dtype(dtype):
    with pytest.raises(TypeError, match="img"):
        dnn_pool(jnp.zeros((1, 2, 5, 5), dtype), (2, 2))


@pytest.mark.parametrize("shape,ws,pad,fmt", [
    ((1, 2, 3, 5), (4, 2), (0, 0), None),
    ((1, 2, 3, 5), (6, 2), (1, 0), None),     # 3 + 2*1 < 6
    ((1, 5, 3, 2), (2, 4), (0, 0), "NHWC"),   # W = 3 < 4
    ((1, 2, 2, 5, 5), (3, 2, 2), (0, 0, 0), None),
])
def test_window_larger_than_padded_image(shape, ws, pad, fmt):
    with pytest.raises(ValueError, match="ws"):
        dnn_pool(jnp.zeros(shape, jnp.float32), ws, pad=pad, data_format=fmt)


def test_window_equal_to_padded_image_is_fine(rng):
    x = rng.standard_normal((1, 1, 3, 4))
    y = dnn_pool(jnp.asarray(x), (5, 4), pad=(1, 0), mode="average_exc_pad")
    assert y.shape == (1, 1, 1, 1)
    np.testing.assert_allclose(to_f64(y), ref.pool(x, (5, 4), None, (1, 0), "average_exc_pad"),
                               rtol=1e-12)


def test_ws_not_a_sequence():
    with pytest.raises(TypeError, match="ws"):
        dnn_pool(X4, 2)


def test_errors_raise_under_jit():
    with pytest.raises(ValueError, match="pad"):
        jax.jit(lambda t: dnn_pool(t, (2, 2), pad=(2, 2)))(X4)


def test_no_cudnn_custom_call_on_the_xla_path():
    with xla_path():
        text = jax.jit(lambda t: dnn_pool(t, (2, 2))).lower(X4).as_text()
    assert "jaxdnn_pool_fwd" not in text


# ---------------------------------------------------------------------------------------
# GPU: the cuDNN path against the XLA path and the float64 reference
# ---------------------------------------------------------------------------------------
GPU_CONFIGS = {
    "2d-w33-s22-p11": ((2, 4, 9, 8), (3, 3), (2, 2), (1, 1)),
    "2d-w23-s12-p01": ((2, 4, 8, 9), (2, 3), (1, 2), (0, 1)),
    "2d-w22-defaults": ((2, 3, 6, 7), (2, 2), None, None),
    "3d-w222-s211-p100": ((2, 3, 5, 6, 6), (2, 2, 2), (2, 1, 1), (1, 0, 0)),
    "3d-w322-s121-p110": ((2, 3, 5, 6, 4), (3, 2, 2), (1, 2, 1), (1, 1, 0)),
}
gpu_configs = pytest.mark.parametrize("config", list(GPU_CONFIGS))


def _gpu_setup(config, layout):
    cf_shape, ws, stride, pad = GPU_CONFIGS[config]
    fmt = _fmt(len(ws), layout)
    return _shape(cf_shape, fmt), ws, stride, pad, fmt


@pytest.mark.gpu
@dtypes
@gpu_configs
@modes
@layouts
def test_gpu_forward_cudnn_vs_xla_vs_reference(rng, dtype, config, mode, layout):
    shape, ws, stride, pad, fmt = _gpu_setup(config, layout)
    xj, x64 = cast(ref.distinct_values(rng, shape, fmt), dtype)
    f = _pool_fn(ws, stride, pad, mode, fmt)
    assert "jaxdnn_pool_fwd" in jax.jit(f).lower(xj).as_text()
    y_cudnn = _jit_run(f, xj)
    y_xla = _jit_run(f, xj, xla=True)
    assert y_cudnn.dtype == jnp.dtype(dtype)
    assert y_cudnn.shape == _out_shape(shape, ws, stride, pad, fmt)
    expected = ref.pool(x64, ws, stride, pad, mode, fmt)
    assert_close(y_cudnn, expected, dtype, err_msg="cuDNN vs float64 reference")
    assert_close(y_xla, expected, dtype, err_msg="XLA path vs float64 reference")
    assert_close(y_cudnn, y_xla, dtype, factor=2, err_msg="cuDNN vs XLA path")


@pytest.mark.gpu
@dtypes
@gpu_configs
@modes
@layouts
def test_gpu_gradient_cudnn_vs_xla_vs_reference(rng, dtype, config, mode, layout):
    shape, ws, stride, pad, fmt = _gpu_setup(config, layout)
    xj, x64 = cast(ref.distinct_values(rng, shape, fmt), dtype)
    f = _pool_fn(ws, stride, pad, mode, fmt)
    dyj, dy64 = cast(rng.standard_normal(_out_shape(shape, ws, stride, pad, fmt)), dtype)

    def vjp(x, dy):
        return jax.vjp(f, x)[1](dy)[0]

    text = jax.jit(vjp).lower(xj, dyj).as_text()
    assert ("jaxdnn_pool_bwd" in text) or ("jaxdnn_pool_bwd_linear" in text)
    dx_cudnn = _jit_run(vjp, xj, dyj)
    dx_xla = _jit_run(vjp, xj, dyj, xla=True)
    assert dx_cudnn.dtype == jnp.dtype(dtype) and dx_cudnn.shape == shape
    expected = ref.pool_grad(x64, dy64, ws, stride, pad, mode, fmt)
    assert_close(dx_cudnn, expected, dtype, err_msg="cuDNN vs float64 reference")
    assert_close(dx_xla, expected, dtype, err_msg="XLA path vs float64 reference")
    assert_close(dx_cudnn, dx_xla, dtype, factor=2, err_msg="cuDNN vs XLA path")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_xla_max_gradient_is_bitwise_reproducible(rng, dtype):
    """The XLA path's max-pool gradient has no atomic adds: repeated runs on the GPU agree
    bit for bit (overlapping 3x3/2 windows, where a scatter would race)."""
    xj, _ = cast(rng.standard_normal((8, 16, 57, 57)), dtype)
    dyj, _ = cast(rng.standard_normal((8, 16, 29, 29)), dtype)
    f = _pool_fn((3, 3), (2, 2), (1, 1), "max", "NCHW")
    with xla_path():
        grad = jax.jit(lambda a, b: jax.vjp(f, a)[1](b)[0])
        assert "jaxdnn_pool" not in grad.lower(xj, dyj).as_text()
        runs = [np.asarray(grad(xj, dyj)).tobytes() for _ in range(5)]
    assert all(r == runs[0] for r in runs[1:])


@pytest.mark.gpu
@modes
@pytest.mark.parametrize("ws", [(2, 2), (2, 2, 2)])
def test_gpu_hlo_contains_cudnn_custom_call(mode, ws):
    x = jnp.ones((2, 3, 6, 6) if len(ws) == 2 else (2, 3, 4, 6, 6), jnp.float32)
    f = lambda t: dnn_pool(t, ws, mode=mode)
    assert "jaxdnn_pool_fwd" in jax.jit(f).lower(x).as_text()
    with xla_path():
        assert "jaxdnn_pool_fwd" not in jax.jit(f).lower(x).as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["2d-w33-s22-p11", "3d-w222-s211-p100"])
@modes
def test_gpu_check_grads(rng, config, mode):
    cf_shape, ws, stride, pad = CONFIGS[config]
    x = jnp.asarray(ref.distinct_values(rng, cf_shape))
    f = _pool_fn(ws, stride, pad, mode, None)
    check_grads(f, (x,), order=1, modes=["rev"])
    if mode in LINEAR_MODES:
        check_grads(f, (x,), order=2, modes=["fwd", "rev"])


@pytest.mark.gpu
@pytest.mark.parametrize("axis", [0, 1, 3])
@modes
def test_gpu_vmap(rng, axis, mode):
    base, ws, stride, pad = (2, 4, 9, 8), (3, 3), (2, 2), (1, 1)
    xs = np.stack([ref.distinct_values(rng, base) for _ in range(3)], axis=axis)
    ys = jax.jit(jax.vmap(lambda t: dnn_pool(t, ws, stride, mode, pad), in_axes=axis))(
        jnp.asarray(xs, jnp.float32))
    for i in range(3):
        assert_close(ys[i], ref.pool(np.take(xs, i, axis=axis), ws, stride, pad, mode),
                     "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0), (3, 1)])
@modes
def test_gpu_vmap_of_grad(rng, in_axes, mode):
    base, ws, stride, pad = (2, 4, 9, 8), (3, 3), (2, 2), (1, 1)
    out_base = base[:2] + ref.pool_output_shape(base[2:], ws, stride, pad)
    b = 3
    xs = (ref.distinct_values(rng, base) if in_axes[0] is None else
          np.stack([ref.distinct_values(rng, base) for _ in range(b)], axis=in_axes[0]))
    ws_ = (rng.standard_normal(out_base) if in_axes[1] is None else
           np.stack([rng.standard_normal(out_base) for _ in range(b)], axis=in_axes[1]))
    loss = lambda x, w: jnp.sum(dnn_pool(x, ws, stride, mode, pad) * w)
    gs = jax.jit(jax.vmap(jax.grad(loss), in_axes=in_axes))(jnp.asarray(xs), jnp.asarray(ws_))
    for i in range(b):
        x = xs if in_axes[0] is None else np.take(xs, i, axis=in_axes[0])
        w = ws_ if in_axes[1] is None else np.take(ws_, i, axis=in_axes[1])
        assert_close(gs[i], ref.pool_grad(x, w, ws, stride, pad, mode), "float64", factor=10)


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["mode", "flag"])
@pytest.mark.parametrize("enabled", ["auto", True])
def test_gpu_max_deterministic_gradient_is_bitwise_reproducible(how, enabled):
    """max_deterministic (or max under dnn.deterministic) gives the same gradient bit for
    bit on every run: on 'auto' through the XLA path's gathers, under dnn.enabled=True
    through cuDNN's deterministic backward."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 16, 64, 64)), jnp.float32)
    mode = "max_deterministic" if how == "mode" else "max"
    flags = {"dnn.enabled": enabled, **({"dnn.deterministic": True} if how == "flag" else {})}

    def run():
        # a fresh trace each time, under the flags
        loss = lambda t, w: jnp.sum(dnn_pool(t, (3, 3), (2, 2), mode, (1, 1)) * w)
        grad = jax.jit(jax.grad(loss))
        w = jnp.asarray(np.random.default_rng(2).standard_normal((8, 16, 32, 32)), jnp.float32)
        with jaxdnn.config.override(**flags):
            text = grad.lower(x, w).as_text()
            out = grad(x, w)
        if enabled is True:
            assert "jaxdnn_pool_bwd" in text and "max_deterministic" in text
        else:
            assert "jaxdnn_pool_bwd" not in text
        return np.asarray(out)

    results = [run() for _ in range(3)]
    for r in results[1:]:
        assert np.array_equal(r, results[0])
    # and they are right: against the float64 oracle (no ties on continuous data)
    w = np.random.default_rng(2).standard_normal((8, 16, 32, 32)).astype(np.float32)
    expected = ref.pool_grad(np.asarray(x, np.float64), w.astype(np.float64), (3, 3), (2, 2),
                             (1, 1), "max", "NCHW")
    np.testing.assert_allclose(results[0], expected, rtol=1e-5, atol=1e-5)
