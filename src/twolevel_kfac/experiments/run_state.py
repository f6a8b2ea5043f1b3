"""What a run's training loop carries between steps (and checkpoints), and its outcome.

:class:`LoopState` is the loop's position and accumulators: all of it goes into the
checkpoint (``checkpoint.pt``'s ``loop``), so a resumed run continues from it exactly.
:class:`RunResult` is what :func:`~twolevel_kfac.experiments.runner.train_run` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FINAL_REASONS", "LoopState", "RunResult"]

# stop reasons after which a run is finished (besides reaching problem.epochs)
FINAL_REASONS = ("early_stopping", "diverged", "time_budget")


@dataclass
class LoopState:
    """Where the loop is; everything here goes into the checkpoint."""

    epoch: int = 0  # completed epochs
    position: int = 0  # minibatches done in the current epoch
    step: int = 0
    wall_time_s: float = 0.0
    loss_sum: float = 0.0  # current epoch
    loss_count: int = 0
    log_sum: float = 0.0  # since the last step record
    log_count: int = 0
    diag_sums: dict[str, float] = field(default_factory=dict)
    diag_counts: dict[str, int] = field(default_factory=dict)
    best_loss: float = math.inf
    bad_epochs: int = 0
    stop_reason: str = ""
    records: int = 0  # metrics lines written before this state
    nonfinite_steps: int = 0  # skipped steps (NaN/Inf loss or gradient), in total
    consecutive_nonfinite: int = 0  # skipped steps in a row, up to this one


@dataclass
class RunResult:
    """Outcome of ``train_run``."""

    run_dir: Path
    records: list[dict[str, Any]]
    finished: bool
    interrupted: bool
    stop_reason: str
    step: int
