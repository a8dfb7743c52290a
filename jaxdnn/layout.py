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


def normalize_data_format(data_format, ndim: int, arg: str = "data_format") -> str:
    """Check `data_format` against the rank of the image and return it in canonical form.

    The short names 'channels_first'/'channels_last' and Theano's 'bc01'/'bc012' are
    accepted too."""
    aliases = {"bc01": "NCHW", "bc012": "NCDHW", "b01c": "NHWC", "b012c": "NDHWC"}
    if isinstance(data_format, str):
        fmt = aliases.get(data_format, data_format)
        if fmt == "channels_first":
            fmt = CHANNELS_FIRST.get(ndim, fmt)
        elif fmt == "channels_last":
            fmt = CHANNELS_LAST.get(ndim, fmt)
        if fmt in (CHANNELS_FIRST.get(ndim), CHANNELS_LAST.get(ndim)):
            return fmt
    expected = " or ".join(repr(f) for f in (CHANNELS_FIRST.get(ndim), CHANNELS_LAST.get(ndim)) if f)
    raise ValueError(f"{arg}={data_format!r} does not fit a {ndim}-D image; expected {expected}")
