"""The model registry and the VGG networks for 32x32 inputs.

:func:`create_model` builds any registered network by name (:func:`list_models`): the
VGGs and the residual networks (ResNet-18, PreAct-ResNet-18, WideResNet-16-4 and -28-10,
CIFAR forms: a 3x3 stem, no max-pool), standard or with a HaH front-end.
``vgg16()`` is the CIFAR VGG16 (13 conv blocks, one Linear); ``vgg16(hah=True)`` turns
its first ``hah_layers`` convolutions into HaH blocks and makes the remaining ones WN
convolutions, as in the paper. Models take inputs in [0, 1] and normalize themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from hahnet.config import ARCHITECTURES, ModelConfig, ResidualLayout, architecture, check_hah_layers
from hahnet.nn.layers import (CIFAR10_MEAN, CIFAR10_STD, FASHION_MNIST_MEAN,  # noqa: F401
                              FASHION_MNIST_STD, HaHBlock, VGGBlock, default_normalization,
                              input_normalization, scaled)

# ------------------------------------------------------------- residual networks
# With hah=True the stem and the first (hah_layers - 1) / 2 blocks of the first stage are
# HaH (the stem a HaHBlock, each such block a HaHResidualBlock: shortcut + two HaH blocks);
# everything after keeps BatchNorm, as in the standard network.

def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class ConvBNReLU(nn.Module):
    """conv3x3 -> BatchNorm -> ReLU: the post-activation ResNet's stem."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet's block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the
    shortcut is a 1x1 conv + BatchNorm where the shape changes, else the identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(conv1x1(in_channels, out_channels, stride),
                                          nn.BatchNorm2d(out_channels))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """The pre-activation block (also WideResNet's): ``a = relu1(bn1(x))``, then
    ``conv2(relu2(bn2(conv1(a)))) + shortcut``; the shortcut is a 1x1 conv of ``a`` where
    the shape changes, else ``x`` itself."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv1x1(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(activated)
        return self.conv2(self.relu2(self.bn2(self.conv1(activated)))) + skip


class HaHResidualBlock(nn.Module):
    """``shortcut(x) + hah2(hah1(x))``: a residual block whose two convolutions are HaH
    blocks. Each HaH block ends in its own ReLU, normalization and threshold, so the sum
    needs no ReLU after it (with the identity shortcut on a HaH output it is non-negative
    anyway). The shortcut is the identity, or a bias-free 1x1 conv where the channels change."""

    def __init__(self, in_channels: int, out_channels: int, sigma: float, keep: float) -> None:
        super().__init__()
        self.hah1 = HaHBlock(in_channels, out_channels, sigma=sigma, keep=keep)
        self.hah2 = HaHBlock(out_channels, out_channels, sigma=sigma, keep=keep)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = conv1x1(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.hah2(self.hah1(x))


def _stem(layout: ResidualLayout, in_channels: int, out: int, config: ModelConfig,
          hah: bool) -> nn.Module:
    if hah:
        return HaHBlock(in_channels, out, sigma=config.sigma, keep=config.keep)
    return conv3x3(in_channels, out) if layout.preact else ConvBNReLU(in_channels, out)


def _stage(layout: ResidualLayout, index: int, in_channels: int, out: int,
           hah_blocks: int, config: ModelConfig) -> nn.Sequential:
    """Stage ``index``: its first ``hah_blocks`` blocks HaH, the rest standard; stages
    after the first start with a stride-2 block."""
    blocks: list[nn.Module] = []
    for b in range(layout.blocks[index]):
        stride = 2 if index > 0 and b == 0 else 1
        if b < hah_blocks:
            blocks.append(HaHResidualBlock(in_channels, out, config.sigma, config.keep))
        elif layout.preact:
            blocks.append(PreActBlock(in_channels, out, stride))
        else:
            blocks.append(BasicBlock(in_channels, out, stride))
        in_channels = out
    return nn.Sequential(*blocks)


class ResidualNet(nn.Module):
    """Input normalization, stem, stages of residual blocks, (pre-activation nets: a final
    BatchNorm + ReLU), global average pooling, one Linear."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        spec = architecture(config.arch)
        if spec.layout is None:
            raise ValueError(f"{config.arch} is not a residual network; build it with "
                             f"hahnet.create_model")
        if config.width <= 0:
            raise ValueError(f"width must be positive, got {config.width}")
        hah_layers = config.hah_layers if config.hah else 0
        check_hah_layers(config.arch, hah_layers)
        layout = spec.layout
        self.config = config
        self.normalize = input_normalization(config.in_channels, config.mean, config.std)
        channels = scaled(layout.stem, config.width)
        self.stem = _stem(layout, config.in_channels, channels, config, hah_layers >= 1)
        stages = []
        for index, base in enumerate(layout.channels):
            out = scaled(base, config.width)
            hah_blocks = (hah_layers - 1) // 2 if index == 0 and hah_layers else 0
            stages.append(_stage(layout, index, channels, out, hah_blocks, config))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.head: nn.Module = nn.Identity()
        if layout.preact:
            self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())
        self.classifier = nn.Linear(channels, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.head(self.stages(self.stem(self.normalize(x))))
        return self.classifier(features.mean(dim=(2, 3)))


# ------------------------------------------------------------------- VGG and registry

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
