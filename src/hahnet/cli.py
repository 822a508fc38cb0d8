"""The ``hahnet`` command: ``train``, ``eval``, ``reproduce``, ``presets``, ``bench``.

This module parses flags, prints progress and one-line errors, and calls the library;
the library itself never prints.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from hahnet import corruption_cli

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


def parse_epochs(text: str) -> tuple[int, ...]:
    """'10,20,40' -> (10, 20, 40): 1-based epoch numbers."""
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of epochs: {text!r}") from None


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
    "snapshots": ("snapshots", parse_epochs),
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
    group.add_argument("--snapshots", type=parse_epochs, metavar="E1,E2,...",
                       help="also keep the weights after these epochs (RUN/snapshots/epochE."
                            "safetensors; evaluate them as RUN@E)")
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
    parser.add_argument("--dist-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="under torchrun: give up on a dead or hung peer after this long (120)")
    add_train_options(parser)
    parser.set_defaults(func=cmd_train)


def run_training(overrides: dict[str, Any], data: str | None, out: str | None,
                 resume: str | None, device_name: str, cache_dir: str | None = None,
                 download: bool = False, tensorboard: bool = False, sync_bn: bool = False,
                 quiet: bool = False, dist_timeout: float = 120.0, dataset: Any = None) -> Path:
    """Train (or resume) one run and return its directory; shared by train and reproduce.
    ``dataset``: already loaded from ``data`` (one process only), so it is not read again.

    Under torchrun every rank runs this (see :mod:`hahnet.distributed`): rank 0 decides
    what to run and reads the checkpoint, the decision and state are broadcast, and errors
    are agreed on so that all ranks stop together. A UserError with ``quiet`` set is one
    that rank 0 reports; the other ranks just exit non-zero.
    """
    import contextlib
    import io

    from hahnet import checkpoint, distributed
    from hahnet.device import resolve_device
    from hahnet.config import TrainConfig
    from hahnet.rundir import CONFIG_FILE, RunDir
    from hahnet.train import Trainer

    def user_error(error: BaseException, message: str | None = None,
                   quiet_error: bool | None = None) -> UserError:
        result = UserError(message or str(error))
        result.quiet = getattr(error, "quiet", False) if quiet_error is None else quiet_error
        return result

    try:
        device = resolve_device(device_name)
    except ValueError as error:  # same on every rank of a node: its local rank 0 reports it
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        raise user_error(error, quiet_error=distributed.launched() and local_rank != 0) from None

    def plan() -> dict[str, Any]:  # rank 0: which run, with which settings and data
        run_dir = Path(resume) if resume not in (None, "auto") else None
        if resume == "auto":
            if out is None:
                raise UserError("--resume auto needs --out DIR (the run directory to continue or create)")
            run_dir = Path(out) if (Path(out) / checkpoint.MODEL_FILE).exists() else None
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
        try:
            config = TrainConfig.from_dict({**(saved.to_dict() if saved else {}), **overrides})
        except (ValueError, TypeError) as error:
            raise UserError(str(error)) from None
        out_dir = run_dir or Path(out or f"runs/{config.arch}-{'hah' if config.hah else 'std'}"
                                          f"-w{config.width:g}")
        return {"config": config.to_dict(), "data": data_path or DEFAULT_DATA,
                "out_dir": str(out_dir), "resume": run_dir is not None}

    try:
        env = distributed.setup(device, dist_timeout)
    except ValueError as error:
        raise user_error(error) from None
    except Exception as error:  # rendezvous failed or timed out
        if not distributed.is_comm_error(error):
            raise
        raise user_error(error, f"rank {distributed.env_rank()}: cannot join the process group "
                                f"within --dist-timeout {dist_timeout:g}s: "
                                f"{' '.join(str(error).split())[:200]}") from None
    try:
        run = distributed.from_rank0(env, plan)
        config, out_dir, data = TrainConfig.from_dict(run["config"]), Path(run["out_dir"]), run["data"]
        failure = None
        try:  # every rank reads the data and builds the model; a failure anywhere stops all
            def read() -> Any:
                if env.rank == 0:
                    return load_data(data, cache_dir, download)
                with contextlib.redirect_stderr(io.StringIO()):  # rank 0 reports the data
                    return load_data(data, cache_dir, download)

            if dataset is None and download and env.active:  # one download per node, then
                first_failure = None                            # the other ranks read it
                if env.local_rank == 0:
                    try:
                        dataset = read()
                    except Exception as error:  # noqa: BLE001 - shared by check()
                        first_failure = error
                distributed.check(env, first_failure)
                if env.local_rank != 0:
                    dataset = read()
            elif dataset is None:
                dataset = read()
            trainer = Trainer(config, dataset, out_dir, env.device, env.rank, env.world_size,
                              wrap=distributed.wrapper(env, sync_bn))
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

        def prepare() -> int | None:  # rank 0: load the checkpoint, record the run
            next_epoch = trainer.resume() if run["resume"] else None
            RunDir(out_dir).write_config(config, data)
            return next_epoch

        next_epoch = distributed.from_rank0(env, prepare)
        if next_epoch is not None:
            distributed.broadcast_training_state(env, trainer.model, trainer.optimizer)
            trainer.start_epoch = next_epoch
            say(env, f"resuming {out_dir} after epoch {next_epoch}/{config.epochs}")
        say(env, f"training {config.arch} {'HaH' if config.hah else 'standard'} width "
                 f"{config.width:g} on {env.device} x{env.world_size} -> {out_dir}")
        fit_with_progress(trainer, quiet or env.rank != 0, tensorboard and env.rank == 0)
    except UserError as error:
        raise user_error(error) from None
    except distributed.PeerError as error:
        raise user_error(error) from None
    except FloatingPointError as error:  # from the all-reduced loss: every rank has it
        raise user_error(error, quiet_error=env.rank != 0) from None
    except (ValueError, checkpoint.CheckpointError) as error:
        raise user_error(error) from None
    except Exception as error:
        if env.active and distributed.is_comm_error(error):
            raise user_error(error, distributed.comm_error_message(env, error), False) from None
        raise
    finally:
        trainer = None  # DDP holds the process group: free it before destroying the group
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
    from hahnet import distributed

    configure_threads(distributed.default_threads(args.threads))
    out = run_training(train_overrides(args), args.data, args.out, args.resume, args.device,
                       args.cache_dir, args.download, args.tensorboard, args.sync_bn,
                       dist_timeout=args.dist_timeout)  # a quiet UserError: main() exits 2
    if distributed.env_rank() == 0:
        print(f"checkpoint: {out}")
    return 0


# ---------------------------------------------------------------- eval

def add_eval_parser(subparsers) -> None:
    """``hahnet eval CKPT [CKPT ...]``: clean, noise, attacks, sparsity, SNR -> a report."""
    def fraction(text: str) -> float:
        values = parse_floats(text)
        if len(values) != 1:
            raise argparse.ArgumentTypeError(f"expected one number such as 2/255, got {text!r}")
        return values[0]

    parser = subparsers.add_parser(
        "eval", help="evaluate checkpoints: noise, APGD/PGD/Square attacks, sparsity, SNR",
        description="Evaluate one or more checkpoints side by side on the test split, as the "
                    "paper does (APGD-CE + APGD-T), with PGD and Square as a gradient-masking "
                    "check; writes results.json, report.md and plots into --out.")
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                        help="run directory or .safetensors file")
    parser.add_argument("--data", help=f"dataset path (default {DEFAULT_DATA})")
    parser.add_argument("--cache-dir", help="where decoded image folders are cached")
    parser.add_argument("--split", choices=["test", "holdout"], default="test",
                        help="test set, or the training images the checkpoints held out "
                             "(train --holdout F), for choices that must not see the test set")
    parser.add_argument("--limit", type=int, metavar="N", help="a fixed seeded subset of N test images")
    parser.add_argument("--limit-seed", type=int, default=0, metavar="S", help="seed of --limit (0)")
    parser.add_argument("--noise", type=parse_floats, default=(0.1,), metavar="SIGMAS",
                        help="Gaussian noise sigma(s) in [0, 1] pixel units, e.g. 0.02,0.05,0.1 (0.1)")
    parser.add_argument("--noise-draws", type=int, default=3, help="noise draws per sigma (3)")
    parser.add_argument("--eps-linf", type=fraction, default=2 / 255, help="l_inf budget (2/255)")
    parser.add_argument("--eps-l2", type=fraction, default=0.25, help="l_2 budget (0.25)")
    parser.add_argument("--attack-limit", type=int, default=1000, metavar="N",
                        help="attack a seeded random N of the evaluated images (1000; 0 = all)")
    parser.add_argument("--apgd-steps", type=int, default=100, help="APGD steps (100, AutoAttack's)")
    parser.add_argument("--pgd-steps", type=int, default=50, help="PGD steps (50; 0 = no PGD)")
    parser.add_argument("--pgd-restarts", type=int, default=5, help="PGD random restarts (5)")
    parser.add_argument("--square-limit", type=int, default=100, metavar="N",
                        help="Square attack on the first N attacked images (100; 0 = no Square)")
    parser.add_argument("--square-queries", type=int, default=1000, metavar="Q",
                        help="Square queries per image (1000)")
    parser.add_argument("--no-attacks", action="store_true", help="skip all adversarial attacks")
    parser.add_argument("--seed", type=int, default=0, help="seed of noise, SNR and attacks (0)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (128)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", default="eval-report", help="report directory (eval-report)")
    parser.add_argument("--dist-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="under torchrun: give up on a dead or hung peer after this long (120)")
    corruption_cli.add_arguments(parser)  # --corruptions, --severities, --corruption-seed
    parser.set_defaults(func=cmd_eval)


def evaluate_with_progress(model, images, labels, settings, device, path: str,
                           info: dict[str, Any], env=None):
    """Evaluate one loaded checkpoint under a tqdm bar per phase and print its summary."""
    from tqdm import tqdm

    from hahnet import report
    from hahnet.eval import runner as ev

    bar: dict[str, Any] = {"current": None}
    name = ev.checkpoint_name(path)

    def close_bar() -> None:
        if bar["current"] is not None:
            bar["current"].close()
            bar["current"] = None

    def open_bar(phase: str, total: int):
        close_bar()
        bar["current"] = tqdm(total=total, desc=f"{name}: {phase}", unit="img", leave=False,
                              dynamic_ncols=True, file=sys.stderr)
        return bar["current"].update

    try:
        result = ev.evaluate_model(model, images, labels, settings, device, progress=open_bar,
                                   name=name, checkpoint=str(path), info=info, env=env)
    except ev.EvalError as error:
        raise UserError(f"{path}: {error}") from None
    finally:
        close_bar()
    numbers = report.summary(result)
    tqdm.write(f"{name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in numbers.items()
                                        if v is not None)
               + f" ({sum(result.seconds.values()):.0f} s)", file=sys.stderr)
    return result


def evaluation_split(dataset, split: str, checkpoints: Sequence[tuple[str, dict[str, Any]]]):
    """:func:`hahnet.eval.runner.evaluation_split`, its errors as one-line UserErrors."""
    from hahnet.eval.runner import EvalError, evaluation_split as split_of

    try:
        return split_of(dataset, split, checkpoints)
    except EvalError as error:
        raise UserError(str(error)) from None


def check_and_estimate(path: str, info: dict[str, Any], model, test, settings, device) -> float:
    """Check the test data fit the model (one-line UserError if not); print and return
    the estimated evaluation seconds."""
    from hahnet.eval import runner as ev

    try:
        ev.check_compatible(model, test.images, test.labels, test.classes,
                            (info.get("dataset") or {}).get("classes"))
        estimate = ev.estimate_seconds(model, settings, len(test), tuple(test.images.shape[1:]),
                                       device=device)
    except ev.EvalError as error:
        raise UserError(f"{path}: {error}") from None
    phases = ", ".join(f"{k} {minutes(v)}" for k, v in estimate.items() if k != "total")
    print(f"{path}: ~{minutes(estimate['total'])} ({phases})", file=sys.stderr)
    return estimate["total"]


def warn_gradient_masking(results, report_path: Path) -> None:
    for result in results:
        for norm, suite in result.attacks.items():
            if suite.comparison.black_box_beats_gradient:
                print(f"warning: {result.name}: Square beats the gradient attacks at {norm} "
                      f"(gradient masking?); see {report_path}", file=sys.stderr)


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def cmd_eval(args: argparse.Namespace) -> int:
    """Load checkpoints and data, print an ETA, evaluate under tqdm bars, write the report.
    Under torchrun every rank evaluates its shard; rank 0 alone prints and writes."""
    import contextlib
    import io

    from hahnet import distributed

    configure_threads(distributed.default_threads(args.threads))
    try:
        device = resolve_device_or_fail(args.device)
        env = distributed.setup(device, args.dist_timeout)
    except ValueError as error:
        raise UserError(str(error)) from None
    try:
        if env.is_main:
            return evaluate_and_report(args, env)
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            try:
                evaluate_and_report(args, env)
            except UserError as error:  # rank 0 meets the same problem and reports it
                error.quiet = True
                raise
        return 0
    finally:
        distributed.teardown(env)


def resolve_device_or_fail(name: str) -> torch.device:
    from hahnet.device import resolve_device

    try:
        return resolve_device(name)
    except ValueError as error:
        raise UserError(str(error)) from None


def evaluate_and_report(args: argparse.Namespace, env) -> int:
    from hahnet import checkpoint, report
    from hahnet import eval as ev

    for flag in ("noise_draws", "batch_size", "apgd_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if any(s < 0 for s in args.noise) or args.eps_linf < 0 or args.eps_l2 < 0:
        raise UserError("noise sigmas and attack budgets must be >= 0")
    device = env.device
    models = []
    for path in args.checkpoints:
        try:
            models.append((path, checkpoint.read_info(path), checkpoint.load(path, device=device)))
        except checkpoint.CheckpointError as error:
            raise UserError(str(error)) from None
    dataset = load_data(args.data or DEFAULT_DATA, args.cache_dir)
    test = evaluation_split(dataset, args.split, [(path, info) for path, info, _ in models])
    test = test.limit(args.limit, args.limit_seed) if args.limit else test
    settings = ev.EvalSettings(
        noise_sigmas=tuple(args.noise), noise_draws=args.noise_draws, noise_seed=args.seed,
        attacks=not args.no_attacks, eps_linf=args.eps_linf, eps_l2=args.eps_l2,
        attack_limit=args.attack_limit if args.attack_limit > 0 else None,
        apgd_steps=args.apgd_steps, pgd_steps=max(args.pgd_steps, 0),
        pgd_restarts=max(args.pgd_restarts, 0), square_limit=max(args.square_limit, 0),
        square_queries=max(args.square_queries, 0), attack_seed=args.seed,
        attack_batch_size=args.batch_size, snr_seed=args.seed, batch_size=args.batch_size)

    eta = sum(check_and_estimate(path, info, model, test, settings, device)
              for path, info, model in models)
    print(f"evaluating {len(models)} checkpoint(s) on {len(test)} test images on {device}; "
          f"ETA ~{minutes(eta)} (attacks estimated as if every image survived every stage)",
          file=sys.stderr)

    results = []
    for path, info, model in models:
        results.append(evaluate_with_progress(model, test.images, test.labels, settings, device,
                                              path, info, env))
    corruption_cli.evaluate(args, env, models, test, results)  # if --corruptions
    if not env.is_main:
        return 0
    data = {**eval_data(args.data or DEFAULT_DATA, dataset, test, args.limit),
            "limit_seed": args.limit_seed, "split": args.split}
    paths = report.write_report(results, args.out, data)
    print(report.paper_table(results))
    warn_gradient_masking(results, paths["report.md"])
    print(f"report: {paths['report.md']}")
    return 0


# ---------------------------------------------------------------- presets, reproduce

def add_presets_parser(subparsers) -> None:
    parser = subparsers.add_parser("presets", help="list the reproduce presets and their settings",
                                   description="Print each preset (or the one named): what it "
                                               "is for and every setting it fixes.")
    parser.add_argument("name", nargs="?", help="one preset (default: all)")
    parser.set_defaults(func=cmd_presets)


def cmd_presets(args: argparse.Namespace) -> int:
    from hahnet.presets import PRESETS, get_preset

    try:
        chosen = [get_preset(args.name)] if args.name else list(PRESETS.values())
    except ValueError as error:
        raise UserError(str(error)) from None
    print("\n\n".join(p.summary() for p in chosen))
    return 0


EVAL_OPTIONS = ("limit", "attack_limit", "noise_draws", "apgd_steps", "square_limit")


def add_reproduce_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="train standard + HaH VGG, evaluate both, write the paper's table",
        description="Train the standard and the HaH network of a preset (resumable: finished "
                    "runs and evaluations are reused), evaluate both as the paper does and "
                    "write DIR/report.md, DIR/results.json and plots. Every preset setting can "
                    "be overridden with the flags below; see `hahnet presets`.")
    parser.add_argument("--preset", default="demo", help="paper, cpu or demo (demo)")
    parser.add_argument("--data", help=f"dataset path (default {DEFAULT_DATA} if present, else "
                                       f"CIFAR-10 downloaded into ./data)")
    parser.add_argument("--cache-dir", help="where decoded image folders are cached")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 if --data is missing")
    parser.add_argument("--out", help="experiment directory (default runs/<preset>)")
    parser.add_argument("--re-evaluate", action="store_true",
                        help="evaluate again even when a saved evaluation matches")
    group = parser.add_argument_group("evaluation (defaults: the preset's)")
    group.add_argument("--limit", type=int, metavar="N", help="a fixed seeded subset of N test images (0 = all)")
    group.add_argument("--attack-limit", type=int, metavar="N", help="attack a seeded N of them (0 = all)")
    group.add_argument("--noise", type=parse_floats, metavar="SIGMAS", help="noise sigmas, e.g. 0.05,0.1")
    group.add_argument("--noise-draws", type=int, help="noise draws per sigma")
    group.add_argument("--apgd-steps", type=int, help="APGD steps")
    group.add_argument("--square-limit", type=int, metavar="N", help="Square attack on N images (0 = none)")
    group.add_argument("--no-attacks", action="store_true", help="skip the adversarial attacks")
    group.add_argument("--eval-batch-size", type=int, default=128, help="evaluation batch size (128)")
    add_train_options(parser)
    parser.set_defaults(func=cmd_reproduce)


def eval_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """EvalSettings fields (and ``limit``) given on the reproduce command line."""
    overrides: dict[str, Any] = {k: getattr(args, k) for k in EVAL_OPTIONS
                                 if getattr(args, k) is not None}
    for key in ("limit", "attack_limit"):
        if overrides.get(key) == 0:
            overrides[key] = None
    if args.noise is not None:
        overrides["noise_sigmas"] = tuple(args.noise)
    if args.no_attacks:
        overrides["attacks"] = False
    if args.eval_batch_size < 1:
        raise UserError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    overrides["batch_size"] = overrides["attack_batch_size"] = args.eval_batch_size
    return overrides


def default_data(data: str | None, download: bool) -> tuple[str, bool]:
    """The data to use: --data as given, else the CIFAR-10 JPEG copy when present, else
    CIFAR-10 downloaded into ./data (a failed download says how to point --data)."""
    if data:
        return data, download
    if Path(DEFAULT_DATA).exists():
        return DEFAULT_DATA, download
    print(f"{DEFAULT_DATA} not found: using CIFAR-10 in ./data (downloading it if needed)",
          file=sys.stderr)
    return "data", True


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Train both networks of a preset, evaluate them (reusing what is done), report."""
    from hahnet import checkpoint, distributed, report
    from hahnet import reproduce as rp
    from hahnet.config import TrainConfig
    from hahnet.eval.results import read_results
    from hahnet.rundir import RunDir
    from hahnet.presets import get_preset

    if distributed.launched():
        raise UserError("reproduce runs in one process; under torchrun use `hahnet train` for "
                        "each network, then `hahnet eval`")
    try:
        preset = get_preset(args.preset)
        settings, limit = preset.eval_settings(**eval_overrides(args))
    except ValueError as error:
        raise UserError(str(error)) from None
    if args.hah is not None:
        raise UserError("reproduce trains both networks; drop --hah / --no-hah")
    train = {**preset.train, **train_overrides(args)}
    out = Path(args.out or f"runs/{preset.name}")
    data, download = default_data(args.data, args.download)
    configure_threads(distributed.default_threads(args.threads))
    device = resolve_device_or_fail(args.device)
    runs = rp.run_dirs(out)
    to_train = {}
    for name, run_dir in runs.items():
        wanted = {**train, "hah": name == "hah"}
        try:
            mismatch = RunDir(run_dir).mismatch(TrainConfig.from_dict(wanted))
            history = RunDir(run_dir).history()
        except ValueError as error:
            raise UserError(str(error)) from None
        if mismatch:
            raise UserError(f"{run_dir} holds a run with other settings ({mismatch}); pass "
                            f"another --out or delete {run_dir}")
        if history and history[-1]["epoch"] + 1 >= train["epochs"] \
                and (run_dir / checkpoint.MODEL_FILE).exists():
            print(f"{name}: trained ({train['epochs']} epochs) in {run_dir}; reusing it",
                  file=sys.stderr)
        else:
            to_train[run_dir] = wanted

    dataset = load_data(data, args.cache_dir, download)  # once, for training and evaluation
    for run_dir, wanted in to_train.items():
        run_training(wanted, data, str(run_dir), "auto", args.device, args.cache_dir,
                     download, dataset=dataset)

    test = dataset.test.limit(limit, 0) if limit else dataset.test
    results = []
    for name, run_dir in runs.items():
        try:
            info, model = checkpoint.read_info(run_dir), checkpoint.load(run_dir, device=device)
        except checkpoint.CheckpointError as error:
            raise UserError(str(error)) from None
        saved = run_dir / rp.EVAL_DIR / "results.json"
        if saved.exists() and not args.re_evaluate:
            try:
                cached = read_results(saved)[0][0]
            except (ValueError, IndexError) as error:
                raise UserError(f"{error}") from None
            if rp.reusable(cached, info, settings, limit):
                print(f"{name}: reusing the evaluation in {saved}", file=sys.stderr)
                results.append(cached)
                continue
        check_and_estimate(str(run_dir), info, model, test, settings, device)
        result = evaluate_with_progress(model, test.images, test.labels, settings, device,
                                        str(run_dir), info)
        result.settings = rp.settings_record(settings, limit)
        report.write_report([result], run_dir / rp.EVAL_DIR, eval_data(data, dataset, test, limit))
        results.append(result)

    given = list(getattr(args, "argv", None) or ["reproduce", "--preset", preset.name])
    for flag, value in (("--data", data), ("--out", str(out))):
        if flag not in given:
            given += [flag, value]
    command = "hahnet " + shlex.join(given)
    label = "CIFAR-10 (JPEG copy)" if "cifar10-jpeg" in str(data) else dataset.describe()
    paths = report.write_report(
        results, out, eval_data(data, dataset, test, limit),
        title=f"Reproducing the paper: preset {preset.name}",
        preamble=rp.preamble(preset, train, command, label),
        histories={name: RunDir(run_dir).history() for name, run_dir in runs.items()},
        extra={"preset": preset.name, "train": train, "runs": {k: str(v) for k, v in runs.items()}})
    print(report.paper_table(results))
    warn_gradient_masking(results, paths["report.md"])
    print(f"report: {paths['report.md']}")
    return 0


def eval_data(path: str, dataset, test, limit: int | None) -> dict[str, Any]:
    """How the evaluated images were chosen, for results.json and the report."""
    return {"path": str(path), "name": dataset.name, "split": "test", "n_images": len(test),
            "limit": limit, "limit_seed": 0, "classes": list(test.classes)}


# ---------------------------------------------------------------- bench

def add_bench_parser(subparsers) -> None:
    from hahnet import bench

    parser = subparsers.add_parser(
        "bench", help="time HaH training vs plain and reference training, blocks, eval",
        description="Time, in one run: (a) a HaH VGG16 step with the one-pass HaH objective, "
                    "(b) a plain cross-entropy step of the same network, (c) a step of the "
                    "authors' reference procedure, (d) a standard VGG16 step, (e) each HaH "
                    "block alone, (f) clean and APGD-CE evaluation throughput. Prints a table "
                    "with the ratios a/b, c/a, a/d; medians of interleaved repeats.")
    bench.add_arguments(parser)
    parser.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from hahnet import bench

    return bench.run_from_args(args)


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hahnet", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_reproduce_parser(subparsers)
    add_presets_parser(subparsers)
    add_bench_parser(subparsers)
    add_sweep_parser(subparsers)
    return parser


# ---------------------------------------------------------------- sweep

def add_sweep_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="train a declared grid of runs over seeds, evaluate on held-out images",
        description="Run the sweep file's grid (resumable: finished runs and evaluations are "
                    "reused, runs with other settings refused), evaluate every run on its "
                    "held-out images, write OUT/report.md, results.json and plots with mean +- "
                    "sd over seeds and the HaH-minus-standard gain paired by seed.")
    parser.add_argument("file", help="sweep file (TOML; see docs/sweep.md)")
    parser.add_argument("--out", help="sweep directory (default runs/sweeps/<name>)")
    parser.add_argument("--data", help=f"dataset path (default: the file's, else {DEFAULT_DATA})")
    parser.add_argument("--cache-dir", help="where decoded image folders are cached")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (1)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--re-evaluate", action="store_true", help="evaluate again even when saved")
    parser.add_argument("--report-only", action="store_true",
                        help="only summarise what is finished (no training or evaluation)")
    parser.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from hahnet import sweep as sw
    from hahnet import sweep_report

    for flag in ("jobs", "threads"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    try:
        spec = sw.load(args.file)
        out = Path(args.out or f"runs/sweeps/{spec.name}")
        data = args.data or spec.data or DEFAULT_DATA
        if not args.report_only:
            if not Path(data).exists():
                raise UserError(f"no data at {data}; pass --data PATH")
            resolve_device_or_fail(args.device)
            sw.run(spec, out, data, args.cache_dir, args.jobs, args.threads, args.device,
                   args.re_evaluate, progress=lambda line: print(line, file=sys.stderr, flush=True))
        else:
            sw.check(spec, out)
        summary = sweep_report.summarise(spec, out)
    except sw.SweepError as error:
        raise UserError(str(error)) from None
    paths = sweep_report.write(summary, spec, out, "hahnet " + " ".join(shlex.quote(a) for a in args.argv))
    print(sweep_report.gains_table(summary))
    print(f"report: {paths['report.md']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for reports: how to rerun
    try:
        return args.func(args)
    except UserError as error:
        if not getattr(error, "quiet", False):
            print(f"hahnet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hahnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
