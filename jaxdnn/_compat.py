"""Every version-dependent JAX internal jaxdnn uses is imported here, and only here.

When JAX moves one of these, this file is the one place to mend.
"""
from __future__ import annotations

import jax
from jax._src import config as _jax_config
from jax._src import core as _core
from jax._src import dispatch as _dispatch
from jax._src import sharding_impls as _sharding_impls
from jax._src.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

apply_primitive = _dispatch.apply_primitive


def requires_devices_during_lowering(prim) -> None:
    """Mark `prim` as lowering through custom_partitioning, which needs the devices (JAX
    asserts otherwise)."""
    _dispatch.prim_requires_devices_during_lowering.add(prim)


def extend_axis_env(mesh_shape):
    """A context in which collectives may name the mesh axes of `mesh_shape` (a mapping)."""
    return _core.extend_axis_env_nd(tuple(mesh_shape.items()))


def replicated_like(sharding):
    """A replicated sharding over the devices of `sharding` (a GSPMD sharding, as the
    partitioning callbacks get inside a partially manual shard_map)."""
    return _sharding_impls.GSPMDSharding.get_replicated(sharding._device_assignment)


def match_varying(*args):
    """The operands, cast (pvary) to vary over the same manual mesh axes, as JAX's own
    primitives require under `shard_map(check_vma=True)`."""
    return _core.auto_insert_reshard(*args)


def typed_like_operands(result: ShapedArray, operands, spec=None) -> ShapedArray:
    """`result` typed as a result of a primitive applied to `operands`: the current mesh
    (sharded as `spec`, under explicit-sharding meshes) and the operands' varying manual
    axes (shard_map), which `match_varying` made equal."""
    arrays = [a for a in operands if isinstance(a, ShapedArray)]
    if not arrays:
        return result
    _core.standard_vma_rule("jaxdnn", *arrays)  # a clear error where they differ
    return ShapedArray(result.shape, result.dtype, weak_type=result.weak_type,
                       sharding=_core.get_cur_mesh_sharding(spec),
                       manual_axis_type=arrays[0].manual_axis_type)


def zeros_varying_like(shape, dtype, like):
    """Zeros of `shape` and `dtype` that vary over the manual mesh axes `like` varies over:
    the primal of a `jax.linear_transpose` inside shard_map, whose cotangent `like` is. (A
    non-varying primal makes JAX insert a pvary whose transpose psums the per-device
    cotangents inside the transpose, and again where the caller's pvary is transposed.)"""
    zeros, _ = match_varying(jax.numpy.zeros(tuple(shape), dtype), like)
    return zeros


def cotangent_typed_as(ct, aval):
    """`ct` typed as the cotangent a transpose rule must return for a linear operand of
    type `aval`: summed over the manual mesh axes it varies over and `aval` does not (under
    shard_map(check_vma=True) an operand replicated over the devices gets the sum of their
    contributions, what JAX's own transpose of the implicit pvary gives), and resharded as
    `aval` is where the mesh's axes are Explicit (sharding is part of the type there: a
    backward pass gives a parameter's gradient the sharding of the statistics it reduces
    to, which need not be that parameter's)."""
    if ct is None or not hasattr(ct, "shape"):  # None or a symbolic zero
        return ct
    ct_type = jax.typeof(ct)
    extra = ct_type.manual_axis_type.varying - aval.manual_axis_type.varying
    if extra:
        ct = jax.lax.psum(ct, tuple(sorted(extra)))
    if aval.sharding.mesh.explicit_axes and ct_type.sharding.spec != aval.sharding.spec:
        ct = jax.sharding.reshard(ct, aval.sharding.spec)
    return ct


def zero_tangent_like(value):
    """The symbolic zero tangent of a primal value (a JVP rule's tangent where its input
    tangent is a symbolic zero)."""
    return ad.Zero(jax.typeof(value).to_tangent_aval())


def define_trace_state(name: str, default, help: str):
    """A JAX config state that is part of the jit cache key and trace context, as JAX's own
    trace-time flags are: changing it makes `jax.jit` trace again instead of reusing a
    computation traced under the old value. `state._set(v)` sets it for the process,
    `with state(v):` for the current thread."""
    return _jax_config.string_or_object_state(
        name, default, help, include_in_jit_key=True, include_in_trace_context=True)

__all__ = ["Primitive", "ShapedArray", "ad", "apply_primitive", "batching", "cotangent_typed_as",
           "define_trace_state",
           "extend_axis_env", "match_varying", "mlir", "replicated_like",
           "requires_devices_during_lowering", "zeros_varying_like", "typed_like_operands",
           "zero_tangent_like"]
