"""The one compute-dtype rule of jaxdnn: cuDNN computes (and accumulates) the 16-bit
floating types in float32, and so do the references; every other type computes in its
own."""
from __future__ import annotations

import jax.numpy as jnp

__all__ = ["compute_dtype"]


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for float16 and bfloat16, else `dtype` itself."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype
