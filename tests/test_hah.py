"""The HaH cost: score bookkeeping and exact gradient equivalence with the authors'
reference procedure (extra forward, per-layer HaH backward in reverse order)."""

import math

import pytest
import torch
import torch.nn.functional as F

from hahnet import PAPER_ALPHAS, HaHObjective, hah_score, vgg16
from hahnet.config import ModelConfig
from hahnet.nn import hah
from hahnet.nn.hah import _ScoredConv, hah_convs, reference_score, winners
from hahnet.nn.models import build_model


@pytest.mark.parametrize("channels,expected", [(1, 1), (2, 1), (3, 1), (10, 1), (11, 2),
                                               (16, 2), (64, 7), (512, 52)])
def test_winner_count(channels, expected):
    assert winners(channels, 0.1) == expected


def test_winner_count_clamped_to_leave_a_loser():
    assert winners(2, 0.9) == 1 and winners(5, 0.99) == 4
    with pytest.raises(ValueError, match="ratio"):
        winners(8, 0.0)


@pytest.mark.parametrize("channels", [1, 2, 3, 17])
@pytest.mark.parametrize("size", [(1, 1), (3, 4)])
@pytest.mark.parametrize("demote", [1.0, 0.1])
def test_score_matches_sort_restatement(channels, size, demote):
    torch.manual_seed(0)
    z = torch.randn(3, channels, *size, dtype=torch.float64, requires_grad=True)
    got = hah_score(z, 0.1, demote)
    want = reference_score(z, 0.1, demote)
    torch.testing.assert_close(got.double(), want)
    (g_got,) = torch.autograd.grad(got, z)
    (g_want,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(g_got, g_want)


def test_score_of_zero_map_is_zero_and_finite():
    z = torch.zeros(2, 5, 3, 3, requires_grad=True)
    score = hah_score(z)
    score.backward()
    assert score.item() == 0.0 and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("channels", [1, 2, 3, 12])
def test_scored_conv_routes_score_gradient_to_weight_only(channels):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(channels, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    z, score = _ScoredConv.apply(x, w, (1, 1), (1, 1), 0.1, 1.0)
    z_plain = F.conv2d(x, w, padding=1)
    torch.testing.assert_close(z, z_plain)
    torch.testing.assert_close(score.double(), reference_score(z_plain))
    upstream = torch.randn_like(z)
    gx, gw = torch.autograd.grad((z * upstream).sum() - 0.3 * score, (x, w))
    x_fixed = x.detach()
    (gw_score,) = torch.autograd.grad(reference_score(F.conv2d(x_fixed, w, padding=1)), w)
    gx_main, gw_main = torch.autograd.grad((z_plain * upstream).sum(), (x, w))
    torch.testing.assert_close(gx, gx_main)  # no score gradient reaches the input
    torch.testing.assert_close(gw, gw_main - 0.3 * gw_score)


def reference_gradients(model, x, y, alphas, ratio, demote):
    """The authors' procedure: HaH forward, per-layer HaH backward in reverse order with
    the layer's grad zeroed first, then a second forward and the cross-entropy backward."""
    convs = hah_convs(model)[: len(alphas)]
    outputs = {}
    hooks = [conv.register_forward_hook(lambda m, i, o, key=j: outputs.__setitem__(key, o))
             for j, conv in enumerate(convs)]
    model.zero_grad(set_to_none=True)
    model(x)
    for hook in hooks:
        hook.remove()
    for j in reversed(range(len(convs))):
        convs[j].weight.grad = None
        (-alphas[j] * reference_score(outputs[j], ratio, demote)).backward(retain_graph=True)
    hah_grads = {id(c.weight): c.weight.grad.clone() for c in convs}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    grads = {}
    for name, p in model.named_parameters():
        grads[name] = p.grad.clone() + hah_grads.get(id(p), torch.zeros_like(p))
    return grads


@pytest.mark.parametrize("demote", [1.0, 0.1])
def test_objective_gradient_equals_reference_procedure(demote):
    torch.manual_seed(2022)
    model = vgg16(hah=True, width=0.125).double().train()
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    alphas = tuple(a * 50 for a in PAPER_ALPHAS)  # larger alphas: HaH terms dominate
    want = reference_gradients(model, x, y, alphas, 0.1, demote)

    objective = HaHObjective(model, alphas, ratio=0.1, demote=demote)
    model.zero_grad(set_to_none=True)
    _, loss = objective(x, y)
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-10, msg=name)
    assert len(objective.scores) == 6 and all(isinstance(s, float) for s in objective.scores)
    # the HaH terms must actually matter for this test to mean anything
    first = hah_convs(model)[0].weight
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert (first.grad - want["features.0.conv.weight"]).abs().max() > 1e-3 * first.grad.abs().max()


def test_objective_loss_value_and_model_left_plain():
    torch.manual_seed(3)
    model = vgg16(hah=True, width=0.0625)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    # the scores, independently: each HaH convolution's output in a plain forward pass
    convs = hah_convs(model)[:2]
    outputs = []
    hooks = [c.register_forward_hook(lambda m, i, o: outputs.append(o)) for c in convs]
    plain_logits = model(x)
    for hook in hooks:
        hook.remove()
    scores = [float(hah_score(z.detach(), 0.1, 1.0)) for z in outputs]
    objective = HaHObjective(model, (0.5, 0.25), ratio=0.1, demote=1.0)
    logits, loss = objective(x, y)
    assert objective.scores == pytest.approx(scores, rel=1e-5)
    expected = F.cross_entropy(plain_logits, y) - 0.5 * scores[0] - 0.25 * scores[1]
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    assert all(set(vars(conv)) == set(vars(type(conv)(1, 1))) for conv in hah_convs(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits.detach(), rtol=1e-5, atol=1e-6)


def test_objective_rejects_too_many_alphas_and_no_grad():
    model = vgg16(hah=True, width=0.0625, hah_layers=2)
    with pytest.raises(ValueError, match="only 2 HaH blocks"):
        HaHObjective(model, PAPER_ALPHAS)
    objective = HaHObjective(model, (0.1,))
    with torch.no_grad(), pytest.raises(RuntimeError, match="gradients enabled"):
        objective(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))


def test_objective_under_bf16_autocast_is_finite():
    torch.manual_seed(4)
    model = vgg16(hah=True, width=0.0625)
    objective = HaHObjective(model)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = objective(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("scoring", ["threshold", "topk"])
def test_bf16_hah_weight_gradient_matches_fp32(monkeypatch, scoring):
    """Under bf16 autocast, the HaH part of each HaH layer's weight gradient (the objective's
    gradient minus that of the same objective with alphas 0) agrees with the fp32 HaH
    gradient of the activations that forward computed, at HaH/CE ratios from 0.001 to 0.1
    (the study's runs saw 0.001-0.02): in bf16 it is far below half a rounding step of the
    cross-entropy's gradient at each activation, and must not be rounded away there."""
    if scoring == "topk":  # the path CUDA takes
        monkeypatch.setattr(hah, "FAST_WINNERS_MAX_K", 0)
    torch.manual_seed(5)
    model = vgg16(hah=True, width=0.125).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    convs = hah_convs(model)
    weights = [conv.weight for conv in convs]

    def bf16_gradients(alphas):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = HaHObjective(model, alphas)(x, y)
        return torch.autograd.grad(loss, weights)

    inputs = {}
    hooks = [conv.register_forward_hook(lambda m, i, o, j=j: inputs.__setitem__(j, i[0].detach()))
             for j, conv in enumerate(convs)]
    cross_entropy = bf16_gradients([0.0] * len(convs))
    for hook in hooks:
        hook.remove()
    unit = [torch.autograd.grad(-reference_score(F.conv2d(
        inputs[j].float(), conv.normalized_weight(), None, conv.stride, conv.padding)),
        conv.weight)[0] for j, conv in enumerate(convs)]  # fp32, alpha 1
    for ratio in (0.001, 0.01, 0.1):
        alphas = [ratio * float(ce.norm() / u.norm()) for ce, u in zip(cross_entropy, unit)]
        total = bf16_gradients(alphas)
        for layer, (t, ce, u, alpha) in enumerate(zip(total, cross_entropy, unit, alphas), 1):
            part, want = t - ce, alpha * u
            cosine = float(F.cosine_similarity(part.flatten(), want.flatten(), dim=0))
            assert cosine >= 0.99, f"layer {layer}, HaH/CE {ratio}: cosine {cosine:.3f}"
            assert float(part.norm() / ce.norm()) == pytest.approx(ratio, rel=0.05)


def _scored_gradients(x, w, upstream):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    z, score = _ScoredConv.apply(x, w, (1, 1), (1, 1), 0.1, 1.0)
    return (score, *torch.autograd.grad((z * upstream).sum() - 0.7 * score, (x, w)))


@pytest.mark.parametrize("value", [1e307, -1e307, math.nan])
def test_non_finite_activations_score_as_the_topk_path(monkeypatch, value):
    """Activations that overflow to +-inf (or are NaN) at one image's positions: the CPU's
    threshold search hands them to the topk path, so score and gradients are the topk
    path's, and the score is not finite (the trainer's finite-loss check sees it)."""
    torch.manual_seed(3)
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64)
    x[1, 4, 2, 3] = value  # x stays finite for +-1e307; z = conv(x, w) is +-inf near it
    w = torch.randn(20, 12, 3, 3, dtype=torch.float64) * 100
    upstream = torch.randn(2, 20, 5, 5, dtype=torch.float64) * 1e-3
    fast = _scored_gradients(x, w, upstream)
    monkeypatch.setattr(hah, "FAST_WINNERS_MAX_K", 0)  # the topk path
    plain = _scored_gradients(x, w, upstream)
    assert not math.isfinite(fast[0].item())
    for got, want in zip(fast, plain):
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("arch", ["vgg16", "preact_resnet18"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_objective_reads_no_value_on_an_accelerator(arch, dtype):
    """On an accelerator the HaH objective's forward and backward read no tensor's value
    on the host (each read, as a check for inf/NaN or ties, would be a host sync per HaH
    layer and step). On the meta device every such read (bool, item, nonzero, boolean
    indexing) raises, and the code takes the accelerator's paths (not a CPU)."""
    with torch.device("meta"):
        model = build_model(ModelConfig(arch=arch, hah=True, width=0.0625)).to(dtype)
        x, y = torch.rand(2, 3, 32, 32, dtype=dtype), torch.randint(0, 10, (2,))
    objective = HaHObjective(model)
    _, loss = objective(x, y)
    loss.backward()
    assert len(objective.alphas) == len(hah_convs(model)) > 0
    assert all(conv.weight.grad.is_meta for conv in hah_convs(model))
