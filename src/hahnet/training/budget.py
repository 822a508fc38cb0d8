"""Training within a time budget: a short warm-up measures how fast this machine trains a
configuration, and the number of epochs is chosen so that training (and what must follow
it) fits. The schedule keeps its shape: milestones stay fractions of the chosen epochs.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch

from hahnet.config import TrainConfig
from hahnet.data.datasets import Dataset
from hahnet.training.rundir import RunDir
from hahnet.training.trainer import EpochMetrics, Trainer, epoch_batches

EVAL_SPEEDUP = 3.0  # a forward pass costs about a third of a training step
MOST_EPOCHS = 100   # a budget trains at most this long (the paper's recipe) unless told
MARGIN = 0.03       # of the budget, kept free for start-up and timing noise


class BudgetError(ValueError):
    """A budget too small for even one epoch; the message says how much is needed."""


@dataclass(frozen=True)
class Throughput:
    """What the warm-up measured for one configuration on one device."""

    images_per_second: float
    train_images: int
    eval_images: int
    warmup_seconds: float
    save_seconds: float = 0.0   # one epoch's checkpoint (written, then re-read for SHA-256)
    probe_seconds: float = 0.0  # one epoch's gradient-ratio probe (HaH runs)

    def epoch_seconds(self) -> float:
        """One epoch: the training steps, the accuracy pass, the probe and the save."""
        ips = self.images_per_second
        return (self.train_images / ips + self.eval_images / (ips * EVAL_SPEEDUP)
                + self.save_seconds + self.probe_seconds)


def measure(config: TrainConfig, dataset: Dataset, device: torch.device, steps: int | None = None,
            warmup_steps: int = 3) -> Throughput:
    """Time ``steps`` optimizer steps (after ``warmup_steps`` untimed ones: allocator,
    autotuning, compilation) on a throwaway copy of the run's model and data, then once
    each what every epoch adds: the gradient probe and the checkpoint save (into a scratch
    directory). ``steps`` defaults to 8 on a CPU and 30 on an accelerator (short steps,
    noisier timings)."""
    started = time.perf_counter()
    if steps is None:
        steps = 8 if torch.device(device).type == "cpu" else 30
    probe = replace(config, epochs=max(config.epochs, 1), snapshots=(), time_budget=None)
    with tempfile.TemporaryDirectory(prefix="hahnet-budget-") as scratch:
        trainer = Trainer(probe, dataset, out_dir=Path(scratch), device=device)
        images_per_second = _steps_per_second(trainer, steps, warmup_steps)
        save_seconds, probe_seconds = epoch_extras(trainer)
    return Throughput(images_per_second, len(trainer.train_split.labels),
                      len(trainer.eval_split.labels), time.perf_counter() - started,
                      save_seconds, probe_seconds)


def _steps_per_second(trainer: Trainer, steps: int, warmup_steps: int) -> float:
    """Training images per second over ``steps`` timed steps of ``trainer``."""
    probe, device = trainer.config, trainer.device
    batches = epoch_batches(len(trainer.train_split.labels), probe.batch_size, probe.seed, 0,
                            probe.augment)
    timed_from, images = None, 0
    for step, (indices, params) in enumerate(batches):
        if step == warmup_steps:
            _sync(device)
            timed_from = time.perf_counter()
        if step >= warmup_steps + steps:
            break
        x, y = trainer.local_batch(indices, params)
        loss, _ = trainer.train_step(x, y)
        if step >= warmup_steps:
            images += len(y)
    float(loss)  # one host sync at the end
    _sync(device)
    if timed_from is None or images == 0:
        raise BudgetError(f"the warm-up needs {warmup_steps + 1} batches of {probe.batch_size} "
                          f"training images; use more data or a smaller --batch-size")
    return images / (time.perf_counter() - timed_from)


def epoch_extras(trainer: Trainer) -> tuple[float, float]:
    """Seconds of (the checkpoint save, the gradient probe) that close every epoch of
    ``trainer``'s run, timed once each; the save goes to ``trainer``'s own directory."""
    started = time.perf_counter()
    ratios = trainer.probe_gradients()  # [] for a standard run
    _sync(trainer.device)
    probed = time.perf_counter()
    metrics = EpochMetrics(0, trainer.config.lr, 0.0, 0.0, 0.0, trainer.eval_split_name, [],
                           0.0, 0.0, ratios)
    trainer.save(0, metrics)
    return time.perf_counter() - probed, probed - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epochs_within(budget_seconds: float, epoch_seconds: Sequence[float],
                  reserved_seconds: float = 0.0, most: int | None = None) -> int:
    """The most epochs E such that every run of ``epoch_seconds`` trained for E epochs,
    plus ``reserved_seconds`` (evaluation, start-up), fits in ``budget_seconds``."""
    per_epoch = sum(epoch_seconds)
    available = budget_seconds - reserved_seconds
    if per_epoch <= 0:
        raise BudgetError("epoch time must be positive")
    epochs = math.floor(available / per_epoch)
    if epochs < 1:
        need = (per_epoch + reserved_seconds) / 60
        raise BudgetError(f"a time budget of {budget_seconds / 60:.1f} min does not fit one epoch "
                          f"(~{need:.1f} min needed with what follows training here); give "
                          f"more minutes or use less data / a smaller --width")
    return min(epochs, most) if most else epochs


def plan_record(budget_minutes: float, throughputs: dict[str, Throughput], epochs: int,
                reserved_seconds: float) -> dict[str, Any]:
    """What goes into model.json and the report: the budget, the measured speed, the choice."""
    return {"minutes": budget_minutes, "epochs": epochs,
            "reserved_seconds": round(reserved_seconds, 1),
            "measured": {name: {**asdict(t), "epoch_seconds": round(t.epoch_seconds(), 2)}
                         for name, t in throughputs.items()}}


def process_age() -> float:
    """Seconds since this process started (Linux /proc), so that a budget also counts the
    start-up and data loading before it was planned; 0 where that cannot be read."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(after_name[19])  # field 22, starttime, in clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def plan_training(config: TrainConfig, dataset: Dataset, device: torch.device,
                  out_dir: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """``config`` with the epochs that fit its ``time_budget`` minutes (counted from this
    process's start; ``config.epochs`` is the most it may choose), and the record of the
    choice, saved in ``out_dir``. A run that already chose (a resumed one) keeps its epochs."""
    saved = RunDir(out_dir).read_time_budget()
    if saved is not None:
        return replace(config, epochs=int(saved["epochs"])), saved
    minutes = float(config.time_budget)
    throughput = measure(config, dataset, device)
    elapsed = process_age()
    budget_seconds = minutes * 60 - elapsed
    reserved = MARGIN * minutes * 60
    epochs = epochs_within(budget_seconds, [throughput.epoch_seconds()], reserved,
                           config.epochs)  # its --epochs (default: the paper's 100) at most
    record = plan_record(minutes, {"hah" if config.hah else "standard": throughput}, epochs,
                         reserved)
    record["elapsed_seconds_before_training"] = round(elapsed, 1)
    record["device"] = str(device)
    RunDir(out_dir).write_time_budget(record)
    return replace(config, epochs=epochs), record


def plan_trainer(trainer: Trainer) -> dict[str, Any]:
    """Give ``trainer`` the epochs that fit its ``config.time_budget`` (:func:`plan_training`)
    before it fits; the run's settings on disk follow. A resumed run keeps its choice."""
    if trainer.world_size > 1:
        raise BudgetError("--time-budget measures one process's speed; under torchrun give "
                          "--epochs instead")
    config, plan = plan_training(trainer.config, trainer.dataset, trainer.device, trainer.out_dir)
    if config.epochs != trainer.config.epochs:
        trainer.config = config
        trainer.run_dir.write_config(config, trainer.data_path)
    trainer.budget_plan = plan
    return plan


def describe(record: dict[str, Any]) -> str:
    """One line: the choice and the measured speeds."""
    speeds = ", ".join(f"{name} {m['images_per_second']:.0f} img/s ({m['epoch_seconds']:.1f} s/epoch)"
                       for name, m in record["measured"].items())
    return (f"time budget {record['minutes']:g} min: {record['epochs']} epochs "
            f"(measured {speeds}; {record['reserved_seconds']:.0f} s reserved)")
