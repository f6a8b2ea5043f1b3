"""``metrics.jsonl``: one JSON object per logged step or epoch.

Records are strict JSON: non-finite numbers are written as ``null`` (a diverged run says
so with ``"diverged": true``). On resume, ``MetricsWriter`` keeps exactly the lines that
existed when the checkpoint was written (the checkpoint stores their count) and drops the
rest, so nothing is duplicated and the file equals that of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["MetricsWriter", "NullMetricsWriter", "load_runs", "read_metrics"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Append-only JSONL writer, truncating to a checkpoint's line count on resume.

    Args:
        path: The ``metrics.jsonl`` file.
        keep_lines: ``None`` starts a new file; an int keeps the first ``keep_lines``
            lines of the existing one (the count a checkpoint recorded).

    Raises:
        ValueError: The file has fewer lines than ``keep_lines`` (it does not belong to
            the checkpoint).
    """

    def __init__(self, path: str | Path, keep_lines: int | None = None) -> None:
        self.path = Path(path)
        lines: list[str] = []
        if keep_lines is not None:
            existing = (
                self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
            )
            complete = [line for line in existing if line.strip()]
            if len(complete) < keep_lines:
                raise ValueError(
                    f"{self.path} has {len(complete)} records but the checkpoint was written "
                    f"after {keep_lines}; the metrics file does not belong to this checkpoint"
                )
            lines = complete[:keep_lines]
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, self.path)
        self.count = len(lines)
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it."""
        self._handle.write(json.dumps(_clean(record), allow_nan=False) + "\n")
        self._handle.flush()
        self.count += 1

    def close(self) -> None:
        """Close the file."""
        self._handle.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class NullMetricsWriter(MetricsWriter):
    """A ``MetricsWriter`` that counts records without touching any file (the ranks other
    than 0 of a distributed run, which share rank 0's ``metrics.jsonl``)."""

    def __init__(self, path: str | Path, keep_lines: int | None = None) -> None:
        self.path = Path(path)
        self.count = keep_lines or 0

    def write(self, record: dict[str, Any]) -> None:
        """Count ``record``."""
        self.count += 1

    def close(self) -> None:
        """Nothing to close."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line, from a crash, is skipped).

    Raises:
        FileNotFoundError: No such file.
        ValueError: A line other than the last is not JSON.
    """
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not JSON: {error}") from None
    return records


def load_runs(
    directory: str | Path, order: Sequence[str] = ()
) -> dict[str, list[list[dict[str, Any]]]]:
    """The runs of a comparison directory: ``DIR/<method>/seed<k>/metrics.jsonl``.

    Args:
        directory: The comparison directory.
        order: Method order (e.g. the config's); others follow alphabetically.

    Returns:
        ``method -> runs`` (seeds in numeric order).

    Raises:
        FileNotFoundError: No run under ``directory``.
    """
    root = Path(directory)
    found: dict[str, list[tuple[int, list[dict[str, Any]]]]] = {}
    for metrics in sorted(root.glob("*/seed*/metrics.jsonl")):
        seed = metrics.parent.name.removeprefix("seed")
        key = int(seed) if seed.lstrip("-").isdigit() else 0
        found.setdefault(metrics.parent.parent.name, []).append((key, read_metrics(metrics)))
    if not found:
        raise FileNotFoundError(f"no runs (<method>/seed<k>/metrics.jsonl) under {root}")
    names = [m for m in order if m in found] + sorted(set(found) - set(order))
    return {m: [run for _, run in sorted(found[m], key=lambda t: t[0])] for m in names}
