"""Blur corruptions: Gaussian, defocus, glass, motion, zoom."""

from __future__ import annotations

from functools import lru_cache
import numpy as np
import torch

from hahnet.eval.corruptions._common import _clipped_zoom, _correlate, _gaussian, _magick_motion_blur


def _gaussian_blur(x, c, g):
    return _gaussian(x, c, "replicate")


@lru_cache(maxsize=None)
def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c's disk(): aliased disk on a 17x17 grid (radius <= 8), normalised,
    then cv2.GaussianBlur with a 3x3 kernel of sigma alias_blur; trimmed to its support."""
    from scipy.ndimage import correlate
    ax = np.arange(-8, 9)
    xx, yy = np.meshgrid(ax, ax)
    d = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    d /= d.sum()
    g1 = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))
    g1 /= g1.sum()
    k = correlate(d, np.outer(g1, g1), mode="mirror")
    nz = np.nonzero(k > 0)
    r = max(np.abs(nz[0] - 8).max(), np.abs(nz[1] - 8).max())
    return k[8 - r:9 + r, 8 - r:9 + r]


def _defocus_blur(x, c, g):
    return _correlate(x, torch.from_numpy(_disk_kernel(*c)), "reflect101")


def _glass_blur(x, c, g):
    sigma, delta, iterations = c
    n, ch, h, w = x.shape
    x = torch.floor(_gaussian(x, sigma).clamp(0, 1) * 255) / 255  # np.uint8(... * 255)
    # Local shuffles: for h' from h-delta down to delta+1 (same for w'), swap the pixel
    # with a neighbour at offsets drawn from randint(-delta, delta) (upper bound
    # exclusive, as in the original: with delta 1 only -1 or 0, i.e. up/left).
    # Swaps are sequential in position (a pixel may travel), vectorised over images on
    # a permutation index, applied with one gather at the end.
    rows = range(h - delta, delta, -1)
    cols = range(w - delta, delta, -1)
    offs = torch.randint(-delta, delta, (iterations, len(rows), len(cols), 2, n), generator=g)
    perm = torch.arange(h * w).repeat(n, 1)
    for it in range(iterations):
        for a, r in enumerate(rows):
            for b, q in enumerate(cols):
                ddx, ddy = offs[it, a, b, 0], offs[it, a, b, 1]
                i = r * w + q
                j = ((r + ddy) * w + (q + ddx))[:, None]
                pi = perm[:, i].clone()
                perm[:, i] = perm.gather(1, j)[:, 0]
                perm.scatter_(1, j, pi[:, None])
    perm = perm.to(x.device)[:, None, :].expand(n, ch, -1)
    x = x.reshape(n, ch, -1).gather(2, perm).reshape(n, ch, h, w)
    return _gaussian(x, sigma)


def _motion_blur(x, c, g):
    radius, sigma = c
    angles = torch.rand(x.shape[0], generator=g, dtype=torch.float64) * 90 - 45
    return _magick_motion_blur(x, radius, sigma, angles)


def _zoom_blur(x, c, g):
    factors = np.arange(1, c, 0.01)
    out = x.clone()
    for z in factors:
        out = out + _clipped_zoom(x, z)
    return out / (len(factors) + 1)
