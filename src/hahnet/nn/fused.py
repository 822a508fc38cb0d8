"""Fused forward/backward of the divisive normalization and the top-fraction threshold.

They compute exactly the formulas of :mod:`hahnet.nn.layers` (as the plain autograd code in
``divisive_norm_reference`` and ``top_fraction_reference`` does), with fewer passes over
the activations: the 3x3 max-pool runs in channels-last layout (NCHW stride-1 pooling is
about 10x slower on CPU), the masks are applied as 0/1 integer products instead of
``torch.where``, and the backward is written out instead of recorded op by op. A second
derivative (``create_graph=True``) differentiates the reference code instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DIVNORM_EPS = 1e-7


def eager_mode() -> bool:
    """False while torch.compile/export, TorchScript or the JIT tracer is looking: they get
    the plain formulas (traceable, no data-dependent branches) instead of the hand-written
    autograd paths, which are for eager execution."""
    return not (torch.jit.is_scripting() or torch.jit.is_tracing()
                or torch.compiler.is_compiling())


def divisive_divisor(x: Tensor, sigma: float, pool: int) -> Tensor:
    """DivisiveNorm2d's denominator ``sigma * peak + (1 - sigma) * field + eps`` (N1HW)."""
    field = F.max_pool2d(x.abs(), pool, stride=1, padding=pool // 2)
    field = field.mean(dim=1, keepdim=True)
    peak = field.amax(dim=(2, 3), keepdim=True)
    return sigma * peak + (1.0 - sigma) * field + DIVNORM_EPS


def divisive_norm_reference(x: Tensor, sigma: float, pool: int) -> Tensor:
    """DivisiveNorm2d's formula as plain autograd code."""
    return x / divisive_divisor(x, sigma, pool)


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


def batch_chunks(batch: int, per_image: int,
                 device: torch.device | str | None = None) -> list[tuple[int, int]]:
    """(start, stop) ranges of about CHUNK_ELEMENTS elements over a batch of images of
    ``per_image`` elements each; one range when the whole batch is small, or when it
    lives on an accelerator (``device`` not a CPU): a GPU wants few large launches, and
    its caches are no reason to split a batch."""
    if device is not None and torch.device(device).type != "cpu":
        return [(0, batch)]
    if batch * per_image <= UNCHUNKED_ELEMENTS:  # small enough to stay in cache as a whole
        return [(0, batch)]
    step = max(1, CHUNK_ELEMENTS // max(1, per_image))
    return [(start, min(batch, start + step)) for start in range(0, batch, step)]


class _DivisiveNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sigma: float, pool: int) -> Tensor:
        n, c, h, w = x.shape
        chunks = batch_chunks(n, c * h * w, x.device)
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
        chunks = batch_chunks(n, c * h * w, x.device)
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
            # sums in x's dtype, stated: CUDA's autocast would make them fp32 (and the
            # scatter below fail) if this ran inside an autocast region
            grad_divisor = part_work.sum(dim=1, keepdim=True, dtype=x.dtype)
            grad_divisor = grad_divisor.div_(part_divisor).neg_()
            # d = sigma * peak + (1 - sigma) * field; the peak's gradient is shared evenly
            # by the positions at the maximum (as amax's backward does)
            grad_peak = (sigma * grad_divisor).sum(dim=(2, 3), keepdim=True, dtype=x.dtype)
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
