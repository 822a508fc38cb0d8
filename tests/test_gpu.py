"""The device-efficient path and time budgets, on the CPU (the same code runs on CUDA):
auto runtime options resolve by device, the HaH ops are one chunk on an accelerator, an
epoch's plan moves to the device once, --time-budget chooses and keeps epochs (train and
reproduce), bench takes a device, and benchmarks/gpu_paper.sh rehearses end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hahnet.training.rundir import RunDir

from hahnet.training import budget
from hahnet.data import jpeg_pack
from hahnet.experiments import reproduce as rp
from hahnet.experiments.bench import BenchConfig, time_interleaved
from hahnet.config import EvalSettings, TrainConfig
from hahnet.nn.fused import batch_chunks
from hahnet.training.trainer import Trainer, epoch_batches, epoch_plan, plan_batches
from conftest import make_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_options_resolve_by_device():
    auto = TrainConfig()
    assert (auto.precision, auto.channels_last) == ("auto", None)
    assert auto.for_device(torch.device("cuda")).precision == "bf16"
    assert auto.for_device("cuda:0").channels_last is True
    cpu = auto.for_device(torch.device("cpu"))
    assert (cpu.precision, cpu.channels_last) == ("fp32", False)
    explicit = TrainConfig(precision="fp32", channels_last=False).for_device("cuda")
    assert (explicit.precision, explicit.channels_last) == ("fp32", False)
    assert not TrainConfig().differences(TrainConfig(precision="bf16", time_budget=5.0))


def test_hah_ops_run_unchunked_on_an_accelerator():
    per_image = 64 * 32 * 32
    assert len(batch_chunks(128, per_image)) > 1            # CPU: cache-sized chunks
    assert len(batch_chunks(128, per_image, "cpu")) > 1
    assert batch_chunks(128, per_image, "cuda") == [(0, 128)]
    assert batch_chunks(128, per_image, torch.device("meta")) == [(0, 128)]


def test_epoch_plan_gives_the_same_batches_as_before():
    order, params = epoch_plan(100, 7, 3, True)
    fresh = list(plan_batches(order, params, 32))
    old = list(epoch_batches(100, 32, 7, 3, True))
    assert len(fresh) == len(old) == 3
    for (i, p), (j, q) in zip(fresh, old):
        assert torch.equal(i, j) and all(torch.equal(a, b) for a, b in zip(p, q))


def fake_throughput(ips: float = 48.0):
    def measure(config, dataset, device, steps=None, warmup_steps=3):
        return budget.Throughput(ips, len(dataset.train.labels), len(dataset.test.labels), 0.1)
    return measure


def test_train_time_budget_chooses_records_and_keeps_epochs(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "measure", fake_throughput())
    monkeypatch.setattr(budget, "process_age", lambda: 0.0)
    data = make_tiny_dataset(n_train=48)
    config = TrainConfig(width=0.0625, epochs=10, batch_size=16, time_budget=0.1)
    trainer = Trainer(config, data, tmp_path / "run", torch.device("cpu"))
    budget.plan_trainer(trainer)
    history = trainer.fit()
    # epoch = 48/48 s + 16/(48*3) s; (6 s - 3% reserved) / 1.11 s -> 5 epochs
    assert len(history) == 5 and trainer.config.epochs == 5
    assert history[-1].lr == pytest.approx(1e-5)  # milestones 0.6, 0.8 of the chosen 5
    from hahnet.training import checkpoint
    info = checkpoint.read_info(tmp_path / "run")
    assert info["time_budget"]["epochs"] == 5 and info["time_budget"]["minutes"] == 0.1
    assert info["time_budget"]["measured"]["standard"]["images_per_second"] == 48.0
    saved, _ = trainer.run_dir.read_config()
    assert saved.epochs == 5
    # resumed: keeps the choice, measures nothing
    monkeypatch.setattr(budget, "measure", lambda *a, **k: pytest.fail("measured again"))
    again = Trainer(saved, data, tmp_path / "run", torch.device("cpu"))
    assert again.resume() == 5 and budget.plan_trainer(again)["epochs"] == 5
    assert again.fit() == [] and again.config.epochs == 5


def test_reproduce_budget_covers_both_networks_and_evaluation(tmp_path, monkeypatch):
    from hahnet.eval import runner

    monkeypatch.setattr(budget, "measure", fake_throughput(24.0))
    monkeypatch.setattr(budget, "process_age", lambda: 10.0)
    monkeypatch.setattr(runner, "estimate_seconds",
                        lambda *a, **k: {"clean": 5.0, "attacks_Linf": 20.0, "total": 25.0})
    data = make_tiny_dataset(n_train=48)
    train = dict(arch="vgg16", width=0.0625, epochs=20, batch_size=16, time_budget=1.0)
    settings = EvalSettings(attack_limit=10)
    chosen, plan = rp.plan_time_budget(train, tmp_path, data, torch.device("cpu"), settings, None)
    # per epoch pair 2 x (2 + 16/72) s; 60 - 10 s elapsed - 2 x (5 + 10) s eval - 1.8 s
    assert plan["evaluation_seconds"] == {"standard": 15.0, "hah": 15.0}
    assert chosen["epochs"] == plan["epochs"] == 4 and "time_budget" not in chosen
    for where in (tmp_path, tmp_path / "standard", tmp_path / "hah"):
        assert RunDir(where).read_time_budget()["epochs"] == 4
    assert rp.plan_time_budget(train, tmp_path, data, "cpu", settings, None)[0]["epochs"] == 4
    from hahnet.experiments.presets import PAPER
    text = rp.preamble(PAPER, chosen, "hahnet x", "d", plan)
    assert "Time budget" in text and "4 epochs" in text
    with pytest.raises(budget.BudgetError, match="does not fit one epoch"):
        rp.plan_time_budget({**train, "time_budget": 0.5}, tmp_path / "b", data, "cpu",
                            settings, None)


def test_bench_takes_a_device():
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        BenchConfig(device="tpu")
    with pytest.raises(ValueError, match="clock must be wall on cuda"):  # checked first
        BenchConfig(device="cuda", clock="cpu")
    calls = []
    times = time_interleaved({"f": lambda: calls.append(1)}, repeats=2, warmup=1, device="cpu")
    assert len(times["f"]) == 2 and len(calls) == 3
    from hahnet.cli.commands import build_parser

    assert build_parser().parse_args(["bench", "--device", "cuda", "--quick"]).device == "cuda"


def make_cifar_like_folder(root: Path, per_class: int, test_per_class: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
               "ship", "truck"]
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):  # a class-dependent colour, so the nets can learn something
                pixels = rng.integers(0, 64, (32, 32, 3), dtype=np.uint8)
                pixels[..., c % 3] += np.uint8(25 * c)
                Image.fromarray(pixels).save(root / split / name / f"{i:04d}.jpg", quality=90)


SCRIPT = ["bash", str(ROOT / "benchmarks" / "gpu_paper.sh"), "--device", "cpu", "--tiny"]


def rehearsal_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a CPU rehearsal of gpu_paper.sh on a small pack made here."""
    pytest.importorskip("torchattacks")
    make_cifar_like_folder(tmp_path / "jpeg", per_class=30, test_per_class=10)
    jpeg_pack.pack(tmp_path / "jpeg", tmp_path / "pack.npz")
    return {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
            "PACK": str(tmp_path / "pack.npz"), "PYTHON": sys.executable,
            "TOTAL_SECONDS": "240", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.skipif(not Path("/usr/bin/env").exists(), reason="needs a POSIX shell")
def test_gpu_paper_script_rehearses_on_cpu(tmp_path):
    """benchmarks/gpu_paper.sh --device cpu --tiny, end to end, on a small pack."""
    env = rehearsal_env(tmp_path)
    done = subprocess.run(SCRIPT, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 8
    assert {"bench.json", "report.md", "results.json", "runs.tar.gz"} <= set(files)
    bench = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert set(bench["runs"][0]["steps"]) == {"hah", "plain", "reference", "standard"}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["time_budget"]["epochs"] == 1
    for model in results["models"]:  # the adaptive suite: a worst case per image per norm
        assert all(suite["adaptive"]["suite"] == "adaptive" and "worst" in suite["adaptive"]
                   for suite in model["attacks"].values())
    assert "Time budget" in (tmp_path / "out" / "report.md").read_text()
    with tarfile.open(tmp_path / "out" / "runs.tar.gz") as archive:
        names = archive.getnames()
    assert any(n.endswith("log.txt") for n in names)
    assert not any(n.endswith(".safetensors") for n in names)


def archived(archive: Path) -> list[str]:
    """The member names of a .tar.gz, [] while it does not exist yet."""
    if not archive.exists():
        return []
    with tarfile.open(archive) as opened:
        return opened.getnames()


@pytest.mark.skipif(not Path("/usr/bin/env").exists(), reason="needs a POSIX shell")
def test_gpu_paper_script_goes_on_without_its_bench_and_exports_while_running(tmp_path):
    """A failing bench (here: an unknown section) does not stop the paper run, and results
    reach OUT while it runs: killed, as at the device's time limit, once the standard
    network's evaluation exists, the script has already put it into OUT/runs.tar.gz."""
    import signal
    import time

    env = rehearsal_env(tmp_path, BENCH_SECTIONS="no-such-section", EXPORT_SECONDS="1")
    archive, wanted = tmp_path / "out" / "runs.tar.gz", "standard/eval/results.json"
    with open(tmp_path / "script.log", "w") as log:
        script = subprocess.Popen(SCRIPT, cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 280
        while script.poll() is None and time.monotonic() < deadline \
                and wanted not in archived(archive):
            time.sleep(0.2)
        still_running = script.poll() is None
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)  # the script and everything it started
        script.wait()
    output = (tmp_path / "script.log").read_text()
    assert still_running, "the script ended before the check: " + output[-3000:]
    assert wanted in archived(archive), output[-3000:]
    assert "bench failed" in output and not (tmp_path / "out" / "bench.json").exists()
    assert not (tmp_path / "out" / "report.md").exists()  # the experiment was not finished
