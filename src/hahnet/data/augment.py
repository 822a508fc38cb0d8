"""Batched augmentation on the training device: the paper's random crop (4-pixel zero
padding) and horizontal flip, drawn from a seeded generator and applied as one gather."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

def crop_flip_params(n: int, generator: torch.Generator,
                     pad: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Random crop offsets dy, dx in [0, 2*pad] and flip flags for ``n`` images, on CPU;
    drawn apart from :func:`crop_flip` so ranks can slice a shared global draw."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return dy, dx, flip


def crop_flip(images: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int = 4) -> Tensor:
    """Crop (H, W) at (dy, dx) from the ``pad``-zero-padded batch, then mirror where ``flip``;
    one gather on the batch's device, any dtype. dy = dx = pad and no flip is the identity."""
    n, c, h, w = images.shape
    dev = images.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    hp, wp = h + 2 * pad, w + 2 * pad
    padded = F.pad(images, (pad, pad, pad, pad)).reshape(n, c, hp * wp)
    cols = torch.arange(w, device=dev)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)
    rows = dy[:, None] + torch.arange(h, device=dev)
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return padded.gather(2, index).reshape(n, c, h, w)
