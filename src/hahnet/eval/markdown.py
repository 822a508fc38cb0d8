"""Markdown pieces every report section shares: model labels, percentages, tables."""

from __future__ import annotations

import math
from typing import Sequence

from hahnet.eval.results import EvalResult


def labels(results: Sequence[EvalResult]) -> list[str]:
    """Unique column names for the models (their names, numbered when repeated)."""
    names = [r.name for r in results]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal; "-" for None or NaN."""
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
