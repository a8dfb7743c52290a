"""jaxdnn.nn against the operations it stands in for (jax.lax, jax.nn, flax.linen): the same
arguments give the same results and gradients, on randomized configurations, on the XLA
path and (gpu-marked) on cuDNN."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxdnn
from jaxdnn import nn

CASES = 16
LAYOUTS = {1: [("NCH", "OIH", "NCH"), ("NHC", "HIO", "NHC"), ("NHC", "OIH", "NCH")],
           2: [("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC"), ("NHWC", "OIHW", "NCHW"),
               ("CHWN", "IHWO", "NWHC"), None],
           3: [("NCDHW", "OIDHW", "NCDHW"), ("NDHWC", "DHWIO", "NDHWC")]}


@pytest.fixture(params=["xla", pytest.param("cudnn", marks=pytest.mark.gpu)])
def path(request):
    if request.param == "xla":
        jaxdnn.config.update("dnn.enabled", False)
    return request.param


def close(actual, expected, rtol=2e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _shape(spec: str, sizes: dict) -> tuple:
    return tuple(sizes[c] for c in spec)


def conv_case(seed):
    """Random lax.conv_general_dilated arguments (one spatial rank, layout, padding...)."""
    rng = np.random.default_rng(seed)
    nd = int(rng.choice([1, 2, 2, 3]))
    dn = LAYOUTS[nd][int(rng.integers(len(LAYOUTS[nd])))]
    groups = int(rng.choice([1, 1, 2]))
    kernel = [int(rng.integers(1, 4)) for _ in range(nd)]
    dilation = [int(rng.integers(1, 3)) for _ in range(nd)]
    strides = [int(rng.integers(1, 3)) for _ in range(nd)]
    spatial = [int(rng.integers((k - 1) * d + 1, (k - 1) * d + 6)) for k, d in zip(kernel, dilation)]
    padding = rng.choice(["SAME", "VALID", "SAME_LOWER", "pairs"])
    if padding == "pairs":  # asymmetric, beyond cuDNN's symmetric padding, negative too
        padding = [(int(rng.integers(-1, 4)), int(rng.integers(0, 4))) for _ in range(nd)]
    names = "HWD"[:nd] if nd > 1 else "H"
    sizes = dict(zip(names, spatial), N=int(rng.integers(1, 3)), C=2 * groups)
    ksizes = dict(zip(names, kernel), O=2 * groups, I=2)
    lhs_spec, rhs_spec, _ = dn if dn is not None else ("NC" + names, "OI" + names, None)
    lhs = rng.standard_normal(_shape(lhs_spec, sizes)).astype(np.float32)
    rhs = (0.5 * rng.standard_normal(_shape(rhs_spec, ksizes))).astype(np.float32)
    return lhs, rhs, dict(window_strides=strides, padding=padding, rhs_dilation=dilation,
                          dimension_numbers=dn, feature_group_count=groups,
                          precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("seed", range(CASES))
def test_conv_general_dilated_equals_lax(seed, path):
    lhs, rhs, kwargs = conv_case(seed)
    ours = lambda a, b: nn.conv_general_dilated(a, b, **kwargs)
    theirs = lambda a, b: lax.conv_general_dilated(a, b, **kwargs)
    expected = jax.jit(theirs)(lhs, rhs)
    close(jax.jit(ours)(lhs, rhs), expected)
    ct = np.random.default_rng(seed + 1000).standard_normal(expected.shape).astype(np.float32)
    grads = jax.jit(lambda a, b: jax.vjp(ours, a, b)[1](ct))(lhs, rhs)
    expected_grads = jax.jit(lambda a, b: jax.vjp(theirs, a, b)[1](ct))(lhs, rhs)
    for g, e in zip(grads, expected_grads):
        close(g, e, rtol=5e-5)


def test_conv_general_dilated_takes_conv_dimension_numbers_and_preferred_type(path):
    lhs, rhs, kwargs = conv_case(3)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, kwargs.pop("dimension_numbers"))
    kwargs["dimension_numbers"] = dn
    ours = nn.conv_general_dilated(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16),
                                   preferred_element_type=jnp.float32, **kwargs)
    theirs = lax.conv_general_dilated(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16),
                                      preferred_element_type=jnp.float32, **kwargs)
    assert ours.dtype == theirs.dtype == jnp.float32
    close(ours, theirs, rtol=2e-2)


@pytest.mark.parametrize("extra", [dict(lhs_dilation=(2, 1)), dict(batch_group_count=2)])
def test_what_cudnn_cannot_do_runs_lax(extra):
    rng = np.random.default_rng(0)
    lhs = rng.standard_normal((4, 4, 6, 5)).astype(np.float32)
    rhs = rng.standard_normal((4, 4, 3, 2)).astype(np.float32)
    kwargs = dict(window_strides=(1, 1), padding=[(1, 1), (0, 1)], **extra)
    fn = lambda a, b: nn.conv_general_dilated(a, b, **kwargs)
    text = jax.jit(fn).lower(lhs, rhs).as_text()
    assert "jaxdnn" not in text  # no jaxdnn primitive: XLA's own convolution
    np.testing.assert_array_equal(np.asarray(fn(lhs, rhs)),
                                  np.asarray(lax.conv_general_dilated(lhs, rhs, **kwargs)))


@pytest.mark.parametrize("seed", range(CASES // 2))
def test_conv_transpose_equals_lax(seed, path):
    rng = np.random.default_rng(seed)
    nd = int(rng.choice([1, 2]))
    strides = tuple(int(rng.integers(1, 4)) for _ in range(nd))
    kernel = tuple(int(rng.integers(1, 4)) for _ in range(nd))
    padding = rng.choice(["SAME", "VALID", "pairs"])
    if padding == "pairs":
        padding = [(int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(nd)]
    transpose_kernel = bool(rng.integers(2))
    lhs = rng.standard_normal((2, *(int(rng.integers(2, 6)) for _ in range(nd)), 3)).astype(np.float32)
    rhs = rng.standard_normal((*kernel, 3, 4) if not transpose_kernel else (*kernel, 4, 3))
    rhs = rhs.astype(np.float32)
    kwargs = dict(strides=strides, padding=padding, transpose_kernel=transpose_kernel,
                  precision=lax.Precision.HIGHEST)
    close(jax.jit(lambda a, b: nn.conv_transpose(a, b, **kwargs))(lhs, rhs),
          jax.jit(lambda a, b: lax.conv_transpose(a, b, **kwargs))(lhs, rhs))


@pytest.mark.parametrize("fn,reference", [(nn.softmax, jax.nn.softmax),
                                          (nn.log_softmax, jax.nn.log_softmax)])
@pytest.mark.parametrize("shape,axis", [((5, 7), -1), ((5, 7), 0), ((2, 3, 4, 5), 1),
                                        ((2, 3, 4, 5), -1), ((2, 3, 4, 5), (1, 2)),
                                        ((3, 4, 6), 1), ((2, 3, 4, 5, 2), (0, 4)), ((6,), 0)])
def test_softmax_equals_jax_nn(fn, reference, shape, axis, path):
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32) * 3
    close(jax.jit(lambda x: fn(x, axis=axis))(x), reference(x, axis=axis))
    dy = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    close(jax.vjp(lambda x: fn(x, axis=axis), x)[1](dy)[0],
          jax.vjp(lambda x: reference(x, axis=axis), x)[1](dy)[0])


def test_softmax_where_runs_jax_nn():
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    where = np.arange(15).reshape(3, 5) % 3 != 0
    np.testing.assert_array_equal(np.asarray(nn.softmax(x, where=where)),
                                  np.asarray(jax.nn.softmax(x, where=where)))


@pytest.mark.parametrize("padding", ["VALID", "SAME", ((1, 0), (0, 1))])
@pytest.mark.parametrize("name", ["max_pool", "avg_pool"])
def test_pools_equal_flax_linen(name, padding, path):
    linen = pytest.importorskip("flax.linen")
    x = np.random.default_rng(1).standard_normal((2, 7, 6, 3)).astype(np.float32)
    ours, theirs = getattr(nn, name), getattr(linen, name)
    close(jax.jit(lambda x: ours(x, (3, 2), (2, 1), padding))(x),
          theirs(x, (3, 2), (2, 1), padding))


def test_batch_norm_equals_the_formula(path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 4, 5, 3)).astype(np.float32) * 2 + 1
    scale, bias = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    y, mean, var = jax.jit(lambda *a: nn.batch_norm(*a, epsilon=1e-3))(x, scale, bias)
    x64 = x.astype(np.float64)
    m, v = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    close(y, (x64 - m) / np.sqrt(v + 1e-3) * scale + bias, rtol=1e-4)
    close(mean, m)
    close(var, v, rtol=1e-4)
