"""``hahnet eval --corruptions``: the flags, and the one call that evaluates every loaded
checkpoint on the cached corrupted test set under a tqdm bar (with ETA) and compares
them to the first (the baseline). The library parts are :mod:`hahnet.eval.corruptions.evaluate`
and :mod:`hahnet.reporting.corruptions`; this module alone prints (to stderr)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from hahnet.eval.corruptions import evaluate as ec


def _arg(parse):
    def convert(text: str):
        try:
            return parse(text)
        except ec.EvalError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = parse.__name__
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common corruptions (CIFAR-10-C; docs/corruptions.md)")
    group.add_argument("--corruptions", type=_arg(ec.parse_names), metavar="all|NAME,...",
                       help="also measure accuracy under these corruptions: all (the 15), "
                            "families (noise,blur,weather,digital,extra) or names")
    group.add_argument("--severities", type=_arg(ec.parse_severities), default=(1, 2, 3, 4, 5),
                       metavar="1-5", help="severities, a range or list (1-5)")
    group.add_argument("--corruption-seed", type=int, default=0, metavar="S",
                       help="seed of the corrupted copies (0)")


def evaluate(args: argparse.Namespace, env: Any, models: Sequence[tuple[str, dict, Any]],
             test: Any, results: Sequence[Any]) -> None:
    """If ``--corruptions`` was given: fill ``result.corruptions`` of each result (models
    in order; the first is the baseline of mCE) and, on rank 0, draw the example grid into
    ``args.out``. Errors become the CLI's one-line UserError."""
    if not getattr(args, "corruptions", None):
        return
    from tqdm import tqdm

    from hahnet.reporting import corruptions as report_corruptions
    from hahnet.errors import UserError
    from hahnet.data.datasets import default_cache_dir
    from hahnet.eval.runner import checkpoint_name

    cache = ec.CorruptionCache(test.images, args.cache_dir or default_cache_dir(),
                               args.corruption_seed)
    bar: dict[str, Any] = {"current": None}

    def close() -> None:
        if bar["current"] is not None:
            bar["current"].close()
            bar["current"] = None

    for (path, _, model), result in zip(models, results):
        name = checkpoint_name(path)

        def open_bar(phase: str, total: int, name: str = name):
            close()
            bar["current"] = tqdm(total=total, desc=f"{name}: {phase}", unit="img",
                                  leave=False, dynamic_ncols=True, file=sys.stderr)
            return bar["current"].update

        try:
            result.corruptions = ec.evaluate_corruptions(
                model, test.images, test.labels, args.corruptions, args.severities,
                args.corruption_seed, batch_size=args.batch_size, device=env.device,
                progress=open_bar, env=env, cache=cache)
        except ec.EvalError as error:
            raise UserError(f"{path}: {error}") from None
        finally:
            close()
        c = result.corruptions
        tqdm.write(f"{name}: corruptions: clean {100 * c.clean_accuracy:.1f}%, mean "
                   f"{100 * ec.mean_accuracy(c):.1f}% ({c.seconds:.0f} s; cache "
                   f"{cache.folder})", file=sys.stderr)
    ec.compare([r.corruptions for r in results], results[0].name)
    if env.is_main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report_corruptions.plot_examples(cache, args.corruptions,
                                         out / report_corruptions.EXAMPLES,
                                         3 if 3 in args.severities else args.severities[0])
