"""Building blocks of HaH networks: weight-normalized convolution, divisive
normalization, top-fraction threshold, and the HaH and VGG blocks built from them.

Every layer is a plain ``nn.Module`` on NCHW tensors; their fused autograd functions
are in :mod:`hahnet.nn.fused`. The HaH cost lives in :mod:`hahnet.nn.hah`, which computes a
convolution's score through :func:`conv_override` (no layer attribute is ever set).
The formulas and the paper's settings: docs/method.md.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hahnet.config import PAPER_KEEP, PAPER_SIGMA
from hahnet.nn.fused import (_DivisiveNorm, _TopFraction, divisive_norm_reference, eager_mode,
                             hah_activation, normalize_filters, top_fraction_reference)

WN_EPS = 1e-6
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

# (x, normalized weight, stride, padding) -> output; see conv_override.
ConvFunction = Callable[[Tensor, Tensor, tuple, tuple], Tensor]
_OVERRIDES: ContextVar[Mapping[nn.Module, ConvFunction] | None] = ContextVar(
    "hahnet_conv_overrides", default=None)


@contextlib.contextmanager
def conv_override(functions: Mapping[nn.Module, ConvFunction]) -> Iterator[None]:
    """Inside this block, each :class:`WNConv2d` in ``functions`` computes its output
    with its function instead of ``conv2d`` (how the HaH objective gets a layer's score
    and routes its gradient), in this thread/context only; the layers are not changed."""
    token = _OVERRIDES.set(functions)
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


class WNConv2d(nn.Conv2d):
    """Convolution whose output channel k is divided by ``||W_k||_2 + 1e-6``.

    The division happens in the forward pass (weights are not re-parameterized), so
    gradients flow through the norm. Dividing the filter before the convolution is the
    same linear map as dividing its output, and costs a weight-sized op instead of an
    activation-sized one.
    """

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_size: int | tuple[int, int] = 3, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=padding, bias=False)

    def normalized_weight(self) -> Tensor:
        """The filters divided by their l2 norms (each over in_channels x kH x kW)."""
        return normalize_filters(self.weight, WN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.normalized_weight()
        overrides = _OVERRIDES.get()
        function = overrides.get(self) if overrides is not None else None
        if function is not None:
            return function(x, weight, self.stride, self.padding)
        return F.conv2d(x, weight, None, self.stride, self.padding)


class DivisiveNorm2d(nn.Module):
    """Divide each activation by a local suppression field of its neighbourhood.

    ``s = mean_c(maxpool_{pool x pool}(|x|))`` and
    ``d = sigma * max_{h,w}(s) + (1 - sigma) * s + 1e-7`` (max per image); returns x / d.
    Strong local responses thereby suppress weaker ones.
    """

    def __init__(self, sigma: float = PAPER_SIGMA, pool: int = 3) -> None:
        super().__init__()
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"DivisiveNorm2d: sigma must be in [0, 1], got {sigma}")
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"DivisiveNorm2d: pool must be a positive odd size, got {pool}")
        self.sigma = sigma
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        if not eager_mode():
            return divisive_norm_reference(x, self.sigma, self.pool)
        return _DivisiveNorm.apply(x, self.sigma, self.pool)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, pool={self.pool}"


def threshold_rank(num_positions: int, keep: float) -> int:
    """k such that values above the k-th smallest of a map survive: floor((1-keep)*HW).

    Computed with a small tolerance so that e.g. (1 - 0.2) * 10 gives 8, not 7.
    """
    return int(math.floor((1.0 - keep) * num_positions + 1e-9))


class TopFractionThreshold(nn.Module):
    """Keep, per image and channel, the activations above the k-th smallest value of
    that channel's H*W map, with ``k = floor((1 - keep) * H * W)``; zero the rest.

    The comparison is strict, so ties at the threshold and all-zero maps are zeroed
    (never "keep everything"). With k = 0 (tiny maps) every activation is kept.
    """

    def __init__(self, keep: float = PAPER_KEEP) -> None:
        super().__init__()
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"TopFractionThreshold: keep must be in (0, 1], got {keep}")
        self.keep = keep

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        k = threshold_rank(h * w, self.keep)
        if k == 0:
            return x
        if not eager_mode():
            return top_fraction_reference(x, k)
        return _TopFraction.apply(x, k)

    def extra_repr(self) -> str:
        return f"keep={self.keep}"


class HaHBlock(nn.Module):
    """WN conv -> ReLU -> divisive normalization -> top-fraction threshold. The paper's
    convolution is 3x3, stride 1, padding 1; :func:`hahnet.hahify` passes other shapes."""

    def __init__(self, in_channels: int, out_channels: int, sigma: float = PAPER_SIGMA,
                 keep: float = PAPER_KEEP, kernel_size: int | tuple[int, int] = 3,
                 stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 1) -> None:
        super().__init__()
        self.conv = WNConv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.relu = nn.ReLU()
        self.divnorm = DivisiveNorm2d(sigma)
        self.threshold = TopFractionThreshold(keep)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.conv(x))

    def activation(self, z: Tensor) -> Tensor:
        """threshold(divnorm(relu(z))) of the convolution's output ``z``."""
        return hah_block_activation(z, self.relu, self.divnorm, self.threshold)


def hah_block_activation(z: Tensor, relu: nn.Module, divnorm: nn.Module,
                         threshold: nn.Module) -> Tensor:
    """``threshold(divnorm(relu(z)))``; as one fused pass (:func:`hahnet.nn.fused.hah_activation`)
    in eager CPU execution when the parts are plain ReLU, DivisiveNorm2d and
    TopFractionThreshold modules without hooks (the fused code computes exactly their
    formulas, and would skip the hooks)."""
    parts = ((relu, nn.ReLU), (divnorm, DivisiveNorm2d), (threshold, TopFractionThreshold))
    k = threshold_rank(z.shape[-2] * z.shape[-1], threshold.keep) \
        if z.dim() == 4 and type(threshold) is TopFractionThreshold else 0
    if k and z.device.type == "cpu" and eager_mode() and all(
            type(m) is kind and not (m._forward_hooks or m._forward_pre_hooks)
            for m, kind in parts):
        return hah_activation(z, divnorm.sigma, divnorm.pool, k)
    return threshold(divnorm(relu(z)))


class VGGBlock(nn.Module):
    """conv -> ReLU -> BatchNorm2d (the authors' order); ``wn`` picks a WN conv."""

    def __init__(self, in_channels: int, out_channels: int, wn: bool = False) -> None:
        super().__init__()
        if wn:
            self.conv: nn.Conv2d = WNConv2d(in_channels, out_channels)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.relu(self.conv(x)))


class InputNormalize(nn.Module):
    """Maps inputs in [0, 1] to ``(x - mean) / std`` per channel, inside the model so
    that noise and attacks act in pixel space."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"InputNormalize: mean has {len(mean)} channels, std {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"InputNormalize: std must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"expected input of shape (N, {self.mean.shape[1]}, H, W) "
                             f"in [0, 1], got {tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        mean = tuple(round(v, 4) for v in self.mean.flatten().tolist())
        std = tuple(round(v, 4) for v in self.std.flatten().tolist())
        return f"mean={mean}, std={std}"


def default_normalization(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CIFAR-10 statistics for 3 channels, Fashion-MNIST's for 1, else 0.5/0.25."""
    if in_channels == 3:
        return CIFAR10_MEAN, CIFAR10_STD
    if in_channels == 1:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return (0.5,) * in_channels, (0.25,) * in_channels


def input_normalization(in_channels: int, mean: tuple[float, ...] | None,
                        std: tuple[float, ...] | None) -> InputNormalize:
    """The model's first module: ``mean``/``std`` if given, else the defaults for
    ``in_channels``; ValueError when their length is not ``in_channels``."""
    if mean is None or std is None:
        mean, std = default_normalization(in_channels)
    if len(mean) != in_channels:
        raise ValueError(f"normalization has {len(mean)} channels but in_channels={in_channels}")
    return InputNormalize(mean, std)


def scaled(channels: int, width: float) -> int:
    """Channel count scaled by width, at least 1."""
    return max(1, int(round(channels * width)))
