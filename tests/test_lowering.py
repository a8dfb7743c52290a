"""CUDA lowering without a GPU: the jaxdnn custom calls and their attributes, as XLA will
see them on a CUDA device. Runs everywhere the extension is built (CI builds it)."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdnn
from jaxdnn import _extension

# CI and `make test` build the extension, so there these tests must run, not skip.
pytestmark = pytest.mark.skipif(
    _extension.extension() is None and not os.environ.get("JAXDNN_REQUIRE_EXTENSION"),
    reason=f"jaxdnn CUDA extension not built: {_extension.unavailable_reason()}")


@pytest.fixture
def cudnn_forced(monkeypatch):
    """dnn.enabled=True as on a GPU machine: every op takes its cuDNN path, including
    where 'auto' would pick XLA as faster. (Without a GPU, True would raise; the lowering
    itself needs no GPU, so the availability check is stubbed out here.)"""
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    jaxdnn.config.update("dnn.enabled", True)


def cuda_hlo(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def custom_calls(text):
    """[(target, attribute text)] of every custom call in the StableHLO `text`."""
    return re.findall(r"stablehlo\.custom_call @(\w+)\(.*?mhlo\.backend_config = \{(.*?)\}", text)


def test_extension_is_loaded_and_registers_every_target():
    assert _extension.extension() is not None, _extension.unavailable_reason()
    names = set(_extension.extension().registrations())
    assert names == {"jaxdnn_softmax_fwd", "jaxdnn_softmax_bwd", "jaxdnn_pool_fwd",
                     "jaxdnn_pool_bwd", "jaxdnn_pool_bwd_linear", "jaxdnn_conv_fwd",
                     "jaxdnn_conv_bwd_data", "jaxdnn_conv_bwd_filter", "jaxdnn_bn_fwd_train",
                     "jaxdnn_bn_fwd_infer", "jaxdnn_bn_bwd", "jaxdnn_stn_grid_fwd",
                     "jaxdnn_stn_grid_bwd", "jaxdnn_stn_sampler_fwd", "jaxdnn_stn_sampler_bwd",
                     "jaxdnn_rnn_fwd", "jaxdnn_rnn_bwd_data", "jaxdnn_rnn_bwd_weights",
                     "jaxdnn_rnn_fwd_host_lengths", "jaxdnn_rnn_bwd_data_host_lengths",
                     "jaxdnn_rnn_bwd_weights_host_lengths"}
    stages = _extension.extension().registrations()["jaxdnn_pool_fwd"]
    assert set(stages) == {"instantiate", "initialize", "execute"}
    assert _extension.compiled_version() // 10000 == 9


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_softmax_forward_and_backward_custom_calls(layout, cudnn_forced):
    x = jnp.ones((2, 3, 4, 5), jnp.float32)
    text = cuda_hlo(jax.grad(lambda x: jaxdnn.dnn_softmax(x, "log", "instance", layout).sum()), x)
    calls = custom_calls(text)
    assert [c[0] for c in calls] == ["jaxdnn_softmax_fwd", "jaxdnn_softmax_bwd"]
    for _, attrs in calls:
        assert f'layout = "{layout}"' in attrs
        assert 'algo = "log"' in attrs and 'mode = "instance"' in attrs
    assert "tensor<2x3x4x5xf32>" in text


def test_softmax_2d_input_lowers_as_4d_instance_mode(cudnn_forced):
    text = cuda_hlo(lambda x: jaxdnn.dnn_softmax(x), jnp.ones((8, 16), jnp.bfloat16))
    (call,) = custom_calls(text)
    assert call[0] == "jaxdnn_softmax_fwd" and 'mode = "instance"' in call[1]
    assert "(tensor<8x16x1x1xbf16>) -> tensor<8x16x1x1xbf16>" in text


def test_max_pool_custom_calls_and_attributes(cudnn_forced):
    x = jnp.ones((2, 3, 9, 9), jnp.float16)
    text = cuda_hlo(jax.grad(lambda x: jaxdnn.dnn_pool(x, (3, 3), (2, 2), "max", (1, 1)).astype(
        jnp.float32).sum()), x)
    calls = custom_calls(text)
    assert [c[0] for c in calls] == ["jaxdnn_pool_fwd", "jaxdnn_pool_bwd"]
    attrs = calls[0][1]
    assert 'mode = "max"' in attrs and 'layout = "NCHW"' in attrs
    assert "ws = dense<3> : tensor<2xi64>" in attrs
    assert "stride = dense<2> : tensor<2xi64>" in attrs
    assert "pad = dense<1> : tensor<2xi64>" in attrs
    assert "(tensor<2x3x9x9xf16>) -> tensor<2x3x5x5xf16>" in text


def test_linear_pool_gradient_is_the_linear_backward(cudnn_forced):
    x = jnp.ones((1, 4, 4, 2, 3), jnp.float32)  # NDHWC
    f = lambda x: jaxdnn.dnn_pool(x, (2, 2, 1), (2, 1, 1), "sum", (1, 0, 0), data_format="NDHWC")
    # The gradient of a linear op needs no forward pass: only the transpose remains.
    calls = custom_calls(cuda_hlo(jax.grad(lambda x: f(x).sum()), x))
    assert [c[0] for c in calls] == ["jaxdnn_pool_bwd_linear"]
    assert 'mode = "sum"' in calls[0][1] and 'layout = "NDHWC"' in calls[0][1]
    assert "ws = dense<[2, 2, 1]> : tensor<3xi64>" in calls[0][1]
    calls = custom_calls(cuda_hlo(lambda x: jax.jvp(f, (x,), (x,)), x))
    assert [c[0] for c in calls] == ["jaxdnn_pool_fwd", "jaxdnn_pool_fwd"]


def test_deterministic_flag_selects_max_deterministic(cudnn_forced):
    x = jnp.ones((1, 1, 4, 4), jnp.float32)
    with jaxdnn.config.override(**{"dnn.deterministic": True}):
        text = cuda_hlo(lambda x: jaxdnn.dnn_pool(x, (2, 2)), x)
    assert 'mode = "max_deterministic"' in text


def test_vmap_folds_into_the_batch_axis(cudnn_forced):
    x = jnp.ones((5, 2, 3, 4, 4), jnp.float32)
    text = cuda_hlo(jax.vmap(lambda x: jaxdnn.dnn_pool(x, (2, 2))), x)
    assert "(tensor<10x3x4x4xf32>) -> tensor<10x3x3x3xf32>" in text
    text = cuda_hlo(jax.vmap(jaxdnn.dnn_softmax, in_axes=2), x)  # 3 images of (5, 2, 4, 4)
    assert "(tensor<15x2x4x4xf32>) -> tensor<15x2x4x4xf32>" in text


def test_auto_takes_the_faster_implementation_of_each_pooling_half():
    # BENCHMARKS.md: XLA's reduce_window forward beats cuDNN's legacy pooling, and the XLA
    # path's gather backward of max pooling beats cuDNN's backward (and the average
    # backward is XLA's too): under 'auto' no pooling pass reaches cuDNN, in any dtype,
    # mode or under dnn.deterministic (the gathers are deterministic).
    x = jnp.ones((2, 3, 9, 9), jnp.float32)
    grad = lambda mode: jax.grad(lambda x: jaxdnn.dnn_pool(x, (3, 3), (2, 2), mode, (1, 1)).sum())
    for mode in ("max", "max_deterministic", "average_inc_pad"):
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            text = cuda_hlo(grad(mode), x.astype(dtype))
            assert custom_calls(text) == [] and "reduce_window" in text, (mode, dtype)
    with jaxdnn.config.override(**{"dnn.deterministic": True}):
        assert custom_calls(cuda_hlo(grad("max"), x)) == []
    # dnn.enabled=True: test_max_pool_custom_calls_and_attributes


def _softmax_cases():
    """(x, dnn_softmax keywords) of every kind of softmax call, and the jax.nn-style ones
    models make: attention scores over their last axis, a classifier head's rows."""
    return [(jnp.ones((2, 4, 4, 3)), dict(data_format="NHWC")),
            (jnp.ones((2, 4, 4, 3)), dict(data_format="NHWC", mode="instance")),
            (jnp.ones((2, 3, 4, 4)), {}),
            (jnp.ones((2, 3, 4, 4)), dict(mode="instance")),
            (jnp.ones((8, 16)), {}),
            (jnp.ones((8, 16), jnp.bfloat16), dict(algo="log"))]


def test_auto_softmax_takes_xla_where_models_use_it():
    # BENCHMARKS.md, "Softmax and batch norm where models use them": inside a program XLA
    # fuses softmax with its neighbours and cuDNN measured slower ((N, C) rows 0.29x with
    # the backward); no case measured cuDNN ahead there, so 'auto' takes XLA everywhere.
    def targets(fn, x):
        text = cuda_hlo(lambda x: jax.vjp(fn, x)[1](x), x)  # forward and backward
        return [c[0] for c in custom_calls(text)]
    for x, kw in _softmax_cases():
        assert targets(lambda x: jaxdnn.dnn_softmax(x, **kw), x) == [], kw
    scores = jnp.ones((2, 4, 8, 8), jnp.bfloat16)  # (B, H, L, L)
    assert targets(lambda s: jaxdnn.nn.softmax(s, axis=-1), scores) == []
    assert targets(lambda s: jaxdnn.nn.log_softmax(s), jnp.ones((4, 10))) == []


def test_forced_softmax_takes_cudnn_where_auto_takes_xla(cudnn_forced):
    for x, kw in _softmax_cases():
        text = cuda_hlo(lambda x: jax.vjp(lambda x: jaxdnn.dnn_softmax(x, **kw), x)[1](x), x)
        assert [c[0] for c in custom_calls(text)] == ["jaxdnn_softmax_fwd",
                                                      "jaxdnn_softmax_bwd"], kw


def test_disabled_flag_lowers_to_xla_only():
    x = jnp.ones((2, 3, 4, 4), jnp.float32)
    with jaxdnn.config.override(**{"dnn.enabled": False}):
        text = cuda_hlo(lambda x: jaxdnn.dnn_pool(jaxdnn.dnn_softmax(x), (2, 2)), x)
    assert "jaxdnn_" not in text and "reduce_window" in text


def test_flag_change_retraces_a_jitted_function(monkeypatch):
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)  # True as on a GPU
    x = jnp.ones((2, 4, 4, 3), jnp.float32)
    f = jax.jit(lambda x: jaxdnn.dnn_softmax(x, data_format="NHWC"))
    assert "jaxdnn_" not in f.trace(x).lower(lowering_platforms=("cuda",)).as_text()  # 'auto'
    with jaxdnn.config.override(**{"dnn.enabled": True}):
        assert "jaxdnn_softmax_fwd" in f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    with jaxdnn.config.override(**{"dnn.enabled": False}):
        assert "jaxdnn_" not in f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
        np.testing.assert_allclose(f(x), np.full(x.shape, 1 / 3), rtol=1e-6)


def test_convolution_passes_attributes_and_workspace(cudnn_forced):
    x, w = jnp.ones((2, 4, 8, 8), jnp.float32), jnp.ones((6, 2, 3, 3), jnp.float32)
    f = lambda x, w: jaxdnn.dnn_conv(x, w, border_mode=(1, 2), subsample=(2, 1), num_groups=2,
                                     conv_mode="cross").sum()
    text = cuda_hlo(f, x, w)
    ((target, attrs),) = custom_calls(text)
    assert target == "jaxdnn_conv_fwd"
    for expected in ["pre_padding = dense<[1, 2]> : tensor<2xi64>",
                     "post_padding = dense<[1, 2]> : tensor<2xi64>",
                     "strides = dense<[2, 1]> : tensor<2xi64>", "dilation = dense<1> : tensor<2xi64>",
                     # channels-first images reach cuDNN channels-last (CHANNELS_LAST_DTYPES)
                     "flip = 0 : i64", 'layout = "NHWC"', 'compute_dtype = "float32"',
                     'algo = "small"', "deterministic = 0 : i64", "allow_tf32 = 1 : i64"]:
        assert expected in attrs, expected
    # The workspace: the 64 MiB granted to 'small', as a trailing u8 result.
    assert f"tensor<{64 << 20}xui8>" in text
    # A linear op's gradient needs only the transposes: backward data and backward filter.
    calls = custom_calls(cuda_hlo(jax.grad(f, (0, 1)), x, w))
    assert sorted(c[0] for c in calls) == ["jaxdnn_conv_bwd_data", "jaxdnn_conv_bwd_filter"]
    assert all('algo = "none"' in c[1] for c in calls)  # the backward flags' defaults


def test_convolution_algo_tf32_and_workspace_policy(cudnn_forced):
    x, w = jnp.ones((1, 2, 6, 6), jnp.float32), jnp.ones((3, 2, 3, 3), jnp.float32)
    text = cuda_hlo(lambda x, w: jaxdnn.dnn_conv(x, w, algo="large"), x, w)
    assert 'algo = "large"' in text and f"tensor<{1 << 30}xui8>" in text
    with jaxdnn.config.override(**{"dnn.conv.workspace_limit": 1 << 20}):
        text = cuda_hlo(lambda x, w: jaxdnn.dnn_conv(x, w, algo="time_once"), x, w)
    assert 'algo = "time_once"' in text and f"tensor<{1 << 20}xui8>" in text
    with jax.default_matmul_precision("highest"):
        text = cuda_hlo(lambda x, w: jaxdnn.dnn_conv(x, w), x, w)
    assert "allow_tf32 = 0 : i64" in text
    with jaxdnn.config.override(**{"dnn.deterministic": True}):
        text = cuda_hlo(jax.grad(lambda x: jaxdnn.dnn_conv(x, w).sum()), x)
    assert "deterministic = 1 : i64" in text


def test_convolution_1d_and_3d_channels_last_lower_to_cudnn(cudnn_forced):
    x, w = jnp.ones((2, 9, 4), jnp.float16), jnp.ones((5, 4, 3), jnp.float16)
    text = cuda_hlo(lambda x, w: jaxdnn.dnn_conv(x, w, data_format="NHWC"), x, w)
    assert 'layout = "NWC"' in text and 'compute_dtype = "float32"' in text
    # kernels reach cuDNN in the image's layout: (K, L, C) beside NWC images
    assert "(tensor<2x9x4xf16>, tensor<5x3x4xf16>) -> (tensor<2x7x5xf16>" in text
    x, w = jnp.ones((1, 4, 4, 4, 2), jnp.float32), jnp.ones((3, 2, 2, 2, 2), jnp.float32)
    text = cuda_hlo(lambda x, w: jaxdnn.dnn_conv3d(x, w, data_format="NDHWC"), x, w)
    assert 'layout = "NDHWC"' in text and "tensor<1x3x3x3x3xf32>" in text


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_channels_first_convolutions_run_channels_last(dtype, cudnn_forced):
    # jaxdnn.conv.CHANNELS_LAST_DTYPES: every pass of an NCHW convolution reaches cuDNN as
    # NHWC (image and output gradient transposed, kernels (K, R, S, C)).
    x, w = jnp.ones((2, 4, 9, 7), dtype), jnp.ones((6, 4, 3, 5), dtype)
    f = lambda x, w: jaxdnn.dnn_conv(x, w, border_mode="half").astype(jnp.float32).sum()
    calls = custom_calls(cuda_hlo(f, x, w))
    assert [c[0] for c in calls] == ["jaxdnn_conv_fwd"] and 'layout = "NHWC"' in calls[0][1]
    text = cuda_hlo(jax.grad(f, (0, 1)), x, w)
    calls = custom_calls(text)
    assert sorted(c[0] for c in calls) == ["jaxdnn_conv_bwd_data", "jaxdnn_conv_bwd_filter"]
    assert all('layout = "NHWC"' in c[1] for c in calls)
    name = {jnp.bfloat16: "bf16", jnp.float16: "f16", jnp.float32: "f32"}[dtype]
    assert f"tensor<6x3x5x4x{name}>" in text  # kernels (K, R, S, C)
    # The public backward passes take the same route.
    gi = cuda_hlo(lambda w, dy: jaxdnn.dnn_gradinput(w, dy, x.shape, border_mode="half"),
                  w, jnp.ones((2, 6, 9, 7), dtype))
    gw = cuda_hlo(lambda x, dy: jaxdnn.dnn_gradweight(x, dy, w.shape, border_mode="half"),
                  x, jnp.ones((2, 6, 9, 7), dtype))
    for text in (gi, gw):
        ((_, attrs),) = custom_calls(text)
        assert 'layout = "NHWC"' in attrs
    # Pointwise kernels keep the image's layout, in every pass.
    w1 = jnp.ones((6, 4, 1, 1), dtype)
    text = cuda_hlo(jax.grad(lambda x, w: jaxdnn.dnn_conv(x, w).astype(jnp.float32).sum(),
                             (0, 1)), x, w1)
    calls = custom_calls(text)
    assert len(calls) == 2 and all('layout = "NCHW"' in c[1] for c in calls)


@pytest.mark.parametrize("dtype,channels,route,backward_layout", [
    (jnp.float32, 3, "auto", "NCHW"),  # a stem: conv.FEW_CHANNELS
    (jnp.float32, 8, "auto", "NHWC"),
    (jnp.bfloat16, 3, "auto", "NHWC"),
    (jnp.float32, 3, "channels_last", "NHWC"),  # the flag routes every pass
])
def test_a_float32_stems_backward_keeps_the_images_layout(dtype, channels, route,
                                                          backward_layout, cudnn_forced):
    x, w = jnp.ones((2, channels, 9, 7), dtype), jnp.ones((6, channels, 3, 5), dtype)
    jaxdnn.config.update("dnn.conv.layout_route", route)
    f = lambda x, w: jaxdnn.dnn_conv(x, w, subsample=(2, 2)).astype(jnp.float32).sum()
    ((name, attrs),) = custom_calls(cuda_hlo(f, x, w))
    assert name == "jaxdnn_conv_fwd" and 'layout = "NHWC"' in attrs
    text = cuda_hlo(jax.grad(f, (0, 1)), x, w)
    calls = custom_calls(text)
    assert sorted(c[0] for c in calls) == ["jaxdnn_conv_bwd_data", "jaxdnn_conv_bwd_filter"]
    assert all(f'layout = "{backward_layout}"' in c[1] for c in calls), calls
    kernels = (6, channels, 3, 5) if backward_layout == "NCHW" else (6, 3, 5, channels)
    name = {jnp.bfloat16: "bf16", jnp.float32: "f32"}[dtype]
    assert f"tensor<{'x'.join(map(str, kernels))}x{name}>" in text


@pytest.mark.parametrize("route,dtype,layout", [("own", jnp.float32, "NCHW"),
                                                ("own", jnp.bfloat16, "NCHW"),
                                                ("channels_last", jnp.float32, "NHWC"),
                                                ("auto", jnp.float32, "NHWC")])
def test_layout_route_flag_picks_the_layout_cudnn_sees(route, dtype, layout, cudnn_forced):
    """dnn.conv.layout_route overrides the measured policy (CHANNELS_LAST_DTYPES)."""
    x, w = jnp.ones((2, 4, 9, 7), dtype), jnp.ones((6, 4, 3, 5), dtype)
    jaxdnn.config.update("dnn.conv.layout_route", route)
    f = lambda x, w: jaxdnn.dnn_conv(x, w, border_mode="half").astype(jnp.float32).sum()
    calls = custom_calls(cuda_hlo(f, x, w))
    assert [c[0] for c in calls] == ["jaxdnn_conv_fwd"], calls
    assert f'layout = "{layout}"' in calls[0][1]


def test_stride_one_depthwise_input_gradients_run_as_forward_convolutions(cudnn_forced):
    # jaxdnn/conv.py, _bwd_data_as_forward: the input gradient of a stride-1 depthwise
    # convolution is a forward convolution of dy, the other conv_mode, padded by the
    # kernel's dilated extent - 1 - padding on each side (3 - 1 - 2 = 0, 2 - 1 - 0 = 1).
    x = jnp.ones((2, 4, 9, 7), jnp.float32)
    w = jnp.ones((4, 1, 3, 2), jnp.float32)
    f = lambda x, w, **kw: jaxdnn.dnn_conv(x, w, num_groups=4, **kw).sum()
    calls = custom_calls(cuda_hlo(jax.grad(lambda x, w: f(x, w, border_mode=(2, 0)), (0, 1)),
                                  x, w))
    assert sorted(c[0] for c in calls) == ["jaxdnn_conv_bwd_filter", "jaxdnn_conv_fwd"]
    ((_, as_forward),) = [c for c in calls if c[0] == "jaxdnn_conv_fwd"]
    assert "flip = 0" in as_forward and 'algo = "none"' in as_forward  # the bwd_data flag's
    assert "pre_padding = dense<[0, 1]>" in as_forward
    assert "post_padding = dense<[0, 1]>" in as_forward
    # dnn_gradinput (the transposed convolution) takes the same forward convolution.
    dy = jnp.ones((2, 4, 11, 6), jnp.float32)
    ((name, attrs),) = custom_calls(cuda_hlo(
        lambda w, dy: jaxdnn.dnn_gradinput(w, dy, x.shape, border_mode=(2, 0), num_groups=4,
                                           conv_mode="cross"), w, dy))
    assert name == "jaxdnn_conv_fwd" and "flip = 1" in attrs
    # Strides, channel multipliers and padding wider than the kernel keep backward-data.
    for kw, kerns in ((dict(subsample=(2, 1)), w), (dict(border_mode=3), w),
                      ({}, jnp.ones((8, 1, 3, 2), jnp.float32))):
        calls = custom_calls(cuda_hlo(jax.grad(lambda x, w: f(x, w, **kw)), x, kerns))
        assert [c[0] for c in calls] == ["jaxdnn_conv_bwd_data"], kw


def test_auto_convolution_takes_cudnn_in_both_layouts():
    # BENCHMARKS.md: forward+backward on cuDNN ties or beats XLA in both layouts.
    w = jnp.ones((3, 2, 3, 3), jnp.float32)
    for x, layout in ((jnp.ones((1, 2, 6, 6), jnp.float32), "NCHW"),
                      (jnp.ones((1, 6, 6, 2), jnp.float32), "NHWC")):
        calls = custom_calls(cuda_hlo(lambda x, w: jaxdnn.dnn_conv(x, w, data_format=layout), x, w))
        assert [c[0] for c in calls] == ["jaxdnn_conv_fwd"]


def test_convolution_without_cudnn_engines_for_its_precision_takes_xla(cudnn_forced):
    # cuDNN computes float32 data in float32 only: precision='float64' goes to XLA.
    x, w = jnp.ones((1, 2, 6, 6), jnp.float32), jnp.ones((3, 2, 3, 3), jnp.float32)
    text = cuda_hlo(lambda x, w: jaxdnn.dnn_conv(x, w, precision="float64"), x, w)
    assert custom_calls(text) == [] and "stablehlo.convolution" in text


def test_batch_norm_custom_calls_and_attributes(cudnn_forced):
    x = jnp.ones((4, 3, 5, 5), jnp.float16)
    gamma = beta = jnp.ones((1, 3, 1, 1), jnp.float32)
    def loss(x, gamma, beta):
        out, mean, invstd = jaxdnn.dnn_batch_normalization_train(x, gamma, beta, "spatial", 1e-4)
        return out.astype(jnp.float32).sum()
    text = cuda_hlo(jax.grad(loss, (0, 1, 2)), x, gamma, beta)
    calls = custom_calls(text)
    assert [c[0] for c in calls] == ["jaxdnn_bn_fwd_train", "jaxdnn_bn_bwd"]
    assert 'mode = "spatial"' in calls[0][1] and 'layout = "NCHW"' in calls[0][1]
    assert "epsilon = 1.000000e-04 : f64" in calls[0][1]
    # half-precision images: float32 parameters and statistics
    # (the legacy calls need no workspace: an empty u8 result)
    assert ("-> (tensor<4x3x5x5xf16>, tensor<1x3x1x1xf32>, tensor<1x3x1x1xf32>, tensor<0xui8>)"
            in text)
    # spatial channels-last runs cuDNN's graph API, with a workspace
    xl, gl = jnp.ones((4, 5, 5, 3), jnp.float32), jnp.ones((1, 1, 1, 3), jnp.float32)
    text = cuda_hlo(lambda x, g: jaxdnn.dnn_batch_normalization_train(
        x, g, g, "spatial", 1e-4, data_format="NHWC")[0], xl, gl)
    assert 'layout = "NHWC"' in text and f"tensor<{16 << 20}xui8>" in text
    text = cuda_hlo(lambda x, g, b: jaxdnn.dnn_batch_normalization_test(x, g, b, g, b, "spatial"), x, gamma, beta)
    assert [c[0] for c in custom_calls(text)] == ["jaxdnn_bn_fwd_infer"]


def _batch_norm_targets(x, layout, mode="spatial", training=True):
    """The jaxdnn custom calls of a batch norm's forward and backward (training) or of its
    inference forward, lowered for CUDA."""
    channels_last = layout == "NHWC" and mode == "spatial"
    if mode == "per-activation":
        shape = (1,) + x.shape[1:]
    else:
        c = x.shape[-1] if channels_last else x.shape[1]
        shape = (1, 1, 1, c) if channels_last else (1, c, 1, 1)
    g = jnp.ones(shape, jnp.float32)
    if training:
        f = lambda x: jaxdnn.dnn_batch_normalization_train(x, g, g, mode, data_format=layout)[0]
        text = cuda_hlo(lambda x: jax.vjp(f, x)[1](x), x)
    else:
        text = cuda_hlo(lambda x: jaxdnn.dnn_batch_normalization_test(
            x, g, g, g, g, mode, data_format=layout), x)
    return [c[0] for c in custom_calls(text)]


BN_CASES = [(dtype, layout, mode, training)
            for dtype in (jnp.float32, jnp.bfloat16, jnp.float16)
            for layout in ("NCHW", "NHWC") for mode in ("spatial", "per-activation")
            for training in (True, False)]


def _bn_input(dtype, layout):
    return jnp.ones((2, 3, 4, 4) if layout == "NCHW" else (2, 4, 4, 3), dtype)


@pytest.mark.parametrize("dtype,layout,mode,training", BN_CASES)
def test_auto_batch_norm_takes_xla_where_models_use_it(dtype, layout, mode, training):
    # BENCHMARKS.md, "Softmax and batch norm where models use them": inside a program XLA
    # fuses batch norm with the convolution and activation around it; float32 NCHW spatial
    # training measured 0.58x there, half precision lost per call already, and no case
    # measured cuDNN ahead inside a program. float64 (unmeasured) stays on cuDNN.
    x = _bn_input(dtype, layout)
    assert _batch_norm_targets(x, layout, mode, training) == []


@pytest.mark.parametrize("dtype,layout,mode,training", BN_CASES)
def test_forced_batch_norm_takes_cudnn_where_auto_takes_xla(dtype, layout, mode, training,
                                                           cudnn_forced):
    expected = (["jaxdnn_bn_fwd_train", "jaxdnn_bn_bwd"] if training
                else ["jaxdnn_bn_fwd_infer"])
    assert _batch_norm_targets(_bn_input(dtype, layout), layout, mode, training) == expected


@pytest.mark.parametrize("training", [True, False])
def test_auto_batch_norm_keeps_cudnn_for_float64(training):
    expected = (["jaxdnn_bn_fwd_train", "jaxdnn_bn_bwd"] if training
                else ["jaxdnn_bn_fwd_infer"])
    for layout in ("NCHW", "NHWC"):
        x = _bn_input(jnp.float64, layout)
        assert _batch_norm_targets(x, layout, training=training) == expected, layout


def test_spatial_transformer_custom_calls(cudnn_forced):
    img = jnp.ones((2, 3, 8, 8), jnp.float32)
    theta = jnp.tile(jnp.asarray([[1.0, 0, 0], [0, 1, 0]]), (2, 1, 1))
    f = lambda img, theta: jaxdnn.dnn_spatialtf(img, theta, 0.5, 0.5).sum()
    calls = custom_calls(cuda_hlo(jax.value_and_grad(f, (0, 1)), img, theta))
    assert sorted(c[0] for c in calls) == ["jaxdnn_stn_grid_bwd", "jaxdnn_stn_grid_fwd",
                                           "jaxdnn_stn_sampler_bwd", "jaxdnn_stn_sampler_fwd"]
    grid_call = next(c for c in calls if c[0] == "jaxdnn_stn_grid_fwd")
    assert "out_dims = dense<[2, 3, 4, 4]> : tensor<4xi64>" in grid_call[1]
    # dnn.deterministic: cuDNN's atomic reductions (sampler and grid backward) are replaced
    # by the XLA path; the forward sampler stays on cuDNN.
    with jaxdnn.config.override(**{"dnn.deterministic": True}):
        calls = custom_calls(cuda_hlo(jax.value_and_grad(f, (0, 1)), img, theta))
    assert [c[0] for c in calls] == ["jaxdnn_stn_sampler_fwd"]


def test_workspace_is_an_explicit_u8_result_dropped_after_the_call(monkeypatch):
    # Ops that need cuDNN workspace get it as a trailing u8 result of the
    # custom call, sized by a Python policy, so tracing needs no GPU.
    from jaxdnn._compat import ShapedArray
    from jaxdnn._primitive import define_primitive
    prim = define_primitive(
        "jaxdnn_test_workspace", abstract_eval=lambda x, **p: ShapedArray(x.shape, x.dtype),
        reference=lambda x, **p: x + 1, ffi_target="jaxdnn_test_workspace",
        workspace_bytes=lambda x, *, scale, **p: scale * x.size)
    x = jnp.ones((2, 3), jnp.float32)
    text = cuda_hlo(lambda x: prim.bind(x, scale=4, impl="cudnn") * 2, x)
    assert re.search(r"custom_call @jaxdnn_test_workspace\(%arg0\).*scale = 4 : i64.*"
                     r"-> \(tensor<2x3xf32>, tensor<24xui8>\)", text)
    np.testing.assert_allclose(jax.jit(lambda x: prim.bind(x, scale=4, impl="cudnn") * 2)(x), 4.0)


# ---- arrays too large for cuDNN's 32-bit sizes and strides ----------------------------
BIG = (2, 1024, 1024, 1025)  # 2**31 + 2**21 elements: only traced and lowered, never made
SMALL = (2, 4, 6, 6)


def _big_cases(shape):
    f32 = lambda s: jax.ShapeDtypeStruct(s, jnp.float16)
    n, c = shape[0], shape[1]
    params = f32((1, c, 1, 1))
    theta = jax.ShapeDtypeStruct((n, 2, 3), jnp.float32)
    return {
        "softmax": (lambda x: jaxdnn.dnn_softmax(x), (f32(shape),)),
        "pool": (lambda x: jaxdnn.dnn_pool(x, (2, 2), mode="max_deterministic"), (f32(shape),)),
        "conv": (lambda x, w: jaxdnn.dnn_conv(x, w, border_mode="half"),
                 (f32(shape), f32((c, c, 1, 1)))),
        "batch_norm": (lambda x, g, b: jaxdnn.dnn_batch_normalization_train(
            x, g, b, mode="spatial")[0], (f32(shape), params, params)),
        "spatial_transformer": (lambda x, t: jaxdnn.dnn_spatialtf(x.astype(jnp.float32), t),
                                (f32(shape), theta)),
    }


@pytest.mark.parametrize("name", sorted(_big_cases(SMALL)))
def test_arrays_too_large_for_cudnn_take_xla_or_raise(name, cudnn_forced):
    fn, args = _big_cases(SMALL)[name]
    assert any(c[0].startswith("jaxdnn_") for c in custom_calls(cuda_hlo(fn, *args)))
    fn, args = _big_cases(BIG)[name]
    with pytest.raises(ValueError, match="cuDNN's 32-bit sizes and strides"):
        cuda_hlo(fn, *args)
    jaxdnn.config.update("dnn.enabled", "auto")  # the same call on XLA's path, no error
    assert not any(c[0].startswith("jaxdnn_") for c in custom_calls(cuda_hlo(fn, *args)))


def test_every_target_carries_the_attributes_its_handlers_decode(cudnn_on_cpu):
    """Each custom call's attribute names are exactly those of the C++ attribute struct its
    handlers decode (cuda/common/staged_op.h): XLA's FFI rejects any other set at
    instantiate, on the GPU only, so the contract is checked here for all 21 targets."""
    f32 = jnp.float32
    x, w = jnp.ones((2, 3, 6, 6), f32), jnp.ones((4, 3, 3, 3), f32)
    gamma = jnp.ones((1, 3, 1, 1), f32)
    theta = jnp.tile(jnp.asarray([[1.0, 0, 0], [0, 1, 0]]), (2, 1, 1))
    block = jaxdnn.RNNBlock("float32", 4, 1, "lstm")
    w_rnn = jnp.zeros(block.get_param_size((2, 5)), f32)
    seq, h = jnp.ones((3, 2, 5), f32), jnp.zeros((1, 2, 4), f32)
    rnn_loss = lambda w, seq, *lengths: block.apply(w, seq, h, h, *lengths)[0].sum()
    programs = [
        (jax.grad(lambda x: jaxdnn.dnn_softmax(x).sum()), x),
        (jax.grad(lambda x: jaxdnn.dnn_pool(x, (2, 2)).sum()), x),
        (jax.grad(lambda x: jaxdnn.dnn_pool(x, (2, 2), mode="sum").sum()), x),
        (jax.value_and_grad(lambda x, w: jaxdnn.dnn_conv(x, w).sum(), (0, 1)), x, w),
        (jax.grad(lambda x, g: jaxdnn.dnn_batch_normalization_train(
            x, g, g, "spatial")[0].sum(), (0, 1)), x, gamma),
        (lambda x, g: jaxdnn.dnn_batch_normalization_test(x, g, g, g, g, "spatial"), x, gamma),
        (jax.value_and_grad(lambda x, t: jaxdnn.dnn_spatialtf(x, t, 0.5, 0.5).sum(), (0, 1)),
         x, theta),
        (jax.grad(rnn_loss, (0, 1)), w_rnn, seq),
        (jax.grad(rnn_loss, (0, 1)), w_rnn, seq, jnp.asarray([3, 1], jnp.int32)),
    ]
    carried = {}
    for fn, *args in programs:
        for target, attrs in custom_calls(cuda_hlo(fn, *args)):
            carried.setdefault(target, set()).add(frozenset(re.findall(r"(\w+) = ", attrs)))
    decoded = _extension.extension().target_attributes()
    assert set(carried) == set(decoded)
    for target, name_sets in carried.items():
        assert name_sets == {frozenset(decoded[target])}, target


def test_rnn_queries_read_keywords_as_the_targets_attributes():
    """The trace-time queries read the keywords that name attributes as XLA decodes a
    target's (one list, JAXDNN_RNN_ATTRS): each is parsed as the handlers parse it, a wrong
    type is a TypeError naming it. Checked before any device is asked, so on the CPU too."""
    query = _extension.extension().rnn_temp_space_sizes
    config = dict(mode="lstm", input_mode="linear", algo="standard", hidden_size=8,
                  num_layers=1, bidirectional=False, allow_tf32=True, dtype="float32",
                  max_seq_length=2, batch_size=2, input_dim=8, training=True)
    with pytest.raises(RuntimeError, match="unknown mode 'lstmx'"):
        query(**{**config, "mode": "lstmx"})
    with pytest.raises(RuntimeError, match="unknown algo 'fast'"):
        query(**{**config, "algo": "fast"})
    with pytest.raises(RuntimeError, match=r"proj_size must lie in \[0, hidden_size\)"):
        query(**{**config, "proj_size": 8})
    with pytest.raises(RuntimeError, match="proj_size needs mode lstm"):
        query(**{**config, "mode": "gru", "proj_size": 4})
    with pytest.raises(RuntimeError, match="hidden_size and num_layers must be positive"):
        query(**{**config, "num_layers": 0})
    for keyword, value in (("hidden_size", "8"), ("mode", 1), ("bidirectional", 0.5)):
        with pytest.raises(TypeError, match=f"keyword {keyword} has the wrong type"):
            query(**{**config, keyword: value})
    with pytest.raises(TypeError, match="static_lengths is not a query keyword"):
        query(**{**config, "static_lengths": [2, 2]})


def test_rnn_projection_carries_proj_size(cudnn_on_cpu):
    """An lstm with a projection: every RNN target carries proj_size (the handlers' attribute
    set, no other) and the shapes cuDNN's projSize gives: y (T, N, D * proj), hx and its
    gradient (L * D, N, proj), cx (L * D, N, hidden)."""
    f32 = jnp.float32
    block = jaxdnn.RNNBlock("float32", 4, 1, "lstm", "linear", "bidirectional", proj_size=3)
    w = jnp.zeros(block.get_param_size((2, 5)), f32)
    seq, h, c = jnp.ones((3, 2, 5), f32), jnp.zeros((2, 2, 3), f32), jnp.zeros((2, 2, 4), f32)
    loss = lambda w, seq, h, *lengths: block.apply(w, seq, h, c, *lengths)[0].sum()
    decoded = _extension.extension().target_attributes()
    for lengths in ((), (jnp.asarray([3, 1], jnp.int32),)):
        text = cuda_hlo(jax.grad(loss, (0, 1, 2)), w, seq, h, *lengths)
        calls = [c for c in custom_calls(text) if c[0].startswith("jaxdnn_rnn_")]
        assert len(calls) == 3
        for target, attrs in calls:
            assert "proj_size = 3 : i64" in attrs and 'mode = "lstm"' in attrs, target
            assert set(re.findall(r"(\w+) = ", attrs)) == set(decoded[target]), target
        assert "-> (tensor<3x2x6xf32>, tensor<2x2x3xf32>, tensor<2x2x4xf32>" in text
