"""What the command line shows while it works: tqdm bars for training and evaluation,
per-epoch lines, ETAs and warnings, all on stderr. Only :mod:`hahnet.cli.commands` uses this
module; the library itself never prints (it reports through callbacks).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hahnet.errors import UserError


def say(message: str) -> None:
    """One progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def fit_with_progress(trainer, quiet: bool, tensorboard: bool = False) -> None:
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


def evaluate_with_progress(model, images, labels, settings, device, path: str,
                           info: dict[str, Any], env=None, sources=(), journal=None):
    """Evaluate one loaded checkpoint under a tqdm bar per phase and print its summary."""
    from tqdm import tqdm

    from hahnet.eval import runner as ev
    from hahnet.eval.results import summary, worst_cases

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
                                   name=name, checkpoint=str(path), info=info, env=env,
                                   sources=sources, journal=journal)
    except ev.EvalError as error:
        raise UserError(f"{path}: {error}") from None
    finally:
        close_bar()
    numbers = summary(result)
    numbers.update({f"worst case {norm}": r.accuracy
                    for norm, r in worst_cases(result).items()})
    tqdm.write(f"{name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in numbers.items()
                                        if v is not None)
               + f" ({sum(result.seconds.values()):.0f} s)", file=sys.stderr)
    return result


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
