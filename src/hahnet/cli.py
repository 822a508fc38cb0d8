"""The ``hahnet`` command: ``train``, ``eval``, ``reproduce``, ``presets``, ``bench``.

This module parses flags, prints progress and one-line errors, and calls the library;
the library itself never prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

DEFAULT_DATA = "../shared/data/cifar10-jpeg"


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


def parse_floats(text: str) -> tuple[float, ...]:
    """'0.1,0.2' or '2/255' -> floats (fractions allowed, for epsilons)."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "/" in part:
                num, den = part.split("/", 1)
                values.append(float(num) / float(den))
            else:
                values.append(float(part))
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"not a number or list of numbers: {text!r}") from None
    return tuple(values)


def configure_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def load_data(path: str, cache_dir: str | None = None, download: bool = False):
    """Load a dataset, printing what was found; data errors become one-line UserErrors."""
    from hahnet.data import DataError, load_dataset

    try:
        dataset = load_dataset(path, cache_dir=cache_dir, download=download)
    except DataError as error:
        raise UserError(str(error)) from None
    print(f"data: {dataset.describe()}", file=sys.stderr)
    return dataset


# ---------------------------------------------------------------- train

TRAIN_OPTIONS = {  # flag -> TrainConfig field, parsed type
    "model": ("arch", str), "width": ("width", float), "hah_layers": ("hah_layers", int),
    "sigma": ("sigma", float), "keep": ("keep", float), "alphas": ("alphas", parse_floats),
    "ratio": ("ratio", float), "demote": ("demote", float), "epochs": ("epochs", int),
    "batch_size": ("batch_size", int), "lr": ("lr", float),
    "milestones": ("milestones", parse_floats), "gamma": ("gamma", float),
    "seed": ("seed", int), "limit_train": ("limit_train", int),
    "holdout": ("holdout", float), "precision": ("precision", str),
}


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``train`` and ``reproduce`` (all default to None = not given)."""
    group = parser.add_argument_group("model and recipe (defaults: the paper's)")
    group.add_argument("--model", choices=["vgg11", "vgg13", "vgg16", "vgg19"])
    group.add_argument("--width", type=float, help="channel multiplier (1.0 = 64..512)")
    group.add_argument("--hah", action=argparse.BooleanOptionalAction, default=None,
                       help="HaH network and objective (--no-hah: standard VGG)")
    group.add_argument("--hah-layers", type=int, help="leading convolutions that are HaH blocks (6)")
    group.add_argument("--sigma", type=float, help="divisive normalization sigma (0.1)")
    group.add_argument("--keep", type=float, help="fraction kept by the threshold (0.2)")
    group.add_argument("--alphas", type=parse_floats, help="HaH weights per layer, comma-separated")
    group.add_argument("--ratio", type=float, help="HaH winner ratio K/C (0.1)")
    group.add_argument("--demote", type=float, help="weight of the losers' mean (1.0)")
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int, help="global batch size (128)")
    group.add_argument("--lr", type=float, help="Adam learning rate (1e-3)")
    group.add_argument("--milestones", type=parse_floats,
                       help="lr x gamma at these fractions of the epochs (0.6,0.8)")
    group.add_argument("--gamma", type=float, help="lr decay factor (0.1)")
    group.add_argument("--seed", type=int, help="seed (2022)")
    group.add_argument("--limit-train", type=int, help="train on a fixed seeded subset of N images")
    group.add_argument("--holdout", type=float,
                       help="hold out this fraction of the training set and report accuracy on it")
    group.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    speed = parser.add_argument_group("speed")
    speed.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    speed.add_argument("--precision", choices=["fp32", "bf16"])
    speed.add_argument("--channels-last", action="store_true", default=None)
    speed.add_argument("--compile", action="store_true", default=None)
    speed.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line."""
    overrides = {field: getattr(args, flag) for flag, (field, _) in TRAIN_OPTIONS.items()
                 if getattr(args, flag, None) is not None}
    for flag in ("hah", "augment", "channels_last", "compile"):
        if getattr(args, flag, None) is not None:
            overrides[flag] = getattr(args, flag)
    return overrides


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a standard or HaH VGG",
                                   description="Train a standard or HaH VGG; checkpoints after "
                                               "every epoch into --out, resumable.")
    parser.add_argument("--data", help=f"dataset path (default {DEFAULT_DATA})")
    parser.add_argument("--cache-dir", help="where decoded image folders are cached")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 if --data is missing")
    parser.add_argument("--out", help="run directory (default runs/<model>-<hah|std>-w<width>)")
    parser.add_argument("--resume", metavar="DIR|auto",
                        help="continue the run in DIR ('auto': the --out dir if it has a checkpoint)")
    parser.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard")
    parser.add_argument("--sync-bn", action="store_true",
                        help="SyncBatchNorm across processes (no-op in one process)")
    add_train_options(parser)
    parser.set_defaults(func=cmd_train)


def run_training(overrides: dict[str, Any], data: str | None, out: str | None,
                 resume: str | None, device_name: str, cache_dir: str | None = None,
                 download: bool = False, tensorboard: bool = False, sync_bn: bool = False,
                 quiet: bool = False) -> Path:
    """Train (or resume) one run and return its directory; shared by train and reproduce."""
    from hahnet import checkpoint, distributed
    from hahnet.train import CONFIG_FILE, TrainConfig, Trainer, resolve_device

    run_dir = Path(resume) if resume not in (None, "auto") else None
    if resume == "auto":
        if out is None:
            raise UserError("--resume auto needs --out DIR (the run directory to continue or create)")
        run_dir = Path(out) if (Path(out) / checkpoint.MODEL_FILE).exists() else None
    saved: dict[str, Any] = {}
    if run_dir is not None:
        if not (run_dir / CONFIG_FILE).exists() or not (run_dir / checkpoint.MODEL_FILE).exists():
            raise UserError(f"cannot resume {run_dir}: no checkpoint there "
                            f"({CONFIG_FILE} and {checkpoint.MODEL_FILE} expected); "
                            f"start a fresh run with --out {run_dir}")
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        data = data or saved.get("data")
    try:
        config = TrainConfig.from_dict({**saved.get("config", {}), **overrides})
    except (ValueError, TypeError) as error:
        raise UserError(str(error)) from None
    data = data or DEFAULT_DATA
    out_dir = run_dir or Path(out or f"runs/{config.arch}-{'hah' if config.hah else 'std'}"
                                      f"-w{config.width:g}")
    env = distributed.setup(resolve_device(device_name))
    try:
        dataset = load_data(data, cache_dir, download)
        trainer = Trainer(config, dataset, out_dir, env.device, env.rank, env.world_size,
                          wrap=distributed.wrapper(env, sync_bn))
        if run_dir is not None:
            next_epoch = trainer.resume()
            say(env, f"resuming {out_dir} at epoch {next_epoch}/{config.epochs}")
        if env.rank == 0:
            checkpoint.write_json(out_dir / CONFIG_FILE, {"config": config.to_dict(), "data": data})
        say(env, f"training {config.arch} {'HaH' if config.hah else 'standard'} width "
                 f"{config.width:g} on {env.device} x{env.world_size} -> {out_dir}")
        fit_with_progress(trainer, quiet or env.rank != 0, tensorboard and env.rank == 0)
    except (ValueError, checkpoint.CheckpointError, FloatingPointError) as error:
        raise UserError(str(error)) from None
    finally:
        distributed.teardown(env)
    return out_dir


def say(env, message: str) -> None:
    if env.rank == 0:
        print(message, file=sys.stderr)


def fit_with_progress(trainer, quiet: bool, tensorboard: bool) -> None:
    """Run ``trainer.fit`` under a tqdm bar showing loss, accuracy and images/s."""
    from tqdm import tqdm

    writer = None
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(trainer.out_dir / "tensorboard"))
        except ImportError:
            print("tensorboard is not installed; skipping TensorBoard logging", file=sys.stderr)
    total = trainer.steps_per_epoch() * trainer.config.batch_size
    state: dict[str, Any] = {"bar": None, "step": 0}

    def on_step(images: int, loss) -> None:
        bar = state["bar"]
        if bar is None:
            epoch = trainer.start_epoch + state.get("epochs_done", 0)
            bar = state["bar"] = tqdm(total=total, unit="img", disable=quiet, leave=False,
                                      desc=f"epoch {epoch + 1}/{trainer.config.epochs}",
                                      dynamic_ncols=True)
        state["step"] += 1
        if state["step"] % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
        bar.update(images)

    def on_epoch(m) -> None:
        if state["bar"] is not None:
            state["bar"].close()
        state["bar"] = None
        state["epochs_done"] = state.get("epochs_done", 0) + 1
        scores = " ".join(f"{s:.3f}" for s in m.hah_scores)
        if not quiet:
            tqdm.write(f"epoch {m.epoch + 1}/{trainer.config.epochs}: loss {m.train_loss:.4f} "
                       f"train {m.train_acc:.2%} {m.eval_split} {m.eval_acc:.2%} lr {m.lr:.1e} "
                       f"{m.seconds:.0f}s {m.images_per_second:.0f} img/s"
                       + (f" HaH {scores}" if scores else ""), file=sys.stderr)
        if writer is not None:
            for key in ("train_loss", "train_acc", "eval_acc", "lr", "images_per_second"):
                writer.add_scalar(key, getattr(m, key), m.epoch)
            for i, s in enumerate(m.hah_scores):
                writer.add_scalar(f"hah_score/layer{i}", s, m.epoch)

    try:
        trainer.fit(on_step, on_epoch)
    finally:
        if state["bar"] is not None:
            state["bar"].close()
        if writer is not None:
            writer.close()


def cmd_train(args: argparse.Namespace) -> int:
    configure_threads(args.threads)
    out = run_training(train_overrides(args), args.data, args.out, args.resume, args.device,
                       args.cache_dir, args.download, args.tensorboard, args.sync_bn)
    print(f"checkpoint: {out}")
    return 0


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hahnet", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    for name in ("add_eval_parser", "add_bench_parser", "add_reproduce_parser"):
        if name in globals():
            globals()[name](subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as error:
        print(f"hahnet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hahnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
