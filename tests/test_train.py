"""Training loop, schedule, checkpoints and exact resume, on tiny models and data."""

import json
import math

import pytest
import torch

import hahnet
from hahnet.training import checkpoint
from hahnet import io as hio
from hahnet.training.trainer import (TrainConfig, Trainer, epoch_batches, learning_rate)

from conftest import CLASSES, crash_at
from conftest import make_tiny_config as tiny_config
from conftest import make_tiny_dataset as tiny_dataset


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_learning_rate_schedule_is_the_papers():
    config = TrainConfig(epochs=100)
    assert learning_rate(config, 0) == 1e-3 and learning_rate(config, 59) == 1e-3
    assert learning_rate(config, 60) == pytest.approx(1e-4)
    assert learning_rate(config, 80) == pytest.approx(1e-5)


def test_epoch_batches_deterministic_full_and_distinct():
    a = list(epoch_batches(50, 16, seed=1, epoch=3, augment=True))
    b = list(epoch_batches(50, 16, seed=1, epoch=3, augment=True))
    c = list(epoch_batches(50, 16, seed=1, epoch=4, augment=True))
    assert len(a) == 3 and all(len(idx) == 16 for idx, _ in a)  # last partial batch dropped
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    seen = torch.cat([idx for idx, _ in a])
    assert len(set(seen.tolist())) == 48


@pytest.mark.parametrize("hah", [True, False])
def test_training_runs_writes_metrics_and_loadable_checkpoint(tmp_path, hah):
    trainer = Trainer(tiny_config(hah=hah, epochs=2), tiny_dataset(), tmp_path, torch.device("cpu"))
    history = trainer.fit()
    assert [m.epoch for m in history] == [0, 1]
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1]
    assert len(lines[0]["hah_scores"]) == (6 if hah else 0)
    assert all(l["images_per_second"] > 0 for l in lines)
    from hahnet.training.trainer import accuracy  # the logged accuracy is the final model's, recomputed
    assert lines[-1]["eval_acc"] == accuracy(trainer.model, trainer.eval_split, torch.device("cpu"))
    model = hahnet.training.checkpoint.load(tmp_path)
    assert not model.training and model.config == trainer.model.config
    x = torch.rand(2, 3, 32, 32)
    trainer.model.eval()
    torch.testing.assert_close(model(x), trainer.model(x))
    info = checkpoint.read_info(tmp_path)
    assert info["epoch"] == 1 and info["dataset"]["classes"] == list(CLASSES)


def test_killed_mid_epoch_and_resumed_is_bit_identical(tmp_path):
    dataset = tiny_dataset()
    config = tiny_config()
    straight = Trainer(config, dataset, tmp_path / "straight", torch.device("cpu"))
    straight.fit()

    crashed = Trainer(config, dataset, tmp_path / "crashed", torch.device("cpu"))
    crash_at(crashed, 2 * crashed.steps_per_epoch() + 2)  # two steps into epoch 3
    assert checkpoint.read_info(tmp_path / "crashed")["epoch"] == 1

    resumed = Trainer(config, dataset, tmp_path / "crashed", torch.device("cpu"))
    assert resumed.resume() == 2
    resumed.fit()
    want, got = weights(straight.model), weights(resumed.model)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed run differs"
    lines = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2]


def test_resume_with_other_settings_is_refused(tmp_path):
    dataset = tiny_dataset()
    Trainer(tiny_config(epochs=1), dataset, tmp_path, torch.device("cpu")).fit()
    other = Trainer(tiny_config(epochs=1, lr=5e-4), dataset, tmp_path, torch.device("cpu"))
    with pytest.raises(checkpoint.CheckpointError, match="other settings.*'lr'"):
        other.resume()


def test_loading_into_another_architecture_is_refused(tmp_path):
    Trainer(tiny_config(epochs=1), tiny_dataset(), tmp_path, torch.device("cpu")).fit()
    with pytest.raises(checkpoint.CheckpointError, match="another model.*width"):
        checkpoint.load_weights(hahnet.vgg16(hah=True, width=0.125), tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
        checkpoint.load_weights(torch.nn.Linear(2, 2), tmp_path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    Trainer(tiny_config(epochs=1), tiny_dataset(), tmp_path, torch.device("cpu")).fit()
    file = tmp_path / checkpoint.MODEL_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        hahnet.training.checkpoint.load(tmp_path)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="not a hahnet checkpoint"):
        hahnet.training.checkpoint.load(tmp_path / "other.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        hahnet.training.checkpoint.load(tmp_path / "missing")


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "x.json"
    hio.write_json(target, {"v": 1})

    def broken(tmp):
        tmp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        hio.atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_config_errors_are_one_line():
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="must divide evenly over 3 processes"):
        Trainer(tiny_config(batch_size=16), tiny_dataset(), "unused", torch.device("cpu"),
                rank=0, world_size=3)
    with pytest.raises(ValueError, match="only 8 training images"):
        Trainer(tiny_config(limit_train=8), tiny_dataset(), "unused", torch.device("cpu"))


def test_snapshots_keep_the_weights_of_the_named_epochs(tmp_path):
    trainer = Trainer(tiny_config(epochs=3, snapshots=(1, 3)), tiny_dataset(), tmp_path,
                      torch.device("cpu"))
    trainer.fit()
    from hahnet.training.checkpoint import snapshot_path

    first, last = snapshot_path(tmp_path, 1), snapshot_path(tmp_path, 3)
    assert first.exists() and last.exists() and not snapshot_path(tmp_path, 2).exists()
    assert checkpoint.read_info(first)["epoch"] == 0 and checkpoint.read_info(last)["epoch"] == 2
    assert last.read_bytes() == (tmp_path / checkpoint.MODEL_FILE).read_bytes()
    assert first.read_bytes() != last.read_bytes()
    with pytest.raises(ValueError, match="snapshots must be epochs in 1..3"):
        tiny_config(epochs=3, snapshots=(4,))


def test_gradient_ratio_probe_matches_separate_gradients_and_leaves_model_untouched():
    from hahnet.nn.hah import hah_score
    from hahnet.training.trainer import gradient_ratios

    config = tiny_config(alphas=(0.5, 0.25))
    trainer = Trainer(config, tiny_dataset(), "unused", torch.device("cpu"))
    model = trainer.model
    before = weights(model)
    x, y = trainer.images[:16].float() / 255, trainer.labels[:16]
    ratios = gradient_ratios(model, config, x, y)
    assert {k: torch.equal(v, before[k]) for k, v in weights(model).items()} == \
        {k: True for k in before}
    assert all(p.grad is None for p in model.parameters())
    # reference: alpha * dH_l/dW_l from the layer's own pre-activation, CE gradient apart
    import copy
    from hahnet.nn.hah import hah_convs

    ref = copy.deepcopy(model).train()
    convs = hah_convs(ref)[:2]
    captured = []
    hooks = [c.register_forward_hook(lambda m, i, o: captured.append(o)) for c in convs]
    ce = torch.nn.functional.cross_entropy(ref(x), y)
    for h in hooks:
        h.remove()
    expected = []
    for alpha, conv, z in zip(config.alphas, convs, captured):
        g_ce, = torch.autograd.grad(ce, conv.weight, retain_graph=True)
        g_hah, = torch.autograd.grad(-alpha * hah_score(z, config.ratio, config.demote),
                                     conv.weight, retain_graph=True)
        expected.append(float(g_hah.norm() / g_ce.norm()))
    assert ratios == pytest.approx(expected, rel=1e-4)


def test_hah_runs_record_gradient_ratios_per_epoch(tmp_path):
    trainer = Trainer(tiny_config(epochs=1), tiny_dataset(), tmp_path, torch.device("cpu"))
    trainer.fit()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert len(line["grad_ratios"]) == 6 and all(r > 0 for r in line["grad_ratios"])


@pytest.mark.parametrize("options", [dict(precision="bf16"), dict(channels_last=True),
                                     dict(precision="bf16", channels_last=True)])
def test_bf16_and_channels_last_train_resume_and_load(tmp_path, options):
    config = tiny_config(epochs=2, **options)
    trainer = Trainer(config, tiny_dataset(), tmp_path, torch.device("cpu"))
    history = trainer.fit()
    assert all(math.isfinite(m.train_loss) for m in history)
    if config.channels_last:
        conv = next(p for p in trainer.model.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last)
    model = hahnet.load(tmp_path)  # the saved weights are plain fp32, any layout
    assert next(model.parameters()).dtype == torch.float32
    x = torch.rand(2, 3, 32, 32)
    trainer.model.eval()
    torch.testing.assert_close(model(x), trainer.model(x).float())
    again = Trainer(tiny_config(epochs=3, **options), tiny_dataset(), tmp_path, torch.device("cpu"))
    with pytest.raises(Exception, match="other settings"):
        again.resume()  # epochs differ: refused; precision/layout alone would not be
    same = Trainer(tiny_config(epochs=2), tiny_dataset(), tmp_path, torch.device("cpu"))
    assert same.resume() == 2
