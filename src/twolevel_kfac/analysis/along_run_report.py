"""Figures and the ``report.md`` section of the analysis along a training run
(:mod:`.along_run`, ``along_run.json``).

* ``along_run_metrics.png``: per method, ``cos_to_exact_ng``, ``E(d)`` and ``E(d)/E(0)``
  against the run's iteration;
* ``along_run_coarse_gain.png``: the authors' figure, ``−(E(β*) − E(0))`` per coarse space
  against the iteration, absolute and relative to ``E`` of the KFAC direction (log scales:
  the gain is ≤ 0, its magnitude is drawn; magnitudes below ``FLOOR`` × the panel's largest
  one, e.g. a gain that is zero to rounding, are drawn on that floor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from .formatting import md_table, save_figure, short_name

FLOOR = 1e-6  # relative floor of the log-scale gain plots


def _steps(along: dict[str, Any]) -> list[int]:
    return [row["step"] for row in along["snapshots"]]


def _series(along: dict[str, Any], section: str, name: str, key: str) -> list[float | None]:
    return [row[section][name][key] for row in along["snapshots"]]


def _magnitudes(series: list[list[float | None]]) -> list[list[float]]:
    """``−v`` of every gain, at least ``FLOOR`` × the largest (``nan`` where missing)."""
    top = max((-v for values in series for v in values if v is not None), default=1.0)
    floor = FLOOR * top if top > 0 else 1.0
    return [[float("nan") if v is None else max(-v, floor) for v in values] for values in series]


def _xlabel(along: dict[str, Any]) -> str:
    return f"iteration of the run ({along['method']}, tlkfac run)"


def plot_metrics(along: dict[str, Any], path: Path) -> Path:
    """Cosine to ``F̂⁻¹g``, ``E(d)`` and ``E(d)/E(0)`` per method against the iteration."""
    steps = _steps(along)
    names = list(along["snapshots"][0]["methods"])
    panels = (
        ("cos_to_exact_ng", "cosine to exact natural gradient", False),
        ("energy_error", "E(d) = ‖d − F̂⁻¹g‖²_F̂", True),
        ("energy_error_relative", "E(d)/E(0)", True),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for name in names:
            series = _series(along, "methods", name, key)
            values = [float("nan") if v is None else v for v in series]
            ax.plot(steps, values, marker="o", ms=3, lw=1, label=short_name(name))
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(_xlabel(along))
        ax.set_ylabel(label)
    axes[2].axhline(1.0, color="k", lw=0.8, ls="--")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(f"along the run, λ = {along['damping']:g}", fontsize=9)
    return save_figure(fig, path, rect=(0, 0.1, 1, 1))


def plot_coarse_gain(along: dict[str, Any], path: Path) -> Path:
    """The authors' figure: ``−(E(β*) − E(0))`` per coarse space against the iteration."""
    steps = _steps(along)
    spaces = list(along["snapshots"][0]["spaces"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("coarse_gain", "coarse_gain_relative"), strict=True):
        series = _magnitudes([_series(along, "spaces", space, key) for space in spaces])
        for space, values in zip(spaces, series, strict=True):
            ax.plot(steps, values, marker="o", ms=3, lw=1, label=short_name(space))
    axes[0].set_ylabel("−(E(β*) − E(0))")
    axes[1].set_ylabel("−(E(β*) − E(0)) / E(M⁻¹g)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel(_xlabel(along))
        ax.legend(fontsize=7)
    fig.suptitle(f"optimal coarse gain along the run, λ = {along['damping']:g}", fontsize=9)
    return save_figure(fig, path)


def plot_along_run(along: dict[str, Any], out: Path) -> list[Path]:
    """Both figures of the module docstring (none without snapshots)."""
    if not along["snapshots"]:
        return []
    return [
        plot_metrics(along, out / "along_run_metrics.png"),
        plot_coarse_gain(along, out / "along_run_coarse_gain.png"),
    ]


def _step_table(along: dict[str, Any], section: str, key: str) -> list[str]:
    """A markdown table: one row per snapshot, one column per method / space."""
    snapshots = along["snapshots"]
    names = list(snapshots[0][section]) if snapshots else []
    rows = [[row["step"]] + [row[section][n][key] for n in names] for row in snapshots]
    return md_table(["step", *[short_name(n) for n in names]], rows)


def along_run_markdown(along: dict[str, Any]) -> list[str]:
    """The ``report.md`` section: what was analysed and one table per metric."""
    snapshots = along["snapshots"]
    steps = _steps(along)
    lines = [
        "## Along a training run",
        "",
        f"The {len(snapshots)} model snapshots (steps {steps[0]}–{steps[-1]}) of the "
        f"`tlkfac run` in `{along['run_dir']}` (method `{along['method']}`, optimizer "
        f"`{along['optimizer']}`), each measured on the same analysis batch of "
        f"{along['batch_size']} samples at λ = {along['damping']:g} ({along['backend']} "
        "backend).",
        "",
        "Batch loss and cosine to the exact natural gradient:",
        "",
    ]
    names = list(snapshots[0]["methods"])
    rows = [
        [row["step"], row["loss"]] + [row["methods"][n]["cos_to_exact_ng"] for n in names]
        for row in snapshots
    ]
    lines += md_table(["step", "batch loss", *[short_name(n) for n in names]], rows)
    for title, section, key in (
        ("`E(d)/E(0)`", "methods", "energy_error_relative"),
        ("Coarse gain `E(β*) − E(0)`", "spaces", "coarse_gain"),
        ("Relative coarse gain `(E(β*) − E(0)) / E(M⁻¹g)`", "spaces", "coarse_gain_relative"),
    ):
        lines += ["", f"{title}:", "", *_step_table(along, section, key)]
    return lines
