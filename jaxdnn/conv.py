"""Convolution: `dnn_conv`, `dnn_conv3d`, `dnn_gradinput`, `dnn_gradweight` and their 3-D
forms, with Theano's parameters (border_mode, subsample, dilation, conv_mode, num_groups,
precision, algo) and a `data_format`.

Three primitives — forward, backward-data and backward-filter — each bilinear in its two
operands, with JVP and transpose rules whose transposes are the other two (as
`lax.conv_general_dilated` does it), so `jax.grad`, grad of grad, `jax.jvp`/`jax.jacfwd`
and `jax.linear_transpose` all work, to any order, and `dnn_gradinput`/`dnn_gradweight`
are differentiable themselves.

On CUDA the passes run through cuDNN's frontend graph API (cuda/conv.cc: conv_fprop,
conv_dgrad, conv_wgrad), each with a trailing u8 workspace result sized here by
`_workspace_bytes` (so tracing needs no GPU); cuDNN considers only plans that fit it. Where cuDNN
has no engine for the data type / compute type pair (float32 data computed in float64,
say) the call takes the XLA path (jaxdnn/reference/conv.py), as it does elsewhere.
Channels-first images (but for 1x1 kernels) reach cuDNN channels-last, transposed around
the call as XLA's own layout assignment does (CHANNELS_LAST_DTYPES says why); the backward
passes of a float32 image of few channels keep its layout (FEW_CHANNELS says why). The input
gradient of a stride-1 depthwise convolution runs as a forward convolution
(_bwd_data_as_forward says why).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdnn import _validate, config
from jaxdnn._compat import ShapedArray, ad, batching
from jaxdnn._batching import merge_into, split_from
from jaxdnn._primitive import choose_impl, define_primitive
from jaxdnn._sharding import Partitioning, layout_factors
from jaxdnn.layout import CHANNELS_LAST, channel_axis, is_channels_last, normalize_data_format
from jaxdnn.reference import conv as reference
from jaxdnn.reference.dtypes import compute_dtype

__all__ = ["dnn_conv", "dnn_conv3d", "dnn_gradinput", "dnn_gradweight", "dnn_gradinput3d",
           "dnn_gradweight3d", "conv_fwd_p", "conv_bwd_data_p", "conv_bwd_filter_p"]

FFI_TARGETS = ("jaxdnn_conv_fwd", "jaxdnn_conv_bwd_data", "jaxdnn_conv_bwd_filter")
# Workspace granted to a pass whose algo names no size (Theano's 'small', the heuristic and
# timed choices): enough for cuDNN's implicit-GEMM engines on large layers, or twice the
# largest operand, within dnn.conv.workspace_limit. 'large', the FFT algorithms and the
# timed search get the whole limit (the timed search so that no engine is left out for
# lack of workspace: it is the choice of users who want the fastest plan).
SMALL_WORKSPACE = 64 << 20
WHOLE_LIMIT_ALGOS = ("large", "fft", "fft_tiling", "time_once", "time_on_shape_change")
CONV_MODES = ("conv", "cross")
BORDER_MODES = ("valid", "full", "half")


# ---- primitives ------------------------------------------------------------------------

def _fwd_abstract(img, kerns, **params):
    return ShapedArray(reference.output_shape(img.shape, kerns.shape, **params), img.dtype)


def _bwd_data_abstract(kerns, topgrad, *, img_shape, **params):
    return ShapedArray(tuple(img_shape), topgrad.dtype)


def _bwd_filter_abstract(img, topgrad, *, kerns_shape, **params):
    return ShapedArray(tuple(kerns_shape), img.dtype)


def _channels_to_groups(x, layout: str):
    """(B, N, ..C..) -> (N, ..B*C..): the vmapped axis joins the channels, B-major, so that
    with B times the groups each vmapped instance is a block of groups of its own."""
    channel = channel_axis(layout, x.ndim - 1) + 1
    x = jnp.moveaxis(x, 0, channel - 1)  # B just before C
    return x.reshape(x.shape[:channel - 1] + (x.shape[channel - 1] * x.shape[channel],) + x.shape[channel + 1:])


def _channels_from_groups(y, size: int, layout: str):
    """The inverse of _channels_to_groups: (N, ..B*C..) -> (B, N, ..C..)."""
    channel = channel_axis(layout, y.ndim)
    y = y.reshape(y.shape[:channel] + (size, y.shape[channel] // size) + y.shape[channel + 1:])
    return jnp.moveaxis(y, channel, 0)


def _with_channels(shape, channels: int, layout: str):
    shape = list(shape)
    shape[channel_axis(layout, len(shape))] = channels
    return tuple(shape)


def _fold_into_groups(prim, args, dims, *, groups, layout, **params):
    """Batching that folds the vmapped axis into feature groups (as lax.conv's batching
    does): B instances of a g-group convolution are one convolution of B*g groups over
    B times the channels. Exact for every pass; unbatched operands are broadcast."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    front = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
    params = dict(params, groups=groups * size, layout=layout)
    if prim is conv_fwd_p:
        img, kerns = front
        out = prim.bind(_channels_to_groups(img, layout),
                        kerns.reshape((-1,) + kerns.shape[2:]), **params)
        return _channels_from_groups(out, size, layout), 0
    if prim is conv_bwd_data_p:
        kerns, topgrad = front
        img_shape = params.pop("img_shape")
        channels = img_shape[channel_axis(layout, len(img_shape))]
        out = prim.bind(kerns.reshape((-1,) + kerns.shape[2:]), _channels_to_groups(topgrad, layout),
                        img_shape=_with_channels(img_shape, size * channels, layout), **params)
        return _channels_from_groups(out, size, layout), 0
    img, topgrad = front
    kerns_shape = params.pop("kerns_shape")
    out = prim.bind(_channels_to_groups(img, layout), _channels_to_groups(topgrad, layout),
                    kerns_shape=(size * kerns_shape[0],) + tuple(kerns_shape[1:]), **params)
    return out.reshape((size, kerns_shape[0]) + out.shape[1:]), 0


def _fold_operand_into_n(prim, args, dims, operand, shape_param=None, **params):
    """Batching where only `operand` (an image-like array, N first) is vmapped: merge the
    vmapped axis into N, run once, split it again."""
    size = args[operand].shape[dims[operand]]
    args = list(args)
    args[operand] = merge_into(args[operand], dims[operand], size, 0)
    if shape_param is not None:
        shape = params[shape_param]
        params[shape_param] = (size * shape[0],) + tuple(shape[1:])
    return split_from(prim.bind(*args, **params), size, 0)


def _batch_fwd(prim, args, dims, **params):
    if dims[1] is None:  # kernels shared: the vmapped images join the batch
        return _fold_operand_into_n(prim, args, dims, 0, **params)
    return _fold_into_groups(prim, args, dims, **params)


def _batch_bwd_data(prim, args, dims, **params):
    if dims[0] is None:  # kernels shared: the vmapped topgrads join the batch
        return _fold_operand_into_n(prim, args, dims, 1, shape_param="img_shape", **params)
    return _fold_into_groups(prim, args, dims, **params)


def _attributes(pass_index: int):
    """The FFI attributes of one pass: its own algo name, padding split in two arrays."""
    def attributes(*, padding, strides, dilation, flip, groups, layout, compute_dtype, algos,
                   deterministic, allow_tf32, workspace_limit, **shapes):
        return dict(pre_padding=np.asarray([lo for lo, _ in padding], np.int64),
                    post_padding=np.asarray([hi for _, hi in padding], np.int64),
                    strides=np.asarray(strides, np.int64), dilation=np.asarray(dilation, np.int64),
                    flip=np.int64(flip), layout=layout, compute_dtype=compute_dtype,
                    algo=algos[pass_index], deterministic=np.int64(deterministic),
                    allow_tf32=np.int64(allow_tf32))
    return attributes


def _workspace_bytes(pass_index: int):
    def workspace_bytes(first, second, *, algos, workspace_limit, img_shape=None,
                        kerns_shape=None, **params):
        if algos[pass_index] in WHOLE_LIMIT_ALGOS:
            return workspace_limit
        itemsize = np.dtype(first.dtype).itemsize
        largest = max(first.size, second.size, int(np.prod(img_shape or kerns_shape or (0,))))
        return min(workspace_limit, max(SMALL_WORKSPACE, 2 * largest * itemsize))
    return workspace_bytes


def _factors(groups: int, layout: str) -> tuple[str, str, str, frozenset]:
    """(image, kernels, output) factor strings and the factors that may stay sharded.

    N always splits. With one group the output channels K split too (each device holds
    some kernels: model parallelism), and so do the input channels C, which every output
    sums over (its partial sums are psummed). With groups, a channel split would have to
    fall on group boundaries: only N splits."""
    channel = "c" if groups == 1 else "cg"  # the kernels' C/groups differs from C
    image = layout_factors(layout)
    kernels = layout_factors(layout, batch="k", channel=channel, spatial_suffix="k")
    output = layout_factors(layout, channel="k", spatial_suffix="o")
    shardable = frozenset({"n", "k", "c"} if groups == 1 else {"n"})
    return image, kernels, output, shardable


def _fwd_partitioning(img, kerns, *, groups, layout, **params):
    image, kernels, output, shardable = _factors(groups, layout)
    return Partitioning((image, kernels), (output,), shardable)


def _bwd_data_partitioning(kerns, topgrad, *, groups, layout, **params):
    image, kernels, output, shardable = _factors(groups, layout)
    return Partitioning((kernels, output), (image,), shardable, shape_params={"img_shape": image})


def _bwd_filter_partitioning(img, topgrad, *, groups, layout, **params):
    image, kernels, output, shardable = _factors(groups, layout)
    return Partitioning((image, output), (kernels,), shardable,
                        shape_params={"kerns_shape": kernels})


conv_fwd_p = define_primitive(
    "jaxdnn_conv_fwd", abstract_eval=_fwd_abstract, reference=reference.conv_forward,
    attributes=_attributes(0), workspace_bytes=_workspace_bytes(0),
    batch_rule=_batch_fwd, partitioning=_fwd_partitioning)
conv_bwd_data_p = define_primitive(
    "jaxdnn_conv_bwd_data", abstract_eval=_bwd_data_abstract,
    reference=reference.conv_backward_data, attributes=_attributes(1),
    workspace_bytes=_workspace_bytes(1), batch_rule=_batch_bwd_data,
    partitioning=_bwd_data_partitioning)
# The kernel gradient sums over N, so vmapped images cannot join the batch: every
# batched case folds into groups.
conv_bwd_filter_p = define_primitive(
    "jaxdnn_conv_bwd_filter", abstract_eval=_bwd_filter_abstract,
    reference=reference.conv_backward_filter, attributes=_attributes(2),
    workspace_bytes=_workspace_bytes(2), batch_rule=_fold_into_groups,
    partitioning=_bwd_filter_partitioning)


def _bwd_data_as_forward(kerns_shape, img_shape, params: dict) -> dict | None:
    """The parameters of a forward convolution of the output gradient that computes the
    backward-data pass exactly, where that runs faster; else None.

    For a stride-1 depthwise convolution (one kernel per channel: groups == channels ==
    kernels) the input gradient is the forward convolution of the output gradient with
    each channel's kernel flipped (the other conv_mode: cuDNN flips it, no copy is made)
    and padded by dilated extent - 1 - padding on each side. cuDNN's depthwise
    backward-data kernel took about twice its forward kernel's time (BENCHMARKS.md,
    depthwise convolutions; benchmarks/kernel_times.py), and XLA keeps such gradients as
    forward convolutions too. Padding wider than the dilated extent - 1 would need a
    negative padding: those calls keep the backward-data pass."""
    layout = params["layout"]
    channels = img_shape[channel_axis(layout, len(img_shape))]
    per_group = kerns_shape[-1] if is_channels_last(layout) else kerns_shape[1]
    spatial = kerns_shape[1:-1] if is_channels_last(layout) else kerns_shape[2:]
    if not (per_group == 1 and params["groups"] == channels == kerns_shape[0]
            and all(s == 1 for s in params["strides"])):
        return None
    extents = [(k - 1) * d + 1 for k, d in zip(spatial, params["dilation"])]
    padding = tuple((e - 1 - lo, e - 1 - hi) for e, (lo, hi) in zip(extents, params["padding"]))
    if any(p < 0 for pair in padding for p in pair):
        return None
    backward_data_algo = params["algos"][1]  # the pass it computes chooses its algorithm
    return dict(params, padding=padding, flip=not params["flip"],
                algos=(backward_data_algo,) + tuple(params["algos"][1:]))


def _bind_bwd_data(kerns, topgrad, *, img_shape, **params):
    """The backward-data pass (the input gradient, the transposed convolution): the
    conv_bwd_data_p primitive, or its forward equivalent (_bwd_data_as_forward)."""
    as_forward = _bwd_data_as_forward(tuple(jnp.shape(kerns)), tuple(img_shape), params)
    if as_forward is not None:
        return conv_fwd_p.bind(topgrad, kerns, **as_forward)
    return conv_bwd_data_p.bind(kerns, topgrad, img_shape=tuple(img_shape), **params)


# Bilinear AD: each pass's transposes are the other two passes.
def _fwd_transpose_img(ct, img, kerns, **params):
    own = _backward_in_image_layout(params)
    if own is not None:  # a routed forward's backward in the image's own layout
        n, *spatial, c = img.aval.shape
        dimg = _bind_bwd_data(_kernels_from(kerns, params["layout"]), _to_channels_first(ct),
                              img_shape=(n, c, *spatial), **own)
        return _to_channels_last(dimg)
    return _bind_bwd_data(kerns, ct, img_shape=tuple(img.aval.shape), **params)


def _fwd_transpose_kerns(ct, img, kerns, **params):
    own = _backward_in_image_layout(params)
    if own is not None:
        k, *spatial, c = kerns.aval.shape
        dkerns = conv_bwd_filter_p.bind(_to_channels_first(img), _to_channels_first(ct),
                                        kerns_shape=(k, c, *spatial), **own)
        return _kernels_for(dkerns, params["layout"])
    return conv_bwd_filter_p.bind(img, ct, kerns_shape=tuple(kerns.aval.shape), **params)


def _data_transpose_kerns(ct, kerns, topgrad, *, img_shape, **params):
    return conv_bwd_filter_p.bind(ct, topgrad, kerns_shape=tuple(kerns.aval.shape), **params)


def _data_transpose_topgrad(ct, kerns, topgrad, *, img_shape, **params):
    return conv_fwd_p.bind(ct, kerns, **params)


def _filter_transpose_img(ct, img, topgrad, *, kerns_shape, **params):
    return _bind_bwd_data(ct, topgrad, img_shape=tuple(img.aval.shape), **params)


def _filter_transpose_topgrad(ct, img, topgrad, *, kerns_shape, **params):
    return conv_fwd_p.bind(img, ct, **params)


ad.defbilinear(conv_fwd_p, _fwd_transpose_img, _fwd_transpose_kerns)
ad.defbilinear(conv_bwd_data_p, _data_transpose_kerns, _data_transpose_topgrad)
ad.defbilinear(conv_bwd_filter_p, _filter_transpose_img, _filter_transpose_topgrad)


# ---- argument handling -------------------------------------------------------------------

def _per_axis(op: str, arg: str, value, nd: int) -> tuple[int, ...]:
    """An int or one int per spatial axis; the all-ones default of another rank (the
    (1, 1) of Theano's 2-D signature given to a 1-D or 3-D convolution) means ones."""
    if not isinstance(value, (int, np.integer)) and value is not None:
        try:
            items = tuple(value)
        except TypeError:
            items = None
        if items is not None and len(items) != nd and all(v == 1 for v in items):
            value = 1
    values = _validate.int_tuple(op, arg, value, nd)
    if any(v <= 0 for v in values):
        raise ValueError(f"{op}: {arg}={value!r} must be positive")
    return values


def _padding(op: str, border_mode, kernel_spatial, dilation) -> tuple[tuple[int, int], ...]:
    nd = len(kernel_spatial)
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, dilation)]
    if isinstance(border_mode, str):
        _validate.check_choice(op, "border_mode", border_mode, BORDER_MODES)
        pads = {"valid": [0] * nd, "full": [k - 1 for k in dilated],
                "half": [k // 2 for k in dilated]}[border_mode]
    else:
        try:
            pads = _validate.int_tuple(op, "border_mode", border_mode, nd)
        except (TypeError, ValueError):
            raise ValueError(
                f"{op}: border_mode={border_mode!r} is not 'valid', 'full', 'half', an int or "
                f"{nd} ints") from None
        if any(p < 0 for p in pads):
            raise ValueError(f"{op}: border_mode={border_mode!r}: padding must be >= 0")
    return tuple((p, p) for p in pads)


def _compute_dtype(op: str, precision, dtype) -> str:
    precision = config.read("dnn.conv.precision") if precision is None else precision
    _validate.check_choice(op, "precision", precision, config.PRECISIONS)
    if precision == "as_input_f32":
        return compute_dtype(dtype).name
    if precision == "as_input":
        return jnp.dtype(dtype).name
    return precision


def _cudnn_computes(dtype, compute_dtype: str) -> bool:
    """Whether jaxdnn sends `dtype` data computed in `compute_dtype` to cuDNN: the data's own
    type, or float32 for half-precision data. Not float64: with cuDNN 9.19 the frontend's
    float64 forward and backward-data plans wrote garbage (every element wrong,
    in tests/test_conv.py), so float64 convolutions take XLA's path, which reaches cuDNN's
    legacy float64 kernels itself."""
    data = jnp.dtype(dtype).name
    if data == "float64":
        return False
    return compute_dtype == data or (data in ("float16", "bfloat16") and compute_dtype == "float32")


def _algorithms(op: str, pass_: str, algo, workmem) -> tuple[str, str, str]:
    """(forward, backward-data, backward-filter) algorithm names: the flags', with this
    call's `algo` (or its deprecated alias `workmem`) for the pass the call computes."""
    if algo is not None and workmem is not None:
        raise ValueError(f"{op}: pass algo or its deprecated alias workmem, not both")
    algo = workmem if algo is None else algo
    algos = {"fwd": config.read("dnn.conv.algo_fwd"),
             "bwd_data": config.read("dnn.conv.algo_bwd_data"),
             "bwd_filter": config.read("dnn.conv.algo_bwd_filter")}
    if algo is not None:
        choices = {"fwd": config.ALGO_FWD, "bwd_data": config.ALGO_BWD_DATA,
                   "bwd_filter": config.ALGO_BWD_FILTER}[pass_]
        _validate.check_choice(op, "algo", algo, choices)
        algos[pass_] = algo
    return (algos["fwd"], algos["bwd_data"], algos["bwd_filter"])


def _conv_params(op, pass_, img_shape, kerns_shape, dtype, *, border_mode, subsample, dilation,
                 conv_mode, num_groups, data_format, precision, algo, workmem, ranks,
                 img_arg="img", kerns_arg="kerns"):
    """Check every argument against the shapes (at trace time, naming the argument: the
    image and kernels are `img_arg` and `kerns_arg`) and return the primitives' parameters
    and the output shape."""
    rank = len(img_shape)
    if rank not in ranks:
        raise ValueError(f"{op}: {img_arg} must be {' or '.join(map(str, ranks))}-D; got shape "
                         f"{tuple(img_shape)}")
    if len(kerns_shape) != rank:
        raise ValueError(f"{op}: {kerns_arg} must be {rank}-D like {img_arg}, (K, C/num_groups, "
                         f"spatial...); got shape {tuple(kerns_shape)}")
    nd = rank - 2
    layout = normalize_data_format(data_format, rank, op=op)
    strides = _per_axis(op, "subsample", subsample, nd)
    dilation = _per_axis(op, "dilation", dilation, nd)
    _validate.check_choice(op, "conv_mode", conv_mode, CONV_MODES)
    if not _validate.is_int(num_groups) or num_groups < 1:
        raise ValueError(f"{op}: num_groups={num_groups!r} must be a positive int")
    channels = img_shape[channel_axis(layout, rank)]
    out_channels, kernel_channels = kerns_shape[0], kerns_shape[1]
    if channels % num_groups or out_channels % num_groups:
        raise ValueError(f"{op}: num_groups={num_groups} must divide the {channels} channels of "
                         f"{img_arg} and the {out_channels} output channels of {kerns_arg}")
    if kernel_channels * num_groups != channels:
        raise ValueError(f"{op}: {kerns_arg} of shape {tuple(kerns_shape)} take {kernel_channels} "
                         f"input channels per group, but {img_arg} has {channels} channels in "
                         f"num_groups={num_groups} groups ({channels // num_groups} each)")
    padding = _padding(op, border_mode, kerns_shape[2:], dilation)
    params = dict(padding=padding, strides=strides, dilation=dilation, flip=conv_mode == "conv",
                  groups=int(num_groups), layout=layout,
                  compute_dtype=_compute_dtype(op, precision, dtype),
                  algos=_algorithms(op, pass_, algo, workmem),
                  deterministic=bool(config.read("dnn.deterministic")),
                  allow_tf32=config.allows_tf32(),
                  workspace_limit=int(config.read("dnn.conv.workspace_limit")))
    out_shape = reference.output_shape(tuple(img_shape),
                                       reference.kernel_shape_for(kerns_shape, layout), **params)
    spatial = out_shape[1:-1] if is_channels_last(layout) else out_shape[2:]
    if any(n < 1 for n in spatial):
        raise ValueError(f"{op}: {kerns_arg} of spatial shape {tuple(kerns_shape[2:])} (dilation "
                         f"{dilation}) do not fit {img_arg} of shape {tuple(img_shape)} padded by "
                         f"{[p for p, _ in padding]}")
    # 'auto' takes cuDNN for every layout: every measured forward+backward was at least
    # XLA's speed (BENCHMARKS.md, convolutions; the channels-last forward is the closest).
    impl = choose_impl(op, ffi_targets=FFI_TARGETS,
                       shapes=[tuple(img_shape), tuple(kerns_shape), out_shape])
    params["impl"] = impl if _cudnn_computes(dtype, params["compute_dtype"]) else "xla"
    return params, out_shape


# Channels-first convolutions of these data types run on cuDNN as channels-last ones: the
# image (and output gradient) is transposed to NHWC in front of the call and the result
# back, as XLA's own layout assignment does for its convolutions, and the kernels reach
# cuDNN as (K, spatial..., C). Measured inside one program (BENCHMARKS.md, convolutions;
# benchmarks/in_program.py times both routes): cuDNN's channels-first engines ran slower
# than XLA's (which transposes too), through the transposes none was slower than XLA.
# Pointwise (1x1) kernels keep the image's layout: channels-first they are one matrix
# product per image, and the transposes cost them more than they save.
CHANNELS_LAST_DTYPES = frozenset({"float16", "bfloat16", "float32"})


def _pointwise(kerns_shape) -> bool:
    """1x1 kernels: they keep the image's layout (see CHANNELS_LAST_DTYPES)."""
    return all(k == 1 for k in kerns_shape[2:])


# Float32 images of at most this many channels (RGB or grey: a network's stem) take
# the channels-last route in the forward pass only; the backward passes of that forward
# run in the image's own layout. Measured inside one program on the stem 7x7/2 3->64
# (BENCHMARKS.md, "Convolutions inside one program"): its forward ran faster through the
# transposes, its forward+backward faster in the image's layout, while bfloat16 ran both
# faster through the transposes. The split itself: BENCHMARKS.md, "The float32 stem's
# passes on each layout route".
FEW_CHANNELS = 3


def _channels_last_params(params: dict, dtype, kerns_shape, forward: bool = False
                          ) -> dict | None:
    """The parameters of the channels-last call that serves a channels-first one on the
    cuDNN path, or None where the call keeps its layout. For a `forward` pass whose
    backward passes keep the image's layout (FEW_CHANNELS), they carry that layout as
    `backward_layout`, which the transpose rules read."""
    layout, route = params["layout"], config.read("dnn.conv.layout_route")
    if params["impl"] != "cudnn" or is_channels_last(layout) or _pointwise(kerns_shape):
        return None
    if route == "own" or (route == "auto" and jnp.dtype(dtype).name not in CHANNELS_LAST_DTYPES):
        return None
    routed = dict(params, layout=CHANNELS_LAST[len(layout)])
    image_channels = kerns_shape[1] * params["groups"]
    if (forward and route == "auto" and jnp.dtype(dtype) == jnp.float32
            and image_channels <= FEW_CHANNELS):
        routed["backward_layout"] = layout
    return routed


def _backward_in_image_layout(params: dict) -> dict | None:
    """The parameters of a routed forward's backward passes where they keep the image's
    own layout (`_channels_last_params`), else None. Their operands are the forward's,
    transposed back: XLA folds each transpose pair into none."""
    layout = params.get("backward_layout")
    if layout is None:
        return None
    own = dict(params, layout=layout)
    del own["backward_layout"]
    return own


def _to_channels_last(x):
    return jnp.moveaxis(x, 1, -1)


def _to_channels_first(x):
    return jnp.moveaxis(x, -1, 1)


def _kernels_for(kerns, layout: str):
    """The primitives take kernels in the image's layout: channels-last images get
    (K, spatial..., C/groups) kernels, the order cuDNN's fastest NHWC engines read (given
    (K, C, spatial...) beside NHWC images cuDNN's forward+backward measured slower than
    XLA's, with them at least as fast: BENCHMARKS-history.md)."""
    return jnp.moveaxis(kerns, 1, -1) if is_channels_last(layout) else kerns


def _kernels_from(kerns, layout: str):
    return jnp.moveaxis(kerns, -1, 1) if is_channels_last(layout) else kerns


def _check_pair(op: str, first: str, a, second: str, b) -> None:
    _validate.check_floating(op, first, a)
    _validate.check_floating(op, second, b)
    if jnp.result_type(a) != jnp.result_type(b):
        raise TypeError(f"{op}: {first} and {second} must have one dtype; got "
                        f"{jnp.result_type(a)} and {jnp.result_type(b)}")


def _shape_arg(op: str, arg: str, shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{op}: {arg} must be a sequence of ints; got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{op}: {arg}={shape} has a negative size")
    return shape


# ---- public functions ------------------------------------------------------------------

def dnn_conv(img, kerns, border_mode="valid", subsample=(1, 1), dilation=(1, 1),
             conv_mode="conv", direction_hint=None, workmem=None, algo=None, precision=None,
             num_groups=1, data_format="NCHW"):
    """Convolve img (N, C, H, W) with kerns (K, C/num_groups, R, S).

    border_mode: 'valid', 'full', 'half', an int or one int per axis (padding);
    subsample: strides; dilation: kernel dilation; conv_mode: 'conv' flips the kernels
    (true convolution), 'cross' does not. precision: the compute type ('as_input_f32',
    'as_input', 'float16', 'float32', 'float64'; default the dnn.conv.precision flag).
    algo (or the deprecated workmem): the forward algorithm of this call (default the
    dnn.conv.algo_fwd flag). direction_hint is accepted for Theano compatibility and
    ignored. data_format 'NHWC' takes channels-last images; kernels keep their layout.
    3-D tensors (N, C, L) are 1-D convolutions ('NCW' / 'NWC').
    """
    return _convolve("dnn_conv", (3, 4), **locals())


def dnn_conv3d(img, kerns, border_mode="valid", subsample=(1, 1, 1), dilation=(1, 1, 1),
               conv_mode="conv", direction_hint=None, workmem=None, algo=None, precision=None,
               num_groups=1, data_format="NCDHW"):
    """`dnn_conv` in 3-D: img (N, C, D, H, W) (or 'NDHWC'), kerns (K, C/num_groups, T, R, S)."""
    return _convolve("dnn_conv3d", (5,), **locals())


# The bodies of the public functions: each 2-D and 3-D pair passes its arguments
# (`**locals()`, its parameters by name), its name for errors and the image ranks it takes.
def _convolve(op, ranks, *, img, kerns, border_mode, subsample, dilation, conv_mode,
              direction_hint, workmem, algo, precision, num_groups, data_format):
    del direction_hint  # accepted for Theano's signature, ignored
    _check_pair(op, "img", img, "kerns", kerns)
    params, _ = _conv_params(
        op, "fwd", jnp.shape(img), jnp.shape(kerns), jnp.result_type(img),
        border_mode=border_mode, subsample=subsample, dilation=dilation, conv_mode=conv_mode,
        num_groups=num_groups, data_format=data_format, precision=precision, algo=algo,
        workmem=workmem, ranks=ranks)
    routed = _channels_last_params(params, jnp.result_type(img), jnp.shape(kerns),
                                   forward=True)
    if routed is not None:
        out = conv_fwd_p.bind(_to_channels_last(img), _kernels_for(kerns, routed["layout"]),
                              **routed)
        return _to_channels_first(out)
    return conv_fwd_p.bind(img, _kernels_for(kerns, params["layout"]), **params)


def dnn_gradinput(kerns, topgrad, img_shp, border_mode="valid", subsample=(1, 1),
                  dilation=(1, 1), conv_mode="conv", precision=None, algo=None, num_groups=1,
                  data_format="NCHW", workmem=None):
    """The gradient of `dnn_conv` with respect to an image of shape img_shp (in the
    image's own layout) for the output gradient topgrad: the transposed convolution."""
    return _gradinput("dnn_gradinput", (3, 4), **locals())


def dnn_gradinput3d(kerns, topgrad, img_shp, border_mode="valid", subsample=(1, 1, 1),
                    dilation=(1, 1, 1), conv_mode="conv", precision=None, algo=None,
                    num_groups=1, data_format="NCDHW", workmem=None):
    """`dnn_gradinput` in 3-D."""
    return _gradinput("dnn_gradinput3d", (5,), **locals())


def _gradinput(op, ranks, *, kerns, topgrad, img_shp, border_mode, subsample, dilation,
               conv_mode, precision, algo, num_groups, data_format, workmem):
    _check_pair(op, "kerns", kerns, "topgrad", topgrad)
    img_shape = _shape_arg(op, "img_shp", img_shp)
    params, out_shape = _conv_params(
        op, "bwd_data", img_shape, jnp.shape(kerns), jnp.result_type(kerns),
        border_mode=border_mode, subsample=subsample, dilation=dilation, conv_mode=conv_mode,
        num_groups=num_groups, data_format=data_format, precision=precision, algo=algo,
        workmem=workmem, ranks=ranks, img_arg="img_shp")
    if tuple(jnp.shape(topgrad)) != out_shape:
        raise ValueError(f"{op}: topgrad has shape {tuple(jnp.shape(topgrad))}, but the "
                         f"convolution of an image of shape img_shp={img_shape} gives {out_shape}")
    routed = _channels_last_params(params, jnp.result_type(kerns), jnp.shape(kerns))
    if routed is not None:
        last_shape = (img_shape[0], *img_shape[2:], img_shape[1])
        dimg = _bind_bwd_data(_kernels_for(kerns, routed["layout"]), _to_channels_last(topgrad),
                             img_shape=last_shape, **routed)
        return _to_channels_first(dimg)
    return _bind_bwd_data(_kernels_for(kerns, params["layout"]), topgrad, img_shape=img_shape,
                         **params)


def dnn_gradweight(img, topgrad, kerns_shp, border_mode="valid", subsample=(1, 1),
                   dilation=(1, 1), conv_mode="conv", precision=None, algo=None, num_groups=1,
                   data_format="NCHW", workmem=None):
    """The gradient of `dnn_conv` with respect to kernels of shape kerns_shp."""
    return _gradweight("dnn_gradweight", (3, 4), **locals())


def dnn_gradweight3d(img, topgrad, kerns_shp, border_mode="valid", subsample=(1, 1, 1),
                     dilation=(1, 1, 1), conv_mode="conv", precision=None, algo=None,
                     num_groups=1, data_format="NCDHW", workmem=None):
    """`dnn_gradweight` in 3-D."""
    return _gradweight("dnn_gradweight3d", (5,), **locals())


def _gradweight(op, ranks, *, img, topgrad, kerns_shp, border_mode, subsample, dilation,
                conv_mode, precision, algo, num_groups, data_format, workmem):
    _check_pair(op, "img", img, "topgrad", topgrad)
    kerns_shape = _shape_arg(op, "kerns_shp", kerns_shp)
    params, out_shape = _conv_params(
        op, "bwd_filter", jnp.shape(img), kerns_shape, jnp.result_type(img),
        border_mode=border_mode, subsample=subsample, dilation=dilation, conv_mode=conv_mode,
        num_groups=num_groups, data_format=data_format, precision=precision, algo=algo,
        workmem=workmem, ranks=ranks, kerns_arg="kerns_shp")
    if tuple(jnp.shape(topgrad)) != out_shape:
        raise ValueError(f"{op}: topgrad has shape {tuple(jnp.shape(topgrad))}, but the "
                         f"convolution with kerns_shp={kerns_shape} gives {out_shape}")
    routed = _channels_last_params(params, jnp.result_type(img), kerns_shape)
    if routed is not None:
        params = routed
        img, topgrad = _to_channels_last(img), _to_channels_last(topgrad)
    layout = params["layout"]
    dkerns = conv_bwd_filter_p.bind(img, topgrad,
                                    kerns_shape=reference.kernel_shape_for(kerns_shape, layout),
                                    **params)
    return _kernels_from(dkerns, layout)
