"""VGG layouts, widths, parameter counts and input handling."""

import pytest
import torch
from torch import nn

import hahnet
from hahnet import HaHBlock, ModelConfig, VGGBlock, WNConv2d, build_model, vgg16
from hahnet.nn.models import CIFAR10_MEAN, VGG_LAYOUTS


def cifar_vgg16_parameter_count(hah_layers: int) -> int:
    """The standard CIFAR VGG16: bias-free 3x3 convs, BN after each non-HaH conv, Linear(512, 10)."""
    channels = [c for c in VGG_LAYOUTS["vgg16"] if c != "M"]
    total, previous = 0, 3
    for index, c in enumerate(channels):
        total += previous * c * 9
        if index >= hah_layers:
            total += 2 * c
        previous = c
    return total + 512 * 10 + 10


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_cifar_vgg16():
    assert count(vgg16()) == cifar_vgg16_parameter_count(0) == 14_724_042
    assert count(vgg16(hah=True)) == cifar_vgg16_parameter_count(6) == 14_722_250


def test_block_kinds():
    standard = vgg16()
    assert not any(isinstance(m, (WNConv2d, HaHBlock)) for m in standard.modules())
    hah = vgg16(hah=True)
    blocks = [m for m in hah.features if isinstance(m, (HaHBlock, VGGBlock))]
    assert [isinstance(b, HaHBlock) for b in blocks] == [True] * 6 + [False] * 7
    assert all(isinstance(b.conv, WNConv2d) for b in blocks)
    assert [b.conv.out_channels for b in blocks[:6]] == [64, 64, 128, 128, 256, 256]
    assert sum(isinstance(m, nn.Linear) for m in hah.modules()) == 1


@pytest.mark.parametrize("arch,convs", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13), ("vgg19", 16)])
def test_every_architecture_runs(arch, convs):
    model = getattr(hahnet, arch)(hah=True, width=0.0625, hah_layers=3)
    blocks = [m for m in model.features if isinstance(m, (HaHBlock, VGGBlock))]
    assert len(blocks) == convs and sum(isinstance(b, HaHBlock) for b in blocks) == 3
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("width,first", [(0.25, 16), (0.01, 1), (1e-6, 1)])
def test_width_scales_channels_with_at_least_one(width, first):
    model = vgg16(hah=True, width=width)
    assert model.features[0].conv.out_channels == first
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_one_channel_inputs_and_normalization():
    model = vgg16(in_channels=1, num_classes=7, width=0.0625, mean=(0.3,), std=(0.4,))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor([0.3]))
    assert tuple(vgg16().normalize.mean.flatten().tolist()) == pytest.approx(CIFAR10_MEAN)


def test_bad_inputs_get_clear_errors():
    model = vgg16(width=0.0625)
    with pytest.raises(ValueError, match="too small"):
        model(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\)"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model(ModelConfig(arch="vgg17"))
    with pytest.raises(ValueError, match="hah_layers"):
        vgg16(hah=True, hah_layers=14)


def test_config_round_trip_rebuilds_identical_model():
    torch.manual_seed(0)
    model = vgg16(hah=True, width=0.0625, keep=0.3)
    config = ModelConfig.from_dict(model.config.to_dict())
    assert config == model.config
    clone = build_model(config)
    clone.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    model.eval(), clone.eval()
    torch.testing.assert_close(clone(x), model(x))
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"arch": "vgg16", "depth": 3})
