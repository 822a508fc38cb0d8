"""Evaluation results -> ``results.json``, ``report.md`` and PNG plots, for one model or
several side by side (as in the paper's table). Every file is written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from hahnet.config import PAPER_EPS, PAPER_NOISE_SIGMA, PAPER_TABLE
from hahnet.reporting.plots import figure, integer_ticks
from hahnet.eval.markdown import labels, pct as _pct, table as _table
from hahnet.eval.results import (EvalResult, noise_sigma, results_document, summary, versions,
                                 worst_cases)
from hahnet.io import write_text

# The settings of the paper's table (docs/method.md).
PAPER_SETTINGS = {"noise": PAPER_NOISE_SIGMA, "linf": PAPER_EPS["Linf"], "l2": PAPER_EPS["L2"]}
FILES = ("results.json", "report.md", "noise.png", "sparsity.png", "snr.png", "filters.png")

# --------------------------------------------------------------------------- tables

def format_eps(eps: float) -> str:
    """``2/255`` when eps is a whole number of 8-bit levels, else the decimal."""
    levels = eps * 255
    if levels > 0 and abs(levels - round(levels)) < 1e-6:
        return f"{round(levels)}/255"
    return f"{eps:g}"


def main_table(results: Sequence[EvalResult], paper: bool = True) -> str:
    """The paper's table (clean / noise / APGD l_inf / APGD l_2), measured rows below the
    paper's reference rows so the two can be read side by side; with adaptive attacks, the
    worst case per image (the robust accuracy to quote) in two more columns."""
    first = results[0] if results else None
    sigma = noise_sigma(first) if first else None
    linf = first.attacks["Linf"].eps if first and "Linf" in first.attacks else PAPER_SETTINGS["linf"]
    l2 = first.attacks["L2"].eps if first and "L2" in first.attacks else PAPER_SETTINGS["l2"]
    header = ["Model", "n", "Clean", f"Noise sigma={sigma if sigma is not None else 0.1:g}",
              f"APGD l_inf {format_eps(linf)}", f"APGD l_2 {format_eps(l2)}"]
    worst = any(worst_cases(r) for r in results)
    header += ["worst case l_inf", "worst case l_2"] if worst else []
    rows = []
    if paper:
        for name, row in PAPER_TABLE.items():
            rows.append([f"{name} (paper, VGG16)", "10000"]
                        + [f"{row[k]:.1f}%" for k in ("clean", "noise", "linf", "l2")]
                        + ["-", "-"] * worst)
    for label, result in zip(labels(results), results):
        s = summary(result)
        n_attack = next((a.apgd.n_images for a in result.attacks.values()), None)
        n = str(result.n_images) + (f" ({n_attack} attacked)" if n_attack is not None
                                    and n_attack != result.n_images else "")
        cases = worst_cases(result)
        rows.append([label, n] + [_pct(s[k]) for k in ("clean", "noise", "linf", "l2")]
                    + [f"{_pct(cases[k].accuracy)} (n={cases[k].n_images})" if k in cases
                       else "-" for k in ("Linf", "L2") if worst])
    return _table(header, rows)


def _at_paper_settings(result: EvalResult) -> dict[str, float | None]:
    """summary(), keeping only numbers measured at the paper's sigma and eps."""
    out = summary(result)
    if result.noise is None or result.noise.at(PAPER_SETTINGS["noise"]) is None:
        out["noise"] = None
    for key, norm in (("linf", "Linf"), ("l2", "L2")):
        suite = result.attacks.get(norm)
        if suite is None or abs(suite.eps - PAPER_SETTINGS[key]) > 1e-9:
            out[key] = None
    return out


def paper_table(results: Sequence[EvalResult]) -> str:
    """The paper's numbers next to the measured ones: one row per metric, one column per
    paper model and per measured model."""
    names = {"clean": "Clean", "noise": "Noise sigma=0.1", "linf": "APGD l_inf 2/255",
             "l2": "APGD l_2 0.25"}
    measured = [_at_paper_settings(r) for r in results]
    rows = [[title] + [f"{row[key]:.1f}%" for row in PAPER_TABLE.values()]
            + [_pct(m[key]) for m in measured] for key, title in names.items()]
    return _table(["metric"] + [f"{n} (paper)" for n in PAPER_TABLE] + labels(results), rows)


def noise_table(results: Sequence[EvalResult]) -> str:
    """Accuracy (mean +- std over draws) at every noise level, one column per model."""
    sigmas = sorted({s for r in results if r.noise for s in r.noise.sigmas})
    rows = []
    for sigma in sigmas:
        row = [f"{sigma:g}"]
        for r in results:
            i = next((i for i, s in enumerate(r.noise.sigmas) if s == sigma), None) if r.noise else None
            row.append("-" if i is None else
                       f"{100 * r.noise.mean[i]:.1f}% +- {100 * r.noise.std[i]:.1f}")
        rows.append(row)
    return _table(["sigma"] + labels(results), rows)


def attack_table(results: Sequence[EvalResult]) -> str:
    """APGD vs PGD vs Square on the same images, with the gradient-masking flag."""
    header = ["Model", "norm", "eps", "n", "APGD-CE+T", "PGD", "Square", "gradient worst",
              "all attacks", "Square-only breaks", "black box beats gradient"]
    rows = []
    for label, r in zip(labels(results), results):
        for norm, suite in r.attacks.items():
            c = suite.comparison
            pgd = suite.pgd.attack if suite.pgd else "PGD"
            square = suite.square.attack if suite.square else "Square"
            rows.append([label, norm, format_eps(c.eps), str(c.n_images), _pct(c.apgd),
                         f"{_pct(c.pgd)} ({pgd})", f"{_pct(c.square)} ({square})",
                         _pct(c.gradient), _pct(c.all_attacks), str(c.square_only),
                         "**YES: gradient masking?**" if c.black_box_beats_gradient else "no"])
    return _table(header, rows)


def _layer_table(results: Sequence[EvalResult], cell: Callable[[EvalResult, int], str],
                 extra_first: list[str] | None = None) -> str:
    depth = max((len(r.sparsity) for r in results), default=0)
    depth = max(depth, max((len(r.snr.layers) for r in results if r.snr), default=0))
    rows = [extra_first] if extra_first else []
    for i in range(depth):
        rows.append([f"{i + 1}"] + [cell(r, i) for r in results])
    return _table(["layer"] + labels(results), rows)


def sparsity_table(results: Sequence[EvalResult]) -> str:
    """Per layer: non-zero fraction / top-K share (kind of block in brackets)."""
    def cell(r: EvalResult, i: int) -> str:
        if i >= len(r.sparsity):
            return "-"
        s = r.sparsity[i]
        return f"{s.nonzero_fraction:.3f} / {s.top_k_share:.3f} ({s.kind})"
    return _layer_table(results, cell)


def snr_table(results: Sequence[EvalResult]) -> str:
    """Per layer SNR in dB for noisy vs clean inputs; the first row is the input's SNR."""
    def cell(r: EvalResult, i: int) -> str:
        if r.snr is None or i >= len(r.snr.layers):
            return "-"
        return f"{r.snr.layers[i].db:.2f} ({r.snr.layers[i].kind})"
    first = ["input"] + [f"{r.snr.input_db:.2f}" if r.snr else "-" for r in results]
    return _layer_table(results, cell, first)


def training_table(histories: dict[str, Sequence[dict[str, Any]]]) -> str:
    """One row per trained model: epochs, final train and held-out accuracy, time."""
    rows = []
    for name, epochs in histories.items():
        if not epochs:
            continue
        last, seconds = epochs[-1], sum(e.get("seconds", 0.0) for e in epochs)
        rows.append([name, str(last["epoch"] + 1), _pct(last.get("train_acc")),
                     f"{_pct(last.get('eval_acc'))} ({last.get('eval_split', '?')})",
                     f"{seconds / 60:.1f} min", f"{seconds / len(epochs):.0f} s"])
    return _table(["Model", "epochs", "train acc", "eval acc (split)", "training time",
                   "per epoch"], rows)


def render_markdown(results: Sequence[EvalResult], data: dict[str, Any] | None = None,
                    plots: Sequence[str] = (), title: str = "HaH evaluation report",
                    preamble: str = "",
                    histories: dict[str, Sequence[dict[str, Any]]] | None = None) -> str:
    """The whole report as Markdown; ``preamble`` (Markdown) follows the title and
    ``histories`` (per-epoch training metrics per model) adds a training section."""
    data, v = data or {}, versions()
    s = results[0].settings if results else {}
    parts = [f"# {title}", ""] + ([preamble.rstrip(), ""] if preamble else []) + [
             f"Data: `{data.get('path', '?')}` ({data.get('name', '?')}, split "
             f"{data.get('split', 'test')}), {results[0].n_images if results else 0} images"
             + (f" (seeded subset, seed {data.get('limit_seed')})" if data.get("limit") else "")
             + ".  ",
             f"Attacks: APGD-CE + APGD-T, {s.get('apgd_steps')} steps, 1 restart each, worst "
             f"case per image; PGD {s.get('pgd_steps')} steps x {s.get('pgd_restarts')} "
             f"restarts; Square {s.get('square_queries')} queries on the first "
             f"{s.get('square_limit')} attacked images; seed {s.get('attack_seed')}.  ",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
             "## Accuracy (measured vs the paper's CIFAR-10 VGG16)", "", main_table(results), "",
             "Paper rows are full-width VGG16 trained 100 epochs on all 10,000 test images; "
             "measured rows are what this run found.", ""]
    if histories:
        parts += ["## Training", "", training_table(histories), "",
                  "Training time is wall-clock as measured, including any time the machine "
                  "spent on other work.", ""]
    if any(r.noise for r in results):
        parts += ["## Gaussian noise", "", noise_table(results), ""]
    if any(r.attacks for r in results):
        parts += ["## Attack comparison (gradient masking check)", "", attack_table(results), "",
                  "A black-box attack (Square) that beats the gradient attacks means the "
                  "gradients are masked and APGD overstates robustness.", ""]
    if any(r.sparsity for r in results):
        parts += ["## Sparsity per layer (non-zero fraction / top-10% channel share)", "",
                  sparsity_table(results), "",
                  "HaH blocks: block output. VGG blocks: ReLU output before BatchNorm. "
                  "relu (residual networks): that ReLU's output.", ""]
    if any(r.snr for r in results):
        sigma = next(r.snr.sigma for r in results if r.snr)
        parts += [f"## SNR per layer (dB, noise sigma={sigma:g})", "", snr_table(results), ""]
    parts += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------------------- plots

def plot_noise(results: Sequence[EvalResult], path: Path) -> None:
    """Accuracy vs noise sigma, one curve (mean +- std over draws) per model."""
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        for label, r in zip(labels(results), results):
            points = {0.0: (r.clean_accuracy, 0.0)}
            if r.noise:
                points.update({s: (m, d) for s, m, d in zip(r.noise.sigmas, r.noise.mean, r.noise.std)})
            xs = sorted(points)
            ax.errorbar(xs, [100 * points[x][0] for x in xs], yerr=[100 * points[x][1] for x in xs],
                        marker="o", capsize=3, label=label)
        ax.set(xlabel="noise sigma (pixel scale [0, 1])", ylabel="accuracy (%)",
               title="Accuracy under Gaussian noise")
        ax.grid(alpha=0.3)
        ax.legend()
    figure(path, draw, (6, 4))


def plot_sparsity(results: Sequence[EvalResult], path: Path) -> None:
    """Non-zero fraction and top-K share per layer, one line per model."""
    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 2)
        for label, r in zip(labels(results), results):
            xs = range(1, len(r.sparsity) + 1)
            axes[0].plot(xs, [s.nonzero_fraction for s in r.sparsity], marker="o", label=label)
            axes[1].plot(xs, [s.top_k_share for s in r.sparsity], marker="o", label=label)
        axes[0].set(xlabel="layer", ylabel="fraction of non-zero activations", title="Sparsity")
        for ax in axes:
            ax.xaxis.set_major_locator(integer_ticks())
        axes[1].set(xlabel="layer", ylabel="top-10% channel share", title="Activity concentration")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
    figure(path, draw, (11, 4))


def plot_snr(results: Sequence[EvalResult], path: Path) -> None:
    """SNR (dB) per layer, the input's SNR at layer 0, one line per model."""
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        for label, r in zip(labels(results), results):
            if r.snr:
                ys = [r.snr.input_db] + [layer.db for layer in r.snr.layers]
                ax.plot(range(len(ys)), ys, marker="o", label=label)
        ax.set(xlabel="layer (0 = input)", ylabel="SNR (dB)", title="Per-layer SNR, noisy vs clean")
        ax.xaxis.set_major_locator(integer_ticks())
        ax.grid(alpha=0.3)
        ax.legend()
    figure(path, draw, (6, 4))


def filter_grid(filters: Any, pad: int = 1) -> Any:
    """An image grid of conv filters (out, in, kh, kw), each min-max normalized on its own;
    RGB when in == 3, else the mean over input channels in gray. Returns a numpy array."""
    import numpy as np

    w = np.asarray(filters, dtype=np.float64)
    if w.shape[1] != 3:
        w = w.mean(axis=1, keepdims=True)
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    span = w.max(axis=(1, 2, 3), keepdims=True) - lo
    w = np.where(span > 0, (w - lo) / np.where(span > 0, span, 1), 0.5)
    n, c, kh, kw = w.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (kh + pad) + pad, cols * (kw + pad) + pad, c))
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (kh + pad), pad + q * (kw + pad)
        grid[y:y + kh, x:x + kw] = w[i].transpose(1, 2, 0)
    return grid if c == 3 else grid[..., 0]


def plot_filters(results: Sequence[EvalResult], path: Path) -> None:
    """First-layer filters of each model as an image grid, side by side."""
    shown = [(label, r) for label, r in zip(labels(results), results) if r.filters is not None]

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, max(len(shown), 1), squeeze=False)[0]
        for ax, (label, r) in zip(axes, shown):
            grid = filter_grid(r.filters)
            ax.imshow(grid, cmap=None if grid.ndim == 3 else "gray", interpolation="nearest")
            ax.set_title(f"{label}: first-layer filters", fontsize=9)
        for ax in axes:
            ax.axis("off")
    figure(path, draw, (4 * max(len(shown), 1), 4.2))


# ----------------------------------------------------------------------------- all

def plot_training(histories: dict[str, Sequence[dict[str, Any]]], path: Path) -> None:
    """Training loss and train / held-out accuracy per epoch, one colour per model."""
    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 2)
        for index, (name, epochs) in enumerate(histories.items()):
            xs, color = [e["epoch"] + 1 for e in epochs], f"C{index}"
            axes[0].plot(xs, [e["train_loss"] for e in epochs], color=color, label=name)
            axes[1].plot(xs, [100 * e["train_acc"] for e in epochs], color=color,
                         linestyle="--", label=f"{name} train")
            axes[1].plot(xs, [100 * e["eval_acc"] if e.get("eval_acc") is not None else math.nan
                              for e in epochs], color=color, marker="o", markersize=3,
                         label=f"{name} {epochs[-1].get('eval_split', 'eval')}")
        axes[0].set(xlabel="epoch", ylabel="training loss (CE - HaH score for HaH)",
                    title="Training loss")
        axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
        for ax in axes:
            ax.xaxis.set_major_locator(integer_ticks())
            ax.grid(alpha=0.3)
            ax.legend()
    figure(path, draw, (11, 4))


def write_report(results: Sequence[EvalResult], out_dir: str | Path,
                 data: dict[str, Any] | None = None, title: str = "HaH evaluation report",
                 preamble: str = "",
                 histories: dict[str, Sequence[dict[str, Any]]] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write results.json, report.md and the PNG plots into ``out_dir``; returns the paths.
    ``title``, ``preamble`` and ``histories`` shape the report (see :func:`render_markdown`);
    ``extra`` is stored in results.json as is (e.g. the preset and training runs)."""
    if not results:
        raise ValueError("write_report needs at least one evaluation result")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in FILES}
    plots = ["noise.png"]
    plot_noise(results, paths["noise.png"])
    if any(r.sparsity for r in results):
        plot_sparsity(results, paths["sparsity.png"])
        plots.append("sparsity.png")
    if any(r.snr for r in results):
        plot_snr(results, paths["snr.png"])
        plots.append("snr.png")
    if any(r.filters is not None for r in results):
        plot_filters(results, paths["filters.png"])
        plots.append("filters.png")
    if histories and any(histories.values()):
        paths["training.png"] = out / "training.png"
        plot_training({k: v for k, v in histories.items() if v}, paths["training.png"])
        plots.insert(0, "training.png")
    document = results_document(results, data, extra)
    write_text(paths["results.json"], document)
    from hahnet.reporting import corruptions as report_corruptions  # CIFAR-10-C section, when measured
    from hahnet.reporting import adaptive as adaptive_report  # adaptive attacks, when run
    corrupt_md, corrupt_plots = report_corruptions.write(results, out)
    adaptive_md, adaptive_plots = adaptive_report.write(results, out)
    paths.update(corrupt_plots)
    paths.update(adaptive_plots)
    sections = "".join("\n" + md for md in (adaptive_md, corrupt_md) if md)
    write_text(paths["report.md"], render_markdown(results, data, plots, title, preamble,
                                                    histories) + sections)
    return {k: p for k, p in paths.items() if k in ("results.json", "report.md")
            or k in plots or k in corrupt_plots or k in adaptive_plots}
