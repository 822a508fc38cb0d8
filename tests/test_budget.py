"""Time budgets: the epoch choice fits the budget exactly, the warm-up measures a real
speed (and each epoch's save and gradient probe) without touching the run, and impossible
budgets are refused with what is needed."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from hahnet.training import budget
from hahnet.training.trainer import TrainConfig
from conftest import make_tiny_dataset as tiny_dataset


def test_epochs_within_is_the_largest_count_that_fits():
    assert budget.epochs_within(100.0, [10.0, 20.0]) == 3           # 90 s <= 100 s < 120 s
    assert budget.epochs_within(100.0, [10.0, 20.0], reserved_seconds=11.0) == 2
    assert budget.epochs_within(1000.0, [1.0], most=100) == 100
    with pytest.raises(budget.BudgetError, match=r"budget of 0.5 min does not fit one epoch "
                                                 r"\(~0.7 min needed"):
        budget.epochs_within(30.0, [40.0])


def test_throughput_epoch_seconds_counts_training_the_eval_pass_save_and_probe():
    t = budget.Throughput(images_per_second=100.0, train_images=1000, eval_images=300,
                          warmup_seconds=1.0)
    assert t.epoch_seconds() == pytest.approx(10.0 + 300 / (100.0 * budget.EVAL_SPEEDUP))
    slow = replace(t, save_seconds=4.0, probe_seconds=2.0)
    assert slow.epoch_seconds() == pytest.approx(t.epoch_seconds() + 6.0)
    assert budget.epochs_within(100.0, [t.epoch_seconds()]) == 9  # 11 s each
    assert budget.epochs_within(100.0, [slow.epoch_seconds()]) == 5  # 17 s each


def test_measure_times_real_steps_on_a_throwaway_model():
    config = TrainConfig(hah=True, width=0.0625, epochs=3, batch_size=8, seed=3)
    t = budget.measure(config, tiny_dataset(n_train=48), torch.device("cpu"), steps=2,
                       warmup_steps=1)
    assert t.images_per_second > 0 and t.train_images == 48 and t.eval_images == 16
    with pytest.raises(budget.BudgetError, match="the warm-up needs 4 batches of 16"):
        budget.measure(TrainConfig(width=0.0625, batch_size=16), tiny_dataset(n_train=48),
                       torch.device("cpu"), steps=2, warmup_steps=3)


def test_plan_record_is_json_ready():
    import json

    t = budget.Throughput(50.0, 100, 10, 0.5)
    record = budget.plan_record(5.0, {"hah": t}, 7, 30.0)
    assert json.loads(json.dumps(record))["measured"]["hah"]["epoch_seconds"] == \
        pytest.approx(t.epoch_seconds(), abs=0.01)


def test_warm_up_times_the_save_and_probe_that_end_every_epoch(monkeypatch):
    """Each epoch ends with a checkpoint (weights and Adam state written, then re-read for
    their SHA-256) and, for HaH, the gradient probe; the warm-up times both, here with
    the real save slowed down as by a slow disk."""
    from hahnet.training import checkpoint

    real_save, pause, saved = checkpoint.save_model, 0.4, []

    def slow_save(run_dir, model, info):
        time.sleep(pause)
        real_save(run_dir, model, info)
        saved.append(run_dir)

    monkeypatch.setattr(checkpoint, "save_model", slow_save)
    config = TrainConfig(hah=True, width=0.0625, epochs=3, batch_size=8, seed=3)
    hah = budget.measure(config, tiny_dataset(n_train=48), torch.device("cpu"), steps=2,
                         warmup_steps=1)
    assert hah.save_seconds >= pause and hah.probe_seconds > 0
    assert len(saved) == 1 and not saved[0].exists()  # a scratch directory, removed after
    ips = hah.images_per_second
    steps_and_eval = 48 / ips + 16 / (ips * budget.EVAL_SPEEDUP)
    assert hah.epoch_seconds() == pytest.approx(steps_and_eval + hah.save_seconds
                                                + hah.probe_seconds)
    standard = budget.measure(replace(config, hah=False), tiny_dataset(n_train=48),
                              torch.device("cpu"), steps=2, warmup_steps=1)
    assert standard.save_seconds >= pause and standard.probe_seconds < pause
