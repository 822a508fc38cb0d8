"""Layer costs: a feature cost of one layer's output, and the convolution that trains only
its own weights with it.

A :class:`LayerCost` is any callable ``cost(z) -> scalar`` of a convolution's output
``z`` (NCHW, before any activation); :class:`hahnet.nn.objective.LayerCostObjective`
minimizes ``CE + sum_l alpha_l * cost_l(z_l)`` where each cost moves only its own layer's
weights (its input is treated as fixed), from one forward and one backward pass. Two
costs come with hahnet: :class:`hahnet.nn.hah.HaHCost` (minus the HaH score) and
:class:`L1Cost` (activation sparsity). A cost may also offer ``convolve(x, weight,
stride, padding) -> (z, cost)``, a fused convolution that routes its own gradients, as
the HaH cost does; the objective then uses it for weight-normalized convolutions.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class LayerCost(Protocol):
    """A differentiable scalar cost of one layer's output ``z`` (NCHW pre-activation),
    to be minimized. Written in plain torch ops: its gradient dcost/dz comes from autograd."""

    def __call__(self, z: Tensor) -> Tensor: ...


class L1Cost:
    """Activation sparsity: the mean absolute activation, ``mean(|relu(z)|)`` over every
    element (``rectify=False``: ``mean(|z|)``). Minimized, it pushes activations to zero;
    accumulated in at least fp32."""

    def __init__(self, rectify: bool = True) -> None:
        self.rectify = bool(rectify)

    def __call__(self, z: Tensor) -> Tensor:
        values = torch.relu(z) if self.rectify else z
        return values.abs().mean(dtype=torch.promote_types(z.dtype, torch.float32))

    def __repr__(self) -> str:
        return f"L1Cost(rectify={self.rectify})"


Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]  # stride, padding, dilation, groups


def conv_geometry(conv: nn.Conv2d) -> Geometry | str:
    """(stride, padding, dilation, groups) of a zero-padded ``conv`` with its padding as
    integers, or why there is no such (another padding mode, uneven 'same' padding)."""
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}; a layer cost needs zero padding"
    padding = conv.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            return f"padding='same' with kernel {conv.kernel_size} pads unevenly"
        padding = (total[0] // 2, total[1] // 2)
    pair = lambda v: (int(v[0]), int(v[1]))  # noqa: E731
    return pair(conv.stride), pair(padding), pair(conv.dilation), int(conv.groups)


def _cost_gradient(cost: LayerCost, z: Tensor) -> Tensor:
    """dcost/dz at ``z`` by autograd (zeros where the cost does not depend on z)."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_()
        (grad,) = torch.autograd.grad(cost(leaf), leaf, allow_unused=True)
    return torch.zeros_like(z) if grad is None else grad.to(z.dtype)


class _CostedConv(torch.autograd.Function):
    """A convolution's output ``z`` (computed by the caller, passed in detached) and
    ``cost(z)``, with routed gradients: the input gradient from the downstream gradient
    only; the weight (and bias) gradient from the downstream gradient plus the cost's,
    ``dL/dcost * dcost/dz``. So the cost trains this layer's weights and nothing before."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, z: Tensor,
                geometry: Geometry, cost: LayerCost) -> tuple[Tensor, Tensor]:
        value = cost(z)
        ctx.save_for_backward(x, weight, z)
        ctx.geometry, ctx.cost, ctx.bias_sizes = geometry, cost, (
            None if bias is None else list(bias.shape))
        return z, value

    @staticmethod
    def backward(ctx, grad_z: Tensor | None, grad_value: Tensor | None):
        x, weight, z = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        if grad_z is None:
            grad_z = torch.zeros_like(z)
        grad_for_weight = grad_z
        if grad_value is not None:
            grad_for_weight = grad_z + grad_value.to(z.dtype) * _cost_gradient(ctx.cost, z)
        common = dict(stride=stride, padding=padding, dilation=dilation, transposed=False,
                      output_padding=(0, 0), groups=groups)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_z, x, weight, bias_sizes=None, output_mask=[True, False, False],
                **common)[0]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_for_weight, x, weight, bias_sizes=ctx.bias_sizes,
                output_mask=[False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
                **common)
        return grad_x, grad_w, grad_b, None, None, None


def costed_conv(x: Tensor, weight: Tensor, bias: Tensor | None, z: Tensor,
                geometry: Geometry, cost: LayerCost) -> tuple[Tensor, Tensor]:
    """``z`` (the convolution of ``x`` by ``weight`` and ``bias``, already computed) as a
    tensor whose backward also carries ``cost(z)``'s gradient into ``weight`` and ``bias``
    only, and that cost. Under autocast ``z`` has the autocast dtype; ``x``, ``weight`` and
    ``bias`` are cast to it here (tracked by autograd) so that the backward sees one dtype."""
    dtype = z.dtype
    parts = [t if t is None or t.dtype == dtype else t.to(dtype) for t in (x, weight, bias)]
    return _CostedConv.apply(parts[0], parts[1], parts[2], z.detach(), geometry, cost)
