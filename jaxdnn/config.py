"""jaxdnn's flags: Theano's `dnn.*` flags, set the JAX way.

    jaxdnn.config.update("dnn.conv.algo_fwd", "time_once")
    jaxdnn.config.read("dnn.enabled")
    with jaxdnn.config.override(**{"dnn.deterministic": True}): ...

The environment variable ``JAXDNN_FLAGS="name=value,name=value"`` is read once, at
import; a bad value there makes ``import jaxdnn`` raise the same ``ValueError`` that
``update`` would. Flags are read at trace time and, like JAX's own trace-time flags, are part of
``jax.jit``'s cache key: after a change, a jitted function traces again with the new
values. ``override`` is thread-local, as JAX's flag contexts are.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import jax

from jaxdnn._compat import define_trace_state

__all__ = ["update", "read", "override", "flags", "describe", "allows_tf32"]

_GUESS_TIME = ("guess_once", "guess_on_shape_change", "time_once", "time_on_shape_change")
ALGO_FWD = ("small", "none", "large", "fft", "fft_tiling", "winograd") + _GUESS_TIME
ALGO_BWD_DATA = ("none", "deterministic", "fft", "fft_tiling", "winograd") + _GUESS_TIME
ALGO_BWD_FILTER = ("none", "deterministic", "fft", "small") + _GUESS_TIME
# `dnn.conv.algo_bwd` sets both backward flags, so it takes what both accept.
ALGO_BWD = tuple(a for a in ALGO_BWD_DATA if a in ALGO_BWD_FILTER)
PRECISIONS = ("as_input_f32", "as_input", "float16", "float32", "float64")
# cuDNN's cudnnRNNAlgo_t: the persistent kernels keep the recurrent weights on chip.
RNN_ALGOS = ("standard", "persist_static", "persist_static_small_h", "persist_dynamic")
LAYOUT_ROUTES = ("auto", "channels_last", "own")

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _choice(choices: tuple) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError(
            f"jaxdnn flag {name!r}: got {value!r}; expected one of {', '.join(map(repr, choices))}")
    return check


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"jaxdnn flag {name!r}: got {value!r}; expected True or False")


def _enabled(name: str, value: Any) -> Any:
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    try:
        return _boolean(name, value)
    except ValueError:
        raise ValueError(
            f"jaxdnn flag {name!r}: got {value!r}; expected 'auto', True or False") from None


def _bytes(name: str, value: Any) -> int:
    if isinstance(value, str):
        text = value.strip().upper()
        scale = 1
        for suffix, factor in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10)):
            if text.endswith(suffix):
                text, scale = text[: -len(suffix)], factor
                break
        try:
            value = int(text) * scale
        except ValueError:
            raise ValueError(
                f"jaxdnn flag {name!r}: got {value!r}; expected a number of bytes "
                "(an int, or a string such as '512MiB' or '1GiB')") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"jaxdnn flag {name!r}: got {value!r}; expected a non-negative int of bytes")
    return value


@dataclass(frozen=True)
class Flag:
    name: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str


_FLAGS = {f.name: f for f in (
    Flag("dnn.enabled", "auto", _enabled,
         "'auto': cuDNN where it can serve, else XLA; True: require cuDNN (raise where an op "
         "would fall back); False: never use cuDNN."),
    Flag("dnn.deterministic", False, _boolean,
         "Use only bitwise-reproducible algorithms (max pooling as max_deterministic, "
         "deterministic convolution backward, deterministic sampler backward)."),
    Flag("dnn.conv.algo_fwd", "small", _choice(ALGO_FWD), "Forward convolution algorithm."),
    Flag("dnn.conv.algo_bwd_data", "none", _choice(ALGO_BWD_DATA),
         "Backward-data convolution algorithm (also the transposed convolution)."),
    Flag("dnn.conv.algo_bwd_filter", "none", _choice(ALGO_BWD_FILTER),
         "Backward-filter convolution algorithm."),
    Flag("dnn.conv.precision", "as_input_f32", _choice(PRECISIONS),
         "Compute type of convolutions: as_input_f32 computes float16/bfloat16 in float32."),
    Flag("dnn.conv.workspace_limit", 1 << 30, _bytes,
         "Most bytes of workspace one convolution may use; 'none'/'small'/'large' scale within it."),
    Flag("dnn.conv.layout_route", "auto", _choice(LAYOUT_ROUTES),
         "How a channels-first convolution reaches cuDNN: 'auto' as measured fastest "
         "(jaxdnn.conv.CHANNELS_LAST_DTYPES, FEW_CHANNELS), 'channels_last' through "
         "transposes in every pass, 'own' in the image's layout. Pointwise (1x1) kernels "
         "always keep the image's layout."),
    Flag("dnn.rnn.algo", "standard", _choice(RNN_ALGOS),
         "cuDNN RNN algorithm of RNNBlock: 'standard', or one of cuDNN's persistent kernels "
         "(limited to some sizes and types; cuDNN refuses the others at trace time)."),
    Flag("dnn.rnn.cuda_graph", True, _boolean,
         "Where XLA runs the cuDNN RNN forward outside its own CUDA graphs (a small program, "
         "such as a jitted forward alone), capture cuDNN's per-step kernels once into a CUDA "
         "graph and replay it (one launch per call instead of hundreds); False launches them "
         "one by one. Calls with seq_lengths never use it."),
)}

# `dnn.conv.algo_bwd` is not stored: it writes both backward flags and reads them back.
_ALIASES = {"dnn.conv.algo_bwd": ("dnn.conv.algo_bwd_data", "dnn.conv.algo_bwd_filter")}

_lock = threading.Lock()
# Two JAX config states, each a sorted tuple of (name, value) pairs (hashable, so jit keys
# its cache on them): every flag's process-wide value, set by `update`, and the flags a
# thread's `override` blocks set, layered on top. JAX takes a state's initial value from
# the environment variable of its upper-cased name, so neither may be called
# "jaxdnn_flags" (JAXDNN_FLAGS is ours, parsed below).
_global_state = define_trace_state(
    "jaxdnn_flag_values", tuple(sorted((name, flag.default) for name, flag in _FLAGS.items())),
    "jaxdnn's flags (set them through jaxdnn.config)")
_override_state = define_trace_state(
    "jaxdnn_flag_overrides", (), "jaxdnn's flags set by jaxdnn.config.override blocks")


def _current() -> dict[str, Any]:
    return {**dict(_global_state.value), **dict(_override_state.value)}


def _snapshot(values: dict[str, Any]) -> tuple:
    return tuple(sorted(values.items()))


def allows_tf32() -> bool:
    """Whether float32 convolutions and RNNs may compute in TF32: unless
    `jax.default_matmul_precision` asks for full float32 ('highest' or 'float32'), as
    XLA's own float32 convolutions and matmuls."""
    precision = jax.config.jax_default_matmul_precision
    return str(precision).lower() not in ("highest", "float32")


def flags() -> tuple[str, ...]:
    """Every flag name, aliases included."""
    return tuple(_FLAGS) + tuple(_ALIASES)


def describe() -> dict[str, str]:
    """Flag name -> one line of documentation."""
    docs = {name: flag.doc for name, flag in _FLAGS.items()}
    docs["dnn.conv.algo_bwd"] = "Sets dnn.conv.algo_bwd_data and dnn.conv.algo_bwd_filter together."
    return docs


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown jaxdnn flag {name!r}; the flags are {', '.join(flags())}")


def _validated(name: str, value: Any) -> dict[str, Any]:
    """The stored flags that setting `name` to `value` writes, validated."""
    if name in _ALIASES:
        _choice(ALGO_BWD)(name, value)
        return {target: _FLAGS[target].check(target, value) for target in _ALIASES[name]}
    if name not in _FLAGS:
        raise _unknown(name)
    return {name: _FLAGS[name].check(name, value)}


def update(name: str, value: Any) -> None:
    """Set flag `name` to `value` for the rest of the process."""
    changes = _validated(name, value)
    with _lock:
        _global_state._set(_snapshot({**dict(_global_state.get_global()), **changes}))


def read(name: str) -> Any:
    """The value of flag `name` in force now."""
    if name in _ALIASES:
        data, filt = (read(target) for target in _ALIASES[name])
        return data if data == filt else None
    if name not in _FLAGS:
        raise _unknown(name)
    return _current()[name]


def values() -> dict[str, Any]:
    """A snapshot of every stored flag."""
    return _current()


@contextlib.contextmanager
def override(**settings: Any) -> Iterator[None]:
    """Set flags inside a `with` block (for the current thread) and restore them after it.
    Flags the block does not name keep following `update`.

    Flag names hold dots, so pass them unpacked: ``override(**{"dnn.enabled": False})``;
    underscores stand for dots as well: ``override(dnn__enabled=False)``.
    """
    changes: dict[str, Any] = {}
    for key, value in settings.items():
        changes.update(_validated(key.replace("__", "."), value))
    with _override_state(_snapshot({**dict(_override_state.value), **changes})):
        yield


def parse_flags(text: str) -> list[tuple[str, str]]:
    """Parse ``"name=value,name=value"`` (the JAXDNN_FLAGS syntax)."""
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"JAXDNN_FLAGS: {item!r} is not of the form name=value")
        pairs.append((name.strip(), value.strip()))
    return pairs


def _load_environment() -> None:
    for name, value in parse_flags(os.environ.get("JAXDNN_FLAGS", "")):
        update(name, value)


_load_environment()
