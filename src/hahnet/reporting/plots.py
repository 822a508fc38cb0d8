"""Figures for the reports: drawn without pyplot (no global backend or figure state) and
written atomically as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from hahnet.io import atomic_write


def figure(path: Path, draw: Callable[[Any], None], size: tuple[float, float]) -> None:
    """Call ``draw(fig)`` on a new matplotlib Figure of ``size`` inches; save it to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def integer_ticks() -> Any:
    """A tick locator for axes that count (epochs, severities)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)
