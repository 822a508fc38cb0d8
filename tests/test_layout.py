"""What the package's layout keeps stable for its users: the public API, ``from hahnet
import jpeg_pack``, the ``hahnet`` entry points, and the checkpoints and results.json
files recorded under docs/results."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import hahnet
from hahnet.eval.results import read_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PUBLIC = {"vgg11", "vgg13", "vgg16", "vgg19", "create_model", "list_models", "build_model",
          "load", "HaHObjective", "hah_score", "PAPER_ALPHAS", "ModelConfig", "TrainConfig",
          "DivisiveNorm2d", "HaHBlock", "TopFractionThreshold", "VGGBlock", "WNConv2d"}


def test_public_api_is_at_the_top():
    assert PUBLIC <= set(hahnet.__all__)
    assert all(callable(getattr(hahnet, name)) for name in PUBLIC - {"PAPER_ALPHAS"})
    assert len(hahnet.PAPER_ALPHAS) == 6


def test_version_is_pyprojects_and_recorded_in_results():
    from hahnet.eval.results import versions

    text = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{hahnet.__version__}"' in text
    assert versions()["hahnet"] == hahnet.__version__


def test_jpeg_pack_from_the_top_package(tmp_path):
    from hahnet import jpeg_pack  # as the data-carrying instructions write it

    (tmp_path / "src" / "train" / "cat").mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "src" / "train" / "cat" / "0.jpg")
    jpeg_pack.pack(tmp_path / "src", tmp_path / "data.npz")
    assert jpeg_pack.unpack(tmp_path / "data.npz", tmp_path / "dst") == 1
    assert (tmp_path / "dst" / "train" / "cat" / "0.jpg").read_bytes() == \
        (tmp_path / "src" / "train" / "cat" / "0.jpg").read_bytes()


def test_console_script_entry_points(capsys):
    """pyproject's entry point is the process entry (``hahnet.cli:entry``, which runs
    ``main`` on the process's arguments); ``hahnet.cli:main``, which scripts installed
    before the layout import, is the command itself."""
    text = (ROOT / "pyproject.toml").read_text()
    spec = next(line.split("=", 1)[1].strip().strip('"') for line in text.splitlines()
                if line.startswith("hahnet = "))
    module, _, name = spec.partition(":")
    cli = importlib.import_module("hahnet.cli")
    assert getattr(importlib.import_module(module), name) is cli.entry
    assert cli.main is importlib.import_module("hahnet.cli.commands").main
    assert cli.main(["presets", "demo"]) == 0
    assert capsys.readouterr().out.startswith("demo:")


def test_python_dash_m_hahnet():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "hahnet", "presets", "demo"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("demo:")


def test_recorded_checkpoints_and_results_still_load():
    """Nothing recorded names a module path: checkpoints (safetensors header + model.json)
    and results.json files written before the layout load as they are."""
    checkpoints = sorted(RESULTS.rglob("model.safetensors"))
    assert len(checkpoints) >= 4
    for file in checkpoints:
        model = hahnet.load(file.parent)
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    evaluations = [p for p in sorted(RESULTS.rglob("results.json"))
                   if '"hahnet-eval-1"' in p.read_text()]
    assert len(evaluations) >= 5
    for path in evaluations:
        results, _ = read_results(path)
        assert results and all(0 <= r.clean_accuracy <= 1 for r in results)
