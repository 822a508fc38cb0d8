"""Before/after: the HaH training step with the layer and objective code of an older
git revision against the working tree's, in one process, interleaved.

The old ``hahnet/nn/fused.py``, ``hahnet/nn/layers.py`` and ``hahnet/hah.py`` are loaded
from ``git show REV:...`` as separate modules (revisions from f90a7f9 on, which have
that layout); a copy of the same model (same weights) is patched to run their forward
passes, and their ``HaHObjective`` scores it. Steps (forward + backward + Adam) of both
are timed round-robin, with plain cross-entropy steps of each and of the standard VGG16,
and medians (and minima) are reported.

    .venv/bin/python benchmarks/before_after.py --rev f90a7f9 --width 0.25 --repeats 7 \
        --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from hahnet import HaHObjective, vgg16
from hahnet.nn.hah import hah_convs
from hahnet.nn.layers import DivisiveNorm2d, HaHBlock, TopFractionThreshold, WNConv2d

# old_<name> <- the first of these files that the revision has
OLD_MODULES = {"fused": ("nn/fused",), "layers": ("nn/layers",), "costs": ("nn/costs",),
               "objective": ("nn/objective",), "hah": ("nn/hah", "hah")}
OPTIONAL = {"costs", "objective"}  # the layer-cost API, from 5d80bda on
IMPORTS = {"hahnet.nn.fused": "old_fused", "hahnet.nn.layers": "old_layers",
           "hahnet.nn.costs": "old_costs", "hahnet.nn.objective": "old_objective",
           "hahnet.nn.hah": "old_hah", "hahnet.hah": "old_hah"}


def load_revision(rev: str) -> dict[str, types.ModuleType]:
    """hahnet.nn.fused, hahnet.nn.layers and hahnet.(nn.)hah as they were at ``rev``, as
    standalone modules ``old_fused``, ``old_layers``, ``old_hah`` importing each other."""
    root = Path(__file__).resolve().parents[1]
    folder = Path(tempfile.mkdtemp(prefix="hahnet-rev-"))
    sys.path.insert(0, str(folder))
    loaded = {}
    for name, paths in OLD_MODULES.items():
        for path in paths:
            shown = subprocess.run(["git", "show", f"{rev}:src/hahnet/{path}.py"], cwd=root,
                                   capture_output=True, text=True)
            if not shown.returncode:
                break
        else:
            if name in OPTIONAL:
                continue
            raise SystemExit(f"--rev {rev}: no src/hahnet/{paths[0]}.py there; pick a "
                             f"revision from f90a7f9 on (the nn/ layout)")
        source = shown.stdout
        for new, old in IMPORTS.items():
            source = source.replace(f"from {new} import", f"from {old} import")
        target = folder / f"old_{name}.py"
        target.write_text(source)
        spec = importlib.util.spec_from_file_location(target.stem, target)
        module = importlib.util.module_from_spec(spec)
        sys.modules[target.stem] = module
        spec.loader.exec_module(module)
        loaded[name] = module
    return loaded


def patch_to_old(model: torch.nn.Module, old: dict[str, types.ModuleType]) -> None:
    """Make the model's HaH blocks and layers run the old revision's forward code."""
    classes = ((HaHBlock, "HaHBlock"), (DivisiveNorm2d, "DivisiveNorm2d"),
               (TopFractionThreshold, "TopFractionThreshold"), (WNConv2d, "WNConv2d"))
    for module in model.modules():
        for kind, name in classes:
            if isinstance(module, kind):
                forward = getattr(old["layers"], name).forward
                module.forward = types.MethodType(forward, module)
                break


def old_objective(model: torch.nn.Module, old: dict[str, types.ModuleType]):
    """The old revision's HaHObjective on a :func:`patch_to_old` model (its layer lookup
    is told about today's classes, which the model is built from)."""
    old["hah"].hah_convs = hah_convs
    for module in (old["hah"], old.get("objective")):
        if module is not None:  # isinstance checks see the model's (today's) classes
            module.WNConv2d = WNConv2d
            if hasattr(module, "HaHBlock"):
                module.HaHBlock = HaHBlock
    return old["hah"].HaHObjective(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="f90a7f9", help="the 'before' git revision")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--reference", action="store_true",
                        help="also time (c), the authors' reference procedure, before and after")
    parser.add_argument("--malloc", choices=["default", "tuned"], default="default",
                        help="tuned: hahnet.experiments.bench.tune_malloc() (no mmap, no heap trimming)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: perf_counter; cpu: this process's CPU time (use with "
                             "--threads 1 on a busy machine: it ignores time spent waiting)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "tuned":
        from hahnet.experiments.bench import tune_malloc
        if not tune_malloc():
            raise SystemExit("--malloc tuned: not supported here (glibc malloc only)")
    modules = load_revision(args.rev)

    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    new = vgg16(hah=True, width=args.width).train().to(memory_format=fmt)
    old = copy.deepcopy(new)
    patch_to_old(old, modules)
    std = vgg16(width=args.width).train().to(memory_format=fmt)
    x = torch.rand(args.batch_size, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,))
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" \
        else (lambda: torch.autocast("cpu", enabled=False))

    def make(model, hah: bool):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        objective = None
        if hah:
            objective = old_objective(model, modules) if model is old else HaHObjective(model)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with cast():
                loss = objective(x, y)[1] if objective else F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        return step

    # each step has its own copy of the weights and its own Adam
    new_plain, old_plain = copy.deepcopy(new), copy.deepcopy(new)
    patch_to_old(old_plain, modules)
    steps = {"before hah": make(old, True), "after hah": make(new, True),
             "before plain": make(old_plain, False), "after plain": make(new_plain, False),
             "standard": make(std, False)}
    if args.reference:
        from hahnet.experiments.bench import ReferenceStep

        for when, model in (("before", copy.deepcopy(old_plain)), ("after", copy.deepcopy(new))):
            if when == "before":
                patch_to_old(model, modules)
            reference = ReferenceStep(model, torch.optim.Adam(model.parameters(), lr=1e-3))
            steps[f"{when} reference"] = (lambda reference=reference: reference(x, y, args.precision))
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            started = clock()
            step()
            times[name].append(clock() - started)
    report(args, times)


def report(args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    """Medians and minima per step; ratios from the medians (and from the minima)."""
    med = {name: statistics.median(t) for name, t in times.items()}
    low = {name: min(t) for name, t in times.items()}
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"width {args.width:g}, batch {args.batch_size}, {args.precision}, "
          f"{'channels-last' if args.channels_last else 'NCHW'}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, {args.malloc} malloc, {args.repeats} interleaved rounds; "
          f"before = {args.rev}; load average now {load}")
    for name in med:
        print(f"  {name:17s} median {med[name] * 1e3:9.1f} ms   min {low[name] * 1e3:9.1f} ms")
    for when in ("before", "after"):
        for label, value in (("median", med), ("min", low)):
            line = (f"  {when:6s} ({label:6s}): a/b = {value[f'{when} hah'] / value[f'{when} plain']:.3f}"
                    f"   a/d = {value[f'{when} hah'] / value['standard']:.3f}")
            if f"{when} reference" in value:
                line += f"   c/a = {value[f'{when} reference'] / value[f'{when} hah']:.3f}"
            print(line)
    print(f"  speed-up (medians) of the HaH step: {med['before hah'] / med['after hah']:.2f}x, "
          f"of the plain step: {med['before plain'] / med['after plain']:.2f}x")


if __name__ == "__main__":
    main()
