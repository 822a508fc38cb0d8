"""hahify: a HaH front-end for any CNN. A ResNet-like module written here the way
torchvision writes its ResNet (one ReLU module called twice per block, ``out +=
identity``, a stem max-pool) stands in for torchvision, which is not installed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hahnet
from hahnet.nn.hah import hah_convs
from hahnet.nn.fused import divisive_norm_reference, top_fraction_reference
from hahnet.nn.hahify import HahifyError
from hahnet.nn.layers import threshold_rank


class Block(nn.Module):
    def __init__(self, channels: int, out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, stem_bias: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5, 1, 2, bias=stem_bias)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(Block(8, 8), Block(8, 16, stride=2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.layer1(x).mean(dim=(2, 3)))


def tiny(stem_bias: bool = False) -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet(stem_bias)
    for m in model.modules():  # non-trivial BatchNorm statistics and affine terms
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hah_reference(x, weight, padding, stride=1, sigma=0.1, keep=0.2):
    """A HaH block's output from plain formulas: normalized-filter conv, ReLU, divisive
    normalization, top-fraction threshold."""
    normed = weight / (weight.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) + 1e-6)
    a = torch.relu(F.conv2d(x, normed, None, stride, padding))
    y = divisive_norm_reference(a, sigma, 3)
    k = threshold_rank(y.shape[2] * y.shape[3], keep)
    return top_fraction_reference(y, k) if k else y


def test_stem_becomes_a_hah_block_and_the_rest_computes_as_before():
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    converted = hahnet.hahify(model, blocks=1)
    assert type(converted) is TinyResNet and converted is not model
    assert isinstance(converted.conv1, hahnet.HaHBlock) and isinstance(converted.bn1, nn.Identity)
    assert converted.conv1.conv.kernel_size == (5, 5) and converted.conv1.conv.padding == (2, 2)
    torch.testing.assert_close(converted.conv1.conv.weight, model.conv1.weight)
    # the input model is untouched
    assert isinstance(model.conv1, nn.Conv2d) and not isinstance(model.conv1, hahnet.WNConv2d)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the output: the original network after the max-pool, fed the HaH stem's output
    x = torch.rand(4, 3, 16, 16)
    front = F.max_pool2d(hah_reference(x, model.conv1.weight, 2), 2)
    expected = model.fc(model.layer1(front).mean(dim=(2, 3)))
    torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(converted(x), model(x), atol=1e-3)  # the block did act


def test_two_blocks_parameter_counts_and_objective():
    model = tiny(stem_bias=True)
    converted = hahnet.hahify(model, blocks=2)
    block = converted.layer1[0]
    assert isinstance(block.conv1, hahnet.HaHBlock) and isinstance(block.bn1, nn.Identity)
    assert isinstance(block.relu, nn.ReLU) and isinstance(block.conv2, nn.Conv2d)
    # gone: the stem's bias (8) and both BatchNorms' weight and bias (2 x 2 x 8)
    assert count(converted) == count(model) - 8 - 2 * 2 * 8
    assert len(hah_convs(converted)) == 2
    assert converted(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    converted.train()
    objective = hahnet.HaHObjective(converted, (0.01, 0.01))
    _, loss = objective(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert len(objective.scores) == 2 and converted.conv1.conv.weight.grad.abs().sum() > 0


def test_conv_relu_batchnorm_order_and_own_models():
    vgg = hahnet.vgg16(width=0.0625)
    converted = hahnet.hahify(vgg, blocks=3)
    blocks = [b for b in converted.features if isinstance(b, hahnet.VGGBlock)]
    assert [isinstance(b.conv, hahnet.HaHBlock) for b in blocks[:4]] == [True] * 3 + [False]
    assert isinstance(converted.features[0].bn, nn.Identity)  # conv -> ReLU -> BN absorbed
    assert count(vgg) - count(converted) == 2 * (4 + 4 + 8)
    resnet = hahnet.hahify(hahnet.create_model("resnet18", width=0.0625), blocks=2)
    assert isinstance(resnet.stem.conv, hahnet.HaHBlock)
    assert isinstance(resnet.stages[0][0].conv1, hahnet.HaHBlock)


class Grouped(nn.Module):
    def __init__(self, **conv) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.body = nn.Conv2d(6, 6, 3, padding=2 if conv.get("dilation") else 1, **conv)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.body(self.relu(self.stem(x)))).mean(dim=(1, 2, 3))


class Skip(nn.Module):
    """The stem's pre-activation also feeds a skip connection (pre-activation style)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        z = self.stem(x)
        return self.relu(self.bn(z)) + z


class NoRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(torch.tanh(self.stem(x)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.stem(x)) if x.sum() > 0 else x


@pytest.mark.parametrize("model, blocks, message", [
    (tiny(), 3, r"cannot convert layer1\.0\.conv2 \(Conv2d\): its output joins a residual sum "
                r"\(add\) before any ReLU.*pass blocks=2"),
    (Grouped(groups=3), 2, r"cannot convert body \(Conv2d\): grouped convolution \(groups=3\)"),
    (Grouped(dilation=2), 2, r"cannot convert body \(Conv2d\): dilated convolution"),
    (Skip(), 1, r"cannot convert stem \(Conv2d\): its output is also used by bn, add "
                r"\(a residual branch\?\).*first convolution"),
    (NoRelu(), 1, r"cannot convert stem \(Conv2d\): no ReLU after it \(its output goes to tanh\)"),
    (Branchy(), 1, r"torch\.fx cannot trace Branchy"),
    (tiny(), 9, r"blocks=9 but TinyResNet runs only 6 convolutions"),
    (tiny(), 0, r"blocks must be an integer >= 1"),
])
def test_refusals_name_the_module_and_the_reason(model, blocks, message):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(HahifyError, match=message) as caught:
        hahnet.hahify(model, blocks=blocks)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
