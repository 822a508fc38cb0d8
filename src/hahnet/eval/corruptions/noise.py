"""Noise corruptions: Gaussian, shot (Poisson), impulse (salt and pepper), speckle."""

from __future__ import annotations

import torch

from hahnet.eval.corruptions._common import _rand, _randn


def _gaussian_noise(x, c, g):
    return x + c * _randn(g, *x.shape, like=x)


def _shot_noise(x, c, g):
    rate = (x.detach().double().cpu() * c).clamp_min(0)
    return (torch.poisson(rate, generator=g) / c).to(x.device, x.dtype)


def _impulse_noise(x, c, g):
    flipped = _rand(g, *x.shape, like=x) <= c
    salted = _rand(g, *x.shape, like=x) <= 0.5
    x = torch.where(flipped & salted, torch.ones_like(x), x)
    return torch.where(flipped & ~salted, torch.zeros_like(x), x)


def _speckle_noise(x, c, g):
    return x + x * c * _randn(g, *x.shape, like=x)
