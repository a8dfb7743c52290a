"""The one helper every jaxdnn op uses to define its primitives.

A jaxdnn primitive has
  * an abstract evaluation (pure-Python shape rules: no GPU at trace time),
  * a CUDA lowering to the op's XLA FFI handler through `jax.ffi.ffi_lowering`, with the
    workspace, where the op needs one, as an explicit trailing `u8` result sized by a
    Python policy (so tracing needs no GPU) and dropped here,
  * a reference lowering (the op's pure-JAX implementation in `jaxdnn.reference`) for
    every other platform, and for CUDA when the call was traced with impl='xla',
  * an optional batching rule (`fold_into_batch` serves every op whose operands and
    results share their leading N axis),
  * a partitioning (jaxdnn/_sharding.py): how XLA splits a call across devices. Both
    lowerings above belong to a per-shard twin of the primitive; the primitive's own
    lowering wraps the twin in custom_partitioning, so AD and batching stay untouched.

Results are typed like JAX's own primitives' results: operands varying over different
manual axes of a `shard_map` are cast to vary alike before `bind`, and the results carry
their varying axes (check_vma=True works) and, under explicit-sharding meshes, the
sharding the partitioning gives them.

Every primitive takes the static parameter `impl` ('cudnn' or 'xla'), chosen at trace
time by `choose_impl` from the `dnn.enabled` flag; the remaining parameters become the
FFI attributes, converted by the op's `attributes` function.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdnn import _extension, config
from jaxdnn._compat import (Primitive, ShapedArray, ad, apply_primitive, batching,
                            cotangent_typed_as, match_varying, mlir,
                            requires_devices_during_lowering, typed_like_operands,
                            zero_tangent_like)
from jaxdnn._batching import merge_into, split_from
from jaxdnn._sharding import Partitioning, partitioned_lowering, result_specs

__all__ = ["define_primitive", "define_linear_pair", "define_linear_in_last",
           "define_reference_jvp", "fold_into_batch", "fold_into_batch_resizing", "choose_impl"]


def define_primitive(
    name: str,
    *,
    abstract_eval: Callable[..., ShapedArray | Sequence[ShapedArray]],
    reference: Callable,
    ffi_target: str | Callable[..., str] | None = "",
    attributes: Callable[..., dict] | None = None,
    workspace_bytes: Callable[..., int] | None = None,
    batch_rule: Callable | None = None,
    partitioning: Callable[..., Partitioning] | None = None,
    multiple_results: bool = False,
) -> Primitive:
    """Define primitive `name`.

    abstract_eval(*avals, **params) -> aval(s) of the results (no workspace).
    reference(*arrays, **params) -> the same results in pure JAX (params without impl).
    attributes(**params) -> FFI attributes (default: params unchanged).
    workspace_bytes(*avals_in, **params) -> size of the workspace result, if any.
    batch_rule(primitive, args, dims, **params) -> (outs, out_dims).
    ffi_target: the FFI target's name ('', the default: the target is named `name`, as
    jaxdnn's are), or ffi_target(**params) -> name where the
    parameters pick one of several targets; None for a primitive cuDNN has no pass for:
    its reference is its only lowering, and its `impl` is that of the passes derived from
    it (its transpose).
    partitioning(*avals, **params) -> Partitioning: how a call splits across devices.
    """
    ffi_target = ffi_target if ffi_target != "" else name
    prim = _Primitive(name)
    local = _Primitive(name + "_shard")  # one shard's call: the lowerings below
    for p in (prim, local):
        p.multiple_results = multiple_results
        p.def_impl(functools.partial(apply_primitive, p))

    def _abstract(*avals, impl, **params):
        del impl
        out = abstract_eval(*avals, **params)
        results = list(out) if multiple_results else [out]
        specs = [None] * len(results)
        mesh = _explicit_mesh(avals)
        if mesh is not None and partitioning is not None:
            specs = result_specs(partitioning(*avals, **params), [a.shape for a in avals],
                                 [a.sharding.spec for a in avals], dict(mesh.shape))
        typed = [typed_like_operands(r, avals, s) for r, s in zip(results, specs)]
        return typed if multiple_results else typed[0]

    prim.def_abstract_eval(_abstract)
    local.def_abstract_eval(_abstract)

    def _reference(*args, impl, **params):
        del impl
        return reference(*args, **params)

    reference_lowering = mlir.lower_fun(_reference, multiple_results=multiple_results)

    def _cuda_lowering(ctx, *args, impl, **params):
        if impl != "cudnn" or ffi_target is None:
            return reference_lowering(ctx, *args, impl=impl, **params)
        ffi_rule = jax.ffi.ffi_lowering(ffi_target(**params) if callable(ffi_target)
                                        else ffi_target)
        attrs = attributes(**params) if attributes is not None else params
        if workspace_bytes is None:
            return ffi_rule(ctx, *args, **attrs)
        size = int(workspace_bytes(*ctx.avals_in, **params))
        ctx = ctx.replace(avals_out=[*ctx.avals_out, ShapedArray((size,), np.uint8)])
        return ffi_rule(ctx, *args, **attrs)[:-1]

    mlir.register_lowering(local, reference_lowering)
    mlir.register_lowering(local, _cuda_lowering, platform="cuda")
    if partitioning is None:
        mlir.register_lowering(prim, reference_lowering)
        mlir.register_lowering(prim, _cuda_lowering, platform="cuda")
    else:
        def bind_local(*args, **params):
            out = local.bind(*args, **params)
            return list(out) if multiple_results else [out]

        def spec_fn(*avals, impl, **params):
            del impl
            return partitioning(*avals, **params)

        requires_devices_during_lowering(prim)
        mlir.register_lowering(prim, partitioned_lowering(bind_local, spec_fn, name))
    if batch_rule is not None:
        batching.primitive_batchers[prim] = functools.partial(_batch_unless_empty, batch_rule,
                                                              prim)
    return prim


def _batch_unless_empty(batch_rule: Callable, prim: Primitive, args, dims, **params):
    """`batch_rule`, except over a vmapped axis of size 0: no call at all, but empty results
    of the shapes one call on an instance would give (folding zero instances into N could
    not be undone: N * 0 hides N)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if size:
        return batch_rule(prim, args, dims, **params)
    instance = [jax.ShapeDtypeStruct(a.shape if d is None else a.shape[:d] + a.shape[d + 1:],
                                     a.dtype) for a, d in zip(args, dims)]
    outs = jax.eval_shape(functools.partial(prim.bind, **params), *instance)
    empty = [jnp.zeros((0, *o.shape), o.dtype) for o in (outs if prim.multiple_results
                                                          else [outs])]
    if prim.multiple_results:
        return empty, [0] * len(empty)
    return empty[0], 0


class _Primitive(Primitive):
    """A primitive whose operands are made to vary over the same manual mesh axes before
    binding (shard_map with check_vma=True)."""

    def bind(self, *args, **params):
        return super().bind(*match_varying(*args), **params)


def _explicit_mesh(avals):
    """The mesh of operands sharded over explicit mesh axes, or None."""
    for a in avals:
        mesh = getattr(getattr(a, "sharding", None), "mesh", None)
        if mesh is not None and not mesh.empty and mesh._any_axis_explicit:
            return mesh
    return None


def fold_into_batch(prim: Primitive, args, dims, **params):
    """Batching rule for ops whose operands and results all lead with the batch axis N:
    merge each vmapped axis into N (broadcasting unmapped operands), run the op once, and
    split N again. Exact for every op that treats the images of a batch independently
    (softmax, pooling, the sampler)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    out = prim.bind(*[merge_into(a, d, size, 0) for a, d in zip(args, dims)], **params)
    if prim.multiple_results:
        split = [split_from(o, size, 0) for o in out]
        return [o for o, _ in split], [d for _, d in split]
    return split_from(out, size, 0)


def fold_into_batch_resizing(*shape_params: str) -> Callable:
    """`fold_into_batch` for a primitive whose parameters `shape_params` hold shapes that
    lead with N (an output shape, say): the fold multiplies their N too."""
    def rule(prim: Primitive, args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        for name in shape_params:
            shape = params[name]
            params[name] = (size * shape[0],) + tuple(shape[1:])
        return fold_into_batch(prim, args, dims, **params)
    return rule


def define_linear_pair(forward: Primitive, backward: Primitive, *,
                       backward_params: Callable[[dict, ShapedArray], dict] = lambda p, a: p,
                       forward_params: Callable[[dict], dict] = lambda p: p) -> None:
    """JVP and transpose rules for two primitives linear in their one operand and each
    other's transpose (pooling and its linear backward, the grid generator and its
    backward): jvp, jacfwd and gradients of any order then stay on these primitives.

    backward_params(params, operand_aval): the backward's parameters, from the forward's
    and the forward operand's type (pooling adds the input shape); forward_params(params):
    the forward's, from the backward's."""
    def jvp(prim, primals, tangents, **params):
        (x,), (t,) = primals, tangents
        return prim.bind(x, **params), prim.bind(ad.instantiate_zeros(t), **params)

    def transpose_forward(ct, x, **params):
        if type(ct) is ad.Zero:
            return [ad.Zero(x.aval)]
        return [backward.bind(ct, **backward_params(params, x.aval))]

    def transpose_backward(ct, dy, **params):
        if type(ct) is ad.Zero:
            return [ad.Zero(dy.aval)]
        return [forward.bind(ct, **forward_params(params))]

    ad.primitive_jvps[forward] = functools.partial(jvp, forward)
    ad.primitive_jvps[backward] = functools.partial(jvp, backward)
    ad.primitive_transposes[forward] = transpose_forward
    ad.primitive_transposes[backward] = transpose_backward


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _reference_tangent(reference: Callable, multiple_results: bool, operands, tangents,
                       params: dict):
    """The tangent of `reference` (a pass in pure JAX) at `operands` in the direction of the
    operands' `tangents`, or None where no floating operand has a nonzero tangent. Integer
    operands (sequence lengths) and bytes (the RNN's reserve space) are held fixed."""
    moving = [i for i, (a, t) in enumerate(zip(operands, tangents))
              if type(t) is not ad.Zero and jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
    if not moving:
        return None
    kwargs = {k: p for k, p in params.items() if k != "impl"}

    def at(*moved):
        args = list(operands)
        for i, a in zip(moving, moved):
            args[i] = a
        out = reference(*args, **kwargs)
        return list(out) if multiple_results else out

    return jax.jvp(at, [operands[i] for i in moving], [tangents[i] for i in moving])[1]


def _zeros_for_integers(prim: Primitive, out, tangent):
    """`tangent` with symbolic zeros in place of the tangents of non-floating results (the
    RNN's reserve space, whose tangent jax.jvp gives as float0)."""
    if not prim.multiple_results:
        return tangent
    return [t if jnp.issubdtype(o.dtype, jnp.inexact) else zero_tangent_like(o)
            for o, t in zip(out, tangent)]


def define_reference_jvp(prim: Primitive, reference: Callable) -> None:
    """A JVP rule for a pass whose derivative is its reference's (the pass in pure JAX): the
    primal is `prim`'s own call (cuDNN where its impl says so), the tangent jax.jvp of
    `reference` at the primal, plain JAX that reverse mode transposes. The backward passes of
    batch norm and the RNN take this rule: their derivatives (second order) run on XLA."""
    def jvp(primals, tangents, **params):
        out = prim.bind(*primals, **params)
        tangent = _reference_tangent(reference, prim.multiple_results, primals, tangents,
                                     params)
        if tangent is None:
            return out, ([zero_tangent_like(o) for o in out] if prim.multiple_results
                         else zero_tangent_like(out))
        return out, _zeros_for_integers(prim, out, tangent)

    ad.primitive_jvps[prim] = jvp


def define_linear_in_last(prim: Primitive, transposed: Callable, *,
                          reference: Callable | None = None, linear: int = 1) -> None:
    """JVP and transpose rules for a pass linear in its last `linear` operands (a backward
    pass in its cotangent, a forward derivative in its tangents) and not in the others (x,
    y, statistics, the RNN's reserve space).

    The JVP is `prim` applied to the linear operands' tangents, plus the derivative in the
    others: that of `reference` (the pass in pure JAX), or none where reference is None
    (the pass is piecewise constant in them, as max pooling's is). The transpose in the
    linear operands is transposed(*others, ct, **params): the cotangent of the one linear
    operand, or a sequence of `linear` of them; ct is the cotangent of the result, or the
    list of the results' cotangents (symbolic zeros instantiated)."""
    multiple = prim.multiple_results

    def jvp(primals, tangents, **params):
        others, vs = primals[:-linear], primals[-linear:]
        t_others, t_vs = tangents[:-linear], tangents[-linear:]
        out = prim.bind(*primals, **params)
        parts = []
        if any(type(t) is not ad.Zero for t in t_vs):
            parts.append(prim.bind(*others, *map(ad.instantiate_zeros, t_vs), **params))
        if reference is not None:
            part = _reference_tangent(lambda *a, **kw: reference(*a, *vs, **kw), multiple,
                                      others, t_others, params)
            if part is not None:
                parts.append(part)
        if not parts:
            return out, ([zero_tangent_like(o) for o in out] if multiple
                         else zero_tangent_like(out))
        parts = [list(p) if multiple else p for p in parts]
        return out, functools.reduce(_add, parts)

    def transpose(ct, *operands, **params):
        others, vs = operands[:-linear], operands[-linear:]
        assert not any(ad.is_undefined_primal(o) for o in others), \
            f"{prim.name} is linear in its last {linear} operand(s) only"
        none = [None] * len(others)
        cts = list(ct) if multiple else [ct]
        if all(type(c) is ad.Zero for c in cts):
            return [*none, *(ad.Zero(v.aval) if ad.is_undefined_primal(v) else None
                             for v in vs)]
        result = transposed(*others, [ad.instantiate_zeros(c) for c in cts] if multiple else ct,
                            **params)
        result = [result] if linear == 1 else list(result)
        return [*none, *(cotangent_typed_as(r, v.aval) if ad.is_undefined_primal(v) else None
                         for r, v in zip(result, vs))]

    ad.primitive_jvps[prim] = jvp
    ad.primitive_transposes[prim] = transpose


# cuDNN's tensor descriptors take 32-bit sizes and strides: an array of more elements than
# this is not sent to cuDNN (XLA's path computes it; dnn.enabled=True raises).
MAX_CUDNN_ELEMENTS = 2**31 - 1


def too_large_for_cudnn(shapes: Sequence[Sequence[int]]) -> str | None:
    """Why cuDNN cannot take arrays of these shapes, or None."""
    for shape in shapes:
        if math.prod(shape) > MAX_CUDNN_ELEMENTS:
            return (f"an array of shape {tuple(shape)} has {math.prod(shape)} elements, more "
                    f"than the {MAX_CUDNN_ELEMENTS} that cuDNN's 32-bit sizes and strides "
                    "address")
    return None


def choose_impl(op: str, xla_is_faster: bool = False, ffi_targets: Sequence[str] = (),
                shapes: Sequence[Sequence[int]] = ()) -> str:
    """'cudnn' or 'xla' for an op traced now, from the `dnn.enabled` flag.

    'auto' takes cuDNN whenever the extension is loaded (on a machine without a GPU the
    CUDA lowering is simply never used), except where the op's measurements show XLA's
    own lowering faster for the case at hand (`xla_is_faster`); True demands the cuDNN
    path and raises here, at trace time, when it cannot run; False always takes XLA.
    `ffi_targets`: the handlers the op needs; where this build lacks one, the op cannot run
    on cuDNN. `shapes`: the shapes of the call's operands and results; one too large for
    cuDNN (MAX_CUDNN_ELEMENTS) takes XLA, or raises a ValueError under True.
    """
    enabled = config.read("dnn.enabled")
    if enabled is False:
        return "xla"
    too_large = too_large_for_cudnn(shapes)
    if too_large is not None:
        if enabled is True:
            raise ValueError(f"jaxdnn {op}: dnn.enabled=True requires cuDNN, but {too_large}; "
                             "with dnn.enabled='auto' this call takes XLA's path")
        return "xla"
    missing = [t for t in ffi_targets if not _extension.has_targets(t)]
    if enabled is True:
        reason = _extension.unavailable_reason()
        if reason is None and missing:
            reason = f"this build of jaxdnn has no cuDNN handler {missing[0]!r}"
        if reason is not None:
            raise RuntimeError(
                f"jaxdnn {op}: dnn.enabled=True requires cuDNN, but it cannot run here: {reason}")
        return "cudnn"
    if _extension.extension() is None or xla_is_faster or missing:
        return "xla"
    return "cudnn"
