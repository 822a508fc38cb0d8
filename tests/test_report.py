"""Report files: written atomically, parseable, plots are valid PNGs, several models side
by side, the paper's reference table next to measured numbers."""

import json
import math
import struct

import pytest
import torch
from torch import nn

from hahnet import eval as evaluation
from hahnet.config import PAPER_EPS, PAPER_TABLE, parse_numbers
from hahnet.eval import attacks, metrics, results, runner
from hahnet.nn.hah import winners
from hahnet.reporting import evaluation as report
from hahnet.nn.layers import HaHBlock, VGGBlock

import matplotlib  # noqa: F401,E402  (installed by make test: missing is a failure)
import torchattacks  # noqa: F401,E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETTINGS = evaluation.EvalSettings(noise_sigmas=(0.05, 0.1), noise_draws=2, attack_limit=4, apgd_steps=2,
                           pgd_steps=2, pgd_restarts=1, square_limit=2, square_queries=5,
                           batch_size=8, attack_batch_size=4)


class Tiny(nn.Module):
    def __init__(self, hah: bool) -> None:
        super().__init__()
        first = HaHBlock(3, 8) if hah else VGGBlock(3, 8)
        self.features = nn.Sequential(first, nn.MaxPool2d(2), VGGBlock(8, 8))
        self.classifier = nn.Linear(8, 10)

    def forward(self, x):
        return self.classifier(self.features(x - 0.5).amax(dim=(2, 3)))


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (10, 3, 8, 8), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    y = torch.arange(10) % 10
    out = [runner.evaluate_model(Tiny(hah).eval(), x, y, SETTINGS, name=name, checkpoint=f"runs/{name}")
           for hah, name in ((False, "standard"), (True, "hah"))]
    torch.set_num_threads(threads)
    return out


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_report_files_are_complete_and_parseable(results, tmp_path):
    data = {"path": "data/x", "name": "toy", "limit": 10, "limit_seed": 7}
    paths = report.write_report(results, tmp_path / "out", data)
    assert set(paths) == set(report.FILES)
    doc = json.loads(paths["results.json"].read_text())
    assert doc["format"] == evaluation.results.FORMAT and doc["data"]["limit_seed"] == 7
    assert doc["checkpoints"] == ["runs/standard", "runs/hah"]
    assert {"torch", "torchattacks", "hahnet", "python"} <= set(doc["versions"])
    model = doc["models"][1]
    assert model["name"] == "hah" and model["settings"]["eps_linf"] == pytest.approx(2 / 255)
    assert model["attacks"]["Linf"]["apgd"]["params"]["n_restarts"] == 1
    assert model["clean_accuracy"] == results[1].clean_accuracy
    for name in ("noise.png", "sparsity.png", "snr.png", "filters.png"):
        width, height = png_size(paths[name])
        assert width > 100 and height > 100
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files


def test_markdown_has_both_models_and_paper_rows(results):
    md = report.render_markdown(results, {"path": "data/x", "name": "toy"})
    header = next(line for line in md.splitlines() if line.startswith("| Model | n | Clean"))
    assert "Noise sigma=0.1" in header and "APGD l_inf 2/255" in header and "APGD l_2 0.25" in header
    for needle in ("Standard (paper, VGG16)", "92.5%", "HaH (paper, VGG16)", "64.0%",
                   "| standard |", "| hah |", "## Attack comparison", "## Sparsity per layer",
                   "## SNR per layer", "| input |"):
        assert needle in md
    clean = f"{100 * results[1].clean_accuracy:.1f}%"
    assert f"| hah | 10 (4 attacked) | {clean} |" in md
    # One attack-comparison row per model and norm, two columns in the layer tables.
    assert md.count("| standard | Linf |") == 1 and md.count("| hah | L2 |") == 1
    assert "| layer | standard | hah |" in md


def test_paper_table_shows_only_comparable_numbers(results):
    table = report.paper_table(results)
    assert "| metric | Standard (paper) | HaH (paper) | standard | hah |" in table
    assert "| Clean | 92.5% | 87.3% |" in table and "| APGD l_2 0.25 | 13.9% | 27.6% |" in table
    assert PAPER_TABLE["HaH"] == {"clean": 87.3, "noise": 64.0, "linf": 21.5, "l2": 27.6}
    other = evaluation.EvalSettings(**{**SETTINGS.__dict__, "eps_linf": 8 / 255})
    assert other.eps("Linf") == pytest.approx(8 / 255)
    changed = results[0].__class__(**{**results[0].__dict__})
    changed.attacks = {"Linf": results[0].attacks["Linf"].__class__(
        **{**results[0].attacks["Linf"].__dict__, "eps": 8 / 255})}
    row = next(line for line in report.paper_table([changed]).splitlines()
               if line.startswith("| APGD l_inf"))
    assert row.endswith("| - |")


def test_format_eps_and_labels(results):
    assert report.format_eps(2 / 255) == "2/255" and report.format_eps(0.25) == "0.25"
    assert report.labels([results[0], results[0]]) == ["standard (1)", "standard (2)"]


def test_filter_grid_is_min_max_normalized_per_filter():
    w = torch.stack([torch.arange(27.0).reshape(3, 3, 3) * s for s in (1.0, -5.0, 0.0)])
    grid = report.filter_grid(w, pad=1)
    assert grid.shape == (2 * 4 + 1, 2 * 4 + 1, 3)
    first = grid[1:4, 1:4]
    second = grid[1:4, 5:8]
    assert first.min() == 0.0 and first.max() == 1.0
    assert second.min() == 0.0 and second.max() == 1.0 and second[0, 0, 0] == 1.0
    assert (grid[5:8, 1:4] == 0.5).all()  # a constant filter is shown as mid-gray
    gray = report.filter_grid(torch.randn(5, 8, 3, 3))
    assert gray.ndim == 2 and 0.0 <= gray.min() and gray.max() <= 1.0


def test_json_is_strict_even_with_nan(results, tmp_path):
    broken = results[0].__class__(**{**results[0].__dict__, "clean_accuracy": float("nan")})
    paths = report.write_report([broken], tmp_path)
    doc = json.loads(paths["results.json"].read_text())  # strict parse: no NaN tokens
    assert doc["models"][0]["clean_accuracy"] is None
    assert "NaN" not in paths["results.json"].read_text()
    assert math.isnan(broken.clean_accuracy)


def test_report_without_attacks_or_layers(tmp_path):
    x = torch.rand(4, 3, 8, 8)
    settings = evaluation.EvalSettings(noise_sigmas=(), attacks=False, layer_stats=False, batch_size=4)
    r = runner.evaluate_model(Tiny(False).eval(), x, torch.arange(4), settings, name="bare")
    paths = report.write_report([r], tmp_path)
    assert set(paths) == {"results.json", "report.md", "noise.png", "filters.png"}
    md = paths["report.md"].read_text()
    assert "| bare | 4 |" in md and "## Attack comparison" not in md
    with pytest.raises(ValueError):
        report.write_report([], tmp_path)


def test_cli_eval_end_to_end(tmp_path, capsys):
    from hahnet.training import checkpoint
    from hahnet.cli import commands as cli
    from hahnet import vgg11

    from conftest import make_cifar

    data = make_cifar(tmp_path / "data", n_train=20, n_test=12)
    torch.manual_seed(0)
    for name, hah in (("std", False), ("hah", True)):
        checkpoint.save_model(tmp_path / name, vgg11(hah=hah, hah_layers=2, width=0.0625,
                                                     num_classes=4).eval(),
                              {"epoch": 0, "dataset": {"classes": ["a", "b", "c", "d"]}})
    out = tmp_path / "report"
    rc = cli.main(["eval", str(tmp_path / "std"), str(tmp_path / "hah" / "model.safetensors"),
                   "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--limit", "8", "--noise", "0.05,0.1", "--noise-draws", "1",
                   "--eps-linf", "4/255", "--attack-limit", "3", "--apgd-steps", "2",
                   "--pgd-steps", "2", "--pgd-restarts", "1", "--square-limit", "2",
                   "--square-queries", "3", "--threads", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "ETA" in captured.err and "| metric | Standard (paper) | HaH (paper) | std | hah |" in captured.out
    doc = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in doc["models"]] == ["std", "hah"]
    assert doc["models"][0]["settings"]["eps_linf"] == pytest.approx(4 / 255)
    assert doc["data"]["limit"] == 8 and doc["models"][0]["n_images"] == 8
    assert "APGD l_inf 4/255" in (out / "report.md").read_text()

    rc = cli.main(["eval", str(tmp_path / "missing"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no checkpoint" in err[0]
