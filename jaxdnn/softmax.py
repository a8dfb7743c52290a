"""Softmax and log-softmax: `dnn_softmax`, `dnn_log_softmax` (cudnnSoftmaxForward/Backward).

The primitives always see 4-D images (a 2-D (N, C) input is taken as (N, C, 1, 1)). Both
modes of AD work to any order: the forward's tangent is a primitive linear in the tangent
(`softmax_bwd`, cudnnSoftmaxBackward, whose Jacobian is symmetric; for log-softmax
`softmax_tangent`, on XLA), and reverse mode transposes it into `softmax_bwd`, which needs
only the output y as residual.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdnn import _validate
from jaxdnn._compat import ShapedArray, ad, zero_tangent_like
from jaxdnn._primitive import (choose_impl, define_linear_in_last, define_primitive,
                               fold_into_batch)
from jaxdnn._sharding import Partitioning, layout_factors
from jaxdnn.layout import normalize_data_format
from jaxdnn.reference import softmax as reference

__all__ = ["dnn_softmax", "dnn_log_softmax", "softmax_fwd_p", "softmax_bwd_p",
           "softmax_tangent_p"]

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
    batch_rule=fold_into_batch, partitioning=_partitioning)

softmax_bwd_p = define_primitive(
    "jaxdnn_softmax_bwd", abstract_eval=_same_as_first, reference=reference.softmax_backward,
    batch_rule=fold_into_batch, partitioning=_partitioning)

# The forward derivative of log-softmax, J t (on XLA whatever its impl: cuDNN has no such
# pass; impl is its transpose's); softmax's own is softmax_bwd_p, J being symmetric there.
softmax_tangent_p = define_primitive(
    "jaxdnn_softmax_tangent", abstract_eval=_same_as_first, reference=reference.softmax_tangent,
    ffi_target=None, batch_rule=fold_into_batch, partitioning=_partitioning)


# ---- differentiation: JVP rules on the primitives; reverse mode transposes them --------------
# softmax_fwd_p's tangent is J t, linear in t: softmax_bwd_p (J^T = J) or, for log-softmax,
# softmax_tangent_p. Reverse mode transposes that tangent into J^T ct, which is
# softmax_bwd_p, the cuDNN backward, in every algo. The passes' derivatives in y (second
# order) are their references' (XLA).

def _tangent(y, t, *, algo, mode, layout, impl):
    """J t."""
    if algo == "log":
        return softmax_tangent_p.bind(y, t, algo=algo, mode=mode, layout=layout, impl=impl)
    return softmax_bwd_p.bind(y, t, algo=algo, mode=mode, layout=layout, impl=impl)


def _cotangent(y, ct, *, algo, mode, layout, impl):
    """J^T ct: the cuDNN softmax backward."""
    return softmax_bwd_p.bind(y, ct, algo=algo, mode=mode, layout=layout, impl=impl)


def _fwd_jvp(primals, tangents, **params):
    (x,), (t,) = primals, tangents
    y = softmax_fwd_p.bind(x, **params)
    if type(t) is ad.Zero:
        return y, zero_tangent_like(y)
    return y, _tangent(y, t, **params)


ad.primitive_jvps[softmax_fwd_p] = _fwd_jvp
define_linear_in_last(softmax_bwd_p, _tangent, reference=reference.softmax_backward)
define_linear_in_last(softmax_tangent_p, _cotangent, reference=reference.softmax_tangent)


def dnn_softmax(x, algo: str = "accurate", mode: str = "channel", data_format: str = "NCHW"):
    """Softmax of a 4-D image batch (or of a 2-D (N, C) matrix, taken as (N, C, 1, 1)).

    algo: 'accurate' (subtract the maximum first), 'fast' (do not), or 'log' (log-softmax).
    mode: 'channel' normalizes over C at each (n, h, w); 'instance' over all of C, H, W of
    each image. data_format: 'NCHW' or 'NHWC' (for 2-D input, 'NCHW' means (N, C)).
    The output has the input's shape and dtype. Where the call takes XLA's path, float32
    and float64 arrays run `jax.nn.softmax` (`jax.nn.log_softmax`) itself.
    """
    op = "dnn_softmax"
    _validate.check_choice(op, "algo", algo, ALGOS)
    _validate.check_choice(op, "mode", mode, MODES)
    _validate.check_rank(op, "x", x, (2, 4), " ((N, C) or an image batch)")
    _validate.check_floating(op, "x", x)
    layout = normalize_data_format(data_format, 4, op=op)
    spatial = (1, 1) if x.ndim == 2 else x.shape[2:] if layout == "NCHW" else x.shape[1:3]
    if spatial == (1, 1):
        # On 1x1 images both modes normalize over C; cuDNN's instance mode runs at XLA's
        # speed there while its channel mode is far slower, backward most of all
        # (BENCHMARKS.md, softmax).
        mode = "instance"
    impl = choose_impl(op, _xla_is_faster(mode, layout, spatial), shapes=[x.shape])
    if impl == "xla" and x.dtype in _JAX_NN_DTYPES:
        return _jax_nn_softmax(x, algo, mode, layout)
    if x.ndim == 2:  # (N, C) is the same whatever the layout: a batch of 1x1 images
        return softmax_fwd_p.bind(x[:, :, None, None], algo=algo, mode=mode, layout="NCHW",
                                  impl=impl)[:, :, 0, 0]
    return softmax_fwd_p.bind(x, algo=algo, mode=mode, layout=layout, impl=impl)


# The dtypes whose XLA path is jax.nn.softmax itself rather than the primitives' reference.
# Both compute in the input's dtype there, but XLA compiles jax.nn's formulation (the
# backward from exp(x - max) and its sum, not from the output) into faster float32
# programs, forward+backward inside one program (BENCHMARKS.md, "Softmax and batch norm
# where models use them"). In 16-bit dtypes the primitives' float32 arithmetic was as fast
# or faster: those stay.
_JAX_NN_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


def _jax_nn_softmax(x, algo: str, mode: str, layout: str):
    """jax.nn's softmax (log_softmax for algo 'log') over the axes `mode` normalizes."""
    axes = (1,) if x.ndim == 2 else reference.reduction_axes(mode, layout, x.ndim)
    return (jax.nn.log_softmax if algo == "log" else jax.nn.softmax)(x, axis=axes)


def _xla_is_faster(mode: str, layout: str, spatial) -> bool:
    """Where dnn.enabled='auto' takes XLA: everywhere, from measurements (BENCHMARKS.md,
    "Softmax and batch norm where models use them"; benchmarks/in_model.py).

    Inside a jitted program XLA fuses its softmax with the neighbouring ops (the scaling
    and masking before it, the matrix product after it, their gradients), which a cuDNN
    call cannot join: on (N, C) rows, the shape attention scores and classifier heads reach
    it as (jaxdnn.nn.softmax), cuDNN ran slower than XLA per call and further behind
    inside a program. No measurement shows cuDNN's softmax ahead inside a program: the one
    per-call win, channel mode on channels-last images with the backward (BENCHMARKS.md,
    "Softmax and pooling, per call"), came with a slower forward, and per-call margins
    shrink in a program.
    So 'auto' keeps XLA until an in-program measurement (in_model.py's "jaxdnn, cuDNN
    forced" column) shows cuDNN ahead for a (mode, layout); dnn.enabled=True runs cuDNN.
    """
    del mode, layout, spatial  # one answer for every case measured so far
    return True


def dnn_log_softmax(x, mode: str = "channel", data_format: str = "NCHW"):
    """Log-softmax: `dnn_softmax(x, algo='log', ...)`."""
    return dnn_softmax(x, algo="log", mode=mode, data_format=data_format)
