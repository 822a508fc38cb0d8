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


def preamble(preset: Preset, train: dict[str, Any], command: str, data_label: str) -> str:
    """Markdown opening the reproduce report: what was run, on what, and how to rerun it."""
    keys = sorted(train)
    settings = ", ".join(f"{k}={_show(train[k])}" for k in keys)
    return "\n".join([
        f"Preset **{preset.name}**: {preset.description}", "",
        f"Dataset: {data_label}.  ",
        f"Training settings (both networks): {settings}.  ",
        f"Regenerate with: `{command}` (resumable; finished training and evaluations "
        f"are reused).",
    ])


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return str(value)
