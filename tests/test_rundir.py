"""The run directory's one owner: train_config.json in every form, and a run resumed
through ``hahnet train --resume`` twice, each time killed before its next save, ends
bit-identical to an uninterrupted run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hahnet.cli import commands as cli
from hahnet.training import trainer as train
from hahnet.training.rundir import RunDir

ARGS = ["--hah", "--width", "0.0625", "--batch-size", "16", "--seed", "7", "--epochs", "3"]


class Killed(Exception):
    pass


def kill_after(monkeypatch, steps: int) -> None:
    """Make training die (as a killed process would) after ``steps`` more steps."""
    original, count = train.Trainer.train_step, [0]

    def step(self, *args, **kwargs):
        count[0] += 1
        if count[0] > steps:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train.Trainer, "train_step", step)


def test_resumed_twice_killed_before_the_next_save_equals_one_run(tmp_path, write_cifar,
                                                                 monkeypatch):
    data = str(write_cifar(tmp_path / "cifar"))  # 50 images: 3 steps per epoch
    common = ["train", "--data", data, *ARGS]
    assert cli.main([*common, "--out", str(tmp_path / "straight")]) == 0
    run = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        kill_after(patch, 4)  # in epoch 2: epoch 1 is saved
        with pytest.raises(Killed):
            cli.main([*common, "--out", run])
    with monkeypatch.context() as patch:
        kill_after(patch, 1)  # resumed, killed again before its next save
        with pytest.raises(Killed):
            cli.main(["train", "--resume", run])
    assert cli.main(["train", "--resume", run]) == 0
    want = load_file(str(tmp_path / "straight" / "model.safetensors"))
    got = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["data"] == data and saved["epochs"] == 3 and "config" not in saved


@pytest.mark.parametrize("form", ["flat", "nested", "current"])
def test_every_train_config_form_reads_back(tmp_path, tiny_config, form):
    config = tiny_config()
    flat = config.to_dict()
    document = {"flat": flat, "nested": {"config": flat, "data": "d"},
                "current": {**flat, "data": "d"}}[form]
    (tmp_path / "train_config.json").write_text(json.dumps(document))
    saved, data = RunDir(tmp_path).read_config()
    assert saved == config and data == (None if form == "flat" else "d")
    assert RunDir(tmp_path).mismatch(config) is None
    assert "lr" in RunDir(tmp_path).mismatch(tiny_config(lr=0.5))
