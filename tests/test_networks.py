"""The model registry beyond VGG: residual networks (ResNet-18, PreAct-ResNet-18,
WideResNets) standard and with a HaH front-end; parameter counts against the published
CIFAR forms; train, save, load and exact resume for each family; the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import hahnet
from hahnet.training import checkpoint
from hahnet.cli import commands as cli
from hahnet.config import PAPER_ALPHAS, ModelConfig, TrainConfig
from hahnet.data.datasets import Dataset, ImageDataset
from hahnet.nn.hah import hah_convs
from hahnet.nn.models import BasicBlock, HaHResidualBlock, PreActBlock
from hahnet.training.trainer import Trainer

from conftest import crash_at
from conftest import make_cifar as write_cifar
from conftest import make_tiny_config as tiny_config
from conftest import make_tiny_dataset as tiny_dataset

RESULTS = Path(__file__).parents[1] / "docs" / "results" / "cpu"
NEW = ("resnet18", "preact_resnet18", "wrn_16_4")


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Standard counts of the CIFAR forms (bias-free convs, BatchNorm, Linear with bias): the
# published ResNet-18 (11,173,962), PreAct-ResNet-18 with its final BN (11,172,170),
# WRN-16-4 (2,748,890) and WRN-28-10 (36,479,194). A HaH front-end drops the BatchNorms
# (2 x channels each) of the stem and the first stage: resnet18 5 x 64, preact 4 x 64
# (its stem has none); a WRN's first block has one BN on the stem's 16 channels and one on
# its own width, every other block two on its width: wrn_16_4 16 + 3 x 64, wrn_28_10
# 16 + 7 x 160.
COUNTS = {"resnet18": (11_173_962, 2 * 5 * 64), "preact_resnet18": (11_172_170, 2 * 4 * 64),
          "wrn_16_4": (2_748_890, 2 * (16 + 3 * 64)),
          "wrn_28_10": (36_479_194, 2 * (16 + 7 * 160))}


def test_registry_lists_every_network():
    assert hahnet.list_models() == ["vgg11", "vgg13", "vgg16", "vgg19", "resnet18",
                                    "preact_resnet18", "wrn_16_4", "wrn_28_10"]
    with pytest.raises(ValueError, match="unknown model 'resnet50'; choose one of vgg11"):
        hahnet.create_model("resnet50")
    with pytest.raises(ValueError, match="unknown option"):
        hahnet.create_model("resnet18", depth=34)


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_counts_match_the_published_cifar_forms(name):
    standard, batchnorm = COUNTS[name]
    assert count(hahnet.create_model(name)) == standard
    assert count(hahnet.create_model(name, hah=True)) == standard - batchnorm


@pytest.mark.parametrize("name,hah_layers,blocks", [("resnet18", 5, 2), ("preact_resnet18", 5, 2),
                                                    ("wrn_16_4", 5, 2), ("wrn_28_10", 9, 4)])
def test_hah_front_end_is_the_stem_and_the_first_stage(name, hah_layers, blocks):
    model = hahnet.create_model(name, hah=True, width=0.0625)
    assert model.config.hah_layers == hah_layers == len(hah_convs(model))
    assert isinstance(model.stem, hahnet.HaHBlock)
    first, rest = model.stages[0], list(model.stages[1:])
    assert [type(b) for b in first] == [HaHResidualBlock] * blocks
    standard = PreActBlock if name != "resnet18" else BasicBlock
    assert all(type(b) is standard for stage in rest for b in stage)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in first.modules()) == 0
    assert all(not isinstance(m, hahnet.WNConv2d) for stage in rest for m in stage.modules())


@pytest.mark.parametrize("make", [
    lambda: HaHResidualBlock(4, 4, sigma=0.1, keep=0.2), lambda: HaHResidualBlock(4, 6, 0.1, 0.2),
    lambda: BasicBlock(4, 4), lambda: PreActBlock(4, 4), lambda: PreActBlock(4, 6)])
def test_blocks_add_their_branch_to_the_skip(make):
    """With the branch's last convolution zeroed a block passes its skip path on (the
    identity, or the 1x1 projection of what the block's first convolution sees)."""
    torch.manual_seed(1)
    block = make().eval()
    x = torch.rand(2, 4, 8, 8)
    last = block.hah2.conv if isinstance(block, HaHResidualBlock) else block.conv2
    with torch.no_grad():
        before = block(x)
        last.weight.zero_()
        after = block(x)
    if isinstance(block, PreActBlock) and block.shortcut is not None:
        skip = block.shortcut(block.relu1(block.bn1(x)))
    elif isinstance(block, PreActBlock):
        skip = x
    else:
        skip = block.shortcut(x)
    torch.testing.assert_close(after, skip if not isinstance(block, BasicBlock) else torch.relu(skip))
    assert not torch.allclose(before, after)


def test_hah_layers_stop_at_whole_blocks():
    model = hahnet.create_model("resnet18", hah=True, width=0.0625, hah_layers=3)
    assert [type(b) for b in model.stages[0]] == [HaHResidualBlock, BasicBlock]
    assert len(hah_convs(model)) == 3
    stem_only = hahnet.create_model("wrn_16_4", hah=True, width=0.0625, hah_layers=1)
    assert len(hah_convs(stem_only)) == 1 and isinstance(stem_only.stages[0][0], PreActBlock)
    with pytest.raises(ValueError, match=r"one of \[0, 1, 3, 5\] for resnet18"):
        hahnet.create_model("resnet18", hah=True, hah_layers=2)
    with pytest.raises(ValueError, match=r"one of \[0, 1, 3, 5, 7, 9\] for wrn_28_10"):
        hahnet.create_model("wrn_28_10", hah=True, hah_layers=11)


@pytest.mark.parametrize("name", NEW)
def test_forward_shapes_channels_and_classes(name):
    torch.manual_seed(0)
    model = hahnet.create_model(name + "_hah", width=0.0625, num_classes=7, in_channels=1)
    assert model.config.hah and model(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    assert model(torch.rand(1, 1, 20, 28)).shape == (1, 7)  # any size: global pooling
    with pytest.raises(ValueError, match=r"shape \(N, 1, H, W\)"):
        model(torch.rand(1, 3, 32, 32))


def test_defaults_per_network_and_old_records_still_resume():
    assert TrainConfig().hah_layers == 6 and TrainConfig().alphas == PAPER_ALPHAS
    resnet = TrainConfig(arch="resnet18")
    assert resnet.hah_layers == 5 and resnet.alphas == PAPER_ALPHAS[:5]
    wide = TrainConfig(arch="wrn_28_10")
    assert wide.alphas == PAPER_ALPHAS + (PAPER_ALPHAS[-1],) * 3
    assert ModelConfig(arch="wrn_28_10").hah_layers == 9 and ModelConfig().hah_layers == 6
    for run in ("standard", "hah"):  # the committed runs: same settings when given again
        saved = TrainConfig.from_dict(json.loads((RESULTS / run / "train_config.json").read_text()))
        given = {k: v for k, v in saved.to_dict().items() if k not in ("hah_layers", "alphas")}
        assert saved.differences(TrainConfig.from_dict(given)) == {}


@pytest.mark.parametrize("run", ["standard", "hah"])
def test_committed_vgg_checkpoints_still_load(run):
    model = hahnet.load(RESULTS / run)
    info = checkpoint.read_info(RESULTS / run)
    assert type(model).__name__ == "VGG" and model.config.arch == "vgg16"
    assert model.config == ModelConfig.from_dict(info["model"]) and not model.training
    assert len(hah_convs(model)) == (6 if run == "hah" else 0)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def small_images(dataset: Dataset) -> Dataset:
    """The data set at 16x16 (every other pixel): residual networks pool globally, so any
    size works, and a quarter of the pixels keeps these runs short."""
    def half(split: ImageDataset) -> ImageDataset:
        return ImageDataset(split.images[:, :, ::2, ::2].contiguous(), split.labels, split.classes)

    return Dataset(dataset.name, dataset.layout, half(dataset.train), half(dataset.test),
                   dataset.source)


@pytest.mark.parametrize("name", NEW)
def test_train_save_load_and_exact_resume(tmp_path, name):
    """Each family: a run killed in its second epoch and resumed ends bit-identical to an
    uninterrupted one; the checkpoint names the network and loads back with hahnet.load."""
    dataset = small_images(tiny_dataset(n_train=32, n_test=8))
    config = tiny_config(arch=name, epochs=2, eval_batch_size=8)
    straight = Trainer(config, dataset, tmp_path / "straight", torch.device("cpu"))
    straight.fit()
    crashed = Trainer(config, dataset, tmp_path / "crashed", torch.device("cpu"))
    crash_at(crashed, crashed.steps_per_epoch() + 1)  # the first step of epoch 2
    resumed = Trainer(config, dataset, tmp_path / "crashed", torch.device("cpu"))
    assert resumed.resume() == 1
    resumed.fit()
    want, got = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed run differs"
    info = checkpoint.read_info(tmp_path / "crashed")
    assert info["model"]["arch"] == name and info["model"]["hah"] is True
    loaded = hahnet.load(tmp_path / "crashed")
    assert type(loaded) is type(straight.model) and loaded.config == straight.model.config
    x = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(loaded(x), straight.model.eval()(x), rtol=0, atol=0)
    history = [json.loads(line) for line in (tmp_path / "crashed" / "metrics.jsonl").open()]
    assert len(history[-1]["hah_scores"]) == 5


def test_cli_trains_and_evaluates_a_residual_network(tmp_path, capsys):
    data = write_cifar(tmp_path / "cifar", n_train=20, n_test=4)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--model", "wrn_16_4", "--hah", "--width",
                     "0.0625", "--epochs", "1", "--batch-size", "8", "--threads", "1",
                     "--out", str(run)]) == 0
    assert checkpoint.read_info(run)["model"]["arch"] == "wrn_16_4"
    out = tmp_path / "report"
    assert cli.main(["eval", str(run), "--data", str(data), "--no-attacks", "--noise-draws",
                     "1", "--threads", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())["models"][0]
    kinds = [layer["kind"] for layer in saved["sparsity"]]
    assert kinds[:5] == ["hah"] * 5 and set(kinds[5:]) == {"relu"}
    assert saved["model"]["arch"] == "wrn_16_4"
    capsys.readouterr()


@pytest.mark.parametrize("argv, words", [
    (["train", "--model", "resnet18", "--hah-layers", "2"], "--hah-layers"),
    (["reproduce", "--model", "wrn_28_10", "--hah-layers", "4"], "--hah-layers"),
    (["train", "--model", "resnet50"], "--model"),
    (["bench", "--model", "resnet50"], "--model"),
])
def test_bad_model_settings_are_one_line_errors(argv, words, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_bench_and_sweep_take_any_network(tmp_path):
    from hahnet.experiments import bench, sweep

    config = bench.BenchConfig.quick(model="wrn_16_4", batch_size=2, sections=("steps",),
                                     repeats=1, warmup=0)
    run = bench.run_benchmark(config)["runs"][0]
    assert run["model"] == "wrn_16_4" and set(run["steps"]) == set(bench.STEPS)
    spec = sweep.loads('name = "r"\n[train]\narch = "preact_resnet18"\nwidth = 0.0625\n'
                       '[grid]\nhah = [false, true]\n')
    assert [r.config.arch for r in spec.runs] == ["preact_resnet18"] * 2
    assert spec.runs[1].config.hah_layers == 5
