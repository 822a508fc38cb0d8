"""Several processes through torchrun: process group, DDP wrapper, synchronized batch
norm, agreement on errors, state broadcast, sharded evaluation, teardown.

Without a torchrun environment (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) everything here
is a no-op and training runs as one plain process.

Rules every collective helper here follows, so that no process waits forever:

* all ranks call the same helpers in the same order (they run the same program on the
  same data);
* code that may fail on only some ranks (reading data, writing checkpoints) is followed
  by :func:`check` (all ranks exchange "ok" or their error, then all raise together) or
  runs on rank 0 inside :func:`from_rank0` (rank 0's result or error is broadcast);
* anything else (a killed peer, a network partition) ends in the process group's
  timeout; :func:`is_comm_error` recognises the resulting exception so the CLI can
  print one line instead of a traceback.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_world_size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class PeerError(RuntimeError):
    """Another rank failed; this rank stops too. ``quiet``: rank 0 already reports it."""

    def __init__(self, message: str, rank: int, quiet: bool) -> None:
        super().__init__(message)
        self.failed_rank = rank
        self.quiet = quiet


# ---------------------------------------------------------------- environment

def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 without one)."""
    return int(os.environ.get("RANK", "0") or 0) if launched() else 0


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(threads: int | None) -> int | None:
    """Intra-op threads for this process: ``threads`` if given, else under torchrun the
    cores this process may use divided by the processes on this node (torchrun's own
    default is 1 thread per process), else None (leave torch's default)."""
    if threads:
        return threads
    if not launched():
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or int(os.environ["WORLD_SIZE"])
    return max(1, _cpu_count() // local)


def setup(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the torchrun process group (nccl on CUDA, gloo otherwise), one device per
    process (``cuda:LOCAL_RANK``). ``timeout_s`` bounds every collective: a dead or hung
    peer makes the others fail after at most that long instead of waiting forever."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return DistEnv(device=device, timeout_s=timeout_s)
    import torch.distributed as dist

    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start "
                         f"several processes with torchrun (torchrun --nproc-per-node N -m "
                         f"hahnet train ...), or unset WORLD_SIZE for one process")
    if timeout_s <= 0:
        raise ValueError(f"--dist-timeout must be positive seconds, got {timeout_s:g}")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world_size
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                             f"CUDA devices on this node: use --nproc-per-node <= "
                             f"{torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"several processes need --device cuda or --device cpu, not "
                         f"{device.type} (gloo cannot exchange {device.type} tensors)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        options: dict[str, Any] = {}
        if backend == "nccl":
            options["device_id"] = device  # eager NCCL init, bound to this process's GPU
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one store across worker restarts: with the default
            # keys a restarted worker may read the killed workers' addresses and fail to
            # connect (or wait), so every attempt gets keys of its own.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  world_size, is_master=False, timeout=timeout)
            options.update(store=dist.PrefixStore(f"hahnet/attempt-{restart}", store),
                           rank=rank, world_size=world_size)
        dist.init_process_group(backend, timeout=timeout, **options)
    return DistEnv(rank, world_size, local_rank, device, local_world_size, timeout_s)


def teardown(env: DistEnv) -> None:
    """Leave the process group (if any). Drop DDP models first: a gloo group still
    referenced at interpreter exit can abort the process (SIGABRT) while shutting down."""
    if env.active:
        import gc

        import torch.distributed as dist

        gc.collect()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group (dead peer) may fail to close: we exit anyway
                pass


# ---------------------------------------------------------------- synchronized batch norm

class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of every rank's batch, on any device (gloo included).

    Statistics are combined in float64 from each rank's (count, mean, variance); the
    backward pass all-reduces sum(dy) and sum(dy * x_hat) so that the input gradient is
    the one of batch norm over the global batch. The weight/bias gradients stay local
    sums: DDP averages them over ranks, which gives the global batch's gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, eps: float,
                momentum: float, group) -> Tensor:
        import torch.distributed as dist

        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        mean64, var64 = mean.double(), var.double()
        stats = torch.cat([mean64 * count, (var64 + mean64 * mean64) * count,
                           torch.tensor([float(count)], dtype=torch.float64, device=x.device)])
        dist.all_reduce(stats, group=group)
        channels = x.shape[1]
        total = stats[-1]
        g_mean = stats[:channels] / total
        g_var = (stats[channels:2 * channels] / total - g_mean * g_mean).clamp_min_(0.0)
        invstd = torch.rsqrt(g_var + eps)
        if running_mean is not None and running_var is not None:
            n = float(total)
            unbiased = g_var * (n / max(n - 1.0, 1.0))
            running_mean.mul_(1.0 - momentum).add_(g_mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        mean_x = g_mean.to(x.dtype).view(shape)
        invstd_x = invstd.to(x.dtype).view(shape)
        x_hat = (x - mean_x) * invstd_x
        out = x_hat
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        ctx.save_for_backward(x, weight, mean_x, invstd_x)
        ctx.total, ctx.group, ctx.dims = float(total), group, dims
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        import torch.distributed as dist

        x, weight, mean_x, invstd_x = ctx.saved_tensors
        dims = ctx.dims
        x_hat = (x - mean_x) * invstd_x
        sum_dy = grad_out.sum(dim=dims, dtype=torch.float64)
        sum_dy_xhat = (grad_out * x_hat).sum(dim=dims, dtype=torch.float64)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            channels = x.shape[1]
            shape = mean_x.shape
            mean_dy = (sums[:channels] / ctx.total).to(x.dtype).view(shape)
            mean_dy_xhat = (sums[channels:] / ctx.total).to(x.dtype).view(shape)
            scale = invstd_x if weight is None else invstd_x * weight.view(shape)
            grad_x = scale * (grad_out - mean_dy - x_hat * mean_dy_xhat)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(grad_out.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every rank's batch (any backend,
    CPU/gloo included, where ``torch.nn.SyncBatchNorm`` needs a GPU). Same parameters,
    buffers and state_dict keys as BatchNorm2d; plain BatchNorm2d in eval mode or when
    no process group with several ranks exists."""

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        running = self.track_running_stats
        return _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.running_mean if running else None,
            self.running_var if running else None, self.eps, momentum, None)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d by its synchronized version, sharing parameters and
    buffers (so an optimizer built before stays valid and checkpoints keep their keys):
    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`SyncBatchNorm2d` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        new = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        replaced = convert_sync_batchnorm(child, device)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def unsynced(module: nn.Module) -> nn.Module:
    """``module`` (a copy: this changes it in place) with every synchronized batch norm
    made a plain, process-local BatchNorm2d again, for work that only one rank does
    (a synchronized one would wait forever for the others)."""
    for child in module.modules():
        if isinstance(child, (SyncBatchNorm2d, nn.SyncBatchNorm)):
            child.__class__ = nn.BatchNorm2d
    return module


def wrapper(env: DistEnv, sync_bn: bool) -> Callable[[nn.Module], nn.Module] | None:
    """The function that wraps a model for this environment (None: use it as it is).

    It first waits at a :func:`check` point, so that a rank that failed earlier (data
    missing on its node...) makes every rank stop instead of hanging in DDP's set-up."""
    if not env.active:
        return None

    def wrap(model: nn.Module) -> nn.Module:
        check(env, None)
        if sync_bn:
            model = convert_sync_batchnorm(model, env.device)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    return wrap


# ---------------------------------------------------------------- agreement

def one_line(error: BaseException) -> str:
    """The first line of an error's message (its type name if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check(env: DistEnv, error: BaseException | None) -> None:
    """Agreement point: every rank passes its error (or None); if any rank failed, all
    raise. The failing rank re-raises its own error (marked ``quiet`` when it is not rank
    0); the others raise :class:`PeerError` naming the first failed rank. One process:
    re-raises ``error`` if given."""
    if not env.active:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    mine = None if error is None else one_line(error)
    reports: list[Any] = [None] * env.world_size
    dist.all_gather_object(reports, mine)
    failed = [(r, m) for r, m in enumerate(reports) if m is not None]
    if not failed:
        return
    if error is not None:
        try:
            error.quiet = not env.is_main  # type: ignore[attr-defined]
        except AttributeError:
            pass
        raise error
    rank, message = failed[0]
    raise PeerError(f"rank {rank} failed: {message}", rank, quiet=not env.is_main)


def from_rank0(env: DistEnv, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, its (picklable) result broadcast to every rank; if it raises,
    rank 0 re-raises and the others raise a quiet :class:`PeerError`."""
    if not env.active:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    error: BaseException | None = None
    if env.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - forwarded to the peers, then re-raised
            error = exc
            box[0] = ("error", one_line(exc))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status != "ok":
        raise PeerError(f"rank 0 failed: {value}", 0, quiet=True)
    return value


def same_everywhere(env: DistEnv, value: Any, what: str) -> None:
    """Raise on every rank (quietly except rank 0) if ``value`` differs between ranks."""
    if not env.active:
        return
    import torch.distributed as dist

    values: list[Any] = [None] * env.world_size
    dist.all_gather_object(values, value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        error = ValueError(f"{what} differs between ranks (rank 0: {values[0]}; rank "
                           f"{odd[0]}: {values[odd[0]]}); give every node the same {what}")
        error.quiet = not env.is_main  # type: ignore[attr-defined]
        raise error


def broadcast_training_state(env: DistEnv, model: nn.Module,
                             optimizer: torch.optim.Optimizer | None = None) -> None:
    """Copy rank 0's weights, buffers and optimizer state to every rank (after a resume
    that only rank 0 read from disk: nodes need no shared file system)."""
    if not env.active:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    if optimizer is not None:
        box: list[Any] = [None]
        if env.is_main:
            state = optimizer.state_dict()
            box[0] = {"state": {k: {n: v.detach().cpu() if torch.is_tensor(v) else v
                                    for n, v in slots.items()}
                                for k, slots in state["state"].items()},
                      "param_groups": state["param_groups"]}
        dist.broadcast_object_list(box, src=0)
        if not env.is_main:
            optimizer.load_state_dict(box[0])


def broadcast_buffers(env: DistEnv, model: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) to every rank, so that evaluation
    shards and rank 0's checkpoint use the same model."""
    if not env.active:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# ---------------------------------------------------------------- sharded evaluation

def shard(n: int, env: DistEnv, align: int = 1) -> slice:
    """This rank's contiguous part of ``range(n)``. With ``align`` > 1 the parts are
    whole blocks of ``align`` items (so each rank evaluates exactly the batches one
    process would); ranks past the end get empty slices."""
    if not env.active:
        return slice(0, n)
    align = max(1, align)
    blocks = -(-n // align)
    lo = blocks * env.rank // env.world_size
    hi = blocks * (env.rank + 1) // env.world_size
    return slice(min(lo * align, n), min(hi * align, n))


def all_reduce_sum(tensor: Tensor, env: DistEnv) -> Tensor:
    """Sum of ``tensor`` over ranks, in place (and returned); identity in one process."""
    if env.active:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def sum_over_shards(env: DistEnv, n: int, batch_size: int,
                    local: Callable[[slice], Tensor]) -> Tensor:
    """``local(part)`` on this rank's :func:`shard` of whole batches of ``range(n)``,
    summed over ranks (on the CPU). If ``local`` fails on any rank, every rank raises
    (see :func:`check`) instead of waiting for the sum. One process: ``local(0:n)``."""
    part = shard(n, env, align=batch_size)
    if not env.active:
        return local(part)
    value, failure = None, None
    try:
        value = local(part)
    except Exception as error:  # noqa: BLE001 - re-raised by check()
        failure = error
    check(env, failure)
    return all_reduce_sum(value.to(env.device), env).cpu()


# ---------------------------------------------------------------- communication failures

def is_comm_error(error: BaseException) -> bool:
    """Whether ``error`` comes from a collective or the rendezvous: a dead, hung or
    unreachable peer, or a timeout."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(key in text.lower() for key in (
        "connection closed", "connection reset", "connection refused", "timed out", "timeout",
        "pair closure", "gloo", "nccl", "broken pipe", "processgroup", "socket"))


def comm_error_message(env: DistEnv, error: BaseException) -> str:
    """One line for a failed collective: which rank, what happened, what to do."""
    detail = " ".join(str(error).split())
    detail = re.sub(r"^\[[^\]]*\.(cc|cpp|h|py):\d+\]\s*", "", detail)  # gloo's source location
    detail = detail.split(". ")[0][:200]
    return (f"rank {env.rank}: lost contact with the other processes (a peer died, hung for "
            f"more than --dist-timeout {env.timeout_s:g}s, or is unreachable): {detail}; "
            f"restart with torchrun --max-restarts N ... --resume auto to continue from the "
            f"last checkpoint")
