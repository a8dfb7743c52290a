"""Independent NumPy float64 references for the spatial transformer (no jax, no jaxdnn).

Written from the definitions (cuDNN's spatial transformer, Theano's dnn_spatialtf), with
explicit Python loops over images, channels and pixels:

* grid (N, H, W, 2), grid[..., 0] = x (width), grid[..., 1] = y (height); the affine grid is
  theta @ [x_t, y_t, 1] with x_t = linspace(-1, 1, W)[j], y_t = linspace(-1, 1, H)[i];
* bilinear sampling at pixel x = (gx + 1) * (W - 1) / 2, y = (gy + 1) * (H - 1) / 2
  (align_corners=True), each of the four neighbours outside the image contributing 0.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["affine_grid", "affine_grid_grad", "grid_sample", "grid_sample_grad", "spatialtf",
           "spatialtf_grad", "output_size", "pixel_to_grid"]


def _linspace(count: int, k: int) -> float:
    """The k-th of `count` points evenly spaced on [-1, 1] (a single point sits at -1)."""
    return -1.0 + 2.0 * k / (count - 1) if count > 1 else -1.0


def affine_grid(theta, out_dims):
    """theta (N, 2, 3) -> grid (N, H, W, 2) for out_dims (N, C, H, W)."""
    theta = np.asarray(theta, np.float64)
    n_, _, h_, w_ = out_dims
    grid = np.zeros((n_, h_, w_, 2))
    for n in range(n_):
        for i in range(h_):
            for j in range(w_):
                xt, yt = _linspace(w_, j), _linspace(h_, i)
                for r in range(2):
                    grid[n, i, j, r] = theta[n, r, 0] * xt + theta[n, r, 1] * yt + theta[n, r, 2]
    return grid


def affine_grid_grad(dgrid, out_dims):
    """Gradient of sum(affine_grid(theta) * dgrid) with respect to theta: (N, 2, 3)."""
    dgrid = np.asarray(dgrid, np.float64)
    n_, _, h_, w_ = out_dims
    dtheta = np.zeros((n_, 2, 3))
    for n in range(n_):
        for i in range(h_):
            for j in range(w_):
                basis = (_linspace(w_, j), _linspace(h_, i), 1.0)
                for r in range(2):
                    for k in range(3):
                        dtheta[n, r, k] += dgrid[n, i, j, r] * basis[k]
    return dtheta


def _corners(gx, gy, h_, w_):
    """[(row, col, weight, d weight / d gx, d weight / d gy)] of the four neighbours of the
    sample point (gx, gy) that lie inside the image."""
    x = (gx + 1.0) * (w_ - 1) / 2.0
    y = (gy + 1.0) * (h_ - 1) / 2.0
    x0, y0 = math.floor(x), math.floor(y)
    fx, fy = x - x0, y - y0
    out = []
    for row, wy, dwy in ((y0, 1.0 - fy, -1.0), (y0 + 1, fy, 1.0)):
        for col, wx, dwx in ((x0, 1.0 - fx, -1.0), (x0 + 1, fx, 1.0)):
            if 0 <= row < h_ and 0 <= col < w_:
                out.append((row, col, wy * wx, wy * dwx * (w_ - 1) / 2.0,
                            dwy * wx * (h_ - 1) / 2.0))
    return out


def grid_sample(img, grid):
    """Bilinear sampling of img (N, C, H, W) at grid (N, Ho, Wo, 2) -> (N, C, Ho, Wo)."""
    img = np.asarray(img, np.float64)
    grid = np.asarray(grid, np.float64)
    n_, c_, h_, w_ = img.shape
    ho, wo = grid.shape[1:3]
    out = np.zeros((n_, c_, ho, wo))
    for n in range(n_):
        for i in range(ho):
            for j in range(wo):
                for row, col, wgt, _, _ in _corners(grid[n, i, j, 0], grid[n, i, j, 1], h_, w_):
                    for c in range(c_):
                        out[n, c, i, j] += wgt * img[n, c, row, col]
    return out


def grid_sample_grad(img, grid, dout):
    """(dimg, dgrid): gradients of sum(grid_sample(img, grid) * dout), analytic (valid away
    from the pixel rows and columns, where the gradient in grid jumps)."""
    img = np.asarray(img, np.float64)
    grid = np.asarray(grid, np.float64)
    dout = np.asarray(dout, np.float64)
    n_, c_, h_, w_ = img.shape
    ho, wo = grid.shape[1:3]
    dimg = np.zeros_like(img)
    dgrid = np.zeros_like(grid)
    for n in range(n_):
        for i in range(ho):
            for j in range(wo):
                for row, col, wgt, dgx, dgy in _corners(grid[n, i, j, 0], grid[n, i, j, 1], h_, w_):
                    for c in range(c_):
                        dimg[n, c, row, col] += wgt * dout[n, c, i, j]
                        dgrid[n, i, j, 0] += dgx * img[n, c, row, col] * dout[n, c, i, j]
                        dgrid[n, i, j, 1] += dgy * img[n, c, row, col] * dout[n, c, i, j]
    return dimg, dgrid


def output_size(size: int, scale: float) -> int:
    return int(math.ceil(size * scale))


def _out_dims(img_shape, scale_width, scale_height):
    n_, c_, h_, w_ = img_shape
    return (n_, c_, output_size(h_, scale_height), output_size(w_, scale_width))


def spatialtf(img, theta, scale_width=1, scale_height=1):
    img = np.asarray(img, np.float64)
    return grid_sample(img, affine_grid(theta, _out_dims(img.shape, scale_width, scale_height)))


def spatialtf_grad(img, theta, dout, scale_width=1, scale_height=1):
    """(dimg, dtheta): gradients of sum(spatialtf(img, theta) * dout)."""
    img = np.asarray(img, np.float64)
    dims = _out_dims(img.shape, scale_width, scale_height)
    dimg, dgrid = grid_sample_grad(img, affine_grid(theta, dims), dout)
    return dimg, affine_grid_grad(dgrid, dims)


def pixel_to_grid(px, size: int):
    """The normalized coordinate of pixel coordinate px along an axis of `size` pixels."""
    return 2.0 * np.asarray(px, np.float64) / (size - 1) - 1.0
