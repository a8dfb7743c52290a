"""The differential fuzzer's configurations and checks, shared by tests/test_fuzz.py (one
pytest case per configuration) and benchmarks/fuzz_run.py (thousands of configurations
in one run, in worker processes).

`make_case(op, seed)` draws one random valid configuration of an op family from a seeded
generator (shapes with 1s and odd sizes, strides, dilations, paddings, groups, modes,
dtypes, layouts, sequence lengths) and returns a `Case`: the passes to run (each a
function of its array arguments) and, for every result, the float64 oracle's value
(tests/oracles/) and the size of the reduction that bounds its rounding. Inputs are
rounded to the dtype first and the oracle sees the rounded values; the tolerance is
derived from the dtype and the reduction size (`fuzz_tolerance`).

`invalid_calls(rng)` yields calls that must raise ValueError/TypeError at trace time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from helpers import cast, to_f64
from oracles import batchnorm as bn_oracle
from oracles import conv as conv_oracle
from oracles import pooling_softmax as ps_oracle
from oracles import rnn as rnn_oracle
from oracles import spatial_transformer as stn_oracle

import jaxdnn

DTYPES = ("float16", "bfloat16", "float32", "float64")
# Unit roundoff of each type, and of the type cuDNN and the reference accumulate it in.
_EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
_ACCUMULATES_IN = {"float16": "float32", "bfloat16": "float32", "float32": "float32",
                   "float64": "float64"}


def fuzz_tolerance(dtype: str, reduction: int) -> float:
    """Relative tolerance of a result of `dtype` that sums `reduction` rounded products:
    the result's own rounding (a few units) plus the accumulation's error, which grows
    like the square root of the number of terms for random signs (with a margin)."""
    own = 8 * _EPS[dtype]
    accumulation = 64 * _EPS[_ACCUMULATES_IN[dtype]] * math.sqrt(max(reduction, 1))
    return own + accumulation


def check(actual, expected, dtype, reduction, what, terms: float = 0.0):
    """Raise AssertionError unless `actual` is within fuzz_tolerance of `expected`.
    The absolute part scales with the largest expected value, or with `terms`, the size
    of the terms a result is the difference of, where cancellation leaves the result
    far smaller than they are (errors scale with the terms, not with what is left)."""
    actual, expected = to_f64(actual), to_f64(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    tol = fuzz_tolerance(dtype, reduction)
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0, terms)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def rng_for(op: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, sum(map(ord, op))])


def pick(rng, options):
    return options[int(rng.integers(len(options)))]


def rounded(rng, shape, dtype, scale=1.0):
    """(a jax array of dtype, its float64 copy): random normal values rounded to dtype."""
    return cast(scale * rng.standard_normal(shape), dtype)


def describe(**config) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


@dataclass
class Pass:
    """One pass of a configuration: fn(*args) returns a tuple of results, compared with
    `outputs`, one (label, float64 oracle value or None to skip, reduction size) each,
    optionally a fourth item: the size of the terms that value cancels (see `check`)."""
    name: str
    fn: Callable
    args: tuple
    outputs: tuple


@dataclass
class Case:
    op: str
    seed: int
    dtype: str
    what: str
    passes: list = field(default_factory=list)


def compare(case: Case, p: Pass, results, suffix: str = "") -> None:
    """Check every result of pass `p` (results as fn returned them) against its oracle;
    AssertionError names the pass, the result, the path (`suffix`) and the configuration."""
    assert len(results) == len(p.outputs), (p.name, len(results), len(p.outputs))
    for value, (label, expected, reduction, *terms) in zip(results, p.outputs):
        if expected is None:
            continue
        name = p.name if label is None else f"{p.name} {label}"
        check(value, expected, case.dtype, reduction, f"{name}{suffix}: {case.what}", *terms)


# ---- convolution: forward, backward-data, backward-filter -------------------------------

def conv_config(rng):
    nd = pick(rng, (1, 2, 2, 3))
    groups = pick(rng, (1, 1, 2, 3))
    cg, kg = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    kernel = tuple(int(rng.integers(1, 4)) for _ in range(nd))
    dilation = tuple(int(rng.integers(1, 3)) for _ in range(nd))
    stride = tuple(int(rng.integers(1, 4)) for _ in range(nd))
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    border = pick(rng, ("valid", "half", "full", "pads"))
    if border == "pads":
        border = tuple(int(rng.integers(0, e)) for e in extent)
    pads = conv_oracle.border_pads(border, kernel, dilation)
    lo = [p if isinstance(p, int) else p[0] for p in pads]
    spatial = tuple(max(1, e - 2 * p) + int(rng.integers(0, 5)) for e, p in zip(extent, lo))
    if nd == 3:  # smaller volumes: the oracle loops in Python
        spatial = tuple(min(s, 5) for s in spatial)
        spatial = tuple(max(s, e - 2 * p) for s, e, p in zip(spatial, extent, lo))
    return dict(nd=nd, n=int(rng.integers(1, 4)), c=cg * groups, k=kg * groups, groups=groups,
                kernel=kernel, dilation=dilation, stride=stride, border=border,
                spatial=spatial, conv_mode=pick(rng, ("conv", "cross")),
                channels_last=bool(rng.integers(2)), dtype=pick(rng, DTYPES))


def conv_case(seed: int) -> Case:
    rng = rng_for("conv", seed)
    cfg = conv_config(rng)
    nd, dtype = cfg["nd"], cfg["dtype"]
    fmt = conv_oracle.data_format_for(nd, cfg["channels_last"])
    img_shape = conv_oracle.layout_shape((cfg["n"], cfg["c"]) + cfg["spatial"], fmt)
    kerns_shape = (cfg["k"], cfg["c"] // cfg["groups"]) + cfg["kernel"]
    img, img64 = rounded(rng, img_shape, dtype)
    kerns, kerns64 = rounded(rng, kerns_shape, dtype, 0.5)
    options = dict(border_mode=cfg["border"], subsample=cfg["stride"], dilation=cfg["dilation"],
                   conv_mode=cfg["conv_mode"], num_groups=cfg["groups"], data_format=fmt)
    out_shape = conv_oracle.output_shape(img_shape, kerns_shape, cfg["border"], cfg["stride"],
                                         cfg["dilation"], fmt)
    dy, dy64 = rounded(rng, out_shape, dtype)
    conv, gradinput, gradweight = ((jaxdnn.dnn_conv3d, jaxdnn.dnn_gradinput3d,
                                    jaxdnn.dnn_gradweight3d) if nd == 3 else
                                   (jaxdnn.dnn_conv, jaxdnn.dnn_gradinput, jaxdnn.dnn_gradweight))
    case = Case("conv", seed, dtype, describe(seed=seed, **cfg))
    taps = math.prod(cfg["kernel"])
    out_pixels = math.prod(out_shape) // (out_shape[0] * cfg["k"])
    geometry = (cfg["border"], cfg["stride"], cfg["dilation"], cfg["conv_mode"], cfg["groups"],
                fmt)
    case.passes = [
        Pass("forward", lambda a, b: (conv(a, b, **options),), (img, kerns),
             ((None, conv_oracle.conv(img64, kerns64, *geometry), kerns_shape[1] * taps),)),
        Pass("backward-data", lambda b, d: (gradinput(b, d, img_shape, **options),), (kerns, dy),
             ((None, conv_oracle.gradinput(kerns64, dy64, img_shape, *geometry),
               cfg["k"] // cfg["groups"] * taps),)),
        Pass("backward-filter", lambda a, d: (gradweight(a, d, kerns_shape, **options),),
             (img, dy), ((None, conv_oracle.gradweight(img64, dy64, kerns_shape, *geometry),
                          cfg["n"] * out_pixels),)),
    ]
    return case


# ---- pooling ------------------------------------------------------------------------------

def pool_case(seed: int) -> Case:
    rng = rng_for("pool", seed)
    nd = pick(rng, (2, 2, 3))
    ws = tuple(int(rng.integers(1, 4)) for _ in range(nd))
    stride = tuple(int(rng.integers(1, 4)) for _ in range(nd))
    pad = tuple(int(rng.integers(0, w)) for w in ws)
    spatial = tuple(max(1, w - 2 * p) + int(rng.integers(0, 5 if nd == 2 else 3))
                    for w, p in zip(ws, pad))
    mode = pick(rng, ("max", "average_inc_pad", "average_exc_pad", "sum"))
    channels_last, dtype = bool(rng.integers(2)), pick(rng, DTYPES)
    fmt = ("NHWC" if nd == 2 else "NDHWC") if channels_last else ("NCHW" if nd == 2 else "NCDHW")
    n, c = int(rng.integers(1, 4)), int(rng.integers(1, 5))
    shape = (n, *spatial, c) if channels_last else (n, c, *spatial)
    # distinct values: a max pool's gradient is ambiguous between equal maxima
    x64 = ps_oracle.distinct_values(rng, shape, fmt)
    x, x64 = cast(x64, dtype)
    if dtype in ("float16", "bfloat16") and mode == "max":
        x, x64 = cast(np.arange(x64.size).reshape(shape) % 61 - 30 + rng.random(shape) * 0.5,
                      dtype)  # distinct after rounding to a half type (within each window)
    case = Case("pool", seed, dtype, describe(seed=seed, ws=ws, stride=stride, pad=pad,
                                              mode=mode, fmt=fmt, shape=shape, dtype=dtype))
    pool = lambda t: jaxdnn.dnn_pool(t, ws, stride=stride, mode=mode, pad=pad, data_format=fmt)
    expected = ps_oracle.pool(x64, ws, stride, pad, mode, fmt)
    dy, dy64 = rounded(rng, expected.shape, dtype)
    window = math.prod(ws)
    case.passes = [
        Pass("forward", lambda t: (pool(t),), (x,), ((None, expected, window),)),
        Pass("backward", lambda t, d: (jax.vjp(pool, t)[1](d)[0],), (x, dy),
             ((None, ps_oracle.pool_grad(x64, dy64, ws, stride, pad, mode, fmt), window),)),
    ]
    return case


# ---- softmax ------------------------------------------------------------------------------

def softmax_case(seed: int) -> Case:
    rng = rng_for("softmax", seed)
    algo, mode = pick(rng, ("fast", "accurate", "log")), pick(rng, ("channel", "instance"))
    fmt, dtype = pick(rng, ("NCHW", "NHWC")), pick(rng, DTYPES)
    if rng.integers(4) == 0:
        shape = (int(rng.integers(1, 5)), int(rng.integers(1, 40)))
    else:
        shape = tuple(int(rng.integers(1, 7)) for _ in range(4))
    x, x64 = rounded(rng, shape, dtype, 3.0)
    dy, dy64 = rounded(rng, shape, dtype)
    case = Case("softmax", seed, dtype, describe(seed=seed, algo=algo, mode=mode, fmt=fmt,
                                                 shape=shape, dtype=dtype))
    fn = lambda t: jaxdnn.dnn_softmax(t, algo=algo, mode=mode, data_format=fmt)
    reduction = math.prod(shape[1:]) if mode == "instance" or len(shape) == 2 else (
        shape[1] if fmt == "NCHW" else shape[3])
    case.passes = [
        Pass("forward", lambda t: (fn(t),), (x,),
             ((None, ps_oracle.softmax(x64, algo, mode, fmt), reduction),)),
        Pass("backward", lambda t, d: (jax.vjp(fn, t)[1](d)[0],), (x, dy),
             ((None, ps_oracle.softmax_grad(x64, dy64, algo, mode, fmt), reduction),)),
    ]
    return case


# ---- batch normalization ------------------------------------------------------------------

def batch_norm_case(seed: int) -> Case:
    rng = rng_for("bn", seed)
    rank = pick(rng, (2, 4, 4, 5))
    mode = pick(rng, ("spatial", "per-activation"))
    fmt = pick(rng, ("NCHW", "NHWC")) if rank > 2 else "NCHW"
    fmt = {5: {"NCHW": "NCDHW", "NHWC": "NDHWC"}[fmt]}.get(rank, fmt) if rank == 5 else fmt
    dtype = pick(rng, DTYPES)
    shape = tuple(int(rng.integers(1, 5)) for _ in range(rank))
    shape = (max(shape[0], 2),) + shape[1:]  # a variance needs two samples at least
    pshape = bn_oracle.param_shape(shape, mode, fmt)
    epsilon = float(pick(rng, (1e-5, 1e-3, 0.1)))
    x, x64 = rounded(rng, shape, dtype, 2.0)
    gamma, gamma64 = rounded(rng, pshape, dtype)
    beta, beta64 = rounded(rng, pshape, dtype)
    dout, dout64 = rounded(rng, shape, dtype)
    case = Case("batch_norm", seed, dtype, describe(seed=seed, mode=mode, fmt=fmt, shape=shape,
                                                    dtype=dtype, epsilon=epsilon))
    fn = lambda x, g, b: jaxdnn.dnn_batch_normalization_train(x, g, b, mode=mode,
                                                            epsilon=epsilon, data_format=fmt)
    out64, mean64, invstd64, _ = bn_oracle.bn_train(x64, gamma64, beta64, mode, epsilon, fmt)
    grads64 = bn_oracle.bn_train_grad(x64, gamma64, dout64, mode, epsilon, fmt)
    # The gradient subtracts two means over the m samples from dout, scaled by invstd:
    # with few samples close together that cancellation costs more units than the sums.
    m = 64 * bn_oracle.count(shape, mode, fmt)
    # dx = invstd * gamma * (dout - mean(dout) - xhat * mean(dout * xhat)): with two samples
    # xhat is about +-1 and the bracket nearly cancels (exactly, without epsilon), so dx's
    # error scales with invstd * |gamma| * |dout|, which a tiny variance makes large.
    dx_terms = float(np.max(np.abs(invstd64 * gamma64)) * np.max(np.abs(dout64)))
    case.passes = [
        Pass("train", lambda x, g, b: tuple(fn(x, g, b)[:3]), (x, gamma, beta),
             tuple((name, e, m) for name, e in zip(("out", "mean", "invstd"),
                                                  (out64, mean64, invstd64)))),
        Pass("backward", lambda x, g, b, d: tuple(jax.vjp(lambda *a: fn(*a)[0], x, g, b)[1](d)),
             (x, gamma, beta, dout),
             (("dx", grads64[0], m, dx_terms),) + tuple(
                 (name, e, m) for name, e in zip(("dgamma", "dbeta"), grads64[1:]))),
    ]
    return case


# ---- spatial transformer ------------------------------------------------------------------

def spatial_transformer_case(seed: int) -> Case:
    rng = rng_for("stn", seed)
    dtype = pick(rng, ("float32", "float64"))  # the sampler takes these (half types: XLA)
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 7)),
             int(rng.integers(1, 7)))
    img, img64 = rounded(rng, shape, dtype)
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    theta, theta64 = cast(identity + 0.3 * rng.standard_normal((shape[0], 2, 3)), dtype)
    dout, dout64 = rounded(rng, shape, dtype)
    case = Case("spatial_transformer", seed, dtype, describe(seed=seed, shape=shape, dtype=dtype))
    fn = lambda i, t: jaxdnn.dnn_spatialtf(i, t)
    dimg64, dtheta64 = stn_oracle.spatialtf_grad(img64, theta64, dout64)
    pixels = shape[2] * shape[3]
    case.passes = [
        Pass("forward", lambda i, t: (fn(i, t),), (img, theta),
             ((None, stn_oracle.spatialtf(img64, theta64), 4),)),
        Pass("backward", lambda i, t, d: tuple(jax.vjp(fn, i, t)[1](d)), (img, theta, dout),
             (("dimg", dimg64, 4), ("dtheta", dtheta64, 4 * pixels * shape[1]))),
    ]
    return case


# ---- RNN ----------------------------------------------------------------------------------

def layers_f64(block, w64: np.ndarray, input_size, count: int) -> list:
    """Every layer's [W0, b0, W1, b1, ...] as RNNBlock.split_params gives them (matrices as
    x @ W), sliced from the float64 block `w64` by the block's public weight_layout in
    NumPy (split_params slices with jax: a compilation per shape, most of a case's time)."""
    gates = {"lstm": 4, "gru": 3}.get(block.rnn_mode, 1)
    layers = [[None] * (4 * gates) for _ in range(count)]
    for e in block.weight_layout(input_size):
        piece = w64[e.offset:e.offset + e.size].reshape(e.shape)
        layers[e.pseudo_layer][2 * e.lin_id + (e.kind == "bias")] = (
            piece.T if e.kind == "matrix" else piece)
    return layers


def rnn_case(seed: int) -> Case:
    rng = rng_for("rnn", seed)
    mode = pick(rng, ("rnn_relu", "rnn_tanh", "lstm", "gru"))
    layers, hidden = int(rng.integers(1, 3)), int(rng.integers(1, 6))
    bidirectional = bool(rng.integers(2))
    dtype = pick(rng, ("float16", "float32", "float64"))
    steps, batch, input_dim = int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 5))
    block = jaxdnn.RNNBlock(dtype, hidden, layers, mode,
                            direction_mode="bidirectional" if bidirectional else "unidirectional")
    count = layers * (2 if bidirectional else 1)
    w_size = block.get_param_size((batch, input_dim))
    w = jnp.asarray(0.4 * rng.standard_normal(w_size), dtype)
    oracle_layers = layers_f64(block, to_f64(w), (batch, input_dim), count)
    x, x64 = rounded(rng, (steps, batch, input_dim), dtype)
    hx, hx64 = rounded(rng, (count, batch, hidden), dtype, 0.5)
    cx, cx64 = rounded(rng, (count, batch, hidden), dtype, 0.5) if mode == "lstm" else (None, None)
    lengths = (None if rng.integers(2) else
               np.sort(rng.integers(1, steps + 1, batch))[::-1].astype(np.int32))
    case = Case("rnn", seed, dtype, describe(
        seed=seed, mode=mode, layers=layers, hidden=hidden, bidirectional=bidirectional,
        dtype=dtype, steps=steps, batch=batch,
        lengths=None if lengths is None else lengths.tolist()))
    y64, hy64, cy64 = rnn_oracle.rnn(oracle_layers, x64, hx64, cx64, lengths, mode=mode,
                                     bidirectional=bidirectional)
    seq = None if lengths is None else jnp.asarray(lengths)
    # the recurrence compounds each step's rounding: the reduction is every product a
    # result depends on
    reduction = steps * layers * (input_dim + hidden) * 4
    outputs = tuple((name, e, reduction) for name, e in zip(("y", "hy", "cy"), (y64, hy64, cy64)))
    if mode == "lstm":
        case.passes = [Pass("forward", lambda w, x, h, c: tuple(
            block.apply(w, x, h, c, seq_lengths=seq)), (w, x, hx, cx), outputs)]
    else:
        case.passes = [Pass("forward", lambda w, x, h: tuple(
            block.apply(w, x, h, seq_lengths=seq)), (w, x, hx), outputs[:2])]
    return case


CASES = {"conv": conv_case, "pool": pool_case, "softmax": softmax_case,
         "batch_norm": batch_norm_case, "spatial_transformer": spatial_transformer_case,
         "rnn": rnn_case}


def make_case(op: str, seed: int) -> Case:
    """The configuration `seed` of op family `op` (a key of CASES)."""
    return CASES[op](seed)


# ---- invalid configurations ---------------------------------------------------------------

def invalid_calls(rng):
    """(description, function, its array arguments as ShapeDtypeStructs): calls that must
    raise ValueError or TypeError at trace time."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    img, kerns, params = f32(2, 3, 6, 6), f32(4, 3, 3, 3), f32(1, 3, 1, 1)
    bad_int = pick(rng, (0, -1, -3))
    conv = lambda **kw: (lambda a, b: jaxdnn.dnn_conv(a, b, **kw))
    yield "conv stride", conv(subsample=(bad_int, 1)), (img, kerns)
    yield "conv dilation", conv(dilation=(1, bad_int)), (img, kerns)
    yield "conv groups", conv(num_groups=pick(rng, (0, 2, 4))), (img, kerns)
    yield "conv channels", conv(), (img, f32(4, int(rng.integers(4, 9)), 3, 3))
    yield "conv kernel larger than image", conv(), (img, f32(4, 3, 7 + int(rng.integers(3)), 3))
    yield "conv border", conv(border_mode=pick(rng, ("same!", -1))), (img, kerns)
    yield "conv int image", conv(), (jax.ShapeDtypeStruct((2, 3, 6, 6), jnp.int32), kerns)
    yield "conv rank", conv(), (f32(3, 6, 6), kerns)
    pool = lambda ws, **kw: (lambda a: jaxdnn.dnn_pool(a, ws, **kw))
    yield "pool window", pool((bad_int, 2)), (img,)
    yield "pool pad", pool((2, 2), pad=(2 + int(rng.integers(3)), 0)), (img,)
    yield "pool mode", pool((2, 2), mode=pick(rng, ("min", "avg", 1))), (img,)
    yield "pool window larger than image", pool((7 + int(rng.integers(3)), 2)), (img,)
    softmax = lambda **kw: (lambda a: jaxdnn.dnn_softmax(a, **kw))
    yield "softmax mode", softmax(mode=pick(rng, ("pixel", None))), (img,)
    yield "softmax algo", softmax(algo=pick(rng, ("exact", 3))), (img,)
    yield "softmax rank", softmax(), (f32(2, 3, 4),)
    bn = lambda **kw: (lambda x, g, b: jaxdnn.dnn_batch_normalization_train(x, g, b, **kw))
    yield ("bn epsilon", bn(mode="spatial", epsilon=pick(rng, (0.0, 1e-7, -1.0))),
           (img, params, params))
    yield ("bn parameter shape", bn(mode="spatial"),
           (img, f32(1, int(rng.integers(4, 8)), 1, 1), params))
    yield "stn theta shape", jaxdnn.dnn_spatialtf, (img, f32(2, 3, 3))
    yield "rnn hidden size", lambda: jaxdnn.RNNBlock("float32", bad_int, 1, "lstm"), ()
    yield "rnn mode", lambda: jaxdnn.RNNBlock("float32", 4, 1, pick(rng, ("LSTM2", "relu"))), ()


def invalid_call_error(fn, args) -> str | None:
    """None when tracing fn(*args) raises ValueError/TypeError naming the op; else what
    happened instead."""
    try:
        jax.eval_shape(fn, *args)
    except (ValueError, TypeError) as e:
        message = str(e)
        if any(op in message for op in ("dnn_", "RNNBlock")):
            return None
        return f"the error does not name the op: {message}"
    except Exception as e:  # noqa: BLE001 - any other type is the finding
        return f"{type(e).__name__} instead of ValueError/TypeError: {e}"
    return "no error"
