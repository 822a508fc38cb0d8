"""A run survives a kill at any file operation of a checkpoint save (bit-identical to an
uninterrupted run after resuming), and damaged files are named, never used."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import hahnet
from hahnet.training import checkpoint
from hahnet.training.rundir import RunDir
from hahnet.training.trainer import Trainer

from conftest import committed_files, make_tiny_config, make_tiny_dataset

CPU = torch.device("cpu")


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, no cleanup handler catches it."""


def config(**overrides):
    return make_tiny_config(**{"epochs": 2, "snapshots": (1,), **overrides})


def data():
    return make_tiny_dataset(n_train=32, n_test=8)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("whole")
    trainer = Trainer(config(), data(), directory, CPU)
    trainer.fit()
    return weights(trainer.model), RunDir(directory).history()


def kill_at_operation(monkeypatch, k: int) -> list[int]:
    """Make the k-th os.replace / metrics append from now on raise Killed."""
    count = [0]
    real_replace, real_append = os.replace, RunDir.append_metrics

    def tick() -> None:
        count[0] += 1
        if count[0] == k:
            raise Killed

    def replace(src, dst):
        tick()
        return real_replace(src, dst)

    def append(self, metrics):
        tick()
        return real_append(self, metrics)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(RunDir, "append_metrics", append)
    return count


def operations_per_run(tmp_path, monkeypatch) -> int:
    count = kill_at_operation(monkeypatch, k=-1)
    Trainer(config(), data(), tmp_path / "count", CPU).fit()
    monkeypatch.undo()
    return count[0]


def test_kill_at_every_file_operation_then_resume_is_bit_identical(tmp_path, monkeypatch,
                                                                    uninterrupted):
    expected, expected_history = uninterrupted
    total = operations_per_run(tmp_path, monkeypatch)
    assert total == 2 * 11 + 2  # config, staged state+model (4), marker, 4 moves, metrics; snapshot
    for k in range(1, total + 1):
        directory = tmp_path / f"kill{k}"
        kill_at_operation(monkeypatch, k)
        with pytest.raises(Killed):
            Trainer(config(), data(), directory, CPU).fit()
        monkeypatch.undo()
        resumed = Trainer(config(), data(), directory, CPU)
        if RunDir(directory).has_checkpoint():
            resumed.resume()
        resumed.fit()
        got = weights(resumed.model)
        assert all(torch.equal(got[n], expected[n]) for n in expected), f"kill at operation {k}"
        history = RunDir(directory).history()
        assert [h["epoch"] for h in history] == [0, 1], f"kill at operation {k}"
        assert checkpoint.snapshot_path(directory, 1).exists()
        assert not (directory / ".saving").exists()


def test_torn_metrics_line_is_dropped_and_restored_on_resume(tmp_path):
    trainer = Trainer(config(), data(), tmp_path, CPU)
    trainer.fit()
    text = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(text[: len(text) - 40])  # killed mid-append
    resumed = Trainer(config(), data(), tmp_path, CPU)
    assert resumed.resume() == 2
    assert [h["epoch"] for h in RunDir(tmp_path).history()] == [0, 1]


@pytest.fixture
def saved_run(tmp_path):
    trainer = Trainer(config(), data(), tmp_path, CPU)
    trainer.fit()
    return tmp_path


def flip_byte_in_weights(file) -> None:
    data = bytearray(file.read_bytes())
    data[-10] ^= 0x01  # inside the last tensor, far from the JSON header
    file.write_bytes(bytes(data))


def test_checksums_are_recorded_and_a_flipped_weight_byte_is_caught(saved_run):
    info = json.loads((saved_run / "model.json").read_text())
    from hahnet.io import sha256_file

    assert info["sha256"] == sha256_file(saved_run / "model.safetensors")
    assert json.loads((saved_run / "train_state.json").read_text())["sha256"] == \
        sha256_file(saved_run / "train_state.safetensors")
    hahnet.load(saved_run)  # intact: loads
    flip_byte_in_weights(saved_run / "model.safetensors")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"model.safetensors is damaged: its SHA-256 differs from the one "
                             r"recorded in model.json"):
        hahnet.load(saved_run)
    snapshot = checkpoint.snapshot_path(saved_run, 1)
    hahnet.load(snapshot)
    flip_byte_in_weights(snapshot)
    with pytest.raises(checkpoint.CheckpointError, match=r"epoch1.safetensors is damaged"):
        hahnet.load(snapshot)


def test_every_committed_checkpoint_records_its_sha256():
    from hahnet.io import sha256_file

    files = committed_files("*.safetensors")
    assert len(files) >= 4  # docs/results: cpu/standard, cpu/hah, the study's seed-1 runs
    for file in files:
        recorded = json.loads(checkpoint.sidecar(file).read_text()).get("sha256")
        assert recorded == sha256_file(file), f"{file}: no or a wrong SHA-256 in its JSON"


def test_a_flipped_byte_in_any_committed_checkpoint_is_caught(tmp_path):
    for number, file in enumerate(committed_files("*.safetensors")):
        copy = tmp_path / str(number) / checkpoint.MODEL_FILE
        copy.parent.mkdir()
        shutil.copyfile(file, copy)
        shutil.copyfile(checkpoint.sidecar(file), checkpoint.sidecar(copy))
        flip_byte_in_weights(copy)
        with pytest.raises(checkpoint.CheckpointError, match=r"model.safetensors is damaged"):
            hahnet.load(copy.parent)


def test_a_checkpoint_without_checksum_loads_with_one_warning_line(saved_run, capsys):
    info = json.loads((saved_run / "model.json").read_text())
    del info["sha256"]
    (saved_run / "model.json").write_text(json.dumps(info))
    lone = saved_run / "lone" / "weights.safetensors"  # no JSON beside it at all
    lone.parent.mkdir()
    shutil.copyfile(saved_run / "model.safetensors", lone)
    capsys.readouterr()
    for path in (saved_run, lone):
        hahnet.load(path)
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "warning" in err[0] and "no recorded SHA-256" in err[0], err
        assert str(path if path == lone else path / "model.safetensors") in err[0]
        hahnet.load(path, verify=False)  # asked not to check: silent
        assert capsys.readouterr().err == ""
    checkpoint.seal(lone)  # trusted now: its checksum is recorded beside it, and checked
    hahnet.load(lone)
    assert capsys.readouterr().err == ""
    flip_byte_in_weights(lone)
    with pytest.raises(checkpoint.CheckpointError, match="weights.safetensors is damaged"):
        hahnet.load(lone)


def test_damaged_train_state_stops_a_resume_with_the_file_named(saved_run):
    flip_byte_in_weights(saved_run / "train_state.safetensors")
    trainer = Trainer(config(), data(), saved_run, CPU)
    with pytest.raises(checkpoint.CheckpointError, match=r"train_state.safetensors is damaged"):
        trainer.resume()


@pytest.mark.parametrize("name", ["model.json", "train_state.json", "train_config.json",
                                  "metrics.jsonl"])
def test_damaged_json_is_named_in_one_line(saved_run, name):
    path = saved_run / name
    path.write_text(path.read_text()[:25] + "\n{oops\n")
    trainer = Trainer(config(), data(), saved_run, CPU)
    with pytest.raises(ValueError) as caught:
        trainer.resume()
    message = str(caught.value)
    assert name in message and "\n" not in message


def test_damaged_header_json_is_named(saved_run):
    from safetensors.torch import load_file, save_file

    file = saved_run / "model.safetensors"
    save_file(load_file(str(file)), str(file), metadata={"hahnet": "{not json"})
    with pytest.raises(checkpoint.CheckpointError, match=r"model.safetensors is damaged: its "
                                                         r"hahnet header is not valid JSON"):
        checkpoint.read_info(saved_run)
