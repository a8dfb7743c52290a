"""Arrays past 2**31 elements: cuDNN's tensor descriptors take 32-bit sizes and strides, so
jaxdnn never hands it such an array (jaxdnn/_primitive.py, MAX_CUDNN_ELEMENTS). With
dnn.enabled='auto' the op takes XLA's path and must give the right answer; with
dnn.enabled=True it must raise ValueError at trace time, before cuDNN sees the sizes.

gpu+slow: real bfloat16 arrays of about 2**31 + 2**21 elements (4 GiB each) on the device,
one op family per test (softmax, pooling, batch norm, convolution input, and the spatial
transformer in float32, the one type its cuDNN sampler takes, whose sampling grid is the
array past 2**31); each test first
checks the device's free memory and skips with the reason where it is short. The results
are compared on slices, including the elements past index 2**31, against NumPy float64
computed from the same input elements (fetched from the device), or, for batch norm's
statistics over the whole array, against jax.numpy's float32 reduction. Set
JAXDNN_HUGE_JSON to a file name to have each test's figures (shape, elements, seconds,
what auto and forced cuDNN did) written there (scripts/gpu_check.sh's reliability stage
does).

Without a GPU the same guard is tested on abstract shapes (no allocation): here for the
RNN, in tests/test_lowering.py for the other op families.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import to_f64

import jaxdnn
from jaxdnn import _extension
from jaxdnn._primitive import MAX_CUDNN_ELEMENTS

# 2 * 4 * 16384 * 16400 = 2**31 + 2**21 elements: the last 2**21 lie past any 32-bit index.
SHAPE = (2, 4, 16384, 16400)
ELEMENTS = math.prod(SHAPE)
assert ELEMENTS > MAX_CUDNN_ELEMENTS
# The sampler's image of 32768 x 32769 float32 (4 GiB); its sampling grid, (1, H, W, 2),
# has 2**31 + 2**16 elements.
STN_SHAPE = (1, 1, 32768, 32769)
assert 2 * math.prod(STN_SHAPE) > MAX_CUDNN_ELEMENTS
GIB = 2**30
RECORDS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _write_records():
    yield
    path = os.environ.get("JAXDNN_HUGE_JSON")
    if path and RECORDS:
        device = jax.devices()[0]
        with open(path, "w") as f:
            json.dump({"card": device.device_kind, "platform": device.platform,
                       "jax": jax.__version__, "max_cudnn_elements": MAX_CUDNN_ELEMENTS,
                       "records": RECORDS}, f, indent=1)


def free_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def need_device_memory(gib: float) -> None:
    free = free_device_bytes()
    if free is None:
        pytest.skip("the device reports no memory statistics to check the free memory")
    if free < gib * GIB:
        pytest.skip(f"needs {gib:.0f} GiB of free device memory; {free / GIB:.1f} GiB free")


@jax.jit
def _smooth(phase):
    """A bfloat16 array of SHAPE made on the device (iota, no host copy): distinct-ish
    values in [-2, 2] that vary along every axis."""
    n, c, h, w = (jax.lax.broadcasted_iota(jnp.float32, SHAPE, d) for d in range(4))
    x = jnp.sin(0.37 * h + 1.3 * c + phase) + jnp.cos(0.11 * w + 0.7 * n + 0.5 * c)
    return x.astype(jnp.bfloat16)


def slices(last_axis_len: int):
    """(n, h0, w0) corners of the slices compared: the first, a middle one, and the last,
    whose elements lie past flat index 2**31."""
    return [(0, 0, 0), (1, SHAPE[2] // 2, last_axis_len // 2 - 8),
            (SHAPE[0] - 1, SHAPE[2] - 8, last_axis_len - 8)]


def forced_raises(fn, *args):
    """dnn.enabled=True: ValueError at trace time naming cuDNN's 32-bit sizes."""
    with jaxdnn.config.override(**{"dnn.enabled": True}):
        with pytest.raises(ValueError, match="cuDNN's 32-bit sizes and strides"):
            jax.jit(fn).trace(*args)


def takes_xla(fn, *args) -> bool:
    """With 'auto' the program holds no jaxdnn custom call."""
    return "jaxdnn_" not in jax.jit(fn).lower(*args).as_text()


def record(op, shape, dtype, seconds, **extra):
    RECORDS.append({"op": op, "shape": list(shape), "dtype": str(dtype),
                    "elements": int(math.prod(shape)), "auto": "correct (XLA path)",
                    "forced_cudnn": "ValueError at trace time", "seconds": round(seconds, 2),
                    **extra})


@pytest.fixture
def auto():
    """'auto', as a user runs: the gpu marker's dnn.enabled=True is undone."""
    jaxdnn.config.update("dnn.enabled", "auto")




@pytest.mark.gpu
@pytest.mark.slow
def test_softmax_past_2_31_elements(auto):
    need_device_memory(24)
    start = time.perf_counter()
    x = _smooth(0.0)
    fn = lambda t: jaxdnn.dnn_softmax(t)  # over C at each pixel
    forced_raises(fn, x)
    assert takes_xla(fn, x)
    y = jax.block_until_ready(jax.jit(fn)(x))
    assert y.shape == SHAPE and y.dtype == jnp.bfloat16
    for n, h, w in slices(SHAPE[3]):
        xs = to_f64(x[n, :, h:h + 8, w:w + 8])
        e = np.exp(xs - xs.max(axis=0))
        np.testing.assert_allclose(to_f64(y[n, :, h:h + 8, w:w + 8]), e / e.sum(axis=0),
                                   rtol=2**-7, atol=2**-9)
    del x, y
    record("softmax", SHAPE, "bfloat16", time.perf_counter() - start)


@pytest.mark.gpu
@pytest.mark.slow
def test_max_pooling_past_2_31_elements(auto):
    need_device_memory(12)
    start = time.perf_counter()
    x = _smooth(0.5)
    fn = lambda t: jaxdnn.dnn_pool(t, (2, 2), (2, 2), mode="max")
    forced_raises(fn, x)
    assert takes_xla(fn, x)
    y = jax.block_until_ready(jax.jit(fn)(x))
    assert y.shape == (2, 4, SHAPE[2] // 2, SHAPE[3] // 2)
    for n, h, w in slices(SHAPE[3]):
        h, w = h - h % 2, w - w % 2
        xs = to_f64(x[n, :, h:h + 8, w:w + 8]).reshape(4, 4, 2, 4, 2)
        np.testing.assert_array_equal(to_f64(y[n, :, h // 2:h // 2 + 4, w // 2:w // 2 + 4]),
                                      xs.max(axis=(2, 4)))
    del x, y
    record("pool (max 2x2/2)", SHAPE, "bfloat16", time.perf_counter() - start)


@pytest.mark.gpu
@pytest.mark.slow
def test_batch_norm_past_2_31_elements(auto):
    need_device_memory(40)
    start = time.perf_counter()
    x = _smooth(1.0)
    gamma = jnp.asarray([1.0, 0.5, 2.0, -1.0], jnp.bfloat16).reshape(1, 4, 1, 1)
    beta = jnp.asarray([0.0, 1.0, -0.5, 0.25], jnp.bfloat16).reshape(1, 4, 1, 1)
    fn = lambda t, g, b: jaxdnn.dnn_batch_normalization_train(t, g, b, mode="spatial",
                                                              epsilon=1e-4)[:3]
    forced_raises(fn, x, gamma, beta)
    assert takes_xla(fn, x, gamma, beta)
    out, mean, invstd = jax.block_until_ready(jax.jit(fn)(x, gamma, beta))
    # the statistics of the whole array, by jax.numpy in float32 (two passes)
    ref_mean = jax.jit(lambda t: jnp.mean(t.astype(jnp.float32), axis=(0, 2, 3)))(x)
    ref_var = jax.jit(lambda t, m: jnp.mean(jnp.square(t.astype(jnp.float32)
                                                       - m.reshape(1, 4, 1, 1)),
                                            axis=(0, 2, 3)))(x, ref_mean)
    ref_mean, ref_var = to_f64(ref_mean), to_f64(ref_var)
    ref_invstd = 1.0 / np.sqrt(ref_var + 1e-4)
    np.testing.assert_allclose(to_f64(mean).ravel(), ref_mean, rtol=2**-7, atol=2**-7)
    np.testing.assert_allclose(to_f64(invstd).ravel(), ref_invstd, rtol=2**-7)
    g, b = to_f64(gamma).reshape(4, 1, 1), to_f64(beta).reshape(4, 1, 1)
    for n, h, w in slices(SHAPE[3]):
        xs = to_f64(x[n, :, h:h + 8, w:w + 8])
        want = (xs - ref_mean.reshape(4, 1, 1)) * ref_invstd.reshape(4, 1, 1) * g + b
        np.testing.assert_allclose(to_f64(out[n, :, h:h + 8, w:w + 8]), want,
                                   rtol=2**-6, atol=2**-6 * float(np.abs(want).max()))
    del x, out
    record("batch norm (spatial, train)", SHAPE, "bfloat16", time.perf_counter() - start)


@pytest.mark.gpu
@pytest.mark.slow
def test_convolution_input_past_2_31_elements(auto):
    need_device_memory(24)
    start = time.perf_counter()
    x = _smooth(1.5)
    rng = np.random.default_rng(0)
    w = jnp.asarray(0.3 * rng.standard_normal((3, 4, 3, 3)), jnp.bfloat16)
    # stride 2, 'half' padding (1): the output is a quarter of the input (2**29 elements)
    fn = lambda t, k: jaxdnn.dnn_conv(t, k, border_mode="half", subsample=(2, 2),
                                      conv_mode="cross")
    forced_raises(fn, x, w)
    assert takes_xla(fn, x, w)
    y = jax.block_until_ready(jax.jit(fn)(x, w))
    assert y.shape == (2, 3, SHAPE[2] // 2, SHAPE[3] // 2)
    w64 = to_f64(w)
    for n, h, wd in slices(SHAPE[3]):
        i0, j0 = max(h // 2 - 1, 1), max(wd // 2 - 1, 1)  # output rows/columns 4 x 4
        xs = to_f64(x[n, :, 2 * i0 - 1:2 * i0 + 8, 2 * j0 - 1:2 * j0 + 8])
        want = np.zeros((3, 4, 4))
        for i in range(4):
            for j in range(4):
                patch = xs[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
                want[:, i, j] = np.tensordot(w64, patch, axes=([1, 2, 3], [0, 1, 2]))
        got = to_f64(y[n, :, i0:i0 + 4, j0:j0 + 4])
        np.testing.assert_allclose(got, want, rtol=2**-6, atol=2**-6 * np.abs(want).max())
    del x, y
    record("conv (input; 3x3/2 half)", SHAPE, "bfloat16", time.perf_counter() - start)


@pytest.mark.gpu
@pytest.mark.slow
def test_spatial_transformer_grid_past_2_31_elements(auto):
    shape = STN_SHAPE
    need_device_memory(40)  # image, grid (twice the image), output, temporaries
    start = time.perf_counter()
    img = jax.jit(lambda: (jnp.sin(0.001 * jax.lax.broadcasted_iota(jnp.float32, shape, 2))
                           + jnp.cos(0.001 * jax.lax.broadcasted_iota(jnp.float32, shape, 3))))()
    theta = jnp.asarray([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], jnp.float32)  # identity
    fn = lambda i, t: jaxdnn.dnn_spatialtf(i, t)
    forced_raises(fn, img, theta)
    assert takes_xla(fn, img, theta)
    out = jax.block_until_ready(jax.jit(fn)(img, theta))
    assert out.shape == shape
    # identity: each output pixel samples its own position (the float32 grid is off by
    # at most a few thousandths of a pixel; the image changes by 0.001 per pixel); the
    # last rows' grid entries lie past flat index 2**31
    h_, w_ = shape[2:]
    for h, w in ((0, 0), (h_ // 2, w_ // 3), (h_ - 8, w_ - 8)):
        np.testing.assert_allclose(to_f64(out[0, 0, h:h + 8, w:w + 8]),
                                   to_f64(img[0, 0, h:h + 8, w:w + 8]), atol=1e-4)
    del img, out
    record("spatial transformer (identity; the grid)", (1, shape[2], shape[3], 2), "float32",
           time.perf_counter() - start)


# ---- the guard on abstract shapes (any machine) ------------------------------------------

def test_rnn_past_2_31_elements_takes_xla_or_raises(monkeypatch):
    """An RNN input of more than 2**31 elements: 'auto' traces XLA's path (no jaxdnn
    custom call), dnn.enabled=True raises ValueError naming the shape. Abstract shapes
    only: nothing is allocated."""
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    block = jaxdnn.RNNBlock("bfloat16", 8, 1, "lstm")
    steps, batch, dim = 16384, 2, 65537  # 2**31 + 2**15 elements
    x = jax.ShapeDtypeStruct((steps, batch, dim), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((block.get_param_size((batch, dim)),), jnp.bfloat16)
    h = jax.ShapeDtypeStruct((1, batch, 8), jnp.bfloat16)
    fn = lambda w, x, h, c: block.apply(w, x, h, c)[0]
    jaxdnn.config.update("dnn.enabled", True)
    with pytest.raises(ValueError, match=r"\(16384, 2, 65537\).*cuDNN's 32-bit sizes"):
        jax.jit(fn).trace(w, x, h, h)
    jaxdnn.config.update("dnn.enabled", "auto")
    text = jax.jit(fn).trace(w, x, h, h).lower(lowering_platforms=("cuda",)).as_text()
    assert "jaxdnn_" not in text
    assert "16384x2x65537xbf16" in text
