"""What every benchmark is told: the ``tlkfac bench`` options, resolved once."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BenchOptions"]


@dataclass(frozen=True)
class BenchOptions:
    """Options shared by the benchmarks.

    Attributes:
        quick: The small, fast variant (a check that everything runs, not numbers to keep).
        threads: torch intra-op threads in force (recorded in every report).
        out: Output directory of ``NAME.json`` / ``NAME.md`` / ``NAME*.png``.
        repeats: Interleaved rounds (``None``: the benchmark's default).
        external: Path of a kfac-pytorch checkout, or ``None``.
        authors: Path of a checkout of the authors' code (Koroko et al.,
            ``natural-gradients``), or ``None``.
        problems: Problem names to restrict to, or ``None``.
        methods: Method labels to restrict to, or ``None`` (SGD, the baseline, always runs).
        intervals: Refresh intervals T to restrict to, or ``None``.
        device: Where the benchmarks that take it (``gpu``) put models and data.
    """

    quick: bool = False
    threads: int = 1
    out: Path = Path("docs/benchmarks")
    repeats: int | None = None
    external: str | None = None
    authors: str | None = None
    problems: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    intervals: tuple[int, ...] | None = None
    device: str = "cpu"

    def rounds(self, full: int, quick: int) -> int:
        """``repeats`` if given, else the default of the mode."""
        return self.repeats or (quick if self.quick else full)

    def pick(self, full: tuple[int, ...], quick: tuple[int, ...]) -> tuple[int, ...]:
        """``intervals`` if given, else the default of the mode."""
        return self.intervals or (quick if self.quick else full)

    @staticmethod
    def log(text: str) -> None:
        """Progress line on stderr."""
        print(text, file=sys.stderr, flush=True)
