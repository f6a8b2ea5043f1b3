"""What a run's training loop carries between steps (and checkpoints), and its outcome.

:class:`LoopState` is the loop's position and accumulators: all of it goes into the
checkpoint (``checkpoint.pt``'s ``loop``), so a resumed run continues from it exactly.
:class:`RunResult` is what :func:`~twolevel_kfac.experiments.runner.train_run` returns.

A finished run also writes ``result.json`` (:func:`write_result`: its config's fingerprint,
stop reason and step count). With ``metrics.jsonl`` and ``config.yaml`` it is all a report
needs, so a comparison's finished runs can be kept (committed, copied to another machine)
without their checkpoints: :func:`read_finished` gives the run back, and a comparison that
meets it does not train it again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twolevel_kfac.experiments.config import ExperimentConfig, ProblemSpec

__all__ = [
    "FINAL_REASONS",
    "RESULT_FILE",
    "LoopState",
    "RunResult",
    "forget_start",
    "outcome",
    "read_finished",
    "run_limits",
    "write_result",
]

RESULT_FILE = "result.json"

# stop reasons after which a run is finished (besides reaching problem.epochs)
FINAL_REASONS = ("early_stopping", "diverged", "time_budget")


@dataclass
class LoopState:
    """Where the loop is; everything here goes into the checkpoint."""

    epoch: int = 0  # completed epochs
    position: int = 0  # minibatches done in the current epoch
    step: int = 0
    wall_time_s: float = 0.0
    cpu_time_s: float = 0.0  # this process's CPU time in training steps (problem.clock)
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


def run_limits(problem: ProblemSpec) -> dict[str, Any]:
    """A config's ``problem`` limits on where a run ends (kept in ``result.json``)."""
    return {
        "epochs": problem.epochs,
        "time_budget_s": problem.time_budget_s,
        "clock": problem.clock,
    }


def write_result(result: RunResult, fingerprint: str, limits: dict[str, Any]) -> None:
    """Write ``run_dir/result.json`` for a finished run.

    Args:
        result: The finished run.
        fingerprint: Its config's fingerprint.
        limits: What ended it besides the trajectory (``epochs``, ``time_budget_s``,
            ``clock``), so that a later config asking for more is not answered by it.
    """
    saved = {"fingerprint": fingerprint, "stop_reason": result.stop_reason, "step": result.step}
    text = json.dumps(saved | limits, indent=1)
    (result.run_dir / RESULT_FILE).write_text(text + "\n", encoding="utf-8")


def read_finished(
    run_dir: Path, config: ExperimentConfig, records: list[dict[str, Any]]
) -> RunResult | None:
    """The finished run in ``run_dir`` (``None`` without ``result.json``).

    Args:
        run_dir: The run directory.
        config: The run config asking for the run (``ExperimentConfig.for_run``): its
            fingerprint and :func:`run_limits`.
        records: Its ``metrics.jsonl`` records.

    Returns:
        The run, finished, when ``result.json`` answers that config.

    Raises:
        ValueError: ``result.json`` cannot be read, was written for another config, asks
            for less than ``limits`` (more epochs, a larger time budget: only its checkpoint
            could continue it), or disagrees with the records (missing or cut short).
    """
    path = run_dir / RESULT_FILE
    if not path.exists():
        return None
    fingerprint, limits = config.fingerprint(), run_limits(config.problem)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved_fingerprint, stop_reason, step = (
            saved["fingerprint"],
            str(saved["stop_reason"]),
            int(saved["step"]),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} cannot be read ({error}); delete it to rerun the run") from None
    if saved_fingerprint != fingerprint:
        raise ValueError(f"{path} is the result of another config than this run's")
    changed = [
        key
        for key in ("epochs", "time_budget_s", "clock")
        if key in saved and saved[key] != limits.get(key) and _binding(key, stop_reason)
    ]
    if changed:
        raise ValueError(
            f"{path} finished under other limits ({', '.join(changed)}: "
            f"{[saved[k] for k in changed]} then, {[limits.get(k) for k in changed]} now) and "
            "its checkpoint is not here to continue it"
        )
    last = records[-1].get("step") if records else None
    if last != step:
        raise ValueError(
            f"{path} says the run finished at step {step}, but its metrics.jsonl ends at "
            f"{'no record' if last is None else f'step {last}'}"
        )
    return RunResult(run_dir, records, True, False, stop_reason, step)


def _binding(key: str, stop_reason: str) -> bool:
    """Whether limit ``key`` decided where a run that stopped for ``stop_reason`` ended."""
    if key == "epochs":
        return stop_reason == "epochs"
    return stop_reason == "time_budget"


_OUTCOMES = {
    "epochs": "finished its epochs",
    "early_stopping": "stopped early",
    "diverged": "diverged",
    "time_budget": "reached its time budget",
}


def outcome(stop_reason: str, step: int) -> str:
    """A run's ``stop_reason`` and its steps in words (``"epochs"``: finished its epochs
    after 12 steps), for the lines a run or comparison prints; the reason itself as it is
    saved otherwise."""
    return f"{_OUTCOMES.get(stop_reason, stop_reason)} after {step} step{'s' * (step != 1)}"


def forget_start(run_dir: Path, error: Exception, main: bool, first: bool) -> None:
    """A new run whose first step failed (``first``; a model that does not fit the data:
    "mat1 and mat2 shapes cannot be multiplied"): its step-0 checkpoint and metrics are
    removed (on the main process), so that the corrected config starts there without
    ``--resume`` (before 2026-12-11 the directory "already held a run", and with
    ``--resume`` was "written for another config", a trial found); the error says so."""
    if not first:
        return
    if main:
        for name in ("checkpoint.pt", "metrics.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    error.add_note(
        f"(the first training step failed: nothing was trained, and {run_dir} holds no run; "
        "check problem.model against the data set, e.g. its input size)"
    )
