"""Where a training step spends its time: torch.profiler over the HaH step
(``HaHObjective``), the plain cross-entropy step of the same HaH network and the
standard VGG16 step, split by phase (forward, backward, optimizer) and by what the op
belongs to (convolution, weight normalization, the HaH blocks' activation = ReLU,
divisive normalization and threshold, the HaH score, batch norm, ...).

Forward ops are attributed through module hooks (a ``record_function`` range per
layer), backward ops through the autograd node that runs them; convolution kernels
inside a layer (also inside the scored convolution's backward) count as "conv". The
steps are first timed unprofiled (process CPU time), then profiled round-robin; each
category's median over the rounds, as a share of the profiled step, is scaled to the
step's unprofiled CPU time (the profiler's own clock is wall time).

    .venv/bin/python benchmarks/profile_step.py --width 0.25 --threads 1 --steps 5
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from hahnet import HaHObjective, vgg16
from hahnet.nn.layers import (DivisiveNorm2d, HaHBlock, InputNormalize,
                              TopFractionThreshold, WNConv2d)

PREFIX = "cat:"
MODULE_CATEGORIES = (  # checked in order: WNConv2d is an nn.Conv2d
    (WNConv2d, "wn conv"), (nn.Conv2d, "conv"), (DivisiveNorm2d, "hah activation"),
    (TopFractionThreshold, "hah activation"), (nn.BatchNorm2d, "batch norm"),
    (nn.ReLU, "relu"), (nn.MaxPool2d, "max-pool 2x2"), (nn.Linear, "linear + loss"),
    (InputNormalize, "input normalize"),
    (HaHBlock, "hah activation"))  # relu, normalization, threshold (its conv: above)
NODE_CATEGORIES = {  # autograd node name prefix -> category
    "ConvolutionBackward": "conv", "_ScoredConvBackward": "hah score",
    "_HaHActivationBackward": "hah activation",
    "_DivisiveNormBackward": "hah activation", "_TopFractionBackward": "hah activation",
    "NativeBatchNormBackward": "batch norm", "ReluBackward": "relu",
    "MaxPool2DWithIndicesBackward": "max-pool 2x2", "DivBackward": "weight norm",
    "AddBackward": "weight norm", "LinalgVectorNormBackward": "weight norm",
    "AddmmBackward": "linear + loss", "TBackward": "linear + loss",
    "NllLossBackward": "linear + loss", "LogSoftmaxBackward": "linear + loss",
    "AmaxBackward": "linear + loss", "AccumulateGrad": "grad accumulate",
    "SubBackward": "hah score", "MulBackward": "hah score", "StackBackward": "hah score",
}
CONV_OPS = ("aten::conv2d", "aten::convolution_backward", "aten::_convolution",
            "aten::convolution", "aten::mkldnn_convolution")
PHASES = ("forward", "backward", "optimizer")


def hook_modules(model: nn.Module) -> None:
    """Open a profiler range named after each layer's category around its forward. The
    parts of a HaH block are not hooked (hooks on them would turn off its fused path):
    the block's own range covers them, its convolution has its own."""
    def enter(category: str) -> Callable:
        def pre(module, inputs):
            module._profile_range = record_function(PREFIX + category)
            module._profile_range.__enter__()
        return pre

    def leave(module, inputs, output):
        module._profile_range.__exit__(None, None, None)

    in_blocks = {id(part) for block in model.modules() if isinstance(block, HaHBlock)
                 for part in (block.relu, block.divnorm, block.threshold)}
    for module in model.modules():
        if id(module) in in_blocks:
            continue
        for kind, category in MODULE_CATEGORIES:
            if isinstance(module, kind):
                module.register_forward_pre_hook(enter(category))
                module.register_forward_hook(leave)
                break


def categorize(event, phase: str) -> str:
    """The category of one profiler event: the nearest enclosing layer range or
    autograd node; a convolution op inside a convolution layer counts as 'conv'."""
    names, node = [], event
    while node is not None:
        names.append(node.name)
        node = node.cpu_parent
    is_conv = any(name in CONV_OPS for name in names)
    for name in names:
        if name.startswith(PREFIX):
            category = name[len(PREFIX):]
            if category == "wn conv":  # its weight norm has its own range (nearer)
                return "conv" if is_conv else "hah score"
            return category
        if name.startswith("autograd::engine::evaluate_function: "):
            node_name = name.split(": ", 1)[1]
            for prefix, category in NODE_CATEGORIES.items():
                if node_name.startswith(prefix):
                    return "conv" if is_conv else category
            return "other: " + node_name
    return "adam" if phase == "optimizer" else "other"


def patch_weight_norm() -> None:
    """Give WNConv2d's filter normalization its own profiler range."""
    original = WNConv2d.normalized_weight

    def normalized_weight(self):
        with record_function(PREFIX + "weight norm"):
            return original(self)
    WNConv2d.normalized_weight = normalized_weight


def step_functions(width: float, batch: int) -> dict[str, Callable[[], None]]:
    """The three training steps, each with its own model and Adam."""
    torch.manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    steps = {}
    for name in ("hah", "plain", "standard"):
        model = vgg16(hah=name != "standard", width=width).train()
        hook_modules(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        objective = HaHObjective(model) if name == "hah" else None

        def step(model=model, optimizer=optimizer, objective=objective) -> None:
            with record_function("phase:optimizer"):
                optimizer.zero_grad(set_to_none=True)
            with record_function("phase:forward"):
                loss = objective(x, y)[1] if objective else F.cross_entropy(model(x), y)
            with record_function("phase:backward"):
                loss.backward()
            with record_function("phase:optimizer"):
                optimizer.step()
        steps[name] = step
    return steps


def enclosing(event, prefix: str, default: str) -> str:
    """The name (after ``prefix``) of the nearest enclosing range starting with ``prefix``."""
    node = event
    while node is not None:
        if node.name.startswith(prefix):
            return node.name[len(prefix):]
        node = node.cpu_parent
    return default


def profile_steps(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, tuple]:
    """Self CPU ms per step by (phase, category) and by (category, op), for each step:
    medians over ``rounds`` rounds, in which the steps are profiled round-robin (a, b, c,
    a, b, c, ...) so that load from other processes hits all alike."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for index in range(rounds):
            with record_function(f"round:{index}"):
                for name, step in steps.items():
                    with record_function("step:" + name):
                        step()
    per_round = {name: ([collections.defaultdict(float) for _ in range(rounds)],
                        [collections.defaultdict(float) for _ in range(rounds)]) for name in steps}
    for event in prof.events():
        if event.name.startswith(("phase:", "step:", "round:", PREFIX)):
            continue
        index = int(enclosing(event, "round:", "0"))
        by_category, by_op = per_round[enclosing(event, "step:", "")]
        phase = enclosing(event, "phase:", "optimizer")
        category = categorize(event, phase)
        by_category[index][(phase, category)] += event.self_cpu_time_total / 1e3
        by_op[index][(category, event.name)] += event.self_cpu_time_total / 1e3
    return {name: tuple(_medians(tables) for tables in pair) for name, pair in per_round.items()}


def _medians(tables: list[dict]) -> dict:
    keys = {key for table in tables for key in table}
    return {key: statistics.median(table.get(key, 0.0) for table in tables) for key in keys}


def scaled(results: dict, step_ms: dict[str, float]) -> dict:
    """Each step's profile scaled so that it sums to the step's unprofiled CPU time: the
    profiler measures wall-clock self time (inflated by its own overhead, and on a busy
    machine by waiting for a core), so its shares are kept and its total is not."""
    out = {}
    for name, (by_category, by_op) in results.items():
        factor = step_ms[name] / max(sum(by_category.values()), 1e-9)
        out[name] = ({k: v * factor for k, v in by_category.items()},
                     {k: v * factor for k, v in by_op.items()})
    return out


def report(width: float, results: dict, step_ms: dict[str, float]) -> None:
    """Print the markdown tables: categories by phase per step, then the top ops."""
    raw = {name: sum(r[0].values()) for name, r in results.items()}
    results = scaled(results, step_ms)
    categories = sorted({c for r in results.values() for (_, c) in r[0]},
                        key=lambda c: -sum(r[0].get((p, c), 0.0) for r in results.values()
                                           for p in PHASES))
    print(f"\n### width {width:g}: CPU ms per step, by layer kind (profile shares x "
          f"unprofiled CPU time)\n")
    print("| category | HaH fwd | HaH bwd | HaH opt | HaH | plain | standard | HaH - standard |")
    print("|---|---|---|---|---|---|---|---|")
    for category in categories:
        row = [results["hah"][0].get((p, category), 0.0) for p in PHASES]
        sums = {name: sum(r[0].get((p, category), 0.0) for p in PHASES)
                for name, r in results.items()}
        if max(sums.values()) < 0.05:
            continue
        print(f"| {category} | " + " | ".join(f"{v:.1f}" for v in row)
              + f" | {sums['hah']:.1f} | {sums['plain']:.1f} | {sums['standard']:.1f} | "
              f"{sums['hah'] - sums['standard']:+.1f} |")
    print(f"| **total** | | | | {step_ms['hah']:.1f} | {step_ms['plain']:.1f} | "
          f"{step_ms['standard']:.1f} | {step_ms['hah'] - step_ms['standard']:+.1f} |")
    print("\nunprofiled CPU ms per step (medians): " +
          ", ".join(f"{name} {ms:.1f}" for name, ms in step_ms.items()) +
          "; profiled wall-clock totals: " +
          ", ".join(f"{name} {ms:.1f}" for name, ms in raw.items()))
    print(f"\n### width {width:g}: top ops of the HaH step (scaled CPU ms per step)\n")
    ops = sorted(results["hah"][1].items(), key=lambda item: -item[1])[:25]
    for (category, name), ms in ops:
        print(f"  {ms:8.2f}  {category:16s} {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="rounds (unprofiled, then profiled)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patch_weight_norm()
    steps = step_functions(args.width, args.batch_size)
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            started = time.process_time()
            step()
            times[name].append((time.process_time() - started) * 1e3)
    plain_ms = {name: statistics.median(t) for name, t in times.items()}
    results = profile_steps(steps, args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average "
          + " ".join(f"{v:.1f}" for v in os.getloadavg()) + ", width "
          f"{args.width:g}, batch {args.batch_size}, fp32, {args.steps} interleaved rounds unprofiled, then profiled")
    report(args.width, results, plain_ms)


if __name__ == "__main__":
    main()
