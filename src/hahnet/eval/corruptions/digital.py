"""Digital corruptions: contrast, brightness, saturate, JPEG, pixelate, elastic transform."""

from __future__ import annotations

import io
import numpy as np
import torch
from torch import Tensor

from hahnet.eval.corruptions._common import _gaussian, _pil_box_matrix, _pixel_grid, _sample


def _contrast(x, c, g):
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


def _brightness(x, c, g):
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    ratio = torch.where(v > 0, v_new / v.clamp_min(1e-12), torch.zeros_like(v))
    return torch.where(v > 0, x * ratio, v_new.expand_as(x))


def _saturate(x, c, g):
    a, b = c
    v = x.amax(dim=1, keepdim=True)
    mn = x.amin(dim=1, keepdim=True)
    s = torch.where(v > 0, (v - mn) / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * a + b).clamp(0, 1)
    coloured = v - (v - x) * s_new / s.clamp_min(1e-12)
    # skimage gives grey (and black) pixels hue 0: (V, V(1-S'), V(1-S'))
    grey = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], dim=1)
    return torch.where(s > 0, coloured, grey)


def _to_uint8_hwc(x: Tensor) -> np.ndarray:
    return torch.round(x.detach().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _jpeg_compression(x, c, g):
    from PIL import Image
    arr = _to_uint8_hwc(x)
    out = np.empty_like(arr)
    for i, img in enumerate(arr):  # the codec is per image
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(c))
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


def _pixelate(x, c, g):
    h, w = x.shape[-2:]
    sh, sw = int(h * c), int(w * c)
    dh = torch.from_numpy(_pil_box_matrix(h, sh)).to(x.device, x.dtype)
    dw = torch.from_numpy(_pil_box_matrix(w, sw)).to(x.device, x.dtype)
    uh = torch.from_numpy(_pil_box_matrix(sh, h)).to(x.device, x.dtype)
    uw = torch.from_numpy(_pil_box_matrix(sw, w)).to(x.device, x.dtype)
    return (uh @ dh) @ x @ (uw @ dw).T


def _elastic_transform(x, c, g):
    alpha, sigma, jitter = c
    n, _, h, w = x.shape
    # random affine: three points around the centre jittered by U(-jitter, jitter)
    centre = torch.tensor([float(w // 2), float(h // 2)], dtype=torch.float64)
    sq = float(min(h, w) // 3)
    pts1 = torch.stack([centre + sq, torch.stack([centre[0] + sq, centre[1] - sq]),
                        centre - sq])  # (3, 2) as (x, y)
    pts2 = pts1[None] + (torch.rand((n, 3, 2), generator=g, dtype=torch.float64)
                         * 2 * jitter - jitter)
    # M (2x3) maps pts1 -> pts2; warpAffine samples the source at M^-1 (dst)
    a = torch.cat([pts1, torch.ones(3, 1, dtype=torch.float64)], 1)  # (3, 3)
    m = torch.linalg.solve(a[None], pts2).transpose(1, 2)  # (N, 2, 3)
    full = torch.cat([m, torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64).expand(n, 1, 3)], 1)
    inv = torch.linalg.inv(full)[:, :2].to(x.device)
    xs, ys = _pixel_grid(h, w, x.device, torch.float64)
    px = inv[:, 0, 0, None, None] * xs + inv[:, 0, 1, None, None] * ys + inv[:, 0, 2, None, None]
    py = inv[:, 1, 0, None, None] * xs + inv[:, 1, 1, None, None] * ys + inv[:, 1, 2, None, None]
    x = _sample(x, px, py, "reflect101")
    # smooth random displacement field (scipy 'reflect' borders, truncate 3)
    fields = torch.rand((n, 2, h, w), generator=g, dtype=torch.float64) * 2 - 1
    if alpha == 0:
        return x
    fields = _gaussian(fields.to(x.device), sigma, "symmetric", truncate=3.0) * alpha
    drow, dcol = fields[:, 0], fields[:, 1]
    return _sample(x, xs + dcol, ys + drow, "symmetric")
