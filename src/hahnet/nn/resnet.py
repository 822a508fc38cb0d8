"""Residual networks for 32x32 inputs (CIFAR forms: a 3x3 stem, no max-pool), standard or
with a HaH front-end: ResNet-18, pre-activation ResNet-18 and WideResNets.

One class, :class:`ResidualNet`, builds every layout of :mod:`hahnet.nn.catalog`. With
``hah=True`` the stem and the first ``(hah_layers - 1) / 2`` blocks of the first stage are
HaH: the stem is a :class:`HaHBlock` and each such block a :class:`HaHResidualBlock`
(shortcut + two HaH blocks); everything after keeps BatchNorm, as in the standard
network. Models take inputs in [0, 1] and normalize themselves, like the VGGs.
"""

from __future__ import annotations

from torch import Tensor, nn

from hahnet.config import ModelConfig
from hahnet.nn.catalog import ResidualLayout, architecture, check_hah_layers
from hahnet.nn.layers import HaHBlock, input_normalization, scaled


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
