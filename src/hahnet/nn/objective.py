"""The one-pass objective for any layer costs: cross-entropy plus alpha-weighted,
layer-local feature costs, from ONE forward and ONE backward pass.

``LayerCostObjective(model, {conv: (alpha, cost), ...})`` gives, after
``loss.backward()``, exactly the gradient of the two-pass procedure: every layer's cost
``alpha_l * cost_l(z_l)`` moves only that layer's own weights (its input held fixed), the
cross-entropy moves everything. The layers' outputs are intercepted during the
objective's own forward pass only: a weight-normalized convolution through
:func:`hahnet.nn.layers.conv_override` (with the cost's fused ``convolve`` when it has
one, as the HaH cost does), any other ``nn.Conv2d`` through a forward hook registered for
that pass and removed after it. Calling the model directly stays a plain forward.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hahnet.nn.costs import LayerCost, conv_geometry, costed_conv
from hahnet.nn.layers import WNConv2d, conv_override

Found = dict[nn.Module, Tensor]


class LayerCostObjective:
    """``logits, loss = objective(x, y)`` with ``loss = CE + sum_l alpha_l * cost_l(z_l)``;
    ``loss.backward()`` leaves the layer-local gradients in every ``.grad``.

    ``costs`` maps each costed ``nn.Conv2d`` of ``model`` to ``(alpha, cost)``; a cost is
    any :class:`hahnet.nn.costs.LayerCost`. ``objective.values`` holds the last per-layer
    cost values as floats, in the order of ``costs``."""

    def __init__(self, model: nn.Module, costs: Mapping[nn.Module, tuple[float, LayerCost]],
                 name: str = "LayerCostObjective") -> None:
        self.name = name
        inside = {id(m) for m in model.modules()}
        names = {id(m): n for n, m in model.named_modules()}
        self.geometry = {}
        for layer, (alpha, cost) in costs.items():
            where = names.get(id(layer), type(layer).__name__)
            if id(layer) not in inside:
                raise ValueError(f"{name}: a costed layer ({type(layer).__name__}) is not a "
                                 f"module of the model; pass the model's own layers")
            if not isinstance(layer, nn.Conv2d):
                raise ValueError(f"{name}: layer {where} is a {type(layer).__name__}; costs "
                                 f"attach to nn.Conv2d layers (their output z is the cost's input)")
            if not math.isfinite(float(alpha)) or not callable(cost):
                raise ValueError(f"{name}: layer {where} needs (alpha, cost) with a finite "
                                 f"alpha and a callable cost(z), got ({alpha!r}, {cost!r})")
            geometry = conv_geometry(layer)
            if isinstance(geometry, str):
                raise ValueError(f"{name}: layer {where}: {geometry}")
            self.geometry[layer] = geometry
        self.model = model
        self.layers = list(costs)
        self.alphas = tuple(float(alpha) for alpha, _ in costs.values())
        self.costs = tuple(cost for _, cost in costs.values())
        self._values: Tensor | None = None

    def _keep(self, found: Found, layer: nn.Module, value: Tensor) -> None:
        if layer in found:
            raise RuntimeError(f"{self.name}: a costed layer ran twice in one forward pass; "
                               f"a layer cost needs exactly one output per step")
        found[layer] = value

    def _override(self, found: Found, layer: nn.Module, cost: LayerCost
                  ) -> Callable[[Tensor, Tensor, tuple, tuple], Tensor]:
        """What a weight-normalized convolution computes instead of conv2d."""
        fused = getattr(cost, "convolve", None)

        def convolve(x: Tensor, weight: Tensor, stride: tuple, padding: tuple) -> Tensor:
            if not torch.is_grad_enabled():
                return F.conv2d(x, weight, None, stride, padding)
            if fused is not None:
                z, value = fused(x, weight, stride, padding)
            else:
                with torch.no_grad():
                    plain = F.conv2d(x, weight, None, stride, padding)
                z, value = costed_conv(x, weight, None, plain, self.geometry[layer], cost)
            self._keep(found, layer, value)
            return z
        return convolve

    def _hook(self, found: Found, cost: LayerCost):
        """A forward hook that gives a plain convolution's output its cost."""
        def hook(layer: nn.Module, inputs: tuple[Tensor, ...], z: Tensor) -> Tensor | None:
            if not torch.is_grad_enabled():
                return None
            out, value = costed_conv(inputs[0], layer.weight, layer.bias, z,
                                     self.geometry[layer], cost)
            self._keep(found, layer, value)
            return out
        return hook

    def forward(self, x: Tensor) -> tuple[Tensor, Found]:
        """The model's logits on ``x`` and each costed layer's cost value."""
        found: Found = {}
        overrides, hooks = {}, []
        for layer, cost in zip(self.layers, self.costs):
            if isinstance(layer, WNConv2d):
                overrides[layer] = self._override(found, layer, cost)
            else:
                hooks.append(layer.register_forward_hook(self._hook(found, cost)))
        try:
            with conv_override(overrides):
                logits = self.model(x)
        finally:
            for hook in hooks:
                hook.remove()
        return logits, found

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits, found = self.forward(x)
        loss = F.cross_entropy(logits, y)
        values = []
        for alpha, layer in zip(self.alphas, self.layers):
            if layer not in found:
                raise RuntimeError(f"{self.name}: a costed layer produced no cost; call the "
                                   f"objective with gradients enabled (not under no_grad)")
            values.append(found[layer])
            loss = loss + alpha * found[layer]
        self._values = torch.stack(values).detach() if values else None
        return logits, loss

    @property
    def values(self) -> list[float]:
        """Per-layer cost values of the last call (converted lazily: no sync per step)."""
        return [] if self._values is None else [float(v) for v in self._values.tolist()]
