"""Argument checks shared by the ops: each raises at trace time, naming the argument."""
from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def check_floating(op: str, arg: str, x) -> None:
    dtype = jnp.result_type(x)
    if not any(dtype == jnp.dtype(d) for d in FLOAT_DTYPES):
        raise TypeError(f"{op}: {arg} must be float16, bfloat16, float32 or float64; got {dtype}")


def check_rank(op: str, arg: str, x, ranks: Iterable[int], what: str = "") -> None:
    ranks = tuple(ranks)
    if np.ndim(x) not in ranks:
        if len(ranks) > 2 and ranks == tuple(range(ranks[0], ranks[-1] + 1)):
            expected = f"{ranks[0]}-D to {ranks[-1]}-D"
        else:
            expected = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{op}: {arg} must be {expected}{what}; got shape {np.shape(x)}")


def check_choice(op: str, arg: str, value, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{op}: {arg}={value!r} is not one of {', '.join(map(repr, choices))}")


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool: what every static int argument must be."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def int_tuple(op: str, arg: str, value, length: int) -> tuple[int, ...]:
    """`value` as a tuple of `length` Python ints (an int is repeated)."""
    if is_int(value):
        return (int(value),) * length
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{op}: {arg} must be an int or a sequence of {length} ints; got {value!r}") from None
    if len(items) != length:
        raise ValueError(f"{op}: {arg}={value!r} must have {length} entries, one per spatial axis")
    if not all(is_int(v) for v in items):
        raise TypeError(f"{op}: {arg} must hold ints; got {value!r}")
    return tuple(int(v) for v in items)


def dropout_rate(op: str, value) -> float:
    """A dropout probability, a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{op}: dropout must be a float in [0, 1); got {value!r}")
    if not 0.0 <= float(value) < 1.0:  # NaN fails too
        raise ValueError(f"{op}: dropout={value!r} must lie in [0, 1) (the probability of "
                         "zeroing a unit; 1 would zero every layer's output)")
    return float(value)
