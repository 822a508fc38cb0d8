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

import itertools
import json
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

from hahnet.training import checkpoint
from hahnet.config import ATTACK_SUITES, EvalSettings, TrainConfig
from hahnet.eval.journal import Journal
from hahnet.eval.results import (EvalResult, result_from_dict, results_json, reusable,
                                 settings_record)
from hahnet.io import write_json
from hahnet.training.rundir import RunDir

RUNS_DIR = "runs"
EVALS_DIR = "evals"
# Settings that only a HaH network has: a HaH run's standard partner differs in these alone.
HAH_ONLY = frozenset({"hah", "alphas", "ratio", "demote", "sigma", "keep", "hah_layers"})
EVAL_KEYS = frozenset({"split", "limit", "limit_seed", "epochs"})
ADAPTIVE_KEYS = frozenset({"epochs", "seeds", "transfer", "attacks"})


class SweepError(ValueError):
    """A sweep file or run directory that cannot be used as asked; one line to the user."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of the sweep: a named setting at one seed."""

    name: str
    seed: int
    train: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.name}-seed{self.seed}"

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_dict({**self.train, "seed": self.seed})


@dataclass(frozen=True)
class AdaptiveSpec:
    """A sweep's ``[adaptive]`` evaluation: the adaptive attack suite (worst case per image),
    costly, so on chosen seeds and epochs only; on ``[eval]``'s images with ``[eval]``'s
    settings except those it sets; with transfer between each HaH run and its partner."""

    settings: EvalSettings
    epochs: tuple[int, ...] = ()  # 1-based, among the evaluated ones; () = the last
    seeds: tuple[int, ...] = ()   # () = every seed
    transfer: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"settings": settings_record(self.settings, None), "epochs": list(self.epochs),
                "seeds": list(self.seeds), "transfer": self.transfer}


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file."""

    name: str
    runs: tuple[RunSpec, ...]
    settings: EvalSettings
    split: str = "holdout"
    limit: int | None = None
    limit_seed: int = 0
    eval_epochs: tuple[int, ...] = ()  # 1-based; () = the last epoch only
    data: str | None = None
    adaptive: AdaptiveSpec | None = None

    def epochs_of(self, run: RunSpec) -> tuple[int, ...]:
        last = run.config.epochs
        return tuple(e for e in self.eval_epochs if e <= last) or (last,)

    def adaptive_epochs_of(self, run: RunSpec) -> tuple[int, ...]:
        """The evaluated epochs of ``run`` that ``[adaptive]`` also attacks (none without it)."""
        spec = self.adaptive
        if spec is None or (spec.seeds and run.seed not in spec.seeds):
            return ()
        evaluated = self.epochs_of(run)
        return tuple(e for e in evaluated if e in spec.epochs) if spec.epochs else evaluated[-1:]

    def settings_dict(self) -> dict[str, Any]:
        record = {**settings_record(self.settings, self.limit), "split": self.split,
                  "limit_seed": self.limit_seed}
        if self.adaptive is not None:
            record["adaptive"] = self.adaptive.to_dict()
        return record


# ------------------------------------------------------------------ parsing

def _run_name(values: dict[str, Any]) -> str:
    parts = ["hah" if values.get("hah") else "std"]
    for key, value in values.items():
        if key == "hah":
            continue
        shown = ",".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else \
            (f"{value:g}" if isinstance(value, float) else str(value))
        parts.append(f"{key}{shown}")
    return "-".join(parts)


def _checked_train(values: dict[str, Any], where: str) -> dict[str, Any]:
    known = set(TrainConfig.__dataclass_fields__) - {"seed"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SweepError(f"{where}: unknown training setting(s) {unknown}; use TrainConfig "
                         f"fields such as width, hah, epochs, alphas, limit_train, holdout")
    return dict(values)


def parse(data: dict[str, Any], source: str = "sweep") -> Sweep:
    """Build a :class:`Sweep` from a sweep file's parsed TOML (see the module doc)."""
    allowed = {"name", "seeds", "data", "train", "grid", "runs", "eval", "adaptive"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SweepError(f"{source}: unknown top-level key(s) {unknown}; expected {sorted(allowed)}")
    seeds = data.get("seeds", [2022])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise SweepError(f"{source}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    base = _checked_train(data.get("train", {}), f"{source} [train]")
    grid = data.get("grid", {})
    if any(not isinstance(v, list) or not v for v in grid.values()):
        raise SweepError(f"{source} [grid]: every entry is a non-empty list of values")
    _checked_train(grid, f"{source} [grid]")
    points: list[tuple[str, dict[str, Any]]] = []
    if grid or not data.get("runs"):
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            values = dict(zip(keys, combo))
            points.append((_run_name(values), {**base, **values}))
    for index, entry in enumerate(data.get("runs", [])):
        entry = dict(entry)
        name = entry.pop("name", None)
        if not name or not isinstance(name, str) or "@" in name or "/" in name:
            raise SweepError(f"{source} [[runs]] #{index + 1}: needs a name (no '@' or '/')")
        points.append((name, {**base, **_checked_train(entry, f"{source} run {name!r}")}))
    names = [n for n, _ in points]
    if len(set(names)) != len(names):
        raise SweepError(f"{source}: run names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    runs = []
    for name, train in points:
        for seed in seeds:
            spec = RunSpec(name, seed, train)
            try:
                spec.config
            except (TypeError, ValueError) as error:
                raise SweepError(f"{source} run {spec.key}: {error}") from None
            runs.append(spec)
    settings, split, limit, limit_seed, epochs = _parse_eval(data.get("eval", {}), source)
    adaptive = None
    if "adaptive" in data:
        adaptive = _parse_adaptive(data["adaptive"], settings, seeds, source)
    return Sweep(str(data.get("name", Path(source).stem)), tuple(runs), settings, split, limit,
                 limit_seed, epochs, data=data.get("data"), adaptive=adaptive)


def _parse_eval(spec: dict[str, Any], source: str) -> tuple[EvalSettings, str, int | None, int, tuple[int, ...]]:
    spec = dict(spec)
    split = spec.pop("split", "holdout")
    if split not in ("holdout", "test"):
        raise SweepError(f"{source} [eval]: split must be 'holdout' or 'test', got {split!r}")
    limit, limit_seed = spec.pop("limit", None), spec.pop("limit_seed", 0)
    epochs = spec.pop("epochs", [])
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise SweepError(f"{source} [eval]: limit must be a positive number of images, got {limit!r}")
    if not isinstance(epochs, list) or not all(isinstance(e, int) and e >= 1 for e in epochs):
        raise SweepError(f"{source} [eval]: epochs must be a list of 1-based epochs, got {epochs!r}")
    known = set(EvalSettings.__dataclass_fields__)
    unknown = sorted(set(spec) - known)
    if unknown:
        raise SweepError(f"{source} [eval]: unknown setting(s) {unknown}; use EvalSettings fields "
                         f"(noise_sigmas, attack_limit, eps_linf, ...) or {sorted(EVAL_KEYS)}")
    for key in ("noise_sigmas", "norms"):
        if key in spec:
            spec[key] = tuple(spec[key])
    if isinstance(spec.get("attacks"), str):  # attacks = "adaptive": the suite, as `eval --attacks`
        spec["suite"] = spec.pop("attacks")
    elif not isinstance(spec.get("attacks", True), bool):
        raise SweepError(f"{source} [eval]: attacks must be one of {', '.join(ATTACK_SUITES)} "
                         f"or false, got {spec['attacks']!r}")
    spec.setdefault("pgd_steps", 0)       # masking checks are `hahnet eval`'s job
    spec.setdefault("square_limit", 0)
    return EvalSettings(**spec), split, limit, int(limit_seed), tuple(sorted(set(epochs)))


def _parse_adaptive(spec: dict[str, Any], base: EvalSettings, seeds: list[int],
                    source: str) -> AdaptiveSpec:
    where = f"{source} [adaptive]"
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: must be a table of settings")
    spec = dict(spec)
    shared = sorted(set(spec) & (EVAL_KEYS - {"epochs"}))
    if shared:
        raise SweepError(f"{where}: {shared} set(s) the images, which [adaptive] shares with "
                         f"[eval]; set them in [eval]")
    unknown = sorted(set(spec) - set(EvalSettings.__dataclass_fields__) - ADAPTIVE_KEYS)
    if unknown:
        raise SweepError(f"{where}: unknown setting(s) {unknown}; use EvalSettings fields "
                         f"(norms, adaptive_limit, sweep_limit, ...) or {sorted(ADAPTIVE_KEYS)}")
    epochs, chosen = spec.pop("epochs", []), spec.pop("seeds", [])
    transfer, suite = spec.pop("transfer", True), spec.pop("attacks", "adaptive")
    if not isinstance(epochs, list) or not all(isinstance(e, int) and e >= 1 for e in epochs):
        raise SweepError(f"{where}: epochs must be a list of 1-based epochs, got {epochs!r}")
    if not isinstance(chosen, list) or not set(chosen) <= set(seeds):
        raise SweepError(f"{where}: seeds must be a list of the sweep's seeds {seeds}, got {chosen!r}")
    if not isinstance(transfer, bool):
        raise SweepError(f"{where}: transfer must be true or false, got {transfer!r}")
    if suite not in ("adaptive", "all"):
        raise SweepError(f"{where}: attacks must be \"adaptive\" or \"all\", got {suite!r}")
    for key in ("noise_sigmas", "norms", "bpda"):
        if key in spec:
            spec[key] = tuple(spec[key])
    try:
        settings = replace(base, **spec, attacks=True, suite=suite)
    except (TypeError, ValueError) as error:
        raise SweepError(f"{where}: {error}") from None
    return AdaptiveSpec(settings, tuple(sorted(set(epochs))), tuple(sorted(set(chosen))), transfer)


def loads(text: str, source: str = "sweep") -> Sweep:
    """Parse and check a sweep file's text (``source`` names it in errors)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SweepError(f"{source} is not valid TOML: {error}") from None
    return parse(data, source)


def load(path: str | Path) -> Sweep:
    """Read and check a sweep file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepError(f"no sweep file at {path}; see docs/sweep.md for the format") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SweepError(f"cannot read the sweep file {path}: {error}") from None
    return loads(text, str(path))


def partner(sweep: Sweep, hah_name: str) -> str | None:
    """The standard setting a HaH setting is compared with: equal in every non-HaH setting."""
    settings = {r.name: r.train for r in sweep.runs}
    mine = {k: v for k, v in settings[hah_name].items() if k not in HAH_ONLY}
    for name, train in settings.items():
        if not train.get("hah") and {k: v for k, v in train.items() if k not in HAH_ONLY} == mine:
            return name
    return None


def transfer_sources(sweep: Sweep, run: RunSpec) -> tuple[RunSpec, ...]:
    """The runs whose adversarial examples ``run``'s adaptive evaluation transfers: a HaH
    run's standard partner, a standard run's HaH partners; same seed. None without
    ``[adaptive]`` transfer."""
    if sweep.adaptive is None or not sweep.adaptive.transfer:
        return ()
    if run.train.get("hah"):
        names = {partner(sweep, run.name)}
    else:
        names = {r.name for r in sweep.runs if r.train.get("hah") and partner(sweep, r.name) == run.name}
    return tuple(r for r in sweep.runs if r.name in names and r.seed == run.seed)


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


def plan(sweep: Sweep, out: Path, re_evaluate: bool = False) -> tuple[list[Task], list[Task]]:
    """(training tasks, evaluation tasks) still to do; finished work is skipped."""
    out = Path(out)
    trains, evals = [], []
    for run in sweep.runs:
        config = run.config
        directory = run_dir(out, run)
        if not _trained(directory, config.epochs):
            done = len(RunDir(directory).history())
            trains.append(Task("train", run, cost=_train_cost(config, done)))
        for epoch in sweep.epochs_of(run):
            if re_evaluate or not _saved_eval_matches(sweep, out, run, epoch):
                evals.append(Task("eval", run, epoch, _eval_cost(sweep, run)))
        sources = transfer_sources(sweep, run)
        for epoch in sweep.adaptive_epochs_of(run):
            usable = tuple(s for s in sources if epoch in s.config.snapshots or epoch == s.config.epochs)
            if re_evaluate or not _saved_eval_matches(sweep, out, run, epoch, usable):
                evals.append(Task("adaptive", run, epoch, _adaptive_cost(sweep, run), usable))
    return trains, evals


def _saved_eval_matches(sweep: Sweep, out: Path, run: RunSpec, epoch: int,
                        sources: tuple[RunSpec, ...] | None = None) -> bool:
    """Whether the saved evaluation (``sources`` given: the adaptive one, transferring
    from exactly those runs) measured this checkpoint with the sweep's settings."""
    adaptive = sources is not None
    path = (adaptive_file if adaptive else eval_file)(out, run, epoch)
    if not path.exists():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        cached = _result(saved)
        info = checkpoint.read_info(checkpoint.resolve(f"{run_dir(out, run)}@{epoch}"))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    same_split = saved.get("split") == sweep.split and saved.get("limit_seed") == sweep.limit_seed
    if adaptive and saved.get("transfer_from", []) != [s.key for s in sources]:
        return False
    settings = sweep.adaptive.settings if adaptive else sweep.settings
    return same_split and reusable(cached, info, settings, sweep.limit)


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
              threads: int, device: str, sources: Sequence[tuple[str, str]] = ()) -> float:
    """Evaluate one checkpoint on its run's held-out images (or the test set) and write
    the result JSON to ``target``; returns the seconds it took. Attack rows are kept in
    ``target``'s ``.partial`` folder until then, so a stopped sweep resumes mid-evaluation.
    ``sources``: (name, checkpoint) of the transfer attack's source models."""
    from hahnet.data.datasets import load_dataset
    from hahnet.eval.runner import evaluate_model, evaluation_split
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
        journal = Journal(Path(target).with_suffix(".partial"))
        models = [(name, checkpoint.load(path, device=dev)) for name, path in sources]
        result = evaluate_model(model, images.images, images.labels, EvalSettings(**values), dev,
                                name=Path(target).stem.removesuffix(".adaptive"),
                                checkpoint=checkpoint_path,
                                info=info, sources=models, journal=journal)
        result.settings["limit"] = limit  # what eval.results.reusable compares
        record = {"split": split, "limit_seed": limit_seed,
                  "result": results_json([result])["models"][0]}
        if sources:
            record["transfer_from"] = [name for name, _ in sources]
        write_json(Path(target), record)
        journal.clear()
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
        if task.kind == "adaptive":
            assert sweep.adaptive is not None
            sources = [(s.key, str(checkpoint.resolve(f"{run_dir(out, s)}@{task.epoch}")))
                       for s in task.sources]
            return pool.submit(eval_task, path, str(adaptive_file(out, task.run, task.epoch)),
                               asdict(sweep.adaptive.settings), sweep.split, sweep.limit,
                               sweep.limit_seed, data, cache_dir, threads, device, sources)
        return pool.submit(eval_task, path, str(eval_file(out, task.run, task.epoch)),
                           asdict(sweep.settings), sweep.split, sweep.limit, sweep.limit_seed,
                           data, cache_dir, threads, device)

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
                training = {t.run.key for t in [*queue, *pending.values()] if t.kind == "train"}
                ready = [t for t in queue if not training & set(t.needs)]
                if not ready:
                    break
                queue.remove(ready[0])
                pending[submit(pool, ready[0])] = ready[0]
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
