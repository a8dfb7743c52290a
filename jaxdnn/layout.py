"""Image layouts: channels-first (NCHW, NCDHW, NCW) and channels-last (NHWC, NDHWC, NWC)."""
from __future__ import annotations

CHANNELS_FIRST = {3: "NCW", 4: "NCHW", 5: "NCDHW"}
CHANNELS_LAST = {3: "NWC", 4: "NHWC", 5: "NDHWC"}


def is_channels_last(layout: str) -> bool:
    """True for NHWC-style layouts; the 2-D row layout 'NC' counts as channels-last (C is
    its last axis)."""
    return layout.endswith("C")


def channel_axis(layout: str, ndim: int) -> int:
    return ndim - 1 if is_channels_last(layout) else 1


def spatial_axes(layout: str, ndim: int) -> tuple[int, ...]:
    return tuple(range(1, ndim - 1)) if is_channels_last(layout) else tuple(range(2, ndim))


# Every name a data_format may take: the canonical ones of each rank, Keras's short names
# and Theano's ('bc01' is NCHW: batch, channel, then the spatial axes 0 and 1).
_FIRST_NAMES = frozenset({*CHANNELS_FIRST.values(), "NC", "bc01", "bc012", "channels_first"})
_LAST_NAMES = frozenset({*CHANNELS_LAST.values(), "b01c", "b012c", "channels_last"})
_THEANO = {"bc01": 4, "bc012": 5, "b01c": 4, "b012c": 5}


def data_format_is_channels_last(data_format, ndim: int, *, op: str = "",
                                 arg: str = "data_format", any_rank: bool = False) -> bool:
    """Whether `data_format` names the channels-last layout of a rank-`ndim` array: the one
    parser of every op's data_format. A rank's own names ('NCHW'/'NHWC' for 4-D), the short
    names 'channels_first'/'channels_last' and Theano's 'bc01'/'b01c' (4-D),
    'bc012'/'b012c' (5-D) are accepted; 3-D arrays (1-D convolutions) also take the 2-D
    names, the ops' defaults. any_rank: a name of any rank is accepted (batch norm, whose
    (N, C) inputs have no layout of their own). Anything else is a ValueError naming
    `arg` (and `op`)."""
    if isinstance(data_format, str) and data_format in _FIRST_NAMES | _LAST_NAMES:
        last = data_format in _LAST_NAMES
        canonical = (CHANNELS_LAST if last else CHANNELS_FIRST).get(ndim)
        fits = (any_rank or data_format in ("channels_first", "channels_last", canonical)
                or _THEANO.get(data_format) == ndim
                or (ndim == 3 and data_format in ("NCHW", "NHWC")))
        if fits:
            return last
    first, last = CHANNELS_FIRST.get(ndim, "NCHW"), CHANNELS_LAST.get(ndim, "NHWC")
    prefix = f"{op}: " if op else ""
    raise ValueError(f"{prefix}{arg}={data_format!r} is not an image layout for {ndim}-D "
                     f"inputs; expected {first!r} (channels-first) or {last!r} (channels-last)")


def normalize_data_format(data_format, ndim: int, *, op: str = "",
                          arg: str = "data_format") -> str:
    """`data_format` (any name `data_format_is_channels_last` accepts) as the canonical
    layout of a rank-`ndim` image ('NCHW', 'NDHWC', ...)."""
    last = data_format_is_channels_last(data_format, ndim, op=op, arg=arg)
    return (CHANNELS_LAST if last else CHANNELS_FIRST)[ndim]
