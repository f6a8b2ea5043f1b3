"""When a preconditioner captures curvature statistics: every ``cov_interval`` steps, and
on the step after one that met a layer with a gradient but no statistics yet.

A layer first used (or unfrozen) between two captures has no factors when it first has a
gradient. Rather than refuse the step, the preconditioner leaves that layer's gradient as
it is (the optimizer takes its plain step for it, outside the KL clip), warns once, and
captures statistics on the next step; from then on the layer is preconditioned. On a step
that did capture, a layer with a gradient and no statistics is still an error
(:func:`~twolevel_kfac.curvature.block_checks.check_statistics`: its forward ran under
``no_grad``, or its weight was used outside the module).

A capturing step whose backward reached only forwards over 0 rows (an empty batch) is
skipped in one process (:meth:`CaptureSchedule.skips_empty`); under ``torch.distributed``
such a rank joins the step's collectives with no sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..curvature.kronecker import KroneckerFactors

if TYPE_CHECKING:
    from ..curvature.capture import CurvatureCapture
    from ..distributed import Communicator

__all__ = ["CaptureSchedule"]


class CaptureSchedule:
    """The capture schedule of one preconditioner.

    Args:
        cov_interval: ``T_cov``.
    """

    def __init__(self, cov_interval: int) -> None:
        self.cov_interval = cov_interval
        self.capture_next = False
        self._warned: set[str] = set()

    def due(self, steps: int) -> bool:
        """Whether the step after ``steps`` completed steps captures statistics."""
        due = steps % self.cov_interval == 0 or self.capture_next
        self.capture_next = False
        return due

    def defer_unseen(
        self, factors: Mapping[str, KroneckerFactors], active: list[str], captured: bool
    ) -> list[str]:
        """``active`` without the layers that have no statistics yet, on a step that
        captured none (they take the plain step, and the next step captures); unchanged
        on a capturing step."""
        unseen = [name for name in active if not factors[name].ready]
        if captured or not unseen:
            return active
        new = [name for name in unseen if name not in self._warned]
        if new:
            warnings.warn(
                f"layer(s) {new} have gradients but no curvature statistics yet (first used "
                f"between two captures, cov_interval={self.cov_interval}): they take the "
                "optimizer's plain step now, and the next step captures their statistics",
                RuntimeWarning,
                stacklevel=5,
            )
            self._warned.update(new)
        self.capture_next = True
        return [name for name in active if name not in unseen]

    @staticmethod
    def skips_empty(
        capture: CurvatureCapture,
        factors: Mapping[str, KroneckerFactors],
        active: list[str],
        comm: Communicator,
    ) -> bool:
        """Whether a capturing step over an empty batch (:attr:`~twolevel_kfac.curvature.
        capture.CurvatureCapture.empty_batch`) is skipped: in one process, once every
        layer with a gradient (``active``) has its factors. Its gradient, a sum over no
        rows, is 0, and so is its direction: the step folds, refreshes, counts and writes
        nothing, and the next forward captures. The first step has nothing to precondition
        with: ``check_statistics`` refuses it."""
        empty = capture.active and capture.empty_batch and not comm.distributed
        return empty and all(factors[name].ready for name in active)
