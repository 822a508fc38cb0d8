"""Shared helpers of the corruptions: seeded random draws, padding, correlation, Gaussian and motion kernels, clipped zoom, resampling, plasma fractal."""

from __future__ import annotations

import math
from functools import lru_cache
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _rand(g, *shape, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=g, dtype=torch.float64).to(like.device, like.dtype)


def _randn(g, *shape, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(like.device, like.dtype)


def _pad(x: Tensor, ph: int, pw: int, mode: str) -> Tensor:
    """Pad the last two dims. mode: 'replicate', 'reflect101', 'symmetric', 'zeros'."""
    if ph == 0 and pw == 0:
        return x
    if mode == "zeros":
        return F.pad(x, (pw, pw, ph, ph))
    h, w = x.shape[-2:]

    def index(n, p):
        i = torch.arange(-p, n + p, device=x.device)
        if mode == "replicate":
            return i.clamp(0, n - 1)
        if mode == "reflect101":
            period = max(2 * n - 2, 1)
            i = i.remainder(period)
            return torch.where(i >= n, period - i, i)
        if mode == "symmetric":
            i = i.remainder(2 * n)
            return torch.where(i >= n, 2 * n - 1 - i, i)
        raise ValueError(mode)

    return x.index_select(-2, index(h, ph)).index_select(-1, index(w, pw))


def _correlate(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """2-D correlation of every channel of x (N,C,H,W) with one (kh,kw) kernel."""
    kh, kw = kernel.shape
    n, c, h, w = x.shape
    xp = _pad(x.reshape(n * c, 1, h, w), kh // 2, kw // 2, mode)
    out = F.conv2d(xp, kernel.to(x.device, x.dtype)[None, None])
    return out.reshape(n, c, h, w)


def _gaussian_1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = int(truncate * float(sigma) + 0.5)
    if sigma <= 0 or radius == 0:
        return np.ones(1)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _gaussian(x: Tensor, sigma: float, mode: str = "replicate", truncate: float = 4.0) -> Tensor:
    """scipy.ndimage.gaussian_filter over the two spatial axes (skimage's ``gaussian``)."""
    k = torch.from_numpy(_gaussian_1d(sigma, truncate))
    if k.numel() == 1:
        return x
    x = _correlate(x, k[None, :], mode)
    return _correlate(x, k[:, None], mode)


def _box3(x: Tensor) -> Tensor:
    """cv2.blur(x, (3, 3)) with OpenCV's default reflect-101 border."""
    return _correlate(x, torch.full((3, 3), 1 / 9, dtype=torch.float64), "reflect101")


def _shift_sum(x: Tensor, dx: Tensor, dy: Tensor, weights: Tensor) -> Tensor:
    """out[n,:,y,x] = sum_i weights[n,i] * x[n,:,y+dy[n,i],x+dx[n,i]] with edge replication.

    dx, dy: (N, T) integer offsets; weights (N, T).  Loops over taps T, not images.
    """
    n, c, h, w = x.shape
    r = int(max(dx.abs().max().item(), dy.abs().max().item(), 0))
    xp = _pad(x, r, r, "replicate").reshape(n, c, -1)
    wp = w + 2 * r
    base = ((torch.arange(h, device=x.device) + r)[:, None] * wp
            + (torch.arange(w, device=x.device) + r)[None, :]).reshape(1, -1)
    out = torch.zeros_like(x).reshape(n, c, -1)
    dx, dy, weights = dx.to(x.device), dy.to(x.device), weights.to(x.device, x.dtype)
    for t in range(dx.shape[1]):
        idx = (base + (dy[:, t] * wp + dx[:, t])[:, None]).unsqueeze(1).expand(n, c, -1)
        out += weights[:, t, None, None] * xp.gather(2, idx)
    return out.reshape(n, c, h, w)


def _magick_motion_blur(x: Tensor, radius: float, sigma: float, angles_deg: Tensor) -> Tensor:
    """ImageMagick MotionBlurImage(radius, sigma, angle) with one angle per image."""
    width = int(2 * math.ceil(radius) + 1)
    i = torch.arange(width, dtype=torch.float64)
    k = torch.exp(-(i * i) / (2 * sigma * sigma))
    k = k / k.sum()
    theta = torch.deg2rad(angles_deg.double())[:, None]
    dx = torch.ceil(i[None] * torch.cos(theta) - 0.5).long()
    dy = torch.ceil(i[None] * torch.sin(theta) - 0.5).long()
    return _shift_sum(x, dx, dy, k[None].expand(x.shape[0], -1))


@lru_cache(maxsize=None)
def _clipped_zoom_matrix(n: int, zoom: float) -> np.ndarray:
    """(n, n) matrix M with M @ v == make_cifar_c's clipped_zoom along one axis of size n.

    Centre crop of ceil(n/z) samples, scipy order-1 zoom (output size round(ch*z),
    corner-aligned mapping), centre trim back to n.
    """
    ch = int(np.ceil(n / zoom))
    top = (n - ch) // 2
    out = int(round(ch * zoom))
    trim = (out - n) // 2
    scale = (ch - 1) / (out - 1) if out > 1 else 0.0
    m = np.zeros((n, n))
    for j in range(n):
        src = top + (j + trim) * scale
        i0 = min(int(np.floor(src)), n - 1)
        f = src - i0
        m[j, i0] += 1 - f
        if f > 0:
            m[j, i0 + 1] += f
    return m


def _clipped_zoom(x: Tensor, zoom: float) -> Tensor:
    h, w = x.shape[-2:]
    mh = torch.from_numpy(_clipped_zoom_matrix(h, float(zoom))).to(x.device, x.dtype)
    mw = torch.from_numpy(_clipped_zoom_matrix(w, float(zoom))).to(x.device, x.dtype)
    return mh @ x @ mw.T


@lru_cache(maxsize=None)
def _pil_box_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's BOX resampling coefficients (Resample.c precompute_coeffs) as a matrix."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    m = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        for xi in range(lo, hi):
            t = (xi - center + 0.5) / filterscale
            m[xx, xi] = 1.0 if -0.5 <= t < 0.5 else 0.0
        m[xx] /= m[xx].sum()
    return m


def _pixel_grid(h: int, w: int, device, dtype) -> tuple[Tensor, Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                            torch.arange(w, device=device, dtype=dtype), indexing="ij")
    return xs, ys


def _sample(x: Tensor, px: Tensor, py: Tensor, border: str) -> Tensor:
    """Bilinear sample x (N,C,H,W) at pixel coordinates px, py (N,H,W).

    border 'reflect101' (cv2 BORDER_REFLECT_101) or 'symmetric' (scipy 'reflect').
    """
    h, w = x.shape[-2:]
    if border == "reflect101":
        gx, gy = 2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1
        align = True
    else:
        gx, gy = (2 * px + 1) / w - 1, (2 * py + 1) / h - 1
        align = False
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=align)


def _plasma(n: int, size: int, decay: float, g, like: Tensor) -> Tensor:
    """Batched diamond-square height maps (N, size, size) in [0, 1] (periodic)."""
    s = 1 << max(int(math.ceil(math.log2(max(size, 2)))), 1)
    m = torch.zeros(n, s, s, dtype=torch.float64)
    step, wibble = s, 100.0

    def noisy_mean(total):
        return total / 4 + wibble * (torch.rand(total.shape, generator=g, dtype=torch.float64)
                                     * 2 * wibble - wibble)

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        acc = corners + corners.roll(-1, 1)
        acc = acc + acc.roll(-1, 2)
        m[:, half::step, half::step] = noisy_mean(acc)
        centres = m[:, half::step, half::step]
        # points on the rows of the corners, between two corners
        m[:, ::step, half::step] = noisy_mean(centres + centres.roll(1, 1)
                                              + corners + corners.roll(-1, 2))
        # points on the columns of the corners, between two corners
        m[:, half::step, ::step] = noisy_mean(centres + centres.roll(1, 2)
                                              + corners + corners.roll(-1, 1))
        step //= 2
        wibble /= decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    m = m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return m[:, :size, :size].to(like.device, like.dtype)
