"""Layer costs as an API: for the HaH cost, the L1 activation cost and a cost written here,
on the residual networks and on plain convolutions, the one-pass objective's gradient
equals the two-pass procedure's (each cost backpropagated alone into its own layer's
weights, then the cross-entropy) to 1e-6 in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hahnet
from hahnet import HaHCost, L1Cost, LayerCostObjective
from hahnet.nn.hah import hah_convs, reference_score


class ChannelGroupL2:
    """A user's cost: group lasso over channels, the mean over images of the sum of each
    channel map's l2 norm (pushes whole channels to zero)."""

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(z.pow(2).sum(dim=(2, 3)) + 1e-12).sum(dim=1).mean()


def reference_hah(z: torch.Tensor) -> torch.Tensor:
    """The HaH cost from the sort-based statement (independent of the one-pass code)."""
    return -reference_score(z)


def two_pass_gradients(model, x, y, costs):
    """The procedure the objective must equal: one forward keeping every costed layer's
    output; for each layer, last to first, its weights' gradients cleared and
    ``alpha * cost(z)`` backpropagated, and that layer's gradients set aside; then a
    second forward and the cross-entropy backward; the set-aside gradients added."""
    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, key=layer: outputs.__setitem__(key, o))
             for layer in costs]
    model.zero_grad(set_to_none=True)
    model(x)
    for hook in hooks:
        hook.remove()
    local = {}
    for layer in reversed(list(costs)):
        alpha, cost = costs[layer]
        for p in layer.parameters():
            p.grad = None
        (alpha * cost(outputs[layer])).backward(retain_graph=True)
        local.update({id(p): p.grad.clone() for p in layer.parameters()})
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad + local.get(id(p), torch.zeros_like(p)) for n, p in model.named_parameters()}


def one_pass_gradients(model, x, y, costs):
    model.zero_grad(set_to_none=True)
    objective = LayerCostObjective(model, costs)
    objective(x, y)[1].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, objective


def plain_convs(model):
    """Some standard convolutions past the HaH front-end: the first of the second stage and
    the last of the network (each stage-2 first block, and a 1x1 shortcut where present)."""
    convs = [m for m in model.stages[1].modules() if isinstance(m, nn.Conv2d)][:2]
    return convs + [[m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]]


COSTS = {"hah": (reference_hah, HaHCost()), "l1": (L1Cost(), L1Cost()),
         "user": (ChannelGroupL2(), ChannelGroupL2())}


def assert_same(got, want):
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", list(COSTS))
@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "wrn_16_4"])
def test_one_pass_equals_two_pass_on_residual_networks(name, kind):
    torch.manual_seed(7)
    model = hahnet.create_model(name, hah=True, width=0.0625).double().train()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 3, 9])
    reference, cost = COSTS[kind]
    hah_layers = hah_convs(model)
    # HaH convolutions (weight-normalized: the override path, fused for HaH) and, for the
    # other costs, plain ones (the forward-hook path) too
    layers = hah_layers if kind == "hah" else hah_layers[:2] + plain_convs(model)
    alphas = [0.2 / (1 + i) for i in range(len(layers))]
    want = two_pass_gradients(model, x, y, {l: (a, reference) for l, a in zip(layers, alphas)})
    got, objective = one_pass_gradients(model, x, y, {l: (a, cost) for l, a in zip(layers, alphas)})
    assert_same(got, want)
    assert len(objective.values) == len(layers)
    # the costs must matter for the comparison to mean anything
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    for layer in layers:
        assert (layer.weight.grad - got[_name(model, layer.weight)]).abs().max() \
            > 1e-3 * layer.weight.grad.abs().max()


def _name(model, parameter):
    return next(n for n, p in model.named_parameters() if p is parameter)


class Biased(nn.Module):
    """Convolutions with biases, 'same' padding, a stride and a dilation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding="same")
        self.b = nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean(dim=(2, 3)))


def test_biases_padding_and_dilation_on_plain_convolutions():
    torch.manual_seed(3)
    model = Biased().double()
    x, y = torch.rand(4, 3, 12, 12, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    costs = {model.a: (0.5, L1Cost()), model.b: (0.3, ChannelGroupL2())}
    want = two_pass_gradients(model, x, y, costs)
    got, objective = one_pass_gradients(model, x, y, costs)
    assert_same(got, want)
    with torch.no_grad():  # the values: each cost of the layer's plain output
        a = model.a(x)
        b = model.b(torch.relu(a))
    assert objective.values == pytest.approx([float(L1Cost()(a)), float(ChannelGroupL2()(b))],
                                             rel=1e-12)
    assert not any(model.a._forward_hooks) and not any(model.b._forward_hooks)


def test_hah_objective_is_the_hah_instance():
    torch.manual_seed(5)
    model = hahnet.create_model("wrn_16_4", hah=True, width=0.0625).train()
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    objective = hahnet.HaHObjective(model)  # default: one of the paper's alphas per block
    assert isinstance(objective, LayerCostObjective) and len(objective.layers) == 5
    assert objective.alphas == hahnet.PAPER_ALPHAS[:5]
    generic = LayerCostObjective(model, {c: (a, HaHCost()) for c, a in
                                         zip(hah_convs(model), hahnet.PAPER_ALPHAS)})
    torch.manual_seed(0)
    _, loss = objective(x, y)
    torch.manual_seed(0)
    _, again = generic(x, y)
    assert torch.equal(loss, again) and objective.scores == [-v for v in generic.values]


def test_bf16_autocast_on_a_plain_convolution():
    torch.manual_seed(6)
    model = hahnet.create_model("resnet18", width=0.0625).train()
    objective = LayerCostObjective(model, {model.stem.conv: (0.1, L1Cost()),
                                           model.stages[1][0].conv1: (0.1, HaHCost())})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = objective(torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and model.stem.conv.weight.grad.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_costs_are_refused():
    model = hahnet.create_model("resnet18", width=0.0625)
    with pytest.raises(ValueError, match="classifier is a Linear; costs attach to nn.Conv2d"):
        LayerCostObjective(model, {model.classifier: (0.1, L1Cost())})
    with pytest.raises(ValueError, match="not a module of the model"):
        LayerCostObjective(model, {nn.Conv2d(3, 3, 3): (0.1, L1Cost())})
    with pytest.raises(ValueError, match="finite alpha and a callable cost"):
        LayerCostObjective(model, {model.stem.conv: (float("nan"), L1Cost())})
    reflect = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        LayerCostObjective(reflect, {reflect[0]: (0.1, L1Cost())})
    objective = LayerCostObjective(model, {model.stem.conv: (0.1, L1Cost())})
    with torch.no_grad(), pytest.raises(RuntimeError, match="gradients enabled"):
        objective(torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))
