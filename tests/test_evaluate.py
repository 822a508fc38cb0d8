"""Evaluation metrics against answers known by construction: unattackable and linear
models for the attacks, sigma = 0 for noise, identity layers for SNR, known tensors for
sparsity."""

import math

import pytest
import torch
from torch import nn

import hahnet
from conftest import make_random_uint8 as random_uint8
from conftest import make_tiny_net
from hahnet import eval as evaluation
from hahnet.config import PAPER_EPS, parse_numbers
from hahnet.eval import attacks, metrics, results, runner
from hahnet.nn.hah import winners
from hahnet.nn.layers import HaHBlock, threshold_rank
from hahnet.nn.models import VGG, ModelConfig

import torchattacks  # noqa: F401  (make test installs it: missing is a failure)

CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")
D = 3 * 4 * 4  # pixels of the tiny linear-model images


class ConstantLogits(nn.Module):
    """Logits that do not depend on the input (zero gradient): no attack can change them."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(1.0, 0.0, CLASSES))

    def forward(self, x):
        return self.bias.expand(len(x), -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


class LinearMargin(nn.Module):
    """logit_0 = margin, logit_1 = v . (x - 0.5) with v = 1/D (||v||_1 = 1,
    ||v||_2 = 1/sqrt(D)), others -10. At x = 0.5 with label 0 an attack of budget eps
    raises logit_1 by at most eps * ||v||_dual: robust iff margin > that."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.full((D,), 1.0 / D))
        self.margin = margin

    def forward(self, x):
        n = len(x)
        one = (x.flatten(1) - 0.5) @ self.v
        rest = torch.full((n, CLASSES - 2), -10.0, dtype=x.dtype, device=x.device)
        return torch.cat([torch.full((n, 1), self.margin, dtype=x.dtype), one[:, None], rest], 1)


def half_images(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n, 3, 4, 4), 0.5), torch.zeros(n, dtype=torch.long)


def tiny_net(hah: bool = True) -> nn.Module:
    return make_tiny_net(hah, CLASSES)


# ------------------------------------------------------------------ clean and noise

def test_clean_accuracy_uint8_equals_float():
    model = tiny_net()
    x = random_uint8(20)
    y = torch.arange(20) % CLASSES
    a = metrics.clean_accuracy(model, x, y, batch_size=7)
    b = metrics.clean_accuracy(model, x.float() / 255, y, batch_size=20)
    assert a == b
    assert metrics.correct_mask(model, x, y).float().mean().item() == pytest.approx(a)


def test_noise_zero_equals_clean_exactly_and_is_seeded():
    model = tiny_net()
    x = random_uint8(12)
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)
    y[::3] = (y[::3] + 1) % CLASSES  # some wrong labels
    clean = metrics.clean_accuracy(model, x, y, batch_size=5)
    r1 = metrics.noise_accuracy(model, x, y, sigmas=(0.0, 0.3), draws=2, seed=3, batch_size=5)
    r2 = metrics.noise_accuracy(model, x, y, sigmas=(0.0, 0.3), draws=2, seed=3, batch_size=5)
    assert r1.mean[0] == clean and r1.std[0] == 0.0 and r1.at(0.0) == clean
    assert r1 == r2
    assert r1.at(0.2) is None


class SignOfFirstPixel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        d = self.w * (x[:, 0, 0, 0] - 0.5)
        return torch.stack([-d, d], 1)


def test_noise_accuracy_matches_gaussian_probability():
    # pixel 0.6, label "> 0.5": correct iff noise > -0.1, probability Phi(0.1 / sigma).
    x = torch.full((4000, 1, 1, 1), 0.6)
    y = torch.ones(4000, dtype=torch.long)
    r = metrics.noise_accuracy(SignOfFirstPixel(), x, y, sigmas=(0.1, 0.05), draws=3, batch_size=4000)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    assert r.mean[0] == pytest.approx(phi(1.0), abs=0.015)
    assert r.mean[1] == pytest.approx(phi(2.0), abs=0.01)
    assert 0 < r.std[0] < 0.02


def test_nan_logits_raise_one_line_error():
    class NaNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.full((len(x), CLASSES), float("nan")) + self.p

    with pytest.raises(evaluation.EvalError, match="NaN"):
        metrics.clean_accuracy(NaNNet(), *half_images())


def test_bad_inputs_are_rejected():
    with pytest.raises(evaluation.EvalError, match=r"\[0, 1\]"):
        metrics.clean_accuracy(tiny_net(), torch.full((2, 3, 8, 8), 2.0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(evaluation.EvalError):
        metrics.clean_accuracy(tiny_net(), random_uint8(3), torch.zeros(2, dtype=torch.long))
    assert parse_numbers("2/255") == pytest.approx((2 / 255,))
    assert parse_numbers("0.25,1/4") == (0.25, 0.25)
    with pytest.raises(ValueError, match="two"):
        parse_numbers("two")


# ---------------------------------------------------------------------- attacks

@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_constant_model_is_unattackable(norm):
    model = ConstantLogits()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # Square L2: >= 5x5
    y = torch.tensor([0, 0, 0, 1, 2, 0])  # class 0 always predicted: clean acc 4/6
    clean = metrics.clean_accuracy(model, x, y)
    apgd = attacks.adversarial_accuracy(model, x, y, norm, steps=5)
    pgd = attacks.pgd_accuracy(model, x, y, norm, steps=3, restarts=2)
    square = attacks.square_accuracy(model, x, y, norm, queries=20)
    assert clean == pytest.approx(4 / 6)
    for result in (apgd, pgd, square):
        assert result.accuracy == clean
        assert result.robust == [True, True, True, False, False, True]
    assert list(apgd.stages) == ["APGD-CE", "APGD-T"]
    assert not attacks.compare_attacks(apgd, pgd, square).black_box_beats_gradient


@pytest.mark.parametrize("norm,dual", [("Linf", 1.0), ("L2", 1 / math.sqrt(D))])
def test_linear_margin_robust_iff_margin_exceeds_budget(norm, dual):
    eps = PAPER_EPS[norm]
    x, y = half_images()
    safe = attacks.adversarial_accuracy(LinearMargin(2.0 * eps * dual), x, y, norm, steps=10)
    broken = attacks.adversarial_accuracy(LinearMargin(0.5 * eps * dual), x, y, norm, steps=10)
    assert safe.accuracy == 1.0
    assert broken.accuracy == 0.0 and broken.stages["APGD-CE"] == 0.0
    assert broken.max_perturbation <= eps * (1 + 1e-5)
    pgd = attacks.pgd_accuracy(LinearMargin(0.5 * eps * dual), x, y, norm, steps=10, restarts=1)
    assert pgd.accuracy == 0.0
    assert attacks.pgd_accuracy(LinearMargin(2.0 * eps * dual), x, y, norm, steps=10,
                           restarts=2).accuracy == 1.0


def test_square_breaks_weak_linear_model_and_respects_eps():
    eps = 2 / 255
    x, y = half_images(3)
    broken = attacks.square_accuracy(LinearMargin(0.5 * eps), x, y, "Linf", eps, queries=300)
    safe = attacks.square_accuracy(LinearMargin(2.0 * eps), x, y, "Linf", eps, queries=50)
    assert broken.accuracy == 0.0 and safe.accuracy == 1.0
    assert broken.max_perturbation <= eps * (1 + 1e-5)


def test_adversarial_examples_respect_eps_and_range():
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for norm, eps in (("Linf", 0.03), ("L2", 0.3)):
        adv_model = LinearMargin(0.0)
        with torch.no_grad():
            y = adv_model(x).argmax(1)
        result = attacks.pgd_accuracy(adv_model, x, y, norm, eps, steps=5, restarts=1)
        assert 0 < result.max_perturbation <= eps * (1 + 1e-5)
    with pytest.raises(evaluation.EvalError, match="budget"):
        attacks.check_adversarial(x, (x + 0.1).clamp(0, 1), "Linf", 0.05)
    with pytest.raises(evaluation.EvalError, match=r"\[0, 1\]"):
        attacks.check_adversarial(x, x + 1.0, "L2", 100.0)
    assert attacks.check_adversarial(x, x, "L2", 0.0) == 0.0


def test_worst_case_rejects_attack_that_leaves_the_ball():
    x, y = half_images(2)
    cheat = ("cheat", lambda xs, ys, seed: (xs + 0.5).clamp(0, 1))
    with pytest.raises(evaluation.EvalError, match="budget"):
        attacks.worst_case(LinearMargin(1.0), x, y, "Linf", 0.01, [cheat], "cheat", {})


def test_worst_case_is_per_image_across_stages():
    x = torch.full((4, 3, 4, 4), 0.51)  # logit_1 = 0.01 > logit_0 = 0: class 1
    y = torch.ones(4, dtype=torch.long)
    seen = []

    def break_first_two(xs, ys, seed):
        seen.append(len(xs))
        adv = xs.clone()
        adv[:2] -= 0.02  # logit_1 -> -0.01: misclassified
        return adv

    def identity(xs, ys, seed):
        seen.append(len(xs))
        return xs

    r = attacks.worst_case(LinearMargin(0.0), x, y, "Linf", 0.05,
                      [("a", break_first_two), ("b", identity)], "t", {}, batch_size=4)
    assert seen == [4, 2]  # stage b only sees what stage a did not break
    assert r.robust == [False, False, True, True] and r.stages == {"a": 0.5, "b": 0.5}
    assert r.max_perturbation == pytest.approx(0.02)


def test_attacks_leave_global_rng_untouched_and_are_deterministic():
    model = tiny_net()
    x = random_uint8(4)
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = attacks.adversarial_accuracy(model, x, y, "Linf", 8 / 255, steps=3, seed=5)
    assert torch.equal(torch.rand(3), expected)
    b = attacks.adversarial_accuracy(model, x, y, "Linf", 8 / 255, steps=3, seed=5)
    assert a.robust == b.robust and a.max_perturbation == b.max_perturbation


def result(robust, attack="x"):
    return evaluation.results.AttackResult(attack, "Linf", 0.1, len(robust), sum(robust) / len(robust), robust,
                           {}, 0.0, 0.0, {})


def test_compare_attacks_flags_black_box_win():
    apgd = result([True, True, True, False])
    pgd = result([True, False, True, False])
    square = result([False, True])  # only first 2 images, breaks image 0
    c = attacks.compare_attacks(apgd, pgd, square)
    assert c.n_images == 2 and c.apgd == 1.0 and c.pgd == 0.5 and c.square == 0.5
    assert c.gradient == 0.5 and c.all_attacks == 0.0 and c.square_only == 1
    assert not c.black_box_beats_gradient  # equal, not lower
    c2 = attacks.compare_attacks(apgd, None, square)
    assert c2.gradient == 1.0 and c2.black_box_beats_gradient


# ----------------------------------------------------------------- sparsity and SNR

def test_sparsity_sums_of_known_tensors():
    t = torch.relu(torch.tensor([-1.0, 2.0, 0.0, 3.0, -5.0, 1.0, 0.0, 0.0, 0.0, 4.0]))
    act = t.reshape(1, 10, 1, 1)
    nz, total, share, positions, mass = metrics.sparsity_sums(act, 1).tolist()
    assert (nz, total, positions) == (4, 10, 1)
    assert share == pytest.approx(4 / 10) and mass == 10
    one_hot = torch.nn.functional.one_hot(torch.tensor([[2, 0], [1, 3]]), 5).permute(2, 0, 1)[None]
    assert metrics.sparsity_sums(one_hot.float(), 1)[2].item() == 4.0  # share 1 at each of 4 positions
    uniform = torch.ones(2, 10, 3, 3)
    sums = metrics.sparsity_sums(uniform, 1).tolist()
    assert sums[2] / sums[3] == pytest.approx(0.1)
    assert metrics.sparsity_sums(torch.zeros(1, 4, 2, 2), 1)[3].item() == 0  # no active positions
    assert [winners(c, 0.1) for c in (1, 3, 10, 64, 512)] == [1, 1, 1, 7, 52]


def test_sparsity_measures_vgg_relu_before_batchnorm():
    # Identity first conv on a model that does not normalize: the ReLU output is the image.
    model = VGG(ModelConfig(arch="vgg11", width=3 / 64, mean=(0.0,) * 3, std=(1.0,) * 3)).eval()
    conv = model.features[0].conv
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(3):
            conv.weight[c, c, 1, 1] = 1.0
    x = torch.zeros(2, 3, 32, 32)
    x[:, 0, :16] = 0.7  # one channel on in the top half, nothing below: one-hot maps
    points = metrics.probe_points(model)
    assert [kind for _, kind, _ in points] == ["vgg"] * 8 and points[0][2] is model.features[0].relu
    layer = metrics.sparsity(model, x, batch_size=1)[0]
    assert layer.nonzero_fraction == pytest.approx(1 / 6)
    assert layer.top_k == 1 and layer.top_k_share == pytest.approx(1.0)
    assert layer.mean_active == pytest.approx(0.7)


def test_probe_points_of_hah_vgg16():
    points = metrics.probe_points(hahnet.vgg16(hah=True, width=0.0625))
    assert [kind for _, kind, _ in points] == ["hah"] * 6 + ["vgg"] * 7
    assert isinstance(points[0][2], HaHBlock) and isinstance(points[6][2], nn.ReLU)
    with pytest.raises(evaluation.EvalError):
        metrics.probe_points(ConstantLogits())


def test_hah_blocks_are_sparse():
    layers = metrics.sparsity(tiny_net(hah=True), random_uint8(4))
    kept = 64 - threshold_rank(64, 0.2)  # per 8x8 map the threshold keeps at most 13
    assert layers[0].kind == "hah" and 0 < layers[0].nonzero_fraction <= kept / 64
    assert layers[1].kind == "vgg" and layers[1].nonzero_fraction > kept / 64


class Passthrough(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Identity())
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return self.scale * self.features(x).flatten(1)[:, :CLASSES]


def test_snr_of_identity_layer_equals_input_snr():
    model = Passthrough()
    x = random_uint8(6, 32)
    points = [("id", "identity", model.features[0])]
    r = metrics.snr_db(model, x, sigma=0.1, seed=4, batch_size=4, points=points)
    assert r.layers[0].db == r.input_db
    # A scaled copy has the same SNR; the value is the analytic one away from clamping.
    flat = torch.full((5, 3, 32, 32), 0.5)
    scaled = Passthrough(3.0)
    r2 = metrics.snr_db(scaled, flat, sigma=0.01, points=[("id", "identity", scaled.features[0])])
    assert r2.input_db == pytest.approx(10 * math.log10(0.25 / 1e-4), abs=0.1)
    assert r2.layers[0].db == pytest.approx(r2.input_db)


def test_snr_per_image_values():
    clean = torch.ones(2, 4)
    noisy = clean + torch.tensor([[0.1, 0, 0, 0], [1, 1, 1, 1.0]])
    db = metrics.snr_per_image(clean, noisy)
    assert db.tolist() == pytest.approx([10 * math.log10(4 / 0.01), 0.0])


# ------------------------------------------------------------------------ driver

FAST = evaluation.EvalSettings(noise_sigmas=(0.0, 0.1), noise_draws=2, attack_limit=4, apgd_steps=2,
                       pgd_steps=2, pgd_restarts=1, square_limit=2, square_queries=5,
                       batch_size=8, attack_batch_size=4)


def test_evaluate_model_runs_everything_with_progress():
    model = tiny_net()
    x, y = random_uint8(10), torch.arange(10) % CLASSES
    ticks: dict[str, int] = {}

    def progress(phase, total):
        ticks[phase] = 0
        return lambda n: ticks.__setitem__(phase, ticks[phase] + n)

    r = runner.evaluate_model(model, x, y, FAST, progress=progress, name="tiny")
    assert r.noise.at(0.0) == r.clean_accuracy
    assert set(r.attacks) == {"Linf", "L2"}
    suite = r.attacks["Linf"]
    assert len(suite.indices) == 4 and len(set(suite.indices)) == 4
    assert suite.square.n_images == 2 and suite.comparison.n_images == 2
    assert [layer.kind for layer in r.sparsity] == ["hah", "vgg"]
    assert len(r.snr.layers) == 2 and len(r.filters) == 8
    assert ticks["clean"] == 10 and ticks["APGD Linf"] == 4 and ticks["Square L2"] == 2
    estimate = runner.estimate_seconds(model, FAST, 10, image_shape=(3, 8, 8))
    assert estimate["total"] == pytest.approx(sum(v for k, v in estimate.items() if k != "total"))
    assert estimate["attacks_Linf"] > 0


def test_evaluation_turns_cudnn_autotuning_off_and_restores_it():
    """Attacks change batch sizes all the time; cuDNN would re-tune for each (the flag
    is a plain setting, readable and settable without a GPU)."""
    model = tiny_net()
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(
        torch.backends.cudnn.benchmark))
    x, y = random_uint8(6), torch.arange(6) % CLASSES
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as training on CUDA leaves it
    try:
        runner.evaluate_model(model, x, y, FAST)
        assert seen and not any(seen) and torch.backends.cudnn.benchmark is True
        calls = len(seen)
        runner.estimate_seconds(model, FAST, 6, image_shape=(3, 8, 8))
        assert len(seen) > calls and not any(seen) and torch.backends.cudnn.benchmark is True
        with pytest.raises(evaluation.EvalError, match="float images"):
            runner.evaluate_model(model, x.float(), y, FAST)  # fails inside: still restored
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = was


def test_check_compatible_rejects_mismatched_data():
    model = hahnet.vgg16(width=0.0625)
    y = torch.arange(4)
    runner.check_compatible(model, random_uint8(4, 32), y, classes=[str(i) for i in range(10)])
    with pytest.raises(evaluation.EvalError, match="channels"):
        runner.check_compatible(model, torch.zeros(4, 1, 32, 32, dtype=torch.uint8), y)
    with pytest.raises(evaluation.EvalError, match="classes"):
        runner.check_compatible(model, random_uint8(4, 32), y, classes=["a", "b"])
    with pytest.raises(evaluation.EvalError, match="at least 32x32"):
        runner.check_compatible(model, random_uint8(4, 8), y)


def evaluate_checkpoint(path, images, labels, settings):
    """The library's pieces as ``hahnet eval`` puts them together for one checkpoint."""
    from hahnet.training import checkpoint

    model = hahnet.load(path)
    return runner.evaluate_model(model, images, labels, settings, name=runner.checkpoint_name(path),
                                 checkpoint=path, info=checkpoint.read_info(path))


def test_evaluate_checkpoint_round_trip(tmp_path):
    from hahnet.training import checkpoint

    model = hahnet.vgg11(width=0.0625).eval()
    checkpoint.save_model(tmp_path / "run", model, {"epoch": 1, "dataset": {"name": "x"}})
    x, y = random_uint8(4, 32), torch.arange(4)
    settings = evaluation.EvalSettings(noise_sigmas=(), attacks=False, batch_size=4)
    r = evaluate_checkpoint(str(tmp_path / "run"), x, y, settings)
    assert r.name == "run" and r.checkpoint == str(tmp_path / "run")
    assert r.clean_accuracy == metrics.clean_accuracy(model, x, y)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at .*missing"):
        evaluate_checkpoint(str(tmp_path / "missing"), x, y, settings)


def test_parts_by_norm_join_into_the_whole_evaluation():
    """`eval --norms Linf` and `--norms L2` as two parts: joined, every number equals one
    evaluation of both; parts that disagree are refused."""
    from dataclasses import replace

    model, (x, y) = tiny_net(), (random_uint8(10), torch.arange(10) % CLASSES)
    whole = runner.evaluate_model(model, x, y, FAST, name="tiny", checkpoint="c")
    parts = [runner.evaluate_model(model, x, y, replace(FAST, norms=(norm,)), name="tiny",
                                   checkpoint="c") for norm in ("L2", "Linf")]
    [joined] = results.join_parts(parts)
    assert list(joined.attacks) == ["L2", "Linf"] and joined.settings["norms"] == ["Linf", "L2"]
    for norm in ("Linf", "L2"):
        mine, theirs = joined.attacks[norm], whole.attacks[norm]
        assert mine.indices == theirs.indices
        for attack in ("apgd", "pgd", "square"):
            assert getattr(mine, attack).robust == getattr(theirs, attack).robust, (norm, attack)
    assert {k for k in joined.seconds} == {k for k in whole.seconds}
    assert list(parts[0].attacks) == ["L2"]  # the parts themselves are left as they were
    other = replace(parts[1], settings={**parts[1].settings, "apgd_steps": 3})
    with pytest.raises(ValueError, match="different settings .*apgd_steps"):
        results.join_parts([parts[0], other])
    with pytest.raises(ValueError, match="L2 attacked in two parts"):
        results.join_parts([parts[0], parts[0]])
    fewer = replace(parts[1], n_images=9)
    with pytest.raises(ValueError, match="different images"):
        results.join_parts([parts[0], fewer])
    assert len(results.join_parts([parts[0], replace(parts[1], checkpoint="d")])) == 2
