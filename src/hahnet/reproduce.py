"""The pieces of ``hahnet reproduce`` that are not command-line plumbing: where each run
lives, reading a run's training history, reusing a saved evaluation only when it measured
the same checkpoint with the same settings, and the report's preamble."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hahnet.evaluate import EvalResult, EvalSettings
from hahnet.presets import Preset
from hahnet.train import CONFIG_FILE, RUNTIME_OPTIONS, TrainConfig

RUNS = ("standard", "hah")  # the two networks the paper compares, in table order
EVAL_DIR = "eval"           # per-run evaluation (results.json, report.md) inside its run dir
METRICS_FILE = "metrics.jsonl"


def run_dirs(out: str | Path) -> dict[str, Path]:
    """The run directory of each network under the experiment directory ``out``."""
    return {name: Path(out) / name for name in RUNS}


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Per-epoch training metrics of a run (``metrics.jsonl``), the last entry per epoch
    (a resumed run may have logged an epoch twice); [] when the run has none yet."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            by_epoch[int(entry["epoch"])] = entry
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{path}:{number}: not a metrics line; delete the file's broken "
                             f"lines or the run directory") from None
    return [by_epoch[e] for e in sorted(by_epoch)]


def config_mismatch(run_dir: str | Path, wanted: dict[str, Any]) -> str | None:
    """How the run in ``run_dir`` was trained differently from ``wanted`` (TrainConfig
    fields; runtime options such as precision do not count), or None when it matches or
    has not started."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved = TrainConfig.from_dict(saved.get("config", saved)).to_dict()
    except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as error:
        return f"unreadable {path} ({error})"
    target = TrainConfig.from_dict(wanted).to_dict()
    diffs = [f"{k} {saved[k]!r} there vs {target[k]!r} wanted" for k in target
             if k not in RUNTIME_OPTIONS and not _same(saved.get(k), target[k])]
    return "; ".join(diffs) or None


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
    return _same(saved, record) and _same(cached.info, json.loads(json.dumps(info)))


def _same(a: Any, b: Any) -> bool:
    """Equality of JSON values, with floats compared to 1e-12 (2/255 survives JSON)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    return a == b


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
