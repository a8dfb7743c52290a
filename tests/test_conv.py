"""dnn_conv, dnn_conv3d, dnn_gradinput(3d) and dnn_gradweight(3d) against independent NumPy
float64 loop references (tests/oracles/conv.py), on CPU through the XLA path and, in the
`gpu`-marked tests, through cuDNN against the XLA path and the references."""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from jax.test_util import check_grads

from oracles import conv as cref
import jaxdnn
from helpers import FLOAT_DTYPES, assert_close, cast, to_f64, tolerance, xla_path
from helpers import jit_run as _jit_run
from jaxdnn import (dnn_conv, dnn_conv3d, dnn_gradinput, dnn_gradinput3d, dnn_gradweight,
                    dnn_gradweight3d)
from jaxdnn.config import ALGO_BWD_DATA, ALGO_BWD_FILTER, ALGO_FWD, PRECISIONS

CONV_MODES = ("conv", "cross")
LAYOUTS = ("channels_first", "channels_last")

# name -> (channels-first image shape, kernel shape, border_mode, subsample, dilation,
#          num_groups). Every border_mode form (valid, full, half, int, tuple) appears in
# 1-D, 2-D and 3-D; strides and dilations > 1, even kernels, groups 1, 2 and depthwise
# (groups == channels, with and without a channel multiplier). The stride-1 depthwise
# configs (*-depthwise-s1) take their input gradient as a forward convolution
# (jaxdnn/conv.py, _bwd_data_as_forward), but for the wide padding of 2d-int-wide-...,
# which keeps the backward-data pass.
CONFIGS = {
    "1d-valid": ((2, 3, 7), (4, 3, 3), "valid", (1,), (1,), 1),
    "1d-full-s2-d2": ((2, 2, 7), (2, 2, 2), "full", (2,), (2,), 1),
    "1d-half-g2": ((1, 4, 6), (4, 2, 3), "half", (1,), (1,), 2),
    "1d-int-s3-depthwise": ((2, 3, 7), (3, 1, 2), 2, (3,), (1,), 3),
    "1d-tuple-d2": ((1, 2, 6), (2, 2, 3), (1,), (1,), (2,), 1),
    "2d-valid": ((2, 3, 6, 7), (4, 3, 3, 2), "valid", (1, 1), (1, 1), 1),
    "2d-full-s21": ((1, 2, 5, 6), (3, 2, 2, 3), "full", (2, 1), (1, 1), 1),
    "2d-half-d21": ((2, 2, 7, 6), (2, 2, 3, 3), "half", (1, 1), (2, 1), 1),
    "2d-half-even-s12": ((1, 3, 6, 5), (2, 3, 2, 4), "half", (1, 2), (1, 1), 1),
    "2d-int-s2-g2": ((2, 4, 5, 6), (4, 2, 3, 3), 1, (2, 2), (1, 1), 2),
    "2d-tuple-depthwise": ((1, 4, 6, 7), (4, 1, 3, 2), (2, 0), (1, 2), (1, 2), 4),
    "2d-full-d2-multiplier": ((2, 2, 5, 5), (4, 1, 2, 2), "full", (1, 1), (2, 2), 2),
    "3d-valid": ((2, 2, 4, 5, 3), (3, 2, 2, 3, 2), "valid", (1, 1, 1), (1, 1, 1), 1),
    "3d-half-s212-g2": ((1, 4, 5, 4, 5), (4, 2, 3, 2, 3), "half", (2, 1, 2), (1, 1, 1), 2),
    "3d-tuple-d2-depthwise": ((1, 2, 5, 5, 4), (2, 1, 2, 2, 2), (1, 0, 2), (1, 2, 1),
                              (2, 1, 1), 2),
    "3d-full-s112": ((1, 2, 3, 4, 3), (2, 2, 2, 2, 2), "full", (1, 1, 2), (1, 1, 1), 1),
    "3d-int-s2": ((2, 2, 4, 4, 4), (2, 2, 3, 3, 3), 2, (2, 2, 2), (1, 1, 1), 1),
    "1d-valid-d2-depthwise-s1": ((2, 3, 9), (3, 1, 3), "valid", (1,), (2,), 3),
    "2d-tuple-depthwise-s1": ((2, 4, 6, 7), (4, 1, 3, 2), (2, 0), (1, 1), (1, 1), 4),
    "2d-int-wide-depthwise-s1": ((1, 2, 4, 5), (2, 1, 2, 2), 3, (1, 1), (1, 1), 2),
    "3d-full-depthwise-s1": ((1, 2, 4, 4, 3), (2, 1, 2, 3, 2), "full", (1, 1, 1), (1, 1, 1), 2),
}
configs = pytest.mark.parametrize("config", list(CONFIGS))
layouts = pytest.mark.parametrize("layout", LAYOUTS)
conv_modes = pytest.mark.parametrize("conv_mode", CONV_MODES)


class Case:
    """One config in one layout: shapes in the layout, the ops to call, the references."""

    def __init__(self, config, layout="channels_first", cfg=None):
        img_cf, kern, border, stride, dil, groups = cfg or CONFIGS[config]
        self.name = config
        self.nd = len(kern) - 2
        self.fmt = cref.data_format_for(self.nd, layout == "channels_last")
        self.img_shape = cref.layout_shape(img_cf, self.fmt)
        self.kern_shape = tuple(kern)
        self.border, self.stride, self.dil, self.groups = border, stride, dil, groups
        self.out_shape = cref.output_shape(self.img_shape, kern, border, stride, dil, self.fmt)
        self.geometry = dict(border_mode=border, subsample=stride, dilation=dil,
                             num_groups=groups)

    # jaxdnn
    def conv(self, conv_mode="conv", **kwargs):
        op = dnn_conv3d if self.nd == 3 else dnn_conv
        return functools.partial(op, conv_mode=conv_mode, data_format=self.fmt,
                                 **self.geometry, **kwargs)

    def gradinput(self, conv_mode="conv", **kwargs):
        op = dnn_gradinput3d if self.nd == 3 else dnn_gradinput
        return lambda w, dy: op(w, dy, self.img_shape, conv_mode=conv_mode,
                                data_format=self.fmt, **self.geometry, **kwargs)

    def gradweight(self, conv_mode="conv", **kwargs):
        op = dnn_gradweight3d if self.nd == 3 else dnn_gradweight
        return lambda x, dy: op(x, dy, self.kern_shape, conv_mode=conv_mode,
                                data_format=self.fmt, **self.geometry, **kwargs)

    # references
    def ref_conv(self, x, w, conv_mode="conv"):
        return cref.conv(x, w, self.border, self.stride, self.dil, conv_mode, self.groups,
                         self.fmt)

    def ref_gradinput(self, w, dy, conv_mode="conv"):
        return cref.gradinput(w, dy, self.img_shape, self.border, self.stride, self.dil,
                              conv_mode, self.groups, self.fmt)

    def ref_gradweight(self, x, dy, conv_mode="conv"):
        return cref.gradweight(x, dy, self.kern_shape, self.border, self.stride, self.dil,
                               conv_mode, self.groups, self.fmt)

    # data
    def data(self, rng, dtype="float64"):
        """((x, w, dy) as jax arrays of dtype, the same rounded values in float64)."""
        xj, x = cast(rng.standard_normal(self.img_shape), dtype)
        wj, w = cast(rng.standard_normal(self.kern_shape), dtype)
        dyj, dy = cast(rng.standard_normal(self.out_shape), dtype)
        return (xj, wj, dyj), (x, w, dy)


def _ctx_for(dtype):
    """float32 math without TF32 (a no-op on CPU; on the GPU it forbids tensor-core TF32)."""
    if jnp.dtype(dtype) == jnp.float32:
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


# =======================================================================================
# The oracle itself
# =======================================================================================
def test_reference_by_hand():
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    # cross-correlation, valid: y[0,0] = 1*1 + 2*2 + 4*3 + 5*4 = 37
    np.testing.assert_array_equal(cref.conv(x, w, conv_mode="cross")[0, 0], [[37, 47], [67, 77]])
    # true convolution flips the kernel: y[0,0] = 1*4 + 2*3 + 4*2 + 5*1 = 23
    np.testing.assert_array_equal(cref.conv(x, w, conv_mode="conv")[0, 0], [[23, 33], [53, 63]])
    # full: the corner output sees x[0,0] through the last tap (cross) / the first (conv)
    full = cref.conv(x, w, "full", conv_mode="cross")[0, 0]
    assert full.shape == (4, 4) and full[0, 0] == 4.0 and full[3, 3] == 9.0
    full = cref.conv(x, w, "full", conv_mode="conv")[0, 0]
    assert full[0, 0] == 1.0 and full[3, 3] == 36.0
    # stride 2 with pad 1 keeps the corners; dilation 2 reaches x[0,0] and x[2,2]
    y = cref.conv(x, w, 1, (2, 2), conv_mode="cross")[0, 0]
    # outputs at padded positions (-1,-1), (-1,1), (1,-1), (1,1)
    np.testing.assert_array_equal(y, [[1 * 4, 2 * 3 + 3 * 4],
                                      [4 * 2 + 7 * 4, 5 * 1 + 6 * 2 + 8 * 3 + 9 * 4]])
    yd = cref.conv(x, w, "valid", dilation=(2, 2), conv_mode="cross")[0, 0]
    np.testing.assert_array_equal(yd, [[1 * 1 + 3 * 2 + 7 * 3 + 9 * 4]])
    # border_mode -> pads
    assert cref.border_pads("valid", (3, 2)) == ((0, 0), (0, 0))
    assert cref.border_pads("full", (3, 2)) == ((2, 2), (1, 1))
    assert cref.border_pads("half", (3, 2)) == ((1, 1), (1, 1))
    assert cref.border_pads("half", (3, 4), (2, 1)) == ((2, 2), (2, 2))
    assert cref.border_pads("full", (3, 3), (2, 3)) == ((4, 4), (6, 6))
    assert cref.border_pads(2, (3, 3, 3)) == ((2, 2),) * 3
    assert cref.border_pads((1, 0), (3, 3)) == ((1, 1), (0, 0))
    with pytest.raises(ValueError):
        cref.border_pads((1, -1), (3, 3))
    # 'half' with an odd kernel and stride 1 keeps the size; 'full' grows it by k - 1
    assert cref.output_shape((1, 1, 7, 6), (1, 1, 3, 5), "half") == (1, 1, 7, 6)
    assert cref.output_shape((1, 1, 7, 6), (1, 1, 3, 5), "full") == (1, 1, 9, 10)
    assert cref.output_shape((1, 7, 6, 1), (2, 1, 3, 5), "full",
                             data_format="NHWC") == (1, 9, 10, 2)
    assert cref.output_shape((1, 1, 8), (1, 1, 3), "valid", (3,), (2,)) == (1, 1, 2)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("mode", ["valid", "full"])
def test_reference_vs_scipy(rng, nd, mode):
    """One image, several channels, stride and dilation 1: 'cross' is scipy's correlate and
    'conv' scipy's convolve, summed over the channels."""
    spatial = (7, 6, 5)[:nd]
    ksp = (3, 2, 4)[:nd]
    x = rng.standard_normal((1, 3) + spatial)
    w = rng.standard_normal((2, 3) + ksp)
    for conv_mode, fn in (("cross", scipy.signal.correlate), ("conv", scipy.signal.convolve)):
        y = cref.conv(x, w, mode, conv_mode=conv_mode)
        for k in range(2):
            expected = sum(fn(x[0, c], w[k, c], mode=mode, method="direct") for c in range(3))
            np.testing.assert_allclose(y[0, k], expected, rtol=1e-12, atol=1e-12)


def test_reference_stride_dilation_groups_layout_by_definition(rng):
    """Stride = the stride-1 output subsampled; dilation = a kernel with zeros inserted;
    groups = independent convolutions on channel slices, concatenated; channels-last =
    the channels-first result with the channel axis moved."""
    x = rng.standard_normal((2, 4, 7, 6))
    w = rng.standard_normal((6, 2, 3, 2))
    for conv_mode in CONV_MODES:
        base = cref.conv(x, w[:, :, :, :], "full", conv_mode=conv_mode, num_groups=2)
        strided = cref.conv(x, w, "full", (2, 3), conv_mode=conv_mode, num_groups=2)
        np.testing.assert_allclose(strided, base[:, :, ::2, ::3], rtol=1e-13)
        # dilation (2, 3): the kernel with 1 and 2 zeros between taps
        wd = np.zeros((6, 2, 5, 4))
        wd[:, :, ::2, ::3] = w
        dil = cref.conv(x, w, "valid", dilation=(2, 3), conv_mode=conv_mode, num_groups=2)
        np.testing.assert_allclose(dil, cref.conv(x, wd, "valid", conv_mode=conv_mode,
                                                  num_groups=2), rtol=1e-13)
        # 'full'/'half' padding of the dilated kernel
        np.testing.assert_allclose(
            cref.conv(x, w, "half", dilation=(2, 3), conv_mode=conv_mode, num_groups=2),
            cref.conv(x, wd, "half", conv_mode=conv_mode, num_groups=2), rtol=1e-13)
        # groups
        parts = [cref.conv(x[:, 2 * g:2 * g + 2], w[3 * g:3 * g + 3], 1, conv_mode=conv_mode)
                 for g in range(2)]
        np.testing.assert_allclose(cref.conv(x, w, 1, conv_mode=conv_mode, num_groups=2),
                                   np.concatenate(parts, axis=1), rtol=1e-13)
        # explicit padding == convolving a zero-padded image
        xp = np.pad(x, ((0, 0), (0, 0), (2, 2), (1, 1)))
        np.testing.assert_allclose(cref.conv(x, w, (2, 1), conv_mode=conv_mode, num_groups=2),
                                   cref.conv(xp, w, conv_mode=conv_mode, num_groups=2),
                                   rtol=1e-13)
        # layout
        y_last = cref.conv(np.moveaxis(x, 1, -1), w, "half", (1, 2), (2, 1), conv_mode, 2, "NHWC")
        np.testing.assert_allclose(np.moveaxis(y_last, -1, 1),
                                   cref.conv(x, w, "half", (1, 2), (2, 1), conv_mode, 2),
                                   rtol=1e-13)
    # depthwise: every channel alone
    wdw = rng.standard_normal((4, 1, 3, 3))
    y = cref.conv(x, wdw, "half", num_groups=4, conv_mode="cross")
    for c in range(4):
        expected = scipy.signal.correlate(np.pad(x[1, c], 1), wdw[c, 0], "valid")
        np.testing.assert_allclose(y[1, c], expected, rtol=1e-12, atol=1e-12)


@configs
@conv_modes
def test_reference_gradients_are_adjoints(rng, config, conv_mode):
    """<conv(x, w), dy> == <x, gradinput(w, dy)> == <w, gradweight(x, dy)>, and a central
    difference of <conv, dy> (exact for a linear map, up to rounding) agrees."""
    for layout in LAYOUTS:
        case = Case(config, layout)
        _, (x, w, dy) = case.data(rng)
        y = case.ref_conv(x, w, conv_mode)
        assert y.shape == case.out_shape
        gi = case.ref_gradinput(w, dy, conv_mode)
        gw = case.ref_gradweight(x, dy, conv_mode)
        assert gi.shape == case.img_shape and gw.shape == case.kern_shape
        lhs = np.sum(y * dy)
        np.testing.assert_allclose(np.sum(x * gi), lhs, rtol=1e-12)
        np.testing.assert_allclose(np.sum(w * gw), lhs, rtol=1e-12)
        vx = rng.standard_normal(x.shape)
        vw = rng.standard_normal(w.shape)
        eps = 1e-3
        fd_x = (np.sum(case.ref_conv(x + eps * vx, w, conv_mode) * dy)
                - np.sum(case.ref_conv(x - eps * vx, w, conv_mode) * dy)) / (2 * eps)
        fd_w = (np.sum(case.ref_conv(x, w + eps * vw, conv_mode) * dy)
                - np.sum(case.ref_conv(x, w - eps * vw, conv_mode) * dy)) / (2 * eps)
        np.testing.assert_allclose(np.sum(gi * vx), fd_x, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(np.sum(gw * vw), fd_w, rtol=1e-9, atol=1e-9)


def test_reference_gradinput_with_leftover_rows(rng):
    """Stride 2 over an image whose last row/column no output reaches: gradinput is zero
    there, and the adjoint identity still holds."""
    x = rng.standard_normal((1, 2, 8, 6))
    w = rng.standard_normal((3, 2, 3, 3))
    dy = rng.standard_normal(cref.output_shape(x.shape, w.shape, "valid", (2, 2)))
    assert dy.shape == (1, 3, 3, 2)
    gi = cref.gradinput(w, dy, x.shape, "valid", (2, 2))
    np.testing.assert_array_equal(gi[:, :, 7, :], 0.0)
    np.testing.assert_array_equal(gi[:, :, :, 5], 0.0)
    np.testing.assert_allclose(np.sum(x * gi), np.sum(cref.conv(x, w, "valid", (2, 2)) * dy),
                               rtol=1e-12)


# =======================================================================================
# Forward
# =======================================================================================
# float64 on every config in both layouts (one conv mode per layout), float32 on every config
# in one layout; float16 and bfloat16 on a subset (each case compiles its own
# XLA program: the full product would make the suite slow).
_HALF_SUBSET = [("1d-full-s2-d2", "conv", "channels_last"),
                ("2d-half-d21", "cross", "channels_first"),
                ("2d-int-s2-g2", "conv", "channels_last"),
                ("2d-tuple-depthwise", "conv", "channels_first"),
                ("2d-tuple-depthwise-s1", "cross", "channels_last"),
                ("3d-half-s212-g2", "cross", "channels_last"),
                ("3d-full-s112", "conv", "channels_first")]
FORWARD_CASES = (
    [("float64", c, CONV_MODES[(i + j) % 2], l) for j, c in enumerate(CONFIGS)
     for i, l in enumerate(LAYOUTS)]
    + [("float32", c, CONV_MODES[(j // 2) % 2], LAYOUTS[j % 2]) for j, c in enumerate(CONFIGS)]
    + [(d, c, m, l) for d in ("float16", "bfloat16") for c, m, l in _HALF_SUBSET]
)


@pytest.mark.parametrize("dtype,config,conv_mode,layout", FORWARD_CASES)
def test_forward(rng, dtype, config, conv_mode, layout):
    case = Case(config, layout)
    (xj, wj, _), (x, w, _) = case.data(rng, dtype)
    y = case.conv(conv_mode)(xj, wj)
    assert y.shape == case.out_shape
    assert y.dtype == jnp.dtype(dtype)
    assert_close(y, case.ref_conv(x, w, conv_mode), dtype)


@pytest.mark.parametrize("nd", [2, 3])
def test_forward_default_arguments(rng, nd):
    """Defaults: valid, stride 1, dilation 1, conv mode (flipped), channels-first."""
    x = rng.standard_normal((2, 3, 6, 5, 4)[: nd + 2])
    w = rng.standard_normal((2, 3, 3, 2, 2)[: nd + 2])
    op = dnn_conv if nd == 2 else dnn_conv3d
    y = op(jnp.asarray(x), jnp.asarray(w))
    assert_close(y, cref.conv(x, w), "float64")
    # the explicit channels-first names agree
    fmt = "NCHW" if nd == 2 else "NCDHW"
    assert_close(op(jnp.asarray(x), jnp.asarray(w), data_format=fmt), cref.conv(x, w), "float64")


def test_forward_1d_defaults_and_int_arguments(rng):
    """3-D tensors are 1-D convolutions, with the default arguments as well; subsample,
    dilation and border_mode may be ints or 1-tuples."""
    x = rng.standard_normal((2, 3, 7))
    w = rng.standard_normal((4, 3, 3))
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    assert_close(dnn_conv(xj, wj), cref.conv(x, w, data_format="NCW"), "float64")
    expected = cref.conv(x, w, 1, (2,), (2,), "cross", data_format="NCW")
    assert_close(dnn_conv(xj, wj, border_mode=1, subsample=2, dilation=2, conv_mode="cross",
                          data_format="NCW"), expected, "float64")
    assert_close(dnn_conv(xj, wj, border_mode=(1,), subsample=(2,), dilation=(2,),
                          conv_mode="cross", data_format="NCW"), expected, "float64")
    # channels-last
    xl = np.moveaxis(x, 1, -1)
    assert_close(dnn_conv(jnp.asarray(xl), wj, "half", 2, data_format="NWC"),
                 cref.conv(xl, w, "half", (2,), data_format="NWC"), "float64")


def test_forward_1d_equals_2d_with_a_singleton(rng):
    """A 1-D convolution is a 2-D one over (1, L) (checked against the reference too)."""
    x = rng.standard_normal((2, 4, 7))
    w = rng.standard_normal((4, 2, 3))
    y1 = dnn_conv(jnp.asarray(x), jnp.asarray(w), "full", (2,), (2,), num_groups=2,
                  data_format="NCW")
    y2 = dnn_conv(jnp.asarray(x[:, :, None, :]), jnp.asarray(w[:, :, None, :]), (0, 4),
                  (1, 2), (1, 2), num_groups=2)
    expected = cref.conv(x, w, "full", (2,), (2,), "conv", 2, "NCW")
    assert_close(y1, expected, "float64")
    assert_close(y2[:, :, 0, :], expected, "float64")


def test_forward_int_and_list_arguments_2d(rng):
    """An int border_mode pads every axis; lists and NumPy ints work as tuples do."""
    x = rng.standard_normal((1, 2, 6, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    y = dnn_conv(jnp.asarray(x), jnp.asarray(w), border_mode=np.int64(2),
                 subsample=[2, np.int32(1)], dilation=[1, 2])
    assert_close(y, cref.conv(x, w, (2, 2), (2, 1), (1, 2)), "float64")


def test_forward_continuous_against_scipy(rng):
    """An end-to-end check that needs no reference of ours: scipy, one channel."""
    x = rng.standard_normal((1, 1, 7, 6))
    w = rng.standard_normal((1, 1, 3, 4))
    for mode in ("valid", "full"):
        y = dnn_conv(jnp.asarray(x), jnp.asarray(w), border_mode=mode)
        np.testing.assert_allclose(to_f64(y)[0, 0], scipy.signal.convolve(x[0, 0], w[0, 0], mode),
                                   rtol=1e-12, atol=1e-12)
        y = dnn_conv(jnp.asarray(x), jnp.asarray(w), border_mode=mode, conv_mode="cross")
        np.testing.assert_allclose(to_f64(y)[0, 0], scipy.signal.correlate(x[0, 0], w[0, 0], mode),
                                   rtol=1e-12, atol=1e-12)


def test_kernel_equal_to_padded_input_is_fine(rng):
    x = rng.standard_normal((1, 2, 3, 4))
    w = rng.standard_normal((2, 2, 5, 4))
    y = dnn_conv(jnp.asarray(x), jnp.asarray(w), border_mode=(1, 0))
    assert y.shape == (1, 2, 1, 1)
    assert_close(y, cref.conv(x, w, (1, 0)), "float64")


def test_direction_hint_does_not_change_the_result(rng):
    x = rng.standard_normal((2, 3, 6, 5))
    w = rng.standard_normal((2, 3, 3, 2))
    for border, hint in (("valid", "bprop weights"), ("full", "bprop inputs"),
                         ("full", "forward!"), ("half", "forward!"), ("valid", None)):
        y = dnn_conv(jnp.asarray(x), jnp.asarray(w), border_mode=border, direction_hint=hint)
        assert_close(y, cref.conv(x, w, border), "float64", err_msg=f"{border} {hint}")


def test_zero_size_batch():
    x = jnp.zeros((0, 2, 5, 5), jnp.float32)
    w = jnp.ones((3, 2, 3, 3), jnp.float32)
    f = lambda a, b: dnn_conv(a, b, "half")
    assert f(x, w).shape == (0, 3, 5, 5)
    assert jax.jit(f)(x, w).shape == (0, 3, 5, 5)
    gx, gw = jax.grad(lambda a, b: jnp.sum(f(a, b)), argnums=(0, 1))(x, w)
    assert gx.shape == x.shape
    np.testing.assert_array_equal(np.asarray(gw), 0.0)


# ---------------------------------------------------------------------------------------
# precision and dtypes
# ---------------------------------------------------------------------------------------
_PRECISION_CASES = (
    [("float64", p) for p in (None, "as_input", "float32", "float16")]
    + [("float32", p) for p in (None, "as_input_f32", "float64", "float16")]
    + [("float16", p) for p in (None, "as_input", "float32", "float64", "float16")]
    + [("bfloat16", p) for p in (None, "as_input", "float32")]
)
assert {p for _, p in _PRECISION_CASES} >= set(PRECISIONS)


def _compute_tolerance(dtype, precision):
    dtype = jnp.dtype(dtype).name
    if precision in (None, "as_input_f32"):
        compute = "float32" if dtype in ("float16", "bfloat16") else dtype
    elif precision == "as_input":
        compute = dtype
    else:
        compute = precision
    return max(tolerance(dtype), tolerance(compute))


@pytest.mark.parametrize("dtype,precision", _PRECISION_CASES)
def test_precision_keeps_the_input_dtype(rng, dtype, precision):
    case = Case("2d-int-s2-g2", "channels_last")
    (xj, wj, dyj), (x, w, dy) = case.data(rng, dtype)
    gi_fn, gw_fn = case.gradinput(precision=precision), case.gradweight(precision=precision)
    y, gi, gw = jax.jit(lambda a, b, c: (case.conv(precision=precision)(a, b), gi_fn(b, c),
                                         gw_fn(a, c)))(xj, wj, dyj)
    assert y.dtype == jnp.dtype(dtype)
    tol = _compute_tolerance(dtype, precision)
    factor = tol / tolerance(dtype) * (2 if precision == "as_input" else 1)
    assert_close(y, case.ref_conv(x, w), dtype, factor=factor)
    assert gi.dtype == jnp.dtype(dtype) and gw.dtype == jnp.dtype(dtype)
    assert_close(gi, case.ref_gradinput(w, dy), dtype, factor=factor)
    assert_close(gw, case.ref_gradweight(x, dy), dtype, factor=factor)


def test_precision_float64_on_float32_is_correctly_rounded(rng):
    """precision='float64': the float32 result is the float64 sum rounded once."""
    case = Case("2d-valid", "channels_first")
    (xj, wj, dyj), (x, w, dy) = case.data(rng, "float32")
    y = case.conv(precision="float64")(xj, wj)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), case.ref_conv(x, w).astype(np.float32))
    gi = case.gradinput(precision="float64")(wj, dyj)
    np.testing.assert_array_equal(np.asarray(gi), case.ref_gradinput(w, dy).astype(np.float32))
    gw = case.gradweight(precision="float64")(xj, dyj)
    np.testing.assert_array_equal(np.asarray(gw), case.ref_gradweight(x, dy).astype(np.float32))
    # precision=None reads the dnn.conv.precision flag
    with jaxdnn.config.override(**{"dnn.conv.precision": "float64"}):
        y = case.conv()(xj, wj)
    np.testing.assert_array_equal(np.asarray(y), case.ref_conv(x, w).astype(np.float32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_as_input_f32_accumulates_in_float32(rng, dtype):
    """The default precision (as_input_f32) sums half-precision products in float32: every
    element is the float64 result up to one rounding to the half type."""
    case = Case("2d-valid", "channels_first")
    (xj, wj, _), (x, w, _) = case.data(rng, dtype)
    expected = case.ref_conv(x, w)
    ulp = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}[dtype]
    for precision in (None, "as_input_f32"):
        y = to_f64(case.conv(precision=precision)(xj, wj))
        np.testing.assert_allclose(y, expected, rtol=ulp, atol=1e-5 * np.abs(expected).max())


# =======================================================================================
# dnn_gradinput / dnn_gradweight
# =======================================================================================
# float64 on every config, in the layout test_grad_of_conv does not use for it
GRAD_OP_CASES = (
    [("float64", c, CONV_MODES[j % 2], LAYOUTS[(j + 1) % 2]) for j, c in enumerate(CONFIGS)]
    + [("float32", c, m, l) for c, m, l in _HALF_SUBSET]
    + [(d, c, m, l) for d in ("float16", "bfloat16") for c, m, l in _HALF_SUBSET[1::2]]
)


@pytest.mark.parametrize("dtype,config,conv_mode,layout", GRAD_OP_CASES)
def test_gradinput_gradweight(rng, dtype, config, conv_mode, layout):
    case = Case(config, layout)
    (xj, wj, dyj), (x, w, dy) = case.data(rng, dtype)
    gi_fn, gw_fn = case.gradinput(conv_mode), case.gradweight(conv_mode)
    gi, gw = jax.jit(lambda a, b, c: (gi_fn(b, c), gw_fn(a, c)))(xj, wj, dyj)
    assert gi.shape == case.img_shape and gi.dtype == jnp.dtype(dtype)
    assert_close(gi, case.ref_gradinput(w, dy, conv_mode), dtype)
    assert gw.shape == case.kern_shape and gw.dtype == jnp.dtype(dtype)
    assert_close(gw, case.ref_gradweight(x, dy, conv_mode), dtype)


TRANSPOSED_BORDERS = ("valid", "full", "half", 1, "tuple")


@pytest.mark.parametrize("border", TRANSPOSED_BORDERS)
@pytest.mark.parametrize("nd,layout", [(2, "channels_first"), (2, "channels_last")])
def test_gradinput_as_transposed_convolution_stride2(rng, border, nd, layout):
    """Upsampling by 2 with dnn_gradinput: two image sizes give the same topgrad size under
    stride 2, and img_shp decides which one comes out (the last row of the larger one is
    reached by no output unless padding brings it in)."""
    ksp = (3, 2, 3)[:nd]
    border_mode = {"tuple": (2, 0, 1)[:nd]}.get(border, border)
    fmt = cref.data_format_for(nd, layout == "channels_last")
    op_gi = dnn_gradinput3d if nd == 3 else dnn_gradinput
    op_gw = dnn_gradweight3d if nd == 3 else dnn_gradweight
    kern_shape = (4, 2) + ksp
    # per axis, a size s with (s + 2 pad - k) even: then s and s + 1 share the output size
    pads = [lo for lo, _ in cref.border_pads(border_mode, ksp)]
    small = tuple(s if (s + 2 * p - k) % 2 == 0 else s + 1
                  for s, p, k in zip((5, 6, 4), pads, ksp))
    outs = set()
    for spatial, conv_mode in zip((small, tuple(s + 1 for s in small)), CONV_MODES):
        img_shp = cref.layout_shape((2, 2) + spatial, fmt)
        out_shape = cref.output_shape(img_shp, kern_shape, border_mode, (2,) * nd, None, fmt)
        outs.add(out_shape)
        wj, w = cast(rng.standard_normal(kern_shape), "float64")
        dyj, dy = cast(rng.standard_normal(out_shape), "float64")
        xj, x = cast(rng.standard_normal(img_shp), "float64")
        kw = dict(border_mode=border_mode, subsample=(2,) * nd, conv_mode=conv_mode,
                  data_format=fmt)
        gi, gw = jax.jit(lambda a, b, c: (op_gi(b, c, img_shp, **kw),
                                          op_gw(a, c, kern_shape, **kw)))(xj, wj, dyj)
        assert gi.shape == img_shp
        assert_close(gi, cref.gradinput(w, dy, img_shp, border_mode, (2,) * nd, None,
                                        conv_mode, 1, fmt), "float64")
        assert_close(gw, cref.gradweight(x, dy, kern_shape, border_mode, (2,) * nd, None,
                                         conv_mode, 1, fmt), "float64")
    assert len(outs) == 1, outs  # both image sizes share one topgrad shape


@pytest.mark.parametrize("nd,layout,border", [(1, "channels_last", "half"),
                                              (1, "channels_first", "tuple"),
                                              (3, "channels_first", "full"),
                                              (3, "channels_last", 1)])
def test_gradinput_as_transposed_convolution_stride2_1d_3d(rng, nd, layout, border):
    test_gradinput_as_transposed_convolution_stride2(rng, border, nd, layout)


# A geometry on which XLA:CPU (jaxlib 0.10.2) aborts the whole process while compiling the
# lhs-dilated convolution that a transposed convolution lowers to (algebraic_simplifier.cc
# "Window dimensions do not match RHS shape"): kernel (2, 3), stride (2, 1), pad (1, 0),
# topgrad (3, 2) -- the stride-2 axis gets no padding, and the other axis's topgrad is
# narrower than the kernel. Run in a subprocess so that an abort fails this test alone.
_ABORT_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import jaxdnn
w, dy, x = (np.asarray(a) for a in json.loads(sys.stdin.read()))
kw = dict(border_mode=(1, 0), subsample=(2, 1))
with jaxdnn.config.override(**{"dnn.enabled": False}):
    gi = jaxdnn.dnn_gradinput(jnp.asarray(w), jnp.asarray(dy), x.shape, **kw)
    gx = jax.grad(lambda t: jnp.sum(jaxdnn.dnn_conv(t, jnp.asarray(w), **kw) * dy))(jnp.asarray(x))
print(json.dumps([np.asarray(gi).tolist(), np.asarray(gx).tolist()]))
"""


def test_transposed_convolution_does_not_abort_the_process(rng):
    x = rng.standard_normal((1, 2, 4, 4))
    w = rng.standard_normal((2, 2, 2, 3))
    dy = rng.standard_normal(cref.output_shape(x.shape, w.shape, (1, 0), (2, 1)))
    assert dy.shape == (1, 2, 3, 2)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _ABORT_SCRIPT], capture_output=True, text=True,
                          input=json.dumps([w.tolist(), dy.tolist(), x.tolist()]), env=env,
                          timeout=300)
    assert proc.returncode == 0, (
        f"the process died (status {proc.returncode}):\n{proc.stderr[-1500:]}")
    gi, gx = (np.asarray(a) for a in json.loads(proc.stdout.strip().splitlines()[-1]))
    expected = cref.gradinput(w, dy, x.shape, (1, 0), (2, 1))
    assert_close(gi, expected, "float64")
    assert_close(gx, expected, "float64")


def test_gradinput_img_shp_forms(rng):
    """img_shp as a tuple, a list, with NumPy ints."""
    w = rng.standard_normal((3, 2, 3, 3))
    dy = rng.standard_normal((1, 3, 3, 3))
    expected = cref.gradinput(w, dy, (1, 2, 7, 7), "valid", (2, 2))
    for shp in ((1, 2, 7, 7), [1, 2, 7, 7], tuple(np.int64(s) for s in (1, 2, 7, 7))):
        gi = dnn_gradinput(jnp.asarray(w), jnp.asarray(dy), shp, subsample=(2, 2))
        assert_close(gi, expected, "float64")
    gw = dnn_gradweight(jnp.asarray(rng.standard_normal((1, 2, 7, 7))), jnp.asarray(dy),
                        [3, np.int32(2), 3, 3], subsample=(2, 2))
    assert gw.shape == (3, 2, 3, 3)


def test_grad_ops_1d_defaults(rng):
    x = rng.standard_normal((2, 3, 7))
    w = rng.standard_normal((4, 3, 3))
    dy = rng.standard_normal((2, 4, 5))
    gi = dnn_gradinput(jnp.asarray(w), jnp.asarray(dy), x.shape)
    assert_close(gi, cref.gradinput(w, dy, x.shape, data_format="NCW"), "float64")
    gw = dnn_gradweight(jnp.asarray(x), jnp.asarray(dy), w.shape)
    assert_close(gw, cref.gradweight(x, dy, w.shape, data_format="NCW"), "float64")


# =======================================================================================
# Autodiff of dnn_conv
# =======================================================================================
VJP_CASES = (
    [("float64", c, CONV_MODES[(j // 2) % 2], LAYOUTS[j % 2]) for j, c in enumerate(CONFIGS)]
    + [("float32", c, m, l) for c, m, l in _HALF_SUBSET[::2]]
    + [(d, c, m, l) for d in ("float16", "bfloat16") for c, m, l in _HALF_SUBSET[::3]]
)


@pytest.mark.parametrize("dtype,config,conv_mode,layout", VJP_CASES)
def test_grad_of_conv(rng, dtype, config, conv_mode, layout):
    """jax.grad of <dnn_conv(x, w), dy> in x and w, and jax.vjp with the cotangent dy: the
    reference's gradinput and gradweight."""
    case = Case(config, layout)
    (xj, wj, dyj), (x, w, dy) = case.data(rng, dtype)
    f = case.conv(conv_mode)
    acc = jnp.float32 if dtype in ("float16", "bfloat16") else dtype

    def grads(a, b, c):
        loss = lambda p, q: jnp.sum(f(p, q).astype(acc) * c.astype(acc))
        return jax.grad(loss, argnums=(0, 1))(a, b), jax.vjp(f, a, b)[1](c)

    (gx, gw), (vx, vw) = jax.jit(grads)(xj, wj, dyj)
    gi_ref, gw_ref = case.ref_gradinput(w, dy, conv_mode), case.ref_gradweight(x, dy, conv_mode)
    for got, want in ((gx, gi_ref), (gw, gw_ref), (vx, gi_ref), (vw, gw_ref)):
        assert got.dtype == jnp.dtype(dtype) and got.shape == want.shape
        assert_close(got, want, dtype)


CHECK_GRADS_CASES = [("1d-full-s2-d2", "channels_last", "conv"),
                     ("2d-int-s2-g2", "channels_last", "cross"),
                     ("2d-tuple-depthwise", "channels_first", "conv"),
                     ("2d-tuple-depthwise-s1", "channels_first", "cross"),
                     ("3d-tuple-d2-depthwise", "channels_last", "cross")]


@pytest.mark.parametrize("config,layout,conv_mode", CHECK_GRADS_CASES)
def test_check_grads(rng, config, layout, conv_mode):
    case = Case(config, layout)
    (xj, wj, _), _ = case.data(rng)
    check_grads(case.conv(conv_mode), (xj, wj), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("config,layout", [("2d-int-s2-g2", "channels_last"),
                                           ("3d-half-s212-g2", "channels_first"),
                                           ("1d-half-g2", "channels_first")])
def test_jvp_is_bilinear(rng, config, layout):
    """d conv(x, w) = conv(dx, w) + conv(x, dw)."""
    case = Case(config, layout)
    (xj, wj, _), (x, w, _) = case.data(rng)
    (txj, twj, _), (tx, tw, _) = case.data(rng)
    f = case.conv("conv")
    y, ty = jax.jit(lambda *a: jax.jvp(f, a[:2], a[2:]))(xj, wj, txj, twj)
    assert_close(y, case.ref_conv(x, w), "float64")
    assert_close(ty, case.ref_conv(tx, w) + case.ref_conv(x, tw), "float64")


def _reference_jacobian(fn, shape):
    """The Jacobian of a linear reference map, column by column."""
    size = int(np.prod(shape))
    cols = []
    for j in range(size):
        e = np.zeros(size)
        e[j] = 1.0
        cols.append(np.ravel(fn(e.reshape(shape))))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("conv_mode", CONV_MODES)
def test_jacfwd_jacrev_linear_transpose(rng, conv_mode):
    cfg = ((1, 2, 5, 4), (2, 1, 3, 2), (1, 0), (2, 1), (1, 1), 2)
    case = Case("small", "channels_last", cfg)
    (xj, wj, dyj), (x, w, dy) = case.data(rng)
    f = case.conv(conv_mode)
    jx = _reference_jacobian(lambda t: case.ref_conv(t, w, conv_mode), x.shape)
    jw = _reference_jacobian(lambda t: case.ref_conv(x, t, conv_mode), w.shape)
    np.testing.assert_allclose(to_f64(jax.jit(jax.jacfwd(f, 0))(xj, wj)).reshape(jx.shape), jx,
                               rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(to_f64(jax.jit(jax.jacrev(f, 0))(xj, wj)).reshape(jx.shape), jx,
                               rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(to_f64(jax.jit(jax.jacfwd(f, 1))(xj, wj)).reshape(jw.shape), jw,
                               rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(to_f64(jax.jit(jax.jacrev(f, 1))(xj, wj)).reshape(jw.shape), jw,
                               rtol=1e-12, atol=1e-13)
    # linear_transpose in either argument is the transposed map
    (tx,) = jax.linear_transpose(lambda t: f(t, wj), xj)(dyj)
    assert_close(tx, case.ref_gradinput(w, dy, conv_mode), "float64")
    (tw,) = jax.linear_transpose(lambda t: f(xj, t), wj)(dyj)
    assert_close(tw, case.ref_gradweight(x, dy, conv_mode), "float64")


def test_second_order(rng):
    """Hessian of L = ||conv(x, w)||^2 in x is 2 J^T J; the mixed derivatives of L (grad in
    x, then in w by reverse and by forward mode) against closed forms from the reference."""
    cfg = ((1, 2, 4, 3), (2, 2, 2, 2), 1, (2, 1), (1, 1), 1)
    case = Case("small", "channels_first", cfg)
    (xj, wj, _), (x, w, _) = case.data(rng)
    f = case.conv("conv")
    loss = lambda a, b: jnp.sum(f(a, b) ** 2)
    h = to_f64(jax.jit(jax.hessian(loss))(xj, wj)).reshape(x.size, x.size)
    jx = _reference_jacobian(lambda t: case.ref_conv(t, w), x.shape)
    np.testing.assert_allclose(h, 2 * jx.T @ jx, rtol=1e-12, atol=1e-12)
    # g(w) = <grad_x L(x, w), v> = 2 <gradinput(w, conv(x, w)), v> = 2 <conv(x, w), conv(v, w)>
    # so grad_w g = 2 gradweight(x, conv(v, w)) + 2 gradweight(v, conv(x, w)).
    v = rng.standard_normal(x.shape)
    g = lambda b: jnp.sum(jax.grad(loss)(xj, b) * v)
    gw = jax.jit(jax.grad(g))(wj)
    expected = 2 * (case.ref_gradweight(x, case.ref_conv(v, w))
                    + case.ref_gradweight(v, case.ref_conv(x, w)))
    assert_close(gw, expected, "float64")
    # forward-over-reverse: d/dw of grad_x L = 2 gradinput(w, conv(x, w)) along t = ones
    ones = np.ones_like(w)
    _, tg = jax.jvp(lambda b: jax.grad(loss)(xj, b), (wj,), (jnp.asarray(ones),))
    expected_t = 2 * (case.ref_gradinput(ones, case.ref_conv(x, w))
                      + case.ref_gradinput(w, case.ref_conv(x, ones)))
    assert_close(tg, expected_t, "float64")


# ---------------------------------------------------------------------------------------
# dnn_gradinput / dnn_gradweight are differentiable
# ---------------------------------------------------------------------------------------
def _fd(fn, args, direction, index, eps=1e-3):
    """Central difference of fn along `direction` in argument `index` (NumPy arithmetic:
    no eager jax ops to compile)."""
    plus = [np.asarray(a) for a in args]
    minus = list(plus)
    plus[index] = plus[index] + eps * direction
    minus[index] = minus[index] - eps * direction
    return (float(fn(*plus)) - float(fn(*minus))) / (2 * eps)


@pytest.mark.parametrize("config,layout,conv_mode", [("2d-int-s2-g2", "channels_last", "conv"),
                                                     ("2d-full-s21", "channels_first", "cross"),
                                                     ("3d-half-s212-g2", "channels_first", "conv"),
                                                     ("1d-full-s2-d2", "channels_last", "cross")])
def test_grad_ops_are_differentiable(rng, config, layout, conv_mode):
    """L = ||gradinput(w, dy)||^2 and ||gradweight(x, dy)||^2: jax.grad against finite
    differences and against the closed forms (z = gradinput(w, dy), u = gradweight(x, dy)):
    dL/dw = 2 gradweight(z, dy), dL/ddy = 2 conv(z, w); dL/dx = 2 gradinput(u, dy),
    dL/ddy = 2 conv(x, u)."""
    case = Case(config, layout)
    (xj, wj, dyj), (x, w, dy) = case.data(rng)
    gi, gwt = case.gradinput(conv_mode), case.gradweight(conv_mode)
    li = jax.jit(lambda a, b: jnp.sum(gi(a, b) ** 2))
    lw = jax.jit(lambda a, b: jnp.sum(gwt(a, b) ** 2))
    d_w, d_dy = jax.grad(li, argnums=(0, 1))(wj, dyj)
    z = case.ref_gradinput(w, dy, conv_mode)
    assert_close(d_w, 2 * case.ref_gradweight(z, dy, conv_mode), "float64")
    assert_close(d_dy, 2 * case.ref_conv(z, w, conv_mode), "float64")
    d_x, d_dy2 = jax.grad(lw, argnums=(0, 1))(xj, dyj)
    u = case.ref_gradweight(x, dy, conv_mode)
    assert_close(d_x, 2 * case.ref_gradinput(u, dy, conv_mode), "float64")
    assert_close(d_dy2, 2 * case.ref_conv(x, u, conv_mode), "float64")
    # finite differences (central differences of a quadratic: exact up to rounding)
    for fn, grads, args in ((li, (d_w, d_dy), (w, dy)), (lw, (d_x, d_dy2), (x, dy))):
        for index in (0, 1):
            v = rng.standard_normal(args[index].shape)
            fd = _fd(fn, args, v, index)
            np.testing.assert_allclose(np.sum(to_f64(grads[index]) * v), fd, rtol=1e-7, atol=1e-9)


# =======================================================================================
# jit and vmap
# =======================================================================================
@pytest.mark.parametrize("config,layout", [("2d-half-d21", "channels_last"),
                                           ("3d-tuple-d2-depthwise", "channels_first"),
                                           ("1d-int-s3-depthwise", "channels_last")])
def test_jit(rng, config, layout):
    case = Case(config, layout)
    (xj, wj, dyj), (x, w, dy) = case.data(rng)
    y = jax.jit(case.conv("cross"))(xj, wj)
    assert_close(y, case.ref_conv(x, w, "cross"), "float64")
    gi = jax.jit(case.gradinput("cross"))(wj, dyj)
    assert_close(gi, case.ref_gradinput(w, dy, "cross"), "float64")
    gw = jax.jit(case.gradweight("cross"))(xj, dyj)
    assert_close(gw, case.ref_gradweight(x, dy, "cross"), "float64")
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(case.conv("cross")(a, b) * dyj), argnums=(0, 1)))
    gx, gw2 = g(xj, wj)
    assert_close(gx, case.ref_gradinput(w, dy, "cross"), "float64")
    assert_close(gw2, case.ref_gradweight(x, dy, "cross"), "float64")


def _stack(rng, shape, b, axis):
    return np.stack([rng.standard_normal(shape) for _ in range(b)], axis=axis)


VMAP_CASES = [("2d-int-s2-g2", "channels_first"), ("2d-half-d21", "channels_last"),
              ("3d-half-s212-g2", "channels_first"), ("1d-full-s2-d2", "channels_last")]


@pytest.mark.parametrize("in_axes", [(0, None), (1, None), (None, 0), (0, 0), (1, 2)])
@pytest.mark.parametrize("config,layout", [VMAP_CASES[i] for i in (0, 2, 3)])
def test_vmap_conv(rng, in_axes, config, layout):
    """vmap over the image (stacked at axis 0 or 1), the kernels, or both: every slice is the
    reference, and equals a Python loop over the op."""
    case = Case(config, layout)
    b = 3
    ax, aw = in_axes
    x = rng.standard_normal(case.img_shape) if ax is None else _stack(rng, case.img_shape, b, ax)
    w = rng.standard_normal(case.kern_shape) if aw is None else _stack(rng, case.kern_shape, b, aw)
    f = case.conv("conv")
    ys = to_f64(jax.vmap(f, in_axes=in_axes)(jnp.asarray(x), jnp.asarray(w)))
    assert ys.shape == (b,) + case.out_shape
    for i in range(b):
        xi = x if ax is None else np.take(x, i, axis=ax)
        wi = w if aw is None else np.take(w, i, axis=aw)
        assert_close(ys[i], case.ref_conv(xi, wi), "float64")
        np.testing.assert_allclose(to_f64(ys[i]), to_f64(f(jnp.asarray(xi), jnp.asarray(wi))),
                                   rtol=1e-13, atol=1e-13)  # = the loop


@pytest.mark.parametrize("config,layout,in_axes", [
    (c, l, a) for c, l in VMAP_CASES[:2] for a in [(0, None), (None, 0), (2, 1)]]
    + [("3d-half-s212-g2", "channels_first", (0, 0))])
def test_vmap_grad_ops(rng, in_axes, config, layout):
    case = Case(config, layout)
    b = 2
    a0, a1 = in_axes
    mk = lambda shape, ax: rng.standard_normal(shape) if ax is None else _stack(rng, shape, b, ax)
    w, dy, x = mk(case.kern_shape, a0), mk(case.out_shape, a1), mk(case.img_shape, a0)
    gis, gws = jax.jit(lambda a, b, c: (jax.vmap(case.gradinput(), in_axes=in_axes)(b, c),
                                        jax.vmap(case.gradweight(), in_axes=in_axes)(a, c)))(
        jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy))
    assert gis.shape == (b,) + case.img_shape and gws.shape == (b,) + case.kern_shape
    gis, gws = to_f64(gis), to_f64(gws)
    for i in range(b):
        wi = w if a0 is None else np.take(w, i, axis=a0)
        xi = x if a0 is None else np.take(x, i, axis=a0)
        dyi = dy if a1 is None else np.take(dy, i, axis=a1)
        assert_close(gis[i], case.ref_gradinput(wi, dyi), "float64")
        assert_close(gws[i], case.ref_gradweight(xi, dyi), "float64")


@pytest.mark.parametrize("in_axes", [(0, None, 0), (None, 0, 0), (0, 0, None)])
def test_vmap_of_grad(rng, in_axes):
    case = Case("2d-int-s2-g2", "channels_last")
    b = 2
    shapes = (case.img_shape, case.kern_shape, case.out_shape)
    args = [rng.standard_normal(s) if a is None else _stack(rng, s, b, a)
            for s, a in zip(shapes, in_axes)]
    loss = lambda x, w, dy: jnp.sum(case.conv()(x, w) * dy)
    gx, gw = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=in_axes))(
        *map(jnp.asarray, args))
    gx, gw = to_f64(gx), to_f64(gw)
    for i in range(b):
        x, w, dy = (a if ax is None else np.take(a, i, axis=ax) for a, ax in zip(args, in_axes))
        assert_close(gx[i], case.ref_gradinput(w, dy), "float64")
        assert_close(gw[i], case.ref_gradweight(x, dy), "float64")


# =======================================================================================
# algo, workmem
# =======================================================================================
def test_every_algo_name_is_accepted(rng):
    """On the XLA path algo has no numeric effect: every name gives the reference."""
    case = Case("2d-int-s2-g2", "channels_first")
    (xj, wj, dyj), (x, w, dy) = case.data(rng)
    y_ref, gi_ref, gw_ref = (case.ref_conv(x, w), case.ref_gradinput(w, dy),
                             case.ref_gradweight(x, dy))
    with xla_path():
        ys = jax.jit(lambda a, b: [case.conv(algo=algo)(a, b) for algo in ALGO_FWD])(xj, wj)
        gis = jax.jit(lambda b, c: [case.gradinput(algo=algo)(b, c) for algo in ALGO_BWD_DATA])(
            wj, dyj)
        gws = jax.jit(lambda a, c: [case.gradweight(algo=algo)(a, c)
                                    for algo in ALGO_BWD_FILTER])(xj, dyj)
    for algos, got, want in ((ALGO_FWD, ys, y_ref), (ALGO_BWD_DATA, gis, gi_ref),
                             (ALGO_BWD_FILTER, gws, gw_ref)):
        for algo, g in zip(algos, got):
            assert_close(g, want, "float64", err_msg=algo)
    with xla_path():
        c3 = Case("3d-valid")
        (x3j, w3j, _), (x3, w3, _) = c3.data(rng)
        assert_close(c3.conv(algo="none")(x3j, w3j), c3.ref_conv(x3, w3), "float64")


def test_workmem_is_an_alias_of_algo(rng):
    x = rng.standard_normal((1, 2, 5, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        y = dnn_conv(jnp.asarray(x), jnp.asarray(w), workmem="small")
    assert_close(y, cref.conv(x, w), "float64")


# =======================================================================================
# Bad arguments: ValueError / TypeError at trace time, naming the argument
# =======================================================================================
def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def _raises_at_trace_time(exc, match, fn, *shapes):
    """fn must raise while jax.eval_shape traces it on abstract values (no data at all)."""
    with pytest.raises(exc, match=match or None):
        jax.eval_shape(fn, *shapes)


X4, W4 = (1, 4, 6, 6), (2, 4, 3, 3)
X5, W5 = (1, 2, 4, 4, 4), (2, 2, 2, 2, 2)


@pytest.mark.parametrize("img,kerns,kwargs,match", [
    # channels
    (X4, (2, 3, 3, 3), {}, "kerns|num_groups"),
    (X4, (2, 4, 3, 3), dict(num_groups=2), "kerns|num_groups"),
    ((1, 6, 6, 4), (2, 3, 3, 3), dict(data_format="NHWC"), "kerns|num_groups"),
    (X4, (3, 1, 3, 3), dict(num_groups=3), "num_groups"),      # 3 does not divide C=4
    (X4, (3, 2, 3, 3), dict(num_groups=2), "num_groups|kerns"),  # 3 kernels in 2 groups
    (X4, W4, dict(num_groups=0), "num_groups"),
    (X4, W4, dict(num_groups=-1), "num_groups"),
    # padding
    (X4, W4, dict(border_mode=-1), "border_mode"),
    (X4, W4, dict(border_mode=(1, -1)), "border_mode"),
    (X4, W4, dict(border_mode=(1, 1, 1)), "border_mode"),
    (X4, W4, dict(border_mode="same"), "border_mode"),
    (X4, W4, dict(border_mode="VALID"), "border_mode"),
    # kernel larger than the padded image
    ((1, 4, 3, 3), (2, 4, 5, 5), {}, "kerns|border_mode|img"),
    ((1, 4, 3, 6), (2, 4, 6, 3), dict(border_mode=1), "kerns|border_mode|img"),
    ((1, 4, 4, 4), (2, 4, 3, 3), dict(dilation=(2, 1)), "kerns|border_mode|img|dilation"),
    # stride / dilation
    (X4, W4, dict(subsample=(0, 1)), "subsample"),
    (X4, W4, dict(subsample=(2, 1, 1)), "subsample"),   # (all-ones of another rank: the
    (X4, W4, dict(subsample=(2,)), "subsample"),        #  2-D default, may be accepted)
    (X4, W4, dict(dilation=(1, 0)), "dilation"),
    (X4, W4, dict(dilation=(2,)), "dilation"),
    # names
    (X4, W4, dict(conv_mode="correlation"), "conv_mode"),
    (X4, W4, dict(algo="fastest"), "algo"),
    (X4, W4, dict(algo="deterministic"), "algo"),  # a backward algorithm only
    (X4, W4, dict(precision="float128"), "precision"),
    (X4, W4, dict(precision="half"), "precision"),
    (X4, W4, dict(data_format="NCDHW"), "data_format"),
    (X4, W4, dict(data_format="NCW"), "data_format"),
    (X4, W4, dict(data_format="NHCW"), "data_format"),
    (X4, W4, dict(data_format="bogus"), "data_format"),
    ((1, 4, 6), (2, 4, 3), dict(data_format="NCDHW"), "data_format"),
    (X4, W4, dict(workmem="small", algo="small"), "workmem|algo"),
    # ranks
    (X4, (2, 4, 3), {}, "kerns"),
    (X4, (2, 4, 3, 3, 3), {}, "kerns"),
    ((4, 6, 6), W4, {}, "img|kerns"),
    ((6, 6), W4, {}, "img"),
    ((1, 1, 4, 6, 6, 6), W4, {}, "img"),
])
def test_bad_arguments_dnn_conv(img, kerns, kwargs, match):
    _raises_at_trace_time(ValueError, match, lambda a, b: dnn_conv(a, b, **kwargs),
                          _sds(img), _sds(kerns))


@pytest.mark.parametrize("img,kerns,kwargs,match", [
    (X5, (2, 3, 2, 2, 2), {}, "kerns|num_groups"),
    (X5, W5, dict(num_groups=3), "num_groups|kerns"),
    (X5, W5, dict(border_mode=(1, 1)), "border_mode"),
    (X5, W5, dict(border_mode=(0, -2, 0)), "border_mode"),
    (X5, W5, dict(subsample=(1, 2)), "subsample"),
    (X5, W5, dict(dilation=(1, 1, 0)), "dilation"),
    (X5, W5, dict(data_format="NCHWD"), "data_format"),
    (X5, W5, dict(data_format="NHWC"), "data_format"),
    (X5, W5, dict(data_format="NCHW"), "data_format"),
    (X5, (2, 2, 5, 2, 2), {}, "kerns|border_mode|img"),
    (X5, (2, 2, 2, 2), {}, "kerns"),
    ((1, 2, 4, 4), W5, {}, "img|kerns"),
    (X5, W5, dict(conv_mode="flip"), "conv_mode"),
    (X5, W5, dict(algo="nope"), "algo"),
])
def test_bad_arguments_dnn_conv3d(img, kerns, kwargs, match):
    _raises_at_trace_time(ValueError, match, lambda a, b: dnn_conv3d(a, b, **kwargs),
                          _sds(img), _sds(kerns))


@pytest.mark.parametrize("img_dtype,kerns_dtype", [("float32", "float64"), ("float16", "float32"),
                                                   ("bfloat16", "float16"), ("int32", "int32"),
                                                   ("float32", "int32")])
def test_dtypes_must_match_and_be_floating(img_dtype, kerns_dtype):
    _raises_at_trace_time(TypeError, "", dnn_conv, _sds(X4, img_dtype), _sds(W4, kerns_dtype))
    _raises_at_trace_time(TypeError, "", dnn_conv3d, _sds(X5, img_dtype), _sds(W5, kerns_dtype))
    _raises_at_trace_time(TypeError, "", lambda w, dy: dnn_gradinput(w, dy, X4),
                          _sds(W4, kerns_dtype), _sds((1, 2, 4, 4), img_dtype))
    _raises_at_trace_time(TypeError, "", lambda x, dy: dnn_gradweight(x, dy, W4),
                          _sds(X4, img_dtype), _sds((1, 2, 4, 4), kerns_dtype))


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_shp=(1, 4, 6)), "img_shp"),
    (dict(img_shp=(1, 4, 9, 9)), "img_shp|topgrad"),        # topgrad would be 7x7
    (dict(img_shp=(1, 3, 6, 6)), "img_shp|kerns|num_groups"),
    (dict(img_shp=(2, 4, 6, 6)), "img_shp|topgrad"),        # batch mismatch
    (dict(img_shp=X4, border_mode=-1), "border_mode"),
    (dict(img_shp=X4, algo="small"), "algo"),               # forward-only algorithm
    (dict(img_shp=X4, algo="bogus"), "algo"),
    (dict(img_shp=X4, precision="bogus"), "precision"),
    (dict(img_shp=X4, conv_mode="bogus"), "conv_mode"),
    (dict(img_shp=X4, num_groups=3), "num_groups|kerns|img_shp"),
])
def test_bad_arguments_dnn_gradinput(kwargs, match):
    img_shp = kwargs.pop("img_shp")
    _raises_at_trace_time(ValueError, match,
                          lambda w, dy: dnn_gradinput(w, dy, img_shp, **kwargs),
                          _sds(W4), _sds((1, 2, 4, 4)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(kerns_shp=(2, 4, 3)), "kerns_shp"),
    (dict(kerns_shp=(2, 4, 2, 2)), "kerns_shp|topgrad"),    # topgrad would be 5x5
    (dict(kerns_shp=(3, 4, 3, 3)), "kerns_shp|topgrad"),    # 3 kernels, topgrad has 2
    (dict(kerns_shp=(2, 3, 3, 3)), "kerns_shp|num_groups|img"),
    (dict(kerns_shp=W4, algo="winograd"), "algo"),          # not a backward-filter algorithm
    (dict(kerns_shp=W4, precision="bogus"), "precision"),
    (dict(kerns_shp=W4, border_mode=(0, -1)), "border_mode"),
])
def test_bad_arguments_dnn_gradweight(kwargs, match):
    kerns_shp = kwargs.pop("kerns_shp")
    _raises_at_trace_time(ValueError, match,
                          lambda x, dy: dnn_gradweight(x, dy, kerns_shp, **kwargs),
                          _sds(X4), _sds((1, 2, 4, 4)))


def test_bad_arguments_grad_ops_3d():
    _raises_at_trace_time(ValueError, "img_shp|topgrad",
                          lambda w, dy: dnn_gradinput3d(w, dy, (1, 2, 5, 5, 5)),
                          _sds(W5), _sds((1, 2, 3, 3, 3)))
    _raises_at_trace_time(ValueError, "kerns_shp|topgrad",
                          lambda x, dy: dnn_gradweight3d(x, dy, (2, 2, 3, 3, 3)),
                          _sds(X5), _sds((1, 2, 3, 3, 3)))


@pytest.mark.parametrize("op", ["dnn_conv", "dnn_gradinput", "dnn_gradweight", "dnn_conv3d",
                                "dnn_gradinput3d", "dnn_gradweight3d"])
def test_workmem_and_algo_together(op):
    fn = getattr(jaxdnn, op)
    if "workmem" not in inspect.signature(fn).parameters:
        pytest.skip(f"{op} takes no workmem (as in Theano)")
    nd = 3 if op.endswith("3d") else 2
    x, w = (X5, W5) if nd == 3 else (X4, W4)
    dy = (1, 2) + (3,) * nd if nd == 3 else (1, 2, 4, 4)
    args = {"dnn_conv": (x, w), "dnn_conv3d": (x, w)}.get(op)
    if args is not None:
        f = lambda a, b: fn(a, b, workmem="none", algo="none")
        shapes = (_sds(x), _sds(w))
    elif op.startswith("dnn_gradinput"):
        f = lambda a, b: fn(a, b, x, workmem="none", algo="none")
        shapes = (_sds(w), _sds(dy))
    else:
        f = lambda a, b: fn(a, b, w, workmem="none", algo="none")
        shapes = (_sds(x), _sds(dy))
    _raises_at_trace_time(ValueError, "workmem|algo", f, *shapes)


def test_errors_raise_under_jit_and_grad():
    x, w = jnp.zeros(X4), jnp.zeros(W4)
    with pytest.raises(ValueError, match="border_mode"):
        jax.jit(lambda a, b: dnn_conv(a, b, border_mode=-2))(x, w)
    with pytest.raises(ValueError, match="num_groups"):
        jax.grad(lambda a, b: jnp.sum(dnn_conv(a, b, num_groups=3)))(x, jnp.zeros((3, 1, 3, 3)))
    with pytest.raises(ValueError, match="algo"):
        jax.vmap(lambda a: dnn_conv(a, w, algo="nope"))(x[None])


def test_no_cudnn_custom_call_on_the_xla_path():
    x, w = jnp.zeros(X4), jnp.zeros(W4)
    with xla_path():
        text = jax.jit(lambda a, b: jax.grad(lambda p, q: jnp.sum(dnn_conv(p, q) ** 2),
                                             argnums=(0, 1))(a, b)).lower(x, w).as_text()
    assert "custom_call @jaxdnn_" not in text


# =======================================================================================
# GPU: the cuDNN path against the XLA path and the float64 reference
# =======================================================================================
GPU_CONFIGS = {
    "2d-valid": ((2, 8, 12, 11), (16, 8, 3, 3), "valid", (1, 1), (1, 1), 1),
    "2d-full-s2": ((2, 6, 10, 9), (8, 6, 3, 2), "full", (2, 2), (1, 1), 1),
    "2d-half-d2-g2": ((2, 8, 11, 12), (8, 4, 3, 3), "half", (1, 1), (2, 2), 2),
    "2d-int-s21-depthwise": ((2, 8, 10, 10), (8, 1, 3, 3), 1, (2, 1), (1, 1), 8),
    "2d-tuple-even": ((2, 4, 9, 12), (6, 4, 2, 4), (1, 2), (1, 2), (1, 1), 1),
    "3d-valid": ((2, 4, 6, 7, 5), (8, 4, 3, 3, 2), "valid", (1, 1, 1), (1, 1, 1), 1),
    "3d-half-s2-g2": ((2, 4, 7, 6, 7), (4, 2, 3, 3, 3), "half", (2, 2, 2), (1, 1, 1), 2),
    "3d-full-d2": ((1, 4, 5, 5, 6), (4, 4, 2, 2, 2), "full", (1, 1, 1), (2, 1, 2), 1),
    "3d-tuple-depthwise": ((2, 4, 6, 6, 6), (4, 1, 3, 3, 3), (1, 0, 2), (1, 2, 1), (1, 1, 1), 4),
    "2d-half-depthwise-s1": ((2, 8, 10, 11), (8, 1, 3, 3), "half", (1, 1), (1, 1), 8),
    "3d-valid-d2-depthwise-s1": ((2, 4, 6, 7, 6), (4, 1, 3, 2, 3), "valid", (1, 1, 1), (2, 1, 1),
                                 4),
    # a stem: float32 channels-first takes the route forward only (jaxdnn.conv.FEW_CHANNELS)
    "2d-stem-s2": ((2, 3, 15, 14), (8, 3, 7, 7), 3, (2, 2), (1, 1), 1),
}
gpu_configs = pytest.mark.parametrize("config", list(GPU_CONFIGS))
dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES)


def _gpu_compare(actual_cudnn, actual_xla, expected, dtype, what):
    assert actual_cudnn.dtype == jnp.dtype(dtype)
    assert actual_cudnn.shape == expected.shape
    assert_close(actual_cudnn, expected, dtype, err_msg=f"{what}: cuDNN vs float64 reference")
    assert_close(actual_xla, expected, dtype, err_msg=f"{what}: XLA path vs float64 reference")
    assert_close(actual_cudnn, actual_xla, dtype, factor=2, err_msg=f"{what}: cuDNN vs XLA")


@pytest.mark.gpu
@dtypes
@gpu_configs
@conv_modes
@layouts
def test_gpu_forward_cudnn_vs_xla_vs_reference(rng, dtype, config, conv_mode, layout):
    case = Case(config, layout, GPU_CONFIGS[config])
    (xj, wj, _), (x, w, _) = case.data(rng, dtype)
    f = case.conv(conv_mode)
    with _ctx_for(dtype), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bfloat16 may fall back, with a warning
        # float64 takes XLA's path on purpose (jaxdnn/conv.py, _cudnn_computes)
        on_cudnn = "custom_call @jaxdnn_conv_fwd" in jax.jit(f).lower(xj, wj).as_text()
        assert on_cudnn == (dtype != "float64")
        y_cudnn = _jit_run(f, xj, wj)
        y_xla = _jit_run(f, xj, wj, xla=True)
    _gpu_compare(y_cudnn, y_xla, case.ref_conv(x, w, conv_mode), dtype, "forward")


@pytest.mark.gpu
@dtypes
@gpu_configs
@conv_modes
@layouts
def test_gpu_gradients_cudnn_vs_xla_vs_reference(rng, dtype, config, conv_mode, layout):
    """dnn_gradinput, dnn_gradweight and jax.grad of dnn_conv."""
    case = Case(config, layout, GPU_CONFIGS[config])
    (xj, wj, dyj), (x, w, dy) = case.data(rng, dtype)
    gi, gw, f = case.gradinput(conv_mode), case.gradweight(conv_mode), case.conv(conv_mode)

    def vjp(a, b, c):
        return jax.vjp(f, a, b)[1](c)

    gi_ref, gw_ref = case.ref_gradinput(w, dy, conv_mode), case.ref_gradweight(x, dy, conv_mode)
    with _ctx_for(dtype), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = jax.jit(vjp).lower(xj, wj, dyj).as_text()
        # The input gradient of a stride-1 depthwise convolution is a forward convolution
        # (jaxdnn/conv.py, _bwd_data_as_forward); the vjp computes no forward besides.
        input_gradient = ("jaxdnn_conv_fwd" if config.endswith("depthwise-s1")
                          else "jaxdnn_conv_bwd_data")
        assert (f"custom_call @{input_gradient}" in text) == (dtype != "float64")
        assert ("custom_call @jaxdnn_conv_bwd_filter" in text) == (dtype != "float64")
        _gpu_compare(_jit_run(gi, wj, dyj), _jit_run(gi, wj, dyj, xla=True), gi_ref, dtype,
                     "dnn_gradinput")
        _gpu_compare(_jit_run(gw, xj, dyj), _jit_run(gw, xj, dyj, xla=True), gw_ref, dtype,
                     "dnn_gradweight")
        vx, vw = _jit_run(vjp, xj, wj, dyj)
        vx_xla, vw_xla = _jit_run(vjp, xj, wj, dyj, xla=True)
    _gpu_compare(vx, vx_xla, gi_ref, dtype, "vjp in img")
    _gpu_compare(vw, vw_xla, gw_ref, dtype, "vjp in kerns")


@pytest.mark.gpu
@pytest.mark.parametrize("border", TRANSPOSED_BORDERS)
@layouts
def test_gpu_transposed_convolution(rng, border, layout):
    cfg = ((2, 4, 9, 10), (6, 4, 3, 3), {"tuple": (2, 0)}.get(border, border), (2, 2), (1, 1), 1)
    case = Case("gpu-transposed", layout, cfg)
    (_, wj, dyj), (_, w, dy) = case.data(rng, "float32")
    gi = case.gradinput("conv")
    with _ctx_for("float32"):
        _gpu_compare(_jit_run(gi, wj, dyj), _jit_run(gi, wj, dyj, xla=True),
                     case.ref_gradinput(w, dy), "float32", "transposed convolution")


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["2d-int-s21-depthwise", "3d-half-s2-g2",
                                    "2d-half-depthwise-s1"])
def test_gpu_check_grads(rng, config):
    case = Case(config, "channels_first", GPU_CONFIGS[config])
    # float32: float64 convolutions take XLA's path (jaxdnn/conv.py, _cudnn_computes). The
    # convolution is bilinear, so central differences are exact but for rounding; full
    # float32 products (no TF32) keep that rounding small.
    (xj, wj, _), _ = case.data(rng, "float32")
    with jax.default_matmul_precision("highest"):
        assert "custom_call @jaxdnn_conv_fwd" in jax.jit(case.conv("conv")).lower(xj, wj).as_text()
        check_grads(case.conv("conv"), (xj, wj), order=2, modes=["fwd", "rev"], eps=1e-2,
                    atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0)])
# Channels-first images run through channels-last cuDNN calls
# (jaxdnn.conv.CHANNELS_LAST_DTYPES): batching must fold into that route too.
@pytest.mark.parametrize("layout,dtype", [("channels_last", "float32"),
                                          ("channels_first", "bfloat16")])
def test_gpu_vmap(rng, in_axes, layout, dtype):
    case = Case("2d-half-d2-g2", layout, GPU_CONFIGS["2d-half-d2-g2"])
    b = 3
    ax, aw = in_axes
    x = rng.standard_normal(case.img_shape) if ax is None else _stack(rng, case.img_shape, b, ax)
    w = rng.standard_normal(case.kern_shape) if aw is None else _stack(rng, case.kern_shape, b, aw)
    with _ctx_for(dtype):
        f = jax.jit(jax.vmap(case.conv(), in_axes=in_axes))
        xs, ws = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
        assert "custom_call @jaxdnn_conv_fwd" in f.lower(xs, ws).as_text()
        ys = to_f64(f(xs, ws))
    for i in range(b):
        xi = x if ax is None else np.take(x, i, axis=ax)
        wi = w if aw is None else np.take(w, i, axis=aw)
        xi = to_f64(jnp.asarray(xi, dtype))
        wi = to_f64(jnp.asarray(wi, dtype))
        assert_close(ys[i], case.ref_conv(xi, wi), dtype)


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_reproducible():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((16, 32, 32, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 32, 3, 3)) * 0.1, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((16, 64, 32, 32)), jnp.float32)

    def run():
        # a fresh trace each time, under the flag
        loss = lambda a, b: jnp.sum(dnn_conv(a, b, border_mode="half") * dy)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        gi = jax.jit(lambda b, t: dnn_gradinput(b, t, x.shape, border_mode="half"))
        gw = jax.jit(lambda a, t: dnn_gradweight(a, t, w.shape, border_mode="half"))
        with jaxdnn.config.override(**{"dnn.deterministic": True}), \
                jax.default_matmul_precision("highest"):
            text = grad.lower(x, w).as_text()
            assert "custom_call @jaxdnn_conv_bwd_data" in text
            assert "custom_call @jaxdnn_conv_bwd_filter" in text
            out = grad(x, w) + (gi(w, dy), gw(x, dy))
        return [np.asarray(o) for o in out]

    results = [run() for _ in range(3)]
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert np.array_equal(a, b)
    # and right: against the XLA path
    with xla_path(), jax.default_matmul_precision("highest"):
        ex, ew = jax.jit(jax.grad(lambda a, b: jnp.sum(dnn_conv(a, b, border_mode="half") * dy),
                                  argnums=(0, 1)))(x, w)
    for got, want in ((results[0][0], ex), (results[0][1], ew), (results[0][2], ex),
                      (results[0][3], ew)):
        assert_close(got, np.asarray(want), "float32", factor=10)


@pytest.mark.gpu
@pytest.mark.parametrize("pass_, algo", [("fwd", a) for a in ALGO_FWD] +
                         [("bwd_data", a) for a in ALGO_BWD_DATA] +
                         [("bwd_filter", a) for a in ALGO_BWD_FILTER])
def test_gpu_every_algo_name_computes_the_convolution(rng, pass_, algo):
    """Each name selects engines by its rule (README) or falls back to the heuristic choice
    with a warning; either way the result is the convolution's."""
    case = Case("algo", "channels_first", GPU_CONFIGS["2d-valid"])
    (xj, wj, dyj), (x, w, dy) = case.data(rng, "float32")
    with jax.default_matmul_precision("highest"):
        if pass_ == "fwd":
            got, want = jax.jit(case.conv(algo=algo))(xj, wj), case.ref_conv(x, w)
        elif pass_ == "bwd_data":
            got, want = jax.jit(case.gradinput(algo=algo))(wj, dyj), case.ref_gradinput(w, dy)
        else:
            got, want = jax.jit(case.gradweight(algo=algo))(xj, dyj), case.ref_gradweight(x, dy)
    assert_close(got, want, "float32", factor=10)


_TIMED_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp, jaxdnn
jaxdnn.config.update("dnn.enabled", True)
x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 13, 13)), jnp.float32)
w = jnp.asarray(np.random.default_rng(1).standard_normal((5, 8, 3, 3)), jnp.float32)
f = jax.jit(lambda x, w: jaxdnn.dnn_conv(x, w, border_mode="half", algo="time_once"))
with jax.default_matmul_precision("highest"):
    got = np.asarray(f(x, w))
with jaxdnn.config.override(**{"dnn.enabled": False}), jax.default_matmul_precision("highest"):
    want = np.asarray(jax.jit(lambda x, w: jaxdnn.dnn_conv(x, w, border_mode="half"))(x, w))
np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
"""


@pytest.mark.gpu
def test_gpu_time_once_persists_its_choice_under_jaxdnn_cache_dir(tmp_path):
    """The first process times the candidates and writes the winner; the next one finds it
    (the file is not rewritten: a search would rewrite it) and computes the same result."""
    env = dict(os.environ, JAXDNN_CACHE_DIR=str(tmp_path), XLA_PYTHON_CLIENT_PREALLOCATE="false")
    subprocess.run([sys.executable, "-c", _TIMED_SCRIPT], env=env, check=True, timeout=300)
    (plan_file,) = tmp_path.glob("conv-*.plan")
    key, name = plan_file.read_text().splitlines()
    assert key.startswith("conv_fwd|") and "time_once" in key and name
    written = plan_file.stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", _TIMED_SCRIPT], env=env, check=True, timeout=300)
    assert plan_file.stat().st_mtime_ns == written


def test_a_float32_stems_backward_in_the_images_layout_is_the_gradient(rng, cudnn_on_cpu):
    """A float32 image of few channels (jaxdnn.conv.FEW_CHANNELS) takes the channels-last
    route in the forward only; its backward passes transpose their operands back to the
    image's layout (tests/test_lowering.py checks the layouts). On the CPU the cuDNN-path
    primitives lower to their references: the gradients, a vmapped gradient, a second
    order and a JVP through that path against lax.conv_general_dilated's."""
    x = jnp.asarray(rng.standard_normal((2, 3, 11, 9)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 3, 3, 4)), jnp.float32)
    dims = ("NCHW", "OIHW", "NCHW")

    def ours(x, w):
        return dnn_conv(x, w, border_mode=(1, 2), subsample=(2, 1), conv_mode="cross")

    def lax_conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (2, 1), ((1, 1), (2, 2)),
                                            dimension_numbers=dims,
                                            precision=jax.lax.Precision.HIGHEST)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    tol = dict(rtol=2e-4, atol=2e-4)
    with jax.default_matmul_precision("highest"):
        for got, want in zip(jax.jit(jax.grad(loss(ours), (0, 1)))(x, w),
                             jax.grad(loss(lax_conv), (0, 1))(x, w)):
            np.testing.assert_allclose(got, want, **tol)
        xs = jnp.stack([x, 2 * x])
        np.testing.assert_allclose(
            jax.jit(jax.vmap(jax.grad(loss(ours), 1), (0, None)))(xs, w),
            jax.vmap(jax.grad(loss(lax_conv), 1), (0, None))(xs, w), **tol)

        def second(conv):
            return lambda x, w: jnp.sum(jax.grad(loss(conv), 1)(x, w) ** 2)

        for got, want in zip(jax.jit(jax.grad(second(ours), (0, 1)))(x, w),
                             jax.grad(second(lax_conv), (0, 1))(x, w)):
            np.testing.assert_allclose(got, want, **tol)
        tangents = (jnp.cos(x), jnp.sin(w))
        np.testing.assert_allclose(jax.jvp(ours, (x, w), tangents)[1],
                                   jax.jvp(lax_conv, (x, w), tangents)[1], **tol)
