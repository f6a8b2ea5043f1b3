"""Shared helpers of the analysis reports (:mod:`.report`, :mod:`.along_run_report`):
JSON cleaning, saving matplotlib figures (Agg backend), short method names, numbers and
markdown tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DPI = 90


def clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None`` (standard JSON has no NaN/inf)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def save_figure(
    fig: Any, path: Path, rect: tuple[float, float, float, float] | None = None
) -> Path:
    """Lay out (``tight_layout`` within ``rect``), write (``DPI``) and close a figure;
    returns ``path``."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


LEGEND_NOTE = (
    "The legends shorten the names of the tables: `nico` is `nicolaides`, `kry_` is `krylov_`."
)


FLOOR = 1e-16
"""Where a log-scale plot draws values at or below it (zero to rounding, or negative)."""
FLOOR_NOTE = "values ≤ 1e-16 (zero to rounding) drawn at 1e-16"


def line_style(index: int) -> str:
    """The line style of the ``index``-th line of a plot: solid for matplotlib's first ten
    colours, then dashed, then dotted, so that no two lines look alike."""
    return ("-", "--", ":", "-.")[(index // 10) % 4]


def short_name(name: str) -> str:
    """A method or coarse-space name shortened for legends (``nicolaides`` → ``nico``)."""
    return name.replace("krylov_", "kry_").replace("nicolaides", "nico").replace("+", " + ")


def fmt(value: Any) -> str:
    """A table cell: ``–`` for ``None``, 4 decimals or scientific notation for floats."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.3e}"
    return str(value)


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """The lines of a markdown table (cells through :func:`fmt`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return lines
