"""A run directory's files, and their one reader and writer.

``RUN/train_config.json`` (the TrainConfig, flat, plus ``"data"``: where the training
images came from), ``RUN/metrics.jsonl`` (one :class:`hahnet.training.trainer.EpochMetrics` line per
epoch), the checkpoint files of :mod:`hahnet.training.checkpoint` (``model.safetensors``,
``model.json``, ``train_state.*``) and ``RUN/snapshots/epochE.safetensors``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hahnet.config import TrainConfig
from hahnet.io import atomic_write, read_json, write_json, write_text

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"  # the weights (hahnet.training.checkpoint writes them)...
INFO_FILE = "model.json"          # ...and their description with the checksum
SNAPSHOT_DIR = "snapshots"
TIME_BUDGET_FILE = "time_budget.json"  # how a --time-budget run chose its epochs
SAVING_DIR = ".saving"      # an epoch's checkpoint files are written here first...
COMMIT_MARK = "COMMITTED"   # ...and moved into the run only once this marker exists


def sidecar(file: Path) -> Path:
    """The JSON that describes a .safetensors file and records its SHA-256
    (model.safetensors -> model.json, snapshots/epoch7.safetensors -> epoch7.json)."""
    return Path(file).with_suffix(".json")


def snapshot_path(run_dir: str | Path, epoch: int) -> Path:
    """Where ``train --snapshots`` keeps the weights after (1-based) ``epoch``."""
    return Path(run_dir) / SNAPSHOT_DIR / f"epoch{epoch}.safetensors"


class RunDir:
    """The files of one training run (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def has_checkpoint(self) -> bool:
        """Whether a run can be continued from here (settings and weights saved)."""
        return self.config_file.exists() and (self.path / MODEL_FILE).exists()

    def snapshot_path(self, epoch: int) -> Path:
        """Where ``train --snapshots`` keeps the weights after (1-based) ``epoch``."""
        return snapshot_path(self.path, epoch)

    # ------------------------------------------------------------- train_config.json

    def read_config(self) -> tuple[TrainConfig | None, str | None]:
        """The run's settings and data path; (None, None) before the first save. Reads
        this version's form (flat, with "data") and the earlier flat and nested
        ({"config": ..., "data": ...}) forms; ValueError for an unreadable file."""
        if not self.config_file.exists():
            return None, None
        try:
            saved = read_json(self.config_file)
            if isinstance(saved.get("config"), dict):  # the older nested form
                saved = {**saved["config"], "data": saved.get("data")}
            config = TrainConfig.from_dict(saved)
        except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as error:
            raise ValueError(f"unreadable {self.config_file} ({error})") from None
        data = saved.get("data")
        if not data and (self.path / INFO_FILE).exists():  # older runs: the checkpoint's record
            data = (read_json(self.path / INFO_FILE).get("dataset") or {}).get("source")
        return config, data

    def write_config(self, config: TrainConfig, data: str | None) -> None:
        """Record the run's settings and data path (atomically)."""
        write_json(self.config_file, {**config.to_dict(), "data": data})

    def mismatch(self, wanted: TrainConfig) -> str | None:
        """How this run's saved settings differ from ``wanted`` (runtime options such as
        precision do not count), or None when they match or nothing is saved yet."""
        try:
            saved, _ = self.read_config()
        except ValueError as error:
            return str(error)
        if saved is None:
            return None
        diffs = saved.differences(wanted)
        return "; ".join(f"{k} {a!r} there vs {b!r} wanted" for k, (a, b) in diffs.items()) or None

    # ---------------------------------------------------------------- metrics.jsonl

    def history(self) -> list[dict[str, Any]]:
        """Per-epoch training metrics, the last entry per epoch (a resumed run may have
        logged an epoch twice); [] when the run has none yet."""
        if not self.metrics_file.exists():
            return []
        by_epoch: dict[int, dict[str, Any]] = {}
        for number, line in enumerate(self.metrics_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                by_epoch[int(entry["epoch"])] = entry
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(f"{self.metrics_file}:{number}: not a metrics line; delete the "
                                 f"file's broken lines or the run directory") from None
        return [by_epoch[e] for e in sorted(by_epoch)]

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def truncate_metrics(self, next_epoch: int) -> None:
        """Drop metric lines of epochs that will be re-run after a resume."""
        if not self.metrics_file.exists():
            return
        kept = [line for line in self.metrics_file.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["epoch"] < next_epoch]
        write_text(self.metrics_file, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------- time_budget.json

    def read_time_budget(self) -> dict[str, Any] | None:
        """The choice a budgeted run (or experiment) made here, or None."""
        path = self.path / TIME_BUDGET_FILE
        return read_json(path) if path.exists() else None

    def write_time_budget(self, record: dict[str, Any]) -> None:
        write_json(self.path / TIME_BUDGET_FILE, record)

    # ------------------------------------------------------------------ checkpoints

    def save_snapshot(self, epoch: int) -> None:
        """Copy the current weights (and their description with the checksum) to
        :meth:`snapshot_path` (1-based ``epoch``)."""
        target = self.snapshot_path(epoch)
        atomic_write(target, lambda tmp: shutil.copyfile(self.path / MODEL_FILE, tmp))
        atomic_write(sidecar(target), lambda tmp: shutil.copyfile(
            self.path / INFO_FILE, tmp))

    # ------------------------------------------- saving that survives a kill anywhere

    def begin_save(self) -> Path:
        """An empty staging folder for one epoch's checkpoint files (see :meth:`commit_save`)."""
        staging = self.path / SAVING_DIR
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def commit_save(self, staging: Path) -> None:
        """Move the staged files into the run. Writing the marker is the commit point: a
        kill before it leaves the previous epoch's files whole, a kill after it is finished
        by :meth:`recover`."""
        names = sorted(p.name for p in staging.iterdir())
        write_text(staging / COMMIT_MARK, "\n".join(names) + "\n")
        self._finish_save(staging)

    def _finish_save(self, staging: Path) -> None:
        for name in (staging / COMMIT_MARK).read_text(encoding="utf-8").split():
            if (staging / name).exists():
                os.replace(staging / name, self.path / name)
        shutil.rmtree(staging)

    def recover(self, snapshots: tuple[int, ...] = ()) -> None:
        """Make the run whole after a kill, before resuming it (its owner only): finish a
        committed save or drop an uncommitted one, drop a half-written metrics line, and
        add the last saved epoch's metrics line and snapshot if the kill came before them."""
        staging = self.path / SAVING_DIR
        if (staging / COMMIT_MARK).exists():
            self._finish_save(staging)
        elif staging.exists():
            shutil.rmtree(staging)
        self._drop_torn_metrics_line()
        info_file = self.path / INFO_FILE
        if not info_file.exists() or not (self.path / MODEL_FILE).exists():
            return
        info = read_json(info_file)
        epoch, metrics = info.get("epoch"), info.get("metrics")
        done = self.history()
        if isinstance(metrics, dict) and (not done or done[-1]["epoch"] < epoch):
            self.append_metrics(metrics)
        if epoch is not None and epoch + 1 in snapshots and not self.snapshot_path(epoch + 1).exists():
            self.save_snapshot(epoch + 1)

    def _drop_torn_metrics_line(self) -> None:
        if not self.metrics_file.exists():
            return
        text = self.metrics_file.read_text(encoding="utf-8")
        lines = text.splitlines()
        if not lines:
            return
        try:
            json.loads(lines[-1])
            complete = text.endswith("\n")
        except json.JSONDecodeError:
            complete = False
        if not complete:
            write_text(self.metrics_file, "".join(line + "\n" for line in lines[:-1]))
