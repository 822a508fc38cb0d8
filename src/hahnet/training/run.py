"""The life cycle of one training run, shared by ``hahnet train`` and ``reproduce``:
decide which run (fresh or resumed) with which settings, check the run directory, read
the data, build the :class:`~hahnet.training.trainer.Trainer`, record the run and train it.

Under torchrun every rank runs :func:`run_training` (see :mod:`hahnet.training.distributed`):
rank 0 decides what to run and reads the checkpoint, the decision and state are
broadcast, and errors are agreed on so that all ranks stop together. Nothing here
prints: progress goes through :class:`Hooks`.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hahnet.training import checkpoint, distributed
from hahnet.config import TrainConfig
from hahnet.errors import UserError
from hahnet.training.rundir import CONFIG_FILE, RunDir

DEFAULT_DATA = "../shared/data/cifar10-jpeg"
RESULTS_FILE = "results.json"


@dataclass
class Hooks:
    """Where a run reports: ``say`` (one line), ``fit(trainer, quiet)`` (train, with any
    progress display). The defaults are silent."""

    say: Callable[[str], None] = lambda message: None
    fit: Callable[[Any, bool], None] = field(default=lambda trainer, quiet: trainer.fit())


def check_out(path: str | Path | None, kind: str, flag: str = "--out") -> None:
    """Refuse, before any work, an output path that is a file, cannot be written, or holds
    another kind of run. ``kind``: train, eval, reproduce, sweep (directories) or file."""
    if path is None:
        return
    out = Path(path)
    if kind == "file":
        if out.is_dir():
            raise UserError(f"{flag} {out} is a directory; pass a file name such as bench.json")
    elif out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; pass a directory")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise UserError(f"{flag} {out}: cannot write into {existing} (permission denied)")
    if kind == "file" or not out.is_dir():
        return
    training_run = (out / CONFIG_FILE).exists()
    if kind != "train" and training_run:
        raise UserError(f"{flag} {out} holds a training run; pass another directory")
    if kind == "train" and not training_run and (out / RESULTS_FILE).exists():
        raise UserError(f"{flag} {out} holds an evaluation report, not a training run; "
                        f"pass another directory")


def load_data(path: str, cache_dir: str | None = None, download: bool = False,
              say: Callable[[str], None] = lambda message: None):
    """Load a dataset; data errors become one-line UserErrors."""
    from hahnet.data.datasets import DataError, load_dataset

    try:
        dataset = load_dataset(path, cache_dir=cache_dir, download=download)
    except DataError as error:
        raise UserError(str(error)) from None
    say(f"data: {dataset.describe()}")
    return dataset


def _user_error(error: BaseException, message: str | None = None,
                quiet: bool | None = None) -> UserError:
    result = UserError(message or str(error))
    result.quiet = getattr(error, "quiet", False) if quiet is None else quiet
    return result


def resume_dir(resume: str | None, out: str | None) -> Path | None:
    """The run directory to continue (None: a fresh run)."""
    if resume == "auto":
        if out is None:
            raise UserError("--resume auto needs --out DIR (the run directory to continue or create)")
        return Path(out) if (Path(out) / checkpoint.MODEL_FILE).exists() else None
    return Path(resume) if resume is not None else None


def plan(overrides: dict[str, Any], data: str | None, out: str | None,
         resume: str | None) -> dict[str, Any]:
    """Rank 0: which run, with which settings and data (before any data is read)."""
    run_dir = resume_dir(resume, out)
    saved, data_path = None, data
    if run_dir is not None:
        if not RunDir(run_dir).has_checkpoint():
            raise UserError(f"cannot resume {run_dir}: no checkpoint there "
                            f"({CONFIG_FILE} and {checkpoint.MODEL_FILE} expected); "
                            f"start a fresh run with --out {run_dir}")
        try:
            saved, saved_data = RunDir(run_dir).read_config()
        except ValueError as error:
            raise UserError(str(error)) from None
        data_path = data_path or saved_data
    config = TrainConfig.from_dict({**(saved.to_dict() if saved else {}), **overrides})
    out_dir = run_dir or Path(out or f"runs/{config.arch}-{'hah' if config.hah else 'std'}"
                                      f"-w{config.width:g}")
    check_out(out_dir, "train")
    return {"config": config.to_dict(), "data": data_path or DEFAULT_DATA,
            "out_dir": str(out_dir), "resume": run_dir is not None}


def _read_data(env, data: str, cache_dir: str | None, download: bool, say) -> Any:
    """Every rank reads the data (rank 0 reports it); with --download one rank per node
    downloads first, then the others read it."""
    def read() -> Any:
        if env.rank == 0:
            return load_data(data, cache_dir, download, say)
        with contextlib.redirect_stderr(io.StringIO()):
            return load_data(data, cache_dir, download)

    if not (download and env.active):
        return read()
    dataset, failure = None, None
    if env.local_rank == 0:
        try:
            dataset = read()
        except Exception as error:  # noqa: BLE001 - shared by check()
            failure = error
    distributed.check(env, failure)
    return dataset if env.local_rank == 0 else read()


def _build(env, config: TrainConfig, out_dir: Path, data: str, dataset: Any,
           options: dict[str, Any], say) -> Any:
    """Read the data and build the trainer on every rank; a failure anywhere stops all."""
    from hahnet.training.trainer import Trainer

    failure, trainer = None, None
    try:
        if dataset is None:
            dataset = _read_data(env, data, options["cache_dir"], options["download"], say)
        trainer = Trainer(config, dataset, out_dir, env.device, env.rank, env.world_size,
                          wrap=distributed.wrapper(env, options["sync_bn"]))
    except Exception as error:  # noqa: BLE001 - shared by check() below
        if not env.active or isinstance(error, distributed.PeerError) \
                or getattr(error, "quiet", None) is not None or distributed.is_comm_error(error):
            raise
        failure = error
    distributed.check(env, failure)
    split = trainer.train_split
    distributed.same_everywhere(env, (len(split.labels), tuple(split.images.shape[1:]),
                                      split.classes, int(split.labels.sum()),
                                      int(split.images[::max(1, len(split.labels) // 512)]
                                          .sum(dtype=torch.int64))), "training data")
    return trainer


def _setup(device_name: str, dist_timeout: float):
    from hahnet.training.device import resolve_device

    try:
        device = resolve_device(device_name)
    except ValueError as error:  # same on every rank of a node: its local rank 0 reports it
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        raise _user_error(error, quiet=distributed.launched() and local_rank != 0) from None
    try:
        return distributed.setup(device, dist_timeout)
    except ValueError as error:
        raise _user_error(error) from None
    except Exception as error:  # rendezvous failed or timed out
        if not distributed.is_comm_error(error):
            raise
        raise _user_error(error, f"rank {distributed.env_rank()}: cannot join the process group "
                                 f"within --dist-timeout {dist_timeout:g}s: "
                                 f"{' '.join(str(error).split())[:200]}") from None


def _train(env, run: dict[str, Any], options: dict[str, Any], dataset: Any,
           hooks: Hooks, quiet: bool) -> Path:
    config, out_dir = TrainConfig.from_dict(run["config"]), Path(run["out_dir"])
    say = hooks.say if env.rank == 0 else (lambda message: None)
    trainer = _build(env, config, out_dir, run["data"], dataset, options, say)

    def prepare() -> int | None:  # rank 0: load the checkpoint, record the run
        next_epoch = trainer.resume() if run["resume"] else None
        RunDir(out_dir).write_config(config, run["data"])
        return next_epoch

    next_epoch = distributed.from_rank0(env, prepare)
    if next_epoch is not None:
        distributed.broadcast_training_state(env, trainer.model, trainer.optimizer)
        trainer.start_epoch = next_epoch
        say(f"resuming {out_dir} after epoch {next_epoch}/{config.epochs}")
    say(f"training {config.arch} {'HaH' if config.hah else 'standard'} width "
        f"{config.width:g} on {env.device} x{env.world_size} -> {out_dir}")
    options["trainer"] = trainer  # released in run_training's finally
    if config.time_budget is not None:
        from hahnet.training import budget

        say(budget.describe(budget.plan_trainer(trainer)))
    hooks.fit(trainer, quiet or env.rank != 0)
    return out_dir


def run_training(overrides: dict[str, Any], data: str | None, out: str | None,
                 resume: str | None, device_name: str, cache_dir: str | None = None,
                 download: bool = False, sync_bn: bool = False, quiet: bool = False,
                 dist_timeout: float = 120.0, dataset: Any = None,
                 hooks: Hooks | None = None) -> Path:
    """Train (or resume) one run and return its directory. ``dataset``: already loaded
    from ``data`` (one process only), so it is not read again. A UserError with ``quiet``
    set is one that rank 0 reports; the other ranks just exit non-zero."""
    hooks = hooks or Hooks()
    env = _setup(device_name, dist_timeout)
    options = {"cache_dir": cache_dir, "download": download, "sync_bn": sync_bn}
    try:
        run = distributed.from_rank0(env, lambda: plan(overrides, data, out, resume))
        return _train(env, run, options, dataset, hooks, quiet)
    except (UserError, distributed.PeerError) as error:
        raise _user_error(error) from None
    except FloatingPointError as error:  # from the all-reduced loss: every rank has it
        raise _user_error(error, quiet=env.rank != 0) from None
    except (ValueError, checkpoint.CheckpointError) as error:
        raise _user_error(error) from None
    except Exception as error:
        if env.active and distributed.is_comm_error(error):
            raise _user_error(error, distributed.comm_error_message(env, error), False) from None
        raise
    finally:
        options.pop("trainer", None)  # DDP holds the process group: free it first
        distributed.teardown(env)
