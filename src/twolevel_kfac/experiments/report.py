"""Comparison reports: a markdown table and train-loss plots (vs epoch and vs wall time).

Input everywhere is ``results: method -> list of per-epoch records`` as returned by
``runner.train`` (keys ``epoch, step, wall_time_s, train_loss, test_loss[, test_acc]``).
The figures follow the paper's (Koroko et al. 2023): training loss on a log scale
against epochs and against training seconds. Plots use matplotlib's Agg canvas through
``matplotlib.figure.Figure``, so no global pyplot state or display is involved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["markdown_table", "plot_losses", "summarize", "write_report"]

Records = Sequence[Mapping[str, Any]]
Results = Mapping[str, Records]

_COLUMNS = (
    ("method", "method"),
    ("epochs", "epochs"),
    ("final_train_loss", "final train loss"),
    ("best_train_loss", "best train loss"),
    ("final_test_loss", "final test loss"),
    ("final_test_acc", "final test acc"),
    ("sec_per_epoch", "s / epoch"),
    ("overhead_vs_kfac", "time vs KFAC"),
)


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def summarize(results: Results) -> list[dict[str, Any]]:
    """One summary row per method.

    Args:
        results: ``method -> records``.

    Returns:
        Rows with the keys of the table columns; ``None`` where a value does not apply
        (no records, no accuracy, no ``kfac`` entry to compare with).
    """
    rows: list[dict[str, Any]] = []
    for method, recs in results.items():
        last = recs[-1] if recs else {}
        train = _finite([float(r["train_loss"]) for r in recs])
        epochs = len(recs)
        rows.append(
            {
                "method": method,
                "epochs": epochs,
                "final_train_loss": last.get("train_loss"),
                "best_train_loss": min(train) if train else None,
                "final_test_loss": last.get("test_loss"),
                "final_test_acc": last.get("test_acc"),
                "sec_per_epoch": last["wall_time_s"] / epochs if epochs else None,
                "overhead_vs_kfac": None,
            }
        )
    kfac = next((r for r in rows if str(r["method"]).lower() == "kfac"), None)
    if kfac is not None and kfac["sec_per_epoch"]:
        for row in rows:
            if row["sec_per_epoch"] is not None:
                row["overhead_vs_kfac"] = row["sec_per_epoch"] / kfac["sec_per_epoch"]
    return rows


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "overhead_vs_kfac":
        return f"{value:.2f}×"
    if key == "final_test_acc":
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(results: Results) -> str:
    """Markdown table of ``summarize(results)``; all-empty columns are left out.

    Args:
        results: ``method -> records``.

    Returns:
        The table, one line per method after the header.
    """
    rows = summarize(results)
    cols = [(k, h) for k, h in _COLUMNS if any(r[k] is not None for r in rows) or k == "method"]
    lines = [
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(k, r[k]) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def _plot(results: Results, x_key: str, x_label: str, path: Path, title: str) -> Path:
    """Train loss against ``x_key`` for every method, log y when all losses are > 0."""
    fig = Figure(figsize=(6.4, 4.4), constrained_layout=True)
    ax = fig.add_subplot()
    positive = True
    for method, recs in results.items():
        pts = [(float(r[x_key]), float(r["train_loss"])) for r in recs]
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 30 else None, label=method)
            positive = positive and min(y for _, y in pts) > 0
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if results:
        ax.legend()
    fig.savefig(path, dpi=120)
    return path


def plot_losses(results: Results, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``loss_vs_epoch.png`` and ``loss_vs_time.png`` into ``out_dir``.

    Args:
        results: ``method -> records``.
        out_dir: Output directory (created if missing).
        title: Figure title.

    Returns:
        The two PNG paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        _plot(results, "epoch", "epoch", out / "loss_vs_epoch.png", title),
        _plot(results, "wall_time_s", "training time (s)", out / "loss_vs_time.png", title),
    ]


def write_report(
    results: Results, out_dir: str | Path, title: str = "Comparison", notes: str = ""
) -> Path:
    """Write ``report.md`` (table, notes, plots) and the two PNGs into ``out_dir``.

    Args:
        results: ``method -> records``.
        out_dir: Output directory (created if missing).
        title: Report heading and figure title.
        notes: Markdown paragraph placed under the table (set-up, hyper-parameters).

    Returns:
        Path of ``report.md``.
    """
    pngs = plot_losses(results, out_dir, title)
    parts = [f"# {title}", "", markdown_table(results), ""]
    if notes:
        parts += [notes, ""]
    parts += [f"![{p.stem}]({p.name})" for p in pngs]
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
