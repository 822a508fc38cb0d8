"""The speed benchmark (quick configuration: structure, not speed) and the fused fast
paths of the HaH layers and objective against their plain autograd formulas."""

import json
import math

import pytest
import torch

from hahnet.experiments import bench
from hahnet.reporting import bench as bench_report
from hahnet.cli import commands as cli
from hahnet.nn import hah
from hahnet.nn import fused
from hahnet.nn.fused import (_DivisiveNorm, _TopFraction, divisive_norm_reference,
                             top_fraction_reference)
from hahnet.nn.layers import DivisiveNorm2d, TopFractionThreshold, threshold_rank


@pytest.fixture(scope="module")
def quick_result():
    config = bench.BenchConfig.quick(batch_size=4, widths=(0.0625,))
    return bench.run_benchmark(config)


def test_quick_benchmark_structure(quick_result):
    result = quick_result
    assert set(result) >= {"machine", "config", "runs", "targets", "seconds"}
    assert result["machine"]["threads"] >= 1 and result["machine"]["torch"] == torch.__version__
    assert len(result["runs"]) == 1
    run = result["runs"][0]
    assert (run["width"], run["precision"], run["channels_last"]) == (0.0625, "fp32", False)
    assert set(run["steps"]) == set(bench.STEPS)
    for entry in run["steps"].values():
        assert entry["median_s"] > 0 and len(entry["times_s"]) == result["config"]["repeats"]
        assert entry["min_s"] <= entry["median_s"]
    median = {name: entry["median_s"] for name, entry in run["steps"].items()}
    assert math.isclose(run["ratios"]["hah_over_plain"], median["hah"] / median["plain"])
    assert math.isclose(run["ratios"]["reference_over_hah"], median["reference"] / median["hah"])
    assert math.isclose(run["ratios"]["hah_over_standard"], median["hah"] / median["standard"])
    blocks = {(b["block"], b["resolution"]) for b in run["blocks"]}
    assert blocks == {(name, r) for name in bench.BLOCKS for r, _ in bench.RESOLUTIONS}
    assert all(b["median_s"] > 0 and b["channels"] >= 1 for b in run["blocks"])
    assert run["eval"]["clean"]["images_per_s"] > 0
    apgd = run["eval"]["apgd"]
    assert "skipped" in apgd or apgd["iter_images_per_s"] > 0
    json.dumps(result)  # serializable as is


def test_report_and_cli_write_json(quick_result, tmp_path, capsys):
    text = bench_report.format_report(quick_result)
    assert "a/b HaH / plain" in text and "c/a reference / HaH" in text and "a/d" in text
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--quick", "--batch-size", "2", "--sections", "steps",
                       "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["config"]["sections"] == ["steps"] and "blocks" not in saved["runs"][0]
    assert "(a) HaH step" in capsys.readouterr().out


def test_config_validation():
    with pytest.raises(ValueError, match="precisions"):
        bench.BenchConfig(precisions=("fp16",))
    with pytest.raises(ValueError, match="sections"):
        bench.BenchConfig(sections=("nope",))
    assert cli.main(["bench", "--quick", "--sections", "nope"]) == 2


def test_reference_step_gives_the_objective_gradient():
    """(c) is the authors' procedure: same gradient as the one-pass objective."""
    from hahnet import vgg16

    torch.manual_seed(0)
    model = vgg16(hah=True, width=0.0625).double()
    x, y = torch.rand(3, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (3,))
    alphas = tuple(a * 50 for a in hah.PAPER_ALPHAS)
    objective = hah.HaHObjective(model, alphas)
    model.zero_grad(set_to_none=True)
    objective(x, y)[1].backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}

    class Capture(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]

    optimizer = Capture(model.parameters())
    bench.ReferenceStep(model, optimizer, alphas)(x, y)
    for (name, _), got in zip(model.named_parameters(), optimizer.grads):
        torch.testing.assert_close(got, want[name], rtol=1e-6, atol=1e-12, msg=name)


# ------------------------------------------------ fast paths against plain formulas

INPUTS = {
    "randn": lambda s: torch.randn(s, dtype=torch.float64),
    "rectified": lambda s: torch.relu(torch.randn(s, dtype=torch.float64)),
    "ties": lambda s: torch.randint(-2, 3, s).double(),
    "zeros": lambda s: torch.zeros(s, dtype=torch.float64),
    "huge": lambda s: torch.rand(s, dtype=torch.float64) * 1e30,
}


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Run the fused paths on the whole batch at once, or image by image (as they do on
    large activations)."""
    if request.param == "chunked":  # layers' chunking also drives the HaH score's
        monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(fused, "UNCHUNKED_ELEMENTS", 0)
    return request.param


@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_layers_match_plain_autograd(kind, channels_last, chunking):
    torch.manual_seed(0)
    for shape in [(2, 3, 7, 5), (2, 4, 8, 8), (1, 2, 1, 1)]:
        x = INPUTS[kind](shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(shape, dtype=torch.float64)
        k = threshold_rank(shape[2] * shape[3], 0.2)
        pairs = [(DivisiveNorm2d(0.1), lambda t: divisive_norm_reference(t, 0.1, 3))]
        if k:
            pairs.append((TopFractionThreshold(0.2), lambda t: top_fraction_reference(t, k)))
        for fast, plain in pairs:
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            out_a, out_b = fast(xa), plain(xb)
            torch.testing.assert_close(out_a, out_b)
            (ga,), (gb,) = torch.autograd.grad(out_a, xa, grad), torch.autograd.grad(out_b, xb, grad)
            scale = gb.abs().max() + 1e-300
            torch.testing.assert_close(ga / scale, gb / scale)


def test_fused_layers_second_derivatives():
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: _DivisiveNorm.apply(t, 0.1, 3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: _TopFraction.apply(t, 16), (x,))


def test_threshold_signed_zeros_and_bf16():
    x = torch.tensor([0.0, -0.0, 1.0, 2.0, -0.0, 0.0, 3.0, 0.5, 0.25, 0.0]).reshape(1, 1, 2, 5)
    out = TopFractionThreshold(0.2)(x)
    assert torch.equal(out, top_fraction_reference(x, threshold_rank(10, 0.2)))
    y = torch.relu(torch.randn(2, 3, 8, 8)).bfloat16()
    assert torch.equal(TopFractionThreshold(0.2)(y), top_fraction_reference(y, 51))


def _scored(module, x, w, upstream):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    z, score = module(x, w, (1, 1), (1, 1), 0.1, 1.0)
    gx, gw = torch.autograd.grad((z * upstream).sum() - 0.7 * score, (x, w))
    return score, gx, gw


def _topk_scored(x, w, stride, padding, ratio, demote):
    saved = hah.FAST_WINNERS_MAX_K
    hah.FAST_WINNERS_MAX_K = 0  # force the topk path
    try:
        return hah._ScoredConv.apply(x, w, stride, padding, ratio, demote)
    finally:
        hah.FAST_WINNERS_MAX_K = saved


@pytest.mark.parametrize("layout", ["random", "above_tie", "boundary_tie", "few_positive"])
@pytest.mark.parametrize("channels", [3, 20, 64])
def test_threshold_score_path_matches_topk_path(layout, channels, chunking):
    """The channel top-K by repeated maxima (with ties settled or handed to topk) gives
    the same score and gradients as topk."""
    torch.manual_seed(1)
    w = torch.randn(channels, channels, 3, 3, dtype=torch.float64)
    x = torch.randn(2, channels, 5, 5, dtype=torch.float64)
    if layout != "random":  # identity convolution: z = x, with planted ties
        w = torch.zeros_like(w)
        w[range(channels), range(channels), 1, 1] = 1.0
        x = x * 0.1 - 1.0
        k = hah.winners(channels, 0.1)
        top = {"above_tie": [5.0] * k + [3.0], "boundary_tie": [5.0] * (k - 1) + [3.0, 3.0],
               "few_positive": [5.0] * max(1, k - 1)}[layout][:channels]
        x[0, :len(top), 2, 3] = torch.tensor(top, dtype=torch.float64)
    upstream = torch.randn(2, channels, 5, 5, dtype=torch.float64)
    fast = _scored(hah._ScoredConv.apply, x, w, upstream)
    slow = _scored(_topk_scored, x, w, upstream)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a.double(), b.double())


def test_bf16_ties_take_topks_choice(chunking):
    """bf16 activations tie often; at tied positions the fast path defers to topk."""
    torch.manual_seed(2)
    x = torch.randn(2, 16, 6, 6).bfloat16()
    w = torch.randn(24, 16, 3, 3).bfloat16()
    upstream = torch.randn(2, 24, 6, 6).bfloat16()
    fast = _scored(hah._ScoredConv.apply, x, w, upstream)
    slow = _scored(_topk_scored, x, w, upstream)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_tracing_sees_the_plain_formulas():
    import warnings

    from hahnet import vgg16

    model = vgg16(hah=True, width=0.0625).eval()
    x = torch.rand(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))
