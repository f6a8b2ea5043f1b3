"""When a preconditioner captures curvature statistics: every ``cov_interval`` steps, and
on the steps after one that met a layer with a gradient but no fresh statistics.

A layer first used (or unfrozen) between two captures has no factors when it first has a
gradient. Rather than refuse the step, the preconditioner leaves that layer's gradient as
it is (the optimizer takes its plain step for it, outside the KL clip), warns once, and
chases it: captures the step where its last gap says it is used next (two heads taking
turns: two steps after), or the steps right after it was met while no gap is known (for
at most ``cov_interval`` steps), at most :data:`CHASES` captures per interval beyond the
regular one, until a captured forward uses it; from then on the layer is preconditioned.
A layer that has factors but missed the regular captures (used on other steps than they
fall on) is chased the same way once its statistics are ``cov_interval`` steps old, so it
is refreshed about as often as the others instead of never. On a step that did capture,
a layer with a gradient and no statistics is still an error
(:func:`~twolevel_kfac.curvature.block_checks.check_statistics`: its forward ran under
``no_grad``, or its weight was used outside the module). Under ``torch.distributed``
every rank must capture on the same steps: every rank decides from what all of them share,
the layers with a gradient (``DistributedDataParallel`` gives every rank a gradient of a
layer any rank used) and the layers whose statistics some rank folded.

A capturing step whose backward reached only forwards over 0 rows (an empty batch) is
skipped in one process (:meth:`CaptureSchedule.skipped`); under ``torch.distributed``
such a rank joins the step's collectives with no sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from ..curvature.block_checks import used_layers
from ..curvature.blocks import zero_gradient
from ..curvature.kronecker import KroneckerFactors
from ..warning_level import caller_level

if TYPE_CHECKING:
    from ..curvature.captured_batch import CapturedBatch
    from .preconditioner import KFACPreconditioner

__all__ = ["CHASES", "CaptureSchedule"]

CHASES = 2
"""Captures per ``cov_interval`` steps beyond the regular one, at most, to chase layers
the regular captures missed. A layer's chase captures the step its last gap predicts
(a layer used every ``k`` steps: ``k`` steps after it was met), or, with no gap known
yet, the steps right after it was met."""


class CaptureSchedule:
    """The capture schedule of one preconditioner.

    Args:
        cov_interval: ``T_cov``.
    """

    def __init__(self, cov_interval: int) -> None:
        self.cov_interval = cov_interval
        # layer -> [first, last]: the steps a capture is wanted at to meet it
        self.pending: dict[str, list[int]] = {}
        self.folded: dict[str, int] = {}  # layer -> the step its statistics were last folded
        self.chased: list[int] = []  # the chasing captures of this interval (by step)
        self.met: dict[str, int] = {}  # layer -> the last step it had a gradient
        self._warned: set[str] = set()

    def due(self, steps: int) -> bool:
        """Whether the step after ``steps`` completed steps captures statistics: on the
        interval, or where a chased layer is expected, at most :data:`CHASES` times per
        interval (module docstring)."""
        self.pending = {n: span for n, span in self.pending.items() if span[1] >= steps}
        if steps % self.cov_interval == 0:
            return True
        window = steps // self.cov_interval
        self.chased = [s for s in self.chased if s // self.cov_interval == window]
        if steps in self.chased:  # asked again for the same step (a resume, an undo)
            return True
        wanted = any(first <= steps for first, _ in self.pending.values())
        if not wanted or len(self.chased) >= CHASES:
            return False
        self.chased.append(steps)
        return True

    def _chase(self, name: str, steps: int) -> None:
        """Want a capture where layer ``name``, met at step ``steps``, is expected next: its
        last gap later, else (no gap known) the steps after."""
        previous = self.met.get(name)
        if previous is None or previous >= steps:
            self.pending[name] = [steps + 1, steps + self.cov_interval]
        else:
            self.pending[name] = [2 * steps - previous] * 2

    def defer_unseen(
        self,
        factors: Mapping[str, KroneckerFactors],
        active: list[str],
        captured: bool,
        folded: Collection[str] = (),
        steps: int = 0,
    ) -> list[str]:
        """``active`` without the layers that have no statistics yet, on a step that
        captured none (they take the plain step, and a coming step captures); unchanged
        on a capturing step. ``folded``: the layers whose statistics this step (``steps``
        completed before it) folds; an active layer whose last ones are ``cov_interval``
        steps old is chased too (module docstring)."""
        for name in folded:
            self.folded[name] = steps
            self.pending.pop(name, None)
        unseen = [name for name in active if not factors[name].ready]
        for name in active:
            last = self.folded.setdefault(name, steps)  # (a first sight, a loaded state)
            stale = name not in folded and steps - last >= self.cov_interval
            if stale or (name in unseen and not captured):
                self._chase(name, steps)
            self.met[name] = steps
        if captured or not unseen:
            return active
        new = [name for name in unseen if name not in self._warned]
        if new:
            warnings.warn(
                f"layer(s) {new} have gradients but no curvature statistics yet (first used "
                f"between two captures, cov_interval={self.cov_interval}): they take the "
                "optimizer's plain step now, and coming steps capture statistics to meet them",
                RuntimeWarning,
                stacklevel=caller_level(),
            )
            self._warned.update(new)
        return [name for name in active if name not in unseen]

    def state_dict(self) -> dict[str, Any]:
        """The chased layers, each layer's last fold and use, this interval's chasing
        captures (a resumed run captures alike) and the layers already warned about (a
        resumed run does not warn again)."""
        return {
            "pending": {n: list(span) for n, span in self.pending.items()},
            "folded": dict(self.folded),
            "chased": list(self.chased),
            "met": dict(self.met),
            "warned": sorted(self._warned),
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (``None``: a checkpoint from before it was saved)."""
        state = state or {}
        self.pending = {
            n: [span + 1, span + self.cov_interval] if isinstance(span, int) else list(span)
            for n, span in state.get("pending", {}).items()
        }
        self.folded = dict(state.get("folded", {}))
        self.chased = list(state.get("chased", []))
        self.met = dict(state.get("met", {}))
        self._warned = set(state.get("warned", []))

    @staticmethod
    def skipped(pre: KFACPreconditioner, batch: CapturedBatch | None) -> str | None:
        """Why this step of ``pre`` is skipped (``None``: it is not).

        ``batch``: what it took of the capture. In one process:

        * ``"empty_batch"``: a capturing step over an empty batch (:attr:`~twolevel_kfac.
          curvature.capture.CurvatureCapture.empty_batch`) once every layer with a gradient
          (``active``) has its factors. Its gradient, a sum over no rows, is 0, and so is its
          direction: the step folds, refreshes, counts and writes nothing, and the next
          forward captures. A gradient that is not 0 (DP-SGD's noise on an empty Poisson
          batch) is preconditioned with the factors there are, folding nothing: it was
          stepped raw before 2026-12-06 (evening); and still is under a coarse level whose
          step reads the Fisher mini-batch's rows (A-DEF, BALANCED, the faithful residual
          schedule: none this step). The first step has nothing to precondition with:
          ``check_statistics`` refuses it.
        * ``"no_gradient"``: no layer has a gradient and ``batch`` holds no statistics (a
          ``step()`` before any backward): as a torch optimizer, nothing changes, and the
          capture stays armed for the coming forward. A zeroed ``.grad`` of a layer without
          curvature yet is none (:func:`~..curvature.block_checks.used_layers`): torch's
          ``distributed.checkpoint`` helpers step a fresh optimizer on zeroed gradients to
          create its state (that step was counted, and the captures fell out of step)."""
        if pre.comm.distributed:
            return None
        empty = pre.capture.active and pre.capture.empty_batch
        if (batch is None or not batch.names) and not empty:
            if not used_layers(pre.layers, pre.factors, pre.active, (), capturing=False):
                return "no_gradient"
        if not (empty and all(pre.factors[name].ready for name in pre.active)):
            return None
        rows = pre.coarse_level is not None and pre.coarse_level.reads_statistics
        zero = rows or all(zero_gradient(pre.layers[name]) for name in pre.active)
        return "empty_batch" if zero else None
