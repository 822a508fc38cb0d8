"""`hahnet eval --corruptions`: name/severity parsing, the on-disk cache (generated once,
then reused), CE / mCE on a hand-computed example, results.json read back exactly, the
CLI end to end on a tiny checkpoint, and torchrun sharding equal to one process."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hahnet.training import checkpoint
from hahnet.cli import commands as cli
from hahnet.eval import corruptions as C
from hahnet import vgg11
from hahnet.eval.corruptions import evaluate as ec
from hahnet.eval.base import EvalError
from hahnet.eval.results import CorruptionResult, read_results, result_from_dict

TWO = ("gaussian_noise", "contrast")  # cheap ones


def test_parse_names_and_severities():
    assert ec.parse_names("all") == C.BENCHMARK
    assert ec.parse_names("all,extra") == C.NAMES
    assert ec.parse_names("blur, fog,noise") == C.FAMILIES["noise"] + C.FAMILIES["blur"] + ("fog",)
    assert ec.parse_names("extra") == C.EXTRA
    assert ec.parse_severities("1-5") == (1, 2, 3, 4, 5)
    assert ec.parse_severities("5,1-2") == (1, 2, 5)
    for bad in ("nope", ""):
        with pytest.raises(EvalError):
            ec.parse_names(bad)
    for bad in ("0-2", "3-1", "x", "6"):
        with pytest.raises(EvalError):
            ec.parse_severities(bad)


def test_cache_generates_once_and_equals_corrupt_dataset(tmp_path, random_uint8):
    images = random_uint8(6, 32)
    cache = ec.CorruptionCache(images, tmp_path, seed=3, batch_size=4)
    assert cache.ensure(TWO, (1, 2)) == 4 and cache.generated == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.folder.iterdir()}
    again = ec.CorruptionCache(images, tmp_path, seed=3, batch_size=4)
    assert again.folder == cache.folder and again.ensure(TWO, (1, 2)) == 0
    assert again.generated == 0 and {p.name: p.stat().st_mtime_ns
                                     for p in cache.folder.iterdir()} == stamps
    for name, sev, expected in C.corrupt_dataset(images, TWO, (1, 2), seed=3, batch_size=4):
        assert torch.equal(again.load(name, sev), expected)
    # other images, seed or limit: another folder
    assert ec.CorruptionCache(images[:5], tmp_path, 3, 4).folder != cache.folder
    assert ec.CorruptionCache(images, tmp_path, 4, 4).folder != cache.folder
    # a damaged file is regenerated, not trusted
    cache.path("contrast", 2).write_bytes(b"junk")
    expected = next(iter(C.corrupt_dataset(images, ["contrast"], [2], 3, 4)))[2]
    assert torch.equal(again.load("contrast", 2), expected)


def _result(clean: float, accuracy: dict[str, list[float]]) -> CorruptionResult:
    return CorruptionResult(list(accuracy), [1, 2], 0, 100, clean, accuracy)


def test_mce_on_a_hand_computed_example():
    base = _result(0.9, {"gaussian_noise": [0.7, 0.5], "fog": [0.8, 0.6], "saturate": [0.9, 0.8]})
    model = _result(0.8, {"gaussian_noise": [0.75, 0.65], "fog": [0.7, 0.5], "saturate": [0.8, 0.8]})
    ec.compare([base, model], "base")
    # CE: noise (0.25 + 0.35) / (0.3 + 0.5) = 0.75; fog (0.3 + 0.5) / (0.2 + 0.4) = 4/3
    assert model.ce["gaussian_noise"] == pytest.approx(0.75)
    assert model.ce["fog"] == pytest.approx(4 / 3)
    # relative: noise (0.05 + 0.15) / (0.2 + 0.4) = 1/3; fog (0.1 + 0.3) / (0.1 + 0.3) = 1
    assert model.relative_ce["gaussian_noise"] == pytest.approx(1 / 3)
    assert model.relative_ce["fog"] == pytest.approx(1.0)
    # means over the benchmark corruptions only (saturate is an extra one)
    assert model.mce == pytest.approx((0.75 + 4 / 3) / 2)
    assert model.relative_mce == pytest.approx((1 / 3 + 1) / 2)
    assert base.mce == base.relative_mce == 1.0 and model.baseline == "base"
    # baseline saturate: (0 + 0.1) relative denominator -> fine; a non-positive one -> None
    flat = _result(0.9, {"fog": [0.95, 0.9]})
    other = _result(0.8, {"fog": [0.7, 0.7]})
    ec.compare([flat, other], "flat")
    assert other.relative_ce["fog"] is None and other.relative_mce is None
    assert other.ce["fog"] == pytest.approx(0.6 / 0.15)
    assert ec.mean_accuracy(model) == pytest.approx((0.75 + 0.65 + 0.7 + 0.5) / 4)
    assert ec.family_accuracy(model) == {"noise": [0.75, 0.65], "weather": [0.7, 0.5],
                                          "extra": [0.8, 0.8]}


def _checkpoints(tmp_path, classes: int = 4):
    torch.manual_seed(0)
    paths = []
    for name, hah in (("std", False), ("hah", True)):
        model = vgg11(hah=hah, hah_layers=2, width=0.0625, num_classes=classes).eval()
        checkpoint.save_model(tmp_path / name, model,
                              {"epoch": 0, "dataset": {"classes": list("abcd"[:classes])}})
        paths.append(str(tmp_path / name))
    return paths


def test_cli_end_to_end_caches_and_reads_back(tmp_path, monkeypatch, capsys, write_cifar):
    paths = _checkpoints(tmp_path)
    data = write_cifar(tmp_path / "data", n_train=20, n_test=10)
    generated = []
    ensure = ec.CorruptionCache.ensure

    def counting(self, *a, **k):
        generated.append(n := ensure(self, *a, **k))
        return n

    monkeypatch.setattr(ec.CorruptionCache, "ensure", counting)
    base = ["eval", *paths, "--data", str(data), "--limit", "8", "--no-attacks", "--noise", "0.1", "--noise-draws",
            "1", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4",
            "--corruptions", "gaussian_noise,contrast", "--severities", "1,3"]
    assert cli.main(base + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "corruptions" in err
    assert generated == [4, 0]  # the second checkpoint reuses the first's copies
    folder, = (tmp_path / "cache" / "corruptions").iterdir()
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert cli.main(base + ["--out", str(tmp_path / "b")]) == 0
    assert generated == [4, 0, 0, 0]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    capsys.readouterr()
    assert cli.main(["eval", paths[0], "--corruptions", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown corruption 'bogus'" in err[0]
    out = tmp_path / "a"
    for png in ("corruptions.png", "corruption_examples.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Common corruptions" in md and "| gaussian_noise | noise |" in md
    assert "Sparsity under corruption" in md and "![corruptions](corruptions.png)" in md
    results, _ = read_results(out / "results.json")
    std, hah = results
    assert std.corruptions.names == ["gaussian_noise", "contrast"]
    assert std.corruptions.severities == [1, 3] and std.corruptions.n_images == 8
    assert std.corruptions.mce == 1.0 and hah.corruptions.baseline == "std"
    assert set(hah.corruptions.sparsity) == {"clean", "noise", "digital"}
    assert hah.corruptions.clean_accuracy == hah.clean_accuracy
    # exactly what was written: dataclasses rebuilt, then the same JSON again
    doc = json.loads((out / "results.json").read_text())
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    for a, b in zip(doc["models"], again["models"]):
        assert a["corruptions"]["accuracy"] == b["corruptions"]["accuracy"]
    from hahnet.eval.results import jsonable
    assert [jsonable(r) for r in results] == doc["models"]


def test_old_results_without_corruptions_read_back():
    doc = {"name": "m", "n_images": 3, "clean_accuracy": 0.5}
    r = result_from_dict(doc)
    assert r.corruptions is None
    c = _result(0.9, {"fog": [0.5, 0.25]})
    c.sparsity_severity = None
    assert result_from_dict({**doc, "corruptions": json.loads(json.dumps(
        __import__("dataclasses").asdict(c)))}).corruptions == c
    assert replace(c, mce=0.5) != c


def test_torchrun_sharding_equals_one_process(tmp_path, write_cifar, torchrun):
    data = write_cifar(tmp_path / "cifar-10-batches-py")
    _, path = _checkpoints(tmp_path, classes=4)
    args = ["eval", path, "--data", str(data), "--no-attacks", "--noise", "0.1",
            "--noise-draws", "1", "--batch-size", "4", "--threads", "1",
            "--cache-dir", str(tmp_path / "cache"), "--corruptions", "gaussian_noise,fog",
            "--severities", "2-3"]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    two = torchrun(tmp_path, args + ["--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    (a,), (b,) = (json.loads((tmp_path / d / "results.json").read_text())["models"]
                  for d in ("one", "two"))
    a, b = a["corruptions"], b["corruptions"]
    a.pop("seconds"), b.pop("seconds")
    assert a["n_images"] == 16 and a == b
