"""Time one HaHObjective training step against one plain cross-entropy step.

Same HaH VGG16 (default batch 128, width 0.25, CPU, fp32); each step is forward +
backward + Adam step. The two variants are interleaved (A, B, A, B, ...) so that load
from other processes hits both alike; the reported numbers are medians of the repeats,
after warm-up steps that are not timed.

    .venv/bin/python benchmarks/step_time.py [--batch-size 128] [--width 0.25] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hahnet import HaHObjective, vgg16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = vgg16(hah=True, width=args.width).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    objective = HaHObjective(model)
    x = torch.rand(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))

    def hah_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _, loss = objective(x, y)
        loss.backward()
        optimizer.step()

    def plain_step() -> None:
        # Same network called directly (no HaH score): plain cross-entropy training step.
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    steps = {"hah": hah_step, "plain": plain_step}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    hah = statistics.median(times["hah"])
    plain = statistics.median(times["plain"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"HaH VGG16 width {args.width}, batch {args.batch_size}, fp32, "
          f"median of {args.repeats} interleaved repeats ({args.warmup} warm-up)")
    print(f"HaHObjective step (fwd+bwd+Adam): {hah * 1e3:8.1f} ms")
    print(f"plain CE step     (fwd+bwd+Adam): {plain * 1e3:8.1f} ms")
    print(f"ratio HaH / plain:                {hah / plain:8.3f}")


if __name__ == "__main__":
    main()
