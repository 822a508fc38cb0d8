"""Each layer against a direct re-statement of its formula, on random and adversarial inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from hahnet.nn.layers import (DivisiveNorm2d, HaHBlock, InputNormalize, TopFractionThreshold,
                           VGGBlock, WNConv2d, threshold_rank)


def reference_wn_conv(x, weight):
    out = F.conv2d(x, weight, padding=1)
    norms = weight.flatten(1).norm(dim=1)
    return out / (norms + 1e-6).reshape(1, -1, 1, 1)


def reference_divnorm(x, sigma=0.1):
    n, c, h, w = x.shape
    padded = F.pad(x.abs(), (1, 1, 1, 1))  # |x| >= 0, so zero padding never wins a max
    patches = padded.unfold(2, 3, 1).unfold(3, 3, 1)  # n c h w 3 3
    field = patches.amax(dim=(-1, -2)).mean(dim=1, keepdim=True)
    peak = field.flatten(1).max(dim=1).values.reshape(n, 1, 1, 1)
    return x / (sigma * peak + (1 - sigma) * field + 1e-7)


def reference_threshold(x, keep=0.2):
    n, c, h, w = x.shape
    k = math.floor((1 - keep) * h * w + 1e-9)
    if k == 0:
        return x.clone()
    kth = x.reshape(n, c, -1).sort(dim=2).values[..., k - 1].reshape(n, c, 1, 1)
    return torch.where(x > kth, x, torch.zeros_like(x))


ADVERSARIAL = {
    "zeros": lambda s: torch.zeros(s),
    "constant": lambda s: torch.full(s, 0.7),
    "ties": lambda s: torch.randint(0, 3, s).float(),
    "huge": lambda s: torch.rand(s) * 1e30,
    "tiny": lambda s: torch.rand(s) * 1e-30,
    "random": lambda s: torch.randn(s),
}


@pytest.mark.parametrize("kind", sorted(ADVERSARIAL))
def test_wn_conv_matches_formula(kind):
    torch.manual_seed(0)
    conv = WNConv2d(3, 5)
    x = ADVERSARIAL[kind]((2, 3, 6, 6))
    want = reference_wn_conv(x, conv.weight)
    scale = float(want.detach().abs().max()) + 1e-30  # sums of mixed signs cancel: compare to scale
    torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5 * scale)


def test_wn_conv_scale_invariant_and_zero_filters_finite():
    torch.manual_seed(0)
    conv = WNConv2d(4, 3)
    x = torch.randn(2, 4, 5, 5)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(123.0)
    torch.testing.assert_close(conv(x), before, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        conv.weight.zero_()
    out = conv(x)
    assert torch.isfinite(out).all() and (out == 0).all()
    out.sum().backward()
    assert torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("kind", sorted(ADVERSARIAL))
@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_divisive_norm_matches_formula(kind, sigma):
    torch.manual_seed(1)
    x = ADVERSARIAL[kind]((2, 4, 7, 5))
    out = DivisiveNorm2d(sigma)(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_divnorm(x, sigma), rtol=1e-5, atol=1e-6)


def test_divisive_norm_is_scale_invariant_for_large_inputs():
    torch.manual_seed(2)
    x = torch.rand(2, 3, 8, 8) + 0.1
    norm = DivisiveNorm2d()
    torch.testing.assert_close(norm(1000 * x), norm(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(ADVERSARIAL))
@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 5), (8, 8), (32, 32)])
def test_threshold_matches_sort_restatement(kind, size):
    torch.manual_seed(3)
    x = ADVERSARIAL[kind]((2, 3, *size))
    torch.testing.assert_close(TopFractionThreshold(0.2)(x), reference_threshold(x, 0.2))


def test_threshold_keeps_exactly_the_top_fraction_without_ties():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 32)
    out = TopFractionThreshold(0.2)(x)
    kept = (out != 0).flatten(2).sum(dim=2)
    assert (kept == 1024 - threshold_rank(1024, 0.2)).all()  # 205 of 1024
    assert threshold_rank(1024, 0.2) == 819
    assert threshold_rank(10, 0.2) == 8  # not 7 from (1 - 0.2) * 10 = 7.999...


def test_threshold_zero_and_constant_maps_keep_nothing():
    for x in (torch.zeros(1, 2, 4, 4), torch.full((1, 2, 4, 4), 3.0)):
        assert (TopFractionThreshold(0.2)(x) == 0).all()


def test_threshold_one_pixel_maps_pass_through():
    x = torch.randn(3, 4, 1, 1)
    torch.testing.assert_close(TopFractionThreshold(0.2)(x), x)


def test_threshold_gradient_flows_only_through_kept_values():
    torch.manual_seed(5)
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    out = TopFractionThreshold(0.5)(x)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_hah_block_finite_on_degenerate_inputs(dtype, channels):
    torch.manual_seed(6)
    block = HaHBlock(channels, channels).to(dtype)
    for x in (torch.zeros(2, channels, 1, 1), torch.zeros(2, channels, 4, 4),
              torch.full((2, channels, 3, 3), 1e-30), torch.full((2, channels, 3, 3), 1e30),
              torch.randn(2, channels, 5, 5)):
        x = x.to(dtype).requires_grad_()
        out = block(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        out.float().sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in block.parameters())
        block.zero_grad()


def test_vgg_block_order_and_conv_kind():
    block = VGGBlock(3, 4, wn=True)
    assert isinstance(block.conv, WNConv2d) and block.conv.bias is None
    plain = VGGBlock(3, 4)
    assert type(plain.conv) is torch.nn.Conv2d and plain.conv.bias is None
    assert [name for name, _ in plain.named_children()] == ["conv", "relu", "bn"]


def test_layer_arguments_validated_and_reprs_readable():
    with pytest.raises(ValueError, match="keep"):
        TopFractionThreshold(0.0)
    with pytest.raises(ValueError, match="sigma"):
        DivisiveNorm2d(1.5)
    with pytest.raises(ValueError, match="odd"):
        DivisiveNorm2d(pool=2)
    assert "keep=0.2" in repr(TopFractionThreshold())
    assert "sigma=0.1, pool=3" in repr(DivisiveNorm2d())
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        InputNormalize((0.5,) * 3, (0.2,) * 3)(torch.zeros(1, 1, 4, 4))
