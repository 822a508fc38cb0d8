"""Where and in which precision tensors are computed: device choice and autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an unavailable device is a ValueError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps requested but MPS is not available; use --device cpu")
    return device


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device``, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tune_device(device: torch.device | str) -> None:
    """Per-device library settings for training speed: on CUDA, cuDNN autotuning
    (the shapes repeat every step, so the best kernels are found once). Nothing elsewhere."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def rng_kept(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Fork the global RNGs of the CPU and of ``device`` (when CUDA) and restore them on
    exit: code that must reseed them (torchattacks, the benchmark's seeded set-up) leaves
    its caller's random state untouched."""
    dev = torch.device(device)
    return torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else [])


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Compute with ``threads`` CPU threads inside (None: as set), and give the caller
    back its own count after: a worker run in the caller's process leaves it unchanged."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
