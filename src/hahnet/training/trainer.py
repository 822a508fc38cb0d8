"""The training loop: standard (cross-entropy) or HaH (:class:`HaHObjective`) training
of any registered network (:func:`hahnet.create_model`) on an in-memory dataset, with
per-epoch metrics and resumable checkpoints.

Data stay on the training device as uint8 tensors; each epoch's permutation and random
crops/flips are drawn from a generator seeded by (seed, epoch), so an epoch can be
replayed exactly after a crash, and several processes can draw the same global batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hahnet.training import checkpoint, distributed
from hahnet.training.checkpoint import snapshot_path
from hahnet.data.augment import crop_flip, crop_flip_params
from hahnet.data.datasets import Dataset, ImageDataset, channel_stats, to_float
from hahnet.config import RUNTIME_OPTIONS, ModelConfig, TrainConfig
from hahnet.training.device import autocast, resolve_device, tune_device
from hahnet.nn.hah import HaHObjective
from hahnet.nn.models import build_model
from hahnet.training.rundir import CONFIG_FILE, METRICS_FILE, RunDir

GRAD_PROBE_SIZE = 128  # images in the fixed batch of the per-epoch gradient-ratio probe


@dataclass
class EpochMetrics:
    """One line of metrics.jsonl."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    eval_acc: float
    eval_split: str
    hah_scores: list[float]
    seconds: float
    images_per_second: float
    grad_ratios: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StepRecord:
    """One training step as ``on_gradients`` sees it: after the backward pass (under
    torchrun the gradients are already averaged over processes) and before the optimizer
    applies them, so the parameters still hold the weights the gradients belong to."""

    epoch: int
    step: int  # within the epoch, from 0
    indices: Tensor  # the global batch: indices into the training split, every process's
    loss: Tensor  # this process's loss on its share of the global batch


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Step schedule: lr * gamma^(milestones passed), milestones as fractions of epochs."""
    passed = sum(1 for m in config.milestones if epoch >= round(m * config.epochs))
    return config.lr * config.gamma ** passed


def model_config(config: TrainConfig, dataset: Dataset) -> ModelConfig:
    """The model ``config`` trains on ``dataset``: its classes and channels, and the
    training images' per-channel mean and std (the model's input normalization)."""
    mean, std = channel_stats(dataset.train)
    shape = dataset.train.images.shape
    return ModelConfig(config.arch, config.hah, config.width, len(dataset.train.classes),
                       shape[1], config.hah_layers, config.sigma, config.keep,
                       tuple(round(m, 4) for m in mean), tuple(round(s, 4) for s in std))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that draws epoch ``epoch``'s order and augmentations."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_batches(num_images: int, batch_size: int, seed: int, epoch: int,
                  augment: bool) -> Iterator[tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]]:
    """Global batches of one epoch as (indices, crop/flip params); the last partial batch
    is dropped so that every step sees a full batch (and splits evenly across processes)."""
    order, params = epoch_plan(num_images, seed, epoch, augment)
    yield from plan_batches(order, params, batch_size)


def epoch_plan(num_images: int, seed: int, epoch: int, augment: bool,
               device: torch.device | str = "cpu") -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Epoch ``epoch``'s image order and crop/flip parameters (drawn on the CPU, so they are
    the same on every device), moved to ``device`` in one copy each: slicing them there
    per step then costs no host-device transfer (and no host sync)."""
    generator = epoch_generator(seed, epoch)
    order = torch.randperm(num_images, generator=generator)
    params = crop_flip_params(num_images, generator) if augment else None
    if torch.device(device).type != "cpu":
        order = order.to(device)
        params = None if params is None else tuple(p.to(device) for p in params)
    return order, params


def plan_batches(order: Tensor, params: tuple[Tensor, ...] | None, batch_size: int
                 ) -> Iterator[tuple[Tensor, tuple[Tensor, ...] | None]]:
    """Full global batches of an :func:`epoch_plan` (the last partial one dropped)."""
    num_images = len(order)
    for start in range(0, num_images - batch_size + 1, batch_size):
        stop = start + batch_size
        yield order[start:stop], (None if params is None else tuple(p[start:stop] for p in params))


def gradient_ratios(model: nn.Module, config: TrainConfig, x: Tensor, y: Tensor) -> list[float]:
    """Per HaH layer: RMS of the alpha-weighted HaH gradient / RMS of the cross-entropy
    gradient of that layer's weight, on one batch. Measured on a copy of ``model`` (train
    mode, as in a step) so the run's weights, batch-norm statistics and RNG are untouched;
    its batch norms are local, as only rank 0 runs this. As in a training step, the
    forward passes run in the run's precision and the backward passes outside autocast."""
    import copy

    probe = distributed.unsynced(copy.deepcopy(model)).train()  # rank 0 alone runs this
    objective = HaHObjective(probe, config.alphas, config.ratio, config.demote)
    weights = [conv.weight for conv in objective.layers]
    precision = config.for_device(x.device).precision

    def grads(loss_fn: Callable[[], Tensor]) -> list[Tensor]:
        with autocast(x.device, precision):
            loss = loss_fn()
        return [g.detach().clone() for g in torch.autograd.grad(loss, weights)]

    with torch.random.fork_rng(devices=[]):
        total = grads(lambda: objective(x, y)[1])
        cross_entropy = grads(lambda: F.cross_entropy(probe(x), y))
    return [float((t - c).norm() / c.norm().clamp_min(1e-30)) for t, c in zip(total, cross_entropy)]


@torch.no_grad()
def accuracy(model: nn.Module, split: ImageDataset, device: torch.device, batch_size: int = 500,
             precision: str = "fp32", channels_last: bool = False,
             env: distributed.DistEnv | None = None) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on a whole split. Under torchrun (``env``
    active) each rank counts its shard of whole batches and the counts are all-reduced,
    so the result equals one process's."""
    if env is not None and env.active:
        def count(part: slice) -> Tensor:
            sub = type(split)(split.images[part], split.labels[part], split.classes)
            return torch.tensor([_correct(model, sub, device, batch_size, precision,
                                          channels_last), part.stop - part.start],
                                dtype=torch.float64)

        correct, total = distributed.sum_over_shards(env, len(split.labels), batch_size,
                                                     count).tolist()
        return correct / max(1.0, total)
    return _correct(model, split, device, batch_size, precision, channels_last) \
        / max(1, len(split.labels))


def _correct(model: nn.Module, split: ImageDataset, device: torch.device, batch_size: int,
             precision: str, channels_last: bool) -> int:
    was_training = model.training
    model.eval()
    images, labels = split.images.to(device), split.labels.to(device)  # one copy each
    correct = torch.zeros((), dtype=torch.long, device=device)  # counted there: one sync
    for start in range(0, len(labels), batch_size):
        x = to_float(images[start:start + batch_size])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum()
    model.train(was_training)
    return int(correct)


class Trainer:
    """Owns the model, optimizer and objective of one run; :meth:`fit` trains it.

    ``rank``/``world_size`` let several processes share each global batch (see
    :mod:`hahnet.training.distributed`); with the defaults it is a plain single-process run.
    """

    def __init__(self, config: TrainConfig, dataset: Dataset, out_dir: Path,
                 device: torch.device, rank: int = 0, world_size: int = 1,
                 wrap: Callable[[nn.Module], nn.Module] | None = None) -> None:
        if config.batch_size % world_size:
            raise ValueError(f"--batch-size {config.batch_size} is the global batch and must "
                             f"divide evenly over {world_size} processes; use a multiple of {world_size}")
        config = config.for_device(device)  # precision / channels-last 'auto' resolved
        tune_device(device)
        self.config, self.device = config, device
        self.rank, self.world_size = rank, world_size
        self.env = distributed.DistEnv(rank, world_size, device=device)
        self.out_dir = Path(out_dir)
        self.run_dir = RunDir(out_dir)
        self.data_path = dataset.source
        self.dataset = dataset
        self.train_split, self.eval_split = self._splits(dataset)
        self.eval_split_name = "holdout" if config.holdout > 0 else "test"
        if len(self.train_split.labels) < config.batch_size:
            raise ValueError(f"only {len(self.train_split.labels)} training images for a global "
                             f"batch of {config.batch_size}; lower --batch-size or use more data")
        with torch.random.fork_rng(devices=[]):  # seeded init without touching global RNG
            torch.manual_seed(config.seed)
            self.model: nn.Module = build_model(model_config(config, dataset)).to(device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.start_epoch = 0
        self.budget_plan: dict[str, Any] | None = None  # set by hahnet.training.budget.plan_trainer
        self.images = self.train_split.images.to(device)
        self.labels = self.train_split.labels.to(device)
        self.network: nn.Module = wrap(self.model) if wrap else self.model
        if config.compile:
            self.network = torch.compile(self.network)
        self.objective = (HaHObjective(self.network, config.alphas, config.ratio, config.demote)
                          if config.hah else None)

    def _splits(self, dataset: Dataset) -> tuple[ImageDataset, ImageDataset]:
        from hahnet.data.datasets import split_holdout

        train = dataset.train
        if self.config.holdout > 0:
            train, held = split_holdout(train, self.config.holdout, self.config.seed)
        else:
            held = dataset.test
        if self.config.limit_train is not None and self.config.limit_train < len(train.labels):
            train = train.limit(self.config.limit_train, self.config.seed)
        return train, held

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def resume(self) -> int:
        """Load weights and optimizer state from ``out_dir``; returns the next epoch."""
        if self.is_main:
            self.run_dir.recover(self.config.snapshots)
        saved, _ = self.run_dir.read_config()
        diff = saved.differences(self.config) if saved is not None else {}
        if diff:
            raise checkpoint.CheckpointError(
                f"cannot resume {self.out_dir}: its run used other settings (saved, given): "
                f"{diff}; resume with the same options or pick a new --out")
        info = checkpoint.load_weights(self.model, self.out_dir)
        state = checkpoint.load_train_state(self.out_dir, self.optimizer)
        if state["epoch"] != info["epoch"]:
            raise checkpoint.CheckpointError(
                f"cannot resume {self.out_dir}: weights are from epoch {info['epoch']} but the "
                f"optimizer state from epoch {state['epoch']} (interrupted while saving?); "
                f"delete {checkpoint.STATE_FILE} and {checkpoint.MODEL_FILE} to start over")
        self.start_epoch = info["epoch"] + 1
        if self.is_main:
            self.run_dir.truncate_metrics(self.start_epoch)
        return self.start_epoch

    def train_step(self, x: Tensor, y: Tensor,
                   before_update: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
        """One optimizer step on a (local) batch; returns (loss, number correct) tensors.
        ``before_update(loss)`` runs between the backward pass and the optimizer step."""
        with autocast(self.device, self.config.precision):
            if self.objective is not None:
                logits, loss = self.objective(x, y)
            else:
                logits = self.network(x)
                loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_update is not None:
            before_update(loss.detach())
        self.optimizer.step()
        return loss.detach(), (logits.argmax(1) == y).sum()

    def local_batch(self, indices: Tensor, params) -> tuple[Tensor, Tensor]:
        """This process's slice of a global batch, augmented on the training device."""
        share = len(indices) // self.world_size
        lo, hi = self.rank * share, (self.rank + 1) * share
        idx = indices[lo:hi].to(self.device)
        x = to_float(self.images[idx])
        if params is not None:
            dy, dx, flip = (p[lo:hi].to(self.device) for p in params)
            x = crop_flip(x, dy, dx, flip)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx]

    def steps_per_epoch(self) -> int:
        return len(self.train_split.labels) // self.config.batch_size

    def train_epoch(self, epoch: int,
                    on_step: Callable[[int, Tensor], None] | None = None,
                    stop_after: int | None = None,
                    on_gradients: Callable[[StepRecord], None] | None = None
                    ) -> tuple[float, float, int]:
        """Train one epoch; returns (mean loss, accuracy, images) over this process's data.
        ``stop_after`` ends the epoch early after that many steps (for tests of crashes);
        ``on_gradients`` sees every step before its update (see :class:`StepRecord`)."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, epoch)
        self.network.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        order, params = epoch_plan(len(self.train_split.labels), self.config.seed, epoch,
                                   self.config.augment, self.device)
        batches = plan_batches(order, params, self.config.batch_size)
        for step, (indices, params) in enumerate(batches):
            if stop_after is not None and step >= stop_after:
                break
            x, y = self.local_batch(indices, params)
            inspect = None if on_gradients is None else (
                lambda loss, step=step, indices=indices: on_gradients(
                    StepRecord(epoch, step, indices, loss)))
            loss, hits = self.train_step(x, y, inspect)
            loss_sum += loss * len(y)
            correct += hits
            seen += len(y)
            if on_step is not None:
                on_step(len(y) * self.world_size, loss)
        return float(loss_sum) / max(seen, 1), float(correct) / max(seen, 1), seen

    def time_budget_record(self) -> dict[str, Any] | None:
        """The time-budget choice behind this run's epochs (its own, or the one reproduce
        made for both networks), for model.json; None for a run with fixed epochs."""
        return self.budget_plan or self.run_dir.read_time_budget()

    def save(self, epoch: int, metrics: EpochMetrics) -> None:
        """Checkpoint (rank 0 only): weights, optimizer state, then the metrics line."""
        if not self.is_main:
            return
        self.run_dir.write_config(self.config, self.data_path)
        staging = self.run_dir.begin_save()
        checkpoint.save_train_state(staging, self.optimizer, {"epoch": epoch})
        dataset = {"name": self.dataset.name, "source": self.dataset.source,
                   "classes": list(self.dataset.train.classes)}
        checkpoint.save_model(staging, self.model, {
            "epoch": epoch, "epochs": self.config.epochs, "dataset": dataset,
            "train": self.config.to_dict(), "metrics": metrics.to_dict(),
            **({"time_budget": plan} if (plan := self.time_budget_record()) else {})})
        self.run_dir.commit_save(staging)
        if epoch + 1 in self.config.snapshots:
            self.run_dir.save_snapshot(epoch + 1)
        self.run_dir.append_metrics(metrics.to_dict())

    def fit(self, on_step: Callable[[int, Tensor], None] | None = None,
            on_epoch: Callable[[EpochMetrics], None] | None = None,
            on_gradients: Callable[[StepRecord], None] | None = None) -> list[EpochMetrics]:
        """Train from ``start_epoch`` to the end, checkpointing after every epoch.
        Callbacks: ``on_step(images, loss)`` after each step, ``on_epoch(metrics)`` after
        each epoch, ``on_gradients(record)`` before each update (:class:`StepRecord`)."""
        history = []
        for epoch in range(self.start_epoch, self.config.epochs):
            started = time.perf_counter()
            loss, acc, seen = self.train_epoch(epoch, on_step, on_gradients=on_gradients)
            loss, acc = self.reduce_mean(loss), self.reduce_mean(acc)
            seconds = time.perf_counter() - started
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged at epoch {epoch}: loss is {loss}; "
                                         f"lower --lr or use --precision fp32")
            eval_acc = self.evaluate()
            scores = self.objective.scores if self.objective is not None else []
            metrics = EpochMetrics(epoch, learning_rate(self.config, epoch), loss, acc, eval_acc,
                                   self.eval_split_name, scores, seconds, seen * self.world_size / seconds,
                                   self.probe_gradients())
            failure = None
            try:  # only rank 0 writes; check() tells every rank whether it failed
                self.save(epoch, metrics)
            except Exception as error:  # noqa: BLE001 - re-raised by check()
                failure = error
            distributed.check(self.env, failure)
            history.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics)
        return history

    def probe_gradients(self) -> list[float]:
        """HaH / cross-entropy gradient ratio per HaH layer on a fixed batch (the first
        training images, unaugmented); empty for a standard run."""
        if self.objective is None or not self.is_main:
            return []
        count = min(GRAD_PROBE_SIZE, len(self.labels))
        x = to_float(self.images[:count])
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return gradient_ratios(self.model, self.config, x, self.labels[:count])

    def evaluate(self) -> float:
        """Accuracy on the eval split; under several processes each evaluates a shard
        with rank 0's batch-norm statistics (the checkpoint's), counts all-reduced."""
        distributed.broadcast_buffers(self.env, self.model)
        return accuracy(self.model, self.eval_split, self.env.device,
                        self.config.eval_batch_size, self.config.precision,
                        self.config.channels_last, self.env)

    def reduce_mean(self, value: float) -> float:
        """Mean of a per-process scalar over all processes (identity in one process)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size
