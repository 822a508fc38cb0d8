"""The model registry and the VGG networks for 32x32 inputs.

:func:`create_model` builds any registered network by name (:func:`list_models`): the
VGGs defined here and the residual networks of :mod:`hahnet.nn.resnet` (ResNet-18,
PreAct-ResNet-18, WideResNet-16-4 and -28-10), standard or with a HaH front-end.
``vgg16()`` is the CIFAR VGG16 (13 conv blocks, one Linear); ``vgg16(hah=True)`` turns
its first ``hah_layers`` convolutions into HaH blocks and makes the remaining ones WN
convolutions, as in the paper. Models take inputs in [0, 1] and normalize themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from hahnet.config import ModelConfig
from hahnet.nn.catalog import ARCHITECTURES, architecture, check_hah_layers
from hahnet.nn.layers import (CIFAR10_MEAN, CIFAR10_STD, FASHION_MNIST_MEAN,  # noqa: F401
                              FASHION_MNIST_STD, HaHBlock, VGGBlock, default_normalization,
                              input_normalization, scaled)
from hahnet.nn.resnet import ResidualNet

POOL = "M"
VGG_LAYOUTS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """Input normalization, a stack of HaH/VGG blocks and max-pools, one Linear."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch not in VGG_LAYOUTS:
            raise ValueError(f"unknown architecture {config.arch!r}; choose one of {sorted(VGG_LAYOUTS)}")
        if config.width <= 0:
            raise ValueError(f"width must be positive, got {config.width}")
        layout = VGG_LAYOUTS[config.arch]
        if config.hah:
            check_hah_layers(config.arch, config.hah_layers)
        self.config = config
        self.normalize = input_normalization(config.in_channels, config.mean, config.std)
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
        features = self.features(self.normalize(large_enough(x, self.num_pools)))
        return self.classifier(torch.amax(features, dim=(2, 3)))


def large_enough(x: Tensor, num_pools: int) -> Tensor:
    """``x``, or ValueError when its images are too small for ``num_pools`` 2x2 max-pools.
    (A function torch.fx records as one call instead of tracing into, so that
    :func:`hahnet.hahify` can trace the VGGs.)"""
    min_size = 2 ** num_pools
    if x.dim() == 4 and min(x.shape[-2:]) < min_size:
        raise ValueError(f"input of {x.shape[-2]}x{x.shape[-1]} is too small for "
                         f"{num_pools} max-pools; pad images to at least {min_size}x{min_size}")
    return x


torch.fx.wrap("large_enough")

MODEL_CLASSES = (VGG, ResidualNet)  # what build_model returns; what checkpoints save


def build_model(config: ModelConfig) -> VGG | ResidualNet:
    """The model a config describes (used by checkpoints): a VGG or a residual network."""
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {config.arch!r}; choose one of "
                         f"{', '.join(ARCHITECTURES)}")
    return VGG(config) if architecture(config.arch).family == "vgg" else ResidualNet(config)


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


def list_models() -> list[str]:
    """The names :func:`create_model` accepts (each also with a ``_hah`` suffix, which
    makes ``hah=True`` the default)."""
    return list(ARCHITECTURES)


def create_model(name: str, **options: Any) -> VGG | ResidualNet:
    """A fresh model by name, e.g. ``create_model("resnet18", hah=True, width=0.5)``;
    ``options`` are :class:`ModelConfig` fields (hah, width, num_classes, in_channels,
    hah_layers, sigma, keep, mean, std). ``"vgg16_hah"`` is ``"vgg16"`` with hah=True."""
    arch, hah = (name[:-4], True) if name.endswith("_hah") else (name, False)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    unknown = sorted(set(options) - set(ModelConfig.__dataclass_fields__) - {"arch"})
    if unknown or "arch" in options:
        raise ValueError(f"create_model: unknown option(s) {unknown or ['arch']}; the name "
                         f"chooses the architecture, options are ModelConfig fields")
    return build_model(ModelConfig(**{"hah": hah, **options, "arch": arch}))
