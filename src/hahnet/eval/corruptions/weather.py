"""Weather corruptions: fog, frost, snow, spatter."""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor

from hahnet.eval.corruptions._common import _box3, _clipped_zoom, _correlate, _gaussian, _magick_motion_blur, _pad, _plasma, _rand, _randn, _shift_sum


def _fog(x, c, g):
    strength, decay = c
    n, _, h, w = x.shape
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    x = x + strength * _plasma(n, max(h, w), decay, g, x)[:, None, :h, :w]
    return x * max_val / (max_val + strength)


def _frost_texture(n: int, h: int, w: int, g, like: Tensor) -> Tensor:
    """Procedural stand-in for make_cifar_c's frost photographs: (N, 3, H, W) in [0, 1]."""
    haze = _plasma(n, max(h, w), 1.6, g, like)[:, None, :h, :w]
    seeds = (torch.rand((n, 1, h, w), generator=g, dtype=torch.float64) < 0.06).double()
    seeds = (seeds * (0.5 + 0.5 * torch.rand((n, 1, h, w), generator=g,
                                             dtype=torch.float64))).to(like.device, like.dtype)
    needles = torch.zeros_like(seeds)
    taps = torch.arange(-4, 5, dtype=torch.float64)
    for _ in range(3):  # three random crystal directions per image
        theta = torch.rand((n, 1), generator=g, dtype=torch.float64) * math.pi
        dx = torch.round(taps[None] * torch.cos(theta)).long()
        dy = torch.round(taps[None] * torch.sin(theta)).long()
        weight = torch.exp(-0.5 * (taps / 3.0) ** 2)[None].expand(n, -1)
        needles = torch.maximum(needles, _shift_sum(seeds, dx, dy, weight))
    grain = _gaussian(_rand(g, n, 1, h, w, like=like), 0.5)
    tex = (0.3 * haze + 0.8 * needles + 0.25 * (grain - 0.5)).clamp(0, 1)
    tint = torch.tensor([0.86, 0.93, 1.0], device=like.device, dtype=like.dtype)
    return (tex * tint[None, :, None, None]).clamp(0, 1)


def _frost(x, c, g):
    n, _, h, w = x.shape
    return c[0] * x + c[1] * _frost_texture(n, h, w, g, x)


def _gray(x: Tensor) -> Tensor:
    """cv2.COLOR_RGB2GRAY weights."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _snow(x, c, g):
    loc, scale, zoom, thresh, radius, sigma, keep = c
    n = x.shape[0]
    layer = loc + scale * _randn(g, n, 1, *x.shape[-2:], like=x)
    layer = _clipped_zoom(layer, zoom)
    layer = torch.where(layer < thresh, torch.zeros_like(layer), layer)
    layer = torch.floor(layer.clamp(0, 1) * 255) / 255  # uint8 'L' image
    angles = torch.rand(n, generator=g, dtype=torch.float64) * 90 - 135
    layer = _magick_motion_blur(layer, radius, sigma, angles)
    x = keep * x + (1 - keep) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-1, -2)


def _canny(img: Tensor, low: float, high: float) -> Tensor:
    """OpenCV-style Canny on (N,1,H,W) uint8-valued float images -> bool edges."""
    sx = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float64)
    gx = _correlate(img, sx, "replicate")
    gy = _correlate(img, sx.T, "replicate")
    mag = gx.abs() + gy.abs()
    mp = _pad(mag, 1, 1, "zeros")
    h, w = img.shape[-2:]

    def nb(dy, dx):
        return mp[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    ax, ay = gx.abs(), gy.abs()
    tan22, tan67 = math.tan(math.radians(22.5)), math.tan(math.radians(67.5))
    horiz = ay <= tan22 * ax
    vert = ay > tan67 * ax
    same_sign = (gx * gy) > 0
    # neighbours across the edge (along the gradient); y grows downwards
    n1 = torch.where(horiz, nb(0, -1), torch.where(vert, nb(-1, 0),
                     torch.where(same_sign, nb(-1, -1), nb(-1, 1))))
    n2 = torch.where(horiz, nb(0, 1), torch.where(vert, nb(1, 0),
                     torch.where(same_sign, nb(1, 1), nb(1, -1))))
    peak = (mag > n1) & (mag >= n2) & (mag > low)
    edges = peak & (mag > high)
    for _ in range(h * w):  # hysteresis: grow strong edges through weak peaks
        grown = peak & (F.max_pool2d(edges.to(img.dtype), 3, 1, 1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown | edges
    return edges


def _distance_to(edges: Tensor, chunk: int = 16) -> Tensor:
    """Exact Euclidean distance of every pixel to the nearest True pixel of (N,1,H,W)."""
    n, _, h, w = edges.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    p = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).to(edges.device)
    d2 = torch.cdist(p, p).pow(2)  # (HW, HW)
    out = []
    for s in range(0, n, chunk):
        e = edges[s:s + chunk].reshape(-1, 1, h * w)
        big = torch.where(e, torch.zeros((), dtype=d2.dtype, device=e.device),
                          torch.full((), 1e12, dtype=d2.dtype, device=e.device))
        out.append((d2[None] + big).amin(-1).sqrt())
    return torch.cat(out).reshape(n, 1, h, w)


def _equalize_hist(v: Tensor) -> Tensor:
    """cv2.equalizeHist per image on (N,1,H,W) integer-valued tensors in 0..255."""
    n = v.shape[0]
    flat = v.reshape(n, -1).long()
    hist = torch.zeros(n, 256, dtype=torch.float64, device=v.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    cdf = hist.cumsum(1)
    total = cdf[:, -1:]
    first = (hist > 0).double().argmax(1, keepdim=True)
    c0 = hist.gather(1, first)
    lut = torch.round((cdf - c0) * 255 / (total - c0).clamp_min(1)).clamp(0, 255)
    constant = (c0 == total)
    lut = torch.where(constant, first.double().expand(-1, 256), lut)
    return lut.gather(1, flat).reshape(v.shape).to(v.dtype)


def _spatter(x, c, g):
    loc, scale, sigma, thresh, k, mode = c
    n, _, h, w = x.shape
    liquid = loc + scale * _randn(g, n, 1, h, w, like=x)
    liquid = _gaussian(liquid, sigma, "replicate")
    liquid = torch.where(liquid < thresh, torch.zeros_like(liquid), liquid)
    if mode == 0:  # water drops with an embossed rim
        lq = torch.floor((liquid * 255).clamp(0, 255))
        edges = _canny(lq.double(), 50, 150)
        dist = _distance_to(edges).clamp(max=20)
        dist = torch.floor(_box3(dist))
        dist = _equalize_hist(dist)
        emboss = torch.tensor([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=torch.float64)
        dist = torch.round(_correlate(dist, emboss, "reflect101")).clamp(0, 255)
        dist = torch.round(_box3(dist))
        m = (lq.double() * dist)
        m = m / m.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) * k
        color = torch.tensor([175, 238, 238], dtype=torch.float64) / 255
        m = m.to(x.dtype)
        return x + m * color.to(x.device, x.dtype)[None, :, None, None]
    # mud
    m = (liquid > thresh).to(x.dtype)
    m = _gaussian(m, k, "replicate")
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    color = torch.tensor([63, 42, 20], dtype=torch.float64).to(x.device, x.dtype) / 255
    return x * (1 - m) + color[None, :, None, None] * m
