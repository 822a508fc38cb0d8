"""The ``hahnet eval`` flow once its flags are checked: load the checkpoints and the data,
print an ETA, evaluate each checkpoint under progress bars, write the report. Under
torchrun every rank evaluates its shard; rank 0 alone prints and writes."""

from __future__ import annotations

import argparse
import contextlib
import io

from hahnet.cli import console
from hahnet.config import EvalSettings
from hahnet.errors import UserError
from hahnet.training.run import DEFAULT_DATA, load_data


def run(args: argparse.Namespace, settings: EvalSettings) -> int:
    from hahnet.training import distributed
    from hahnet.training.device import resolve_device

    try:
        env = distributed.setup(resolve_device(args.device), args.dist_timeout)
    except ValueError as error:
        raise UserError(str(error)) from None
    try:
        if env.is_main:
            return evaluate_and_report(args, settings, env)
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            try:
                evaluate_and_report(args, settings, env)
            except UserError as error:  # rank 0 meets the same problem and reports it
                error.quiet = True
                raise
        return 0
    finally:
        distributed.teardown(env)


def _split(dataset, split: str, checkpoints):
    from hahnet.eval.runner import EvalError, evaluation_split

    try:
        return evaluation_split(dataset, split, checkpoints)
    except EvalError as error:
        raise UserError(str(error)) from None


def evaluate_and_report(args: argparse.Namespace, settings: EvalSettings, env) -> int:
    from hahnet.training import checkpoint
    from hahnet.reporting import evaluation as report
    from hahnet.eval.runner import data_record

    models = _load_all(args.checkpoints, env.device)
    sources = _load_all(getattr(args, "transfer_from", None) or [], env.device)
    dataset = load_data(args.data or DEFAULT_DATA, args.cache_dir, say=console.say)
    test = _split(dataset, args.split, [(path, info) for path, info, _ in models])
    test = test.limit(args.limit, args.limit_seed) if args.limit else test
    eta = sum(console.check_and_estimate(path, info, model, test, settings, env.device)
              for path, info, model in models)
    console.say(f"evaluating {len(models)} checkpoint(s) on {len(test)} test images on "
                f"{env.device}; ETA ~{console.minutes(eta)} (attacks estimated as if every "
                f"image survived every stage)")
    _check_sources(models, sources)
    journal = _journal(args.out, env.is_main)
    results = [console.evaluate_with_progress(model, test.images, test.labels, settings,
                                              env.device, path, info, env,
                                              transfer_sources(path, sources), journal)
               for path, info, model in models]
    from hahnet.cli import corruptions as corruption_cli

    corruption_cli.evaluate(args, env, models, test, results)  # if --corruptions
    if not env.is_main:
        return 0
    data = data_record(args.data or DEFAULT_DATA, dataset, test, args.limit, args.limit_seed,
                       args.split)
    paths = report.write_report(results, args.out, data)
    journal.clear()
    print(report.paper_table(results))
    console.warn_gradient_masking(results, paths["report.md"])
    print(f"report: {paths['report.md']}")
    return 0


def _journal(out: str, is_main: bool):
    """The attack rows (and batches) of an unfinished evaluation into ``out``
    (OUT/partial), reused by the next run with the same checkpoints, images and settings;
    rank 0 alone writes rows, every rank its own batches."""
    from pathlib import Path

    from hahnet.eval.journal import Journal

    journal = Journal(Path(out) / "partial", write=is_main,
                      on_resume=lambda row: console.say(f"resumed: {row}, saved by an "
                                                        f"unfinished run"))
    saved = journal.saved_summary()
    if saved:
        console.say(f"{journal.directory}: {saved} of an unfinished evaluation; those made "
                    f"the same way are reused (delete the folder to start afresh)")
    return journal


def _load_all(paths, device) -> list:
    """(path, info, model) of each checkpoint; a one-line UserError for a bad one."""
    from hahnet.training import checkpoint

    loaded = []
    for path in paths:
        try:
            loaded.append((path, checkpoint.read_info(path), checkpoint.load(path, device=device)))
        except checkpoint.CheckpointError as error:
            raise UserError(str(error)) from None
    return loaded


def _check_sources(models, sources) -> None:
    """Transfer sources must take the same images and predict the same classes."""
    for source_path, _, source in sources:
        for path, _, model in models:
            mine, theirs = model.config, source.config
            if (mine.in_channels, mine.num_classes) != (theirs.in_channels, theirs.num_classes):
                raise UserError(f"--transfer-from {source_path}: {theirs.in_channels} channels and "
                                f"{theirs.num_classes} classes, but {path} has {mine.in_channels} "
                                f"and {mine.num_classes}; transfer needs the same")


def transfer_sources(path: str, sources) -> list:
    """(name, model) of the transfer sources for the checkpoint at ``path``, without
    itself (its own examples are the white-box attacks)."""
    from hahnet.training import checkpoint
    from hahnet.eval.runner import checkpoint_name

    own = checkpoint.resolve(path).resolve()
    return [(checkpoint_name(p), model) for p, _, model in sources
            if checkpoint.resolve(p).resolve() != own]
