"""The CIFAR-10-C section of the report: tables (corruption x severity, per family, mean,
mCE, sparsity under corruption), accuracy-vs-severity curves per family
(``corruptions.png``) and a grid of example images (``corruption_examples.png``, drawn
from the corruption cache by :func:`plot_examples` while the images are at hand)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from hahnet.eval import corruptions as C
from hahnet.eval.corruptions import evaluate as ec
from hahnet.eval.results import EvalResult
from hahnet.reporting.plots import figure, integer_ticks

CURVES = "corruptions.png"
EXAMPLES = "corruption_examples.png"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _with(results: Sequence[EvalResult]) -> list[EvalResult]:
    return [r for r in results if r.corruptions is not None]


def summary_table(results: Sequence[EvalResult]) -> str:
    """Per model: clean, mean corruption accuracy (benchmark), extra mean, mCE, rel. mCE."""
    rows = []
    for r in _with(results):
        c = r.corruptions
        extra = [n for n in c.names if n in C.EXTRA]
        rows.append([r.name, _pct(c.clean_accuracy), _pct(ec.mean_accuracy(c)),
                     _pct(ec.mean_accuracy(c, extra)) if extra else "-",
                     _ratio(c.mce), _ratio(c.relative_mce)])
    return _table(["Model", "clean", "mean corruption acc.", "extra (held-out) mean",
                   "mCE", "relative mCE"], rows)


def family_table(results: Sequence[EvalResult]) -> str:
    """Mean accuracy per family and severity, one column per model and severity."""
    rs = _with(results)
    sevs = rs[0].corruptions.severities
    fams = {r.name: ec.family_accuracy(r.corruptions) for r in rs}
    header = ["family"] + [f"{r.name} s{s}" for r in rs for s in sevs] + \
             [f"{r.name} mean" for r in rs]
    rows = []
    for family in C.FAMILIES:
        if all(family in fams[r.name] for r in rs):
            vals = [fams[r.name][family] for r in rs]
            rows.append([family] + [_pct(a) for v in vals for a in v]
                        + [_pct(sum(v) / len(v)) for v in vals])
    return _table(header, rows)


def model_table(result: EvalResult) -> str:
    """Corruption x severity accuracy of one model, with its mean, CE and relative CE."""
    c = result.corruptions
    rows = []
    for name in c.names:
        acc = c.accuracy[name]
        rows.append([name, C.family_of(name)] + [_pct(a) for a in acc]
                    + [_pct(sum(acc) / len(acc)), _ratio(c.ce.get(name)),
                       _ratio(c.relative_ce.get(name))])
    return _table(["corruption", "family"] + [f"s{s}" for s in c.severities]
                  + ["mean", "CE", "rel. CE"], rows)


def sparsity_table(results: Sequence[EvalResult]) -> str:
    """Non-zero fraction per block: clean vs each family at the sparsity severity."""
    rs = [r for r in _with(results) if r.corruptions.sparsity]
    cols = [(r, key) for r in rs for key in r.corruptions.sparsity]
    layers = [l.name for l in rs[0].corruptions.sparsity["clean"]]
    rows = []
    for i, layer in enumerate(layers):
        rows.append([layer] + [f"{r.corruptions.sparsity[k][i].nonzero_fraction:.3f}"
                               for r, k in cols])
    return _table(["block"] + [f"{r.name} {k}" for r, k in cols], rows)


def section(results: Sequence[EvalResult], plots: Sequence[str] = ()) -> str:
    """The report's Markdown section (empty when no result has corruptions)."""
    rs = _with(results)
    if not rs:
        return ""
    c = rs[0].corruptions
    base = c.baseline or rs[0].name
    parts = ["## Common corruptions (CIFAR-10-C, `hahnet.eval.corruptions`)", "",
             f"{c.n_images} images, each corrupted with seed {c.seed} (uint8, cached); "
             f"severities {', '.join(map(str, c.severities))}. Means run over the evaluated "
             "benchmark corruptions (the 15 of CIFAR-10-C; the 4 held-out `extra` ones "
             "separately). With E = 1 - accuracy and the first model "
             f"(`{base}`) as baseline: CE_c = sum_s E_s,c / sum_s E_s,c^base, relative "
             "CE_c = sum_s (E_s,c - E_clean) / sum_s (E_s,c^base - E_clean^base), mCE and "
             "relative mCE = their means over the benchmark corruptions, in percent "
             "(baseline = 100; lower is better; '-' where the baseline's denominator is not "
             "positive).", "", summary_table(rs), "",
             "### Mean accuracy per family and severity", "", family_table(rs), ""]
    for r in rs:
        parts += [f"### {r.name}: accuracy per corruption and severity", "", model_table(r), ""]
    if any(r.corruptions.sparsity for r in rs):
        sev, k = c.sparsity_severity, c.sparsity_images
        parts += [f"### Sparsity under corruption (non-zero fraction per block, severity {sev})",
                  "", sparsity_table(rs), "",
                  f"Each family column: the first {k} images of each of its corruptions at "
                  f"severity {sev}; clean: the same {k} images uncorrupted. HaH blocks: block "
                  "output; VGG blocks: ReLU output before BatchNorm.", ""]
    parts += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(parts).rstrip() + "\n"


def plot_curves(results: Sequence[EvalResult], path: Path) -> None:
    """Accuracy vs severity (0 = clean) per family, one line per model."""

    rs = _with(results)
    fams = [f for f in C.FAMILIES if f in ec.family_accuracy(rs[0].corruptions)]

    def draw(fig: Any) -> None:
        for i, family in enumerate(fams):
            ax = fig.add_subplot(1, len(fams), i + 1)
            for r in rs:
                c = r.corruptions
                ys = [c.clean_accuracy] + ec.family_accuracy(c)[family]
                ax.plot([0] + list(c.severities), [100 * y for y in ys], marker="o",
                        label=r.name)
            ax.set_title(family)
            ax.set_xlabel("severity (0 = clean)")
            ax.xaxis.set_major_locator(integer_ticks())
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_ylabel("accuracy (%)")
                ax.legend(fontsize=8)

    figure(path, draw, (3.0 * max(len(fams), 1), 3.4))


def plot_examples(cache: ec.CorruptionCache, names: Sequence[str], path: Path,
                  severity: int = 3, index: int = 0) -> None:
    """One image (``index``) clean and under each corruption at ``severity``."""

    names = list(names)
    tiles = [("clean", cache.images[index])] + [
        (n, cache.load(n, severity)[index]) for n in names]
    cols = min(5, len(tiles))
    rows = -(-len(tiles) // cols)

    def draw(fig: Any) -> None:
        for i, (title, img) in enumerate(tiles):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(title.replace("_", " "), fontsize=8)
            ax.axis("off")

    figure(path, draw, (1.6 * cols, 1.75 * rows))


def write(results: Sequence[EvalResult], out: Path) -> tuple[str, dict[str, Path]]:
    """Draw the curves; returns the Markdown section and the plot paths (the examples
    grid is listed when :func:`plot_examples` put it in ``out``)."""
    if not _with(results):
        return "", {}
    paths = {CURVES: out / CURVES}
    plot_curves(results, paths[CURVES])
    if (out / EXAMPLES).exists():
        paths[EXAMPLES] = out / EXAMPLES
    return section(results, list(paths)), paths
