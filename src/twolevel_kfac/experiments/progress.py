"""Progress of the long commands (``tlkfac run``, ``compare``, ``tune``, ``analyze``).

On a terminal a tqdm bar. Elsewhere (a log file, ``nohup``, a batch job's stderr) a bar's
carriage returns make an unreadable log, and no bar at all leaves an hours-long run silent
until it ends: there :class:`ProgressLines` writes one plain line at most every
``interval`` seconds, ``desc: done/total (pct) elapsed, eta, postfix``. A command shorter
than ``interval`` writes nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["LINE_INTERVAL_S", "ProgressLines", "progress_bar"]

LINE_INTERVAL_S = 60.0
"""Seconds between two progress lines when stderr is not a terminal."""


class ProgressLines:
    """The part of tqdm's interface the commands use (``update``, ``set_postfix``, a
    context manager), written as occasional plain lines."""

    def __init__(
        self,
        total: int,
        desc: str,
        initial: int = 0,
        interval: float | None = None,
        file: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.n = total, desc, initial
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self.file = file
        self.start = self.last = time.monotonic()
        self.initial = initial
        self.postfix: dict[str, Any] = {}

    def line(self, now: float) -> str:
        """``desc: n/total (pct) elapsed, eta …, postfix`` (the eta from the rate so far)."""
        elapsed = now - self.start
        done = self.n - self.initial
        text = f"{self.desc}: {self.n}/{self.total}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f} %)"
        text += f", {tqdm.format_interval(elapsed)} elapsed"
        if done > 0 and self.total > self.n:
            text += f", about {tqdm.format_interval(elapsed / done * (self.total - self.n))} left"
        return text + "".join(f", {k} {v}" for k, v in self.postfix.items())

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items; write a line if ``interval`` has passed since the last."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=self.file or sys.stderr, flush=True)

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next line (as tqdm's ``set_postfix``)."""
        self.postfix = dict(values)

    def close(self) -> None:
        """Nothing to clear (tqdm's interface)."""

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    total: int, desc: str, enabled: bool, initial: int = 0, leave: bool = False
) -> tqdm | ProgressLines:
    """A tqdm bar on a terminal, :class:`ProgressLines` elsewhere, a disabled bar when
    ``enabled`` is false (``--quiet``, a rank other than the first)."""
    if enabled and not sys.stderr.isatty():
        return ProgressLines(total, desc, initial)
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        leave=leave,
        dynamic_ncols=True,
        disable=not enabled,
    )
