"""Training-loop overhead: images/s of ``Trainer.train_epoch`` versus the model's bare
forward/backward/step on the very same (pre-augmented) batches.

    .venv/bin/python benchmarks/train_loop.py --data ../shared/data/cifar10-jpeg
    .venv/bin/python benchmarks/train_loop.py --images 10000 --width 1.0 --precision bf16

Overhead = loop time / bare time - 1 (target: under 10%). Both variants run in this one
process, interleaved (loop, bare, loop, bare, ...) so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hahnet.data.datasets import load_dataset
from hahnet.training.trainer import TrainConfig, Trainer, epoch_batches


def bare_epoch(trainer: Trainer, batches) -> float:
    """Seconds for forward/backward/step over prepared batches (no data work)."""
    started = time.perf_counter()
    for x, y in batches:
        trainer.train_step(x, y)
    return time.perf_counter() - started


def prepared_batches(trainer: Trainer, epoch: int):
    return [trainer.local_batch(idx, params) for idx, params in
            epoch_batches(len(trainer.train_split.labels), trainer.config.batch_size,
                          trainer.config.seed, epoch, trainer.config.augment)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--images", type=int, default=None, help="epoch size (default: all)")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--models", default="hah,standard")
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    print(f"data: {dataset.describe()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name in args.models.split(","):
        config = TrainConfig(hah=name == "hah", width=args.width, epochs=1,
                             precision=args.precision, limit_train=args.images)
        trainer = Trainer(config, dataset, "/tmp/hahnet-bench-loop", torch.device("cpu"))
        trainer.train_epoch(0, stop_after=3)  # warm-up
        loop_times, bare_times = [], []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            _, _, images = trainer.train_epoch(repeat)
            loop_times.append(time.perf_counter() - started)
            bare_times.append(bare_epoch(trainer, prepared_batches(trainer, repeat)))
        loop, bare = statistics.median(loop_times), statistics.median(bare_times)
        print(f"{name:8s} width {args.width:g} {args.precision}: loop {images / loop:7.1f} img/s, "
              f"bare {images / bare:7.1f} img/s, overhead {loop / bare - 1:+.1%} "
              f"({images} images/epoch)")


if __name__ == "__main__":
    main()
