"""Independent NumPy float64 references for jaxdnn's convolutions.

Written from the definitions (Theano's `dnn_conv` / cuDNN's convolution descriptor), with
explicit Python loops over output pixels and kernel taps, in float64; only the sum over
the channels of one group (and over the batch, for the weight gradient) is a small NumPy
matrix product. The two gradients are explicit scatter loops of their own, not calls of
the forward. Nothing here imports jax, jaxdnn or scipy: these are the oracles.

Conventions (Theano's):
  * images are channels-first (N, C, *spatial) in the core functions; `to_channels_first`
    / `from_channels_first` convert the channels-last layouts (NWC, NHWC, NDHWC);
  * kernels are always (K, C / groups, *kernel_spatial);
  * 'conv' mode flips every spatial axis of the kernel (a true convolution), 'cross' does
    not (a cross-correlation);
  * dilation d puts d - 1 zeros between neighbouring kernel taps: the dilated kernel
    extent is (k - 1) * d + 1;
  * output size per axis: (in + pad_lo + pad_hi - ((k - 1) * d + 1)) // stride + 1.
"""
from __future__ import annotations

import itertools

import numpy as np

__all__ = [
    "CHANNELS_LAST", "is_channels_last", "to_channels_first", "from_channels_first",
    "layout_shape", "channels_first_shape", "as_tuple", "dilated_extent", "border_pads",
    "output_spatial", "conv_cf", "gradinput_cf", "gradweight_cf",
    "conv", "gradinput", "gradweight", "output_shape", "data_format_for",
]

CHANNELS_LAST = ("NWC", "NHWC", "NDHWC")
CHANNELS_FIRST = ("NCW", "NCHW", "NCDHW")


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------
def is_channels_last(data_format) -> bool:
    return data_format in CHANNELS_LAST


def data_format_for(nd: int, channels_last: bool) -> str:
    """The data_format name for `nd` spatial axes: NCW/NCHW/NCDHW or NWC/NHWC/NDHWC."""
    return (CHANNELS_LAST if channels_last else CHANNELS_FIRST)[nd - 1]


def to_channels_first(x, data_format):
    x = np.asarray(x, dtype=np.float64)
    return np.moveaxis(x, -1, 1) if is_channels_last(data_format) else x


def from_channels_first(x, data_format):
    return np.moveaxis(x, 1, -1) if is_channels_last(data_format) else x


def layout_shape(cf_shape, data_format):
    """A channels-first shape (N, C, *spatial) written in `data_format`'s layout."""
    cf_shape = tuple(cf_shape)
    if is_channels_last(data_format):
        return (cf_shape[0],) + cf_shape[2:] + (cf_shape[1],)
    return cf_shape


def channels_first_shape(shape, data_format):
    """The inverse of `layout_shape`."""
    shape = tuple(shape)
    if is_channels_last(data_format):
        return (shape[0], shape[-1]) + shape[1:-1]
    return shape


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------
def as_tuple(value, nd: int, name: str = "value") -> tuple:
    """An int repeated `nd` times, or a sequence of `nd` ints, as a tuple of ints."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * nd
    value = tuple(int(v) for v in value)
    if len(value) != nd:
        raise ValueError(f"{name}={value!r}: expected {nd} entries")
    return value


def dilated_extent(k: int, d: int) -> int:
    """The extent of a kernel of size k dilated by d: (k - 1) * d + 1."""
    return (k - 1) * d + 1


def border_pads(border_mode, kernel_spatial, dilation=None) -> tuple:
    """Theano's border_mode as one (pad_lo, pad_hi) pair per spatial axis.

    'valid': 0; 'full': dilated_extent - 1; 'half': dilated_extent // 2; an int: that pad
    on every axis; a tuple of ints: one pad per axis (the same on both sides)."""
    nd = len(kernel_spatial)
    dilation = (1,) * nd if dilation is None else as_tuple(dilation, nd, "dilation")
    ext = [dilated_extent(k, d) for k, d in zip(kernel_spatial, dilation)]
    if isinstance(border_mode, str):
        if border_mode == "valid":
            pads = [0] * nd
        elif border_mode == "full":
            pads = [e - 1 for e in ext]
        elif border_mode == "half":
            pads = [e // 2 for e in ext]
        else:
            raise ValueError(f"border_mode={border_mode!r}")
    else:
        pads = list(as_tuple(border_mode, nd, "border_mode"))
    if any(p < 0 for p in pads):
        raise ValueError(f"border_mode={border_mode!r}: negative padding")
    return tuple((p, p) for p in pads)


def _pairs(pads, nd):
    out = []
    for p in pads:
        if isinstance(p, (int, np.integer)):
            out.append((int(p), int(p)))
        else:
            lo, hi = p
            out.append((int(lo), int(hi)))
    assert len(out) == nd, (pads, nd)
    return tuple(out)


def output_spatial(in_spatial, kernel_spatial, pads, stride=None, dilation=None) -> tuple:
    """(in + lo + hi - dilated_extent) // stride + 1 per axis; ValueError if any is < 1."""
    nd = len(in_spatial)
    pads = _pairs(pads, nd)
    stride = (1,) * nd if stride is None else as_tuple(stride, nd, "stride")
    dilation = (1,) * nd if dilation is None else as_tuple(dilation, nd, "dilation")
    out = []
    for i, k, (lo, hi), s, d in zip(in_spatial, kernel_spatial, pads, stride, dilation):
        span = i + lo + hi - dilated_extent(k, d)
        if span < 0:
            raise ValueError("the dilated kernel is larger than the padded input")
        out.append(span // s + 1)
    return tuple(out)


def _taps(out_spatial, kernel_spatial, in_spatial, pads, stride, dilation, flip):
    """Yield (output index, input index, kernel index) for every kernel tap of every output
    pixel that lands inside the (unpadded) input. With `flip`, output pixel o meets input
    pixel o*s - lo + r*d through the kernel tap k - 1 - r (true convolution)."""
    for o in itertools.product(*(range(m) for m in out_spatial)):
        for r in itertools.product(*(range(m) for m in kernel_spatial)):
            i = tuple(oi * s - lo + ri * d
                      for oi, s, (lo, _), ri, d in zip(o, stride, pads, r, dilation))
            if not all(0 <= ii < n for ii, n in zip(i, in_spatial)):
                continue  # a padding zero
            kw = tuple(k - 1 - ri for k, ri in zip(kernel_spatial, r)) if flip else r
            yield o, i, kw


def _geometry(nd, pads, stride, dilation):
    pads = _pairs(pads, nd)
    stride = (1,) * nd if stride is None else as_tuple(stride, nd, "stride")
    dilation = (1,) * nd if dilation is None else as_tuple(dilation, nd, "dilation")
    return pads, stride, dilation


def _groups(c, cg, k, groups):
    if cg * groups != c:
        raise ValueError(f"channels: image has {c}, kernels take {cg} x {groups} groups")
    if k % groups:
        raise ValueError(f"{k} kernels do not split into {groups} groups")
    kg = k // groups
    for g in range(groups):
        yield slice(g * cg, (g + 1) * cg), slice(g * kg, (g + 1) * kg)


# --------------------------------------------------------------------------------------
# Core loops, channels-first
# --------------------------------------------------------------------------------------
_ALL = slice(None)


def conv_cf(x, w, pads=0, stride=None, dilation=None, flip=False, groups=1):
    """y[n, k, o] = sum_{c in k's group, r} x[n, c, o*s - lo + r*d] * w[k, c, r'] with
    r' = r (cross) or k_size - 1 - r (flip), padding zeros outside the input."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    nd = x.ndim - 2
    assert w.ndim == nd + 2, (x.shape, w.shape)
    if isinstance(pads, (int, np.integer)):
        pads = (pads,) * nd
    pads, stride, dilation = _geometry(nd, pads, stride, dilation)
    in_sp, k_sp = x.shape[2:], w.shape[2:]
    out_sp = output_spatial(in_sp, k_sp, pads, stride, dilation)
    y = np.zeros((x.shape[0], w.shape[0]) + out_sp)
    for cs, ks in _groups(x.shape[1], w.shape[1], w.shape[0], groups):
        for o, i, kw in _taps(out_sp, k_sp, in_sp, pads, stride, dilation, flip):
            # (N, Cg) @ (Cg, Kg) -> (N, Kg)
            y[(_ALL, ks) + o] += x[(_ALL, cs) + i] @ w[(ks, _ALL) + kw].T
    return y


def gradinput_cf(w, dy, in_spatial, pads=0, stride=None, dilation=None, flip=False, groups=1):
    """The adjoint of `conv_cf` in x: every tap scatters dy[n, k, o] * w[k, c, r'] into
    dx[n, c, o*s - lo + r*d] (the transposed convolution)."""
    w = np.asarray(w, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    nd = dy.ndim - 2
    in_spatial = tuple(in_spatial)
    if isinstance(pads, (int, np.integer)):
        pads = (pads,) * nd
    pads, stride, dilation = _geometry(nd, pads, stride, dilation)
    k_sp = w.shape[2:]
    out_sp = output_spatial(in_spatial, k_sp, pads, stride, dilation)
    assert dy.shape[2:] == out_sp and dy.shape[1] == w.shape[0], (dy.shape, out_sp, w.shape)
    c = w.shape[1] * groups
    dx = np.zeros((dy.shape[0], c) + in_spatial)
    for cs, ks in _groups(c, w.shape[1], w.shape[0], groups):
        for o, i, kw in _taps(out_sp, k_sp, in_spatial, pads, stride, dilation, flip):
            # (N, Kg) @ (Kg, Cg) -> (N, Cg)
            dx[(_ALL, cs) + i] += dy[(_ALL, ks) + o] @ w[(ks, _ALL) + kw]
    return dx


def gradweight_cf(x, dy, kernel_spatial, pads=0, stride=None, dilation=None, flip=False,
                  groups=1):
    """The adjoint of `conv_cf` in w: every tap scatters sum_n dy[n, k, o] * x[n, c, i]
    into dw[k, c, r']."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    nd = x.ndim - 2
    kernel_spatial = tuple(kernel_spatial)
    if isinstance(pads, (int, np.integer)):
        pads = (pads,) * nd
    pads, stride, dilation = _geometry(nd, pads, stride, dilation)
    in_sp = x.shape[2:]
    out_sp = output_spatial(in_sp, kernel_spatial, pads, stride, dilation)
    assert dy.shape[2:] == out_sp and dy.shape[0] == x.shape[0], (dy.shape, out_sp, x.shape)
    k, c = dy.shape[1], x.shape[1]
    dw = np.zeros((k, c // groups) + kernel_spatial)
    for cs, ks in _groups(c, c // groups, k, groups):
        for o, i, kw in _taps(out_sp, kernel_spatial, in_sp, pads, stride, dilation, flip):
            # (Kg, N) @ (N, Cg) -> (Kg, Cg)
            dw[(ks, _ALL) + kw] += dy[(_ALL, ks) + o].T @ x[(_ALL, cs) + i]
    return dw


# --------------------------------------------------------------------------------------
# Theano-style wrappers (border_mode, subsample, dilation, conv_mode, data_format)
# --------------------------------------------------------------------------------------
def _flip(conv_mode):
    if conv_mode not in ("conv", "cross"):
        raise ValueError(f"conv_mode={conv_mode!r}")
    return conv_mode == "conv"


def _default_format(ndim, data_format):
    return data_format if data_format is not None else data_format_for(ndim - 2, False)


def conv(img, kerns, border_mode="valid", subsample=None, dilation=None, conv_mode="conv",
         num_groups=1, data_format=None):
    """dnn_conv / dnn_conv3d in float64; img in `data_format`, kerns (K, C/g, *k)."""
    img = np.asarray(img, dtype=np.float64)
    fmt = _default_format(img.ndim, data_format)
    kerns = np.asarray(kerns, dtype=np.float64)
    nd = kerns.ndim - 2
    dilation = (1,) * nd if dilation is None else as_tuple(dilation, nd, "dilation")
    pads = border_pads(border_mode, kerns.shape[2:], dilation)
    y = conv_cf(to_channels_first(img, fmt), kerns, pads, subsample, dilation,
                _flip(conv_mode), num_groups)
    return from_channels_first(y, fmt)


def output_shape(img_shape, kern_shape, border_mode="valid", subsample=None, dilation=None,
                 data_format=None):
    """The shape (in `data_format`) of conv(img, kerns, ...)."""
    fmt = _default_format(len(img_shape), data_format)
    cf = channels_first_shape(img_shape, fmt)
    nd = len(kern_shape) - 2
    dilation = (1,) * nd if dilation is None else as_tuple(dilation, nd, "dilation")
    pads = border_pads(border_mode, kern_shape[2:], dilation)
    out = output_spatial(cf[2:], kern_shape[2:], pads, subsample, dilation)
    return layout_shape((cf[0], kern_shape[0]) + out, fmt)


def gradinput(kerns, topgrad, img_shp, border_mode="valid", subsample=None, dilation=None,
              conv_mode="conv", num_groups=1, data_format=None):
    """dnn_gradinput in float64: img_shp and topgrad in `data_format`."""
    topgrad = np.asarray(topgrad, dtype=np.float64)
    fmt = _default_format(topgrad.ndim, data_format)
    kerns = np.asarray(kerns, dtype=np.float64)
    nd = kerns.ndim - 2
    dilation = (1,) * nd if dilation is None else as_tuple(dilation, nd, "dilation")
    pads = border_pads(border_mode, kerns.shape[2:], dilation)
    cf_shape = channels_first_shape(img_shp, fmt)
    assert cf_shape[1] == kerns.shape[1] * num_groups, (img_shp, kerns.shape, num_groups)
    dx = gradinput_cf(kerns, to_channels_first(topgrad, fmt), cf_shape[2:], pads, subsample,
                      dilation, _flip(conv_mode), num_groups)
    return from_channels_first(dx, fmt)


def gradweight(img, topgrad, kerns_shp, border_mode="valid", subsample=None, dilation=None,
               conv_mode="conv", num_groups=1, data_format=None):
    """dnn_gradweight in float64: img and topgrad in `data_format`, kerns_shp (K, C/g, *k)."""
    img = np.asarray(img, dtype=np.float64)
    fmt = _default_format(img.ndim, data_format)
    kerns_shp = tuple(kerns_shp)
    nd = len(kerns_shp) - 2
    dilation = (1,) * nd if dilation is None else as_tuple(dilation, nd, "dilation")
    pads = border_pads(border_mode, kerns_shp[2:], dilation)
    dw = gradweight_cf(to_channels_first(img, fmt), to_channels_first(topgrad, fmt),
                       kerns_shp[2:], pads, subsample, dilation, _flip(conv_mode), num_groups)
    assert dw.shape == kerns_shp, (dw.shape, kerns_shp)
    return dw
