"""Sweeps: a declared grid of training runs over several seeds, evaluated on held-out
training images, summarised per setting as mean +- sd over seeds, with the HaH-minus-
standard gain of every metric paired by seed.

A sweep file (TOML) names shared training settings, a grid (every combination of its
values), optional explicit runs, the seeds, one evaluation spec and optionally an
adaptive one (the costly attacks with transfer between partners, on chosen seeds and
epochs); see docs/sweep.md. Runs live in ``OUT/runs/NAME-seedS`` (ordinary run
directories), evaluations in ``OUT/evals/NAME-seedS@EPOCH.json`` (adaptive:
``...@EPOCH.adaptive.json``); all are reused when their settings match, and a run
directory trained with other settings is refused before any work starts.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

from hahnet.training import checkpoint
from hahnet.config import EvalSettings, TrainConfig
from hahnet.eval.journal import Journal
from hahnet.eval.results import EvalResult, result_from_dict, results_json, reusable
from hahnet.experiments.sweep_file import (  # noqa: F401  (the sweep API, in one place)
    AdaptiveSpec, RunSpec, Sweep, SweepError, load, loads, parse, partner, transfer_sources)
from hahnet.io import write_json
from hahnet.training.rundir import RunDir

RUNS_DIR = "runs"
EVALS_DIR = "evals"


# ------------------------------------------------------------------ planning

@dataclass
class Task:
    """One unit of work: train a run, or evaluate one of its epochs (the ``[eval]`` or
    the ``[adaptive]`` evaluation)."""

    kind: str  # "train" | "eval" | "adaptive"
    run: RunSpec
    epoch: int = 0
    cost: float = 1.0  # relative, for the ETA and longest-first scheduling
    sources: tuple[RunSpec, ...] = ()  # adaptive: the transfer sources at the same epoch

    @property
    def label(self) -> str:
        if self.kind == "train":
            return self.run.key
        return f"{self.run.key}@{self.epoch}" + (" (adaptive)" if self.kind == "adaptive" else "")

    @property
    def needs(self) -> tuple[str, ...]:
        """The runs that must be trained before this task starts."""
        return () if self.kind == "train" else (self.run.key, *(s.key for s in self.sources))


def run_dir(out: Path, run: RunSpec) -> Path:
    return Path(out) / RUNS_DIR / run.key


def eval_file(out: Path, run: RunSpec, epoch: int) -> Path:
    return Path(out) / EVALS_DIR / f"{run.key}@{epoch}.json"


def adaptive_file(out: Path, run: RunSpec, epoch: int) -> Path:
    return Path(out) / EVALS_DIR / f"{run.key}@{epoch}.adaptive.json"


def journal_dir(out: Path, run: RunSpec, epoch: int) -> Path:
    """Where the unfinished evaluations of one checkpoint keep their attack rows: shared by
    its ``[eval]`` and ``[adaptive]`` evaluations, so the second reuses the paper's APGD row
    that both run first on the same images."""
    return eval_file(out, run, epoch).with_suffix(".partial")


def sibling_results(sweep: Sweep, out: Path, task: Task) -> list[Path]:
    """The result files of the other evaluations of ``task``'s checkpoint (they share its
    journal, which is kept until every one of them is written)."""
    kinds = {"eval": task.epoch in sweep.epochs_of(task.run),
             "adaptive": task.epoch in sweep.adaptive_epochs_of(task.run)}
    return [task_file(out, replace(task, kind=kind)) for kind, planned in kinds.items()
            if planned and kind != task.kind]


def task_file(out: Path, task: Task) -> Path:
    """Where an evaluation task's result is saved (``[eval]`` or ``[adaptive]``)."""
    return (adaptive_file if task.kind == "adaptive" else eval_file)(out, task.run, task.epoch)


def task_settings(sweep: Sweep, task: Task) -> EvalSettings:
    """The settings an evaluation task runs with (``[eval]``'s or ``[adaptive]``'s)."""
    if task.kind == "adaptive":
        assert sweep.adaptive is not None
        return sweep.adaptive.settings
    return sweep.settings


def _trained(directory: Path, epochs: int) -> bool:
    history = RunDir(directory).history()
    return bool(history) and history[-1]["epoch"] + 1 >= epochs \
        and (directory / checkpoint.MODEL_FILE).exists()


def _train_cost(config: TrainConfig, done_epochs: int = 0) -> float:
    images = config.limit_train or 50_000
    return (config.epochs - done_epochs) * images * config.width * (2.0 if config.hah else 1.0)


def _eval_cost(sweep: Sweep, run: RunSpec) -> float:
    config = run.config
    n = sweep.settings.attack_limit or sweep.limit or 10_000
    steps = sweep.settings.apgd_steps * (1 + 9) * len(sweep.settings.norms) if sweep.settings.attacks else 1
    return n * steps * 3 * config.width * (2.0 if config.hah else 1.0) / 40


def _adaptive_cost(sweep: Sweep, run: RunSpec) -> float:
    """About four APGD evaluations per norm (margin restarts, BPDA variants, transfer)."""
    assert sweep.adaptive is not None
    norms = len(sweep.adaptive.settings.norms) / max(1, len(sweep.settings.norms))
    return 4 * norms * _eval_cost(replace(sweep, settings=replace(sweep.settings, attacks=True)), run)


def check(sweep: Sweep, out: Path) -> None:
    """Refuse, before any work, run directories trained with other settings and
    unreadable histories or saved evaluations."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file; pass a directory")
    for run in sweep.runs:
        directory = run_dir(out, run)
        try:
            mismatch = RunDir(directory).mismatch(run.config)
            RunDir(directory).history()
        except ValueError as error:
            raise SweepError(str(error)) from None
        if mismatch:
            raise SweepError(f"{directory} holds a run with other settings ({mismatch}); "
                             f"pass another --out or delete {directory}")
        if sweep.split == "holdout" and not run.config.holdout:
            raise SweepError(f"run {run.name}: [eval] split 'holdout' needs holdout > 0 in its "
                             f"training settings (e.g. holdout = 0.05)")


def tasks(sweep: Sweep) -> list[Task]:
    """Every task of the sweep, finished or not: each run's training, its ``[eval]``
    epochs and its ``[adaptive]`` epochs (with the partners it transfers from)."""
    every = []
    for run in sweep.runs:
        config = run.config
        every.append(Task("train", run, cost=_train_cost(config)))
        every += [Task("eval", run, epoch, _eval_cost(sweep, run)) for epoch in sweep.epochs_of(run)]
        sources = transfer_sources(sweep, run)
        for epoch in sweep.adaptive_epochs_of(run):
            usable = tuple(s for s in sources if epoch in s.config.snapshots or epoch == s.config.epochs)
            every.append(Task("adaptive", run, epoch, _adaptive_cost(sweep, run), usable))
    return every


def is_done(sweep: Sweep, out: Path, task: Task) -> bool:
    """Whether ``task``'s output is in ``out``: a run trained to its last epoch, or an
    evaluation saved for this checkpoint with the sweep's settings (and sources)."""
    if task.kind == "train":
        return _trained(run_dir(out, task.run), task.run.config.epochs)
    return _saved_eval_matches(sweep, out, task)


def plan(sweep: Sweep, out: Path, re_evaluate: bool = False) -> tuple[list[Task], list[Task]]:
    """(training tasks, evaluation tasks) still to do; finished work is skipped. A
    half-trained run's cost counts only the epochs it still needs."""
    out = Path(out)
    trains, evals = [], []
    for task in tasks(sweep):
        if task.kind == "train":
            if not is_done(sweep, out, task):
                done = len(RunDir(run_dir(out, task.run)).history())
                trains.append(replace(task, cost=_train_cost(task.run.config, done)))
        elif re_evaluate or not is_done(sweep, out, task):
            evals.append(task)
    return trains, evals


def _saved_eval_matches(sweep: Sweep, out: Path, task: Task) -> bool:
    """Whether the saved evaluation of ``task`` (adaptive: transferring from exactly its
    sources) measured this checkpoint with the sweep's settings."""
    adaptive = task.kind == "adaptive"
    path = task_file(out, task)
    if not path.exists():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        cached = _result(saved)
        info = checkpoint.read_info(checkpoint.resolve(f"{run_dir(out, task.run)}@{task.epoch}"))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    same_split = saved.get("split") == sweep.split and saved.get("limit_seed") == sweep.limit_seed
    if adaptive and saved.get("transfer_from", []) != [s.key for s in task.sources]:
        return False
    return same_split and reusable(cached, info, task_settings(sweep, task), sweep.limit)


def read_eval(path: Path) -> EvalResult:
    """A saved evaluation of one run at one epoch."""
    return _result(json.loads(Path(path).read_text(encoding="utf-8")))


def _result(saved: dict[str, Any]) -> EvalResult:
    return result_from_dict(saved["result"])


# ------------------------------------------------------------------ workers

def train_task(directory: str, train: dict[str, Any], data: str, cache_dir: str | None,
               threads: int, device: str) -> float:
    """Train (or resume) one run in ``directory``; returns the seconds it took."""
    from hahnet.data.datasets import load_dataset
    from hahnet.training.device import cpu_threads, resolve_device
    from hahnet.training.trainer import Trainer

    started = time.perf_counter()
    with cpu_threads(threads):
        config = TrainConfig.from_dict(train)
        trainer = Trainer(config, load_dataset(data, cache_dir=cache_dir), Path(directory),
                          resolve_device(device))
        if RunDir(directory).has_checkpoint():
            trainer.resume()
        trainer.fit()
    return time.perf_counter() - started


def eval_task(checkpoint_path: str, target: str, settings: dict[str, Any], split: str,
              limit: int | None, limit_seed: int, data: str, cache_dir: str | None,
              threads: int, device: str, sources: Sequence[tuple[str, str]] = (),
              journal: str | None = None, siblings: Sequence[str] = ()) -> float:
    """Evaluate one checkpoint on its run's held-out images (or the test set) and write
    the result JSON to ``target``; returns the seconds it took. Attack rows are kept in
    ``journal`` (default: ``target``'s ``.partial`` folder) until then, so a stopped sweep
    resumes mid-evaluation; after it, while a ``siblings`` file (another evaluation sharing
    the journal) is still to be written, the rows it can reuse stay. ``sources``: (name,
    checkpoint) of the transfer attack's source models."""
    from hahnet.data.datasets import load_dataset
    from hahnet.eval.runner import SHARED_ROWS, evaluate_model, evaluation_split
    from hahnet.training.device import cpu_threads, resolve_device

    started = time.perf_counter()
    with cpu_threads(threads):
        dev = resolve_device(device)
        info = checkpoint.read_info(checkpoint_path)
        model = checkpoint.load(checkpoint_path, device=dev)
        images = evaluation_split(load_dataset(data, cache_dir=cache_dir), split,
                                  [(checkpoint_path, info)])
        if limit:
            images = images.limit(limit, limit_seed)
        values = dict(settings)
        for key in ("noise_sigmas", "norms"):
            values[key] = tuple(values[key])
        rows = Journal(Path(journal) if journal else Path(target).with_suffix(".partial"))
        models = [(name, checkpoint.load(path, device=dev)) for name, path in sources]
        result = evaluate_model(model, images.images, images.labels, EvalSettings(**values), dev,
                                name=Path(target).stem.removesuffix(".adaptive"),
                                checkpoint=checkpoint_path,
                                info=info, sources=models, journal=rows)
        result.settings["limit"] = limit  # what eval.results.reusable compares
        record = {"split": split, "limit_seed": limit_seed,
                  "result": results_json([result])["models"][0]}
        if sources:
            record["transfer_from"] = [name for name, _ in sources]
        write_json(Path(target), record)
        if all(Path(path).exists() for path in siblings):
            rows.clear()
        else:
            rows.keep_only(SHARED_ROWS)
    return time.perf_counter() - started


# ------------------------------------------------------------------ running

Progress = Callable[[str], None]


def run(sweep: Sweep, out: str | Path, data: str, cache_dir: str | None = None,
        jobs: int = 2, threads: int = 1, device: str = "cpu", re_evaluate: bool = False,
        progress: Progress | None = None) -> None:
    """Train what is missing, then evaluate what is missing (``jobs`` processes of
    ``threads`` threads each, longest first); :mod:`hahnet.experiments.sweep_summary` reads
    them back."""
    out = Path(out)
    check(sweep, out)
    trains, evals = plan(sweep, out, re_evaluate)
    say = progress or (lambda message: None)
    total = sum(1 + len(sweep.epochs_of(r)) + len(sweep.adaptive_epochs_of(r)) for r in sweep.runs)
    say(f"{sweep.name}: {len(sweep.runs)} runs, {total - len(trains) - len(evals)} of {total} "
        f"tasks already done; {len(trains)} to train, {len(evals)} to evaluate "
        f"({jobs} x {threads} thread(s) on {device})")
    counter = _Counter(total - len(trains) - len(evals), total, trains + evals, say)

    def submit(pool, task: Task) -> Future:
        directory = run_dir(out, task.run)
        if task.kind == "train":
            return pool.submit(train_task, str(directory), {**task.run.train, "seed": task.run.seed},
                               data, cache_dir, threads, device)
        path = str(checkpoint.resolve(f"{directory}@{task.epoch}"))
        shared = {"journal": str(journal_dir(out, task.run, task.epoch)),
                  "siblings": [str(p) for p in sibling_results(sweep, out, task)]}
        sources = [(s.key, str(checkpoint.resolve(f"{run_dir(out, s)}@{task.epoch}")))
                   for s in task.sources]
        return pool.submit(eval_task, path, str(task_file(out, task)),
                           asdict(task_settings(sweep, task)), sweep.split, sweep.limit,
                           sweep.limit_seed, data, cache_dir, threads, device, sources, **shared)

    _run_tasks(sorted(trains, key=lambda t: -t.cost) + sorted(evals, key=lambda t: -t.cost),
               submit, jobs, counter)


class _Counter:
    """Which task of how many, and the ETA from the cost of what is left."""

    def __init__(self, done: int, total: int, tasks: Sequence[Task], say: Progress) -> None:
        self.done, self.total, self.say = done, total, say
        self.cost_left = sum(t.cost for t in tasks)
        self.cost_done, self.started = 0.0, time.perf_counter()

    def finished(self, task: Task, seconds: float) -> None:
        self.done += 1
        self.cost_left -= task.cost
        self.cost_done += task.cost
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.cost_done * self.cost_left if self.cost_done else 0.0
        verb = "trained" if task.kind == "train" else "evaluated"
        self.say(f"[{self.done}/{self.total}] {verb} {task.label} in {seconds / 60:.1f} min; "
                 f"ETA {eta / 60:.0f} min")


def next_task(queue: Sequence[Task], running: Sequence[Task]) -> Task | None:
    """The first task of ``queue`` that can start beside ``running``: its runs are trained;
    an evaluation whose checkpoint another running evaluation is already attacking waits
    while anything else can start, so that the second reads their shared APGD row instead
    of computing it too (with nothing else to start, it runs: duplicate work beats idling)."""
    training = {t.run.key for t in [*queue, *running] if t.kind == "train"}
    ready = [t for t in queue if not training & set(t.needs)]
    busy = {(t.run.key, t.epoch) for t in running if t.kind != "train"}
    apart = [t for t in ready if t.kind == "train" or (t.run.key, t.epoch) not in busy]
    return (apart or ready or [None])[0]


def _run_tasks(tasks: list[Task], submit: Callable[[Any, Task], Future], jobs: int,
               counter: _Counter) -> None:
    """Run ``tasks`` in order, ``jobs`` at a time; an evaluation waits until the runs it
    needs are trained, and meanwhile later tasks go first so that no process idles."""
    if not tasks:
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        pending: dict[Future, Task] = {}
        queue = list(tasks)
        while queue or pending:
            while len(pending) < jobs:
                task = next_task(queue, list(pending.values()))
                if task is None:
                    break
                queue.remove(task)
                pending[submit(pool, task)] = task
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                try:
                    seconds = future.result()
                except Exception as error:
                    for other in pending:
                        other.cancel()
                    raise SweepError(f"{task.kind} {task.label} failed: "
                                     f"{type(error).__name__}: {error}") from error
                counter.finished(task, seconds)
