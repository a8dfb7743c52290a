"""The spatial transformer (dnn_spatialtf, dnn_affine_grid, dnn_grid_sampler) against the
NumPy float64 loop references in tests/oracles/spatial_transformer.py, and hand-checked cases; `gpu`-marked
tests compare the cuDNN path with the XLA path and float64."""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxdnn
from oracles import spatial_transformer as ref
from helpers import FLOAT_DTYPES, assert_close, cast, to_f64, xla_path
from helpers import jit_run as _jit_run
from jaxdnn import _extension
from jaxdnn.reference import spatial_transformer as xla_reference
from jaxdnn.spatial_transformer import dnn_affine_grid, dnn_grid_sampler, dnn_spatialtf

dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES)
IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def _deterministic(on=True):
    return jaxdnn.config.override(**{"dnn.deterministic": on})


# ---------------------------------------------------------------------------------------
# Inputs: sample points kept away from the pixel rows and columns, where the gradient in
# the grid (and in theta) jumps.
# ---------------------------------------------------------------------------------------
def kink_free_grid(rng, n, h_out, w_out, height, width):
    """A grid whose pixel coordinates are integer + [0.15, 0.85], from two pixels before the
    image to two after it (some sample points fall outside, some straddle the border); on
    an axis of one pixel, any coordinate (it always samples pixel 0)."""
    def axis(size):
        if size == 1:  # every coordinate samples the single pixel row or column
            return rng.uniform(-1, 1, (n, h_out, w_out))
        px = rng.integers(-2, size + 1, (n, h_out, w_out)) + rng.uniform(0.15, 0.85, (n, h_out, w_out))
        return ref.pixel_to_grid(px, size)
    return np.stack([axis(width), axis(height)], axis=-1)


def kink_free_theta(rng, n, in_hw, out_hw):
    """theta whose sample points sit at pixel x = A j + B i + c, y = D j + E i + f with A, B,
    D, E multiples of 1/4 and c, f = 1/8 modulo 1/4: every fractional part is 1/8, 3/8,
    5/8 or 7/8, so finite differences never cross a pixel row or column."""
    (h, w), (ho, wo) = in_hw, out_hw
    quarters = lambda lo, hi: rng.integers(lo, hi + 1) / 4.0
    theta = np.zeros((n, 2, 3))
    for k in range(n):
        a, b = quarters(2, 5) * rng.choice([-1, 1]), quarters(-1, 1)
        d, e = quarters(-1, 1), quarters(2, 5) * rng.choice([-1, 1])
        c = quarters(-4, 4 * (w - 1) - 4) + 0.125
        f = quarters(-4, 4 * (h - 1) - 4) + 0.125
        theta[k, 0, 0] = a * (wo - 1) / (w - 1)
        theta[k, 0, 1] = b * (ho - 1) / (w - 1)
        theta[k, 0, 2] = 2 * c / (w - 1) - 1 + theta[k, 0, 0] + theta[k, 0, 1]
        theta[k, 1, 0] = d * (wo - 1) / (h - 1)
        theta[k, 1, 1] = e * (ho - 1) / (h - 1)
        theta[k, 1, 2] = 2 * f / (h - 1) - 1 + theta[k, 1, 0] + theta[k, 1, 1]
    return theta


def random_theta(rng, n):
    """Near-identity affine maps: rotation, scale, shear and translation, some sample points
    outside the image."""
    return IDENTITY[None] + 0.35 * rng.standard_normal((n, 2, 3))


def _out_hw(shape, sw=1, sh=1):
    return ref.output_size(shape[2], sh), ref.output_size(shape[3], sw)


def test_kink_free_inputs_keep_away_from_pixel_rows_and_columns(rng):
    theta = kink_free_theta(rng, 3, (5, 6), (4, 7))
    grid = ref.affine_grid(theta, (3, 1, 4, 7))
    px = (grid[..., 0] + 1) * 5 / 2
    py = (grid[..., 1] + 1) * 4 / 2
    for p in (px, py):
        frac = p - np.floor(p)
        assert np.all(np.abs(frac - 0.5) <= 0.375 + 1e-9)
    for p, size in ((px, 6), (py, 5)):
        assert np.any((p > 0) & (p < size - 1))  # not all outside


# ---------------------------------------------------------------------------------------
# The oracle itself
# ---------------------------------------------------------------------------------------
def test_reference_by_hand():
    img = np.arange(12.0).reshape(1, 1, 3, 4)
    grid = ref.affine_grid(IDENTITY[None], (1, 1, 3, 4))
    np.testing.assert_allclose(grid[0, :, :, 0], [[-1, -1 / 3, 1 / 3, 1]] * 3, atol=1e-15)
    np.testing.assert_allclose(grid[0, :, :, 1], [[-1] * 4, [0] * 4, [1] * 4], atol=1e-15)
    np.testing.assert_allclose(ref.spatialtf(img, IDENTITY[None]), img, atol=1e-12)
    # the centre of 4 pixels is their mean; half a pixel left of the image keeps half
    two = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    at = lambda x, y: ref.grid_sample(two, np.array([[[[x, y]]]]))[0, 0, 0, 0]
    assert at(0.0, 0.0) == 2.5
    assert at(-2.0, -1.0) == 0.5   # pixel x = -0.5 on the top row: 0.5 * 1
    assert at(3.0, 1.0) == 0.0     # pixel x = 2: entirely outside
    assert at(1.0, -1.0) == 2.0    # the top-right corner pixel


def test_reference_gradients_vs_finite_differences(rng):
    img = rng.standard_normal((2, 2, 4, 5))
    theta = kink_free_theta(rng, 2, (4, 5), (3, 6))
    dims = (2, 2, 3, 6)
    grid = ref.affine_grid(theta, dims)
    dout = rng.standard_normal((2, 2, 3, 6))
    dimg, dgrid = ref.grid_sample_grad(img, grid, dout)
    _, dtheta = ref.spatialtf_grad(img, theta, dout, scale_width=6 / 5, scale_height=3 / 4)
    eps = 1e-6
    loss = lambda i, g: np.sum(ref.grid_sample(i, g) * dout)
    for x, g, which in ((img, dimg, 0), (grid, dgrid, 1), (theta, dtheta, 2)):
        v = rng.standard_normal(x.shape)
        if which == 0:
            fd = (loss(img + eps * v, grid) - loss(img - eps * v, grid)) / (2 * eps)
        elif which == 1:
            fd = (loss(img, grid + eps * v) - loss(img, grid - eps * v)) / (2 * eps)
        else:
            fd = (loss(img, ref.affine_grid(theta + eps * v, dims))
                  - loss(img, ref.affine_grid(theta - eps * v, dims))) / (2 * eps)
        np.testing.assert_allclose(np.sum(g * v), fd, rtol=1e-7)


# ---------------------------------------------------------------------------------------
# Forward: hand-checked cases
# ---------------------------------------------------------------------------------------
@dtypes
def test_identity_theta_returns_the_image(dtype):
    img = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5) - 60
    theta = np.stack([IDENTITY, IDENTITY])
    out = dnn_spatialtf(jnp.asarray(img, dtype), jnp.asarray(theta, dtype))
    assert out.dtype == jnp.dtype(dtype) and out.shape == img.shape
    assert_close(out, img, dtype, err_msg="identity")
    if dtype in ("float32", "float64"):
        np.testing.assert_allclose(to_f64(out), img, atol=1e-4 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_translation_by_one_pixel_shifts_with_zeros_entering(dtype):
    img = np.array([[1.0, 2.0, 3.0, 4.0],
                    [5.0, 6.0, 7.0, 8.0],
                    [9.0, 10.0, 11.0, 12.0]]).reshape(1, 1, 3, 4)
    step_x, step_y = 2 / (4 - 1), 2 / (3 - 1)  # one pixel in normalized coordinates
    right = np.array([[[1.0, 0.0, step_x], [0.0, 1.0, 0.0]]])   # sample at x + 1
    up = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, -step_y]]])      # sample at y - 1
    out = dnn_spatialtf(jnp.asarray(img, dtype), jnp.asarray(right, dtype))
    np.testing.assert_allclose(to_f64(out)[0, 0], [[2.0, 3.0, 4.0, 0.0],
                                                    [6.0, 7.0, 8.0, 0.0],
                                                    [10.0, 11.0, 12.0, 0.0]], atol=1e-5)
    out = dnn_spatialtf(jnp.asarray(img, dtype), jnp.asarray(up, dtype))
    np.testing.assert_allclose(to_f64(out)[0, 0], [[0.0, 0.0, 0.0, 0.0],
                                                    [1.0, 2.0, 3.0, 4.0],
                                                    [5.0, 6.0, 7.0, 8.0]], atol=1e-5)
    # half a pixel to the left: each output is the mean of two neighbours, the first
    # column half of the edge pixel
    left_half = np.array([[[1.0, 0.0, -step_x / 2], [0.0, 1.0, 0.0]]])
    out = dnn_spatialtf(jnp.asarray(img, dtype), jnp.asarray(left_half, dtype))
    np.testing.assert_allclose(to_f64(out)[0, 0, 0], [0.5, 1.5, 2.5, 3.5], atol=1e-5)


def test_affine_grid_by_hand():
    theta = np.array([IDENTITY, [[2.0, 0.0, 0.5], [0.0, -1.0, 0.25]]])
    grid = np.asarray(dnn_affine_grid(jnp.asarray(theta), (2, 7, 2, 3)))
    assert grid.shape == (2, 2, 3, 2)
    np.testing.assert_allclose(grid[0, ..., 0], [[-1, 0, 1], [-1, 0, 1]], atol=1e-15)
    np.testing.assert_allclose(grid[0, ..., 1], [[-1, -1, -1], [1, 1, 1]], atol=1e-15)
    np.testing.assert_allclose(grid[1, ..., 0], [[-1.5, 0.5, 2.5]] * 2, atol=1e-15)
    np.testing.assert_allclose(grid[1, ..., 1], [[1.25] * 3, [-0.75] * 3], atol=1e-15)


def test_sample_points_outside_give_zeros(rng):
    img = jnp.asarray(rng.standard_normal((2, 3, 4, 5)))
    far = jnp.asarray(np.stack([[[1.0, 0, 3.0], [0, 1.0, 0]], [[0.1, 0, 0], [0, 0.1, -2.5]]]))
    np.testing.assert_array_equal(np.asarray(dnn_spatialtf(img, far)), 0.0)


# ---------------------------------------------------------------------------------------
# Forward against NumPy
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,out_dims", [(d, (2, 3, 4, 5)) for d in FLOAT_DTYPES]
                         + [("float64", (1, 1, 1, 3)), ("float32", (3, 2, 6, 1))])
def test_affine_grid_vs_numpy(rng, dtype, out_dims):
    theta, theta64 = cast(random_theta(rng, out_dims[0]), dtype)
    grid = dnn_affine_grid(theta, out_dims)
    assert grid.dtype == jnp.dtype(dtype) and grid.shape == out_dims[:1] + out_dims[2:] + (2,)
    assert_close(grid, ref.affine_grid(theta64, out_dims), dtype)


SHAPES = [(2, 3, 5, 6), (1, 2, 1, 4), (3, 1, 7, 3)]


@pytest.mark.parametrize("dtype,shape", [(d, SHAPES[0]) for d in FLOAT_DTYPES]
                         + [("float64", SHAPES[1]), ("float64", SHAPES[2]),
                            ("float16", SHAPES[2]), ("bfloat16", SHAPES[1])])
def test_spatialtf_vs_numpy(rng, dtype, shape):
    img, img64 = cast(rng.standard_normal(shape), dtype)
    theta, theta64 = cast(random_theta(rng, shape[0]), dtype)
    out = dnn_spatialtf(img, theta)
    assert out.dtype == jnp.dtype(dtype) and out.shape == shape
    expected = ref.spatialtf(img64, theta64)
    assert np.any(expected != 0)
    # half precision: the grid itself is rounded to float16 (as cuDNN's is)
    assert_close(out, expected, dtype, factor=2 if dtype == "float16" else 1)


@dtypes
def test_grid_sampler_vs_numpy(rng, dtype):
    img, img64 = cast(rng.standard_normal((2, 3, 5, 4)), dtype)
    grid, grid64 = cast(kink_free_grid(rng, 2, 6, 3, 5, 4), dtype)
    out = dnn_grid_sampler(img, grid)
    assert out.dtype == jnp.dtype(dtype) and out.shape == (2, 3, 6, 3)
    assert_close(out, ref.grid_sample(img64, grid64), dtype)


@pytest.mark.parametrize("sw,sh", [(2, 0.5), (1.5, 1), (0.3, 2.7), (0.01, 0.01), (1.0, 3)])
def test_scale_width_and_height_set_the_output_shape(rng, sw, sh):
    shape = (2, 3, 5, 6)
    img = rng.standard_normal(shape)
    theta = random_theta(rng, 2)
    out = dnn_spatialtf(jnp.asarray(img), jnp.asarray(theta), scale_width=sw, scale_height=sh)
    assert out.shape == (2, 3, math.ceil(5 * sh), math.ceil(6 * sw))
    np.testing.assert_allclose(out, ref.spatialtf(img, theta, sw, sh), rtol=1e-12, atol=1e-12)


def test_dtype_promotion_and_bfloat16_computed_in_float32(rng):
    img = rng.standard_normal((1, 2, 3, 4))
    theta = random_theta(rng, 1)
    f32, f64 = jnp.float32, jnp.float64
    assert dnn_spatialtf(jnp.asarray(img, f32), jnp.asarray(theta, f64)).dtype == f64
    assert dnn_spatialtf(jnp.asarray(img, jnp.float16), jnp.asarray(theta, jnp.bfloat16)).dtype == f32
    bf = jnp.bfloat16
    text = str(jax.make_jaxpr(lambda i, t: dnn_spatialtf(i, t))(jnp.asarray(img, bf),
                                                                jnp.asarray(theta, bf)))
    # the primitives see float32; bfloat16 only at the edges
    for name in ("jaxdnn_stn_grid_fwd", "jaxdnn_stn_sampler_fwd"):
        line = next(l for l in text.splitlines() if name in l)
        assert "f32[" in line and "bf16[" not in line, line
    grid = jnp.asarray(kink_free_grid(rng, 1, 2, 2, 3, 4), bf)
    assert dnn_grid_sampler(jnp.asarray(img, bf), grid).dtype == bf
    assert dnn_affine_grid(jnp.asarray(theta, bf), (1, 2, 3, 4)).dtype == bf


def test_numpy_inputs(rng):
    img = rng.standard_normal((1, 2, 3, 4))
    out = dnn_spatialtf(img, IDENTITY[None])
    np.testing.assert_allclose(out, img, atol=1e-12)


@pytest.mark.parametrize("shape,theta_n", [((0, 3, 4, 5), 0), ((2, 0, 4, 5), 2)])
def test_zero_size(shape, theta_n):
    img = jnp.zeros(shape)
    theta = jnp.zeros((theta_n, 2, 3))
    assert dnn_spatialtf(img, theta, 2, 0.5).shape == shape[:2] + (2, 10)
    gi, gt = jax.grad(lambda i, t: jnp.sum(dnn_spatialtf(i, t)), argnums=(0, 1))(img, theta)
    assert gi.shape == shape and gt.shape == theta.shape
    assert dnn_affine_grid(jnp.zeros((0, 2, 3)), (0, 1, 3, 3)).shape == (0, 3, 3, 2)
    theta = jnp.asarray([IDENTITY])
    np.testing.assert_allclose(dnn_affine_grid(theta, (1, 0, 2, 2)),
                               dnn_affine_grid(theta, (1, 5, 2, 2)))  # C does not matter
    assert dnn_grid_sampler(jnp.ones((1, 2, 3, 3)), jnp.zeros((1, 0, 4, 2))).shape == (1, 2, 0, 4)


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("deterministic", [False, True])
def test_grid_sampler_gradients_vs_numpy(rng, deterministic):
    img = rng.standard_normal((2, 3, 4, 5))
    grid = kink_free_grid(rng, 2, 6, 7, 4, 5)   # more sample points than pixels: collisions
    dout = rng.standard_normal((2, 3, 6, 7))
    with _deterministic(deterministic):
        dimg, dgrid = jax.jit(lambda i, g, d: jax.vjp(dnn_grid_sampler, i, g)[1](d))(
            jnp.asarray(img), jnp.asarray(grid), jnp.asarray(dout))
    eimg, egrid = ref.grid_sample_grad(img, grid, dout)
    np.testing.assert_allclose(dimg, eimg, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dgrid, egrid, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sw,sh", [(1, 1), (1.5, 0.7)])
def test_spatialtf_gradients_vs_numpy(rng, sw, sh):
    shape = (2, 3, 5, 6)
    out_hw = _out_hw(shape, sw, sh)
    img = rng.standard_normal(shape)
    theta = kink_free_theta(rng, 2, shape[2:], out_hw)
    dout = rng.standard_normal(shape[:2] + out_hw)
    f = lambda i, t: dnn_spatialtf(i, t, scale_width=sw, scale_height=sh)
    dimg, dtheta = jax.jit(lambda i, t, d: jax.vjp(f, i, t)[1](d))(
        jnp.asarray(img), jnp.asarray(theta), jnp.asarray(dout))
    eimg, etheta = ref.spatialtf_grad(img, theta, dout, sw, sh)
    np.testing.assert_allclose(dimg, eimg, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dtheta, etheta, rtol=1e-10, atol=1e-10)


def test_affine_grid_is_linear_jvp_vjp_and_second_order(rng):
    dims = (2, 1, 3, 4)
    theta = jnp.asarray(rng.standard_normal((2, 2, 3)))
    t = jnp.asarray(rng.standard_normal((2, 2, 3)))
    f = lambda th: dnn_affine_grid(th, dims)
    y, ty = jax.jvp(f, (theta,), (t,))
    np.testing.assert_allclose(ty, ref.affine_grid(np.asarray(t), dims), atol=1e-14)
    dgrid = rng.standard_normal((2, 3, 4, 2))
    (dtheta,) = jax.vjp(f, theta)[1](jnp.asarray(dgrid))
    np.testing.assert_allclose(dtheta, ref.affine_grid_grad(dgrid, dims), rtol=1e-12, atol=1e-13)
    assert jax.jacfwd(f)(theta).shape == (2, 3, 4, 2, 2, 2, 3)
    check_grads(f, (theta,), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_gradients_in_low_precision(rng, dtype):
    shape = (2, 2, 4, 5)
    img, img64 = cast(rng.standard_normal(shape), dtype)
    theta, theta64 = cast(kink_free_theta(rng, 2, shape[2:], shape[2:]), dtype)
    dout, dout64 = cast(rng.standard_normal(shape), dtype)
    dimg, dtheta = jax.jit(lambda i, t, d: jax.vjp(dnn_spatialtf, i, t)[1](d))(img, theta, dout)
    assert dimg.dtype == jnp.dtype(dtype) and dtheta.dtype == jnp.dtype(dtype)
    eimg, etheta = ref.spatialtf_grad(img64, theta64, dout64)
    factor = 1 if dtype == "float32" else 2
    assert_close(dimg, eimg, dtype, factor=factor)
    assert_close(dtheta, etheta, dtype, factor=factor * 3)


def test_check_grads_grid_sampler(rng):
    img = jnp.asarray(rng.standard_normal((2, 2, 4, 5)))
    grid = jnp.asarray(kink_free_grid(rng, 2, 3, 4, 4, 5))
    check_grads(dnn_grid_sampler, (img, grid), order=1, modes=["rev"])


@pytest.mark.parametrize("sw,sh", [(1, 1), (1.25, 0.75)])
def test_check_grads_spatialtf(rng, sw, sh):
    shape = (2, 2, 4, 5)
    img = jnp.asarray(rng.standard_normal(shape))
    theta = jnp.asarray(kink_free_theta(rng, 2, shape[2:], _out_hw(shape, sw, sh)))
    f = lambda i, t: dnn_spatialtf(i, t, sw, sh)
    check_grads(f, (img, theta), order=1, modes=["rev"])


def test_second_order_through_the_xla_reference(rng):
    """Hessian-vector products (grad of grad: stn_sampler_bwd's derivative in img and grid
    is its XLA reference's) against central differences of the gradient."""
    shape = (1, 2, 4, 5)
    img = jnp.asarray(rng.standard_normal(shape))
    theta = jnp.asarray(kink_free_theta(rng, 1, shape[2:], shape[2:]))
    dout = jnp.asarray(rng.standard_normal(shape))
    vi, vt = jnp.asarray(rng.standard_normal(shape)), jnp.asarray(rng.standard_normal((1, 2, 3)))
    loss = lambda i, t: jnp.sum(dnn_spatialtf(i, t) ** 2 * dout)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    hvp_rev = jax.jit(jax.grad(lambda i, t: sum(jnp.vdot(g, v) for g, v in
                                                zip(grad(i, t), (vi, vt))), argnums=(0, 1)))
    eps = 1e-5
    plus, minus = grad(img + eps * vi, theta + eps * vt), grad(img - eps * vi, theta - eps * vt)
    for got, p, m in zip(hvp_rev(img, theta), plus, minus):
        np.testing.assert_allclose(got, (p - m) / (2 * eps), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Forward mode: jvp, jacfwd, hessian (JVP rules on the sampler's primitives)
# ---------------------------------------------------------------------------------------
def test_forward_mode_check_grads_to_second_order(rng):
    """check_grads in both modes to second order: the sampler in img and grid, the
    transformer in img and theta (resampled), the grid generator in theta."""
    shape = (2, 2, 4, 5)
    img = jnp.asarray(rng.standard_normal(shape))
    grid = jnp.asarray(kink_free_grid(rng, 2, 3, 4, 4, 5))
    check_grads(jax.jit(dnn_grid_sampler), (img, grid), order=2, modes=["fwd", "rev"])
    theta = jnp.asarray(kink_free_theta(rng, 2, shape[2:], _out_hw(shape, 1.25, 0.75)))
    check_grads(jax.jit(lambda i, t: dnn_spatialtf(i, t, 1.25, 0.75)), (img, theta), order=2,
                modes=["fwd", "rev"])


def test_jvp_vs_central_differences_of_the_oracle(rng):
    """jvp in img, grid and theta (each alone and together) against central differences of
    the NumPy oracle; jax.linearize equals jvp; jacfwd equals jacrev."""
    shape = (2, 3, 4, 5)
    img, ti = rng.standard_normal(shape), rng.standard_normal(shape)
    grid, tg = kink_free_grid(rng, 2, 3, 4, 4, 5), rng.standard_normal((2, 3, 4, 2))
    theta = kink_free_theta(rng, 2, shape[2:], shape[2:])
    tt = rng.standard_normal((2, 2, 3))
    eps = 1e-7  # small enough that no sample point crosses a pixel row or column
    cases = [(dnn_grid_sampler, ref.grid_sample, (img, grid), (ti, tg)),
             (dnn_spatialtf, ref.spatialtf, (img, theta), (ti, tt))]
    for f, oracle, args, tangents in cases:
        for keep in ((1, 0), (0, 1), (1, 1)):
            ts = [t * k for t, k in zip(tangents, keep)]
            y, ty = jax.jit(lambda a, t: jax.jvp(f, a, t))(
                tuple(map(jnp.asarray, args)), tuple(map(jnp.asarray, ts)))
            np.testing.assert_allclose(y, oracle(*args), rtol=1e-12, atol=1e-12)
            fd = (oracle(*[a + eps * t for a, t in zip(args, ts)])
                  - oracle(*[a - eps * t for a, t in zip(args, ts)])) / (2 * eps)
            np.testing.assert_allclose(ty, fd, rtol=1e-6, atol=1e-7)
        _, linear = jax.linearize(f, *map(jnp.asarray, args))
        np.testing.assert_allclose(linear(*map(jnp.asarray, tangents)),
                                   jax.jvp(f, tuple(map(jnp.asarray, args)),
                                           tuple(map(jnp.asarray, tangents)))[1],
                                   rtol=1e-12, atol=1e-12)
        jf = jax.jit(jax.jacfwd(f, argnums=(0, 1)))(*map(jnp.asarray, args))
        jr = jax.jit(jax.jacrev(f, argnums=(0, 1)))(*map(jnp.asarray, args))
        for a, b in zip(jf, jr):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_forward_over_reverse_hessian(rng):
    """jax.hessian (forward over reverse) equals reverse over reverse."""
    shape = (1, 2, 3, 4)
    img = jnp.asarray(rng.standard_normal(shape))
    theta = jnp.asarray(kink_free_theta(rng, 1, shape[2:], shape[2:]))
    w = jnp.asarray(rng.standard_normal(shape))
    loss = lambda i, t: jnp.sum(jnp.sin(dnn_spatialtf(i, t)) * w)
    fwd = jax.jit(jax.hessian(loss, argnums=(0, 1)))(img, theta)
    rev = jax.jit(jax.jacrev(jax.grad(loss, argnums=(0, 1)), argnums=(0, 1)))(img, theta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), fwd, rev)


def test_reverse_mode_runs_one_sampler_backward_pass(rng):
    """The gradient transposes the sampler's tangent into one stn_sampler_bwd (cuDNN's
    backward on the cuDNN path, image and grid gradients at once), with the deterministic
    flag and implementation chosen as before; forward mode runs the forward primitives for
    the primal and the tangent primitive, no backward."""
    img, theta = IMG, THETA
    loss = lambda i, t: jnp.sum(jnp.sin(dnn_spatialtf(i, t)))
    for deterministic in (False, True):
        with _deterministic(deterministic):
            grad = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(img, theta))
            jvp = str(jax.make_jaxpr(lambda a, t: jax.jvp(dnn_spatialtf, a, t))(
                (img, theta), (img, theta)))
        assert grad.count("jaxdnn_stn_sampler_bwd[") == 1, grad
        assert "jaxdnn_stn_sampler_tangent" not in grad
        assert f"deterministic={deterministic}" in grad
        assert "jaxdnn_stn_sampler_fwd[" in jvp and "jaxdnn_stn_sampler_tangent[" in jvp
        assert "jaxdnn_stn_sampler_bwd" not in jvp


@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0)])
def test_vmap_of_jvp_equals_a_loop(rng, in_axes):
    """Forward mode under vmap (the tangent primitive folds into N)."""
    imgs = _stack(rng, lambda: rng.standard_normal(BASE), B, in_axes[0])
    thetas = _stack(rng, lambda: kink_free_theta(rng, 2, BASE[2:], BASE[2:]), B, in_axes[1])
    ti, tt = rng.standard_normal(BASE), rng.standard_normal((BASE[0], 2, 3))
    jvp = lambda i, t: jax.jvp(dnn_spatialtf, (i, t), (jnp.asarray(ti), jnp.asarray(tt)))[1]
    got = jax.jit(jax.vmap(jvp, in_axes=in_axes))(jnp.asarray(imgs), jnp.asarray(thetas))
    for k in range(B):
        i, t = _take(imgs, k, in_axes[0]), _take(thetas, k, in_axes[1])
        np.testing.assert_allclose(got[k], jvp(jnp.asarray(i), jnp.asarray(t)), rtol=1e-12,
                                   atol=1e-12)


# ---------------------------------------------------------------------------------------
# jit, vmap, scan, checkpoint
# ---------------------------------------------------------------------------------------
def test_jit(rng):
    shape = (2, 3, 5, 6)
    img = rng.standard_normal(shape)
    theta = kink_free_theta(rng, 2, shape[2:], _out_hw(shape, 1.5, 0.5))
    f = jax.jit(dnn_spatialtf, static_argnames=("scale_width", "scale_height"))
    out = f(jnp.asarray(img), jnp.asarray(theta), scale_width=1.5, scale_height=0.5)
    np.testing.assert_allclose(out, ref.spatialtf(img, theta, 1.5, 0.5), rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    g = jax.jit(jax.grad(lambda i, t: jnp.sum(dnn_spatialtf(i, t, 1.5, 0.5) * dout),
                         argnums=(0, 1)))(jnp.asarray(img), jnp.asarray(theta))
    eimg, etheta = ref.spatialtf_grad(img, theta, dout, 1.5, 0.5)
    np.testing.assert_allclose(g[0], eimg, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g[1], etheta, rtol=1e-10, atol=1e-10)
    grid = kink_free_grid(rng, 2, 3, 3, 5, 6)
    np.testing.assert_allclose(jax.jit(dnn_grid_sampler)(jnp.asarray(img), jnp.asarray(grid)),
                               ref.grid_sample(img, grid), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        jax.jit(dnn_affine_grid, static_argnums=1)(jnp.asarray(theta), (2, 3, 4, 4)),
        ref.affine_grid(theta, (2, 3, 4, 4)), rtol=1e-12, atol=1e-14)


def _stack(rng, make, b, axis):
    """One unbatched array (axis None) or b of them stacked on `axis`."""
    if axis is None:
        return make()
    return np.stack([make() for _ in range(b)], axis=axis)


def _take(x, i, axis):
    return x if axis is None else np.take(x, i, axis=axis)


B = 3
BASE = (2, 3, 4, 5)


@pytest.mark.parametrize("in_axes", [(0, 0), (0, None), (None, 0), (2, 1), (4, 3)])
def test_vmap_spatialtf_equals_a_loop(rng, in_axes):
    imgs = _stack(rng, lambda: rng.standard_normal(BASE), B, in_axes[0])
    thetas = _stack(rng, lambda: random_theta(rng, BASE[0]), B, in_axes[1])
    f = lambda i, t: dnn_spatialtf(i, t, 1.5, 1)
    out = jax.vmap(f, in_axes=in_axes)(jnp.asarray(imgs), jnp.asarray(thetas))
    assert out.shape == (B, 2, 3, 4, 8)
    for k in range(B):
        single = f(jnp.asarray(_take(imgs, k, in_axes[0])), jnp.asarray(_take(thetas, k, in_axes[1])))
        np.testing.assert_allclose(out[k], single, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("in_axes", [(0, 0), (1, None), (None, 3)])
def test_vmap_grid_sampler_and_affine_grid_equal_a_loop(rng, in_axes):
    imgs = _stack(rng, lambda: rng.standard_normal(BASE), B, in_axes[0])
    grids = _stack(rng, lambda: kink_free_grid(rng, 2, 3, 3, 4, 5), B, in_axes[1])
    out = jax.vmap(dnn_grid_sampler, in_axes=in_axes)(jnp.asarray(imgs), jnp.asarray(grids))
    for k in range(B):
        np.testing.assert_allclose(
            out[k], ref.grid_sample(_take(imgs, k, in_axes[0]), _take(grids, k, in_axes[1])),
            rtol=1e-12, atol=1e-12)
    thetas = np.stack([random_theta(rng, 2) for _ in range(B)], axis=1)  # (2, B, 2, 3)
    grids = jax.vmap(lambda t: dnn_affine_grid(t, (2, 1, 3, 4)), in_axes=1)(jnp.asarray(thetas))
    for k in range(B):
        np.testing.assert_allclose(grids[k], ref.affine_grid(thetas[:, k], (2, 1, 3, 4)),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0), (3, 2)])
def test_vmap_of_grad(rng, in_axes):
    imgs = _stack(rng, lambda: rng.standard_normal(BASE), B, in_axes[0])
    thetas = _stack(rng, lambda: kink_free_theta(rng, 2, BASE[2:], BASE[2:]), B, in_axes[1])
    dout = rng.standard_normal(BASE)
    loss = lambda i, t: jnp.sum(dnn_spatialtf(i, t) * dout)
    gi, gt = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=in_axes))(
        jnp.asarray(imgs), jnp.asarray(thetas))
    for k in range(B):
        eimg, etheta = ref.spatialtf_grad(_take(imgs, k, in_axes[0]),
                                          _take(thetas, k, in_axes[1]), dout)
        np.testing.assert_allclose(gi[k], eimg, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gt[k], etheta, rtol=1e-10, atol=1e-10)


def test_vmap_of_grad_of_grid_sampler_deterministic(rng):
    imgs = np.stack([rng.standard_normal(BASE) for _ in range(B)])
    grid = kink_free_grid(rng, 2, 5, 6, 4, 5)
    dout = rng.standard_normal((2, 3, 5, 6))
    loss = lambda i, g: jnp.sum(dnn_grid_sampler(i, g) * dout)
    with _deterministic():
        gi, gg = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(
            jnp.asarray(imgs), jnp.asarray(grid))
    for k in range(B):
        eimg, egrid = ref.grid_sample_grad(imgs[k], grid, dout)
        np.testing.assert_allclose(gi[k], eimg, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gg[k], egrid, rtol=1e-12, atol=1e-12)


def test_inside_scan_and_checkpoint(rng):
    imgs = rng.standard_normal((3,) + BASE)
    theta = kink_free_theta(rng, 2, BASE[2:], BASE[2:])

    def step(carry, x):
        return carry + jnp.sum(jax.checkpoint(dnn_spatialtf)(x, carry_theta) ** 2), None

    carry_theta = jnp.asarray(theta)
    grads = jax.grad(lambda xs: jax.lax.scan(step, 0.0, xs)[0])(jnp.asarray(imgs))
    for k in range(3):
        out = ref.spatialtf(imgs[k], theta)
        np.testing.assert_allclose(grads[k], ref.spatialtf_grad(imgs[k], theta, 2 * out)[0],
                                   rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Bad arguments (at trace time, naming the argument)
# ---------------------------------------------------------------------------------------
IMG = jnp.ones((2, 3, 4, 5))
THETA = jnp.ones((2, 2, 3))
GRID = jnp.ones((2, 3, 3, 2))

BAD = [
    (dnn_spatialtf, (jnp.ones((2, 3, 4)), THETA), {}, ValueError, r"dnn_spatialtf: img must be 4-D"),
    (dnn_spatialtf, (jnp.ones((2, 3, 4, 5, 6)), THETA), {}, ValueError, r"dnn_spatialtf: img"),
    (dnn_spatialtf, (IMG, jnp.ones((2, 3, 3))), {}, ValueError, r"dnn_spatialtf: theta must have shape \(N, 2, 3\)"),
    (dnn_spatialtf, (IMG, jnp.ones((2, 6))), {}, ValueError, r"dnn_spatialtf: theta must be 3-D"),
    (dnn_spatialtf, (IMG, jnp.ones((3, 2, 3))), {}, ValueError, r"dnn_spatialtf: theta holds 3 .* img holds 2"),
    (dnn_spatialtf, (IMG, THETA), dict(scale_width=0), ValueError, r"scale_width=0.0 must be positive"),
    (dnn_spatialtf, (IMG, THETA), dict(scale_height=-1.5), ValueError, r"scale_height=-1.5 must be positive"),
    (dnn_spatialtf, (IMG, THETA), dict(scale_width=float("inf")), ValueError, r"scale_width"),
    (dnn_spatialtf, (IMG, THETA), dict(scale_height=float("nan")), ValueError, r"scale_height"),
    (dnn_spatialtf, (IMG, THETA), dict(scale_width="2"), TypeError, r"scale_width must be a static"),
    (dnn_spatialtf, (IMG, THETA), dict(scale_height=True), TypeError, r"scale_height must be a static"),
    (dnn_spatialtf, (IMG, THETA), dict(scale_width=jnp.float32(2.0)), TypeError, r"scale_width"),
    (dnn_spatialtf, (jnp.ones((2, 3, 4, 5), jnp.int32), THETA), {}, TypeError, r"dnn_spatialtf: img must be float"),
    (dnn_spatialtf, (IMG, jnp.ones((2, 2, 3), jnp.int32)), {}, TypeError, r"dnn_spatialtf: theta must be float"),
    (dnn_spatialtf, (IMG, jnp.ones((2, 2, 3), jnp.complex64)), {}, TypeError, r"dnn_spatialtf: theta must be float"),
    (dnn_grid_sampler, (IMG, jnp.ones((2, 3, 3, 3))), {}, ValueError,
     r"dnn_grid_sampler: grid must have shape \(N, H_out, W_out, 2\)"),
    (dnn_grid_sampler, (IMG, jnp.ones((2, 3, 2))), {}, ValueError, r"dnn_grid_sampler: grid must be 4-D"),
    (dnn_grid_sampler, (IMG, jnp.ones((1, 3, 3, 2))), {}, ValueError,
     r"dnn_grid_sampler: grid holds 1 .* img holds 2"),
    (dnn_grid_sampler, (jnp.ones((2, 4, 5)), GRID), {}, ValueError, r"dnn_grid_sampler: img must be 4-D"),
    (dnn_grid_sampler, (IMG, jnp.ones((2, 3, 3, 2), jnp.int8)), {}, TypeError, r"dnn_grid_sampler: grid must be float"),
    (dnn_grid_sampler, (jnp.ones((2, 3, 4, 5), jnp.uint8), GRID), {}, TypeError,
     r"dnn_grid_sampler: img must be float"),
    (dnn_affine_grid, (jnp.ones((2, 2, 2)), (2, 3, 4, 5)), {}, ValueError, r"dnn_affine_grid: theta must have shape"),
    (dnn_affine_grid, (jnp.ones((2, 3)), (2, 3, 4, 5)), {}, ValueError, r"dnn_affine_grid: theta must be 3-D"),
    (dnn_affine_grid, (jnp.ones((2, 2, 3), jnp.int32), (2, 3, 4, 5)), {}, TypeError,
     r"dnn_affine_grid: theta must be float"),
    (dnn_affine_grid, (THETA, (2, 4, 5)), {}, ValueError, r"dnn_affine_grid: out_dims=.* must have 4 entries"),
    (dnn_affine_grid, (THETA, (3, 3, 4, 5)), {}, ValueError, r"dnn_affine_grid: out_dims=.* has N=3 but theta holds 2"),
    (dnn_affine_grid, (THETA, (2, 3, 4.0, 5)), {}, TypeError, r"dnn_affine_grid: out_dims must hold static ints"),
    (dnn_affine_grid, (THETA, (2, 3, -4, 5)), {}, ValueError, r"dnn_affine_grid: out_dims=.* must not be negative"),
    (dnn_affine_grid, (THETA, 4), {}, TypeError, r"dnn_affine_grid: out_dims must be a tuple"),
]


@pytest.mark.parametrize("fn,args,kwargs,exc,match", BAD,
                         ids=[f"{b[0].__name__}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments(fn, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_errors_raise_at_trace_time_under_jit():
    with pytest.raises(ValueError, match=r"dnn_spatialtf: theta holds 3"):
        jax.jit(dnn_spatialtf).trace(IMG, jnp.ones((3, 2, 3)))
    with pytest.raises(TypeError, match=r"dnn_spatialtf: scale_width must be a static"):
        jax.jit(dnn_spatialtf).trace(IMG, THETA, 2.0)   # a traced scale
    with pytest.raises(ValueError, match=r"dnn_grid_sampler: grid must have shape"):
        jax.jit(dnn_grid_sampler).trace(IMG, jnp.ones((2, 3, 3, 1)))


def test_enabled_true_raises_without_the_handlers_or_without_a_gpu(monkeypatch):
    jaxdnn.config.update("dnn.enabled", True)
    # a build of the extension without the spatial transformer handlers (an old or
    # CPU-only one), on a machine where cuDNN could otherwise run
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_extension, "has_targets", lambda *names: False)
    with pytest.raises(RuntimeError, match=r"jaxdnn dnn_spatialtf: dnn\.enabled=True requires "
                       r"cuDNN.*no cuDNN handler 'jaxdnn_stn_"):
        dnn_spatialtf(IMG, THETA)
    # the handlers built but no GPU visible
    monkeypatch.setattr(_extension, "has_targets", lambda *names: True)
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: "no CUDA device")
    with pytest.raises(RuntimeError, match=r"jaxdnn dnn_spatialtf: dnn\.enabled=True requires "
                       r"cuDNN, but it cannot run here: no CUDA device"):
        dnn_spatialtf(IMG, THETA)


# ---------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------
def _grad_fn(scale=3):
    """A fresh gradient function of dnn_spatialtf upsampling by `scale`: several sample
    points fall between the same four pixels, so the image gradient sums many terms."""
    return jax.jit(jax.grad(lambda i, t, d: jnp.sum(dnn_spatialtf(i, t, scale, scale) * d),
                            argnums=(0, 1)))


def _determinism_inputs(dtype=jnp.float32, shape=(2, 4, 8, 8), scale=3):
    r = np.random.default_rng(5)
    img = jnp.asarray(r.standard_normal(shape), dtype)
    theta = jnp.asarray(random_theta(r, shape[0]) * 0.6, dtype)
    dout = jnp.asarray(r.standard_normal(shape[:2] + (shape[2] * scale, shape[3] * scale)), dtype)
    return img, theta, dout


def test_deterministic_flag_reaches_the_sampler_backward_and_removes_every_scatter():
    img, theta, dout = _determinism_inputs(shape=(1, 2, 4, 4), scale=1)
    grad = lambda i, t: jax.grad(lambda a, b: jnp.sum(dnn_spatialtf(a, b) * dout),
                                 argnums=(0, 1))(i, t)
    text = str(jax.make_jaxpr(grad)(img, theta))
    assert "deterministic=False" in text and "deterministic=True" not in text
    assert "scatter" in jax.jit(grad).lower(img, theta).as_text()
    with _deterministic():
        text = str(jax.make_jaxpr(grad)(img, theta))
        hlo = jax.jit(grad).lower(img, theta).as_text()
    assert "deterministic=True" in text
    assert "scatter" not in hlo


def test_deterministic_gradients_are_bitwise_identical_across_runs():
    img, theta, dout = _determinism_inputs()
    with _deterministic():
        grad = _grad_fn()
        results = [[np.asarray(g) for g in grad(img, theta, dout)] for _ in range(3)]
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert np.array_equal(a, b)
    # the same numbers as the default (scatter-add) path, up to the order of summation
    default = _grad_fn()(img, theta, dout)
    for a, b in zip(results[0], default):
        assert_close(a, b, "float32", factor=2)


def test_sorted_segment_sum_equals_scatter_add(rng):
    size = 9
    keys = rng.integers(0, size + 1, (3, 50))   # key == size: dropped
    keys[keys == 4] = 5                          # and pixel 4 receives nothing
    values = rng.standard_normal((3, 2, 50))
    args = (jnp.asarray(values), jnp.asarray(keys, jnp.int32))
    got = jax.jit(xla_reference._sorted_segment_sum, static_argnums=2)(*args, size)
    want = jax.jit(xla_reference._scatter_add, static_argnums=2)(*args, size)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    expected = np.zeros((3, 2, size))
    for n in range(3):
        for m in range(50):
            if keys[n, m] < size:
                expected[n, :, keys[n, m]] += values[n, :, m]
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)
    assert np.all(np.asarray(got)[:, :, 4] == 0)


# ---------------------------------------------------------------------------------------
# Lowering
# ---------------------------------------------------------------------------------------
def _cuda_hlo(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _stn_calls(text):
    return re.findall(r"stablehlo\.custom_call @(jaxdnn_stn_\w+)", text)


def test_xla_path_has_no_custom_call_even_for_cuda():
    loss = lambda i, t: jnp.sum(dnn_spatialtf(i, t) ** 2)
    with xla_path():
        assert _stn_calls(_cuda_hlo(jax.grad(loss, argnums=(0, 1)), IMG, THETA)) == []


@pytest.mark.skipif(_extension.extension() is None,
                    reason=f"jaxdnn CUDA extension not built: {_extension.unavailable_reason()}")
def test_auto_lowering_takes_xla_without_the_handlers(monkeypatch):
    """Under 'auto' the CUDA lowering calls the cuDNN handlers where the extension has
    them, and has no jaxdnn call where this build lacks them (an old or CPU-only one)."""
    jaxdnn.config.update("dnn.enabled", "auto")

    def calls():  # a fresh function each time: the path is chosen at trace time
        loss = lambda i, t: jnp.sum(dnn_spatialtf(i, t) ** 2)
        return _stn_calls(_cuda_hlo(jax.grad(loss, argnums=(0, 1)), IMG, THETA))

    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_extension, "has_targets", lambda *names: True)
    assert "jaxdnn_stn_sampler_fwd" in calls()
    monkeypatch.setattr(_extension, "has_targets", lambda *names: False)
    assert calls() == []


@pytest.fixture
def handlers_present(monkeypatch):
    """As on a GPU machine whose extension registers the four handlers: the CUDA lowering
    needs no GPU, so the availability checks are stubbed out."""
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_extension, "has_targets", lambda *names: True)
    jaxdnn.config.update("dnn.enabled", True)


def test_cuda_lowering_once_the_handlers_exist(handlers_present):
    img = jnp.ones((2, 3, 4, 5), jnp.float32)
    theta = jnp.ones((2, 2, 3), jnp.float32)
    loss = lambda i, t: jnp.sum(dnn_spatialtf(i, t, 1.5, 0.5).astype(jnp.float32))
    text = _cuda_hlo(jax.value_and_grad(loss, argnums=(0, 1)), img, theta)
    assert _stn_calls(text) == ["jaxdnn_stn_grid_fwd", "jaxdnn_stn_sampler_fwd",
                                "jaxdnn_stn_sampler_bwd", "jaxdnn_stn_grid_bwd"]
    assert "out_dims = dense<[2, 3, 2, 8]> : tensor<4xi64>" in text
    assert "tensor<2x3x4x5xf32>, tensor<2x2x8x2xf32>) -> tensor<2x3x2x8xf32>" in text
    # bfloat16 reaches the handlers as float32
    text = _cuda_hlo(loss, img.astype(jnp.bfloat16), theta.astype(jnp.bfloat16))
    assert "(tensor<2x2x3xf32>) -> tensor<2x2x8x2xf32>" in text
    # under dnn.deterministic the reductions (sampler backward, grid generator) stay on
    # XLA, without a scatter
    with _deterministic():
        text = _cuda_hlo(jax.value_and_grad(loss, argnums=(0, 1)), img, theta)
    assert _stn_calls(text) == ["jaxdnn_stn_sampler_fwd"]
    assert "scatter" not in text


def test_cuda_lowering_of_forward_mode(handlers_present):
    """jvp's program runs the primal on cuDNN (grid generator and sampler) and the tangents
    on XLA: no backward call."""
    img = jnp.ones((2, 3, 4, 5), jnp.float32)
    theta = jnp.ones((2, 2, 3), jnp.float32)
    text = _cuda_hlo(lambda a, t: jax.jvp(dnn_spatialtf, a, t), (img, theta), (img, theta))
    # the grid's tangent is the grid generator too (linear in theta)
    assert sorted(_stn_calls(text)) == ["jaxdnn_stn_grid_fwd", "jaxdnn_stn_grid_fwd",
                                        "jaxdnn_stn_sampler_fwd"]


# ---------------------------------------------------------------------------------------
# GPU: the cuDNN path (dnn.enabled=True) against the XLA path and float64
# ---------------------------------------------------------------------------------------
GPU_CASES = {
    "same-size": ((2, 4, 9, 8), 1, 1),
    "up-down": ((3, 5, 7, 10), 1.5, 0.6),
    "single-row": ((2, 3, 1, 12), 2, 1),
}


def _gpu_compare(cudnn, xla, expected, dtype, what, factor=1):
    assert cudnn.dtype == jnp.dtype(dtype) and cudnn.shape == expected.shape
    assert_close(cudnn, expected, dtype, factor=factor, err_msg=f"{what}: cuDNN vs float64")
    assert_close(xla, expected, dtype, factor=factor, err_msg=f"{what}: XLA vs float64")
    assert_close(cudnn, xla, dtype, factor=2 * factor, err_msg=f"{what}: cuDNN vs XLA")


@pytest.mark.gpu
@dtypes
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_forward_cudnn_vs_xla_vs_reference(rng, dtype, case):
    shape, sw, sh = GPU_CASES[case]
    img, img64 = cast(rng.standard_normal(shape), dtype)
    theta, theta64 = cast(random_theta(rng, shape[0]), dtype)
    f = lambda i, t: dnn_spatialtf(i, t, sw, sh)
    assert _stn_calls(jax.jit(f).lower(img, theta).as_text())
    factor = 2 if dtype == "float16" else 1
    _gpu_compare(_jit_run(f, img, theta), _jit_run(f, img, theta, xla=True),
                 ref.spatialtf(img64, theta64, sw, sh), dtype, "dnn_spatialtf", factor)
    grid, grid64 = cast(kink_free_grid(rng, shape[0], 5, 6, *shape[2:]), dtype)
    _gpu_compare(_jit_run(dnn_grid_sampler, img, grid),
                 _jit_run(dnn_grid_sampler, img, grid, xla=True),
                 ref.grid_sample(img64, grid64), dtype, "dnn_grid_sampler")
    g = lambda t: dnn_affine_grid(t, (shape[0], 1, 5, 6))
    _gpu_compare(_jit_run(g, theta), _jit_run(g, theta, xla=True),
                 ref.affine_grid(theta64, (shape[0], 1, 5, 6)), dtype, "dnn_affine_grid")


@pytest.mark.gpu
@dtypes
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_gradients_cudnn_vs_xla_vs_reference(rng, dtype, case):
    shape, sw, sh = GPU_CASES[case]
    out_hw = _out_hw(shape, sw, sh)
    img, img64 = cast(rng.standard_normal(shape), dtype)
    h, w = shape[2:]
    theta_np = (kink_free_theta(rng, shape[0], (h, w), out_hw) if min(h, w, *out_hw) > 1
                else random_theta(rng, shape[0]))
    theta, theta64 = cast(theta_np, dtype)
    dout, dout64 = cast(rng.standard_normal(shape[:2] + out_hw), dtype)
    vjp = lambda i, t, d: jax.vjp(lambda a, b: dnn_spatialtf(a, b, sw, sh), i, t)[1](d)
    calls = _stn_calls(jax.jit(vjp).lower(img, theta, dout).as_text())
    assert "jaxdnn_stn_sampler_bwd" in calls and "jaxdnn_stn_grid_bwd" in calls
    got = _jit_run(vjp, img, theta, dout)
    want = _jit_run(vjp, img, theta, dout, xla=True)
    eimg, etheta = ref.spatialtf_grad(img64, theta64, dout64, sw, sh)
    factor = 1 if dtype in ("float32", "float64") else 2
    _gpu_compare(got[0], want[0], eimg, dtype, "dimg", factor)
    _gpu_compare(got[1], want[1], etheta, dtype, "dtheta", 3 * factor)


@pytest.mark.gpu
def test_gpu_check_grads(rng):
    shape = (2, 3, 5, 6)
    img = jnp.asarray(rng.standard_normal(shape))
    theta = jnp.asarray(kink_free_theta(rng, 2, shape[2:], shape[2:]))
    check_grads(dnn_spatialtf, (img, theta), order=1, modes=["rev"])
    grid = jnp.asarray(kink_free_grid(rng, 2, 4, 4, 5, 6))
    check_grads(dnn_grid_sampler, (img, grid), order=1, modes=["rev"])


@pytest.mark.gpu
@pytest.mark.parametrize("in_axes", [(0, 0), (0, None), (None, 0), (2, 1)])
def test_gpu_vmap_and_vmap_of_grad(rng, in_axes):
    imgs = _stack(rng, lambda: rng.standard_normal(BASE), B, in_axes[0])
    thetas = _stack(rng, lambda: kink_free_theta(rng, 2, BASE[2:], BASE[2:]), B, in_axes[1])
    out = jax.jit(jax.vmap(dnn_spatialtf, in_axes=in_axes))(jnp.asarray(imgs), jnp.asarray(thetas))
    dout = rng.standard_normal(BASE)
    loss = lambda i, t: jnp.sum(dnn_spatialtf(i, t) * dout)
    gi, gt = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=in_axes))(
        jnp.asarray(imgs), jnp.asarray(thetas))
    for k in range(B):
        i, t = _take(imgs, k, in_axes[0]), _take(thetas, k, in_axes[1])
        assert_close(out[k], ref.spatialtf(i, t), "float64")
        eimg, etheta = ref.spatialtf_grad(i, t, dout)
        assert_close(gi[k], eimg, "float64", factor=10)
        assert_close(gt[k], etheta, "float64", factor=100)


@pytest.mark.gpu
def test_gpu_deterministic_sampler_backward_is_bitwise_reproducible():
    """Under dnn.deterministic the sampler backward is the scatter-free XLA path on the
    GPU, where a scatter-add would use atomics, and so is the grid generator. One compiled
    function, run three times: separate compilations may legitimately differ in the last
    bits (XLA autotunes the grid's matrix product anew each time and may pick another
    split), atomics would differ from run to run."""
    img, theta, dout = _determinism_inputs(shape=(16, 32, 64, 64), scale=2)
    with _deterministic():
        grad = _grad_fn(scale=2)
        text = grad.lower(img, theta, dout).as_text()
        assert "scatter" not in text and "jaxdnn_stn_sampler_bwd" not in text
        results = [[np.asarray(g) for g in grad(img, theta, dout)] for _ in range(3)]
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert np.array_equal(a, b)
    default_img, default_theta = _grad_fn(scale=2)(img, theta, dout)
    assert_close(results[0][0], default_img, "float32", factor=10)
    # dtheta sums over every sample point: where the two paths' grids differ by rounding
    # a point may cross a pixel edge (a kink of bilinear sampling), so compare the sums as
    # a whole rather than elementwise
    difference = np.linalg.norm(results[0][1] - np.asarray(default_theta))
    assert difference <= 1e-2 * np.linalg.norm(np.asarray(default_theta))


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_forward_mode_cudnn_vs_xla(rng, case):
    """jvp in img and theta and the hessian-vector product on the cuDNN path equal the XLA
    path's in float64; the primal comes from the cuDNN sampler."""
    shape, sw, sh = GPU_CASES[case]
    out_hw = _out_hw(shape, sw, sh)
    h, w = shape[2:]
    img = jnp.asarray(rng.standard_normal(shape))
    theta = jnp.asarray(kink_free_theta(rng, shape[0], (h, w), out_hw) if min(h, w, *out_hw) > 1
                        else random_theta(rng, shape[0]))
    ti, tt = jnp.asarray(rng.standard_normal(shape)), jnp.asarray(rng.standard_normal((shape[0], 2, 3)))
    f = lambda i, t: dnn_spatialtf(i, t, sw, sh)
    jvp = lambda i, t, a, b: jax.jvp(f, (i, t), (a, b))
    assert "jaxdnn_stn_sampler_fwd" in _stn_calls(jax.jit(jvp).lower(img, theta, ti, tt).as_text())
    dout = jnp.asarray(rng.standard_normal(shape[:2] + out_hw))
    grad = jax.grad(lambda i, t: jnp.sum(jnp.sin(f(i, t)) * dout), argnums=(0, 1))
    hvp = lambda i, t, a, b: jax.jvp(grad, (i, t), (a, b))[1]
    for fn in (jvp, hvp):
        cudnn = _jit_run(fn, img, theta, ti, tt)
        xla = _jit_run(fn, img, theta, ti, tt, xla=True)
        jax.tree.map(lambda c, x: np.testing.assert_allclose(c, x, rtol=1e-9, atol=1e-10),
                     cudnn, xla)
