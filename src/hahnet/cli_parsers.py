"""The flags of each ``hahnet`` subcommand (see :mod:`hahnet.cli`, which runs them)."""

from __future__ import annotations

import argparse
from typing import Any

from hahnet.runs import DEFAULT_DATA


def add_all(subparsers, cli: dict[str, Any]) -> None:
    """Every subcommand; ``cli``: the namespace of :mod:`hahnet.cli` (types, commands)."""
    for add in (add_train, add_eval, add_reproduce, add_presets, add_bench, add_sweep):
        add(subparsers, cli)


def add_data(parser: argparse.ArgumentParser, download: bool = True) -> None:
    parser.add_argument("--data", help=f"dataset path (default {DEFAULT_DATA})")
    parser.add_argument("--cache-dir", help="where decoded image folders are cached")
    if download:
        parser.add_argument("--download", action="store_true",
                            help="download CIFAR-10 if --data is missing")


def add_train(subparsers, cli: dict[str, Any]) -> None:
    parser = subparsers.add_parser("train", help="train a standard or HaH VGG",
                                   description="Train a standard or HaH VGG; checkpoints after "
                                               "every epoch into --out, resumable.")
    add_data(parser)
    parser.add_argument("--out", help="run directory (default runs/<model>-<hah|std>-w<width>)")
    parser.add_argument("--resume", metavar="DIR|auto",
                        help="continue the run in DIR ('auto': the --out dir if it has a checkpoint)")
    parser.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard")
    parser.add_argument("--sync-bn", action="store_true",
                        help="SyncBatchNorm across processes (no-op in one process)")
    parser.add_argument("--dist-timeout", type=cli["SECONDS"], default=120.0, metavar="SECONDS",
                        help="under torchrun: give up on a dead or hung peer after this long (120)")
    cli["add_train_options"](parser)
    parser.set_defaults(func=cli["cmd_train"])


def add_eval(subparsers, cli: dict[str, Any]) -> None:
    """``hahnet eval CKPT [CKPT ...]``: clean, noise, attacks, sparsity, SNR -> a report."""
    positive, non_negative, count = cli["POSITIVE"], cli["NON_NEGATIVE"], cli["COUNT"]
    parser = subparsers.add_parser(
        "eval", help="evaluate checkpoints: noise, APGD/PGD/Square attacks, sparsity, SNR",
        description="Evaluate one or more checkpoints side by side on the test split, as the "
                    "paper does (APGD-CE + APGD-T), with PGD and Square as a gradient-masking "
                    "check; writes results.json, report.md and plots into --out.")
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                        help="run directory or .safetensors file")
    add_data(parser, download=False)
    parser.add_argument("--split", choices=["test", "holdout"], default="test",
                        help="test set, or the training images the checkpoints held out "
                             "(train --holdout F), for choices that must not see the test set")
    parser.add_argument("--limit", type=count, metavar="N|all",
                        help="a fixed seeded subset of N test images (default all)")
    parser.add_argument("--limit-seed", type=int, default=0, metavar="S", help="seed of --limit (0)")
    parser.add_argument("--noise", type=cli["NUMBERS"], default=(0.1,), metavar="SIGMAS",
                        help="Gaussian noise sigma(s) in [0, 1] pixel units, e.g. 0.02,0.05,0.1 (0.1)")
    parser.add_argument("--noise-draws", type=positive, default=3, help="noise draws per sigma (3)")
    parser.add_argument("--eps-linf", type=cli["NUMBER"], default=2 / 255, help="l_inf budget (2/255)")
    parser.add_argument("--eps-l2", type=cli["NUMBER"], default=0.25, help="l_2 budget (0.25)")
    parser.add_argument("--attack-limit", type=count, default=1000, metavar="N|all",
                        help="attack a seeded random N of the evaluated images (1000)")
    parser.add_argument("--apgd-steps", type=positive, default=100, help="APGD steps (100)")
    parser.add_argument("--pgd-steps", type=non_negative, default=50, help="PGD steps (50; 0 = no PGD)")
    parser.add_argument("--pgd-restarts", type=non_negative, default=5, help="PGD random restarts (5)")
    parser.add_argument("--square-limit", type=non_negative, default=100, metavar="N",
                        help="Square attack on the first N attacked images (100; 0 = no Square)")
    parser.add_argument("--square-queries", type=non_negative, default=1000, metavar="Q",
                        help="Square queries per image (1000)")
    parser.add_argument("--no-attacks", action="store_true", help="skip all adversarial attacks")
    parser.add_argument("--seed", type=int, default=0, help="seed of noise, SNR and attacks (0)")
    parser.add_argument("--batch-size", type=positive, default=128, help="images per batch (128)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=positive, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", default="eval-report", help="report directory (eval-report)")
    parser.add_argument("--dist-timeout", type=cli["SECONDS"], default=120.0, metavar="SECONDS",
                        help="under torchrun: give up on a dead or hung peer after this long (120)")
    from hahnet import corruption_cli

    corruption_cli.add_arguments(parser)  # --corruptions, --severities, --corruption-seed
    parser.set_defaults(func=cli["cmd_eval"])


def add_presets(subparsers, cli: dict[str, Any]) -> None:
    parser = subparsers.add_parser("presets", help="list the reproduce presets and their settings",
                                   description="Print each preset (or the one named): what it "
                                               "is for and every setting it fixes.")
    parser.add_argument("name", nargs="?", help="one preset (default: all)")
    parser.set_defaults(func=cli["cmd_presets"])


def add_reproduce(subparsers, cli: dict[str, Any]) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="train standard + HaH VGG, evaluate both, write the paper's table",
        description="Train the standard and the HaH network of a preset (resumable: finished "
                    "runs and evaluations are reused), evaluate both as the paper does and "
                    "write DIR/report.md, DIR/results.json and plots. Every preset setting can "
                    "be overridden with the flags below; see `hahnet presets`.")
    parser.add_argument("--preset", default="demo", help="paper, cpu or demo (demo)")
    add_data(parser)
    parser.add_argument("--out", help="experiment directory (default runs/<preset>)")
    parser.add_argument("--re-evaluate", action="store_true",
                        help="evaluate again even when a saved evaluation matches")
    group = parser.add_argument_group("evaluation (defaults: the preset's)")
    hidden = argparse.SUPPRESS  # absent unless given: the preset's value applies
    group.add_argument("--limit", type=cli["COUNT"], default=hidden, metavar="N|all",
                       help="a fixed seeded subset of N test images")
    group.add_argument("--attack-limit", type=cli["COUNT"], default=hidden, metavar="N|all",
                       help="attack a seeded N of them")
    group.add_argument("--noise", type=cli["NUMBERS"], metavar="SIGMAS", help="noise sigmas, e.g. 0.05,0.1")
    group.add_argument("--noise-draws", type=cli["POSITIVE"], default=hidden, help="noise draws per sigma")
    group.add_argument("--apgd-steps", type=cli["POSITIVE"], default=hidden, help="APGD steps")
    group.add_argument("--square-limit", type=cli["NON_NEGATIVE"], default=hidden, metavar="N",
                       help="Square attack on N images (0 = none)")
    group.add_argument("--no-attacks", action="store_true", help="skip the adversarial attacks")
    group.add_argument("--eval-batch-size", type=cli["POSITIVE"], default=128,
                       help="evaluation batch size (128)")
    cli["add_train_options"](parser)
    parser.set_defaults(func=cli["cmd_reproduce"])


def _list(convert, accepted: str, cli: dict[str, Any]):
    def parse(text: str) -> tuple:
        values = tuple(convert(p.strip()) for p in text.split(",") if p.strip())
        if not values:
            raise ValueError(text)
        return values
    return cli["typed"](parse, accepted)


def _choice(allowed: dict[str, Any]):
    def convert(text: str) -> Any:
        if text.lower() not in allowed:
            raise ValueError(text)
        return allowed[text.lower()]
    return convert


def add_bench(subparsers, cli: dict[str, Any]) -> None:
    parser = subparsers.add_parser(
        "bench", help="time HaH training vs plain and reference training, blocks, eval",
        description="Time, in one run: (a) a HaH VGG16 step with the one-pass HaH objective, "
                    "(b) a plain cross-entropy step of the same network, (c) a step of the "
                    "authors' reference procedure, (d) a standard VGG16 step, (e) each HaH "
                    "block alone, (f) clean and APGD-CE evaluation throughput. Prints a table "
                    "with the ratios a/b, c/a, a/d; medians of interleaved repeats.")
    positive = cli["POSITIVE"]
    parser.add_argument("--width", type=_list(float, "comma-separated widths > 0", cli),
                        help="comma-separated widths (default 0.25,1.0; --quick: 0.0625)")
    parser.add_argument("--batch-size", type=positive, help="training batch size (128; --quick: 8)")
    parser.add_argument("--precision", type=_list(_choice({"fp32": "fp32", "bf16": "bf16"}),
                                                  "fp32, bf16 or fp32,bf16", cli),
                        help="fp32, bf16 or fp32,bf16 (default fp32; bf16 = CPU autocast)")
    parser.add_argument("--channels-last", type=_list(_choice({"on": True, "off": False}),
                                                      "on, off or on,off", cli),
                        help="on, off or on,off (default off)")
    parser.add_argument("--repeats", type=positive, help="timed rounds per measurement (5)")
    parser.add_argument("--warmup", type=cli["NON_NEGATIVE"], help="untimed warm-up rounds (1)")
    parser.add_argument("--apgd-steps", type=positive, help="APGD-CE iterations (5)")
    parser.add_argument("--sections", type=_list(_choice({s: s for s in ("steps", "blocks", "eval")}),
                                                 "a comma-separated subset of steps,blocks,eval", cli),
                        help="comma-separated subset of steps,blocks,eval (default all)")
    parser.add_argument("--threads", type=positive, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="where to time the steps (cpu; cuda syncs the device around "
                             "each timing)")
    parser.add_argument("--clock", choices=["wall", "cpu"],
                        help="wall (default) or cpu: process CPU time, steadier on a busy "
                             "machine with --threads 1")
    parser.add_argument("--malloc", choices=["default", "tuned"], default="default",
                        help="tuned: keep freed memory in the process (glibc: no mmap, no "
                             "heap trimming; see docs/performance.md)")
    parser.add_argument("--quick", action="store_true",
                        help="a small configuration that finishes in seconds (for tests)")
    parser.add_argument("--out", metavar="FILE", help="also write the result as JSON")
    parser.set_defaults(func=cli["cmd_bench"])


def add_sweep(subparsers, cli: dict[str, Any]) -> None:
    parser = subparsers.add_parser(
        "sweep", help="train a declared grid of runs over seeds, evaluate on held-out images",
        description="Run the sweep file's grid (resumable: finished runs and evaluations are "
                    "reused, runs with other settings refused), evaluate every run on its "
                    "held-out images, write OUT/report.md, results.json and plots with mean +- "
                    "sd over seeds and the HaH-minus-standard gain paired by seed.")
    parser.add_argument("file", help="sweep file (TOML; see docs/sweep.md)")
    parser.add_argument("--out", help="sweep directory (default runs/sweeps/<name>)")
    add_data(parser, download=False)
    parser.add_argument("--jobs", type=cli["POSITIVE"], default=2, help="runs at a time (2)")
    parser.add_argument("--threads", type=cli["POSITIVE"], default=1, help="threads per run (1)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--re-evaluate", action="store_true", help="evaluate again even when saved")
    parser.add_argument("--report-only", action="store_true",
                        help="only summarise what is finished (no training or evaluation)")
    parser.set_defaults(func=cli["cmd_sweep"])
