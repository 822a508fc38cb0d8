"""Several processes through torchrun: process-group set-up, the DDP wrapper, teardown.

Without a torchrun environment (no WORLD_SIZE) everything here is a no-op and training
runs as one plain process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device, timeout_s: float = 120.0) -> DistEnv:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU), one device per process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv(0, 1, 0, device)
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, world_size, local_rank, device)


def wrapper(env: DistEnv, sync_bn: bool) -> Callable[[nn.Module], nn.Module] | None:
    """The function that wraps a model for this environment (None: use it as it is)."""
    if not env.active:
        return None

    def wrap(model: nn.Module) -> nn.Module:
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    return wrap


def teardown(env: DistEnv) -> None:
    """Leave the process group (if any)."""
    if env.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
