"""Comparison reports: a markdown table over seeds and train-loss / test-metric plots.

Input everywhere is ``results: method -> runs``, one list of records per seed, as in
``metrics.jsonl`` (keys ``epoch, step, wall_time_s, train_loss`` and optionally
``test_loss, test_acc, val_loss, val_acc, event``). Only end-of-epoch records count
(``event`` ``"epoch"``, or no ``event``), plus a trailing ``"partial"`` one. The figures
follow the paper's (Koroko et al. 2023): training loss on a log scale against epochs and
against training seconds, the mean over seeds with a min–max band. Plots use
``matplotlib.figure.Figure`` (Agg), so no global pyplot state or display is involved.

Table columns: seeds, epochs, final and best train loss (mean ± std over seeds), the final
test metric (test accuracy for classification, else test loss; validation when there is
no test set), seconds per epoch, time per epoch relative to KFAC, and the training time
to reach a target train loss (default: 1.1 × KFAC's mean final train loss).

Times are read on the config's ``problem.clock``: ``wall_time_s`` (``"wall"``) or
``cpu_time_s`` (``"cpu"``, this process's CPU seconds in training steps) of the records.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from twolevel_kfac.experiments.reference_curves import ReferenceCurve

__all__ = [
    "default_target",
    "epoch_records",
    "held_out_metric",
    "markdown_table",
    "plot_losses",
    "summarize",
    "write_report",
]

Records = Sequence[Mapping[str, Any]]
Results = Mapping[str, Sequence[Records]]

# problem.clock -> (record key, axis label, unit in the table's headers)
CLOCKS = {
    "wall": ("wall_time_s", "training time (s)", "s"),
    "cpu": ("cpu_time_s", "training CPU time (s)", "CPU s"),
}

_COLUMNS = (
    ("seeds", "seeds"),
    ("epochs", "epochs"),
    ("final_train_loss", "final train loss"),
    ("best_train_loss", "best train loss"),
    ("test_metric", "final {metric}"),
    ("sec_per_epoch", "{unit} / epoch"),
    ("overhead_vs_kfac", "time vs KFAC"),
    ("time_to_target", "{unit} to loss ≤ {target}"),
    ("diverged", "diverged"),
)


def _num(value: Any) -> float:
    """A record value as float (``None``/missing → NaN)."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def epoch_records(records: Records) -> list[Mapping[str, Any]]:
    """End-of-epoch records, plus the last record when it is a ``"partial"`` one."""
    out = [r for r in records if r.get("event", "epoch") == "epoch"]
    if records and records[-1].get("event") == "partial":
        out.append(records[-1])
    return out


def held_out_metric(results: Results) -> str | None:
    """The held-out key the report shows: test acc > test loss > val acc > val loss."""
    keys = {k for runs in results.values() for run in runs for r in run for k in r}
    return next((k for k in ("test_acc", "test_loss", "val_acc", "val_loss") if k in keys), None)


def _stats(values: Sequence[float]) -> tuple[float, float | None] | None:
    """``(mean, std)`` of the finite values (std ``None`` for one value), ``None`` if none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None


def _final(run: Records, key: str) -> float:
    return next((_num(r[key]) for r in reversed(run) if r.get(key) is not None), math.nan)


def default_target(results: Results) -> float | None:
    """1.1 × the mean final train loss of ``kfac`` (else of the best method)."""
    finals: dict[str, float] = {}
    for method, runs in results.items():
        stats = _stats([_final(epoch_records(run), "train_loss") for run in runs])
        if stats is not None:
            finals[method] = stats[0]
    if not finals:
        return None
    key = next((m for m in finals if m.lower() == "kfac"), None)
    base = finals[key] if key else min(finals.values())
    return 1.1 * base if base > 0 else None


def _time_to(run: Records, target: float, key: str) -> float:
    hit = next((r for r in run if _num(r.get("train_loss")) <= target), None)
    return _num(hit.get(key)) if hit is not None else math.nan


def summarize(
    results: Results, target_loss: float | None = None, clock: str = "wall"
) -> list[dict[str, Any]]:
    """One summary row per method (numbers; ``None`` where a value does not apply).

    Args:
        results: ``method -> runs``.
        target_loss: Train loss for the time-to-target column (default:
            ``default_target``).
        clock: ``problem.clock``: which time the time columns read (``CLOCKS``).

    Returns:
        Rows with ``method`` and the ``_COLUMNS`` keys; ``(mean, std)`` pairs for the
        loss columns, ``time_to_target`` as ``(mean, std, runs reaching, runs)``.
    """
    target = target_loss if target_loss is not None else default_target(results)
    metric = held_out_metric(results)
    key = CLOCKS[clock][0]
    rows: list[dict[str, Any]] = []
    for method, all_runs in results.items():
        runs = [epoch_records(run) for run in all_runs]
        runs = [run for run in runs if run]
        epochs = [_num(run[-1]["epoch"]) for run in runs]
        sec = [_num(run[-1].get(key)) / e for run, e in zip(runs, epochs, strict=True) if e > 0]
        times = [_time_to(run, target, key) for run in runs] if target is not None else []
        reached = [t for t in times if math.isfinite(t)]
        rows.append(
            {
                "method": method,
                "seeds": len(runs),
                "epochs": statistics.fmean(epochs) if epochs else None,
                "final_train_loss": _stats([_final(run, "train_loss") for run in runs]),
                "best_train_loss": _stats(
                    [min((_num(r["train_loss"]) for r in run), default=math.nan) for run in runs]
                ),
                "test_metric": _stats([_final(run, metric) for run in runs]) if metric else None,
                "sec_per_epoch": statistics.fmean(sec) if sec else None,
                "overhead_vs_kfac": None,
                "time_to_target": (*(_stats(reached) or (None, None)), len(reached), len(runs))
                if times
                else None,
                "diverged": sum(bool(run[-1].get("diverged")) for run in runs),
            }
        )
    kfac = next((r for r in rows if str(r["method"]).lower() == "kfac"), None)
    if kfac is not None and kfac["sec_per_epoch"]:
        for row in rows:
            if row["sec_per_epoch"] is not None:
                row["overhead_vs_kfac"] = row["sec_per_epoch"] / kfac["sec_per_epoch"]
    return rows


def _fmt(key: str, value: Any, metric: str | None) -> str:
    if value is None:
        return "–"
    if key == "overhead_vs_kfac":
        return f"{value:.2f}×"
    if key == "time_to_target":
        mean, std, hit, total = value
        if not hit:
            return "not reached"
        text = f"{mean:.3g}" if std is None else f"{mean:.3g} ± {std:.2g}"
        return text if hit == total else f"{text} ({hit}/{total})"
    if isinstance(value, tuple):
        scale, unit = (
            (100.0, "%") if key == "test_metric" and metric and "acc" in metric else (1.0, "")
        )
        mean, std = value
        text = f"{mean * scale:.4g}{unit}"
        return text if std is None else f"{text} ± {std * scale:.2g}{unit}"
    if key == "epochs":
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown_table(results: Results, target_loss: float | None = None, clock: str = "wall") -> str:
    """Markdown table of ``summarize``; columns without any value are left out.

    Args:
        results: ``method -> runs``.
        target_loss: See ``summarize``.
        clock: See ``summarize``.

    Returns:
        The table, one line per method after the header.
    """
    rows = summarize(results, target_loss, clock)
    metric = held_out_metric(results)
    target = target_loss if target_loss is not None else default_target(results)
    names = {"metric": (metric or "").replace("_", " "), "unit": CLOCKS[clock][2]}
    cols = [
        (k, h.format(target=f"{target or 0:.4g}", **names))
        for k, h in _COLUMNS
        if any(r[k] for r in rows)
    ]
    lines = [
        "| method | " + " | ".join(h for _, h in cols) + " |",
        "|---|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += [
        f"| {r['method']} | " + " | ".join(_fmt(k, r[k], metric) for k, _ in cols) + " |"
        for r in rows
    ]
    return "\n".join(lines)


def _band(runs: Sequence[Records], x_key: str, y_key: str) -> list[tuple[float, ...]]:
    """``(x, mean, min, max)`` per epoch index over the runs with a finite value there."""
    points: list[tuple[float, ...]] = []
    for i in range(max((len(run) for run in runs), default=0)):
        rows = [run[i] for run in runs if i < len(run) and math.isfinite(_num(run[i].get(y_key)))]
        if rows:
            ys = [_num(r[y_key]) for r in rows]
            x = statistics.fmean(_num(r.get(x_key)) for r in rows)
            points.append((x, statistics.fmean(ys), min(ys), max(ys)))
    return points


def _plot(
    results: Results,
    x_key: str,
    y_key: str,
    labels: tuple[str, str],
    path: Path,
    title: str,
    references: Sequence[ReferenceCurve] = (),
) -> Path:
    """Mean over seeds with a min–max band; log y for losses when all values are > 0;
    ``references`` as dashed black-and-grey lines.

    Loss axes stop at 3× the 95th percentile of the plotted means, so an early blow-up
    that a method recovers from does not flatten every other curve.
    """
    fig = Figure(figsize=(6.4, 4.4), constrained_layout=True)
    ax = fig.add_subplot()
    positive, low = True, math.inf
    means: list[float] = []
    for method, runs in results.items():
        pts = _band([epoch_records(run) for run in runs], x_key, y_key)
        if not pts:
            continue
        xs, mean, lo, hi = (list(col) for col in zip(*pts, strict=True))
        (line,) = ax.plot(xs, mean, marker="." if len(xs) < 30 else None, label=method)
        if len(runs) > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        positive, means, low = positive and min(lo) > 0, means + mean, min([low, *lo])
    for k, ref in enumerate(references):
        style = ("--", ":", "-.")[k % 3]
        ax.plot(ref.epochs, ref.losses, style, color="black", alpha=0.7, label=f"ref: {ref.label}")
        positive = positive and min(ref.losses) > 0
        means, low = means + list(ref.losses), min([low, *ref.losses])
    log = positive and "acc" not in y_key
    if log:
        ax.set_yscale("log")
    if len(means) > 1 and "acc" not in y_key:
        top = 3 * statistics.quantiles(means, n=20)[-1]
        if max(means) > top:
            ax.set_ylim(low / 1.2 if log else low - 0.05 * (top - low), top)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.savefig(path, dpi=100)
    return path


def plot_losses(
    results: Results,
    out_dir: str | Path,
    title: str = "",
    references: Sequence[ReferenceCurve] = (),
    clock: str = "wall",
) -> list[Path]:
    """Write ``loss_vs_epoch.png``, ``loss_vs_time.png`` and ``test_vs_epoch.png``.

    Args:
        results: ``method -> runs``.
        out_dir: Output directory (created if missing).
        title: Figure title.
        references: Curves drawn beside the runs on the loss-vs-epoch plot.
        clock: The time axis (``CLOCKS``).

    Returns:
        The PNG paths (no test plot without a held-out metric).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _plot(
            results,
            "epoch",
            "train_loss",
            ("epoch", "training loss"),
            out / "loss_vs_epoch.png",
            title,
            references,
        ),
        _plot(
            results,
            CLOCKS[clock][0],
            "train_loss",
            (CLOCKS[clock][1], "training loss"),
            out / "loss_vs_time.png",
            title,
        ),
    ]
    metric = held_out_metric(results)
    if metric is not None:
        label = metric.replace("_", " ").replace("acc", "accuracy")
        paths.append(
            _plot(results, "epoch", metric, ("epoch", label), out / "test_vs_epoch.png", title)
        )
    return paths


def write_report(
    results: Results,
    out_dir: str | Path,
    title: str = "Comparison",
    notes: str = "",
    target_loss: float | None = None,
    references: Sequence[ReferenceCurve] = (),
    provenance: str = "",
    epochs_table: str = "",
    clock: str = "wall",
    runs: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``report.md`` (table, notes, plots), the PNGs and ``summary.json``.

    Args:
        results: ``method -> runs``.
        out_dir: Output directory (created if missing).
        title: Report heading and figure title.
        notes: Markdown placed under the table (set-up, hyper-parameters).
        target_loss: See ``summarize``.
        references: Curves drawn beside the runs (loss vs epoch), listed with their files.
        provenance: The runs' provenance paragraph (:func:`.provenance.describe`).
        epochs_table: The train loss at chosen epochs (:func:`.epoch_table.epoch_table`).
        clock: Which time the table and the time plot read (``CLOCKS``).
        runs: What ``summary.json`` records of the runs besides the table (a
            comparison's unfinished and left-out runs: :meth:`.ShownRuns.status`).

    Returns:
        Path of ``report.md``.
    """
    out = Path(out_dir)
    pngs = plot_losses(results, out, title, references, clock)
    parts = [f"# {title}", "", markdown_table(results, target_loss, clock), ""]
    if notes:
        parts += [notes.strip(), ""]
    if references:
        listed = ", ".join(f"{r.label} (`{r.source}`)" for r in references)
        parts += [f"Reference curves (dashed, loss vs epoch): {listed}.", ""]
    if epochs_table:
        parts += ["Train loss at these epochs (mean ± std over seeds):", "", epochs_table, ""]
    if provenance:
        parts += [provenance, ""]
    how = "1.1 × KFAC's (else the best method's) mean final train loss"
    if target_loss is not None:
        how = "the target given"
    parts += [
        f"Time to target: the first epoch whose train loss is at most {how}. Plots: the mean "
        "over seeds, shaded from the lowest to the highest seed.",
        "",
        *(f"![{p.stem}]({p.name})" for p in pngs),
    ]
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    summary = {
        "target_loss": target_loss or default_target(results),
        "clock": clock,
        "rows": summarize(results, target_loss, clock),
        **({"runs": dict(runs)} if runs is not None else {}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return path
