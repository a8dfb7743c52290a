"""Folding a vmapped axis into an axis of the op, in one place.

The vmapped axis B joins the target axis as its *minor* part: (N, B) -> N*B. A batch
axis N sharded across devices stays sharded that way (its shards are contiguous blocks
of N*B); the B-major order, B*N, would make XLA gather N before the call.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxdnn._compat import batching

__all__ = ["merge_into", "split_from"]


def merge_into(a, bdim, size: int, axis: int):
    """`a` (vmapped at `bdim`, or unmapped when bdim is None: broadcast to `size`) with
    the vmapped axis merged into `axis` of the unbatched array, minor: (.., F, ..) of
    F*size."""
    a = jnp.moveaxis(batching.bdim_at_front(a, bdim, size), 0, axis + 1)
    return a.reshape(a.shape[:axis] + (a.shape[axis] * size,) + a.shape[axis + 2:])


def split_from(a, size: int, axis: int):
    """The inverse of merge_into: `axis` of F*size split again; returns (array, bdim)."""
    a = a.reshape(a.shape[:axis] + (a.shape[axis] // size, size) + a.shape[axis + 1:])
    return a, axis + 1
