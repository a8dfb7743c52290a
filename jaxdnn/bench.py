"""Benchmarks: each jaxdnn op beside the XLA code a JAX user would write without jaxdnn.

    rows = jaxdnn.bench.run(["softmax"], size="small")

A case is one op on one set of input shapes, dtypes and a layout, timed for two passes:
'fwd' (the op) and 'fwd+bwd' (`jax.vjp` of the op over all its inputs applied to a fixed
random cotangent, returning the output and the gradient of every input, as a training
step needs them all). Both sides are jitted, warmed up (compile + 3 calls) and timed as
the median over `repeats` repeats of `calls` back-to-back calls, each repeat ending in
`jax.block_until_ready`.

`jaxdnn bench` (jaxdnn/cli.py) prints these rows; benchmarks/run.py adds PyTorch.
`peers` (`jaxdnn bench --peers`) times the same cases per call and inside one program of
several applications, beside XLA and, where it is installed, PyTorch.
"""
from __future__ import annotations

import datetime
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxdnn
from jaxdnn.layout import channel_axis, is_channels_last, spatial_axes
from jaxdnn.reference import rnn as rnn_reference

__all__ = ["Case", "OPS", "SIZES", "PASSES", "FIELDS", "CALLS", "cases", "inputs", "build",
           "run", "time_ms", "steady_time_ms", "in_program_ms", "measure_bandwidth",
           "lowered_path", "default_size", "on_gpu", "format_table", "format_ms", "peers",
           "PEER_FIELDS", "format_peers", "extension_counters"]

OPS = ("softmax", "pool", "conv", "batchnorm", "stn", "rnn")
SIZES = ("small", "full")
PASSES = ("fwd", "fwd+bwd")
# The fields of a result row, in order; hbm_* are None off GPU.
# jaxdnn_ms is jaxdnn on its default flags (dnn.enabled='auto', which may pick XLA where
# that measured faster); cudnn_ms forces the cuDNN path (dnn.enabled=True), None where
# cuDNN cannot run.
FIELDS = ("op", "case", "pass", "dtype", "layout", "jaxdnn_ms", "cudnn_ms", "xla_ms", "ratio",
          "path", "hbm_floor_ms", "hbm_fraction", "hbm_gbs", "device", "date")

# Calls per timed repeat: enough to hide launch gaps on a GPU, few enough that the small
# preset stays quick on a CPU.
CALLS = {"small": 5, "full": 20}

# Batch normalization's epsilon: cuDNN's smallest (and Flax's and PyTorch's default).
BN_EPSILON = 1e-5


@dataclass(frozen=True)
class Case:
    op: str                  # one of OPS
    label: str
    shape: tuple[int, ...]   # of the first input, in `layout`: the image (a transposed
                             # convolution's dy)
    dtype: str               # of the first input and of the output
    layout: str              # 'NC' (2-D softmax input), 'NCHW', 'NHWC', 'NCDHW', 'NCW', ...
    params: dict[str, Any] = field(default_factory=dict)  # the op's own: window, strides, ...
    # (shape, dtype) of each further differentiable input: convolution kernels, batch
    # norm's gamma and beta, the spatial transformer's theta.
    operands: tuple[tuple[tuple[int, ...], str], ...] = ()

    @property
    def inputs(self) -> tuple[tuple[tuple[int, ...], str], ...]:
        """(shape, dtype) of every input, in the order the op's functions take them."""
        return ((self.shape, self.dtype), *self.operands)


def _image_shape(n, c, spatial, layout) -> tuple[int, ...]:
    return (n, *spatial, c) if is_channels_last(layout) else (n, c, *spatial)


def _extent(spatial) -> str:
    """'56^2' for a square image, '16^3' for a cube, 'L1024' for a sequence, '16x8' else."""
    if len(spatial) == 1:
        return f"L{spatial[0]}"
    if len(set(spatial)) == 1:
        return f"{spatial[0]}^{len(spatial)}"
    return "x".join(map(str, spatial))


def _softmax_case(n, c, spatial=None, layout="NC", mode="channel"):
    if spatial is None:
        return Case("softmax", f"softmax {n}x{c}", (n, c), "float32", "NC")
    label = f"softmax {mode} N{n} C{c} {'x'.join(map(str, spatial))}"
    return Case("softmax", label, _image_shape(n, c, spatial, layout), "float32", layout,
                dict(mode=mode))


def _pool_case(mode, ws, stride, pad, n, c, spatial, dtype="float32", layout=None):
    nd = len(spatial)
    layout = layout or ("NCHW" if nd == 2 else "NCDHW")
    dims = "x".join(map(str, ws))
    label = (f"{mode} {dims}/{stride} pad {pad} N{n} C{c} "
             f"{'x'.join(map(str, spatial))}")
    return Case("pool", label, _image_shape(n, c, spatial, layout), dtype, layout,
                dict(mode=mode, ws=ws, stride=(stride,) * nd, pad=(pad,) * nd))


# The 1-D names of the 2-D layouts (the variants are named in 2-D).
_LAYOUT_IN_1D = {"NCHW": "NCW", "NHWC": "NWC"}


def _conv_case(name, n, c, k, size, kernel, stride, pad, dtype, layout, groups=1, nd=2):
    """A convolution of c channels into k in `groups` groups over nd spatial axes of
    `size` each: image (N, C, spatial...) (or channels last), kernels (K, C/groups, k...)
    in every layout."""
    layout = _LAYOUT_IN_1D.get(layout, layout) if nd == 1 else layout
    spatial = (size,) * nd
    stride_text = f"/{stride}" if stride > 1 else ""
    kernel_text = f"k{kernel}" if nd == 1 else "x".join([str(kernel)] * nd)
    groups_text = f" g{groups}" if groups > 1 else ""
    label = (f"{name} {kernel_text}{stride_text} {c}->{k} {_extent(spatial)} "
             f"N{n}{groups_text}").lstrip()
    kerns = (k, c // groups, *(kernel,) * nd)
    params = dict(stride=(stride,) * nd, pad=(pad,) * nd)
    if groups > 1:
        params["groups"] = groups
    return Case("conv", label, _image_shape(n, c, spatial, layout), dtype, layout, params,
                operands=((kerns, dtype),))


def _transposed_conv_case(n, c_in, c_out, size, nd, kernel, stride, pad, dtype, layout):
    """A transposed convolution of c_in channels into c_out: the input gradient of a
    convolution of c_out channels into c_in (kernels (c_in, c_out, k...)) for its output
    gradient dy, of `size` on every spatial axis. The case's input is dy."""
    small = (size,) * nd
    # The image the forward convolution would take: out = (in - 1) * stride - 2 pad + kernel.
    big = tuple((s - 1) * stride - 2 * pad + kernel for s in small)
    label = f"tconv{nd}d {c_in}->{c_out} k{kernel} s{stride} {_extent(small)} N{n}"
    kerns = (c_in, c_out, *(kernel,) * nd)
    return Case("conv", label, _image_shape(n, c_in, small, layout), dtype, layout,
                dict(stride=(stride,) * nd, pad=(pad,) * nd, transposed=True,
                     image_shape=_image_shape(n, c_out, big, layout)),
                operands=((kerns, dtype),))


# name, (C, K, size) full and small, kernel, stride, pad, the small preset's (dtype, layout)
_CONV_SHAPES = (
    ("res2", (64, 64, 56), (4, 4, 8), 3, 1, 1, ("float32", "NHWC")),
    ("res4", (256, 256, 14), (8, 8, 4), 3, 1, 1, ("bfloat16", "NHWC")),
    ("stem", (3, 64, 224), (3, 4, 16), 7, 2, 3, ("bfloat16", "NHWC")),
    ("", (256, 64, 56), (8, 4, 8), 1, 1, 0, ("bfloat16", "NCHW")),
)
_CONV_VARIANTS = tuple((d, l) for d in ("float32", "bfloat16") for l in ("NCHW", "NHWC"))
# Beyond the ResNet-50 shapes, two convolutions JAX users report slower than PyTorch's (jax#23713, a
# depthwise 3x3 in flax.nnx.Conv; jax#29875, 1-D convolutions), in the same variants:
# name, (C, K, size) full and small, kernel, stride, pad, groups ('depthwise': C), spatial
# dims, the small preset's (dtype, layout)
_USER_REPORTED_CONV_SHAPES = (
    ("depthwise", (256, 256, 56), (8, 8, 8), 3, 1, 1, "depthwise", 2, ("float32", "NHWC")),
    ("conv1d", (256, 256, 2048), (8, 8, 32), 3, 1, 1, 1, 1, ("bfloat16", "NCHW")),
)
# N full and small, (C_in, C_out, size of dy) full and small, spatial dims, kernel, stride,
# pad, the small preset's dtype, layout
_TRANSPOSED_SHAPES = (
    (64, 2, (256, 128, 16), (8, 4, 4), 2, 4, 2, 1, "float32", "NCHW"),
    (4, 1, (64, 32, 16), (4, 2, 4), 3, 4, 2, 1, "bfloat16", "NCDHW"),
    (16, 2, (512, 256, 1024), (8, 4, 16), 1, 16, 8, 4, "bfloat16", "NCW"),
)


def _batchnorm_case(n, c, size, dtype, layout):
    """Spatial-mode training batch norm. gamma and beta stay float32 for half-precision
    images, as mixed-precision training keeps its parameters (and cuDNN wants them)."""
    shape = _image_shape(n, c, (size, size), layout)
    param = _image_shape(1, c, (1, 1), layout)
    return Case("batchnorm", f"batchnorm spatial N{n} C{c} {size}^2", shape, dtype, layout,
                dict(epsilon=BN_EPSILON), operands=((param, "float32"),) * 2)


def _stn_case(n, c, size):
    return Case("stn", f"affine grid + bilinear N{n} C{c} {size}^2", (n, c, size, size),
                "float32", "NCHW", operands=(((n, 2, 3), "float32"),))


def _rnn_case(mode, steps, n, input_dim, hidden, layers, dtype):
    block = jaxdnn.RNNBlock(dtype, hidden, layers, mode)
    return Case("rnn", f"{mode.upper()} T{steps} N{n} I{input_dim} H{hidden} L{layers}",
                (steps, n, input_dim), dtype, "TNC",
                params=dict(mode=mode, hidden=hidden, layers=layers),
                operands=(((block.get_param_size((n, input_dim)),), dtype),))


def cases(size: str = "small", ops=None) -> list[Case]:
    """The cases of a preset: 'full' holds the reference shapes (BENCHMARKS.md), 'small'
    the same variants on shapes tiny enough for a CPU."""
    if size not in SIZES:
        raise ValueError(f"size={size!r}; expected one of {', '.join(SIZES)}")
    ops = OPS if ops is None else tuple(ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; expected among {', '.join(OPS)}")
    full = size == "full"

    def pick(full_value, small_value):
        return full_value if full else small_value

    n, c, hw = pick((64, 64, 112), (4, 8, 32))
    n3, c3, d3 = pick((8, 32, 32), (2, 4, 8))
    pool2d = dict(ws=(3, 3), stride=2, pad=1, n=n, c=c, spatial=(hw, hw))
    conv_n = pick(64, 2)
    bn = dict(n=pick(64, 2), c=pick(256, 8), size=pick(28, 4))
    every = [
        _softmax_case(*pick((8192, 4096), (256, 512))),
        _softmax_case(n, c, (hw // 2, hw // 2), "NCHW"),
        _softmax_case(n, c, (hw // 2, hw // 2), "NHWC"),
        _softmax_case(n, c, (hw // 2, hw // 2), "NCHW", mode="instance"),
        _pool_case("max", **pool2d),
        _pool_case("average_inc_pad", **pool2d),
        _pool_case("max", **pool2d, dtype="bfloat16"),
        _pool_case("max", **pool2d, dtype="float16"),
        _pool_case("max", **pool2d, layout="NHWC"),
        _pool_case("max", (2, 2, 2), 2, 0, n3, c3, (d3, d3, d3)),
        # The ResNet-50 reference shapes; the full preset times each in float32 and
        # bfloat16, NCHW and NHWC (the small one in one dtype and layout).
        *(_conv_case(name, conv_n, *pick(full_shape, small_shape), kernel, stride, pad,
                     dtype, layout)
          for name, full_shape, small_shape, kernel, stride, pad, small_variant in _CONV_SHAPES
          for dtype, layout in (_CONV_VARIANTS if full else (small_variant,))),
        *(_conv_case(name, conv_n, *pick(full_shape, small_shape), kernel, stride, pad,
                     dtype, layout, pick(full_shape, small_shape)[0] if groups == "depthwise"
                     else groups, nd)
          for name, full_shape, small_shape, kernel, stride, pad, groups, nd, first
          in _USER_REPORTED_CONV_SHAPES
          for dtype, layout in (_CONV_VARIANTS if full else (first,))),
        # The transposed convolutions, in float32 and bfloat16 (the small preset: one).
        *(_transposed_conv_case(pick(n_full, n_small), *pick(full_shape, small_shape), nd,
                                kernel, stride, pad, dtype, layout)
          for n_full, n_small, full_shape, small_shape, nd, kernel, stride, pad, small_dtype,
          layout in _TRANSPOSED_SHAPES
          for dtype in (("float32", "bfloat16") if full else (small_dtype,))),
        *(_batchnorm_case(**bn, dtype=dtype, layout=layout)
          for dtype in ("float32", "bfloat16") for layout in ("NCHW", "NHWC")),
        _stn_case(*pick((64, 32, 128), (2, 4, 8))),
        # The reference recurrent networks (time-major x), float32 and bfloat16.
        *(_rnn_case(mode, *pick((128, 64, 512, 512, 2), (8, 4, 16, 16, 2)), dtype)
          for mode in ("lstm", "gru") for dtype in ("float32", "bfloat16")),
    ]
    return [case for case in every if case.op in ops]


# --- the two sides of each op ------------------------------------------------------------

def _softmax_functions(case: Case) -> tuple[Callable, Callable]:
    mode = case.params.get("mode", "channel")
    data_format = "NHWC" if case.layout == "NHWC" else "NCHW"
    axis = (1, 2, 3) if mode == "instance" else (-1 if data_format == "NHWC" else 1)
    return (lambda x: jaxdnn.dnn_softmax(x, mode=mode, data_format=data_format),
            lambda x: jax.nn.softmax(x, axis=axis))


def _xla_pool(x, *, mode, ws, stride, pad, layout):
    """What a JAX user writes without jaxdnn: lax.reduce_window, differentiated by XLA."""
    ndim = x.ndim

    def spread(values, fill):
        full = [fill] * ndim
        for axis, v in zip(spatial_axes(layout, ndim), values):
            full[axis] = v
        return tuple(full)

    window, strides = spread(ws, 1), spread(stride, 1)
    padding = tuple((p, p) for p in spread(pad, 0))
    # Python-scalar init values: JAX then recognizes the max/add monoid and differentiates
    # it (an array init value gives a generic, non-differentiable reduce_window).
    if mode == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)
    if mode == "average_inc_pad":
        sums = lax.reduce_window(x, 0.0, lax.add, window, strides, padding)
        return sums / math.prod(ws)
    raise ValueError(f"no XLA peer for pooling mode {mode!r}")


def _pool_functions(case: Case) -> tuple[Callable, Callable]:
    p = case.params

    def jaxdnn_pool(x):
        return jaxdnn.dnn_pool(x, p["ws"], p["stride"], p["mode"], p["pad"],
                               data_format=case.layout)

    def xla_pool(x):
        return _xla_pool(x, **p, layout=case.layout)

    return jaxdnn_pool, xla_pool


def _conv_functions(case: Case) -> tuple[Callable, Callable]:
    """dnn_conv against lax.conv_general_dilated; for a transposed convolution (inputs dy
    and w) dnn_gradinput against lax.conv_transpose."""
    p = case.params
    nd = len(p["stride"])
    groups = p.get("groups", 1)
    options = dict(border_mode=p["pad"], subsample=p["stride"], conv_mode="cross",
                   num_groups=groups, data_format=case.layout)
    spatial = case.layout.replace("N", "").replace("C", "")
    # The kernels are (K, C, spatial...) whatever the images' layout: 'OIHW' and its kin.
    dimension_numbers = (case.layout, "OI" + spatial, case.layout)
    if p.get("transposed"):
        gradinput = jaxdnn.dnn_gradinput3d if nd == 3 else jaxdnn.dnn_gradinput
        # conv_transpose pads the stride-dilated dy: by kernel - 1 - pad for a forward
        # convolution padded by `pad` (PyTorch's ConvTranspose padding, as the PyTorch peer runs it).
        kernel_spatial = case.operands[0][0][2:]
        dilated_padding = [(k - 1 - pad, k - 1 - pad) for k, pad in zip(kernel_spatial, p["pad"])]

        def jaxdnn_transposed(dy, w):
            return gradinput(w, dy, p["image_shape"], **options)

        def xla_transposed(dy, w):
            # transpose_kernel: w holds the forward convolution's kernels, (channels of dy,
            # channels of the result, k...); XLA flips them and swaps their channel axes.
            return lax.conv_transpose(dy, w, p["stride"], dilated_padding,
                                      dimension_numbers=dimension_numbers,
                                      transpose_kernel=True)

        return jaxdnn_transposed, xla_transposed
    conv = jaxdnn.dnn_conv3d if nd == 3 else jaxdnn.dnn_conv
    padding = [(pad, pad) for pad in p["pad"]]

    def jaxdnn_conv(x, w):
        return conv(x, w, **options)

    def xla_conv(x, w):
        return lax.conv_general_dilated(x, w, p["stride"], padding,
                                        dimension_numbers=dimension_numbers,
                                        feature_group_count=groups)

    return jaxdnn_conv, xla_conv


def _xla_batchnorm(x, gamma, beta, *, axes, epsilon):
    """The plain-JAX training batch norm that XLA fuses (the 'XLA fusion' peer), with
    the statistics in float32 as cuDNN computes them for half-precision images."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axes, keepdims=True)
    var = x32.var(axes, keepdims=True)
    return ((x32 - mean) * gamma * lax.rsqrt(var + epsilon) + beta).astype(x.dtype)


def _batchnorm_functions(case: Case) -> tuple[Callable, Callable]:
    epsilon = case.params["epsilon"]
    ndim = len(case.shape)
    axes = tuple(a for a in range(ndim) if a != channel_axis(case.layout, ndim))

    def jaxdnn_batchnorm(x, gamma, beta):
        out, _mean, _invstd = jaxdnn.dnn_batch_normalization_train(
            x, gamma, beta, mode="spatial", epsilon=epsilon, data_format=case.layout)
        return out

    def xla_batchnorm(x, gamma, beta):
        return _xla_batchnorm(x, gamma, beta, axes=axes, epsilon=epsilon)

    return jaxdnn_batchnorm, xla_batchnorm


def _xla_affine_grid(theta, height, width):
    """(N, H, W, 2) sampling points (x, y) of theta (N, 2, 3) on an output of height x width,
    with -1 and 1 the centres of the corner pixels (align_corners=True)."""
    gx, gy = jnp.meshgrid(jnp.linspace(-1, 1, width, dtype=theta.dtype),
                          jnp.linspace(-1, 1, height, dtype=theta.dtype))
    base = jnp.stack([gx, gy, jnp.ones_like(gx)], -1).reshape(-1, 3)
    return jnp.einsum("nij,pj->npi", theta, base).reshape(theta.shape[0], height, width, 2)


def _xla_grid_sample(img, grid):
    """Bilinear sampling of img (N, C, H, W) at grid (N, H_out, W_out, 2), zero outside the
    image, written with gathers: the pure-JAX peer."""
    _, _, height, width = img.shape
    x = (grid[..., 0] + 1) * (width - 1) / 2
    y = (grid[..., 1] + 1) * (height - 1) / 2
    x0, y0 = jnp.floor(x), jnp.floor(y)
    x1, y1 = x0 + 1, y0 + 1

    def corner(yy, xx, weight):
        inside = (xx >= 0) & (xx <= width - 1) & (yy >= 0) & (yy <= height - 1)
        xi = jnp.clip(xx, 0, width - 1).astype(jnp.int32)
        yi = jnp.clip(yy, 0, height - 1).astype(jnp.int32)
        values = jax.vmap(lambda im, rows, cols: im[:, rows, cols])(img, yi, xi)
        return values * (weight * inside)[:, None]

    return (corner(y0, x0, (x1 - x) * (y1 - y)) + corner(y1, x0, (x1 - x) * (y - y0))
            + corner(y0, x1, (x - x0) * (y1 - y)) + corner(y1, x1, (x - x0) * (y - y0)))


def _stn_functions(case: Case) -> tuple[Callable, Callable]:
    def jaxdnn_stn(img, theta):
        return jaxdnn.dnn_spatialtf(img, theta, 1, 1)

    def xla_stn(img, theta):
        return _xla_grid_sample(img, _xla_affine_grid(theta, *img.shape[2:]))

    return jaxdnn_stn, xla_stn


def _rnn_functions(case: Case) -> tuple[Callable, Callable]:
    """RNNBlock.apply beside the same network as a plain lax.scan (jaxdnn's reference, what
    a Flax scan RNN compiles to); zero initial states, y as the output."""
    p = case.params
    block = jaxdnn.RNNBlock(case.dtype, p["hidden"], p["layers"], p["mode"])
    lstm = p["mode"] == "lstm"

    def states(x):
        zeros = jnp.zeros((p["layers"], x.shape[1], p["hidden"]), x.dtype)
        return zeros, (zeros if lstm else None)

    def jaxdnn_rnn(x, w):
        hx, cx = states(x)
        return block.apply(w, x, hx, cx)[0]

    def xla_rnn(x, w):
        hx, cx = states(x)
        return rnn_reference.rnn(x, hx, cx, w, None, mode=p["mode"], input_mode="linear",
                                 hidden_size=p["hidden"], num_layers=p["layers"],
                                 bidirectional=False)[0]

    return jaxdnn_rnn, xla_rnn


_FUNCTIONS = {"softmax": _softmax_functions, "pool": _pool_functions,
              "conv": _conv_functions, "batchnorm": _batchnorm_functions,
              "stn": _stn_functions, "rnn": _rnn_functions}


def _forward_backward(forward: Callable) -> Callable:
    """One training step's worth of the op: the output and the gradients of all its inputs
    for a cotangent (the last argument)."""
    def step(*args):
        *primals, cotangent = args
        y, vjp = jax.vjp(forward, *primals)
        return y, vjp(cotangent)
    return step


def _random(seed: int, shape, dtype: str) -> np.ndarray:
    # Drawn by NumPy: jax.random would compile a sampler for every new shape, seconds each
    # on a small CPU.
    values = np.random.default_rng(seed).standard_normal(shape, np.float32)
    return values.astype(jnp.dtype(dtype))


def _standard_normal_inputs(case: Case) -> list[np.ndarray]:
    return [_random(seed, shape, dtype) for seed, (shape, dtype) in enumerate(case.inputs)]


def _stn_inputs(case: Case) -> list[np.ndarray]:
    """theta near the identity (plus 0.1 x standard normal), as a trained transformer's:
    most sampling points then fall inside the image, neighbours near neighbours."""
    img, noise = _standard_normal_inputs(case)
    identity = np.eye(2, 3, dtype=np.float32)
    return [img, (identity + 0.1 * noise.astype(np.float32)).astype(noise.dtype)]


# Ops whose inputs are not all standard normal.
_INPUTS = {"stn": _stn_inputs}


def inputs(case: Case) -> tuple[np.ndarray, ...]:
    """The case's inputs as NumPy arrays (each in its dtype and shape, images in the
    case's layout): the values both sides take, and the PyTorch peer too."""
    return tuple(_INPUTS.get(case.op, _standard_normal_inputs)(case))


def build(case: Case, pass_: str) -> tuple[Callable, Callable, tuple]:
    """(jaxdnn_fn, xla_fn, args) for one pass of `case`, neither jitted yet. 'fwd': args
    are the inputs; 'fwd+bwd': the inputs and a cotangent, and both functions return
    (output, (gradient of each input))."""
    if pass_ not in PASSES:
        raise ValueError(f"pass={pass_!r}; expected one of {', '.join(PASSES)}")
    jaxdnn_fn, xla_fn = _FUNCTIONS[case.op](case)
    primals = tuple(jnp.asarray(a) for a in inputs(case))
    if pass_ == "fwd":
        return jaxdnn_fn, xla_fn, primals
    out = jax.eval_shape(jaxdnn_fn, *primals)
    cotangent = jnp.asarray(_random(len(primals), out.shape, out.dtype))
    return (_forward_backward(jaxdnn_fn), _forward_backward(xla_fn),
            (*primals, cotangent))


def _bytes_moved(case: Case, pass_: str) -> int:
    """The least HBM traffic a pass can get by with: read the inputs and write the output;
    the backward adds reading the cotangent (the output's size) and writing a gradient of
    every input (its size)."""
    jaxdnn_fn, _ = _FUNCTIONS[case.op](case)
    primals = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in case.inputs]
    out = jax.eval_shape(jaxdnn_fn, *primals)
    once = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in (*primals, out))
    return once if pass_ == "fwd" else 2 * once


# --- timing -------------------------------------------------------------------------------

def time_ms(fn: Callable, args: tuple, repeats: int = 5, calls: int = 10) -> float:
    """Milliseconds per call of an already-jitted `fn`: compile and 3 warm-up calls, then
    the median over `repeats` of the mean of `calls` back-to-back calls."""
    out = fn(*args)
    for _ in range(3):
        out = fn(*args)
    jax.block_until_ready(out)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def steady_time_ms(fn: Callable, args: tuple, repeats: int = 5, calls: int = 10) -> float:
    """Milliseconds per call of an already-jitted `fn` in a steady stream of calls: the
    median over `repeats` of the difference between a run of 2 * `calls` back-to-back
    calls and a run of `calls`, divided by `calls`. What each run pays once (the first
    call's dispatch before the device starts, the wait for the last result) drops out, as
    it does from CUDA events recorded around a stream of PyTorch calls."""
    def run(n: int) -> float:
        start = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        return time.perf_counter() - start

    for _ in range(4):
        run(1)
    differences, longer = [], []
    for _ in range(repeats):
        longer.append(run(2 * calls))
        differences.append(longer[-1] - run(calls))
    steady = statistics.median(differences) / calls
    if steady <= 0:  # the once-per-run cost and its noise swamp the calls (tiny CPU cases):
        steady = statistics.median(longer) / (2 * calls)  # the plain time, an upper bound
    return steady * 1e3


def measure_bandwidth(repeats: int = 5, calls: int = 10) -> float:
    """Achievable memory bandwidth in GB/s: an `x + 1` over 1 GiB of float32 reads 1 GiB
    and writes 1 GiB."""
    x = jnp.zeros(1 << 28, jnp.float32)
    ms = time_ms(jax.jit(lambda a: a + 1), (x,), repeats, calls)
    return 2 * x.nbytes / (ms * 1e-3) / 1e9


_CUSTOM_CALL = re.compile(r"custom_call @jaxdnn_")


def lowered_path(fn: Callable, args: tuple) -> str:
    """'cudnn' when `fn` lowers to a jaxdnn custom call on the default backend, else 'xla'."""
    text = jax.jit(fn).lower(*args).as_text()
    return "cudnn" if _CUSTOM_CALL.search(text) else "xla"


def _cudnn_forced_ms(fn: Callable, args: tuple, repeats: int, calls: int) -> float | None:
    """time_ms of `fn` on the cuDNN path (dnn.enabled=True), or None where it cannot take
    it: no extension, or this build lacks one of the op's handlers (dnn.enabled=True then
    raises while tracing, which lowering alone reveals without running anything)."""
    if not jaxdnn.is_available():
        return None
    with jaxdnn.config.override(**{"dnn.enabled": True}):
        jitted = jax.jit(fn)
        try:
            jitted.lower(*args)
        except RuntimeError as error:
            if "dnn.enabled=True" not in str(error):  # not choose_impl's refusal
                raise
            return None
        return time_ms(jitted, args, repeats, calls)


def default_size() -> str:
    return "full" if jaxdnn.is_available() else "small"


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def extension_counters() -> dict | None:
    """What jaxdnn's CUDA extension has counted in this process, for benchmarks and soaks:
    'graph_capture', its handlers' own CUDA graphs (warm-ups, replays, instantiations,
    updates, launches left to XLA's capture, failures, direct launches), and
    'cudnn_handles', its cuDNN handle pool ({device: [handles made, streams they are
    bound to]}). None without the extension; a count an older build lacks is None."""
    from jaxdnn import _extension
    extension = _extension.extension()
    if extension is None:
        return None

    def query(name, convert):
        function = getattr(extension, name, None)
        return None if function is None else convert(function())

    return {
        "graph_capture": query("graph_capture_stats", dict),
        "cudnn_handles": query("cudnn_handle_counts",
                               lambda counts: {int(d): list(c) for d, c in counts.items()}),
    }


def run(ops=None, size: str | None = None, repeats: int = 5, calls: int | None = None,
        progress: Callable[[int, int, str], None] | None = None,
        bandwidth_gbs: float | None = None,
        on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Time every case of `size` (default: 'full' where cuDNN can serve, else 'small') for
    `ops` (default: all), both passes, and return one row per (case, pass) with FIELDS.

    progress(done, total, what) is called before each timing and once at the end;
    on_row(row) with each row as soon as it is timed (a caller interrupted midway keeps
    those). On a GPU the memory bandwidth is measured first (unless given) for the HBM
    floor.
    """
    size = size or default_size()
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; expected at least 1")
    calls = calls or CALLS[size]
    selected = cases(size, ops)
    if bandwidth_gbs is None and on_gpu():
        bandwidth_gbs = measure_bandwidth()
    device = jax.devices()[0].device_kind
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    steps = [(case, pass_) for case in selected for pass_ in PASSES]
    rows = []
    for done, (case, pass_) in enumerate(steps):
        if progress:
            progress(done, len(steps), f"{case.label} {case.dtype} {case.layout} {pass_}")
        jaxdnn_fn, xla_fn, args = build(case, pass_)
        jaxdnn_ms = time_ms(jax.jit(jaxdnn_fn), args, repeats, calls)
        cudnn_ms = _cudnn_forced_ms(jaxdnn_fn, args, repeats, calls)
        xla_ms = time_ms(jax.jit(xla_fn), args, repeats, calls)
        floor_ms = (_bytes_moved(case, pass_) / (bandwidth_gbs * 1e9) * 1e3
                    if bandwidth_gbs else None)
        rows.append({
            "op": case.op, "case": case.label, "pass": pass_, "dtype": case.dtype,
            "layout": case.layout, "jaxdnn_ms": jaxdnn_ms, "cudnn_ms": cudnn_ms, "xla_ms": xla_ms,
            "ratio": xla_ms / jaxdnn_ms, "path": lowered_path(jaxdnn_fn, args),
            "hbm_floor_ms": floor_ms,
            "hbm_fraction": floor_ms / jaxdnn_ms if floor_ms else None,
            "hbm_gbs": bandwidth_gbs, "device": device, "date": date,
        })
        if on_row:
            on_row(rows[-1])
    if progress:
        progress(len(steps), len(steps), "done")
    return rows


# --- jaxdnn beside its peers, per call and inside one program ---------------------------------

# The fields of a peers row. timing: 'per call' (one jitted call at a time) or 'program xK'
# (K applications inside one jitted program, time per application); torch_ms is None
# where PyTorch was not timed; best_peer names the faster of XLA and PyTorch and
# vs_best_peer = its ms / jaxdnn ms (above 1: jaxdnn is faster).
PEER_FIELDS = ("op", "case", "pass", "dtype", "layout", "timing", "jaxdnn_ms", "xla_ms",
               "torch_ms", "best_peer", "vs_best_peer", "path")


def in_program_ms(fn: Callable, args: tuple, copies: int = 8, repeats: int = 5,
                  calls: int = 5) -> float:
    """Milliseconds per application of `fn` inside one jitted program that applies it to
    `copies` distinct copies of `args` (different buffers, so XLA can neither merge nor
    skip any), timed as a steady stream of programs (`steady_time_ms`): the op as a
    training step runs it, without a per-call dispatch of its own."""
    def many(*groups):
        return tuple(fn(*group) for group in groups)

    groups = tuple(tuple(jnp.array(a, copy=True) for a in args) for _ in range(copies))
    return steady_time_ms(jax.jit(many), groups, repeats, calls) / copies


def _torch_setup(use_torch: bool) -> tuple[Any, str | None, str]:
    """(the torch peer module or None, its device, a line saying what the PyTorch column
    is: which PyTorch on which device, or why there is none)."""
    if not use_torch:
        return None, None, "PyTorch: not asked for"
    from jaxdnn import torch_peer
    reason = torch_peer.unavailable_reason()
    if reason:
        return None, None, f"PyTorch: none ({reason}), so no PyTorch column"
    where = torch_peer.device(on_gpu())
    torch_peer.configure(where)
    info = torch_peer.versions(where)
    note = f"PyTorch {info['torch']} on {where}"
    if where == "cpu" and on_gpu():
        note += " (it sees no CUDA device; its times are not comparable with the GPU's)"
    elif where == "cpu":
        note += " (JAX runs on the CPU too)"
    return torch_peer, where, note


def peers(ops=None, size: str | None = None, repeats: int = 5, calls: int | None = None,
          copies: int = 8, torch: bool = True,
          progress: Callable[[int, int, str], None] | None = None,
          on_row: Callable[[dict], None] | None = None,
          on_note: Callable[[str], None] | None = None) -> tuple[list[dict], str]:
    """jaxdnn (its default flags) beside XLA and, where importable, PyTorch, for every case
    of `size` and `ops` and both passes, each timed per call and inside one program of
    `copies` applications. Returns (rows with PEER_FIELDS, a line on the PyTorch column:
    which PyTorch on which device, or why there is none), the line also given to on_note
    before any case is timed. progress and on_row as in `run`.

    JAX: per call, a steady stream of one jitted call at a time (`steady_time_ms`); in a
    program, `in_program_ms`. PyTorch, eager, has no program: its 'program' time is that of
    `copies` times as many back-to-back calls (CUDA events on a GPU, the wall clock on the
    CPU), as benchmarks/in_program.py times it.
    """
    size = size or default_size()
    calls = calls or CALLS[size]
    torch_peer, where, note = _torch_setup(torch)
    if on_note:
        on_note(note)
    steps = [(case, pass_) for case in cases(size, ops) for pass_ in PASSES]
    rows = []
    for done, (case, pass_) in enumerate(steps):
        if progress:
            progress(done, len(steps), f"{case.label} {case.dtype} {case.layout} {pass_}")
        jaxdnn_fn, xla_fn, args = build(case, pass_)
        path = lowered_path(jaxdnn_fn, args)
        torch_step = (torch_peer.step_for(case, pass_, where)
                      if torch_peer is not None and torch_peer.supports(case) else None)
        for timing in ("per call", f"program x{copies}"):
            if timing == "per call":
                jaxdnn_ms = steady_time_ms(jax.jit(jaxdnn_fn), args, repeats, calls)
                xla_ms = steady_time_ms(jax.jit(xla_fn), args, repeats, calls)
                torch_calls = calls
            else:
                jaxdnn_ms = in_program_ms(jaxdnn_fn, args, copies, repeats, calls)
                xla_ms = in_program_ms(xla_fn, args, copies, repeats, calls)
                torch_calls = calls * copies
            torch_ms = (torch_peer.time_ms(torch_step, repeats, torch_calls, where)
                        if torch_step is not None else None)
            best_peer, best_ms = min((("XLA", xla_ms), ("PyTorch", torch_ms)),
                                     key=lambda p: math.inf if p[1] is None else p[1])
            rows.append({"op": case.op, "case": case.label, "pass": pass_,
                         "dtype": case.dtype, "layout": case.layout, "timing": timing,
                         "jaxdnn_ms": jaxdnn_ms, "xla_ms": xla_ms, "torch_ms": torch_ms,
                         "best_peer": best_peer, "vs_best_peer": best_ms / jaxdnn_ms,
                         "path": path})
            if on_row:
                on_row(rows[-1])
    if progress:
        progress(len(steps), len(steps), "done")
    return rows, note


def format_peers(rows: list[dict], markdown: bool = False) -> str:
    """Peers rows as an aligned text table (or a Markdown one); the PyTorch column only
    where some row has a PyTorch time."""
    columns = [("case", "case", str), ("pass", "pass", str), ("dtype", "dtype", str),
               ("layout", "layout", str), ("timing", "timing", str),
               ("jaxdnn ms", "jaxdnn_ms", format_ms), ("XLA ms", "xla_ms", format_ms)]
    if any(row.get("torch_ms") is not None for row in rows):
        columns.append(("PyTorch ms", "torch_ms", format_ms))
    columns += [("vs best peer", "vs_best_peer", lambda r: f"{r:.2f}x"),
                ("best peer", "best_peer", str), ("path", "path", str)]
    return _table(columns, rows, markdown)


def _table(columns, rows: list[dict], markdown: bool) -> str:
    header = [title for title, _, _ in columns]
    body = [[fmt(row.get(key)) for _, key, fmt in columns] for row in rows]
    if markdown:
        lines = [header, ["---"] * len(header), *body]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    numeric = {i for i, (_, key, _) in enumerate(columns)
               if key.endswith(("_ms", "ratio", "fraction", "vs_best_peer"))}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, body)])


# --- comparing two runs --------------------------------------------------------------------

# What identifies a row across runs.
ROW_KEY = ("op", "case", "pass", "dtype", "layout")


def compare(before: list[dict], after: list[dict], tolerance: float = 0.10) -> list[dict]:
    """The rows of `after` that `before` also timed, each with both runs' jaxdnn and XLA
    times and `slowdown` = after's jaxdnn ms / before's; `regression` is True where that
    exceeds 1 + `tolerance` while XLA's own time moved by less (a slower card or a busier
    machine slows both sides alike). Rows of `peers` match on their timing too (per call,
    or inside one program)."""
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance}; expected a fraction >= 0")
    key = ROW_KEY + (("timing",) if any("timing" in row for row in after) else ())
    earlier = {tuple(row.get(k) for k in key): row for row in before}
    compared = []
    for row in after:
        old = earlier.get(tuple(row.get(k) for k in key))
        if old is None:
            continue
        slowdown = row["jaxdnn_ms"] / old["jaxdnn_ms"]
        xla_slowdown = row["xla_ms"] / old["xla_ms"]
        compared.append({
            **{k: row[k] for k in key},
            "before_ms": old["jaxdnn_ms"], "after_ms": row["jaxdnn_ms"], "slowdown": slowdown,
            "xla_before_ms": old["xla_ms"], "xla_after_ms": row["xla_ms"],
            "regression": slowdown > 1 + tolerance and xla_slowdown <= 1 + tolerance,
        })
    return compared


def format_comparison(rows: list[dict]) -> str:
    # a peers row's pass says its timing too ("fwd per call")
    passes = [r["pass"] + (" " + r["timing"] if "timing" in r else "") for r in rows]
    width = max([8, *map(len, passes)])
    lines = [f"{'op':<10} {'case':<44} {'pass':<{width}} {'before ms':>10} {'after ms':>10} "
             f"{'after/before':>12}  {'XLA after/before':>16}"]
    for r, pass_ in zip(rows, passes):
        mark = "  REGRESSION" if r["regression"] else ""
        lines.append(f"{r['op']:<10} {r['case'][:44]:<44} {pass_:<{width}} "
                     f"{format_ms(r['before_ms']):>10} {format_ms(r['after_ms']):>10} "
                     f"{r['slowdown']:>11.2f}x  {r['xla_after_ms'] / r['xla_before_ms']:>15.2f}x"
                     f"{mark}")
    return "\n".join(lines)


# --- presentation ---------------------------------------------------------------------------

def format_ms(value) -> str:
    """A time in milliseconds to 4 significant digits; '-' for None (not measured)."""
    return "-" if value is None else f"{value:.4g}"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The rows as an aligned text table (or a Markdown one). A torch_ms column appears when
    the rows carry one, the HBM columns when the floor was measured."""
    columns = [("case", "case", str), ("pass", "pass", str), ("dtype", "dtype", str),
               ("layout", "layout", str), ("jaxdnn ms", "jaxdnn_ms", format_ms),
               ("cuDNN-forced ms", "cudnn_ms", format_ms), ("XLA ms", "xla_ms", format_ms)]
    if any(row.get("torch_ms") is not None for row in rows):
        columns.append(("torch ms", "torch_ms", format_ms))
    columns.append(("speedup", "ratio", lambda r: f"{r:.2f}x"))
    if any(row.get("hbm_floor_ms") is not None for row in rows):
        columns += [("HBM floor ms", "hbm_floor_ms", format_ms),
                    ("of HBM", "hbm_fraction", lambda f: "-" if f is None else f"{f:.0%}")]
    columns.append(("path", "path", str))
    return _table(columns, rows, markdown)
