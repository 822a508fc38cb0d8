"""Building blocks of HaH networks: weight-normalized convolution, divisive
normalization, top-fraction threshold, and the HaH and VGG blocks built from them.

Every layer is a plain ``nn.Module`` on NCHW tensors. The HaH cost itself lives in
:mod:`hahnet.hah`; a :class:`WNConv2d` only carries the hook it needs (``score_spec``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WN_EPS = 1e-6
DIVNORM_EPS = 1e-7


class WNConv2d(nn.Conv2d):
    """Convolution whose output channel k is divided by ``||W_k||_2 + 1e-6``.

    The division happens in the forward pass (weights are not re-parameterized), so
    gradients flow through the norm. Dividing the filter before the convolution is the
    same linear map as dividing its output, and costs a weight-sized op instead of an
    activation-sized one.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=padding, bias=False)
        # Set by hahnet.hah.HaHObjective: (ratio, demote) makes forward() also compute
        # this layer's HaH score, routed so that it only trains this layer's weights.
        self.score_spec: tuple[float, float] | None = None
        self.last_score: Tensor | None = None

    def normalized_weight(self) -> Tensor:
        """The filters divided by their l2 norms (each over in_channels x kH x kW)."""
        norms = torch.linalg.vector_norm(self.weight, dim=(1, 2, 3), keepdim=True)
        return self.weight / (norms + WN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.normalized_weight()
        if self.score_spec is None or not torch.is_grad_enabled():
            return F.conv2d(x, weight, None, self.stride, self.padding)
        from hahnet.hah import scored_conv2d  # local import: hah depends on layers

        z, self.last_score = scored_conv2d(x, weight, self.stride, self.padding,
                                           *self.score_spec)
        return z


class DivisiveNorm2d(nn.Module):
    """Divide each activation by a local suppression field of its neighbourhood.

    ``s = mean_c(maxpool_{pool x pool}(|x|))`` and
    ``d = sigma * max_{h,w}(s) + (1 - sigma) * s + 1e-7`` (max per image); returns x / d.
    Strong local responses thereby suppress weaker ones.
    """

    def __init__(self, sigma: float = 0.1, pool: int = 3) -> None:
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

    def __init__(self, keep: float = 0.2) -> None:
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
    """WN conv -> ReLU -> divisive normalization -> top-fraction threshold."""

    def __init__(self, in_channels: int, out_channels: int, sigma: float = 0.1,
                 keep: float = 0.2) -> None:
        super().__init__()
        self.conv = WNConv2d(in_channels, out_channels)
        self.relu = nn.ReLU()
        self.divnorm = DivisiveNorm2d(sigma)
        self.threshold = TopFractionThreshold(keep)

    def forward(self, x: Tensor) -> Tensor:
        return self.threshold(self.divnorm(self.relu(self.conv(x))))


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


# ---------------------------------------------------------------------------------------
# Fused forward/backward of the divisive normalization and the threshold. They compute
# exactly the formulas of the modules above (as the plain autograd code in
# ``divisive_norm_reference`` and ``top_fraction_reference`` does), with fewer passes over
# the activations: the 3x3 max-pool runs in channels-last layout (NCHW stride-1 pooling is
# about 10x slower on CPU), the masks are applied as 0/1 integer products instead of
# ``torch.where``, and the backward is written out instead of recorded op by op. A second
# derivative (``create_graph=True``) differentiates the reference code instead.


def eager_mode() -> bool:
    """False while torch.compile/export, TorchScript or the JIT tracer is looking: they get
    the plain formulas (traceable, no data-dependent branches) instead of the hand-written
    autograd paths, which are for eager execution."""
    return not (torch.jit.is_scripting() or torch.jit.is_tracing()
                or torch.compiler.is_compiling())


def divisive_norm_reference(x: Tensor, sigma: float, pool: int) -> Tensor:
    """DivisiveNorm2d's formula as plain autograd code."""
    field = F.max_pool2d(x.abs(), pool, stride=1, padding=pool // 2)
    field = field.mean(dim=1, keepdim=True)
    peak = field.amax(dim=(2, 3), keepdim=True)
    divisor = sigma * peak + (1.0 - sigma) * field + DIVNORM_EPS
    return x / divisor


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _kth_smallest(x: Tensor, k: int, integer_keys: bool = False) -> Tensor:
    """Per image and channel, the k-th smallest value of the H*W map, shape (N, C, 1, 1)."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    keys = flat
    if integer_keys and x.is_floating_point() and bool(flat.amin() >= 0):
        # Non-negative floats (no NaN) order like their bit patterns read as integers,
        # and selecting among integers is about 20% faster on CPU. (-0.0 reads as the
        # most negative integer: it stays below every other value and, as a float, equals
        # +0.0, so the result compares the same either way.)
        keys = flat.view(_BITS[x.element_size()])
    # The k-th smallest is the (hw - k + 1)-th largest: select from the short end.
    largest = h * w - k + 1
    if largest <= k:
        kth = keys.topk(largest, dim=2, sorted=False).values.amin(dim=2, keepdim=True)
    else:
        kth = keys.kthvalue(k, dim=2, keepdim=True).values
    if keys is not flat:
        kth = kth.view(x.dtype)
    return kth.reshape(n, c, 1, 1)


def top_fraction_reference(x: Tensor, k: int) -> Tensor:
    """TopFractionThreshold's formula (k >= 1) as plain autograd code."""
    kth = _kth_smallest(x, k)
    return torch.where(x > kth, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _keep_where(values: Tensor, keep: Tensor) -> Tensor:
    """``torch.where(keep, values, 0)``, bit-exact (+0.0 where dropped, even for inf or
    NaN values), as an integer product of the values' bits with 0/1: a vectorized pass,
    where ``torch.where`` on CPU is several times slower."""
    bits = _BITS.get(values.element_size())
    if bits is None or values.is_complex() or not values.is_floating_point():
        return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return keep.to(bits).mul_(values.view(bits)).view(values.dtype)


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# The fused layers' several passes over the activations run on batch chunks of about
# this many elements, so that intermediate results stay in cache and scratch buffers stay
# small (the normalization's peak is per image, so images are independent).
CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32
UNCHUNKED_ELEMENTS = 1 << 16


def batch_chunks(batch: int, per_image: int) -> list[tuple[int, int]]:
    """(start, stop) ranges of about CHUNK_ELEMENTS elements over a batch of images of
    ``per_image`` elements each; one range when the whole batch is small."""
    if batch * per_image <= UNCHUNKED_ELEMENTS:  # small enough to stay in cache as a whole
        return [(0, batch)]
    step = max(1, CHUNK_ELEMENTS // max(1, per_image))
    return [(start, min(batch, start + step)) for start in range(0, batch, step)]


class _DivisiveNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sigma: float, pool: int) -> Tensor:
        n, c, h, w = x.shape
        chunks = batch_chunks(n, c * h * w)
        # |x| goes to channels-last scratch: stride-1 max-pooling is ~10x faster there
        magnitude = torch.empty_like(x[: chunks[0][1]], memory_format=torch.channels_last)
        pooled = torch.empty_like(magnitude)
        indices = torch.empty(x.shape, dtype=torch.int64, device=x.device,
                              memory_format=torch.channels_last)
        field = torch.empty((n, 1, h, w), dtype=x.dtype, device=x.device)
        out = torch.empty_like(x)
        for start, stop in chunks:
            size = stop - start
            part_magnitude, part_pooled = magnitude[:size], pooled[:size]
            torch.abs(x[start:stop], out=part_magnitude)
            torch.ops.aten.max_pool2d_with_indices.out(
                part_magnitude, [pool, pool], [1, 1], [pool // 2, pool // 2], [1, 1], False,
                out=part_pooled, indices=indices[start:stop])
            torch.mean(part_pooled, dim=1, keepdim=True, out=field[start:stop])
        peak = field.amax(dim=(2, 3), keepdim=True)
        divisor = sigma * peak + (1.0 - sigma) * field + DIVNORM_EPS
        for start, stop in chunks:
            torch.div(x[start:stop], divisor[start:stop], out=out[start:stop])
        ctx.save_for_backward(x, divisor, field, peak, indices)
        ctx.sigma, ctx.pool = sigma, pool
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        x, divisor, field, peak, indices = ctx.saved_tensors
        sigma, pool = ctx.sigma, ctx.pool
        if torch.is_grad_enabled():  # create_graph: differentiate the plain code instead
            with torch.enable_grad():
                again = divisive_norm_reference(x, sigma, pool)
            return torch.autograd.grad(again, x, grad, create_graph=True)[0], None, None
        n, c, h, w = x.shape
        chunks = batch_chunks(n, c * h * w)
        layout = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        grad_x = torch.empty_like(x, memory_format=layout)
        work = torch.empty_like(x[: chunks[0][1]], memory_format=layout)
        grad_magnitude = torch.empty_like(work)
        at_peak = field == peak
        peak_count = at_peak.sum(dim=(2, 3), keepdim=True)
        for start, stop in chunks:
            size = stop - start
            part_x, part_grad_x, part_work = x[start:stop], grad_x[start:stop], work[:size]
            part_divisor = divisor[start:stop]
            # out = x / d:  dx = g / d  and  dd = -sum_c(dx * x) / d  (d is N1HW; no d^2,
            # which can overflow)
            torch.div(grad[start:stop], part_divisor, out=part_grad_x)
            torch.mul(part_grad_x, part_x, out=part_work)
            grad_divisor = part_work.sum(dim=1, keepdim=True).div_(part_divisor).neg_()
            # d = sigma * peak + (1 - sigma) * field; the peak's gradient is shared evenly
            # by the positions at the maximum (as amax's backward does)
            grad_peak = (sigma * grad_divisor).sum(dim=(2, 3), keepdim=True)
            part_at_peak = at_peak[start:stop]
            grad_field = (1.0 - sigma) * grad_divisor + \
                (grad_peak / peak_count[start:stop]) * part_at_peak
            # field = mean_c(pooled): every channel of pooled gets grad_field / C, which
            # the max-pool sends to the argmax of each window: scattered straight from the
            # broadcast N1HW gradient (max_pool2d's own backward wants it materialized)
            part_grad_magnitude = grad_magnitude[:size].zero_()
            part_grad_magnitude.view(size, c, h * w).scatter_add_(
                2, indices[start:stop].view(size, c, h * w),
                (grad_field / c).view(size, 1, h * w).expand(size, c, h * w))
            # |x|' = sgn(x), which for real x is sign(x)
            sign = torch.sign(part_x, out=part_work) if not x.is_complex() else part_x.sgn()
            part_grad_x.addcmul_(part_grad_magnitude, sign)
        return grad_x, None, None


class _TopFraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, k: int) -> Tensor:
        keep = x > _kth_smallest(x, k, integer_keys=x.device.type == "cpu")
        ctx.save_for_backward(x, keep)
        ctx.k = k
        return _keep_where(x, keep)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:
        x, keep = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain code instead
            with torch.enable_grad():
                out = top_fraction_reference(x, ctx.k)
            return torch.autograd.grad(out, x, grad, create_graph=True)[0], None
        return _keep_where(grad, keep), None
