"""The report across sweeps that differ in one training setting: per snapshot, the
HaH-minus-standard gains (one row per value of the setting), every setting's metrics and
the gradient ratios per HaH layer as Markdown; gain and ratio against the setting as
plots; the comparison as results.json. Reads only the dict that
:func:`hahnet.experiments.sweep_compare.compare` returns."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from hahnet.eval.markdown import table
from hahnet.io import atomic_write, write_json
from hahnet.reporting.plots import figure
from hahnet.reporting.sweep import adaptive_note, cell, columns, finite

PANELS_PER_ROW = 5


def _at(comparison: dict[str, Any], key: str, snapshot: str) -> list[dict[str, Any]]:
    return [r for r in comparison[key] if r["snapshot"] == snapshot]


def gains_table(comparison: dict[str, Any], snapshot: str) -> str:
    """One row per value of the compared setting (and HaH setting): the paired gains."""
    rows = _at(comparison, "gains", snapshot)
    if not rows:
        return "(no finished evaluations of both partners at this snapshot)"
    keys = columns(rows)
    return table([comparison["by"], "sweep", "HaH setting", "vs", "epoch", "n", *keys],
                 [[f"{r['value']}", r["sweep"], r["name"], r["baseline"], str(r["epoch"]),
                   str(len(r["seeds"])),
                   *(cell(r["metrics"].get(k), signed=True, seeds=len(r["seeds"])) for k in keys)]
                  for r in rows])


def settings_table(comparison: dict[str, Any], snapshot: str) -> str:
    """Every setting's metrics (accuracy in %) per value of the compared setting."""
    rows = _at(comparison, "table", snapshot)
    if not rows:
        return "(no finished evaluations at this snapshot)"
    keys = columns(rows)
    return table([comparison["by"], "setting", "epoch", "n", *keys],
                 [[f"{r['value']}", r["name"], str(r["epoch"]), str(r["seeds"]),
                   *(cell(r["metrics"].get(k), seeds=r["seeds"]) for k in keys)] for r in rows])


def _ratio(stats: dict[str, Any]) -> str:
    text = f"{stats['mean']:.3g}"
    return text if stats["sd"] is None else f"{text} ± {stats['sd']:.2g}"


def grad_ratio_table(comparison: dict[str, Any], snapshot: str) -> str:
    """RMS(alpha dH/dW) / RMS(dCE/dW) per HaH layer, mean (± sd) over seeds."""
    rows = _at(comparison, "grad_ratios", snapshot)
    if not rows:
        return "(no gradient ratios recorded at this snapshot)"
    layers = max(len(r["layers"]) for r in rows)
    return table([comparison["by"], "setting", "epoch", "n", *(f"L{i + 1}" for i in range(layers))],
                 [[f"{r['value']}", r["name"], str(r["epoch"]), str(len(r["seeds"])),
                   *(_ratio(s) for s in r["layers"])] for r in rows])


def _seeds(sweep: dict[str, Any]) -> str:
    """The sweep's seeds, and which of them have an evaluation yet where not all do
    ("1 of 1, 2, 3"), so that a sweep still running is not read as finished."""
    planned = ", ".join(map(str, sweep["seeds"]))
    done = sweep["evaluated_seeds"]
    if done == sweep["seeds"]:
        return planned
    return f"{', '.join(map(str, done)) or 'none'} of {planned}"


def render_markdown(comparison: dict[str, Any], command: str = "") -> str:
    """The comparison's report: which sweeps, then per snapshot the three tables."""
    by = comparison["by"]
    lines = [f"# Sweeps compared by `{by}`", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Sweeps equal in every training and evaluation setting but `{by}` (seeds may "
              "differ); the evaluation split is "
              f"**{comparison['settings']['split']}**.", "",
              table([by, "sweep", "seeds", "evaluated epochs"],
                    [[f"{s['value']}", s["sweep"], _seeds(s),
                      ", ".join(map(str, s["evaluated"])) or "none yet"]
                     for s in comparison["sweeps"]]), "",
              "Gains: HaH minus its standard partner, paired by seed, in points; mean ± sd over "
              "the n seeds both finished (n = 1: the mean alone). Bold: |mean| exceeds the sd.", "",
              *adaptive_note(comparison["settings"].get("adaptive"))]
    for snapshot in comparison["snapshots"]:
        lines += [f"## {snapshot[0].upper() + snapshot[1:]}", "",
                  "### Gain (HaH − standard, points)", "", gains_table(comparison, snapshot), "",
                  "### Every setting (accuracy in %)", "", settings_table(comparison, snapshot), "",
                  "### HaH / cross-entropy gradient ratio per HaH layer", "",
                  grad_ratio_table(comparison, snapshot), ""]
    lines += ["## Plots", "", f"![gain vs {by}](gains.png)", "",
              f"![gradient ratio vs {by}](grad_ratios.png)", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ plots

def _positions(comparison: dict[str, Any]) -> dict[str, int]:
    """Each sweep's place on the x axis (evenly spaced, labelled with its value)."""
    return {s["sweep"]: i for i, s in enumerate(comparison["sweeps"])}


def _x_axis(ax, comparison: dict[str, Any]) -> None:
    ax.set_xticks(range(len(comparison["sweeps"])))
    ax.set_xlim(-0.5, len(comparison["sweeps"]) - 0.5)
    ax.set_xticklabels([f"{s['value']}" for s in comparison["sweeps"]])
    ax.set_xlabel(comparison["by"])


def _lines(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped into one line per (snapshot, setting)."""
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        lines.setdefault(f"{row['name']}, {row['snapshot']}", []).append(row)
    return lines


def line_styles(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[str, float]]:
    """(colour, x shift) per line of ``rows``, the same in every panel, so that a metric
    measured at one snapshot only (worst case) keeps that snapshot's colour; the shifts
    keep error bars apart."""
    labels = list(_lines(rows))
    return {label: (f"C{j}", 0.06 * (j - (len(labels) - 1) / 2))
            for j, label in enumerate(labels)}


def plot_gains(comparison: dict[str, Any], path: Path) -> None:
    """Gain against the compared setting, one panel per metric, error bars: sd over seeds."""
    rows = comparison["gains"]
    keys = columns(rows)
    if not keys:
        return
    where, styles = _positions(comparison), line_styles(rows)
    across = min(len(keys), PANELS_PER_ROW)
    down = math.ceil(len(keys) / across)

    def draw(fig) -> None:
        axes = fig.subplots(down, across, squeeze=False).ravel()
        for ax, key in zip(axes, keys):
            for label, mine in _lines([r for r in rows if key in r["metrics"]]).items():
                colour, shift = styles[label]
                stats = [r["metrics"][key] for r in mine]
                ax.errorbar([where[r["sweep"]] + shift for r in mine], [100 * s["mean"] for s in stats],
                            yerr=[100 * (s["sd"] or 0.0) for s in stats], marker="o", capsize=3,
                            color=colour, label=label)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(key)
            ax.set_ylabel("HaH − standard (points)")
            _x_axis(ax, comparison)
        for ax in axes[len(keys):]:
            ax.set_visible(False)
        axes[0].legend(fontsize=7)

    figure(path, draw, (3.6 * across, 3.2 * down))


def plot_grad_ratios(comparison: dict[str, Any], path: Path) -> None:
    """Gradient ratio per HaH layer against the compared setting, one panel per snapshot."""
    snapshots = [s for s in comparison["snapshots"] if _at(comparison, "grad_ratios", s)]
    if not snapshots:
        return
    where = _positions(comparison)

    def draw(fig) -> None:
        axes = fig.subplots(1, len(snapshots), squeeze=False)[0]
        for ax, snapshot in zip(axes, snapshots):
            rows = _at(comparison, "grad_ratios", snapshot)
            for name, mine in _lines(rows).items():
                for layer in range(max(len(r["layers"]) for r in mine)):
                    pts = [r for r in mine if len(r["layers"]) > layer]
                    ax.errorbar([where[r["sweep"]] for r in pts],
                                [r["layers"][layer]["mean"] for r in pts],
                                yerr=[r["layers"][layer]["sd"] or 0.0 for r in pts], marker="o",
                                capsize=3, lw=1, label=f"{name.split(',')[0]} L{layer + 1}")
            ax.set_yscale("log")
            ax.set_title(snapshot)
            _x_axis(ax, comparison)
        axes[0].set_ylabel("RMS(alpha dH/dW) / RMS(dCE/dW)")
        axes[-1].legend(fontsize=6, ncol=2)

    figure(path, draw, (4.6 * len(snapshots), 3.6))


def write(comparison: dict[str, Any], out: str | Path, command: str = "") -> dict[str, Path]:
    """results.json, report.md, gains.png and grad_ratios.png in ``out``; returns the
    paths written."""
    out = Path(out)
    paths = {name: out / name for name in ("results.json", "report.md", "gains.png", "grad_ratios.png")}
    write_json(paths["results.json"], finite(comparison))
    atomic_write(paths["report.md"], lambda tmp: tmp.write_text(render_markdown(comparison, command)))
    plot_gains(comparison, paths["gains.png"])
    plot_grad_ratios(comparison, paths["grad_ratios.png"])
    return {k: p for k, p in paths.items() if p.exists()}
