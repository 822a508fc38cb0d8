"""VGG networks for 32x32 inputs, standard or with leading HaH blocks.

``vgg16()`` is the CIFAR VGG16 (13 conv blocks, one Linear); ``vgg16(hah=True)`` turns
its first ``hah_layers`` convolutions into HaH blocks and makes the remaining ones WN
convolutions, as in the paper. Models take inputs in [0, 1] and normalize themselves.
"""

from __future__ import annotations


from typing import Any

import torch
from torch import Tensor, nn

from hahnet.config import ModelConfig
from hahnet.nn.layers import HaHBlock, InputNormalize, VGGBlock

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

POOL = "M"
VGG_LAYOUTS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


def default_normalization(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CIFAR-10 statistics for 3 channels, Fashion-MNIST's for 1, else 0.5/0.25."""
    if in_channels == 3:
        return CIFAR10_MEAN, CIFAR10_STD
    if in_channels == 1:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return (0.5,) * in_channels, (0.25,) * in_channels


def scaled(channels: int, width: float) -> int:
    """Channel count scaled by width, at least 1."""
    return max(1, int(round(channels * width)))


class VGG(nn.Module):
    """Input normalization, a stack of HaH/VGG blocks and max-pools, one Linear."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch not in VGG_LAYOUTS:
            raise ValueError(f"unknown architecture {config.arch!r}; choose one of {sorted(VGG_LAYOUTS)}")
        if config.width <= 0:
            raise ValueError(f"width must be positive, got {config.width}")
        layout = VGG_LAYOUTS[config.arch]
        num_convs = sum(1 for item in layout if item != POOL)
        if config.hah and not 0 <= config.hah_layers <= num_convs:
            raise ValueError(f"hah_layers must be in [0, {num_convs}] for {config.arch}, "
                             f"got {config.hah_layers}")
        mean, std = config.mean, config.std
        if mean is None or std is None:
            mean, std = default_normalization(config.in_channels)
        if len(mean) != config.in_channels:
            raise ValueError(f"normalization has {len(mean)} channels but in_channels="
                             f"{config.in_channels}")
        self.config = config
        self.normalize = InputNormalize(mean, std)
        layers: list[nn.Module] = []
        channels, conv_index = config.in_channels, 0
        for item in layout:
            if item == POOL:
                layers.append(nn.MaxPool2d(2))
                continue
            out = scaled(int(item), config.width)
            if config.hah and conv_index < config.hah_layers:
                layers.append(HaHBlock(channels, out, sigma=config.sigma, keep=config.keep))
            else:
                layers.append(VGGBlock(channels, out, wn=config.hah))
            channels, conv_index = out, conv_index + 1
        self.features = nn.Sequential(*layers)
        self.num_pools = layout.count(POOL)
        self.classifier = nn.Linear(channels, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        min_size = 2 ** self.num_pools
        if x.dim() == 4 and min(x.shape[-2:]) < min_size:
            raise ValueError(f"input of {x.shape[-2]}x{x.shape[-1]} is too small for "
                             f"{self.num_pools} max-pools; pad images to at least "
                             f"{min_size}x{min_size}")
        features = self.features(self.normalize(x))
        if features.shape[-2:] != (1, 1):
            features = torch.amax(features, dim=(2, 3))
        return self.classifier(features.flatten(1))


def build_model(config: ModelConfig) -> VGG:
    """The model a config describes (used by checkpoints)."""
    return VGG(config)


def vgg16(hah: bool = False, width: float = 1.0, **options: Any) -> VGG:
    """VGG16 for 32x32 inputs in [0, 1]; ``hah=True`` makes its first ``hah_layers``
    convolutions HaH blocks and the rest WN convolutions. ``width`` scales channels;
    other options are :class:`ModelConfig` fields (num_classes, in_channels, sigma...)."""
    return VGG(ModelConfig(arch="vgg16", hah=hah, width=width, **options))


def vgg11(**options: Any) -> VGG:
    """VGG11; takes the same keyword options as :func:`vgg16`."""
    return VGG(ModelConfig(arch="vgg11", **options))


def vgg13(**options: Any) -> VGG:
    """VGG13; takes the same keyword options as :func:`vgg16`."""
    return VGG(ModelConfig(arch="vgg13", **options))


def vgg19(**options: Any) -> VGG:
    """VGG19; takes the same keyword options as :func:`vgg16`."""
    return VGG(ModelConfig(arch="vgg19", **options))


# name -> (architecture, HaH?): "vgg16" is the standard network, "vgg16_hah" the paper's.
MODELS: dict[str, tuple[str, bool]] = {
    **{arch: (arch, False) for arch in VGG_LAYOUTS},
    **{f"{arch}_hah": (arch, True) for arch in VGG_LAYOUTS},
}


def list_models() -> list[str]:
    """The names :func:`create_model` accepts."""
    return sorted(MODELS)


def create_model(name: str, **options: Any) -> VGG:
    """A fresh model by name, e.g. ``create_model("vgg16_hah", width=0.25)``; ``options``
    are :class:`ModelConfig` fields (width, num_classes, in_channels, hah_layers, ...)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    arch, hah = MODELS[name]
    return VGG(ModelConfig(**{"hah": hah, **options, "arch": arch}))
