"""BPDA (backward-pass differentiable approximation) through the HaH operations.

Inside :func:`bpda` every :class:`~hahnet.nn.layers.TopFractionThreshold` of a model (and,
with a ``+fixed-divisor`` variant, every :class:`~hahnet.nn.layers.DivisiveNorm2d`) keeps
its exact forward output, but its backward pass is replaced by a surrogate:

* ``identity``: the threshold passes the gradient to every activation (straight-through);
* ``sigmoid``: the gradient of ``x * sigmoid((x - t) / (T * s))``, a smooth step of
  temperature T around the map's threshold t (s = the map's standard deviation over H*W,
  t and s held constant);
* ``+fixed-divisor``: the divisive normalization's denominator is held constant, so its
  gradient is ``grad / d``.

This is done with forward hooks removed on exit: the model's classes, parameters, buffers
and modules are never edited, and its forward output is bit-identical inside and outside.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from hahnet.nn.fused import _kth_smallest, divisive_divisor
from hahnet.nn.layers import DivisiveNorm2d, TopFractionThreshold, threshold_rank

THRESHOLDS = ("identity", "sigmoid")
FIXED_DIVISOR = "+fixed-divisor"
DEFAULT_TEMPERATURE = 0.1
SCALE_FLOOR = 1e-12  # keeps the sigmoid's width positive on a constant map


@dataclass(frozen=True)
class Surrogate:
    """One BPDA variant: the threshold's backward surrogate, its temperature (sigmoid
    only, in units of the map's standard deviation) and whether the divisive
    normalization's denominator is held constant."""

    threshold: str = "identity"
    temperature: float = DEFAULT_TEMPERATURE
    fixed_divisor: bool = False

    def __post_init__(self) -> None:
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"unknown BPDA surrogate {self.threshold!r}; choose one of "
                             f"{', '.join(THRESHOLDS)} (optionally with {FIXED_DIVISOR})")
        if not self.temperature > 0:
            raise ValueError(f"the BPDA sigmoid temperature must be > 0, got {self.temperature}")

    @property
    def name(self) -> str:
        """The variant as written on the command line, e.g. ``sigmoid+fixed-divisor``."""
        return self.threshold + (FIXED_DIVISOR if self.fixed_divisor else "")


def parse_surrogate(text: str, temperature: float = DEFAULT_TEMPERATURE) -> Surrogate:
    """``identity``, ``sigmoid``, ``identity+fixed-divisor`` or ``sigmoid+fixed-divisor``;
    ValueError (one line) for anything else."""
    name = str(text).strip()
    fixed = name.endswith(FIXED_DIVISOR)
    return Surrogate(name.removesuffix(FIXED_DIVISOR) if fixed else name, temperature, fixed)


def has_hah_ops(model: nn.Module) -> bool:
    """Whether ``model`` holds a top-fraction threshold or a divisive normalization."""
    return any(isinstance(m, (TopFractionThreshold, DivisiveNorm2d)) for m in model.modules())


def sigmoid_step(x: Tensor, k: int, temperature: float) -> Tensor:
    """The smooth stand-in for the threshold: ``x * sigmoid((x - t) / (T * s))`` with t the
    k-th smallest value and s the standard deviation of each H*W map (both held constant)."""
    t, scale = _step_constants(x, k, temperature)
    return x * torch.sigmoid((x - t) / scale)


def sigmoid_step_grad(x: Tensor, k: int, temperature: float) -> Tensor:
    """d sigmoid_step / dx elementwise: ``sig(z) + x sig(z) (1 - sig(z)) / (T s)``."""
    t, scale = _step_constants(x, k, temperature)
    gate = torch.sigmoid((x - t) / scale)
    return gate + x * gate * (1 - gate) / scale


def _step_constants(x: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    x = x.detach()
    spread = x.flatten(2).std(dim=2, correction=0)[..., None, None]
    return _kth_smallest(x, k), temperature * spread + SCALE_FLOOR


class _ThresholdSurrogate(torch.autograd.Function):
    """Returns the threshold's exact output; its backward is the surrogate's."""

    @staticmethod
    def forward(ctx, x: Tensor, exact: Tensor, k: int, temperature: float | None) -> Tensor:
        ctx.k, ctx.temperature = k, temperature
        if temperature is not None:
            ctx.save_for_backward(x)
        return exact.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        if ctx.temperature is None:  # straight-through
            return grad, None, None, None
        (x,) = ctx.saved_tensors
        return grad * sigmoid_step_grad(x, ctx.k, ctx.temperature), None, None, None


class _FixedDivisor(torch.autograd.Function):
    """Returns the divisive normalization's exact output; backward ``grad / d``."""

    @staticmethod
    def forward(ctx, x: Tensor, exact: Tensor, sigma: float, pool: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.sigma, ctx.pool = sigma, pool
        return exact.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        (x,) = ctx.saved_tensors
        return grad / divisive_divisor(x.detach(), ctx.sigma, ctx.pool), None, None, None


def _differentiable(inputs: tuple) -> Tensor | None:
    x = inputs[0] if inputs else None
    return x if isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled() else None


def _threshold_hook(surrogate: Surrogate):
    temperature = surrogate.temperature if surrogate.threshold == "sigmoid" else None

    def hook(module: TopFractionThreshold, inputs: tuple, output: Tensor) -> Tensor | None:
        x = _differentiable(inputs)
        if x is None:
            return None  # no gradient wanted: keep the exact output as it is
        k = threshold_rank(x.shape[2] * x.shape[3], module.keep)
        if k == 0:
            return None  # the threshold keeps everything: its own gradient is the identity
        return _ThresholdSurrogate.apply(x, output.detach(), k, temperature)

    return hook


def _divisor_hook(module: DivisiveNorm2d, inputs: tuple, output: Tensor) -> Tensor | None:
    x = _differentiable(inputs)
    if x is None:
        return None
    return _FixedDivisor.apply(x, output.detach(), module.sigma, module.pool)


@contextlib.contextmanager
def bpda(model: nn.Module, surrogate: Surrogate = Surrogate()) -> Iterator[nn.Module]:
    """Within this block ``model``'s HaH operations backpropagate through ``surrogate``
    (forward unchanged, bit for bit); on exit the hooks are removed and the model is as
    it was. Yields the model itself."""
    handles = []
    try:
        for module in model.modules():
            if isinstance(module, TopFractionThreshold):
                handles.append(module.register_forward_hook(_threshold_hook(surrogate)))
            elif isinstance(module, DivisiveNorm2d) and surrogate.fixed_divisor:
                handles.append(module.register_forward_hook(_divisor_hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()
