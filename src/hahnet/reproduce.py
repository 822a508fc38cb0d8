"""The pieces of ``hahnet reproduce`` that are not command-line plumbing: where each run
lives, reading a run's training history, reusing a saved evaluation only when it measured
the same checkpoint with the same settings, and the report's preamble."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hahnet.config import EvalSettings, same_json
from hahnet.eval.results import EvalResult
from hahnet.presets import Preset

RUNS = ("standard", "hah")  # the two networks the paper compares, in table order
EVAL_DIR = "eval"           # per-run evaluation (results.json, report.md) inside its run dir


def run_dirs(out: str | Path) -> dict[str, Path]:
    """The run directory of each network under the experiment directory ``out``."""
    return {name: Path(out) / name for name in RUNS}


def settings_record(settings: EvalSettings, limit: int | None) -> dict[str, Any]:
    """The evaluation settings as stored in results.json (JSON types), plus the subset."""
    return json.loads(json.dumps({**asdict(settings), "limit": limit}))


def reusable(cached: EvalResult, info: dict[str, Any], settings: EvalSettings,
             limit: int | None) -> bool:
    """Whether a saved evaluation measured this very checkpoint (same saved info: epoch,
    config, metrics) with these settings on the same test subset."""
    record = settings_record(settings, limit)
    saved = dict(cached.settings)
    saved.setdefault("limit", None)
    return same_json(saved, record) and same_json(cached.info, json.loads(json.dumps(info)))


def preamble(preset: Preset, train: dict[str, Any], command: str, data_label: str,
             plan: dict[str, Any] | None = None) -> str:
    """Markdown opening the reproduce report: what was run, on what, and how to rerun it
    (and, for a time-budgeted run, how its epochs were chosen)."""
    keys = sorted(train)
    settings = ", ".join(f"{k}={_show(train[k])}" for k in keys)
    lines = [
        f"Preset **{preset.name}**: {preset.description}", "",
        f"Dataset: {data_label}.  ",
        f"Training settings (both networks): {settings}.  ",
        f"Regenerate with: `{command}` (resumable; finished training and evaluations "
        f"are reused).",
    ]
    if plan:
        from hahnet.budget import describe

        evaluation = plan.get("evaluation_seconds", {})
        lines += ["", f"**Time budget.** {describe(plan)}; evaluation of both networks "
                      f"estimated at {sum(evaluation.values()):.0f} s, "
                      f"{plan.get('elapsed_seconds_before_training', 0):.0f} s spent before "
                      f"training (start-up, data, warm-up) on {plan.get('device', '?')}. "
                      f"The schedule's milestones are fractions of these epochs."]
    return "\n".join(lines)


# Attacks run on the images still standing after each stage (APGD-T only where APGD-CE
# failed...), while estimate_seconds assumes every image survives every stage: count this
# share of its attack estimate. Measured survivors at 2/255 are ~10-30% after APGD-CE.
ATTACK_SHARE = 0.5


def plan_time_budget(train: dict[str, Any], out: str | Path, dataset: Any, device: Any,
                     settings: EvalSettings, limit: int | None, most: int | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training settings with the epochs that fit ``train['time_budget']`` minutes
    for BOTH networks' training plus their evaluation (same epochs for both), counted from
    this process's start; ``time_budget`` itself is dropped (the networks train for the
    fixed count chosen here). The record is saved in ``out`` and in each run directory
    (model.json then carries it); an experiment that already chose keeps its epochs.
    ``most``: the most epochs to choose (an explicit --epochs), else the paper's 100, so
    that a long budget on a small preset trains longer than the preset's own count."""
    from hahnet import budget
    from hahnet.config import TrainConfig
    from hahnet.eval.runner import estimate_seconds
    from hahnet.models import build_model

    minutes = float(train["time_budget"])
    train = {k: v for k, v in train.items() if k != "time_budget"}
    saved = budget.read_plan(out)
    if saved is not None:
        return {**train, "epochs": int(saved["epochs"])}, saved
    configs = {name: TrainConfig.from_dict({**train, "hah": name == "hah"}) for name in RUNS}
    measured = {name: budget.measure(config, dataset, device) for name, config in configs.items()}
    test = dataset.test.limit(limit, 0) if limit else dataset.test
    evaluation = {}
    for name, config in configs.items():
        model = build_model(config.model_config(dataset)).to(device).eval()
        estimate = estimate_seconds(model, settings, len(test), tuple(test.images.shape[1:]),
                                    device=device)
        attacks = sum(v for k, v in estimate.items() if k.startswith("attacks_"))
        evaluation[name] = round(estimate["total"] - (1 - ATTACK_SHARE) * attacks, 1)
        del model
    elapsed = budget.process_age()
    reserved = sum(evaluation.values()) + budget.MARGIN * minutes * 60
    epochs = budget.epochs_within(minutes * 60 - elapsed,
                                  [t.epoch_seconds() for t in measured.values()],
                                  reserved, most or budget.MOST_EPOCHS)
    record = budget.plan_record(minutes, measured, epochs, reserved)
    record.update(evaluation_seconds=evaluation, attack_share=ATTACK_SHARE,
                  elapsed_seconds_before_training=round(elapsed, 1), device=str(device))
    for directory in (out, *run_dirs(out).values()):
        budget.write_plan(directory, record)
    return {**train, "epochs": epochs}, record


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return str(value)
