"""Training-loop overhead: what one epoch of ``hahnet train`` costs (``Trainer.fit``:
permutation, crop+flip, forward/backward/Adam, the per-epoch evaluation, gradient probe
and checkpoint) against the model's bare forward/backward/Adam steps on the very same
(pre-augmented) batches, i.e. the step rate ``hahnet bench`` measures.

    .venv/bin/python benchmarks/train_loop.py --data ../shared/data/cifar10-jpeg
    .venv/bin/python benchmarks/train_loop.py --images 10000 --width 1.0 --threads 1 --clock cpu

Reported: full epoch / bare epoch, and each part of the full epoch (``train_epoch``,
``evaluate``, ``probe_gradients``, ``save``) in units of the bare epoch. Full and bare
epochs run in this one process, interleaved, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import torch

from hahnet.data.datasets import load_dataset
from hahnet.training.trainer import TrainConfig, Trainer, epoch_batches

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def prepared_batches(trainer: Trainer, epoch: int):
    """Epoch ``epoch``'s batches, augmented in advance (what the loop would draw)."""
    return [trainer.local_batch(idx, params) for idx, params in
            epoch_batches(len(trainer.train_split.labels), trainer.config.batch_size,
                          trainer.config.seed, epoch, trainer.config.augment)]


def timed_parts(trainer: Trainer, clock) -> dict[str, float]:
    """Wrap the trainer's per-epoch work (``train_epoch``, ``evaluate``,
    ``probe_gradients``, ``save``) so that each call adds its ``clock`` seconds to the
    returned dict (instance attributes: the class is untouched)."""
    spent: dict[str, float] = {}
    for name in ("train_epoch", "evaluate", "probe_gradients", "save"):
        method = getattr(trainer, name)

        def timed(*args, method=method, name=name, **kwargs):
            started = clock()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + clock() - started
        setattr(trainer, name, timed)
    return spent


def time_epoch(trainer: Trainer, epoch: int, clock, spent: dict[str, float]
               ) -> dict[str, float]:
    """Seconds of one ``fit`` epoch, in total and by part."""
    trainer.config = dataclasses.replace(trainer.config, epochs=epoch + 1)
    trainer.start_epoch = epoch
    spent.clear()
    started = clock()
    trainer.fit()
    return {"total": clock() - started, **spent}


def time_bare(trainer: Trainer, epoch: int, clock) -> float:
    """Seconds for forward/backward/Adam over prepared batches (no data work)."""
    batches = prepared_batches(trainer, epoch)
    started = clock()
    for x, y in batches:
        trainer.train_step(x, y)
    return clock() - started


def measure(name: str, args: argparse.Namespace, dataset, out_dir: str) -> None:
    """Interleaved full and bare epochs of one network; prints one line."""
    clock = CLOCKS[args.clock]
    config = TrainConfig(hah=name == "hah", width=args.width, epochs=1,
                         precision=args.precision, limit_train=args.images)
    trainer = Trainer(config, dataset, os.path.join(out_dir, name), torch.device("cpu"))
    trainer.train_epoch(0, stop_after=3)  # warm-up
    spent = timed_parts(trainer, clock)
    full: list[dict[str, float]] = []
    bare: list[float] = []
    for repeat in range(args.repeats):
        full.append(time_epoch(trainer, repeat, clock, spent))
        bare.append(time_bare(trainer, repeat, clock))
    images = trainer.steps_per_epoch() * trainer.config.batch_size
    part = {key: statistics.median(f.get(key, 0.0) for f in full) for key in full[0]}
    bare_s = statistics.median(bare)
    shares = ", ".join(f"{key} {value / bare_s:.3f}" for key, value in part.items()
                       if key != "total")
    print(f"{name:8s} width {args.width:g} {args.precision}: {images} train images, "
          f"{len(trainer.eval_split.labels)} evaluated per epoch; bare steps "
          f"{images / bare_s:7.1f} img/s, full epoch {images / part['total']:7.1f} img/s; "
          f"full / bare = {part['total'] / bare_s:.3f} (in units of the bare epoch: "
          f"{shares}; {args.clock} clock, medians of {args.repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--images", type=int, default=None, help="epoch size (default: all)")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--models", default="hah,standard")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: process CPU time (with --threads 1 on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data)
    print(f"data: {dataset.describe()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average "
          + " ".join(f"{v:.1f}" for v in os.getloadavg()))
    with tempfile.TemporaryDirectory(prefix="hahnet-bench-loop-") as out_dir:
        for name in args.models.split(","):
            measure(name, args, dataset, out_dir)


if __name__ == "__main__":
    main()
