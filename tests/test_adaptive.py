"""Adaptive attacks (hahnet.eval.bpda, hahnet.eval.adaptive): BPDA leaves the model's
forward and state untouched and its surrogate gradients are the analytic ones; a network
whose threshold passes no gradient fools plain APGD but not BPDA; eps sweeps reach ~0;
FAB-T and Square stay within eps; the AutoAttack cascade and the worst case per image."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_tiny_net
from hahnet.config import EvalSettings
from hahnet.training.device import rng_kept
from hahnet.eval import adaptive, attacks
from hahnet.eval.bpda import Surrogate, bpda, parse_surrogate, sigmoid_step_grad
from hahnet.eval.metrics import clean_accuracy
from hahnet.eval.results import AttackResult, result_from_dict, results_json
from hahnet.eval.runner import evaluate_model
from hahnet.nn.models import ModelConfig, build_model
from hahnet.reporting import adaptive as adaptive_report
from hahnet.nn.layers import DivisiveNorm2d, TopFractionThreshold, threshold_rank

CLASSES = 4
VARIANTS = [parse_surrogate(v) for v in ("identity", "sigmoid", "identity+fixed-divisor",
                                          "sigmoid+fixed-divisor")]


pytestmark = pytest.mark.usefixtures("one_thread")


def patterns(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images 0.5 +- 0.06 in one of four fixed +-1 patterns, plus N(0, 0.04^2):
    separable, and broken by an l_inf budget near 0.06 (15/255)."""
    shapes = torch.randint(0, 2, (CLASSES, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % CLASSES
    noise = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (0.5 + 0.06 * (2 * shapes[labels].float() - 1) + 0.04 * noise).clamp(0, 1), labels


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """The tiny HaH network (one HaH block) trained to 100% on the patterns."""
    torch.manual_seed(0)
    net = make_tiny_net(True, CLASSES).train()
    x, y = patterns(256, 1)
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    order = torch.Generator().manual_seed(3)
    for _ in range(40):
        batch = torch.randint(0, len(y), (32,), generator=order)
        loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


class _NoGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out):
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad), None


class DeadThreshold(TopFractionThreshold):
    """The same threshold, whose backward passes no gradient at all: a masked network."""

    def forward(self, x):
        return _NoGradient.apply(x, super().forward(x.detach()))


def masked_copy(net: nn.Module) -> nn.Module:
    masked = copy.deepcopy(net)
    masked.features[0].threshold = DeadThreshold(net.features[0].threshold.keep)
    return masked


def settings(**overrides) -> EvalSettings:
    base = dict(noise_sigmas=(), layer_stats=False, attack_limit=None, apgd_steps=10,
                pgd_steps=0, square_limit=0, attack_batch_size=32, fab_steps=10,
                autoattack_queries=100, adaptive_limit=32, sweep_limit=32, restarts=2,
                transfer_steps=5)
    return EvalSettings(**{**base, **overrides})


def target(model: nn.Module, n: int = 32, **overrides) -> adaptive.Target:
    x, y = patterns(n, 2)
    return adaptive.Target(model, x, y, settings(**overrides), CLASSES)


# ------------------------------------------------------------------ BPDA itself

def hah_vgg() -> nn.Module:
    torch.manual_seed(1)
    return build_model(ModelConfig(hah=True, width=0.0625, num_classes=CLASSES)).eval()


@pytest.mark.parametrize("surrogate", VARIANTS, ids=lambda s: s.name)
def test_bpda_forward_bit_identical_and_model_unchanged(surrogate):
    model = hah_vgg()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(name, type(m)) for name, m in model.named_modules()]
    before = model(x)
    plain_grad, = torch.autograd.grad(before.logsumexp(1).sum(), x)
    with bpda(model, surrogate) as same:
        assert same is model
        inside = model(x)
        bpda_grad, = torch.autograd.grad(inside.logsumexp(1).sum(), x)
        with torch.no_grad():
            assert torch.equal(model(x), before)
    assert torch.equal(inside, before)  # forward bit-identical, with the graph on
    assert not torch.allclose(bpda_grad, plain_grad)  # the surrogate is in effect inside
    after = model(x)
    assert torch.equal(after, before)
    assert torch.equal(torch.autograd.grad(after.logsumexp(1).sum(), x)[0], plain_grad)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_surrogate_gradients_equal_their_analytic_forms():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    threshold, k = TopFractionThreshold(0.2), threshold_rank(20, 0.2)
    kth = x.detach().flatten(2).sort(dim=2).values[..., k - 1, None, None]

    def grad(module, surrogate=None):
        with bpda(module, surrogate) if surrogate else torch.enable_grad():
            return torch.autograd.grad(module(x), x, upstream)[0]

    assert torch.equal(grad(threshold), upstream * (x > kth))  # exact: the mask
    assert torch.equal(grad(threshold, Surrogate("identity")), upstream)
    temperature = 0.3
    scale = temperature * x.detach().flatten(2).std(dim=2, correction=0)[..., None, None]
    gate = torch.sigmoid((x.detach() - kth) / scale)
    analytic = upstream * (gate + x.detach() * gate * (1 - gate) / scale)
    got = grad(threshold, Surrogate("sigmoid", temperature))
    assert torch.allclose(got, analytic, rtol=1e-10, atol=1e-12)
    assert torch.allclose(sigmoid_step_grad(x, k, temperature) * upstream, analytic,
                          rtol=1e-10, atol=1e-12)
    norm = DivisiveNorm2d(0.1)
    field = nn.functional.max_pool2d(x.detach().abs(), 3, 1, 1).mean(1, keepdim=True)
    divisor = 0.1 * field.amax(dim=(2, 3), keepdim=True) + 0.9 * field + 1e-7
    fixed = grad(norm, Surrogate("identity", fixed_divisor=True))
    assert torch.allclose(fixed, upstream / divisor, rtol=1e-12, atol=0)
    assert not torch.allclose(grad(norm), upstream / divisor)  # the exact one differs


def test_bad_surrogate_names_are_refused():
    with pytest.raises(ValueError, match="unknown BPDA surrogate"):
        parse_surrogate("tanh")
    with pytest.raises(ValueError, match="temperature"):
        Surrogate("sigmoid", 0.0)
    with pytest.raises(ValueError, match="bpda"):
        settings(bpda=("identity", "straight"))


# ------------------------------------------------------------------ BPDA on a masked network

def test_masked_network_fools_apgd_but_not_bpda(trained):
    masked = masked_copy(trained)
    x, y = patterns(32, 2)
    assert torch.equal(masked(x), trained(x))
    eps = 8 / 255

    def robust(model, surrogate=None):
        run = attacks.apgd_stage(model, "cpu", "Linf", eps, 10)
        if surrogate is not None:
            run = adaptive.under_bpda(model, surrogate, run)
        return attacks.worst_case(model, x, y, "Linf", eps, [("a", run)], "a", {}, 32).accuracy

    clean, unmasked = clean_accuracy(trained, x, y), robust(trained)
    assert clean == 1.0 and unmasked <= 0.25
    assert robust(masked) >= clean - 0.1  # plain APGD sees no gradient: near clean
    for surrogate in VARIANTS[:2]:
        assert abs(robust(masked, surrogate) - unmasked) <= 0.15, surrogate.name


def test_eps_sweeps_are_monotone_and_reach_zero(trained):
    masked = masked_copy(trained)
    for norm in ("Linf", "L2"):
        for model, surrogate in ((trained, None), (masked, VARIANTS[0])):
            sweep = adaptive.eps_sweep(target(model), norm, surrogate)
            assert sweep.eps == sorted(sweep.eps) and len(sweep.eps) >= 6
            assert all(a >= b for a, b in zip(sweep.accuracy, sweep.accuracy[1:])), sweep
            assert sweep.accuracy[0] >= 0.9 and sweep.accuracy[-1] <= 0.05, sweep
    assert adaptive.eps_sweep(target(masked), "Linf").accuracy[-1] >= 0.9  # masked: no descent


# ------------------------------------------------------------------ AutoAttack, FAB-T, Square

@pytest.mark.parametrize("norm,eps", [("Linf", 6 / 255), ("L2", 0.5)])
def test_fab_t_and_square_respect_eps(trained, norm, eps):
    x, y = patterns(16, 2)
    for run in (attacks.fab_t_stage(trained, "cpu", norm, eps, 10, CLASSES),
                attacks.square_stage(trained, "cpu", norm, eps, 300)):
        with rng_kept("cpu"):
            adv = run(x, y, 0)
        norms = attacks.perturbation_norms(x, adv, norm)
        assert float(norms.max()) <= eps * (1 + 1e-5) and adv.min() >= 0 and adv.max() <= 1  # fp32
        with torch.no_grad():
            fooled = trained(adv).argmax(1) != y
        assert fooled.any()  # not vacuous: the attack did move some images across


def test_autoattack_continues_the_paper_cascade_on_survivors(trained):
    t = target(trained)
    eps = 5 / 255
    paper = attacks.adversarial_accuracy(trained, t.images, t.labels, "Linf", eps, 10,
                                         batch_size=32)
    aa = adaptive.autoattack(t, "Linf", eps, paper)
    assert list(aa.stages) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    assert aa.accuracy <= paper.accuracy
    for was, now, why_then, why_now in zip(paper.robust, aa.robust, paper.broken_by,
                                           aa.broken_by):
        assert now <= was and (was or why_now == why_then)  # broken stays broken, same cause
        assert why_now in (None, "clean", "APGD-CE", "APGD-T", "FAB-T", "Square")
    assert aa.params["fab_t"]["steps"] == 10 and aa.params["square"]["n_queries"] == 100
    assert aa.params["apgd_t"]["n_target_classes"] == CLASSES - 1


def always_class_0(n: int) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """``n`` grey 2x2 images of class 0 and a model that answers 0 whatever it sees: every
    image survives any attack, so a test sees exactly which images a stage was given."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0]))
    return torch.full((n, 3, 2, 2), 0.5), torch.zeros(n, dtype=torch.long), model


def test_worst_case_start_skips_images_broken_earlier():
    x, y, model = always_class_0(4)
    seen = []

    def stage(xs, ys, seed):
        seen.append(len(xs))
        return xs

    r = attacks.worst_case(model, x, y, "Linf", 0.1, [("s", stage)], "t", {},
                           start=[True, False, True, False])
    assert seen == [2] and r.robust == [True, False, True, False]
    assert r.broken_by == [None, "earlier", None, "earlier"] and r.stages == {"s": 0.5}


def test_worst_over_is_per_image_and_names_the_first_breaker():
    def row(robust, broken):
        return AttackResult("r", "Linf", 0.1, len(robust), sum(robust) / len(robust), robust,
                            {}, 0.01, 1.0, {}, broken)

    paper = row([True, True, False, True], [None, None, "clean", None])
    other = row([False, True, False], ["x", None, "clean"])  # covers the first 3 only
    last = row([False, False, False, False], ["w", "y", "clean", "z"])  # image 0 again
    worst = adaptive.worst_over({"paper": paper, "other": other, "last": last}, 4)
    assert worst.robust == [False, False, False, False]
    assert worst.broken_by == ["other", "last", "clean", "last"]
    assert worst.stages == {"paper": 0.75, "other": 1 / 3, "last": 0.0}


# ------------------------------------------------------------------ the whole evaluation

def test_evaluate_model_all_suites_round_trip_through_json(trained):
    x, y = patterns(32, 2)
    source = make_tiny_net(False, CLASSES)
    result = evaluate_model(trained, x, y, settings(suite="all", norms=("Linf",), sweep_limit=8,
                                                    bpda=("sigmoid",)),
                            sources=[("plain", source), ("hah", masked_copy(trained))])
    a = result.attacks["Linf"].adaptive
    assert list(a.rows) == ["AutoAttack", "margin", "BPDA", "transfer"]
    assert list(a.rows["transfer"].stages) == ["from plain", "from hah", "from hah (BPDA sigmoid)"]
    assert a.worst.accuracy <= min(r.accuracy for r in a.rows.values())
    assert a.worst.accuracy <= result.attacks["Linf"].apgd.accuracy
    assert [s.attack for s in a.sweeps] == ["APGD", "BPDA[sigmoid] APGD"]
    document = json.loads(json.dumps(results_json([result])))
    back = result_from_dict(document["models"][0])
    assert back.attacks == result.attacks
    assert json.loads(json.dumps(results_json([back])))["models"] == document["models"]
    plain = evaluate_model(make_tiny_net(False, CLASSES), x, y,
                           settings(suite="adaptive", norms=("L2",), sweep_limit=0))
    notes = plain.attacks["L2"].adaptive.notes
    assert any("no HaH operations" in n for n in notes) and any("transfer" in n for n in notes)


def test_cascade_attacks_only_what_is_left_and_finds_the_same_worst_case(trained):
    """With ``cascade`` each row attacks only the images the rows before it left standing:
    the worst case matches the full suite's (on the masked network too, where BPDA must
    find what APGD misses), and where APGD breaks most images the model is called far
    less often (the survivors of all batches are attacked together)."""
    x, y = patterns(32, 2)
    seen = []

    def run(model: nn.Module, cascade: bool):
        hook = model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
        seen.clear()
        try:
            result = evaluate_model(model, x, y, settings(
                suite="adaptive", norms=("Linf",), eps_linf=6 / 255, sweep_limit=0,
                bpda=("identity",), cascade=cascade, attack_batch_size=8),
                sources=[("plain", make_tiny_net(False, CLASSES))])
        finally:
            hook.remove()
        section, _ = adaptive_report.write([result], Path(tempfile.mkdtemp()))
        assert ("Cascaded:" in section) == cascade
        assert ("Each row is that attack on its own" in section) != cascade
        return result.attacks["Linf"], len(seen)

    for model in (trained, masked_copy(trained)):
        (full, full_calls), (cascade, cascade_calls) = run(model, False), run(model, True)
        assert full.apgd.robust == cascade.apgd.robust
        assert abs(cascade.adaptive.worst.accuracy - full.adaptive.worst.accuracy) <= 2 / 32
        assert cascade.adaptive.worst.accuracy <= 0.35
        standing = list(cascade.apgd.robust)
        for name, row in cascade.adaptive.rows.items():
            for i, (before, now) in enumerate(zip(standing, row.robust)):
                assert not now or before, (name, i)  # never robust where an earlier row broke it
                assert before or row.broken_by[i] in ("earlier", "clean"), (name, i)
            standing = row.robust
        assert cascade.adaptive.worst.robust == standing
        assert any("cascade" in note for note in cascade.adaptive.notes)
        if model is trained:
            assert full.apgd.accuracy <= 0.3 and cascade_calls < 0.5 * full_calls, \
                (cascade_calls, full_calls)
        else:
            assert full.apgd.accuracy >= 0.9  # masked: APGD alone leaves it standing


def test_cascade_attacks_the_survivors_of_all_batches_together():
    """Survivors spread over four batches are attacked as one batch (one call of the
    stage), reported in their places, the others as broken "earlier"."""
    x, y, model = always_class_0(32)
    start = [i in (0, 9, 17, 25) for i in range(32)]
    for cascade, calls in ((False, [1, 1, 1, 1]), (True, [4])):
        seen = []

        def stage(xs, ys, seed):
            seen.append(len(xs))
            return xs

        t = adaptive.Target(model, x, y, settings(attack_batch_size=8, cascade=cascade), 2)
        r = t.run("Linf", 0.1, [("s", stage)], "t", {}, 32, start)
        assert seen == calls
        assert r.robust == start and r.accuracy == 4 / 32 and r.stages == {"s": 4 / 32}
        assert [b for b, kept in zip(r.broken_by, start) if not kept] == ["earlier"] * 28
