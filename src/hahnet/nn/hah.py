"""The layer-local Hebbian/anti-Hebbian (HaH) cost and the one-pass objective.

At each position of a layer's pre-activation ``z`` (NCHW), the K = ceil(ratio * C)
strongest rectified channels are rewarded and the rest penalised:
``H = mean_{n,h,w}[mean(top K of relu z) - demote * mean(the other C - K)]``.
Training minimises ``CE - sum_l alpha_l H_l`` where ``H_l`` trains only layer l's
weights. :class:`HaHObjective` gets that gradient from ONE forward and ONE backward:
the convolution's backward receives the HaH gradient separately and adds it to the
weight gradient only, so it never reaches earlier layers (docs/method.md states it all).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hahnet.config import PAPER_ALPHAS, PAPER_DEMOTE, PAPER_RATIO, default_alphas, winners
from hahnet.nn.fused import batch_chunks, eager_mode
from hahnet.nn.layers import HaHBlock, WNConv2d
from hahnet.nn.objective import LayerCostObjective

__all__ = ["PAPER_ALPHAS", "HaHCost", "HaHObjective", "hah_score", "reference_score",
           "winners", "hah_convs", "scored_conv2d"]


def _score_terms(z: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """relu(z), its top-k values over channels and their indices."""
    rectified = torch.relu(z)
    top = rectified.topk(k, dim=1, sorted=False)
    return rectified, top.values, top.indices


def _score_from_terms(rectified: Tensor, top_values: Tensor, k: int, demote: float) -> Tensor:
    channels = rectified.shape[1]
    accumulate = torch.promote_types(rectified.dtype, torch.float32)  # bf16 sums in fp32
    top_sum = top_values.sum(dim=1, dtype=accumulate)
    per_position = top_sum / k
    if channels > k:
        rest_sum = rectified.sum(dim=1, dtype=accumulate) - top_sum
        per_position = per_position - demote * rest_sum / (channels - k)
    return per_position.mean()


def _score_from_sums(top_sum: Tensor, positive_sum: Tensor, channels: int, k: int,
                     demote: float) -> Tensor:
    """As :func:`_score_from_terms`, from the per-position sums of the winners' and of all
    rectified values."""
    per_position = top_sum / k
    if channels > k:
        rest_sum = positive_sum - top_sum
        per_position = per_position - demote * rest_sum / (channels - k)
    return per_position.mean()


def hah_score(z: Tensor, ratio: float = PAPER_RATIO, demote: float = PAPER_DEMOTE) -> Tensor:
    """The HaH score H of pre-activations ``z`` (NCHW): a differentiable scalar, at least fp32."""
    if z.dim() != 4:
        raise ValueError(f"hah_score expects NCHW pre-activations, got shape {tuple(z.shape)}")
    k = winners(z.shape[1], ratio)
    rectified, top_values, _ = _score_terms(z, k)
    return _score_from_terms(rectified, top_values, k, demote)


def reference_score(z: Tensor, ratio: float = PAPER_RATIO,
                    demote: float = PAPER_DEMOTE) -> Tensor:
    """The HaH score as plain autograd code, literally as docs/method.md states it: sort
    relu(z) over the channels, mean of the top K minus ``demote`` times the mean of the
    rest. Deliberately independent of the one-pass code above; the tests and the
    benchmark's reference step check against it."""
    channels = z.shape[1]
    k = winners(channels, ratio)
    rectified = torch.relu(z).to(torch.promote_types(z.dtype, torch.float32))
    ordered = rectified.sort(dim=1, descending=True).values
    top = ordered[:, :k].mean(dim=1)
    rest = ordered[:, k:].mean(dim=1) if channels > k else torch.zeros_like(top)
    return (top - demote * rest).mean()


def _score_gradient(z: Tensor, top_indices: Tensor, k: int, demote: float,
                    scale: float | None = None) -> Tensor:
    """dH/dz: 1/K on the winners, -demote/(C-K) on the others, 0 where z <= 0, times
    ``scale`` (default 1/(N*H*W): the mean over positions)."""
    n, c, h, w = z.shape
    if scale is None:
        scale = 1.0 / (n * h * w)
    loser = -demote / (c - k) if c > k else 0.0
    positive = (z > 0).to(z.dtype)
    grad = positive * (loser * scale)
    winner_boost = positive.gather(1, top_indices) * ((1.0 / k - loser) * scale)
    return grad.scatter_add_(1, top_indices, winner_boost)


# Largest K for which the channel top-K is found by repeated maxima (below) instead of
# ``topk`` over the channel axis. On CPU, topk over the channels is a small sort per
# position and costs more than K - 1 rounds of (compare, multiply, max) up to at least
# K = 26 (VGG16 width 1.0, 256 channels): measured in docs/performance.md.
FAST_WINNERS_MAX_K = 32


class _Winners:
    """Who won the channel top-K at each position, compactly: the positive winners are
    ``z >= threshold`` (N1HW), except at the few positions where values tie across the
    K-th place, which carry topk's own choice (``tied`` (n, h, w) index tensors and
    ``chosen`` (positions, K) channels): there the threshold is +inf."""

    def __init__(self, threshold: Tensor, tied: tuple[Tensor, ...] | None,
                 chosen: Tensor | None) -> None:
        self.threshold, self.tied, self.chosen = threshold, tied, chosen


def _winners_by_threshold(z: Tensor, k: int, accumulate: torch.dtype
                          ) -> tuple[_Winners, Tensor, Tensor] | None:
    """The top-K channels of relu(z) at every position, and the per-position sums of the
    winners' and of all rectified values; ``None`` if z is not finite. Exact: only max,
    compare and 0/1 products (in one scratch buffer), plus topk at tied positions. For a
    CPU only: its checks for inf/NaN and ties read values, a host sync on an accelerator."""
    n, c, h, w = z.shape
    chunks = batch_chunks(n, c * h * w, z.device)  # cache-sized, as the fused layers
    scratch = torch.empty_like(z[: chunks[0][1]])
    threshold = torch.empty((n, 1, h, w), dtype=z.dtype, device=z.device)
    counts = torch.empty((n, 1, h, w), dtype=z.dtype, device=z.device)
    top_sum = torch.empty((n, h, w), dtype=accumulate, device=z.device)
    positive_sum = torch.empty_like(top_sum)
    smallest = torch.nextafter(torch.zeros((), dtype=z.dtype, device=z.device),
                               torch.ones((), dtype=z.dtype, device=z.device))
    for start, stop in chunks:
        part, work = z[start:stop], scratch[: stop - start]
        torch.clamp(part, min=0, out=work)  # relu
        level = work.amax(dim=1, keepdim=True)  # the largest value, or 0
        torch.sum(work, dim=1, dtype=accumulate, out=positive_sum[start:stop])
        for _ in range(k - 1):  # the next smaller distinct value (<= 0 once none is positive)
            torch.lt(part, level, out=work)
            level = work.mul_(part).amax(dim=1, keepdim=True)
        # level is now the K-th largest distinct value (<= 0 when fewer than K are
        # positive). The positive winners are those >= max(level, smallest positive
        # number), unless values tie, which shows as more than K of them.
        torch.clamp(level, min=smallest, out=threshold[start:stop])
        won = torch.ge(part, threshold[start:stop], out=work)
        torch.sum(won, dim=1, keepdim=True, out=counts[start:stop])
        # winners are positive, so z = relu(z) on them
        torch.sum(won.mul_(part), dim=1, dtype=accumulate, out=top_sum[start:stop])
    # inf or NaN in z shows here: +inf/NaN in the positive sum, -inf (0 * -inf) in the top
    if not bool(torch.isfinite(positive_sum).all() & torch.isfinite(top_sum).all()):
        return None
    over = (counts > k)[:, 0]
    tied = chosen = None
    if bool(over.any()):
        # Ties: take topk's choice there, as the plain implementation does (topk on the
        # same row of values makes the same choice wherever the row is stored).
        tied = over.nonzero(as_tuple=True)
        rows = torch.relu(z.permute(0, 2, 3, 1)[over])  # (positions, C), channel order
        chosen = rows.topk(k, dim=1, sorted=False).indices
        picked = torch.zeros_like(rows).scatter_(1, chosen, 1.0).mul_(rows > 0)
        threshold.permute(0, 2, 3, 1)[over] = math.inf
        top_sum[over] = (picked * rows).sum(dim=1, dtype=accumulate)
    return _Winners(threshold, tied, chosen), top_sum, positive_sum


def _gradient_levels(z: Tensor, k: int, demote: float, scale: float) -> tuple[float, float]:
    """dH/dz's value on a positive loser, and what a positive winner gets on top of it
    (rounded to z's dtype first, as :func:`_score_gradient`'s scatter_add adds it)."""
    c = z.shape[1]
    loser = -demote / (c - k) if c > k else 0.0
    boost = torch.tensor((1.0 / k - loser) * scale, dtype=z.dtype).item()
    return loser * scale, boost


def _local_gradient(z: Tensor, found: _Winners, start: int, stop: int, loser: float,
                    boost: float, out: Tensor, won: Tensor) -> Tensor:
    """dH/dz of the images [start, stop) of z, written into ``out``: ``loser`` where z > 0
    plus ``boost`` on the winners of a :class:`_Winners`; ``won`` is scratch of out's shape."""
    part = z[start:stop]
    local = torch.gt(part, 0, out=out).mul_(loser)
    torch.ge(part, found.threshold[start:stop], out=won)
    local.add_(won, alpha=boost)
    if found.tied is not None:
        inside = (found.tied[0] >= start) & (found.tied[0] < stop)
        if bool(inside.any()):
            chosen = found.chosen[inside]
            nn_, hh, ww = (i[inside][:, None].expand_as(chosen) for i in found.tied)
            nn_ = nn_ - start
            positive = (part[nn_, chosen, hh, ww] > 0).to(z.dtype)
            local.index_put_((nn_, chosen, hh, ww), positive.mul_(boost), accumulate=True)
    return local


# In fp32 the weight gradient of a scored convolution is summed over batch chunks of about
# this many times fused.CHUNK_ELEMENTS (2^20 fp32 elements: 4 MiB): grad_z + dL/dH * dH/dz
# is then chunk-sized scratch, not an activation-sized fresh tensor, and the
# weight-gradient convolutions of a few images each ran faster on a 2-core CPU than one
# of the whole batch (docs/performance.md).
WEIGHT_CHUNK_SCALE = 4


def _score_gradient_from_winners(z: Tensor, found: _Winners, k: int, demote: float,
                                 scale: float) -> Tensor:
    """dH/dz times ``scale`` (in place of 1/(N*H*W)), from a :class:`_Winners`."""
    n, c, h, w = z.shape
    loser, boost = _gradient_levels(z, k, demote, scale)
    out = torch.empty_like(z)
    chunks = batch_chunks(n, c * h * w, z.device)
    won_scratch = torch.empty_like(z[: chunks[0][1]])
    for start, stop in chunks:
        _local_gradient(z, found, start, stop, loser, boost, out[start:stop],
                        won_scratch[: stop - start])
    return out


def _weight_gradient(ctx, x: Tensor, weight: Tensor, z: Tensor, grad_z: Tensor,
                     grad_score: Tensor | None) -> Tensor:
    """The weight gradient of :class:`_ScoredConv`: the main branch's plus the score's
    (dL/dH * dH/dz). In fp32 (or wider) the weight-gradient convolution of their sum (with
    the CPU's winners, :class:`_Winners`, chunk by chunk). In bf16/fp16 the score's term
    per element lies far below half a rounding step of ``grad_z`` and would vanish from
    that sum, so it gets its own convolution, and both are scaled and added in fp32."""
    stride, padding = ctx.conv
    common = dict(bias_sizes=None, stride=stride, padding=padding, dilation=(1, 1),
                  transposed=False, output_padding=(0, 0), groups=1)

    def convolve(grad: Tensor, images: Tensor = x) -> Tensor:
        return torch.ops.aten.convolution_backward(
            grad, images, weight, output_mask=[False, True, False], **common)[1]

    if grad_score is None:
        return convolve(grad_z)
    if z.element_size() >= 4:
        if ctx.winners is not None:
            return _chunked_weight_gradient(convolve, x, z, grad_z, grad_score, ctx.winners,
                                            ctx.k, ctx.demote)
        local = _score_gradient(z, ctx.top_indices, ctx.k, ctx.demote)
        return convolve(grad_z + grad_score.to(z.dtype) * local)
    # dH/dz without its 1/(N*H*W), which is applied in fp32 with dL/dH
    local = (_score_gradient_from_winners(z, ctx.winners, ctx.k, ctx.demote, 1.0)
             if ctx.winners is not None else
             _score_gradient(z, ctx.top_indices, ctx.k, ctx.demote, 1.0))
    n, _, h, w = z.shape
    score_part = convolve(local).float().mul_(grad_score.float() / (n * h * w))
    return convolve(grad_z).float().add_(score_part)


def _chunked_weight_gradient(convolve: Callable[[Tensor, Tensor], Tensor], x: Tensor,
                             z: Tensor, grad_z: Tensor, grad_score: Tensor, found: _Winners,
                             k: int, demote: float) -> Tensor:
    """The fp32 (or wider) weight gradient from a :class:`_Winners`: the convolutions of
    ``grad_z + dL/dH * dH/dz`` (one fused multiply-add per element) over batch chunks,
    summed."""
    n, c, h, w = z.shape
    loser, boost = _gradient_levels(z, k, demote, 1.0 / (n * h * w))
    factor = grad_score.to(z.dtype)
    chunks = batch_chunks(n, c * h * w, z.device, scale=WEIGHT_CHUNK_SCALE)
    local_scratch = torch.empty_like(z[: chunks[0][1]])
    won_scratch = torch.empty_like(local_scratch)
    total = None
    for start, stop in chunks:
        local = _local_gradient(z, found, start, stop, loser, boost,
                                local_scratch[: stop - start], won_scratch[: stop - start])
        part = convolve(torch.addcmul(grad_z[start:stop], local, factor, out=local),
                        x[start:stop])
        total = part if total is None else total.add_(part)
    return total


class _ScoredConv(torch.autograd.Function):
    """conv2d that also returns the HaH score of its output, with routed gradients.

    Backward: input gradient from the main branch only; weight gradient from the main
    branch plus the score's (dL/dH * dH/dz). ``weight`` may be wider than ``x`` (the
    fp32 weights under autocast): it convolves in x's dtype and gets its gradient in its
    own, so that a bf16 run keeps the score's small gradient (see :func:`_weight_gradient`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride, padding, ratio: float,
                demote: float) -> tuple[Tensor, Tensor]:
        z = F.conv2d(x, weight.to(x.dtype), None, stride, padding)
        k = winners(z.shape[1], ratio)
        found = None  # an accelerator takes topk's winners: no value read, no host sync
        if z.device.type == "cpu" and k <= FAST_WINNERS_MAX_K and eager_mode():
            accumulate = torch.promote_types(z.dtype, torch.float32)
            result = _winners_by_threshold(z, k, accumulate)
            if result is not None:
                found, top_sum, positive_sum = result
                score = _score_from_sums(top_sum, positive_sum, z.shape[1], k, demote)
        top_indices = None
        if found is None:
            rectified, top_values, top_indices = _score_terms(z, k)
            score = _score_from_terms(rectified, top_values, k, demote)
            del rectified, top_values
        ctx.save_for_backward(x, weight, z)
        ctx.winners, ctx.top_indices = found, top_indices
        ctx.conv = (stride, padding)
        ctx.k, ctx.demote = k, demote
        return z, score

    @staticmethod
    def backward(ctx, grad_z: Tensor | None, grad_score: Tensor | None):
        x, weight, z = ctx.saved_tensors
        stride, padding = ctx.conv
        if grad_z is None:
            grad_z = torch.zeros_like(z)
        cast = weight.to(z.dtype)  # the weights as the forward convolved them
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_z, x, cast, bias_sizes=None, stride=stride, padding=padding,
                dilation=(1, 1), transposed=False, output_padding=(0, 0), groups=1,
                output_mask=[True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_gradient(ctx, x, cast, z, grad_z, grad_score).to(weight.dtype)
        return grad_x, grad_w, None, None, None, None


def scored_conv2d(x: Tensor, weight: Tensor, stride, padding, ratio: float,
                  demote: float) -> tuple[Tensor, Tensor]:
    """conv2d(x, weight) and its HaH score; the score's gradient reaches only ``weight``.

    Under autocast, ``x`` is cast to the autocast dtype here (tracked by autograd) so that
    the custom backward sees consistent dtypes; ``weight`` stays as it is (fp32) and is
    cast inside, so that its gradient comes back in fp32 with the score's part intact.
    """
    device_type = x.device.type  # a device without autocast (meta) runs as it is
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _ScoredConv.apply(x.to(dtype), weight, stride, padding, ratio, demote)
    return _ScoredConv.apply(x, weight, stride, padding, ratio, demote)


def hah_convs(model: nn.Module) -> list[WNConv2d]:
    """The WN convolutions of the model's HaH blocks, in forward order."""
    return [m.conv for m in model.modules() if isinstance(m, HaHBlock)]


class HaHCost:
    """The HaH score as a layer cost (:class:`hahnet.nn.costs.LayerCost`): ``-H(z)``,
    since objectives minimize costs and HaH rewards a high score. ``convolve`` is the
    fused path: the convolution and its score in one autograd Function (:func:`scored_conv2d`)."""

    def __init__(self, ratio: float = PAPER_RATIO, demote: float = PAPER_DEMOTE) -> None:
        winners(2, ratio)  # validates ratio
        if demote < 0:
            raise ValueError(f"HaHCost: demote must be >= 0, got {demote}")
        self.ratio, self.demote = float(ratio), float(demote)

    def __call__(self, z: Tensor) -> Tensor:
        return -hah_score(z, self.ratio, self.demote)

    def convolve(self, x: Tensor, weight: Tensor, stride, padding) -> tuple[Tensor, Tensor]:
        z, score = scored_conv2d(x, weight, stride, padding, self.ratio, self.demote)
        return z, -score

    def __repr__(self) -> str:
        return f"HaHCost(ratio={self.ratio}, demote={self.demote})"


class HaHObjective(LayerCostObjective):
    """Cross-entropy minus alpha-weighted, layer-local HaH scores, in one pass: the
    :class:`~hahnet.nn.objective.LayerCostObjective` whose costs are :class:`HaHCost`.

    ``logits, loss = objective(x, y)``; ``loss.backward()`` then leaves in every
    ``.grad`` the gradient of the HaH method. The first ``len(alphas)`` HaH convolutions
    of ``model`` are scored (default: one alpha per HaH block, the paper's,
    :func:`hahnet.config.default_alphas`) during the objective's own forward pass only
    (through :func:`hahnet.nn.layers.conv_override`): the model itself is never modified,
    and calling it directly is a plain forward. ``objective.scores`` holds the last
    per-layer scores as floats.
    """

    def __init__(self, model: nn.Module, alphas: Sequence[float] | None = None,
                 ratio: float = PAPER_RATIO, demote: float = PAPER_DEMOTE) -> None:
        convs = hah_convs(model)
        alphas = default_alphas(len(convs)) if alphas is None else alphas
        if len(alphas) > len(convs):
            raise ValueError(f"HaHObjective: {len(alphas)} alphas given but the model has "
                             f"only {len(convs)} HaH blocks; pass at most {len(convs)} alphas")
        cost = HaHCost(ratio, demote)
        super().__init__(model, {conv: (alpha, cost) for alpha, conv in zip(alphas, convs)},
                         name="HaHObjective")
        self.ratio, self.demote = cost.ratio, cost.demote

    @property
    def scores(self) -> list[float]:
        """Per-layer HaH scores of the last call (converted lazily: no device sync per step)."""
        return [-value for value in self.values]
