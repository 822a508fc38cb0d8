"""The ``hahnet`` command: ``train``, ``eval``, ``report``, ``reproduce``, ``presets``, ``bench``, ``sweep``.

This module parses and checks flags (every setting before any work starts; a bad one is
one line on stderr and exit status 2, see docs/errors.md) and prints; the work is done by
:mod:`hahnet.training.run`, :mod:`hahnet.experiments.reproduce`, :mod:`hahnet.eval`, :mod:`hahnet.experiments.bench` and
:mod:`hahnet.experiments.sweep`, and progress is shown by :mod:`hahnet.cli.console`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from hahnet import config as cfg
from hahnet.cli.console import say
from hahnet.errors import UserError
from hahnet.training.device import cpu_threads
from hahnet.training.run import DEFAULT_DATA, RESULTS_FILE, check_out

class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage block), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


FLAGS = {"arch": "model", "noise_sigmas": "noise", "attack_batch_size": "batch-size",
         "widths": "width", "precisions": "precision", "suite": "attacks",
         "sweep_eps": "sweep-eps-linf / --sweep-eps-l2"}


def settings_error(error: cfg.SettingsError, flags: dict[str, str] = FLAGS) -> UserError:
    """A SettingsError as the flag the user typed, its value and the accepted range."""
    flag = flags.get(error.field, error.field).replace("_", "-")
    return UserError(f"--{flag} {error.value!r}: must be {error.accepted}")


def build(make, *args: Any, **kwargs: Any):
    """``make(...)`` with its SettingsError / ValueError as a one-line UserError."""
    try:
        return make(*args, **kwargs)
    except cfg.SettingsError as error:
        raise settings_error(error) from None
    except ValueError as error:
        raise UserError(str(error)) from None


def configure_threads(threads: int | None) -> None:
    """Set torch's intra-op threads for this command (``--threads``, or the torchrun
    share); :func:`main` restores the caller's count on return."""
    from hahnet.training import distributed
    import torch

    threads = distributed.default_threads(threads)
    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- train

TRAIN_FLAGS = {"model": "arch", "width": "width", "hah_layers": "hah_layers",
               "sigma": "sigma", "keep": "keep", "alphas": "alphas", "ratio": "ratio",
               "demote": "demote", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
               "milestones": "milestones", "gamma": "gamma", "seed": "seed",
               "limit_train": "limit_train", "holdout": "holdout", "precision": "precision",
               "snapshots": "snapshots", "hah": "hah", "augment": "augment",
               "channels_last": "channels_last", "compile": "compile",
               "time_budget": "time_budget"}
HAH_ONLY = ("hah_layers", "sigma", "keep", "alphas", "ratio", "demote")


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line, each checked (one line if not)."""
    given = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items()
             if getattr(args, flag, None) is not None}
    build(cfg.TrainConfig.from_dict, {k: v for k, v in given.items() if k != "snapshots"})
    if given.get("hah") is False:
        extra = [f"--{k.replace('_', '-')}" for k in HAH_ONLY if k in given]
        if extra:
            raise UserError(f"{', '.join(extra)}: HaH settings, refused with --no-hah")
    return given


def cmd_train(args: argparse.Namespace) -> int:
    from hahnet.cli import console
    from hahnet.training import distributed, run as runs

    overrides = train_overrides(args)
    if args.resume not in (None, "auto") and args.out is not None \
            and Path(args.out).resolve() != Path(args.resume).resolve():
        raise UserError(f"--resume {args.resume} continues that directory; --out {args.out} "
                        f"would be ignored: drop --out or make it the same directory")
    check_out(args.out or (None if args.resume in (None, "auto") else args.resume), "train")
    configure_threads(args.threads)
    hooks = runs.Hooks(say, lambda trainer, quiet: console.fit_with_progress(
        trainer, quiet, args.tensorboard and distributed.env_rank() == 0))
    out = runs.run_training(overrides, args.data, args.out, args.resume, args.device,
                            args.cache_dir, args.download, args.sync_bn,
                            dist_timeout=args.dist_timeout, hooks=hooks)
    if distributed.env_rank() == 0:
        print(f"checkpoint: {out}")
    return 0


# ---------------------------------------------------------------- eval

def eval_settings(args: argparse.Namespace) -> cfg.EvalSettings:
    if args.no_attacks and args.suite is not None:
        raise UserError(f"--no-attacks skips every attack; drop --attacks {args.suite} or it")
    suite = args.suite or "paper"
    if args.transfer_from and suite not in ("adaptive", "all"):
        raise UserError("--transfer-from is part of the adaptive attacks: add --attacks "
                        "adaptive (or all)")
    return build(cfg.EvalSettings, noise_sigmas=tuple(args.noise), noise_draws=args.noise_draws,
                 noise_seed=args.seed, attacks=not args.no_attacks, eps_linf=args.eps_linf,
                 eps_l2=args.eps_l2, attack_limit=args.attack_limit, apgd_steps=args.apgd_steps,
                 pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts,
                 square_limit=args.square_limit, square_queries=args.square_queries,
                 attack_seed=args.seed, attack_batch_size=args.batch_size,
                 snr_seed=args.seed, batch_size=args.batch_size, suite=suite,
                 restarts=args.restarts, fab_steps=args.fab_steps,
                 autoattack_queries=args.autoattack_queries, adaptive_limit=args.adaptive_limit,
                 adaptive_batch_size=args.adaptive_batch_size,
                 cascade=args.cascade,
                 transfer_steps=args.transfer_steps, bpda=args.bpda,
                 bpda_temperature=args.bpda_temperature, sweep_limit=args.sweep_limit,
                 sweep_eps_linf=args.sweep_eps_linf, sweep_eps_l2=args.sweep_eps_l2,
                 norms=args.norms)


def cmd_eval(args: argparse.Namespace) -> int:
    """Check everything, then evaluate (under torchrun every rank its shard; rank 0 alone
    prints and writes)."""
    from hahnet.cli import evaluate as eval_run

    settings = eval_settings(args)
    check_out(args.out, "eval")
    configure_threads(args.threads)
    return eval_run.run(args, settings)


def cmd_report(args: argparse.Namespace) -> int:
    """Read every results file first (a bad one is one line), join the parts, write."""
    from hahnet.eval.results import join_parts, read_results
    from hahnet.reporting import evaluation as report

    results, data = [], None
    for given in args.results:
        path = Path(given) / RESULTS_FILE if Path(given).is_dir() else Path(given)
        if path.resolve() == (Path(args.out) / RESULTS_FILE).resolve():
            raise UserError(f"--out {args.out} holds the input {given}; write the report "
                            f"into another directory")
        try:
            found, saved = read_results(path)
        except ValueError as error:
            raise UserError(str(error)) from None
        if data is not None and saved != data:
            raise UserError(f"{given}: evaluated on other images than {args.results[0]} "
                            f"(its data record differs); report them separately")
        results, data = results + found, saved
    check_out(args.out, "report")
    try:
        joined = join_parts(results)
    except ValueError as error:
        raise UserError(str(error)) from None
    paths = report.write_report(joined, args.out, data, title=args.title)
    print(report.paper_table(joined))
    print(f"report: {paths['report.md']}")
    return 0


# ---------------------------------------------------------------- presets, reproduce

def cmd_presets(args: argparse.Namespace) -> int:
    from hahnet.experiments.presets import PRESETS, get_preset

    chosen = [build(get_preset, args.name)] if args.name else list(PRESETS.values())
    print("\n\n".join(p.summary() for p in chosen))
    return 0


def default_data(data: str | None, download: bool) -> tuple[str, bool]:
    """--data as given, else the CIFAR-10 JPEG copy when present, else CIFAR-10 in ./data."""
    if data:
        return data, download
    if Path(DEFAULT_DATA).exists():
        return DEFAULT_DATA, download
    say(f"{DEFAULT_DATA} not found: using CIFAR-10 in ./data (downloading it if needed)")
    return "data", True


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Check every setting, then train both networks, evaluate them and report."""
    from hahnet.training import distributed
    from hahnet.experiments import reproduce as rp
    from hahnet.experiments.presets import get_preset

    if distributed.launched():
        raise UserError("reproduce runs in one process; under torchrun use `hahnet train` for "
                        "each network, then `hahnet eval`")
    if args.hah is not None:
        raise UserError("reproduce trains both networks; drop --hah / --no-hah")
    preset = build(get_preset, args.preset)
    evaluate = {k: getattr(args, k) for k in ("limit", "attack_limit", "noise_draws",
                                              "apgd_steps", "square_limit", "suite",
                                              "restarts", "adaptive_limit", "cascade",
                                              "adaptive_batch_size")
                if hasattr(args, k)}  # SUPPRESS: absent unless given
    if args.noise is not None:
        evaluate["noise_sigmas"] = tuple(args.noise)
    settings, limit = build(preset.eval_settings, **evaluate, attacks=not args.no_attacks,
                            batch_size=args.eval_batch_size,
                            attack_batch_size=args.eval_batch_size)
    train = {**preset.train, **train_overrides(args)}
    build(cfg.TrainConfig.from_dict, train)
    out = Path(args.out or f"runs/{preset.name}")
    check_out(out, "reproduce")
    data, download = default_data(args.data, args.download)
    configure_threads(args.threads)
    experiment = rp.Experiment(preset, train, settings, limit, out, data, download,
                               args.cache_dir, args.device, args.re_evaluate,
                               most_epochs=args.epochs)
    given = list(args.argv or ["reproduce", "--preset", preset.name])
    given += [x for f, v in (("--data", data), ("--out", str(out))) if f not in given for x in (f, v)]
    hooks = rp.Hooks(say, runs_hooks(), evaluate_with_eta)
    results, paths = rp.reproduce(experiment, "hahnet " + shlex.join(given), hooks)
    print(console_table(results, paths))
    return 0


def runs_hooks():
    from hahnet.cli import console
    from hahnet.training import run as runs

    return runs.Hooks(say, console.fit_with_progress)


def evaluate_with_eta(path, info, model, test, settings, device, sources=()):
    from hahnet.cli import console

    console.check_and_estimate(path, info, model, test, settings, device)
    return console.evaluate_with_progress(model, test.images, test.labels, settings, device,
                                          path, info, sources=sources)


def console_table(results, paths) -> str:
    from hahnet.cli import console
    from hahnet.reporting import evaluation as report

    console.warn_gradient_masking(results, paths["report.md"])
    return f"{report.paper_table(results)}\nreport: {paths['report.md']}"


# ---------------------------------------------------------------- bench, sweep

def cmd_bench(args: argparse.Namespace) -> int:
    from hahnet.experiments import bench
    from hahnet.reporting import bench as bench_report

    values = {"widths": args.width, "batch_size": args.batch_size, "precisions": args.precision,
              "channels_last": args.channels_last, "repeats": args.repeats,
              "warmup": args.warmup, "apgd_steps": args.apgd_steps, "clock": args.clock,
              "sections": args.sections, "device": args.device, "model": args.model}
    values = {k: v for k, v in values.items() if v is not None}
    config = build(bench.BenchConfig.quick if args.quick else bench.BenchConfig, **values)
    check_out(args.out, "file")
    if args.malloc == "tuned" and not args.own_process:
        raise UserError("--malloc tuned changes the allocator of the whole process for good: "
                        "run it as the hahnet command (or python -m hahnet), not through "
                        "hahnet.cli.commands.main() inside another program")
    configure_threads(args.threads)
    if args.malloc == "tuned" and not bench.tune_malloc():
        raise UserError("--malloc tuned needs glibc malloc (Linux)")
    result = bench.run_benchmark(config, progress=say)
    print(bench_report.format_report(result))
    if args.out:
        bench_report.write_json(result, args.out)
        say(f"wrote {args.out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from hahnet.experiments import sweep as sw, sweep_summary
    from hahnet.reporting import sweep as sweep_report

    if args.compare:
        return cmd_sweep_compare(args)
    if len(args.file) > 1 or args.epoch:
        raise UserError("several sweep files or --epoch need --compare SETTING "
                        "(e.g. --compare width)")
    spec = build(sw.load, args.file[0])
    out = Path(args.out or f"runs/sweeps/{spec.name}")
    if args.status:
        return cmd_sweep_status(args, spec, out)
    check_out(out, "sweep")
    data = args.data or spec.data or DEFAULT_DATA
    if not args.report_only and not Path(data).exists():
        raise UserError(f"no data at {data}; pass --data PATH")
    try:
        sw.check(spec, out) if args.report_only else sw.run(
            spec, out, data, args.cache_dir, args.jobs, args.threads, args.device,
            args.re_evaluate, progress=say)
        summary = sweep_summary.summarise(spec, out)
    except sw.SweepError as error:
        raise UserError(str(error)) from None
    paths = sweep_report.write(summary, out, "hahnet " + shlex.join(args.argv))
    print(sweep_report.gains_table(summary))
    print(f"report: {paths['report.md']}")
    return 0


def cmd_sweep_status(args: argparse.Namespace, spec: Any, out: Path) -> int:
    """``hahnet sweep FILE --status``: every task's state and the compute left."""
    from hahnet.experiments import sweep as sw, sweep_status
    from hahnet.reporting import sweep as sweep_report

    if args.report_only or args.re_evaluate:
        raise UserError("--status only reads the sweep directory; drop --report-only and "
                        "--re-evaluate")
    if not out.is_dir():
        raise UserError(f"no sweep directory at {out}: nothing started yet; pass --out DIR "
                        f"for a sweep run elsewhere")
    try:
        sw.check(spec, out)
        rows = sweep_status.status(spec, out)
    except sw.SweepError as error:
        raise UserError(str(error)) from None
    print(sweep_report.status_table(rows))
    print(sweep_report.status_summary(rows, *sweep_status.seconds_left(rows), args.jobs))
    return 0


def cmd_sweep_compare(args: argparse.Namespace) -> int:
    """``hahnet sweep --compare SETTING FILE[=DIR] ...``: finished sweeps side by side."""
    from hahnet.experiments import sweep as sw, sweep_compare, sweep_summary
    from hahnet.reporting import sweep_compare as compare_report

    if args.re_evaluate or args.status:
        raise UserError("--compare only reads finished sweeps; drop --re-evaluate and --status")
    build(sweep_compare.check_setting, args.compare)
    entries = []
    for entry in args.file:
        file, _, directory = entry.partition("=")
        spec = build(sw.load, file)
        out = Path(directory or f"runs/sweeps/{spec.name}")
        if not out.is_dir():
            raise UserError(f"{entry}: no sweep directory at {out}; pass FILE=DIR")
        entries.append((spec, out))
    names = [spec.name for spec, _ in entries]
    report = Path(args.out or f"runs/sweeps/{'-'.join(names)}-by-{args.compare}")
    check_out(report, "sweep")
    try:
        for spec, out in entries:
            sw.check(spec, out)
        comparison = sweep_compare.compare([sweep_summary.summarise(spec, out) for spec, out in entries],
                                           args.compare, args.epoch)
    except sw.SweepError as error:
        raise UserError(str(error)) from None
    paths = compare_report.write(comparison, report, "hahnet " + shlex.join(args.argv))
    for snapshot in comparison["snapshots"]:
        print(f"{snapshot}:\n{compare_report.gains_table(comparison, snapshot)}")
    print(f"report: {paths['report.md']}")
    return 0


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from hahnet.cli import parsers as cli_parsers

    parser = Parser(prog="hahnet", description=__doc__.splitlines()[0])
    commands = {"train": cmd_train, "eval": cmd_eval, "report": cmd_report, "reproduce": cmd_reproduce,
                "presets": cmd_presets, "bench": cmd_bench, "sweep": cmd_sweep}
    cli_parsers.add_all(parser.add_subparsers(dest="command", required=True), commands)
    return parser


def main(argv: Sequence[str] | None = None, own_process: bool = False) -> int:
    """Run one ``hahnet`` command; returns its exit status. Process-wide settings it makes
    are undone on return (threads), or refused unless ``own_process`` says this call is
    the process's entry point (the allocator tuning of ``bench --malloc tuned``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # a bad flag (one line printed) or --help
        return int(done.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for reports: how to rerun
    args.own_process = own_process
    try:
        with cpu_threads(None):  # --threads is undone for a caller of main
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


def entry() -> None:
    """The ``hahnet`` command and ``python -m hahnet``: this process's entry point."""
    sys.exit(main(own_process=True))


if __name__ == "__main__":
    entry()
