"""A HaH block's activation, ``threshold(divisive_norm(relu(z)))``, as one autograd
Function on the CPU: the formulas of :mod:`hahnet.nn.layers` (the plain autograd code is
:func:`hah_activation_reference`), in one pass over batch chunks instead of three layers.

What fusing saves (docs/performance.md has the measurements): the ReLU's output tensor
and backward pass (|relu z| = relu z, so the rectified chunk is what the 3x3 max-pool
reads), the normalized activation as a tensor of its own (the threshold runs on each
chunk while it is in cache), the threshold's mask and its conversions: the kept values
are exactly the positive outputs (they exceed the k-th smallest of a map of non-negative
values), so the backward rebuilds the mask from the output, which the next layer keeps
anyway. The channel mean of the pooled field is a matrix-vector product (a reduction over
the contiguous channels of a channels-last tensor is several times slower).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hahnet.nn.fused import (DIVNORM_EPS, _BITS, _kth_smallest, batch_chunks,
                             divisive_norm_reference, top_fraction_reference)


def hah_activation_reference(z: Tensor, sigma: float, pool: int, k: int) -> Tensor:
    """The block's activation as plain autograd code (k >= 1)."""
    return top_fraction_reference(divisive_norm_reference(torch.relu(z), sigma, pool), k)


def _bits(values: Tensor) -> Tensor:
    """The float tensor's bit patterns as same-width integers (a view)."""
    return values.view(_BITS[values.element_size()])


# Up to this many channels the channel mean of a channels-last tensor is faster as a
# matrix-vector product (16 channels: 55 vs 100-190 us per 2^18 elements; 256: 48 vs 25).
MV_CHANNELS_MAX = 64


def _channel_mean(pooled: Tensor, out: Tensor) -> None:
    """``out = pooled.mean(dim=1, keepdim=True)`` for a channels-last ``pooled`` (N,C,H,W)
    into a contiguous (N,1,H,W) ``out``: a matrix-vector product over the channels."""
    n, c, h, w = pooled.shape
    if c > MV_CHANNELS_MAX or pooled.dtype not in (torch.float32, torch.float64):
        torch.mean(pooled, dim=1, keepdim=True, out=out)
        return
    rows = pooled.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: channels-last
    ones = torch.ones(c, dtype=pooled.dtype, device=pooled.device)
    torch.mv(rows, ones, out=out.view(n * h * w)).div_(c)


# glibc serves blocks of this size and more with fresh mmaps (its mmap threshold grows to
# at most 32 MiB on 64-bit), so every such tensor costs a page fault per 4 KiB when it
# is first written; measured on a 2-core VM that cost more than converting the saved
# max-pool indices to int16 and back (width 1: 316 vs 348 ms per 32x32 activation,
# forward + backward), below it less (width 0.25: 77 vs 75 ms).
NARROW_INDICES_BYTES = 32 << 20


def _index_dtype(positions: int, elements: int) -> torch.dtype:
    """How to keep the max-pool indices (into maps of ``positions``) for the backward:
    int64 as the pool writes them, or int16 when int64 would be a large fresh block."""
    narrow = positions <= torch.iinfo(torch.int16).max + 1 and elements * 8 >= NARROW_INDICES_BYTES
    return torch.int16 if narrow else torch.int64


def hah_activation(z: Tensor, sigma: float, pool: int, k: int) -> Tensor:
    """``threshold(divisive_norm(relu(z)))`` of an NCHW CPU tensor, k >= 1: through the
    autograd Function when a gradient will be wanted, else forward only (no indices kept)."""
    if torch.is_grad_enabled() and z.requires_grad:
        return _HaHActivation.apply(z, sigma, pool, k)
    return _forward(z, sigma, pool, k, keep_indices=False)[0]


def _forward(z: Tensor, sigma: float, pool: int, k: int, keep_indices: bool
             ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The activation, the pooled field (N,1,H,W) and, if asked, the max-pool's indices
    (channels-last; see :func:`_index_dtype`) for the backward; chunk by chunk."""
    n, c, h, w = z.shape
    chunks = batch_chunks(n, c * h * w, z.device)
    # relu(z) goes to channels-last scratch: stride-1 max-pooling is ~10x faster there
    rectified = torch.empty_like(z[: chunks[0][1]], memory_format=torch.channels_last)
    pooled = torch.empty_like(rectified)
    chunk_indices = torch.empty_like(rectified, dtype=torch.int64)
    keep = torch.empty_like(_bits(z[: chunks[0][1]]))
    indices = torch.empty_like(z, dtype=_index_dtype(h * w, z.numel()),
                               memory_format=torch.channels_last) \
        if keep_indices else None
    field = torch.empty((n, 1, h, w), dtype=z.dtype, device=z.device)
    out = torch.empty_like(z)
    for start, stop in chunks:
        size = stop - start
        part_out, part_field = out[start:stop], field[start:stop]
        torch.clamp(z[start:stop], min=0, out=part_out)  # relu(z) = |relu(z)|
        rectified[:size].copy_(part_out)
        wide = indices is not None and indices.dtype == torch.int64  # pooled straight there
        torch.ops.aten.max_pool2d_with_indices.out(
            rectified[:size], [pool, pool], [1, 1], [pool // 2, pool // 2], [1, 1], False,
            out=pooled[:size], indices=indices[start:stop] if wide else chunk_indices[:size])
        if indices is not None and not wide:
            indices[start:stop].copy_(chunk_indices[:size])
        _channel_mean(pooled[:size], part_field)
        # the divisor as divisive_norm_reference rounds it (its peak is per image)
        peak = part_field.amax(dim=(2, 3), keepdim=True)
        part_out.div_(sigma * peak + (1.0 - sigma) * part_field + DIVNORM_EPS)
        kth = _kth_smallest(part_out, k, integer_keys=z.device.type == "cpu")
        _bits(part_out).mul_(torch.gt(part_out, kth, out=keep[:size]))  # exact where()
    return out, field, indices


class _HaHActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, sigma: float, pool: int, k: int) -> Tensor:
        out, field, indices = _forward(z, sigma, pool, k, keep_indices=True)
        ctx.save_for_backward(z, out, field, indices)
        ctx.sigma, ctx.pool, ctx.k = sigma, pool, k
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        z, out, field, indices = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain code instead
            with torch.enable_grad():
                again = hah_activation_reference(z, ctx.sigma, ctx.pool, ctx.k)
            return torch.autograd.grad(again, z, grad, create_graph=True)[0], None, None, None
        return _backward(grad, z, out, field, indices, ctx.sigma), None, None, None


def _backward(grad: Tensor, z: Tensor, out: Tensor, field: Tensor, indices: Tensor,
              sigma: float) -> Tensor:
    """dL/dz of the fused activation, chunk by chunk (the normalization's part as in
    DivisiveNorm's backward, :mod:`hahnet.nn.fused`)."""
    n, c, h, w = z.shape
    chunks = batch_chunks(n, c * h * w, z.device)
    grad_z = torch.empty_like(z)
    work = torch.empty_like(z[: chunks[0][1]])
    grad_magnitude = torch.empty_like(work)
    chunk_indices = torch.empty_like(work, dtype=torch.int64, memory_format=torch.channels_last)
    peak = field.amax(dim=(2, 3), keepdim=True)
    divisor = sigma * peak + (1.0 - sigma) * field + DIVNORM_EPS
    at_peak = field == peak
    peak_count = at_peak.sum(dim=(2, 3), keepdim=True)
    for start, stop in chunks:
        size = stop - start
        part_out, part_divisor = out[start:stop], divisor[start:stop]
        part_grad_z, part_work = grad_z[start:stop], work[:size]
        # the threshold passes the gradient where it kept a value, i.e. where out > 0:
        # the output's bits clamped to [0, 1] are that mask (-0.0 reads negative)
        kept = torch.mul(_bits(grad[start:stop]), _bits(part_out).clamp(0, 1),
                         out=_bits(part_work)).view(z.dtype)
        # out = relu(z) / d where kept:  d(relu z) = g / d,  dd = -sum_c(g * out) / d
        grad_divisor = torch.mul(kept, part_out, out=part_grad_z).sum(dim=1, keepdim=True,
                                                                       dtype=z.dtype)
        grad_divisor.div_(part_divisor).neg_()
        torch.div(kept, part_divisor, out=part_grad_z)
        # d = sigma * peak + (1 - sigma) * field; the peak's gradient is shared evenly by
        # the positions at the maximum (as amax's backward does)
        grad_peak = (sigma * grad_divisor).sum(dim=(2, 3), keepdim=True, dtype=z.dtype)
        grad_field = (1.0 - sigma) * grad_divisor + \
            (grad_peak / peak_count[start:stop]) * at_peak[start:stop]
        # field = mean_c(pooled): the max-pool sends grad_field / C to each window's argmax
        part_grad_magnitude = grad_magnitude[:size].zero_()
        part_indices = indices[start:stop] if indices.dtype == torch.int64 else \
            chunk_indices[:size].copy_(indices[start:stop])
        part_grad_magnitude.view(size, c, h * w).scatter_add_(
            2, part_indices.view(size, c, h * w),
            (grad_field / c).view(size, 1, h * w).expand(size, c, h * w))
        # |relu z|' = 1 where z > 0, else 0
        rectified_sign = torch.clamp(z[start:stop], min=0, out=part_work).sign_()
        part_grad_z.addcmul_(part_grad_magnitude, rectified_sign)
    return grad_z
