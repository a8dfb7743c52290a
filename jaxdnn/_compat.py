"""Every version-dependent JAX internal jaxdnn uses is imported here, and only here.

When JAX moves one of these, this file is the one place to mend.
"""
from __future__ import annotations

from jax._src import dispatch as _dispatch
from jax._src.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

apply_primitive = _dispatch.apply_primitive

__all__ = ["Primitive", "ShapedArray", "ad", "apply_primitive", "batching", "mlir"]
