"""A sweep file (TOML) and what it declares: the runs (a grid of settings at several
seeds, plus named runs), the ``[eval]`` evaluation and the optional ``[adaptive]`` one;
parsed and checked here, with one-line errors, before anything runs (docs/sweep.md).
:mod:`hahnet.experiments.sweep` plans and runs it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hahnet.config import ATTACK_SUITES, EvalSettings, TrainConfig
from hahnet.eval.results import settings_record

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
    try:  # EvalSettings itself turns the lists of the file into tuples
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
