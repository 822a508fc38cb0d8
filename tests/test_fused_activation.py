"""The fused HaH activation (relu -> divisive normalization -> threshold in one autograd
Function) and WNConv2d's filter normalization with its written-out backward, against the
plain autograd formulas; HaHBlock's choice of the fused path."""

import pytest
import torch
from torch import nn

from hahnet.nn import fused
from hahnet.nn.fused import (_HaHActivation, _NormalizeFilters, hah_activation,
                             hah_activation_reference, normalize_filters,
                             normalize_filters_reference)
from hahnet.nn.layers import HaHBlock, WNConv2d, threshold_rank

INPUTS = {
    "randn": lambda s: torch.randn(s, dtype=torch.float64),
    "ties": lambda s: torch.randint(-2, 3, s).double(),
    "zeros": lambda s: torch.zeros(s, dtype=torch.float64),
    "signed_zeros": lambda s: -torch.zeros(s, dtype=torch.float64),
    "huge": lambda s: torch.randn(s, dtype=torch.float64) * 1e30,
    "tiny": lambda s: torch.randn(s, dtype=torch.float64) * 1e-300,
}


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Whole batches at once, or image by image (as on large activations)."""
    if request.param == "chunked":
        monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(fused, "UNCHUNKED_ELEMENTS", 0)
    return request.param


def _both(z, grad, k, sigma=0.1):
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    out_a = _HaHActivation.apply(za, sigma, 3, k)
    out_b = hah_activation_reference(zb, sigma, 3, k)
    (ga,), (gb,) = torch.autograd.grad(out_a, za, grad), torch.autograd.grad(out_b, zb, grad)
    return out_a, out_b, ga, gb


@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_activation_matches_plain_autograd(kind, channels_last, chunking):
    torch.manual_seed(0)
    for shape in [(2, 3, 7, 5), (3, 4, 8, 8), (2, 2, 2, 2)]:
        z = INPUTS[kind](shape)
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(shape, dtype=torch.float64)
        out_a, out_b, ga, gb = _both(z, grad, threshold_rank(shape[2] * shape[3], 0.2))
        assert torch.equal(out_a, out_b)
        scale = gb.abs().max() + 1e-300
        torch.testing.assert_close(ga / scale, gb / scale)


@pytest.mark.parametrize("channels", [3, 64, 65, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_channel_mean_sums_as_the_fused_paths(channels, dtype):
    """The plain formula's channel mean has the fused paths' bits in either layout and on
    both sides of the matrix-vector cut-off (kernels' reduction orders differ by CPU)."""
    torch.manual_seed(channels)
    pooled = torch.rand(3, channels, 9, 7, dtype=dtype)
    fused_mean = torch.empty(3, 1, 9, 7, dtype=dtype)
    fused._channel_mean(pooled.contiguous(memory_format=torch.channels_last), fused_mean)
    for layout in (torch.contiguous_format, torch.channels_last):
        plain = fused.channel_mean(pooled.contiguous(memory_format=layout))
        assert torch.equal(plain, fused_mean)
    torch.testing.assert_close(fused_mean, pooled.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("narrow", [False, True])
def test_fused_activation_fp32_large_maps_and_index_widths(narrow, monkeypatch):
    """fp32 at a VGG layer's size (several chunks), and maps with more positions than
    int16 indices can address; the saved max-pool indices kept as int64 or as int16
    (as for large activations)."""
    if narrow:
        monkeypatch.setattr(fused, "NARROW_INDICES_BYTES", 0)
    torch.manual_seed(3)
    for shape, dtype in [((8, 16, 32, 32), torch.float32), ((1, 2, 182, 182), torch.float64)]:
        z = torch.randn(shape, dtype=dtype)
        grad = torch.randn(shape, dtype=dtype)
        out_a, out_b, ga, gb = _both(z, grad, threshold_rank(shape[2] * shape[3], 0.2))
        torch.testing.assert_close(out_a, out_b)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6 * float(gb.abs().max()))
    monkeypatch.undo()
    assert fused._index_dtype(32 * 32, 128 * 64 * 32 * 32) == torch.int16
    assert fused._index_dtype(32 * 32, 128 * 16 * 32 * 32) == torch.int64
    assert fused._index_dtype(182 * 182, 128 * 64 * 182 * 182) == torch.int64


def test_fused_activation_bf16_and_forward_only_path():
    torch.manual_seed(4)
    z = torch.randn(2, 8, 8, 8).bfloat16()
    want = hah_activation_reference(z, 0.1, 3, 51)
    assert torch.equal(hah_activation(z, 0.1, 3, 51), want)  # no grad wanted: forward only
    with torch.no_grad():
        assert torch.equal(hah_activation(z.requires_grad_(), 0.1, 3, 51), want)
    assert torch.equal(_HaHActivation.apply(z, 0.1, 3, 51), want)


def test_fused_activation_output_may_change_in_place():
    """A network may add to a block's output in place (a residual sum): the backward keeps
    no reference to the output and gives the plain code's gradient."""
    torch.manual_seed(7)
    z = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    grads = []
    for fn in (lambda t: _HaHActivation.apply(t, 0.1, 3, 28),
               lambda t: hah_activation_reference(t, 0.1, 3, 28)):
        t = z.clone().requires_grad_()
        out = fn(t)
        out += 1.0
        grads.append(torch.autograd.grad(out.square().sum(), t)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_fused_activation_second_derivatives():
    z = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: _HaHActivation.apply(t, 0.1, 3, 16), (z,))


def test_hah_block_fuses_unless_its_parts_are_hooked_or_replaced(monkeypatch):
    torch.manual_seed(5)
    block = HaHBlock(3, 6).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    calls = []
    original = fused._HaHActivation.apply
    monkeypatch.setattr(fused._HaHActivation, "apply",
                        lambda *a: calls.append(1) or original(*a))
    fused_out = block(x)
    assert calls == [1]
    seen = []
    hook = block.divnorm.register_forward_hook(lambda m, i, o: seen.append(o))
    plain_out = block(x)
    hook.remove()
    assert calls == [1] and len(seen) == 1  # the hooked part ran as a module
    torch.testing.assert_close(fused_out, plain_out)
    (g_fused,), (g_plain,) = (torch.autograd.grad(o.square().sum(), x) for o in (fused_out, plain_out))
    torch.testing.assert_close(g_fused, g_plain)
    block.relu = nn.LeakyReLU(0.5)  # not the block's own formula: no fusing
    assert not torch.allclose(block(x), fused_out)
    assert calls == [1]


@pytest.mark.parametrize("channels, size", [(16, 32), (64, 16), (128, 8)])
@pytest.mark.parametrize("grad", [True, False])
def test_fused_activation_is_bit_identical_to_the_modules(channels, size, grad):
    """The fused activation and the block's parts run one by one (as under a hook: BPDA,
    sparsity probes) give the same bits, so that hooking a block does not move its
    output (the BPDA attacks promise the model's own forward)."""
    torch.manual_seed(channels)
    block = HaHBlock(channels, channels)
    z = torch.randn(4, channels, size, size, requires_grad=grad)
    k = threshold_rank(size * size, block.threshold.keep)
    with torch.set_grad_enabled(grad):
        fused_out = hah_activation(z, block.divnorm.sigma, block.divnorm.pool, k)
        parts_out = block.threshold(block.divnorm(block.relu(z)))
    assert torch.equal(fused_out, parts_out)


# ------------------------------------------------ WNConv2d's filter normalization


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (4, 2, 1, 1), (3, 7)])
def test_filter_normalization_matches_plain_autograd(shape):
    """Written-out backward = autograd's, also for an all-zero filter (gradient: 1 / eps
    times the incoming one, no NaN) and filters of very different scales."""
    torch.manual_seed(6)
    weight = torch.randn(shape, dtype=torch.float64)
    weight[0] = 0.0
    weight[1] *= 1e6
    grad = torch.randn(shape, dtype=torch.float64)
    a, b = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    out_a, out_b = normalize_filters(a, 1e-6), normalize_filters_reference(b, 1e-6)
    assert torch.equal(out_a, out_b)
    (ga,), (gb,) = torch.autograd.grad(out_a, a, grad), torch.autograd.grad(out_b, b, grad)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=0.0)


def test_filter_normalization_second_derivatives_and_conv_uses_it(monkeypatch):
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: _NormalizeFilters.apply(t, 1e-6), (w,))
    calls = []
    original = _NormalizeFilters.apply
    monkeypatch.setattr(_NormalizeFilters, "apply", lambda *a: calls.append(1) or original(*a))
    WNConv2d(2, 3)(torch.randn(1, 2, 4, 4))
    assert calls == [1]
