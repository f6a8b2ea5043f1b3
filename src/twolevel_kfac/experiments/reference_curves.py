"""Reference curves ``(epoch, loss)`` drawn beside a comparison's runs, e.g. a published
curve (``tlkfac report DIR --reference authors=ref/kfac.csv``, or ``report.references`` of
a config).

Accepted files:

* CSV with a header naming an ``epoch`` column and a ``loss`` or ``train_loss`` column
  (other columns ignored), or two unnamed numeric columns ``epoch, loss``;
* JSON: ``{"epoch": [...], "loss": [...]}`` or a list of ``{"epoch": e, "loss": l}``
  (``train_loss`` is accepted for ``loss``).

The losses must be in the runs' units (per sample, per output feature …): the report
draws them as they are.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ReferenceCurve", "parse_reference", "read_reference"]

_LOSS_KEYS = ("loss", "train_loss")


@dataclass(frozen=True)
class ReferenceCurve:
    """A labelled curve read from ``source``."""

    label: str
    epochs: tuple[float, ...]
    losses: tuple[float, ...]
    source: str


def _numbers(values: list[Any], what: str, path: Path) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {what} values must be numbers; got {values[:5]!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{path}: {what} values must be finite")
    return out


def _from_json(path: Path) -> tuple[list[Any], list[Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "epoch" in data:
        key = next((k for k in _LOSS_KEYS if k in data), None)
        if key is not None:
            return list(data["epoch"]), list(data[key])
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        key = next((k for k in _LOSS_KEYS if data and k in data[0]), None)
        if key is not None and all("epoch" in row and key in row for row in data):
            return [row["epoch"] for row in data], [row[key] for row in data]
    raise ValueError(
        f'{path}: expected {{"epoch": [...], "loss": [...]}} or a list of '
        '{"epoch": e, "loss": l} objects'
    )


def _from_csv(path: Path) -> tuple[list[Any], list[Any]]:
    rows = [row for row in csv.reader(path.read_text(encoding="utf-8").splitlines()) if row]
    if not rows:
        raise ValueError(f"{path}: empty reference curve")
    header = [cell.strip().lower() for cell in rows[0]]
    if "epoch" in header:
        key = next((k for k in _LOSS_KEYS if k in header), None)
        if key is None:
            raise ValueError(f"{path}: a CSV header needs a 'loss' or 'train_loss' column")
        e, l_ = header.index("epoch"), header.index(key)
        body = rows[1:]
    else:
        e, l_, body = 0, 1, rows
    if any(len(row) <= max(e, l_) for row in body):
        raise ValueError(f"{path}: every row needs an epoch and a loss")
    return [row[e] for row in body], [row[l_] for row in body]


def read_reference(path: str | Path, label: str | None = None) -> ReferenceCurve:
    """Read a reference curve (module docstring); ``label`` defaults to the file's stem.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a format this module does not read, non-numeric values, or no points.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference curve {path} does not exist")
    try:
        epochs, losses = _from_json(path) if path.suffix == ".json" else _from_csv(path)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not epochs:
        raise ValueError(f"{path}: the reference curve has no points")
    return ReferenceCurve(
        label or path.stem,
        _numbers(epochs, "epoch", path),
        _numbers(losses, "loss", path),
        str(path),
    )


def parse_reference(spec: str, root: Path | None = None) -> ReferenceCurve:
    """``LABEL=PATH`` or ``PATH`` (label: the stem), ``PATH`` relative to ``root``."""
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = "", spec
    full = Path(path) if root is None or Path(path).is_absolute() else root / path
    return read_reference(full, label or None)
