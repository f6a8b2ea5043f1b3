"""NaN/Inf in a step of :class:`~.kfac.KFAC`: found with as few passes over the gradients as
possible, and dropped before it reaches the parameters, the momentum or the running
factors (``nonfinite_policy="skip"``), or raised (``"raise"``).

A run whose steps are all skipped has diverged (its loss is NaN at every batch): after
:data:`STALLED` skipped steps in a row a warning says so, once per such streak (before
2026-12-07 such a run went on skipping every step without a word)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..finite import all_finite
from ..warning_level import caller_level

if TYPE_CHECKING:
    from .kfac import KFAC

__all__ = ["STALLED", "finite_after_step", "finite_gradients", "skip_nonfinite"]

STALLED = 10
"""Skipped steps in a row after which a run is warned of as diverged."""


def finite_gradients(groups: Iterable[dict[str, Any]], skip: frozenset[int] = frozenset()) -> bool:
    """Whether every gradient entry of the ``groups``' parameters is finite
    (:func:`~twolevel_kfac.finite.all_finite`), leaving out those whose ``id`` is in ``skip``."""
    return all_finite(
        p.grad for g in groups for p in g["params"] if p.grad is not None and id(p) not in skip
    )


def finite_after_step(opt: KFAC, directions_finite: bool | None, deferred: bool) -> bool:
    """Whether every ``.grad`` is finite after preconditioning, with as few passes as
    possible: the KL clip's sum may have decided it for the preconditioned layers
    (``directions_finite``); the other parameters' gradients need a look only if the check
    before the step was ``deferred``."""
    if directions_finite is None:
        return finite_gradients(opt.param_groups)
    if not directions_finite:
        return False
    skip = frozenset(opt.preconditioner.preconditioned_parameters())
    return not deferred or finite_gradients(opt.param_groups, skip)


def skip_nonfinite(opt: KFAC, what: str) -> None:
    """Drop the step (and its captured curvature statistics) and count it; raise under
    ``nonfinite_policy="raise"``; warn once :data:`STALLED` steps in a row were dropped.

    Raises:
        FloatingPointError: under ``nonfinite_policy="raise"``, naming ``what``.
    """
    pre = opt.preconditioner
    pre.capture.discard()
    opt.nonfinite_steps += 1
    opt.consecutive_nonfinite += 1
    pre.last_stats = {"nonfinite_skipped": 1.0}
    if opt.nonfinite_policy == "raise":
        raise FloatingPointError(
            f"non-finite {what} at step {pre.steps} (nonfinite_policy='raise')"
        )
    if opt.consecutive_nonfinite == STALLED:
        warnings.warn(
            f"{type(opt).__name__}: the last {STALLED} steps were all skipped for a non-finite "
            f"{what} (nonfinite_steps={opt.nonfinite_steps}): the run has likely diverged, "
            "its parameters too large for a finite loss, and no later step will move them. "
            "Restart from a checkpoint with a lower lr or a larger damping; "
            "nonfinite_policy='raise' stops at the first such step",
            RuntimeWarning,
            stacklevel=caller_level(),
        )
