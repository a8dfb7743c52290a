"""Softmax and log-softmax: `dnn_softmax`, `dnn_log_softmax` (cudnnSoftmaxForward/Backward).

The primitives always see 4-D images (a 2-D (N, C) input is taken as (N, C, 1, 1)); their
gradient is a primitive of its own (`softmax_bwd`, cudnnSoftmaxBackward) that needs only
the output y as residual.
"""
from __future__ import annotations

import functools

import jax

from jaxdnn import _validate
from jaxdnn._compat import ShapedArray
from jaxdnn._primitive import choose_impl, define_primitive, fold_into_batch, reference_differentiable
from jaxdnn._sharding import Partitioning, layout_factors
from jaxdnn.layout import normalize_data_format
from jaxdnn.reference import softmax as reference

__all__ = ["dnn_softmax", "dnn_log_softmax", "softmax_fwd_p", "softmax_bwd_p"]

ALGOS = ("fast", "accurate", "log")
MODES = ("channel", "instance")


def _same_as_first(x, *rest, **params):
    return ShapedArray(x.shape, x.dtype)


def _partitioning(x, *rest, mode, layout, **params):
    """Every operand and the result are laid out alike; each image is normalized on its
    own: N splits."""
    factors = layout_factors(layout)
    return Partitioning((factors,) * (1 + len(rest)), (factors,), frozenset({"n"}))


softmax_fwd_p = define_primitive(
    "jaxdnn_softmax_fwd", abstract_eval=_same_as_first, reference=reference.softmax_forward,
    ffi_target="jaxdnn_softmax_fwd", batch_rule=fold_into_batch, partitioning=_partitioning)

softmax_bwd_p = define_primitive(
    "jaxdnn_softmax_bwd", abstract_eval=_same_as_first, reference=reference.softmax_backward,
    ffi_target="jaxdnn_softmax_bwd", batch_rule=fold_into_batch, partitioning=_partitioning)

_softmax_backward = reference_differentiable(softmax_bwd_p, reference.softmax_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _softmax(x, algo, mode, layout, impl):
    return softmax_fwd_p.bind(x, algo=algo, mode=mode, layout=layout, impl=impl)


def _softmax_fwd(x, algo, mode, layout, impl):
    y = _softmax(x, algo, mode, layout, impl)
    return y, y


def _softmax_bwd(algo, mode, layout, impl, y, dy):
    return (_softmax_backward(y, dy, algo=algo, mode=mode, layout=layout, impl=impl),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def dnn_softmax(x, algo: str = "accurate", mode: str = "channel", data_format: str = "NCHW"):
    """Softmax of a 4-D image batch (or of a 2-D (N, C) matrix, taken as (N, C, 1, 1)).

    algo: 'accurate' (subtract the maximum first), 'fast' (do not), or 'log' (log-softmax).
    mode: 'channel' normalizes over C at each (n, h, w); 'instance' over all of C, H, W of
    each image. data_format: 'NCHW' or 'NHWC' (for 2-D input, 'NCHW' means (N, C)).
    The output has the input's shape and dtype.
    """
    op = "dnn_softmax"
    _validate.check_choice(op, "algo", algo, ALGOS)
    _validate.check_choice(op, "mode", mode, MODES)
    _validate.check_rank(op, "x", x, (2, 4), " ((N, C) or an image batch)")
    _validate.check_floating(op, "x", x)
    layout = normalize_data_format(data_format, 4, op=op)
    if x.ndim == 2:  # (N, C) is the same whatever the layout: a batch of 1x1 images
        return dnn_softmax(x[:, :, None, None], algo, mode, "NCHW")[:, :, 0, 0]
    spatial = x.shape[2:] if layout == "NCHW" else x.shape[1:3]
    if spatial == (1, 1):
        # On 1x1 images both modes normalize over C; cuDNN's instance mode runs at XLA's
        # speed there while its channel mode is 1.7x slower forward and ~200x slower
        # backward (8192x4096 float32 on an H100, BENCHMARKS.md).
        mode = "instance"
    return _softmax(x, algo, mode, layout, choose_impl(op, _xla_is_faster(mode, layout, spatial),
                                                       shapes=[x.shape]))


def _xla_is_faster(mode: str, layout: str, spatial) -> bool:
    """Where dnn.enabled='auto' takes XLA, from measurements (H100, BENCHMARKS.md): cuDNN's
    softmax wins on channels-last images in channel mode (1.35x forward, 1.2x with the
    backward, N64 C64 56²) and ties on (N, C) rows; XLA wins on channels-first images in
    channel mode (1.4x) and by 6x on whole images in instance mode."""
    if spatial == (1, 1):
        return False
    return not (mode == "channel" and layout == "NHWC")


def dnn_log_softmax(x, mode: str = "channel", data_format: str = "NCHW"):
    """Log-softmax: `dnn_softmax(x, algo='log', ...)`."""
    return dnn_softmax(x, algo="log", mode=mode, data_format=data_format)
