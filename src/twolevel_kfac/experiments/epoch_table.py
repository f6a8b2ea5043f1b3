"""The train loss of every method at chosen epochs, beside reference curves: the table a
reproduction report compares a published curve with (``report.epochs`` of a config).

A cell is the mean over the seeds that reached that epoch (``± std`` with two or more, and
``(k/n)`` when only ``k`` of ``n`` seeds got there); a reference's cell is its value at that
epoch, ``–`` where it has none.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from twolevel_kfac.experiments.reference_curves import ReferenceCurve
from twolevel_kfac.experiments.report import Results, epoch_records

__all__ = ["epoch_table", "loss_at_epoch"]


def loss_at_epoch(run: Sequence[Mapping[str, Any]], epoch: int) -> float | None:
    """The train loss of the end-of-epoch record of ``epoch`` (``None`` if not reached)."""
    for record in epoch_records(run):
        if record.get("event", "epoch") == "epoch" and record.get("epoch") == epoch:
            value = record.get("train_loss")
            return float(value) if isinstance(value, (int, float)) else None
    return None


def _cell(values: list[float], seeds: int) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "–"
    text = f"{statistics.fmean(finite):.4g}"
    if len(finite) > 1:
        text += f" ± {statistics.stdev(finite):.2g}"
    if len(finite) < seeds:
        text += f" ({len(finite)}/{seeds})"
    return text


def _reference_at(curve: ReferenceCurve, epoch: int) -> str:
    for e, loss in zip(curve.epochs, curve.losses, strict=True):
        if e == epoch:
            return f"{loss:.4g}"
    return "–"


def epoch_table(
    results: Results, references: Sequence[ReferenceCurve], epochs: Sequence[int]
) -> str:
    """A markdown table: one row per epoch, one column per method and reference.

    Args:
        results: ``method -> runs`` (records of ``metrics.jsonl``).
        references: Curves to put beside them (columns ``ref: LABEL``).
        epochs: The epochs (1-based, as the records count them).

    Returns:
        The table, or ``""`` without epochs.
    """
    if not epochs:
        return ""
    methods = list(results)
    headers = ["epoch", *methods, *(f"ref: {r.label}" for r in references)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for epoch in epochs:
        cells = [str(epoch)]
        for method in methods:
            runs = results[method]
            found = [loss_at_epoch(run, epoch) for run in runs]
            cells.append(_cell([v for v in found if v is not None], len(runs)))
        cells += [_reference_at(r, epoch) for r in references]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
