"""Fused forward/backward of the divisive normalization, the top-fraction threshold,
a HaH block's whole activation (ReLU, normalization, threshold in one pass) and the
weight normalization's filter norms.

They compute exactly the formulas of :mod:`hahnet.nn.layers` (as the plain autograd code in
the ``*_reference`` functions does), with fewer passes over the activations: the 3x3
max-pool runs in channels-last layout (NCHW stride-1 pooling is about 10x slower on CPU),
the masks are applied as 0/1 integer products instead of ``torch.where``, and the backward
is written out instead of recorded op by op. A second derivative (``create_graph=True``)
differentiates the reference code instead.
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
    return _divisor(channel_mean(field), sigma)


def channel_mean(pooled: Tensor) -> Tensor:
    """``pooled.mean(dim=1, keepdim=True)`` summed as the fused paths sum it (channels-last
    rows; see :func:`_channel_mean`): reduction order differs between CPUs' kernels, and
    this keeps the plain formula bit-identical to the fused one on every CPU."""
    rows = pooled.contiguous(memory_format=torch.channels_last)
    n, c, h, w = rows.shape
    if not _sums_by_mv(c, rows.dtype):
        return rows.mean(dim=1, keepdim=True)
    ones = torch.ones(c, dtype=rows.dtype, device=rows.device)
    return (torch.mv(rows.permute(0, 2, 3, 1).reshape(n * h * w, c), ones) / c).view(n, 1, h, w)


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


def batch_chunks(batch: int, per_image: int, device: torch.device | str | None = None,
                 scale: int = 1) -> list[tuple[int, int]]:
    """(start, stop) ranges of about ``scale`` x CHUNK_ELEMENTS elements over a batch of
    images of ``per_image`` elements each; one range when the whole batch is small, or
    when it lives on an accelerator (``device`` not a CPU): a GPU wants few large
    launches, and its caches are no reason to split a batch."""
    if device is not None and torch.device(device).type != "cpu":
        return [(0, batch)]
    if batch * per_image <= UNCHUNKED_ELEMENTS:  # small enough to stay in cache as a whole
        return [(0, batch)]
    step = max(1, scale * CHUNK_ELEMENTS // max(1, per_image))
    return [(start, min(batch, start + step)) for start in range(0, batch, step)]


def _peak_positions(field: Tensor) -> tuple[Tensor, Tensor]:
    """Where each image's pooled field (N1HW) reaches its peak, and at how many positions:
    the divisor's peak term sends its gradient there."""
    at_peak = field == field.amax(dim=(2, 3), keepdim=True)
    return at_peak, at_peak.sum(dim=(2, 3), keepdim=True)


def _field_gradient(grad_divisor: Tensor, sigma: float, at_peak: Tensor,
                    peak_count: Tensor) -> Tensor:
    """dL/d(field) of the divisor ``d = sigma * peak + (1 - sigma) * field + eps`` (N1HW),
    from dL/dd: the peak's share goes evenly to the positions at the maximum (as amax's
    backward does)."""
    grad_peak = (sigma * grad_divisor).sum(dim=(2, 3), keepdim=True, dtype=grad_divisor.dtype)
    return (1.0 - sigma) * grad_divisor + (grad_peak / peak_count) * at_peak


def _through_pool(grad_field: Tensor, indices: Tensor, out: Tensor) -> Tensor:
    """dL/d|x| into ``out`` (N,C,H,W) from dL/d(field) (N,1,H,W), field = mean_c(max-pool):
    every channel gets grad_field / C, which the pool sends to each window's argmax
    (``indices``, int64, into the H*W map): scattered straight from the broadcast N1HW
    gradient (max_pool2d's own backward wants it materialized)."""
    n, c, h, w = out.shape
    out.zero_().view(n, c, h * w).scatter_add_(
        2, indices.view(n, c, h * w), (grad_field / c).view(n, 1, h * w).expand(n, c, h * w))
    return out


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
            _channel_mean(part_pooled, field[start:stop])  # as the fused activation sums
        divisor = _divisor(field, sigma)
        for start, stop in chunks:
            torch.div(x[start:stop], divisor[start:stop], out=out[start:stop])
        ctx.save_for_backward(x, divisor, field, indices)
        ctx.sigma, ctx.pool = sigma, pool
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        x, divisor, field, indices = ctx.saved_tensors
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
        at_peak, peak_count = _peak_positions(field)
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
            grad_field = _field_gradient(grad_divisor, sigma, at_peak[start:stop],
                                         peak_count[start:stop])
            part_grad_magnitude = _through_pool(grad_field, indices[start:stop],
                                                grad_magnitude[:size])
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


# ------------------------------------- a HaH block's activation, fused (CPU)
#
# threshold(divisive_norm(relu(z))) as one autograd Function, in one pass over batch
# chunks instead of three layers (docs/performance.md has the measurements). What that
# saves: the ReLU's output tensor and backward pass (|relu z| = relu z is what the max-pool
# reads), the normalized activation as a tensor of its own (the threshold runs on each
# chunk while it is in cache), the threshold's saved mask (the backward recomputes it
# from z, the divisor and the k-th values, which are tiny), and on large activations most
# of the saved max-pool indices' memory. The output itself is not saved: networks may
# change it in place (a residual sum).


def hah_activation_reference(z: Tensor, sigma: float, pool: int, k: int) -> Tensor:
    """``threshold(divisive_norm(relu(z)))`` as plain autograd code (k >= 1)."""
    return top_fraction_reference(divisive_norm_reference(torch.relu(z), sigma, pool), k)


def hah_activation(z: Tensor, sigma: float, pool: int, k: int) -> Tensor:
    """``threshold(divisive_norm(relu(z)))`` of an NCHW CPU tensor, k >= 1: through the
    autograd Function when a gradient will be wanted, else forward only (no indices kept)."""
    if torch.is_grad_enabled() and z.requires_grad:
        return _HaHActivation.apply(z, sigma, pool, k)
    return _activation_forward(z, sigma, pool, k, keep_indices=False)[0]


def _bits(values: Tensor) -> Tensor:
    """The float tensor's bit patterns as same-width integers (a view)."""
    return values.view(_BITS[values.element_size()])


# Up to this many channels the channel mean of a channels-last tensor is faster as a
# matrix-vector product (16 channels: 55 vs 100-190 us per 2^18 elements; 256: 48 vs 25).
MV_CHANNELS_MAX = 64

# glibc serves blocks of this size and more with fresh mmaps (its mmap threshold grows to
# at most 32 MiB on 64-bit), so every such tensor costs a page fault per 4 KiB when it is
# first written; measured on a 2-core VM that cost more than converting the saved max-pool
# indices to int16 and back (width 1: 316 vs 348 ms per 32x32 activation, forward +
# backward), below it less (width 0.25: 77 vs 75 ms).
NARROW_INDICES_BYTES = 32 << 20


def _index_dtype(positions: int, elements: int) -> torch.dtype:
    """How to keep the max-pool indices (into maps of ``positions``) for the backward:
    int64 as the pool writes them, or int16 when int64 would be a large fresh block."""
    narrow = positions <= torch.iinfo(torch.int16).max + 1 and elements * 8 >= NARROW_INDICES_BYTES
    return torch.int16 if narrow else torch.int64


def _sums_by_mv(channels: int, dtype: torch.dtype) -> bool:
    """Whether the channel mean is taken as a matrix-vector product (few channels)."""
    return channels <= MV_CHANNELS_MAX and dtype in (torch.float32, torch.float64)


def _channel_mean(pooled: Tensor, out: Tensor) -> None:
    """``out = pooled.mean(dim=1, keepdim=True)`` for a channels-last ``pooled`` into a
    contiguous (N,1,H,W) ``out``; a matrix-vector product over few channels."""
    n, c, h, w = pooled.shape
    if not _sums_by_mv(c, pooled.dtype):
        torch.mean(pooled, dim=1, keepdim=True, out=out)
        return
    rows = pooled.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: channels-last
    ones = torch.ones(c, dtype=pooled.dtype, device=pooled.device)
    torch.mv(rows, ones, out=out.view(n * h * w)).div_(c)


def _divisor(field: Tensor, sigma: float) -> Tensor:
    """The divisor from the channel-mean pooled field (its peak is per image, so a batch
    chunk has what it needs)."""
    peak = field.amax(dim=(2, 3), keepdim=True)
    return sigma * peak + (1.0 - sigma) * field + DIVNORM_EPS


def _activation_forward(z: Tensor, sigma: float, pool: int, k: int, keep_indices: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The activation, the pooled field (N,1,H,W), the threshold's k-th values (N,C,1,1)
    and, if asked, the max-pool's indices (channels-last; see :func:`_index_dtype`)."""
    n, c, h, w = z.shape
    chunks = batch_chunks(n, c * h * w, z.device)
    # relu(z) goes to channels-last scratch: stride-1 max-pooling is ~10x faster there
    rectified = torch.empty_like(z[: chunks[0][1]], memory_format=torch.channels_last)
    pooled = torch.empty_like(rectified)
    chunk_indices = torch.empty_like(rectified, dtype=torch.int64)
    keep = torch.empty_like(_bits(z[: chunks[0][1]]))
    indices = torch.empty_like(z, dtype=_index_dtype(h * w, z.numel()),
                               memory_format=torch.channels_last) if keep_indices else None
    wide = indices is not None and indices.dtype == torch.int64  # the pool writes there
    field = torch.empty((n, 1, h, w), dtype=z.dtype, device=z.device)
    kth = torch.empty((n, c, 1, 1), dtype=z.dtype, device=z.device)
    out = torch.empty_like(z)
    for start, stop in chunks:
        size = stop - start
        part_out = out[start:stop]
        torch.clamp(z[start:stop], min=0, out=part_out)  # relu(z) = |relu(z)|
        rectified[:size].copy_(part_out)
        torch.ops.aten.max_pool2d_with_indices.out(
            rectified[:size], [pool, pool], [1, 1], [pool // 2, pool // 2], [1, 1], False,
            out=pooled[:size], indices=indices[start:stop] if wide else chunk_indices[:size])
        if indices is not None and not wide:
            indices[start:stop].copy_(chunk_indices[:size])
        _channel_mean(pooled[:size], field[start:stop])
        part_out.div_(_divisor(field[start:stop], sigma))
        kth[start:stop] = _kth_smallest(part_out, k, integer_keys=z.device.type == "cpu")
        _bits(part_out).mul_(torch.gt(part_out, kth[start:stop], out=keep[:size]))  # where()
    return out, field, kth, indices


class _HaHActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, sigma: float, pool: int, k: int) -> Tensor:
        out, field, kth, indices = _activation_forward(z, sigma, pool, k, keep_indices=True)
        ctx.save_for_backward(z, field, kth, indices)
        ctx.sigma, ctx.pool, ctx.k = sigma, pool, k
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        z, field, kth, indices = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain code instead
            with torch.enable_grad():
                again = hah_activation_reference(z, ctx.sigma, ctx.pool, ctx.k)
            return torch.autograd.grad(again, z, grad, create_graph=True)[0], None, None, None
        return _activation_backward(grad, z, field, kth, indices, ctx.sigma), None, None, None


def _activation_backward(grad: Tensor, z: Tensor, field: Tensor, kth: Tensor,
                         indices: Tensor, sigma: float) -> Tensor:
    """dL/dz of the fused activation, chunk by chunk; the normalized values and the
    threshold's mask are recomputed from z exactly as the forward computed them."""
    n, c, h, w = z.shape
    chunks = batch_chunks(n, c * h * w, z.device)
    grad_z = torch.empty_like(z)
    normalized = torch.empty_like(z[: chunks[0][1]])
    kept = torch.empty_like(normalized)
    grad_magnitude = torch.empty_like(normalized)
    chunk_indices = torch.empty_like(normalized, dtype=torch.int64,
                                     memory_format=torch.channels_last)
    divisor = _divisor(field, sigma)
    at_peak, peak_count = _peak_positions(field)
    for start, stop in chunks:
        size = stop - start
        part_divisor, part_grad_z = divisor[start:stop], grad_z[start:stop]
        x = torch.clamp(z[start:stop], min=0, out=normalized[:size]).div_(part_divisor)
        # the threshold passes the gradient where it kept a value (exact where())
        mask = torch.gt(x, kth[start:stop], out=_bits(kept[:size]))
        grad_kept = mask.mul_(_bits(grad[start:stop])).view(z.dtype)
        # out = relu(z) / d where kept:  d(relu z) = g / d,  dd = -sum_c(g * out) / d
        grad_divisor = torch.mul(grad_kept, x, out=part_grad_z).sum(dim=1, keepdim=True,
                                                                     dtype=z.dtype)
        grad_divisor.div_(part_divisor).neg_()
        torch.div(grad_kept, part_divisor, out=part_grad_z)
        grad_field = _field_gradient(grad_divisor, sigma, at_peak[start:stop],
                                     peak_count[start:stop])
        part_indices = indices[start:stop] if indices.dtype == torch.int64 else \
            chunk_indices[:size].copy_(indices[start:stop])
        routed = _through_pool(grad_field, part_indices, grad_magnitude[:size])
        # |relu z|' = 1 where z > 0, which is where x > 0 (d > 0)
        part_grad_z.addcmul_(routed, x.sign_())
    return grad_z


# ------------------------------------------ WNConv2d's filter normalization
#
# W_k / (||W_k|| + eps) with its backward written out: recorded op by op, autograd runs it
# in about seven passes over the weights (the division, the norm's two branches, their
# sum); written out it is three: the per-filter dot product of gradient and weights, then
# g / d - W * dot / (d^2 ||W||). Measurable on a CPU at width 1 (15M weights per step).


def normalize_filters_reference(weight: Tensor, eps: float) -> Tensor:
    """Each output filter divided by its l2 norm plus ``eps``, as plain autograd code."""
    norms = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())), keepdim=True)
    return weight / (norms + eps)


def normalize_filters(weight: Tensor, eps: float) -> Tensor:
    """:func:`normalize_filters_reference` with a written-out backward (eager mode; under
    torch.compile/export, TorchScript or tracing the plain code)."""
    if not eager_mode() or weight.dim() < 2:
        return normalize_filters_reference(weight, eps)
    return _NormalizeFilters.apply(weight, eps)


class _NormalizeFilters(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, eps: float) -> Tensor:
        norms = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())), keepdim=True)
        ctx.save_for_backward(weight, norms)
        ctx.eps = eps
        return weight / (norms + eps)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        weight, norms = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain code instead
            with torch.enable_grad():
                again = normalize_filters_reference(weight, ctx.eps)
            return torch.autograd.grad(again, weight, grad, create_graph=True)[0], None
        denominator = norms + ctx.eps
        filters = weight.shape[0]
        # the norm's gradient at a zero filter is 0 (as vector_norm's backward defines it)
        dot = torch.linalg.vecdot(grad.reshape(filters, -1), weight.reshape(filters, -1))
        safe_norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        coefficient = dot.view_as(norms) / (denominator * denominator * safe_norms)
        return torch.div(grad, denominator).addcmul_(weight, coefficient, value=-1.0), None
