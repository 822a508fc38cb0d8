"""Speed benchmark: the HaH training step against plain training and against the
authors' reference procedure, the HaH building blocks alone, and evaluation throughput.

One call of :func:`run_benchmark` measures, for every (width, precision, memory format)
configuration, in one process:

(a) ``hah``: one training step of the HaH network (``model``, VGG16 by default; any name
    of :func:`hahnet.list_models`) with :class:`~hahnet.nn.hah.HaHObjective`
    (forward + backward + Adam step);
(b) ``plain``: one cross-entropy step of the same HaH network (no HaH score);
(c) ``reference``: one step of the authors' procedure on the same network: HaH forward,
    one HaH backward per layer in reverse order with that layer's weight gradient zeroed
    first, then a second forward and the cross-entropy backward (+ Adam step);
(d) ``standard``: one cross-entropy step of the standard network of the same width;
(e) forward + backward of DivisiveNorm2d, TopFractionThreshold and WNConv2d alone at each
    VGG16 resolution (32, 16, 8) with the HaH channel counts (64, 128, 256) x width, and
    of a HaH block's whole activation after its convolution (ReLU, normalization,
    threshold: fused into one pass on a CPU, :func:`hahnet.nn.fused.hah_activation`);
(f) evaluation throughput of the HaH network: clean images/s, and APGD-CE
    iterations x images / s (torchattacks.APGD, l_inf 2/255, a few steps).

Timings are wall-clock medians over ``repeats`` rounds after ``warmup`` untimed rounds;
within a round the variants run one after the other (a, b, c, d, a, b, c, d, ...), so
that load from other processes hits all of them alike. Ratios a/b, c/a and a/d are
computed from the medians.

The library never prints; :func:`hahnet.reporting.bench.format_report` renders the result as a table and
``hahnet bench`` (:mod:`hahnet.cli.commands`) parses the flags and prints it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hahnet.config import _check, default_alphas, PAPER_ALPHAS, PAPER_DEMOTE, PAPER_EPS, PAPER_RATIO
from hahnet.training.device import autocast, rng_kept, tune_device
from hahnet.nn.hah import HaHObjective, hah_convs, reference_score
from hahnet.nn.layers import (DivisiveNorm2d, TopFractionThreshold, WNConv2d,
                              hah_block_activation)
from hahnet.nn.models import create_model, list_models, scaled

TARGETS = {  # ratio -> (comparison, bound, where it applies)
    "hah_over_plain": ("<=", 1.10, "all widths"),
    "reference_over_hah": (">=", 3.0, "all widths"),
    "hah_over_standard": ("<=", 1.5, "width 1.0"),
}
STEPS = ("hah", "plain", "reference", "standard")
BLOCKS = ("DivisiveNorm2d", "TopFractionThreshold", "WNConv2d", "HaHActivation")
RESOLUTIONS = ((32, 64), (16, 128), (8, 256))  # VGG16 resolution -> HaH channels at width 1


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. The defaults are the full run (under 10 minutes on 2 CPU cores)."""

    widths: tuple[float, ...] = (0.25, 1.0)
    batch_size: int = 128
    precisions: tuple[str, ...] = ("fp32",)
    channels_last: tuple[bool, ...] = (False,)
    repeats: int = 5
    warmup: int = 1
    block_repeats: int = 5
    eval_batches: int = 3
    apgd_steps: int = 5
    apgd_batch_size: int = 32
    sections: tuple[str, ...] = ("steps", "blocks", "eval")
    seed: int = 0
    clock: str = "wall"
    device: str = "cpu"  # cpu or cuda[:N]; on CUDA each timing ends with a device sync
    model: str = "vgg16"  # the network of (a)-(d) and (f): a name of hahnet.list_models()

    def __post_init__(self) -> None:
        sections = ("steps", "blocks", "eval")
        kind = str(self.device).split(":")[0]
        cuda_missing = kind == "cuda" and not torch.cuda.is_available()
        _check("benchmark config", [
            ("device", self.device, kind in ("cpu", "cuda"), "cpu or cuda"),
            ("model", self.model, self.model in list_models(), "one of " + ", ".join(list_models())),
            ("clock", self.clock, not (kind == "cuda" and self.clock == "cpu"),
             "wall on cuda (cpu measures host CPU time)"),
            ("device", self.device, not cuda_missing, "cpu here: CUDA is not available"),
            ("widths", self.widths, bool(self.widths) and all(w > 0 for w in self.widths),
             "positive"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("precisions", self.precisions, bool(self.precisions)
             and all(p in ("fp32", "bf16") for p in self.precisions), "fp32 and/or bf16"),
            ("repeats", self.repeats, self.repeats >= 1, ">= 1"),
            ("warmup", self.warmup, self.warmup >= 0, ">= 0"),
            ("block_repeats", self.block_repeats, self.block_repeats >= 1, ">= 1"),
            ("eval_batches", self.eval_batches, self.eval_batches >= 1, ">= 1"),
            ("apgd_steps", self.apgd_steps, self.apgd_steps >= 1, ">= 1"),
            ("apgd_batch_size", self.apgd_batch_size, self.apgd_batch_size >= 1, ">= 1"),
            ("clock", self.clock, self.clock in ("wall", "cpu"), "wall or cpu"),
            ("sections", self.sections, bool(self.sections)
             and set(self.sections) <= set(sections), "among steps, blocks, eval"),
        ])

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchConfig":
        """A small configuration (tiny width and batch) that runs in seconds: for tests."""
        values = dict(widths=(0.0625,), batch_size=8, repeats=2, warmup=1, block_repeats=2,
                      eval_batches=1, apgd_steps=2, apgd_batch_size=4)
        values.update(overrides)
        return cls(**values)


# -------------------------------------------------------------------- allocator


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc malloc only): no mmap for large blocks and
    no trimming of the heap. By default glibc serves blocks above 32 MiB (and, depending on
    history, smaller ones) with fresh mmaps, so every new activation-sized tensor costs a
    page fault per 4 KiB and the kernel's zeroing; on CPU that can cost as much as the
    arithmetic of the op that allocated it. Same effect as starting Python with
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<large>``.
    Returns False where it cannot be applied (not glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    global _MALLOC_TUNED
    _MALLOC_TUNED = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
    return _MALLOC_TUNED


# ----------------------------------------------------------------------- timing


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                     clock: str = "wall", device: str = "cpu") -> dict[str, list[float]]:
    """Seconds of each function over ``repeats`` interleaved rounds, after ``warmup``
    untimed rounds. ``clock``: "wall" (perf_counter) or "cpu" (this process's CPU time,
    user + system: with one thread it ignores the time spent waiting for a core that other
    processes hold, so it is the steadier measure on a shared machine)."""
    now = CLOCKS[clock]
    sync = device_sync(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()  # on CUDA: the queue is empty when the clock starts...
            started = now()
            fn()
            sync()  # ...and the function's kernels have finished when it stops
            times[name].append(now() - started)
    return times


def device_sync(device: str) -> Callable[[], None]:
    """What waits for ``device``'s queued work: torch.cuda.synchronize on CUDA (kernels
    run asynchronously, so a host clock alone would time the launches), nothing on CPU."""
    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def summary(times: Sequence[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times),
            "times_s": [round(t, 6) for t in times]}


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# ------------------------------------------------------------ the training steps


class ReferenceStep:
    """One training step of the authors' procedure on a HaH network.

    1. forward, keeping every HaH convolution's output z_l;
    2. for l from the last HaH layer to the first: zero W_l's gradient, then backward
       ``-alpha_l * H_l(z_l)`` (retaining the graph), and set W_l's HaH gradient aside;
    3. zero all gradients, forward again and backward the cross-entropy;
    4. add the HaH gradients to the HaH layers' weight gradients and take the optimizer step.

    Gives the same gradient as :class:`HaHObjective` (see tests/test_hah.py) at the cost
    of two forwards and ``1 + len(alphas)`` backwards.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 alphas: Sequence[float] = PAPER_ALPHAS, ratio: float = PAPER_RATIO,
                 demote: float = PAPER_DEMOTE) -> None:
        self.model, self.optimizer = model, optimizer
        self.convs = hah_convs(model)[: len(alphas)]
        self.alphas, self.ratio, self.demote = tuple(alphas), ratio, demote
        self.device = next(model.parameters()).device.type

    def __call__(self, x: Tensor, y: Tensor, precision: str = "fp32") -> Tensor:
        outputs: dict[int, Tensor] = {}
        hooks = [conv.register_forward_hook(
            lambda module, inputs, output, key=j: outputs.__setitem__(key, output))
            for j, conv in enumerate(self.convs)]
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.device, precision):
                self.model(x)
        finally:
            for hook in hooks:
                hook.remove()
        hah_grads = []
        for j in reversed(range(len(self.convs))):
            self.convs[j].weight.grad = None
            with autocast(self.device, precision):
                cost = -self.alphas[j] * reference_score(outputs[j], self.ratio, self.demote)
            cost.backward(retain_graph=j > 0)
            hah_grads.append(self.convs[j].weight.grad)
        outputs.clear()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, precision):
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        for conv, grad in zip(reversed(self.convs), hah_grads):
            conv.weight.grad.add_(grad)
        self.optimizer.step()
        return loss.detach()


def step_functions(width: float, batch_size: int, precision: str, channels_last: bool,
                   seed: int, device: str = "cpu", model: str = "vgg16"
                   ) -> dict[str, Callable[[], Any]]:
    """The four training steps (a)-(d) of ``model`` as closures over their own models and
    data (one alpha per HaH layer: the paper's, as training uses them)."""
    torch.manual_seed(seed)
    fmt = memory_format(channels_last)
    x = torch.rand(batch_size, 3, 32, 32).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,)).to(device)
    hah_model = create_model(model, hah=True, width=width).train().to(device, memory_format=fmt)
    hah_optimizer = torch.optim.Adam(hah_model.parameters(), lr=1e-3)
    alphas = default_alphas(len(hah_convs(hah_model)))
    objective = HaHObjective(hah_model, alphas)
    reference = ReferenceStep(hah_model, hah_optimizer, alphas)
    std_model = create_model(model, hah=False, width=width).train().to(device, memory_format=fmt)
    std_optimizer = torch.optim.Adam(std_model.parameters(), lr=1e-3)

    def hah_step() -> None:
        hah_optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            _, loss = objective(x, y)
        loss.backward()
        hah_optimizer.step()

    def plain_step() -> None:
        hah_optimizer.zero_grad(set_to_none=True)  # the same network, without the objective
        with autocast(device, precision):
            loss = F.cross_entropy(hah_model(x), y)
        loss.backward()
        hah_optimizer.step()

    def reference_step() -> None:
        reference(x, y, precision)

    def standard_step() -> None:
        std_optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.cross_entropy(std_model(x), y)
        loss.backward()
        std_optimizer.step()

    return {"hah": hah_step, "plain": plain_step, "reference": reference_step,
            "standard": standard_step}


# ------------------------------------------------------------------ the blocks


class HaHActivation(nn.Module):
    """What a HaH block computes after its convolution (ReLU, divisive normalization,
    threshold), as the block runs it (fused on a CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.relu, self.divnorm, self.threshold = nn.ReLU(), DivisiveNorm2d(), TopFractionThreshold()

    def forward(self, z: Tensor) -> Tensor:
        return hah_block_activation(z, self.relu, self.divnorm, self.threshold)


def block_functions(width: float, batch_size: int, precision: str, channels_last: bool,
                    seed: int, device: str = "cpu"
                    ) -> dict[str, tuple[dict[str, Any], Callable[[], Any]]]:
    """Forward + backward of each HaH building block at each VGG16 resolution."""
    torch.manual_seed(seed)
    fmt = memory_format(channels_last)
    fns: dict[str, tuple[dict[str, Any], Callable[[], Any]]] = {}
    for resolution, base in RESOLUTIONS:
        channels = scaled(base, width)
        # Realistic inputs: the normalization and the threshold see rectified activations.
        x = torch.relu(torch.randn(batch_size, channels, resolution, resolution)).to(device)
        x = x.contiguous(memory_format=fmt).requires_grad_()
        modules = {"DivisiveNorm2d": DivisiveNorm2d(), "TopFractionThreshold": TopFractionThreshold(),
                   "WNConv2d": WNConv2d(channels, channels).to(device, memory_format=fmt),
                   "HaHActivation": HaHActivation()}
        for name, module in modules.items():
            params = [p for p in module.parameters()]

            def run(module=module, x=x, params=params) -> None:
                with autocast(device, precision):
                    out = module(x)
                grad = torch.ones_like(out)
                torch.autograd.grad(out, [x, *params], grad)

            info = {"block": name, "resolution": resolution, "channels": channels,
                    "batch_size": batch_size}
            fns[f"{name}@{resolution}"] = (info, run)
    return fns


# ------------------------------------------------------------------- evaluation


def eval_throughput(width: float, batch_size: int, precision: str, channels_last: bool,
                    batches: int, apgd_steps: int, apgd_batch_size: int,
                    seed: int, clock: str = "wall", device: str = "cpu",
                    name: str = "vgg16") -> dict[str, Any]:
    """Clean images/s and APGD-CE iterations x images / s of the eval-mode HaH network."""
    torch.manual_seed(seed)
    fmt = memory_format(channels_last)
    model = create_model(name, hah=True, width=width).eval().to(device, memory_format=fmt)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(batch_size, 3, 32, 32).to(device).contiguous(memory_format=fmt)

    def clean() -> None:
        with torch.no_grad(), autocast(device, precision):
            model(x)

    clean()  # warm-up
    times = time_interleaved({"clean": clean}, batches, 0, clock, device)["clean"]
    result: dict[str, Any] = {"clean": {**summary(times),
                                        "images_per_s": batch_size / statistics.median(times),
                                        "batch_size": batch_size}}
    try:
        import torchattacks
    except ImportError:
        result["apgd"] = {"skipped": "torchattacks is not installed"}
        return result

    class Wrapped(nn.Module):  # the attack runs the model under the benchmark's precision
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, images: Tensor) -> Tensor:
            with autocast(device, precision):
                return self.inner(images.contiguous(memory_format=fmt)).float()

    wrapped = Wrapped().eval()
    attack = torchattacks.APGD(wrapped, norm="Linf", eps=PAPER_EPS["Linf"], steps=apgd_steps,
                               n_restarts=1, loss="ce", seed=seed)
    images = torch.rand(apgd_batch_size, 3, 32, 32).to(device)
    with torch.no_grad():  # APGD only attacks correctly classified images: make them all so
        labels = wrapped(images).argmax(dim=1)

    def apgd() -> None:
        attack(images, labels)

    apgd()  # warm-up
    times = time_interleaved({"apgd": apgd}, batches, 0, clock, device)["apgd"]
    result["apgd"] = {**summary(times), "steps": apgd_steps, "batch_size": apgd_batch_size,
                      "iter_images_per_s": apgd_steps * apgd_batch_size / statistics.median(times)}
    return result


# -------------------------------------------------------------------- the run


def machine_info(device: str = "cpu") -> dict[str, Any]:
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu": model, "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags.split(),
            "amx_bf16": "amx_bf16" in flags.split(), "device": str(device),
            **({"gpu": torch.cuda.get_device_name(device),
                "cuda": torch.version.cuda} if torch.device(device).type == "cuda" else {})}


def machine_load() -> float | None:
    """The 1-minute load average (other processes and our own), where the OS reports it."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def ratios(steps: dict[str, dict[str, Any]]) -> dict[str, float]:
    median = {name: entry["median_s"] for name, entry in steps.items()}
    out = {}
    if "hah" in median and "plain" in median:
        out["hah_over_plain"] = median["hah"] / median["plain"]
    if "reference" in median and "hah" in median:
        out["reference_over_hah"] = median["reference"] / median["hah"]
    if "hah" in median and "standard" in median:
        out["hah_over_standard"] = median["hah"] / median["standard"]
    return out


_MALLOC_TUNED = False


def run_benchmark(config: BenchConfig, progress: Callable[[str], None] | None = None
                  ) -> dict[str, Any]:
    """Measure everything ``config`` asks for; returns a JSON-serializable dict."""
    say = progress or (lambda message: None)
    started = time.perf_counter()
    tune_device(config.device)  # as training does: cuDNN autotuning on CUDA
    busy = machine_load()
    if busy is not None and config.clock == "wall" and busy > (os.cpu_count() or 1) - 0.5:
        say(f"warning: the machine is busy (load {busy:.1f} on {os.cpu_count()} cores): "
            f"wall-clock timings with {torch.get_num_threads()} threads stall on every "
            f"parallel op; for steady ratios use --threads 1 --clock cpu")
    with rng_kept(config.device):  # the sections seed the global RNGs; the caller's stay
        runs = measure_runs(config, say)
    machine = {**machine_info(config.device), "malloc": "tuned" if _MALLOC_TUNED else "default"}
    machine["load_average_at_start"] = busy
    return {"machine": machine, "config": asdict(config), "runs": runs,
            "targets": {k: {"compare": c, "bound": b, "applies": a}
                        for k, (c, b, a) in TARGETS.items()},
            "seconds": time.perf_counter() - started}


def measure_runs(config: BenchConfig, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every (width, precision, layout) combination's measured sections."""
    runs = []
    for width in config.widths:
        for precision in config.precisions:
            for channels_last in config.channels_last:
                label = f"width {width:g} {precision} {'channels-last' if channels_last else 'NCHW'}"
                run: dict[str, Any] = {"model": config.model, "width": width,
                                       "precision": precision,
                                       "channels_last": channels_last,
                                       "batch_size": config.batch_size}
                if "steps" in config.sections:
                    say(f"{label}: training steps (a)-(d), {config.warmup} warm-up + "
                        f"{config.repeats} timed rounds")
                    fns = step_functions(width, config.batch_size, precision, channels_last,
                                         config.seed, config.device, config.model)
                    times = time_interleaved(fns, config.repeats, config.warmup,
                                             config.clock, config.device)
                    run["steps"] = {name: summary(t) for name, t in times.items()}
                    run["ratios"] = ratios(run["steps"])
                    del fns
                if "blocks" in config.sections:
                    say(f"{label}: blocks (e)")
                    blocks = block_functions(width, config.batch_size, precision, channels_last,
                                             config.seed, config.device)
                    times = time_interleaved({k: fn for k, (_, fn) in blocks.items()},
                                             config.block_repeats, 1, config.clock,
                                             config.device)
                    run["blocks"] = [{**info, **summary(times[key])}
                                     for key, (info, _) in blocks.items()]
                if "eval" in config.sections:
                    say(f"{label}: evaluation throughput (f)")
                    run["eval"] = eval_throughput(width, config.batch_size, precision,
                                                  channels_last, config.eval_batches,
                                                  config.apgd_steps, config.apgd_batch_size,
                                                  config.seed, config.clock, config.device,
                                                  config.model)
                runs.append(run)
    return runs
