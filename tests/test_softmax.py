"""dnn_softmax / dnn_log_softmax against independent NumPy float64 references."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from oracles import pooling_softmax as ref
from helpers import FLOAT_DTYPES, assert_close, cast, to_f64, xla_path
from helpers import jit_run as _jit_run
import jaxdnn.softmax
from jaxdnn import dnn_log_softmax, dnn_softmax

ALGOS = ("fast", "accurate", "log")
MODES = ("channel", "instance")
# (shape, data_format): a 2-D (N, C) matrix and 4-D images in both layouts.
LAYOUTS = {
    "2d": ((2, 3), "NCHW"),
    "NCHW": ((2, 3, 4, 5), "NCHW"),
    "NHWC": ((2, 4, 5, 3), "NHWC"),
}
SMALL_LAYOUTS = {  # for the finite-difference checks
    "2d": ((2, 3), "NCHW"),
    "NCHW": ((2, 3, 2, 3), "NCHW"),
    "NHWC": ((2, 2, 3, 3), "NHWC"),
}

dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES)
algos = pytest.mark.parametrize("algo", ALGOS)
modes = pytest.mark.parametrize("mode", MODES)
layouts = pytest.mark.parametrize("layout", list(LAYOUTS))
small_layouts = pytest.mark.parametrize("layout", list(SMALL_LAYOUTS))


# Tests about the routes themselves, which pick their own.
ONE_ROUTE_TESTS = {"test_xla_route_of_32_and_64_bit_floats_is_jax_nn_itself",
                   "test_xla_route_of_16_bit_floats_is_the_primitives",
                   "test_reverse_mode_runs_the_softmax_backward_pass"}


def pytest_generate_tests(metafunc):
    """The tests without a GPU run once on each XLA route (below); the GPU tests, which
    force cuDNN where the route does not matter, once."""
    if (metafunc.definition.get_closest_marker("gpu") is None
            and metafunc.function.__name__ not in ONE_ROUTE_TESTS):
        metafunc.parametrize("xla_route", ["jax.nn", "primitives"], indirect=True)


@pytest.fixture(autouse=True)
def xla_route(request, monkeypatch):
    """Where a call takes XLA's path, float32 and float64 arrays run jax.nn.softmax itself
    (jaxdnn/softmax.py, _JAX_NN_DTYPES). 'primitives' turns that off, so that the
    primitives' XLA lowering and their differentiation and batching rules, which the cuDNN
    path shares, stay tested in those dtypes too."""
    route = getattr(request, "param", "jax.nn")
    if route == "primitives":
        monkeypatch.setattr(jaxdnn.softmax, "_JAX_NN_DTYPES", ())
    return route


def _data(rng, shape, scale=2.0):
    return rng.standard_normal(shape) * scale


def _softmax_fn(algo, mode, fmt):
    return functools.partial(dnn_softmax, algo=algo, mode=mode, data_format=fmt)


# ---------------------------------------------------------------------------------------
# The oracle itself, against SciPy (so a wrong reference cannot hide a wrong library).
# ---------------------------------------------------------------------------------------
@modes
@layouts
def test_reference_agrees_with_scipy(rng, mode, layout):
    shape, fmt = LAYOUTS[layout]
    x = _data(rng, shape)
    if len(shape) == 2:
        axes = (1,)
    elif mode == "channel":
        axes = (3,) if fmt == "NHWC" else (1,)
    else:
        axes = (1, 2, 3)
    np.testing.assert_allclose(ref.softmax(x, "accurate", mode, fmt),
                               scipy.special.softmax(x, axis=axes), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ref.softmax(x, "log", mode, fmt),
                               scipy.special.log_softmax(x, axis=axes), rtol=1e-13, atol=1e-13)
    # The VJP reference against a central finite difference of the forward reference.
    dy = rng.standard_normal(shape)
    v = rng.standard_normal(shape)
    for algo in ("accurate", "log"):
        eps = 1e-6
        fd = (np.sum(ref.softmax(x + eps * v, algo, mode, fmt) * dy)
              - np.sum(ref.softmax(x - eps * v, algo, mode, fmt) * dy)) / (2 * eps)
        np.testing.assert_allclose(np.sum(ref.softmax_grad(x, dy, algo, mode, fmt) * v), fd,
                                   rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
@dtypes
@algos
@modes
@layouts
def test_forward(rng, dtype, algo, mode, layout):
    shape, fmt = LAYOUTS[layout]
    xj, x64 = cast(_data(rng, shape), dtype)
    y = dnn_softmax(xj, algo=algo, mode=mode, data_format=fmt)
    assert y.shape == shape
    assert y.dtype == jnp.dtype(dtype)
    assert_close(y, ref.softmax(x64, algo, mode, fmt), dtype)


@pytest.mark.parametrize("algo", ["accurate", "log"])
def test_channels_last_single_pixel_column_normalizes_channels(algo):
    """Found by tests/test_fuzz.py (softmax seed 33): an NHWC batch of H x 1 images with one
    channel, whose shape (N, H, 1, 1) looks like NCHW 1x1 images, was normalized over H on
    the XLA path instead of over its single channel."""
    x = np.random.default_rng(33).standard_normal((3, 3, 1, 1))
    expected = ref.softmax(x, algo, "channel", "NHWC")  # 1 (accurate) / 0 (log) everywhere
    with xla_path():
        got = dnn_softmax(jnp.asarray(x), algo=algo, data_format="NHWC")
    np.testing.assert_allclose(to_f64(got), expected, atol=1e-12)


def test_defaults_are_accurate_channel_nchw(rng):
    x = _data(rng, (2, 3, 2, 2))
    np.testing.assert_allclose(to_f64(dnn_softmax(jnp.asarray(x))),
                               ref.softmax(x, "accurate", "channel", "NCHW"), rtol=1e-12)
    # probabilities: sums to one over C at every pixel
    np.testing.assert_allclose(np.sum(to_f64(dnn_softmax(jnp.asarray(x))), axis=1), 1.0,
                               rtol=1e-12)


def test_instance_mode_sums_to_one_per_image(rng):
    x = _data(rng, (2, 3, 2, 4))
    y = to_f64(dnn_softmax(jnp.asarray(x), mode="instance"))
    np.testing.assert_allclose(y.sum(axis=(1, 2, 3)), 1.0, rtol=1e-12)
    np.testing.assert_allclose(y, ref.softmax(x, "accurate", "instance"), rtol=1e-12)


@algos
@modes
def test_2d_input_layout_independent(rng, algo, mode):
    """A 2-D (N, C) input means the same thing whatever the data_format."""
    x = _data(rng, (2, 3))
    expected = ref.softmax(x, algo, mode)
    for fmt in ("NCHW", "NHWC"):
        y = dnn_softmax(jnp.asarray(x), algo=algo, mode=mode, data_format=fmt)
        assert y.shape == (2, 3)
        np.testing.assert_allclose(to_f64(y), expected, rtol=1e-12, atol=1e-14)


def test_2d_channel_equals_instance(rng):
    """With H = W = 1 both modes normalize over C."""
    x = _data(rng, (2, 3))
    np.testing.assert_allclose(to_f64(dnn_softmax(jnp.asarray(x), mode="channel")),
                               to_f64(dnn_softmax(jnp.asarray(x), mode="instance")), rtol=1e-12)


@modes
@layouts
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_log_softmax(rng, mode, layout, dtype):
    shape, fmt = LAYOUTS[layout]
    xj, x64 = cast(_data(rng, shape), dtype)
    y = dnn_log_softmax(xj, mode=mode, data_format=fmt)
    assert y.dtype == jnp.dtype(dtype) and y.shape == shape
    assert_close(y, ref.softmax(x64, "log", mode, fmt), dtype)
    assert_close(y, np.log(ref.softmax(x64, "accurate", mode, fmt)), dtype)


def test_log_softmax_default_mode(rng):
    x = _data(rng, (2, 3, 2, 2))
    np.testing.assert_allclose(to_f64(dnn_log_softmax(jnp.asarray(x))),
                               ref.softmax(x, "log", "channel"), rtol=1e-12)


@pytest.mark.parametrize("algo", ["accurate", "log"])
def test_large_inputs_accurate_and_log_stay_finite(algo):
    """'accurate' and 'log' subtract the maximum: huge logits do not overflow ('fast'
    makes no such promise)."""
    x = np.array([[1000.0, 999.0, 998.0], [-1000.0, -1001.0, -999.0]])
    y = to_f64(dnn_softmax(jnp.asarray(x, jnp.float32), algo=algo))
    assert np.all(np.isfinite(y))
    assert_close(y, ref.softmax(x, algo), "float32")


@algos
@modes
@layouts
def test_xla_path_gives_the_same_numbers(rng, algo, mode, layout):
    """dnn.enabled=False (always XLA) agrees with the default path and the reference."""
    shape, fmt = LAYOUTS[layout]
    xj, x64 = cast(_data(rng, shape), "float32")
    expected = ref.softmax(x64, algo, mode, fmt)
    y_default = dnn_softmax(xj, algo=algo, mode=mode, data_format=fmt)
    with xla_path():
        y_xla = dnn_softmax(xj, algo=algo, mode=mode, data_format=fmt)
    assert_close(y_default, expected, "float32")
    assert_close(y_xla, expected, "float32")
    assert_close(y_xla, y_default, "float32")


def _step_program(fn, x):
    """The StableHLO of fn's forward and its VJP for a given cotangent, without locations."""
    def step(x, ct):
        y, vjp = jax.vjp(fn, x)
        return y, vjp(ct)[0]
    return jax.jit(step).lower(x, x).as_text()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("algo,jax_fn", [("accurate", jax.nn.softmax),
                                         ("log", jax.nn.log_softmax)])
@pytest.mark.parametrize("shape,fmt,axis", [((6, 10), "NCHW", -1), ((2, 3, 4, 5), "NCHW", 1),
                                            ((2, 4, 5, 3), "NHWC", -1)])
def test_xla_route_of_32_and_64_bit_floats_is_jax_nn_itself(dtype, algo, jax_fn, shape, fmt,
                                                            axis):
    """On XLA's path, float32 and float64 softmax compile to jax.nn's own program, forward
    and backward: XLA built faster programs from it than from the primitives' formulation
    (BENCHMARKS.md, "Softmax and batch norm where models use them")."""
    x = jnp.ones(shape, dtype)
    ours = _step_program(lambda x: dnn_softmax(x, algo=algo, data_format=fmt), x)
    theirs = _step_program(lambda x: jax_fn(x, axis=axis), x)
    assert ours == theirs


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_xla_route_of_16_bit_floats_is_the_primitives(dtype):
    """16-bit softmax keeps the primitives' float32 arithmetic on XLA's path, which was
    the faster of the two there."""
    jaxpr = str(jax.make_jaxpr(lambda x: jax.vjp(dnn_softmax, x)[1](x))(
        jnp.ones((2, 3, 4, 5), dtype)))
    assert "jaxdnn_softmax_fwd" in jaxpr and "jaxdnn_softmax_bwd" in jaxpr, jaxpr


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------
@dtypes
@algos
@modes
@layouts
def test_vjp_vs_reference(rng, dtype, algo, mode, layout):
    shape, fmt = LAYOUTS[layout]
    xj, x64 = cast(_data(rng, shape), dtype)
    dyj, dy64 = cast(rng.standard_normal(shape), dtype)
    y, vjp = jax.vjp(_softmax_fn(algo, mode, fmt), xj)
    (dx,) = vjp(dyj)
    assert dx.shape == shape and dx.dtype == jnp.dtype(dtype)
    assert_close(y, ref.softmax(x64, algo, mode, fmt), dtype)
    assert_close(dx, ref.softmax_grad(x64, dy64, algo, mode, fmt), dtype)


@algos
@modes
@small_layouts
def test_check_grads_first_order(rng, algo, mode, layout):
    shape, fmt = SMALL_LAYOUTS[layout]
    x = jnp.asarray(_data(rng, shape, 1.0))
    check_grads(_softmax_fn(algo, mode, fmt), (x,), order=1, modes=["rev"])


@algos
@modes
@small_layouts
def test_check_grads_second_order(rng, algo, mode, layout):
    shape, fmt = SMALL_LAYOUTS[layout]
    x = jnp.asarray(_data(rng, shape, 1.0))
    check_grads(_softmax_fn(algo, mode, fmt), (x,), order=2, modes=["fwd", "rev"])


@algos
@modes
def test_hessian_vs_finite_difference_of_reference_gradient(rng, algo, mode):
    """grad of grad against a central difference of the NumPy gradient reference."""
    shape, fmt = (1, 3, 1, 2), "NCHW"
    x = _data(rng, shape, 1.0)
    w = rng.standard_normal(shape)
    # reverse over reverse (jax.hessian is forward over reverse: see below)
    hess = jax.jit(jax.jacrev(jax.grad(
        lambda t: jnp.sum(dnn_softmax(t, algo=algo, mode=mode) * w))))(jnp.asarray(x))
    hess = to_f64(hess).reshape(x.size, x.size)
    eps = 1e-6
    fd = np.empty((x.size, x.size))
    for j in range(x.size):
        e = np.zeros(x.size)
        e[j] = eps
        e = e.reshape(shape)
        fd[:, j] = ((ref.softmax_grad(x + e, w, algo, mode, fmt)
                     - ref.softmax_grad(x - e, w, algo, mode, fmt)) / (2 * eps)).ravel()
    np.testing.assert_allclose(hess, fd, rtol=1e-5, atol=1e-7)


@algos
@modes
@small_layouts
def test_jvp_vs_central_difference_of_the_oracle(rng, algo, mode, layout):
    """Forward mode: J t against (softmax(x + eps t) - softmax(x - eps t)) / 2 eps."""
    shape, fmt = SMALL_LAYOUTS[layout]
    x, t = _data(rng, shape, 1.0), rng.standard_normal(shape)
    y, tangent = jax.jit(lambda x, t: jax.jvp(_softmax_fn(algo, mode, fmt), (x,), (t,)))(
        jnp.asarray(x), jnp.asarray(t))
    eps = 1e-6
    fd = (ref.softmax(x + eps * t, algo, mode, fmt) - ref.softmax(x - eps * t, algo, mode, fmt))
    np.testing.assert_allclose(to_f64(y), ref.softmax(x, algo, mode, fmt), rtol=1e-12)
    np.testing.assert_allclose(to_f64(tangent), fd / (2 * eps), rtol=1e-6, atol=1e-8)


@algos
def test_forward_over_reverse_hessian(rng, algo):
    """jax.hessian (forward over reverse) equals reverse over reverse, which the test above
    checks against the oracle's central differences."""
    x = jnp.asarray(_data(rng, (1, 3, 1, 2), 1.0))
    w = jnp.asarray(rng.standard_normal((1, 3, 1, 2)))
    loss = lambda t: jnp.sum(dnn_softmax(t, algo=algo) * w)
    np.testing.assert_allclose(to_f64(jax.jit(jax.hessian(loss))(x)),
                               to_f64(jax.jit(jax.jacrev(jax.grad(loss)))(x)), rtol=1e-10,
                               atol=1e-12)


def test_reverse_mode_runs_the_softmax_backward_pass(rng, monkeypatch):
    """The gradient transposes the forward's tangent into softmax_bwd (cudnnSoftmaxBackward
    on the cuDNN path), for log-softmax too: no other primitive in the backward."""
    monkeypatch.setattr(jaxdnn.softmax, "_JAX_NN_DTYPES", ())  # the primitives' route
    x = jnp.ones((2, 3, 4, 5), jnp.float32)
    for algo in ALGOS:
        text = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(jnp.sin(
            dnn_softmax(x, algo=algo)))))(x))
        assert "jaxdnn_softmax_bwd" in text and "jaxdnn_softmax_tangent" not in text, text
        assert "impl=xla" in text and "impl=cudnn" not in text  # the forward's, kept


# ---------------------------------------------------------------------------------------
# jit and vmap
# ---------------------------------------------------------------------------------------
@algos
@modes
@layouts
def test_jit(rng, algo, mode, layout):
    shape, fmt = LAYOUTS[layout]
    x = _data(rng, shape)
    f = jax.jit(dnn_softmax, static_argnames=("algo", "mode", "data_format"))
    y = f(jnp.asarray(x), algo=algo, mode=mode, data_format=fmt)
    np.testing.assert_allclose(to_f64(y), ref.softmax(x, algo, mode, fmt), rtol=1e-12, atol=1e-13)
    w = rng.standard_normal(shape)
    g = jax.jit(jax.grad(lambda t: jnp.sum(dnn_softmax(t, algo, mode, fmt) * w)))(jnp.asarray(x))
    np.testing.assert_allclose(to_f64(g), ref.softmax_grad(x, w, algo, mode, fmt),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 3, 4])
@pytest.mark.parametrize("algo", ["accurate", "log"])
@modes
@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_vmap_stacked_5d(rng, axis, algo, mode, fmt):
    base = (2, 3, 2, 4) if fmt == "NCHW" else (2, 2, 4, 3)
    stacked_shape = list(base)
    stacked_shape.insert(axis, 3)
    xs = _data(rng, tuple(stacked_shape))
    f = _softmax_fn(algo, mode, fmt)
    ys = jax.vmap(f, in_axes=axis)(jnp.asarray(xs))
    assert ys.shape == (3,) + base
    loop = np.stack([to_f64(f(jnp.asarray(np.take(xs, i, axis=axis)))) for i in range(3)])
    expected = np.stack([ref.softmax(np.take(xs, i, axis=axis), algo, mode, fmt)
                         for i in range(3)])
    np.testing.assert_allclose(to_f64(ys), expected, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(to_f64(ys), loop, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("axis", [0, 1, 2])
@algos
def test_vmap_2d_input(rng, axis, algo):
    stacked_shape = [2, 3]
    stacked_shape.insert(axis, 4)
    xs = _data(rng, tuple(stacked_shape))
    ys = jax.vmap(lambda t: dnn_softmax(t, algo=algo), in_axes=axis, out_axes=1)(jnp.asarray(xs))
    assert ys.shape == (2, 4, 3)
    for i in range(4):
        np.testing.assert_allclose(to_f64(ys[:, i]), ref.softmax(np.take(xs, i, axis=axis), algo),
                                   rtol=1e-12, atol=1e-13)


def test_nested_vmap(rng):
    xs = _data(rng, (2, 3, 2, 3, 2, 2))  # two stacking axes: 0 and (after it) 1
    f = jax.vmap(jax.vmap(lambda t: dnn_softmax(t, mode="instance")))
    ys = to_f64(f(jnp.asarray(xs)))
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(ys[i, j], ref.softmax(xs[i, j], "accurate", "instance"),
                                       rtol=1e-12, atol=1e-13)


def _stacked_data(rng, base, axis, size):
    """Data of shape `base`, or `size` of them stacked along `axis` (None: unstacked)."""
    if axis is None:
        return _data(rng, base)
    shape = list(base)
    shape.insert(axis, size)
    return _data(rng, tuple(shape))


@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0), (3, 1)])
@algos
@modes
def test_vmap_of_grad(rng, in_axes, algo, mode):
    base = (2, 3, 2, 2)
    b = 3

    xs, ws = (_stacked_data(rng, base, axis, b) for axis in in_axes)
    loss = lambda x, w: jnp.sum(dnn_softmax(x, algo=algo, mode=mode) * w)
    gs = jax.vmap(jax.grad(loss), in_axes=in_axes)(jnp.asarray(xs), jnp.asarray(ws))
    assert gs.shape == (b,) + base
    for i in range(b):
        x = xs if in_axes[0] is None else np.take(xs, i, axis=in_axes[0])
        w = ws if in_axes[1] is None else np.take(ws, i, axis=in_axes[1])
        np.testing.assert_allclose(to_f64(gs[i]), ref.softmax_grad(x, w, algo, mode),
                                   rtol=1e-10, atol=1e-12)


def test_grad_of_vmap(rng):
    xs = _data(rng, (3, 2, 3, 2, 2))
    w = rng.standard_normal((3, 2, 3, 2, 2))
    g = jax.grad(lambda t: jnp.sum(jax.vmap(dnn_log_softmax)(t) * w))(jnp.asarray(xs))
    for i in range(3):
        np.testing.assert_allclose(to_f64(g[i]), ref.softmax_grad(xs[i], w[i], "log"),
                                   rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Zero-size batch
# ---------------------------------------------------------------------------------------
@algos
@modes
@pytest.mark.parametrize("shape,fmt", [((0, 3, 2, 2), "NCHW"), ((0, 2, 2, 3), "NHWC"),
                                       ((0, 3), "NCHW")])
def test_zero_size_batch(algo, mode, shape, fmt):
    x = jnp.zeros(shape, jnp.float32)
    f = _softmax_fn(algo, mode, fmt)
    y = f(x)
    assert y.shape == shape and y.dtype == jnp.float32
    assert jax.jit(f)(x).shape == shape
    g = jax.grad(lambda t: jnp.sum(f(t)))(x)
    assert g.shape == shape


# ---------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------
def test_unknown_algo():
    with pytest.raises(ValueError, match="algo"):
        dnn_softmax(jnp.zeros((2, 3, 2, 2)), algo="fastest")


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        dnn_softmax(jnp.zeros((2, 3, 2, 2)), mode="spatial")
    with pytest.raises(ValueError, match="mode"):
        dnn_log_softmax(jnp.zeros((2, 3, 2, 2)), mode="batch")


@pytest.mark.parametrize("shape", [(2, 3, 4), (3,), (1, 2, 3, 4, 5), ()])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"\bx\b"):
        dnn_softmax(jnp.zeros(shape, jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_, jnp.uint8])
def test_non_float_dtype(dtype):
    with pytest.raises(TypeError):
        dnn_softmax(jnp.zeros((2, 3, 2, 2), dtype))


@pytest.mark.parametrize("fmt", ["NCDHW", "HWCN", "NWC", None, 4])
def test_bad_data_format(fmt):
    with pytest.raises(ValueError, match="data_format"):
        dnn_softmax(jnp.zeros((2, 3, 2, 2)), data_format=fmt)


def test_errors_raise_under_jit():
    f = jax.jit(lambda x: dnn_softmax(x, algo="nope"))
    with pytest.raises(ValueError, match="algo"):
        f(jnp.zeros((2, 3)))


def test_no_cudnn_custom_call_on_the_xla_path():
    x = jnp.zeros((2, 3, 2, 2), jnp.float32)
    with xla_path():
        text = jax.jit(lambda t: dnn_softmax(t)).lower(x).as_text()
    assert "jaxdnn_softmax_fwd" not in text


# ---------------------------------------------------------------------------------------
# GPU: the cuDNN path against the XLA path and the float64 reference
# ---------------------------------------------------------------------------------------
GPU_LAYOUTS = {
    "2d": ((4, 10), "NCHW"),
    "NCHW": ((3, 5, 6, 7), "NCHW"),
    "NHWC": ((3, 6, 7, 5), "NHWC"),
}
gpu_layouts = pytest.mark.parametrize("layout", list(GPU_LAYOUTS))


@pytest.mark.gpu
@dtypes
@algos
@modes
@gpu_layouts
def test_gpu_forward_cudnn_vs_xla_vs_reference(rng, dtype, algo, mode, layout):
    shape, fmt = GPU_LAYOUTS[layout]
    xj, x64 = cast(_data(rng, shape, 1.0), dtype)
    f = _softmax_fn(algo, mode, fmt)
    text = jax.jit(f).lower(xj).as_text()
    assert "jaxdnn_softmax_fwd" in text
    y_cudnn = _jit_run(f, xj)
    y_xla = _jit_run(f, xj, xla=True)
    assert y_cudnn.dtype == jnp.dtype(dtype) and y_cudnn.shape == shape
    expected = ref.softmax(x64, algo, mode, fmt)
    assert_close(y_cudnn, expected, dtype, err_msg="cuDNN vs float64 reference")
    assert_close(y_xla, expected, dtype, err_msg="XLA path vs float64 reference")
    assert_close(y_cudnn, y_xla, dtype, factor=2, err_msg="cuDNN vs XLA path")


@pytest.mark.gpu
@dtypes
@algos
@modes
@gpu_layouts
def test_gpu_gradient_cudnn_vs_xla_vs_reference(rng, dtype, algo, mode, layout):
    shape, fmt = GPU_LAYOUTS[layout]
    xj, x64 = cast(_data(rng, shape, 1.0), dtype)
    dyj, dy64 = cast(rng.standard_normal(shape), dtype)
    f = _softmax_fn(algo, mode, fmt)

    def vjp(x, dy):
        return jax.vjp(f, x)[1](dy)[0]

    text = jax.jit(vjp).lower(xj, dyj).as_text()
    assert "jaxdnn_softmax_bwd" in text
    dx_cudnn = _jit_run(vjp, xj, dyj)
    dx_xla = _jit_run(vjp, xj, dyj, xla=True)
    assert dx_cudnn.dtype == jnp.dtype(dtype)
    expected = ref.softmax_grad(x64, dy64, algo, mode, fmt)
    assert_close(dx_cudnn, expected, dtype, err_msg="cuDNN vs float64 reference")
    assert_close(dx_xla, expected, dtype, err_msg="XLA path vs float64 reference")
    assert_close(dx_cudnn, dx_xla, dtype, factor=2, err_msg="cuDNN vs XLA path")


@pytest.mark.gpu
@algos
@modes
def test_gpu_hlo_contains_cudnn_custom_call(algo, mode):
    x = jnp.ones((2, 3, 4, 4), jnp.float32)
    text = jax.jit(lambda t: dnn_softmax(t, algo=algo, mode=mode)).lower(x).as_text()
    assert "jaxdnn_softmax_fwd" in text
    with xla_path():
        text = jax.jit(lambda t: dnn_softmax(t, algo=algo, mode=mode)).lower(x).as_text()
    assert "jaxdnn_softmax_fwd" not in text


@pytest.mark.gpu
@algos
@modes
def test_gpu_check_grads(rng, algo, mode):
    x = jnp.asarray(_data(rng, (2, 3, 2, 3), 1.0))
    check_grads(_softmax_fn(algo, mode, "NCHW"), (x,), order=1, modes=["rev"])
    check_grads(_softmax_fn(algo, mode, "NCHW"), (x,), order=2, modes=["rev"])


@pytest.mark.gpu
@pytest.mark.parametrize("axis", [0, 1, 3])
@algos
@modes
def test_gpu_vmap(rng, axis, algo, mode):
    base = (3, 5, 4, 6)
    shape = list(base)
    shape.insert(axis, 4)
    xs = _data(rng, tuple(shape))
    f = _softmax_fn(algo, mode, "NCHW")
    ys = jax.jit(jax.vmap(f, in_axes=axis))(jnp.asarray(xs, jnp.float32))
    for i in range(4):
        assert_close(ys[i], ref.softmax(np.take(xs, i, axis=axis).astype(np.float32)
                                        .astype(np.float64), algo, mode), "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0), (3, 1)])
@algos
@modes
def test_gpu_vmap_of_grad(rng, in_axes, algo, mode):
    base = (3, 5, 4, 6)
    b = 4

    xs, ws = (_stacked_data(rng, base, axis, b) for axis in in_axes)
    loss = lambda x, w: jnp.sum(dnn_softmax(x, algo=algo, mode=mode) * w)
    gs = jax.jit(jax.vmap(jax.grad(loss), in_axes=in_axes))(jnp.asarray(xs), jnp.asarray(ws))
    for i in range(b):
        x = xs if in_axes[0] is None else np.take(xs, i, axis=in_axes[0])
        w = ws if in_axes[1] is None else np.take(ws, i, axis=in_axes[1])
        assert_close(gs[i], ref.softmax_grad(x, w, algo, mode), "float64")
