"""Every version-dependent JAX internal jaxdnn uses is imported here, and only here.

When JAX moves one of these, this file is the one place to mend.
"""
from __future__ import annotations

from jax._src import config as _jax_config
from jax._src import dispatch as _dispatch
from jax._src.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

apply_primitive = _dispatch.apply_primitive


def define_trace_state(name: str, default, help: str):
    """A JAX config state that is part of the jit cache key and trace context, as JAX's own
    trace-time flags are: changing it makes `jax.jit` trace again instead of reusing a
    computation traced under the old value. `state._set(v)` sets it for the process,
    `with state(v):` for the current thread."""
    return _jax_config.string_or_object_state(
        name, default, help, include_in_jit_key=True, include_in_trace_context=True)

__all__ = ["Primitive", "ShapedArray", "ad", "apply_primitive", "batching", "define_trace_state", "mlir"]
