"""Before/after: the HaH training step with the layer and objective code of an older
git revision against the working tree's, in one process, interleaved.

The old ``hahnet/layers.py`` and ``hahnet/hah.py`` are loaded from ``git show REV:...``
as separate modules; a copy of the same model (same weights) is patched to run their
forward passes. Steps (forward + backward + Adam) of both are timed round-robin, with
plain cross-entropy steps of each and of the standard VGG16, and medians are reported.

    .venv/bin/python benchmarks/before_after.py --rev f19fd37 --width 0.25 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
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
from hahnet.nn.layers import DivisiveNorm2d, TopFractionThreshold, WNConv2d


def load_revision(rev: str) -> tuple[types.ModuleType, types.ModuleType]:
    """hahnet.layers and hahnet.hah as they were at ``rev`` (as standalone modules)."""
    root = Path(__file__).resolve().parents[1]
    folder = Path(tempfile.mkdtemp(prefix="hahnet-rev-"))
    modules = []
    for name in ("layers", "hah"):
        source = subprocess.run(["git", "show", f"{rev}:src/hahnet/{name}.py"], cwd=root,
                                check=True, capture_output=True, text=True).stdout
        path = folder / f"old_{name}.py"
        path.write_text(source.replace("from hahnet.layers import", "from old_layers import")
                        .replace("from hahnet.hah import", "from old_hah import"))
        modules.append(path)
    sys.path.insert(0, str(folder))
    loaded = []
    for path in modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        loaded.append(module)
    return loaded[0], loaded[1]


def patch_to_old(model: torch.nn.Module, old_layers, old_hah) -> None:
    """Make the model's HaH layers run the old revision's forward code."""
    for module in model.modules():
        if isinstance(module, DivisiveNorm2d):
            module.forward = types.MethodType(old_layers.DivisiveNorm2d.forward, module)
        elif isinstance(module, TopFractionThreshold):
            module.forward = types.MethodType(old_layers.TopFractionThreshold.forward, module)
        elif isinstance(module, WNConv2d):
            def forward(self, x):
                weight = self.normalized_weight()
                spec = getattr(self, "score_spec", None)  # set by the old objective
                if spec is None or not torch.is_grad_enabled():
                    return F.conv2d(x, weight, None, self.stride, self.padding)
                z, self.last_score = old_hah.scored_conv2d(x, weight, self.stride,
                                                           self.padding, *spec)
                return z
            module.forward = types.MethodType(forward, module)


def old_objective(model: torch.nn.Module):
    """The old revision's objective protocol on a :func:`patch_to_old` model: each HaH
    convolution gets ``score_spec`` and leaves its score in ``last_score``."""
    from hahnet.nn.hah import PAPER_ALPHAS, hah_convs

    convs = hah_convs(model)[: len(PAPER_ALPHAS)]
    for conv in convs:
        conv.score_spec = (0.1, 1.0)

    def objective(x, y):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        for alpha, conv in zip(PAPER_ALPHAS, convs):
            loss = loss - alpha * conv.last_score
            conv.last_score = None
        return logits, loss
    return objective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="f19fd37", help="the 'before' git revision")
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
    old_layers, old_hah = load_revision(args.rev)

    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    new = vgg16(hah=True, width=args.width).train().to(memory_format=fmt)
    old = copy.deepcopy(new)
    patch_to_old(old, old_layers, old_hah)
    std = vgg16(width=args.width).train().to(memory_format=fmt)
    x = torch.rand(args.batch_size, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,))
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" \
        else (lambda: torch.autocast("cpu", enabled=False))

    def make(model, hah: bool):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        objective = None
        if hah:
            objective = old_objective(model) if model is old else HaHObjective(model)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with cast():
                loss = objective(x, y)[1] if objective else F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        return step

    # plain steps use their own copies so the objectives' score hooks stay attached
    new_plain, old_plain = copy.deepcopy(new), copy.deepcopy(new)
    patch_to_old(old_plain, old_layers, old_hah)
    steps = {"before hah": make(old, True), "after hah": make(new, True),
             "before plain": make(old_plain, False), "after plain": make(new_plain, False),
             "standard": make(std, False)}
    if args.reference:
        from hahnet.experiments.bench import ReferenceStep

        for when, model in (("before", copy.deepcopy(old_plain)), ("after", copy.deepcopy(new))):
            if when == "before":
                patch_to_old(model, old_layers, old_hah)
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
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"width {args.width:g}, batch {args.batch_size}, {args.precision}, "
          f"{'channels-last' if args.channels_last else 'NCHW'}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, {args.malloc} malloc, "
          f"median of {args.repeats} interleaved rounds; before = {args.rev}")
    for name, value in med.items():
        print(f"  {name:14s} {value * 1e3:9.1f} ms")
    for when in ("before", "after"):
        line = (f"  {when:6s}: a/b = {med[f'{when} hah'] / med[f'{when} plain']:.3f}   "
                f"a/d = {med[f'{when} hah'] / med['standard']:.3f}")
        if f"{when} reference" in med:
            line += f"   c/a = {med[f'{when} reference'] / med[f'{when} hah']:.3f}"
        print(line)
    print(f"  speed-up of the HaH step: {med['before hah'] / med['after hah']:.2f}x, "
          f"of the plain step: {med['before plain'] / med['after plain']:.2f}x")


if __name__ == "__main__":
    main()
