"""The adaptive-attack section of the report (``--attacks standard|adaptive|all``): the
table of every attack run and the worst case per image, which attack broke what, plain
sentences saying where an attack lowered the paper suite's number and by how much, and
one eps-sweep plot per model (``sweep-NAME.png``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from hahnet.eval.results import AdaptiveResult, AttackResult, AttackSuite, EvalResult
from hahnet.reporting.plots import figure
from hahnet.eval.markdown import labels, pct as _pct, table as _table

ROWS = {"paper": "paper suite (APGD-CE + APGD-T)", "AutoAttack": "AutoAttack standard",
        "BPDA": "BPDA", "margin": "margin (APGD-DLR + APGD-T, restarts)", "transfer": "transfer"}
NORM_NAMES = {"Linf": "l_inf", "L2": "l_2"}


def _adaptive(results: Sequence[EvalResult]) -> list[tuple[str, EvalResult]]:
    return [(label, r) for label, r in zip(labels(results), results)
            if any(s.adaptive is not None for s in r.attacks.values())]


def _column(label: str, suite: AttackSuite) -> str:
    return f"{label} {NORM_NAMES[suite.norm]} {eps_text(suite.norm, suite.eps)}"


def _on_first(result: AttackResult, n: int) -> float:
    """Robust accuracy of ``result`` on its first ``n`` images."""
    n = min(n, result.n_images)
    return sum(result.robust[:n]) / n if n else float("nan")


def _cell(result: AttackResult | None) -> str:
    return "not run" if result is None else f"{_pct(result.accuracy)} (n={result.n_images})"


def headline_table(results: Sequence[EvalResult]) -> str:
    """Rows: the paper suite, each adaptive attack, the worst case; one column per model
    and norm. Each cell: robust accuracy and the number of attacked images."""
    columns = [(label, s) for label, r in _adaptive(results) for s in r.attacks.values()
               if s.adaptive is not None]
    rows = [[ROWS["paper"]] + [_cell(s.apgd) for _, s in columns]]
    n_worst = {s.adaptive.worst.n_images for _, s in columns}
    if any(n != s.apgd.n_images for n in n_worst for _, s in columns):
        rows.append(["paper suite, on the worst case's images"] + [
            f"{_pct(_on_first(s.apgd, s.adaptive.worst.n_images))} "
            f"(n={s.adaptive.worst.n_images})" for _, s in columns])
    for key in ("AutoAttack", "BPDA", "margin", "transfer"):
        if any(key in s.adaptive.rows for _, s in columns):
            rows.append([ROWS[key]] + [_cell(s.adaptive.rows.get(key)) for _, s in columns])
    rows.append(["**worst case per image**"] + [f"**{_cell(s.adaptive.worst)}**"
                                                for _, s in columns])
    return _table(["attack"] + [_column(label, s) for label, s in columns], rows)


def eps_text(norm: str, eps: float) -> str:
    """l_inf budgets in 1/255 units (0.5/255, 2/255), l_2 budgets as decimals."""
    return f"{eps * 255:.4g}/255" if norm == "Linf" else f"{eps:.4g}"


def _images(count: int) -> str:
    return f"{count} image" + ("" if count == 1 else "s")


def comparisons(label: str, suite: AttackSuite) -> list[tuple[str, int, float, float, int]]:
    """Per attack row and the worst case: (name, n, paper suite's robust accuracy on the
    same first n images, the row's, images it broke that the paper suite left standing)."""
    out = []
    for name, row in [*suite.adaptive.rows.items(), ("worst case", suite.adaptive.worst)]:
        n = min(row.n_images, suite.apgd.n_images)
        extra = sum(1 for i in range(n) if suite.apgd.robust[i] and not row.robust[i])
        out.append((name, n, _on_first(suite.apgd, n), _on_first(row, n), extra))
    return out


def lowered(label: str, suite: AttackSuite) -> list[str]:
    """Plain sentences: each attack that lowered the paper suite's robust accuracy on the
    same images, and by how much; or that none did."""
    where = f"{label}, {NORM_NAMES[suite.norm]} {eps_text(suite.norm, suite.eps)}"
    out = [f"**{where}: {name} lowers the paper suite's {_pct(paper)} to {_pct(now)} "
           f"(-{100 * (paper - now):.1f} points, {_images(paper_n - now_n)} of {n})**"
           for name, n, paper, now, _ in comparisons(label, suite) if now < paper
           for paper_n, now_n in [(round(paper * n), round(now * n))]]
    return out or [f"{where}: no attack lowers the paper suite's "
                   f"{_pct(suite.apgd.accuracy)}."]


def comparison_table(results: Sequence[EvalResult]) -> str:
    """Each attack against the paper suite on the same images."""
    rows = [[label, f"{NORM_NAMES[s.norm]} {eps_text(s.norm, s.eps)}", name, str(n),
             _pct(paper), _pct(now), f"{100 * (now - paper):+.1f}", str(extra)]
            for label, r in _adaptive(results) for s in r.attacks.values() if s.adaptive
            for name, n, paper, now, extra in comparisons(label, s)]
    return _table(["model", "norm", "attack", "n", "paper suite", "this attack", "points",
                   "broken beyond the paper suite"], rows)


def found_table(results: Sequence[EvalResult]) -> str:
    """Per model, norm and attack row: the images it broke (clean errors excluded), the
    stage of that row that broke each first, and how many no other row broke."""
    rows = []
    for label, r in _adaptive(results):
        for suite in r.attacks.values():
            a = suite.adaptive
            if a is None:
                continue
            rows.extend(_found_rows(label, suite, a))
    return _table(["model", "norm", "attack", "n", "broken", "first broken by (stage: images)",
                   "only this attack"], rows)


def _found_rows(label: str, suite: AttackSuite, a: AdaptiveResult) -> list[list[str]]:
    n = a.worst.n_images
    everything = {"paper": suite.apgd, **a.rows}
    for check in (suite.pgd, suite.square):
        if check is not None:
            everything[check.attack] = check
    out = []
    for name, row in everything.items():
        broken = [b for b in (row.broken_by or []) if b not in (None, "clean", "earlier")]
        stages = {s: broken.count(s) for s in dict.fromkeys(broken)}
        only = sum(1 for i in range(min(n, row.n_images)) if not row.robust[i]
                   and row.broken_by is not None and row.broken_by[i] not in ("clean", "earlier")
                   and all(other.robust[i] for key, other in everything.items()
                           if key != name and i < other.n_images))
        out.append([label, f"{NORM_NAMES[suite.norm]} {eps_text(suite.norm, suite.eps)}", name,
                    str(row.n_images), str(len(broken)),
                    ", ".join(f"{s}: {c}" for s, c in stages.items()) or "-", str(only)])
    return out


def notes(results: Sequence[EvalResult]) -> list[str]:
    """The suites' notes (what was not run and why), once each per model."""
    out = []
    for label, r in _adaptive(results):
        for note in dict.fromkeys(n for s in r.attacks.values() if s.adaptive
                                  for n in s.adaptive.notes):
            out.append(f"- {label}: {note}.")
    return out


def settings_line(result: EvalResult) -> str:
    """How the adaptive attacks were run (their counts as recorded in the settings)."""
    s = result.settings
    return (f"Suite `{s.get('suite')}`: AutoAttack standard = APGD-CE, APGD-T "
            f"({s.get('apgd_steps')} steps, 9 targets on CIFAR-10), FAB-T ({s.get('fab_steps')} "
            f"steps, 9 targets), Square ({s.get('autoattack_queries')} queries), 1 restart each, "
            f"each on the images still robust; margin = APGD-DLR then APGD-T (DLR), "
            f"{s.get('restarts')} restarts each; BPDA = APGD-CE then APGD-DLR, "
            f"{s.get('restarts')} restarts, through each surrogate of "
            f"{', '.join(s.get('bpda') or [])} (sigmoid temperature "
            f"{s.get('bpda_temperature')}); transfer = PGD-CE ({s.get('transfer_steps')} steps) "
            f"crafted on the source; margin, BPDA and transfer on the first "
            f"{s.get('adaptive_limit')} attacked images; eps sweeps (APGD-CE then APGD-DLR, one "
            f"restart, each eps on its own) on the first {s.get('sweep_limit')}.")


def sweep_file(label: str) -> str:
    """The sweep plot's file name for a model label."""
    return "sweep-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "model") + ".png"


def plot_sweeps(label: str, result: EvalResult, path: Path) -> None:
    """Robust accuracy vs eps, one panel per norm, one curve per swept attack."""
    suites = [s for s in result.attacks.values() if s.adaptive and s.adaptive.sweeps]

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, max(len(suites), 1), squeeze=False)[0]
        for ax, suite in zip(axes, suites):
            scale = 255 if suite.norm == "Linf" else 1
            for sweep in suite.adaptive.sweeps:
                ax.plot([e * scale for e in sweep.eps], [100 * a for a in sweep.accuracy],
                        marker="o", label=f"{sweep.attack} (n={sweep.n_images})")
            ax.axvline(suite.eps * scale, color="gray", linestyle=":", label="evaluated eps")
            ax.set(xlabel="eps" + (" (x 1/255)" if scale == 255 else ""),
                   ylabel="robust accuracy (%)", ylim=(-2, 102),
                   title=f"{label}: {NORM_NAMES[suite.norm]} eps sweep")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    figure(path, draw, (5.5 * max(len(suites), 1), 4))


def sweep_table(results: Sequence[EvalResult]) -> str:
    """Every sweep's numbers: one row per model, norm and attack."""
    rows = []
    for label, r in _adaptive(results):
        for suite in r.attacks.values():
            for sweep in suite.adaptive.sweeps if suite.adaptive else []:
                cells = [f"{eps_text(suite.norm, e)}: {_pct(a)}"
                         for e, a in zip(sweep.eps, sweep.accuracy)]
                rows.append([label, NORM_NAMES[suite.norm], sweep.attack, str(sweep.n_images),
                             ", ".join(cells)])
    return _table(["model", "norm", "attack", "n", "robust accuracy at each eps"], rows)


def write(results: Sequence[EvalResult], out: Path) -> tuple[str, dict[str, Path]]:
    """Draw the sweep plots; returns the Markdown section and the plot paths."""
    chosen = _adaptive(results)
    if not chosen:
        return "", {}
    plots = {}
    for label, result in chosen:
        if any(s.adaptive and s.adaptive.sweeps for s in result.attacks.values()):
            plots[sweep_file(label)] = out / sweep_file(label)
            plot_sweeps(label, result, plots[sweep_file(label)])
    parts = ["## Adaptive attacks: the worst case per image", "", settings_line(chosen[0][1]), "",
             headline_table(results), "",
             "The worst case counts an image as robust only if no attack run on it broke it; "
             "it is the robust accuracy to quote. "
             + ("Cascaded: margin, BPDA and transfer attacked only the images still standing, "
                "so each of their rows is the worst case so far, not that attack alone."
                if chosen[0][1].settings.get("cascade") else "Each row is that attack on its own."),
             ""]
    parts += [f"- {line}" for label, r in chosen for s in r.attacks.values() if s.adaptive
              for line in lowered(label, s)] + [""]
    parts += ["### Each attack against the paper suite, on the same images", "",
              comparison_table(results), "",
              "points: this attack's robust accuracy minus the paper suite's (negative = the "
              "attack found more); broken beyond: images the paper suite left standing that "
              "this attack broke.", ""]
    parts += ["### Which attack broke what", "", found_table(results), ""]
    parts += notes(results) + ([""] if notes(results) else [])
    if plots:
        parts += ["### Eps sweeps", "", sweep_table(results), ""]
        parts += [f"![{Path(p).stem}]({name})" for name, p in plots.items()] + [""]
    return "\n".join(parts), plots
