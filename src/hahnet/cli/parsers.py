"""The flags of each ``hahnet`` subcommand (see :mod:`hahnet.cli.commands`, which runs them)."""

from __future__ import annotations

import argparse
from typing import Any

from hahnet import config as cfg
from hahnet.config import ARCHITECTURES
from hahnet.training.run import DEFAULT_DATA


# ---------------------------------------------------------------- flag types

def typed(convert, accepted: str):
    """An argparse type: ``convert(text)``, or an error naming the accepted values."""
    def parse(text: str):
        try:
            return convert(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {accepted}") from None
    return parse


def _at_least(low: int):
    def convert(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(text)
        return value
    return convert


POSITIVE = typed(_at_least(1), "an integer >= 1")
NON_NEGATIVE = typed(_at_least(0), "an integer >= 0")
COUNT = typed(cfg.parse_count, "a positive number of images or 'all' (0 also means all)")
NUMBERS = typed(cfg.parse_numbers, "a number or comma-separated numbers (e.g. 0.1,0.2 or 2/255)")
EPOCHS = typed(lambda t: tuple(sorted({POSITIVE(p) for p in t.split(",") if p.strip()})),
               "comma-separated epochs >= 1")
SECONDS = typed(lambda t: float(t) if float(t) > 0 else int("x"), "a number of seconds > 0")


def one_number(text: str) -> float:
    values = cfg.parse_numbers(text)
    if len(values) != 1:
        raise ValueError(text)
    return values[0]


NUMBER = typed(one_number, "one number such as 0.25 or 2/255")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``train`` and ``reproduce`` (all default to None = not given)."""
    g = parser.add_argument_group("model and recipe (defaults: the paper's, docs/method.md)")
    g.add_argument("--model", choices=list(ARCHITECTURES),
                   help="network (vgg16; `hahnet presets` and docs/method.md describe them)")
    g.add_argument("--width", type=float, help="channel multiplier > 0 (1.0 = the paper's widths)")
    g.add_argument("--hah", action=argparse.BooleanOptionalAction, default=None,
                   help="HaH network and objective (--no-hah: standard network)")
    g.add_argument("--hah-layers", type=POSITIVE,
                   help="leading convolutions that are HaH blocks (VGG: 6; residual "
                        "networks: the stem and the first stage)")
    g.add_argument("--sigma", type=float, help="divisive normalization sigma > 0 (0.1)")
    g.add_argument("--keep", type=float, help="fraction in (0, 1] kept by the threshold (0.2)")
    g.add_argument("--alphas", type=NUMBERS,
                   help="HaH weights per HaH layer, comma-separated (the paper's)")
    g.add_argument("--ratio", type=float, help="HaH winner ratio K/C in (0, 1) (0.1)")
    g.add_argument("--demote", type=float, help="weight >= 0 of the losers' mean (1.0)")
    g.add_argument("--epochs", type=POSITIVE)
    g.add_argument("--batch-size", type=POSITIVE, help="global batch size (128)")
    g.add_argument("--lr", type=float, help="Adam learning rate > 0 (1e-3)")
    g.add_argument("--milestones", type=NUMBERS, help="lr x gamma at these fractions of the epochs (0.6,0.8)")
    g.add_argument("--gamma", type=float, help="lr decay factor in (0, 1] (0.1)")
    g.add_argument("--seed", type=int, help="seed (2022)")
    g.add_argument("--limit-train", type=POSITIVE, help="train on a fixed seeded subset of N images")
    g.add_argument("--holdout", type=float, help="hold out this fraction in [0, 1) of the training set")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    g.add_argument("--snapshots", type=EPOCHS, metavar="E1,E2,...",
                   help="also keep the weights after these epochs (evaluate them as RUN@E)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    speed.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                       help="auto (default): bf16 autocast on CUDA, fp32 elsewhere")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="default: on for CUDA, off elsewhere")
    speed.add_argument("--time-budget", type=float, metavar="MINUTES",
                       help="choose the epochs so that the run (reproduce: both networks and "
                            "their evaluation) fits in MINUTES, after a short measured warm-up")
    speed.add_argument("--compile", action="store_true", default=None)
    speed.add_argument("--threads", type=POSITIVE, help="CPU threads (torch.set_num_threads)")


def add_all(subparsers, commands: dict[str, Any]) -> None:
    """Every subcommand; ``commands``: subcommand name -> the function that runs it."""
    for add in (add_train, add_eval, add_report, add_reproduce, add_presets, add_bench,
                add_sweep):
        add(subparsers, commands)


def add_data(parser: argparse.ArgumentParser, download: bool = True) -> None:
    parser.add_argument("--data", help=f"dataset path (default {DEFAULT_DATA})")
    parser.add_argument("--cache-dir", help="where decoded image folders are cached")
    if download:
        parser.add_argument("--download", action="store_true",
                            help="download CIFAR-10 if --data is missing")


def add_train(subparsers, commands: dict[str, Any]) -> None:
    parser = subparsers.add_parser("train", help="train a standard or HaH network",
                                   description="Train a standard or HaH network; checkpoints after "
                                               "every epoch into --out, resumable.")
    add_data(parser)
    parser.add_argument("--out", help="run directory (default runs/<model>-<hah|std>-w<width>)")
    parser.add_argument("--resume", metavar="DIR|auto",
                        help="continue the run in DIR ('auto': the --out dir if it has a checkpoint)")
    parser.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard")
    parser.add_argument("--sync-bn", action="store_true",
                        help="SyncBatchNorm across processes (no-op in one process)")
    parser.add_argument("--dist-timeout", type=SECONDS, default=120.0, metavar="SECONDS",
                        help="under torchrun: give up on a dead or hung peer after this long (120)")
    add_train_options(parser)
    parser.set_defaults(func=commands["train"])


def add_eval(subparsers, commands: dict[str, Any]) -> None:
    """``hahnet eval CKPT [CKPT ...]``: clean, noise, attacks, sparsity, SNR -> a report."""
    positive, non_negative, count = POSITIVE, NON_NEGATIVE, COUNT
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
    parser.add_argument("--noise", type=NUMBERS, default=(0.1,), metavar="SIGMAS",
                        help="Gaussian noise sigma(s) in [0, 1] pixel units, e.g. 0.02,0.05,0.1 (0.1)")
    parser.add_argument("--noise-draws", type=positive, default=3, help="noise draws per sigma (3)")
    parser.add_argument("--eps-linf", type=NUMBER, default=2 / 255, help="l_inf budget (2/255)")
    parser.add_argument("--eps-l2", type=NUMBER, default=0.25, help="l_2 budget (0.25)")
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
    parser.add_argument("--norms", type=NORMS, default=("Linf", "L2"), metavar="Linf,L2",
                        help="threat models attacked (both); one at a time splits a long "
                             "evaluation; `hahnet report` joins the parts")
    add_attack_suite(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of noise, SNR and attacks (0)")
    parser.add_argument("--batch-size", type=positive, default=128, help="images per batch (128)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=positive, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", default="eval-report", help="report directory (eval-report)")
    parser.add_argument("--dist-timeout", type=SECONDS, default=120.0, metavar="SECONDS",
                        help="under torchrun: give up on a dead or hung peer after this long (120)")
    from hahnet.cli import corruptions as corruption_cli

    corruption_cli.add_arguments(parser)  # --corruptions, --severities, --corruption-seed
    parser.set_defaults(func=commands["eval"])


def add_report(subparsers, commands: dict[str, Any]) -> None:
    """``hahnet report RESULTS [RESULTS ...]``: the report of saved evaluations."""
    parser = subparsers.add_parser(
        "report", help="write the report of saved evaluations (results.json)",
        description="Write report.md, results.json and plots from saved evaluations, "
                    "joining the parts of one checkpoint evaluated one threat model at a "
                    "time (eval --norms), e.g. to evaluate in several sittings.")
    parser.add_argument("results", nargs="+", metavar="RESULTS",
                        help="a results.json, or the report directory that holds one")
    parser.add_argument("--out", required=True, help="report directory")
    parser.add_argument("--title", default="HaH evaluation report", help="the report's title")
    parser.set_defaults(func=commands["report"])


BPDA = typed(lambda t: tuple(v.strip() for v in t.split(",") if v.strip()),
             "a comma-separated list of BPDA variants")


def add_attack_suite(parser: argparse.ArgumentParser) -> None:
    """``eval``'s choice of attacks beyond the paper's (docs/evaluation.md)."""
    g = parser.add_argument_group("attack suite (docs/evaluation.md)")
    g.add_argument("--attacks", dest="suite", choices=cfg.ATTACK_SUITES, default=None,
                   help="paper: APGD-CE + APGD-T (default); standard: + AutoAttack's FAB-T and "
                        "Square; adaptive: + margin, BPDA, transfer, eps sweeps; all: both")
    g.add_argument("--restarts", type=POSITIVE, default=3, help="restarts of the margin and BPDA attacks (3)")
    g.add_argument("--fab-steps", type=POSITIVE, default=100, help="AutoAttack FAB-T steps (100)")
    g.add_argument("--autoattack-queries", type=POSITIVE, default=5000, metavar="Q",
                   help="AutoAttack Square queries (5000)")
    g.add_argument("--adaptive-limit", type=POSITIVE, default=500, metavar="N",
                   help="margin, BPDA and transfer on the first N attacked images (500)")
    g.add_argument("--adaptive-batch-size", type=POSITIVE, default=None, metavar="B",
                   help="batch size of the attacks beyond the paper's (default: --batch-size); "
                        "each batch is saved as it finishes, so smaller ones lose less when "
                        "an evaluation of a wide network is stopped")
    g.add_argument("--cascade", action="store_true",
                   help="margin, BPDA and transfer each only on the images the attacks before "
                        "it left standing: the same worst case, several times faster, no "
                        "per-attack numbers")
    g.add_argument("--bpda", type=BPDA, default=cfg.BPDA_VARIANTS[:3], metavar="VARIANTS",
                   help=f"BPDA surrogates, of {', '.join(cfg.BPDA_VARIANTS)} "
                        f"(default: the first three)")
    g.add_argument("--bpda-temperature", type=NUMBER, default=0.1, metavar="T",
                   help="sigmoid surrogate width in standard deviations of the map (0.1)")
    g.add_argument("--transfer-from", nargs="+", default=[], metavar="CKPT",
                   help="checkpoints whose PGD examples are tried on each evaluated one")
    g.add_argument("--transfer-steps", type=POSITIVE, default=100, help="PGD steps on the source (100)")
    g.add_argument("--sweep-limit", type=NON_NEGATIVE, default=200, metavar="N",
                   help="eps sweeps on the first N attacked images (200; 0 = none)")
    g.add_argument("--sweep-eps-linf", type=NUMBERS, default=cfg.SWEEP_EPS["Linf"], metavar="EPS",
                   help="l_inf sweep (0.5/255,1/255,2/255,4/255,8/255,16/255)")
    g.add_argument("--sweep-eps-l2", type=NUMBERS, default=cfg.SWEEP_EPS["L2"], metavar="EPS",
                   help="l_2 sweep (0.1,0.25,0.5,1,1.5,2)")


def add_presets(subparsers, commands: dict[str, Any]) -> None:
    parser = subparsers.add_parser("presets", help="list the reproduce presets and their settings",
                                   description="Print each preset (or the one named): what it "
                                               "is for and every setting it fixes.")
    parser.add_argument("name", nargs="?", help="one preset (default: all)")
    parser.set_defaults(func=commands["presets"])


def add_reproduce(subparsers, commands: dict[str, Any]) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="train standard + HaH network, evaluate both, write the paper's table",
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
    group.add_argument("--limit", type=COUNT, default=hidden, metavar="N|all",
                       help="a fixed seeded subset of N test images")
    group.add_argument("--attack-limit", type=COUNT, default=hidden, metavar="N|all",
                       help="attack a seeded N of them")
    group.add_argument("--noise", type=NUMBERS, metavar="SIGMAS", help="noise sigmas, e.g. 0.05,0.1")
    group.add_argument("--noise-draws", type=POSITIVE, default=hidden, help="noise draws per sigma")
    group.add_argument("--apgd-steps", type=POSITIVE, default=hidden, help="APGD steps")
    group.add_argument("--square-limit", type=NON_NEGATIVE, default=hidden, metavar="N",
                       help="Square attack on N images (0 = none)")
    group.add_argument("--no-attacks", action="store_true", help="skip the adversarial attacks")
    group.add_argument("--attacks", dest="suite", choices=cfg.ATTACK_SUITES, default=hidden,
                       help="attack suite (paper); adaptive and all also transfer between "
                            "the two networks")
    group.add_argument("--restarts", type=POSITIVE, default=hidden,
                       help="restarts of the margin and BPDA attacks (3)")
    group.add_argument("--adaptive-limit", type=POSITIVE, default=hidden, metavar="N",
                       help="margin, BPDA and transfer on N of the attacked images (500)")
    group.add_argument("--adaptive-batch-size", type=POSITIVE, default=hidden, metavar="B",
                       help="batch size of the attacks beyond the paper's (--eval-batch-size)")
    group.add_argument("--cascade", action="store_true", default=hidden,
                       help="each adaptive attack only on the images the ones before it left")
    group.add_argument("--eval-batch-size", type=POSITIVE, default=128,
                       help="evaluation batch size (128)")
    add_train_options(parser)
    parser.set_defaults(func=commands["reproduce"])


def _list(convert, accepted: str):
    def parse(text: str) -> tuple:
        values = tuple(convert(p.strip()) for p in text.split(",") if p.strip())
        if not values:
            raise ValueError(text)
        return values
    return typed(parse, accepted)


NORMS = _list(str, "Linf, L2 or Linf,L2")


def _choice(allowed: dict[str, Any]):
    def convert(text: str) -> Any:
        if text.lower() not in allowed:
            raise ValueError(text)
        return allowed[text.lower()]
    return convert


def add_bench(subparsers, commands: dict[str, Any]) -> None:
    parser = subparsers.add_parser(
        "bench", help="time HaH training vs plain and reference training, blocks, eval",
        description="Time, in one run: (a) a HaH network's step (--model, VGG16 by default) "
                    "with the one-pass HaH objective, "
                    "(b) a plain cross-entropy step of the same network, (c) a step of the "
                    "authors' reference procedure, (d) a standard network's step, (e) each HaH "
                    "block alone, (f) clean and APGD-CE evaluation throughput. Prints a table "
                    "with the ratios a/b, c/a, a/d; medians of interleaved repeats.")
    positive = POSITIVE
    parser.add_argument("--model", choices=list(ARCHITECTURES),
                        help="the network of steps (a)-(d) and the evaluation (vgg16)")
    parser.add_argument("--width", type=_list(float, "comma-separated widths > 0"),
                        help="comma-separated widths (default 0.25,1.0; --quick: 0.0625)")
    parser.add_argument("--batch-size", type=positive, help="training batch size (128; --quick: 8)")
    parser.add_argument("--precision", type=_list(_choice({"fp32": "fp32", "bf16": "bf16"}),
                                                  "fp32, bf16 or fp32,bf16"),
                        help="fp32, bf16 or fp32,bf16 (default fp32; bf16 = CPU autocast)")
    parser.add_argument("--channels-last", type=_list(_choice({"on": True, "off": False}),
                                                      "on, off or on,off"),
                        help="on, off or on,off (default off)")
    parser.add_argument("--repeats", type=positive, help="timed rounds per measurement (5)")
    parser.add_argument("--warmup", type=NON_NEGATIVE, help="untimed warm-up rounds (1)")
    parser.add_argument("--apgd-steps", type=positive, help="APGD-CE iterations (5)")
    parser.add_argument("--sections", type=_list(_choice({s: s for s in ("steps", "blocks", "eval")}),
                                                 "a comma-separated subset of steps,blocks,eval"),
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
    parser.set_defaults(func=commands["bench"])


def add_sweep(subparsers, commands: dict[str, Any]) -> None:
    parser = subparsers.add_parser(
        "sweep", help="train a declared grid of runs over seeds, evaluate on held-out images",
        description="Run the sweep file's grid (resumable: finished runs and evaluations are "
                    "reused, runs with other settings refused), evaluate every run on its "
                    "held-out images, write OUT/report.md, results.json and plots with mean +- "
                    "sd over seeds and the HaH-minus-standard gain paired by seed. With "
                    "--compare SETTING: report finished sweeps that differ in that training "
                    "setting alone, side by side (nothing is trained or evaluated).")
    parser.add_argument("file", nargs="+", metavar="FILE",
                        help="sweep file (TOML; see docs/sweep.md); with --compare, several "
                             "FILE[=DIR], DIR its sweep directory (default runs/sweeps/<name>)")
    parser.add_argument("--out", help="sweep directory (default runs/sweeps/<name>); with "
                                      "--compare the report's directory "
                                      "(default runs/sweeps/<names>-by-<setting>)")
    parser.add_argument("--compare", metavar="SETTING",
                        help="compare the sweeps by this training setting, e.g. width")
    parser.add_argument("--epoch", type=POSITIVE, action="append", metavar="E",
                        help="with --compare: the epoch to compare (repeatable; default the "
                             "snapshot before the first lr drop and the last evaluated)")
    add_data(parser, download=False)
    parser.add_argument("--jobs", type=POSITIVE, default=2, help="runs at a time (2)")
    parser.add_argument("--threads", type=POSITIVE, default=1, help="threads per run (1)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--re-evaluate", action="store_true", help="evaluate again even when saved")
    parser.add_argument("--report-only", action="store_true",
                        help="only summarise what is finished (no training or evaluation)")
    parser.add_argument("--status", action="store_true",
                        help="only print every task's state and the compute left at the rates "
                             "measured so far (nothing is trained, evaluated or written)")
    parser.set_defaults(func=commands["sweep"])
