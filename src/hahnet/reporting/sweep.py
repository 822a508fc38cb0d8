"""A sweep's report: the per-setting table and the HaH-minus-standard gains (mean +- sd
over seeds) as Markdown, their plots, and the summary as results.json. Reads only the
summary that :func:`hahnet.experiments.sweep_summary.summarise` builds from the sweep's
files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from hahnet.eval.markdown import table as _table
from hahnet.io import atomic_write, write_json
from hahnet.reporting.plots import figure


# ------------------------------------------------------------------ Markdown

HEADLINE = ("clean", "noise0.05", "noise0.1", "noise0.2", "apgd_linf", "apgd_l2",
            "worst_linf", "worst_l2", "nonzero_first6", "train_acc")


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics the rows have: the headline ones in their order, then the rest."""
    present = list(dict.fromkeys(k for row in rows for k in row["metrics"]))
    return [k for k in HEADLINE if k in present] + [k for k in present if k not in HEADLINE]


def cell(stats: dict[str, Any] | None, signed: bool = False, seeds: int | None = None) -> str:
    """Mean ± sd in percent (points when ``signed``; bold where |mean| > sd over 2+ seeds);
    the mean alone from one seed or where sd is None; "(n=k)" where only k of the row's
    ``seeds`` have the metric (e.g. the worst case, attacked on fewer seeds)."""
    if stats is None or stats["mean"] is None or not math.isfinite(stats["mean"]):
        return "-"
    sign = "+" if signed else ""
    n = stats.get("n", 2)
    if stats["sd"] is None or n < 2:
        text = f"{100 * stats['mean']:{sign}.1f}"
    else:
        text = f"{100 * stats['mean']:{sign}.1f} ± {100 * stats['sd']:.1f}"
        if signed and abs(stats["mean"]) > stats["sd"]:
            text = f"**{text}**"
    return text + (f" (n={n})" if seeds is not None and n < seeds else "")


def adaptive_note(spec: dict[str, Any] | None) -> list[str]:
    """The report's sentence on the ``[adaptive]`` evaluation behind ``worst_*``, if any."""
    if not spec:
        return []
    settings = spec["settings"]
    seeds = ", ".join(map(str, spec["seeds"])) or "every seed"
    epochs = ", ".join(map(str, spec["epochs"])) or "the last evaluated"
    return [f"`worst_*`: the worst case per image over every attack of the `{settings['suite']}` "
            f"suite ({'/'.join(settings['norms'])}; APGD, margin, BPDA"
            + (", transfer from the partner run" if spec["transfer"] else "")
            + f"; {settings['adaptive_limit']} of the attacked images"
            + ("; cascaded: each attack on the images the ones before it left" if
               settings.get("cascade") else "")
            + "), from the sweep's "
            f"`[adaptive]` evaluation: seeds {seeds}, epochs {epochs}. (n=k): k seeds measured.", ""]


def metrics_table(summary: dict[str, Any]) -> str:
    rows = summary["table"]
    keys = columns(rows)
    return _table(["setting", "epoch", "seeds", *keys],
                  [[r["name"], str(r["epoch"]), str(r["seeds"]),
                    *(cell(r["metrics"].get(k), seeds=r["seeds"]) for k in keys)] for r in rows])


def gains_table(summary: dict[str, Any]) -> str:
    rows = summary["gains"]
    if not rows:
        return "(no HaH setting has a standard partner with finished evaluations)"
    keys = columns(rows)
    return _table(["HaH setting", "vs", "epoch", "seeds", *keys],
                  [[r["name"], r["baseline"], str(r["epoch"]), str(len(r["seeds"])),
                    *(cell(r["metrics"].get(k), signed=True, seeds=len(r["seeds"])) for k in keys)]
                   for r in rows])


def duration(seconds: float | None) -> str:
    """Seconds as minutes below two hours, else hours; "?" when unknown."""
    if seconds is None:
        return "?"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def status_table(rows: Sequence[Any]) -> str:
    """Where a sweep stands, one line per task: rows with ``label``, ``kind``, ``state``,
    ``progress`` and ``seconds_left`` (:class:`hahnet.experiments.sweep_status.TaskStatus`)."""
    return _table(["task", "kind", "state", "progress", "left"],
                  [[r.label, r.kind, r.state, r.progress or "-",
                    "-" if r.state == "done" else duration(r.seconds_left)] for r in rows])


def status_summary(rows: Sequence[Any], seconds: float, unknown: int, jobs: int) -> str:
    """One line: tasks done, and the compute left (for one process, and split over ``jobs``);
    ``unknown`` of the tasks left have no estimate."""
    done = sum(1 for r in rows if r.state == "done")
    if done == len(rows):
        return f"{done} of {len(rows)} tasks done: nothing left"
    if unknown == len(rows) - done:
        return (f"{done} of {len(rows)} tasks done; {unknown} left, none estimated yet "
                "(nothing comparable measured)")
    text = f"{done} of {len(rows)} tasks done; about {duration(seconds)} of compute left"
    if jobs > 1:
        text += f" (about {duration(seconds / jobs)} with {jobs} processes, if it splits evenly)"
    if unknown:
        text += f", plus {unknown} task(s) not estimated yet (nothing comparable measured)"
    return text


def render_markdown(summary: dict[str, Any], command: str = "") -> str:
    """The sweep's report: settings, the per-setting table, the paired gains, the plots."""
    settings = summary["settings"]
    runs = summary["runs_spec"]
    shared = _shared_train(runs)
    lines = [f"# Sweep `{summary['sweep']}`", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Evaluated on the **{settings['split']}** split"
              + (f", a seeded {settings['limit']} images" if settings.get("limit") else "")
              + f"; attacks on {settings.get('attack_limit') or 'all'} of them "
              f"(APGD-CE + APGD-T, {settings['apgd_steps']} steps, l_inf {settings['eps_linf']:.5g},"
              f" l_2 {settings['eps_l2']:g}); seeds {sorted({r['seed'] for r in runs})}.",
              "", "Shared training settings: "
              + ", ".join(f"{k}={v}" for k, v in sorted(shared.items())) + ".", "",
              "Settings: " + "; ".join(f"`{name}`: " + (", ".join(f"{k}={v}" for k, v in diff.items()) or "-")
                                       for name, diff in _differences(runs, shared).items()) + ".",
              "", "## Every setting (accuracy in %, mean ± sd over seeds)", "",
              metrics_table(summary), "", *adaptive_note(summary.get("adaptive")),
              "## HaH minus its standard partner, paired by seed (points, mean ± sd)", "",
              "Bold: the mean gain exceeds the seed-to-seed sd.", "", gains_table(summary), "",
              "## Plots", "", "![metrics vs epoch](metrics.png)", "", "![gains vs epoch](gains.png)",
              "", "![training curves](training.png)", "",
              "![gradient ratios](grad_ratios.png)", ""]
    return "\n".join(lines)


def _shared_train(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    trains = [r["train"] for r in runs]
    return {k: v for k, v in trains[0].items() if all(t.get(k) == v for t in trains)}


def _differences(runs: Sequence[dict[str, Any]], shared: dict[str, Any]
                 ) -> dict[str, dict[str, Any]]:
    return {r["name"]: {k: v for k, v in r["train"].items() if k not in shared} for r in runs}


# ------------------------------------------------------------------ plots

PLOTTED = ("clean", "noise0.1", "apgd_linf", "apgd_l2", "worst_linf", "worst_l2")


def _panels(path: Path, panels: int, draw) -> None:
    """``draw(axes)`` on a row of ``panels`` subplots, saved to ``path``."""
    figure(path, lambda fig: draw(fig.subplots(1, panels, squeeze=False)[0]),
           (4.2 * panels, 3.4))


def _errorbars(axes, rows: Sequence[dict[str, Any]], keys: Sequence[str], zero_line: bool) -> None:
    """One panel per metric; each setting keeps its colour and every panel the same epoch
    range, also where a metric was measured for some settings or epochs only."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    epochs = [r["epoch"] for r in rows]
    for ax, key in zip(axes, keys):
        for colour, name in enumerate(names):
            mine = [r for r in rows if r["name"] == name and key in r["metrics"]]
            if mine:
                ax.errorbar([r["epoch"] for r in mine], [100 * r["metrics"][key]["mean"] for r in mine],
                            yerr=[100 * (r["metrics"][key]["sd"] or 0.0) for r in mine], marker="o",
                            capsize=3, color=f"C{colour}", label=name)
        ax.set_xlim(min(epochs) - 2, max(epochs) + 2)
        if zero_line:
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(key)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("points" if zero_line else "accuracy (%)")
    axes[-1].legend(fontsize=7)


def plot_metrics(summary: dict[str, Any], path: Path) -> None:
    keys = [k for k in PLOTTED if any(k in r["metrics"] for r in summary["table"])]
    if keys:
        _panels(path, len(keys), lambda axes: _errorbars(axes, summary["table"], keys, False))


def plot_gains(summary: dict[str, Any], path: Path) -> None:
    keys = [k for k in PLOTTED if any(k in r["metrics"] for r in summary["gains"])]
    if keys:
        _panels(path, len(keys), lambda axes: _errorbars(axes, summary["gains"], keys, True))


def plot_grad_ratios(summary: dict[str, Any], path: Path) -> None:
    curves = {n: rows for n, rows in summary["curves"].items() if rows and rows[-1]["grad_ratios"]}
    if not curves:
        return

    def draw(axes) -> None:
        ax = axes[0]
        for name, rows in curves.items():
            layers = len(rows[-1]["grad_ratios"])
            for layer in range(layers):
                pts = [(r["epoch"], r["grad_ratios"][layer]) for r in rows if len(r["grad_ratios"]) > layer]
                ax.plot(*zip(*pts), label=f"{name} L{layer + 1}", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("RMS(alpha dH/dW) / RMS(dCE/dW)")
        ax.legend(fontsize=6, ncol=2)

    _panels(path, 1, draw)


def plot_training(summary: dict[str, Any], path: Path) -> None:
    """Training and held-out accuracy against epochs, per setting (mean over seeds)."""
    curves = {n: rows for n, rows in summary["curves"].items() if rows}
    if not curves:
        return

    def draw(axes) -> None:
        for ax, key, title in zip(axes, ("train_acc", "eval_acc"), ("training", "held-out")):
            for name, rows in curves.items():
                ax.plot([r["epoch"] for r in rows], [100 * r[key] for r in rows], label=name)
            ax.set_title(f"{title} accuracy (%)")
            ax.set_xlabel("epoch")
        axes[-1].legend(fontsize=7)

    _panels(path, 2, draw)


def write(summary: dict[str, Any], out: str | Path, command: str = "") -> dict[str, Path]:
    """results.json, report.md and the plots in ``out``; returns their paths."""
    out = Path(out)
    paths = {name: out / name for name in ("results.json", "report.md", "metrics.png",
                                           "gains.png", "grad_ratios.png", "training.png")}
    write_json(paths["results.json"], finite(summary))
    atomic_write(paths["report.md"], lambda tmp: tmp.write_text(render_markdown(summary, command)))
    plot_metrics(summary, paths["metrics.png"])
    plot_gains(summary, paths["gains.png"])
    plot_grad_ratios(summary, paths["grad_ratios.png"])
    plot_training(summary, paths["training.png"])
    return {k: p for k, p in paths.items() if p.exists()}


def finite(value: Any) -> Any:
    """JSON without NaN (null instead)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
