"""Sweeps that differ in one training setting, side by side (e.g. the same study at
widths 0.25, 0.5 and 1): per value of that setting, each HaH setting's gain over its
standard partner paired by seed (as in each sweep's own summary), the absolute metrics per
setting and the HaH / cross-entropy gradient ratio per HaH layer, at chosen snapshots.
Reads only summaries from :func:`hahnet.experiments.sweep_summary.summarise`;
:mod:`hahnet.reporting.sweep_compare` renders the result."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from hahnet.config import EVAL_BATCHING, RUNTIME_OPTIONS, TrainConfig
from hahnet.experiments.sweep import SweepError
from hahnet.experiments.sweep_summary import seed_stats

PRE_DROP = "before the first lr drop"
LAST = "last evaluated"


def check_setting(by: str) -> None:
    """Refuse a compared setting that is not a training setting (or is the seed)."""
    fields = set(TrainConfig.__dataclass_fields__) - {"seed"}
    if by not in fields:
        raise SweepError(f"--compare {by!r}: not a training setting; compare sweeps by a "
                         f"TrainConfig field such as width, epochs, limit_train or lr")


def _config(run: dict[str, Any]) -> dict[str, Any]:
    """A run's every training setting, defaults filled in."""
    return TrainConfig.from_dict({**run["train"], "seed": run["seed"]}).to_dict()


def _value(summary: dict[str, Any], by: str) -> Any:
    """The one value of ``by`` that every run of the sweep shares."""
    values = [_config(run)[by] for run in summary["runs_spec"]]
    if any(v != values[0] for v in values):
        shown = ", ".join(dict.fromkeys(map(str, values)))
        raise SweepError(f"sweep {summary['sweep']} varies {by} inside itself ({shown}); "
                         f"compare sweeps that each fix {by}")
    return values[0]


def _signature(summary: dict[str, Any], by: str) -> dict[str, Any]:
    """Everything a comparison requires to be equal: each setting's training settings
    other than ``by``, the seed and those that change speed only, and the evaluation."""
    ignored = {by, "seed", *RUNTIME_OPTIONS}
    runs = {r["name"]: {k: v for k, v in _config(r).items() if k not in ignored}
            for r in summary["runs_spec"]}
    return {"settings": runs, "eval": _measured(summary["settings"])}


def _measured(settings: dict[str, Any]) -> dict[str, Any]:
    """Evaluation settings (and their ``[adaptive]`` part) without
    :data:`~hahnet.config.EVAL_BATCHING`: sweeps that differ only there are comparable."""
    kept = {k: v for k, v in settings.items() if k not in EVAL_BATCHING}
    if isinstance(kept.get("adaptive"), dict):
        adaptive = kept["adaptive"]
        kept["adaptive"] = {**adaptive, "settings": _measured(adaptive.get("settings", {}))}
    return kept


def _difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The first thing two signatures differ in, in words."""
    if list(a["settings"]) != list(b["settings"]):
        return f"settings ({', '.join(a['settings'])} vs {', '.join(b['settings'])})"
    for name, train in a["settings"].items():
        other = b["settings"][name]
        for key in sorted(set(train) | set(other)):
            if train.get(key) != other.get(key):
                return f"{key} of {name} ({train.get(key)} vs {other.get(key)})"
    for key in sorted(set(a["eval"]) | set(b["eval"])):
        if a["eval"].get(key) != b["eval"].get(key):
            return f"evaluation {key} ({a['eval'].get(key)} vs {b['eval'].get(key)})"
    return ""


def check_comparable(summaries: Sequence[dict[str, Any]], by: str) -> list[Any]:
    """The value of ``by`` per sweep; refuses sweeps that differ in anything but ``by``
    and their seeds, or that repeat a value."""
    check_setting(by)
    if not summaries:
        raise SweepError("nothing to compare: pass at least one sweep")
    values = [_value(s, by) for s in summaries]
    first = _signature(summaries[0], by)
    for summary in summaries[1:]:
        difference = _difference(first, _signature(summary, by))
        if difference:
            raise SweepError(f"sweeps {summaries[0]['sweep']} and {summary['sweep']} differ in "
                             f"{difference} besides {by}; compare sweeps that differ in {by} alone "
                             f"(seeds may differ)")
    for i, value in enumerate(values):
        if value in values[:i]:
            raise SweepError(f"sweeps {summaries[values.index(value)]['sweep']} and "
                             f"{summaries[i]['sweep']} both have {by} = {value}; put their seeds "
                             f"into one sweep file")
    return values


def _evaluated(summary: dict[str, Any]) -> list[int]:
    return sorted({r["epoch"] for r in summary["table"]})


def _pre_drop(summary: dict[str, Any]) -> int | None:
    """The last evaluated epoch (1-based) trained entirely at the starting learning rate."""
    config = _config(summary["runs_spec"][0])
    if not config["milestones"] or config["gamma"] == 1.0:
        return None
    first_drop = min(round(m * config["epochs"]) for m in config["milestones"])
    return max((e for e in _evaluated(summary) if e <= first_drop), default=None)


def snapshots(epochs: Sequence[int] | None) -> list[tuple[str, Callable[[dict[str, Any]], int | None]]]:
    """(label, the sweep's epoch for it): the given epochs, or by default the snapshot before
    the first learning-rate drop and the last evaluated one."""
    if epochs:
        return [(f"epoch {e}", lambda s, e=e: e if e in _evaluated(s) else None) for e in epochs]
    return [(PRE_DROP, _pre_drop),
            (LAST, lambda s: max(_evaluated(s), default=None))]


def _restat(stats: dict[str, Any]) -> dict[str, Any]:
    """Mean over seeds; sd only where there are two seeds or more."""
    return {**stats, "sd": stats["sd"] if stats["n"] > 1 else None}


def _grad_ratios(summary: dict[str, Any], name: str, epoch: int) -> dict[str, Any] | None:
    runs = [r for r in summary["runs"] if r["name"] == name and r["epoch"] == epoch and r["grad_ratios"]]
    if not runs:
        return None
    layers = min(len(r["grad_ratios"]) for r in runs)
    return {"seeds": [r["seed"] for r in runs],
            "layers": [_restat(seed_stats([r["grad_ratios"][i] for r in runs])) for i in range(layers)]}


def _rows_at(summary: dict[str, Any], value: Any, label: str, epoch: int) -> dict[str, list]:
    """The sweep's gains, per-setting metrics and gradient ratios at one epoch."""
    where = {"snapshot": label, "value": value, "sweep": summary["sweep"], "epoch": epoch}
    gains = [{**where, "name": g["name"], "baseline": g["baseline"], "seeds": g["seeds"],
              "metrics": {k: _restat(s) for k, s in g["metrics"].items()}}
             for g in summary["gains"] if g["epoch"] == epoch]
    table = [{**where, "name": t["name"], "seeds": t["seeds"],
              "metrics": {k: _restat(s) for k, s in t["metrics"].items()}}
             for t in summary["table"] if t["epoch"] == epoch]
    ratios = []
    for row in table:
        found = _grad_ratios(summary, row["name"], epoch)
        if found:
            ratios.append({**where, "name": row["name"], **found})
    return {"gains": gains, "table": table, "grad_ratios": ratios}


def compare(summaries: Sequence[dict[str, Any]], by: str = "width",
            epochs: Sequence[int] | None = None) -> dict[str, Any]:
    """Sweeps that differ only in the training setting ``by`` (and seeds), ordered by its
    value: per snapshot (``epochs``, or by default the one before the first lr drop and the
    last evaluated), the paired HaH-minus-standard gains, every setting's metrics and the
    gradient ratios per HaH layer, each as mean (+- sd from two seeds) over the seeds."""
    values = check_comparable(summaries, by)
    try:
        order = sorted(range(len(summaries)), key=lambda i: values[i])
    except TypeError:  # values that do not order (e.g. None beside numbers): as given
        order = list(range(len(summaries)))
    chosen = snapshots(epochs)
    result: dict[str, Any] = {
        "by": by, "snapshots": [label for label, _ in chosen],
        "sweeps": [{"sweep": summaries[i]["sweep"], "value": values[i],
                    "seeds": sorted({r["seed"] for r in summaries[i]["runs_spec"]}),
                    "evaluated_seeds": sorted({r["seed"] for r in summaries[i]["runs"]}),
                    "evaluated": _evaluated(summaries[i])} for i in order],
        "settings": summaries[0]["settings"], "gains": [], "table": [], "grad_ratios": []}
    for label, pick in chosen:
        for i in order:
            epoch = pick(summaries[i])
            if epoch is not None:
                for key, rows in _rows_at(summaries[i], values[i], label, epoch).items():
                    result[key] += rows
    return result
