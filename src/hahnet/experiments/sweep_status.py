"""Where a sweep stands, read from its directory alone (nothing is trained or evaluated):
each task done, partly done or still to do, and the compute time it still needs at the
rates this sweep has measured so far. For sweeps that take days: what is left, and
whether it fits the time there is."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from hahnet.config import EvalSettings
from hahnet.eval.journal import Journal
from hahnet.eval.results import AttackSuite
from hahnet.eval.runner import makes_row
from hahnet.experiments.sweep import (Sweep, Task, is_done, journal_dir, read_eval, run_dir,
                                      task_file, task_settings, tasks)
from hahnet.training.rundir import RunDir


@dataclass(frozen=True)
class TaskStatus:
    """One task's state ("done", "partial" or "to do"), what of it is done, and the
    seconds of one process's compute it still needs (None: nothing comparable measured)."""

    label: str
    kind: str
    state: str
    progress: str
    seconds_left: float | None


def status(sweep: Sweep, out: str | Path) -> list[TaskStatus]:
    """Every task of ``sweep`` in ``out``, in the sweep's order. Estimates come from the
    closest measurement: the run's own (its median epoch; its finished evaluation of the
    same kind), else the same setting's other seeds, else the sweep's seconds per unit
    of planned cost; an evaluation's estimate excludes what its saved attack rows cost,
    norm by norm (a folder shared by ``[eval]`` and ``[adaptive]`` counts for each only
    the rows that it makes)."""
    out = Path(out)
    every = tasks(sweep)
    finished = {id(t): is_done(sweep, out, t) for t in every}
    histories = {t.run.key: RunDir(run_dir(out, t.run)).history() for t in every if t.kind == "train"}
    measured = {id(t): _epoch_seconds(histories[t.run.key]) if t.kind == "train"
                else _eval_seconds(out, t) for t in every}
    trained = {t.run.key for t in every if t.kind == "train" and finished[id(t)]}
    return [_train_status(t, out, histories[t.run.key], finished[id(t)],
                          _total(_estimate(t, every, measured)))
            if t.kind == "train" else
            _eval_status(t, out, finished[id(t)], _estimate(t, every, measured), trained,
                         task_settings(sweep, t))
            for t in every]


def seconds_left(rows: list[TaskStatus]) -> tuple[float, int]:
    """(the estimated seconds left over all tasks, how many unfinished tasks have no
    estimate yet)."""
    known = [r.seconds_left for r in rows if r.seconds_left is not None]
    unknown = sum(1 for r in rows if r.state != "done" and r.seconds_left is None)
    return sum(known), unknown


Phases = dict[str, float]  # seconds per phase: a training epoch ("epoch"), or an
                           # evaluation's "clean", "noise", ..., "attacks_Linf", ...


def _estimate(task: Task, every: list[Task], measured: dict[int, Phases | None]) -> Phases | None:
    """Seconds per phase of one unit of ``task`` (a training epoch, a whole evaluation):
    its own measurement, else the mean over the same setting's other seeds, else the
    sweep's measured seconds per unit of planned cost, scaled to this task's cost."""
    same_kind = [t for t in every if t.kind == task.kind and measured[id(t)]]
    for group in ([t for t in same_kind if t.run.key == task.run.key and t.epoch == task.epoch],
                  [t for t in same_kind if t.run.key == task.run.key],
                  [t for t in same_kind if t.run.name == task.run.name]):
        if group:
            return _mean([measured[id(t)] for t in group])
    if not same_kind:
        return None
    per_unit = _mean([{k: v / _unit_cost(t) for k, v in measured[id(t)].items()}
                      for t in same_kind])
    return {k: v * _unit_cost(task) for k, v in per_unit.items()}


def _mean(phases: list[Phases]) -> Phases:
    keys = sorted({k for p in phases for k in p})
    return {k: statistics.mean(p.get(k, 0.0) for p in phases) for k in keys}


def _total(phases: Phases | None) -> float | None:
    return None if phases is None else sum(phases.values())


def _unit_cost(task: Task) -> float:
    return task.cost / task.run.config.epochs if task.kind == "train" else task.cost


def _train_status(task: Task, out: Path, history: list[dict[str, Any]], done: bool,
                  epoch_seconds: float | None) -> TaskStatus:
    epochs = task.run.config.epochs
    if done:
        return TaskStatus(task.label, task.kind, "done", f"{epochs} epochs", 0.0)
    left = epochs - len(history)
    if history and not RunDir(run_dir(out, task.run)).has_checkpoint():
        progress, left = f"{len(history)} epochs logged, no checkpoint: trained again", epochs
    elif history:
        progress = f"epoch {len(history)} of {epochs}"
    else:
        progress = f"{epochs} epochs"
    return TaskStatus(task.label, task.kind, "partial" if history and left < epochs else "to do",
                      progress, None if epoch_seconds is None else left * epoch_seconds)


def _epoch_seconds(history: list[dict[str, Any]]) -> Phases | None:
    """The median epoch of a run's history (steadier than the mean on a shared machine)."""
    if not history:
        return None
    median = statistics.median(float(h.get("seconds", 0.0)) for h in history)
    return {"epoch": median} if median else None


def _eval_status(task: Task, out: Path, done: bool, estimate: Phases | None,
                 trained: set[str], settings: EvalSettings) -> TaskStatus:
    if done:
        return TaskStatus(task.label, task.kind, "done", "saved", 0.0)
    journal = Journal(journal_dir(out, task.run, task.epoch))
    owns = partial(makes_row, settings)
    saved = journal.saved_summary(owns)
    if saved:
        return TaskStatus(task.label, task.kind, "partial", f"{saved} saved",
                          _left(estimate, journal.saved_seconds(owns)))
    waiting = [key for key in task.needs if key not in trained]
    progress = f"after {', '.join(waiting)}" if waiting else (
        "the saved one does not match (settings or checkpoint): evaluated again"
        if task_file(out, task).exists() else "")
    return TaskStatus(task.label, task.kind, "to do", progress, _total(estimate))


def _left(estimate: Phases | None, saved: dict[str, float]) -> float | None:
    """What a stopped evaluation still needs: each attack phase less what its saved rows
    of that norm cost (never below zero), and the rest in full (clean accuracy, noise and
    the layer statistics are measured again on resuming)."""
    if estimate is None:
        return None
    return sum(max(seconds - saved.get(phase.removeprefix("attacks_"), 0.0), 0.0)
               if phase.startswith("attacks_") else seconds
               for phase, seconds in estimate.items())


def _eval_seconds(out: Path, task: Task) -> Phases | None:
    """The compute seconds per phase a saved evaluation took: its phases' wall time, where
    an attack phase counts at least its rows' own seconds (a resumed evaluation restores
    rows and batches from its journal in no time, but they cost their first sitting's)."""
    try:
        result = read_eval(task_file(out, task))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    phases = {k: float(v) for k, v in result.seconds.items()}
    for norm, suite in result.attacks.items():
        key = f"attacks_{norm}"
        phases[key] = max(phases.get(key, 0.0), _rows_seconds(suite))
    return phases if sum(phases.values()) else None


def _rows_seconds(suite: AttackSuite) -> float:
    """The seconds of every attack row of one norm, each counted once (the worst case
    only combines rows already counted)."""
    rows = [suite.apgd, suite.pgd, suite.square]
    sweeps = []
    if suite.adaptive is not None:
        rows += list(suite.adaptive.rows.values())
        sweeps = suite.adaptive.sweeps
    return sum(r.seconds for r in rows if r is not None) + sum(w.seconds for w in sweeps)
