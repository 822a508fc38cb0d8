"""What a sweep measured, read back from its files: per run and epoch the metrics (with
the worst case of the ``[adaptive]`` evaluation where it ran) and training state; per setting and epoch every metric as mean +- sd over seeds; per HaH
setting its gain over its standard partner, paired by seed; the training curves. The
result is the summary that :mod:`hahnet.reporting.sweep` turns into the report."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from hahnet.eval.results import EvalResult
from hahnet.experiments.sweep import (Sweep, adaptive_file, eval_file, partner, read_eval,
                                      run_dir)
from hahnet.training.rundir import RunDir


def metrics_of(result: EvalResult) -> dict[str, float]:
    """The numbers a sweep compares: clean, noise at every sigma, APGD per norm, and the
    mean non-zero fraction of the HaH-block positions (standard: the same conv layers)."""
    values: dict[str, float] = {"clean": result.clean_accuracy}
    if result.noise is not None:
        for sigma in result.noise.sigmas:
            if sigma > 0:
                values[f"noise{sigma:g}"] = result.noise.at(sigma)
    for norm, suite in result.attacks.items():
        values[f"apgd_{norm.lower()}"] = suite.apgd.accuracy
        if suite.adaptive is not None:  # the worst case over every attack run
            values[f"worst_{norm.lower()}"] = suite.adaptive.worst.accuracy
    early = [layer.nonzero_fraction for layer in result.sparsity[:6]]
    if early:
        values["nonzero_first6"] = sum(early) / len(early)
    return values


def adaptive_metrics(path: Path) -> dict[str, float]:
    """The worst case per norm of an ``[adaptive]`` evaluation (none if it has not run);
    its other numbers repeat the ``[eval]`` evaluation's on the same images."""
    if not path.exists():
        return {}
    return {k: v for k, v in metrics_of(read_eval(path)).items() if k.startswith("worst_")}


def seed_stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sd (0 from one value) over seeds of the finite values, and all the values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else float("nan")
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": len(finite), "values": list(values)}


def summarise(sweep: Sweep, out: str | Path) -> dict[str, Any]:
    """Per run and epoch: the metrics and training state; per setting and epoch: mean +- sd
    over seeds; per HaH setting and epoch: HaH - standard paired by seed."""
    out = Path(out)
    runs, per = [], {}
    for run in sweep.runs:
        history = {h["epoch"] + 1: h for h in RunDir(run_dir(out, run)).history()}
        for epoch in sweep.epochs_of(run):
            path = eval_file(out, run, epoch)
            if not path.exists():
                continue
            result = read_eval(path)
            metrics = metrics_of(result)
            metrics.update(adaptive_metrics(adaptive_file(out, run, epoch)))
            # the evaluated checkpoint's own training record: the run folder's log may be
            # another training of the same run (retrained on another CPU, or resumed)
            h = result.info.get("metrics") or history.get(epoch, {})
            metrics["train_acc"] = h.get("train_acc", float("nan"))
            entry = {"name": run.name, "seed": run.seed, "epoch": epoch, "metrics": metrics,
                     "grad_ratios": h.get("grad_ratios", []), "train_seconds": sum(
                         x.get("seconds", 0.0) for e, x in history.items() if e <= epoch)}
            runs.append(entry)
            per[(run.name, epoch, run.seed)] = metrics
    names = list(dict.fromkeys(r.name for r in sweep.runs))
    seeds = sorted({r.seed for r in sweep.runs})
    table, gains = [], []
    for name in names:
        epochs = sorted({e for (n, e, _) in per if n == name})
        for epoch in epochs:
            rows = [per[(name, epoch, s)] for s in seeds if (name, epoch, s) in per]
            keys = list(dict.fromkeys(k for row in rows for k in row))
            table.append({"name": name, "epoch": epoch, "seeds": len(rows),
                          "metrics": {k: seed_stats([row.get(k, float("nan")) for row in rows]) for k in keys}})
            base = partner(sweep, name) if dict(next(r.train for r in sweep.runs if r.name == name)).get("hah") else None
            if base is None:
                continue
            paired = [s for s in seeds if (name, epoch, s) in per and (base, epoch, s) in per]
            if paired:
                nan = float("nan")
                shared = [k for k in keys if any(k in per[(base, epoch, s)] for s in paired)]
                gains.append({"name": name, "baseline": base, "epoch": epoch, "seeds": paired,
                              "metrics": {k: seed_stats([per[(name, epoch, s)].get(k, nan)
                                                         - per[(base, epoch, s)].get(k, nan)
                                                         for s in paired]) for k in shared}})
    return {"sweep": sweep.name, "settings": sweep.settings_dict(),
            "adaptive": sweep.adaptive.to_dict() if sweep.adaptive else None,
            "runs_spec": [{"name": r.name, "seed": r.seed, "train": r.train} for r in sweep.runs],
            "runs": runs, "table": table, "gains": gains, "curves": _curves(sweep, out)}


def _curves(sweep: Sweep, out: Path) -> dict[str, list[dict[str, Any]]]:
    """Per setting, per epoch (1-based): training and held-out accuracy and the HaH /
    cross-entropy gradient ratios, averaged over the seeds that reached that epoch."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for name in dict.fromkeys(r.name for r in sweep.runs):
        by_epoch: dict[int, list[dict[str, Any]]] = {}
        for run in (r for r in sweep.runs if r.name == name):
            for h in RunDir(run_dir(out, run)).history():
                by_epoch.setdefault(h["epoch"] + 1, []).append(h)
        rows = []
        for epoch, entries in sorted(by_epoch.items()):
            ratios = [e.get("grad_ratios") or [] for e in entries]
            width = min(len(r) for r in ratios)
            rows.append({"epoch": epoch, "seeds": len(entries),
                         "train_acc": statistics.fmean(e["train_acc"] for e in entries),
                         "eval_acc": statistics.fmean(e["eval_acc"] for e in entries),
                         "grad_ratios": [statistics.fmean(r[i] for r in ratios) for i in range(width)]})
        curves[name] = rows
    return curves
