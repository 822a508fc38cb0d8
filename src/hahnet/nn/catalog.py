"""The registered architectures as plain facts (no torch): which names exist, what family
each belongs to, and which leading convolutions ``hah=True`` may turn into HaH blocks.

Kept free of torch and of every other hahnet module, so that the settings
(:mod:`hahnet.config`) can validate a model name and choose its default number of HaH
layers without building anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResidualLayout:
    """A CIFAR residual network: a 3x3 stem, then stages of residual blocks.

    ``stem``: the stem's output channels; ``channels``/``blocks``: per stage, the output
    channels and the number of blocks (stages after the first halve the resolution with a
    stride-2 first block); ``preact``: pre-activation blocks (BN-ReLU-conv) instead of
    post-activation ones (conv-BN-ReLU). Channels are at width 1."""

    preact: bool
    stem: int
    channels: tuple[int, ...]
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class Architecture:
    """One registered name: its ``family`` ("vgg" or "residual"), how many leading
    convolutions can be HaH blocks at most (``max_hah_layers``) and, for residual
    networks, their layout."""

    name: str
    family: str
    max_hah_layers: int
    summary: str
    layout: ResidualLayout | None = None


def _residual(name: str, summary: str, layout: ResidualLayout) -> Architecture:
    """A residual architecture whose HaH part is the stem and the whole first stage
    (two convolutions per block)."""
    return Architecture(name, "residual", 1 + 2 * layout.blocks[0], summary, layout)


_RESNET18 = (64, 128, 256, 512), (2, 2, 2, 2)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("vgg11", "vgg", 8, "VGG11, 8 convolutions, 5 max-pools, one Linear"),
    Architecture("vgg13", "vgg", 10, "VGG13, 10 convolutions, 5 max-pools, one Linear"),
    Architecture("vgg16", "vgg", 13, "VGG16, 13 convolutions, 5 max-pools, one Linear "
                                     "(the paper's network)"),
    Architecture("vgg19", "vgg", 16, "VGG19, 16 convolutions, 5 max-pools, one Linear"),
    _residual("resnet18", "ResNet-18 (CIFAR form: 3x3 stem, no max-pool), 11.2M parameters",
              ResidualLayout(False, 64, *_RESNET18)),
    _residual("preact_resnet18", "pre-activation ResNet-18 (CIFAR form), 11.2M parameters",
              ResidualLayout(True, 64, *_RESNET18)),
    _residual("wrn_16_4", "WideResNet-16-4 (pre-activation, CIFAR form), 2.7M parameters",
              ResidualLayout(True, 16, (64, 128, 256), (2, 2, 2))),
    _residual("wrn_28_10", "WideResNet-28-10 (pre-activation, CIFAR form), 36.5M parameters",
              ResidualLayout(True, 16, (160, 320, 640), (4, 4, 4))),
)}


def architecture(name: str) -> Architecture:
    """The architecture called ``name``; ValueError listing the known names if none is."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def allowed_hah_layers(name: str) -> list[int]:
    """How many leading convolutions of ``name`` can be HaH blocks: for VGG any count up to
    its convolutions; for a residual network none, the stem alone (1) or the stem and whole
    residual blocks of the first stage (1 + 2m)."""
    arch = architecture(name)
    if arch.family == "vgg":
        return list(range(arch.max_hah_layers + 1))
    return [0] + list(range(1, arch.max_hah_layers + 1, 2))


def describe_hah_layers(name: str) -> str:
    """The accepted hah_layers of ``name`` in words, for error messages."""
    allowed = allowed_hah_layers(name)
    if architecture(name).family == "vgg":
        return f"in [0, {allowed[-1]}] for {name}"
    return (f"one of {allowed} for {name} (the stem, then whole residual blocks of the "
            f"first stage, 2 convolutions each)")


def check_hah_layers(name: str, hah_layers: int) -> None:
    """ValueError (one line) unless ``hah_layers`` is allowed for ``name``."""
    if hah_layers not in allowed_hah_layers(name):
        raise ValueError(f"hah_layers must be {describe_hah_layers(name)}, got {hah_layers}")
