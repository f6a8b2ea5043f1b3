"""A ``step()`` interrupted part-way (an exception, ``KeyboardInterrupt``) after it began
to change the optimizer's state.

A step that folds statistics writes each layer's running factors in turn (in place at a
refresh), and a refresh that carries state (EKFAC's scalings into the new eigenbases)
would carry them again from what it already replaced; the step counter moves only once
all of it is done. Interrupted in between, the state mixes this step's batch into
some layers and not others: the next step, and a checkpoint saved now, would go on
silently from it. So such a step marks the preconditioner until it completes, and while
marked :meth:`step` and ``state_dict()`` refuse, naming the step, until a state saved
before it is loaded (``load_state_dict``). A step that changes no state (no statistics
folded, a refresh that only recomputes decompositions from the factors) is not marked: it
can simply be taken again, after a new forward and backward (:func:`step_guard` drops
what it captured and rewinds the sampler, so its draws are those of a run that never
saw the interruption). Under ``torch.distributed`` any exception marks the step: the
other ranks may have completed it (their factors, counters and parameters are then a step
ahead), so every rank must load the state saved before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .stale_gradients import check_new_gradients, mark_directions

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

__all__ = ["check_not_interrupted", "partial_step", "step_guard"]


def partial_step(pre: KFACPreconditioner, folds: bool) -> str | None:
    """What an interruption of this step from now on would leave partial (``folds``: it
    folds statistics; else it refreshes the decompositions), or ``None`` when nothing
    (module docstring)."""
    if folds:
        return (
            f"step {pre.steps} was interrupted while it folded its statistics into the running "
            "factors (some layers hold them, others do not)"
        )
    if not pre.fine.stateless(pre.steps):
        return (
            f"step {pre.steps} was interrupted while its refresh carried the fine level's "
            "state into the new decompositions (EKFAC's scalings; some layers' are carried, "
            "others not)"
        )
    return None


def check_not_interrupted(pre: KFACPreconditioner, action: str) -> None:
    """Refuse ``action`` on a preconditioner whose last step was interrupted part-way.

    Raises:
        RuntimeError: naming the step and the way back.
    """
    if pre.interrupted is not None:
        raise RuntimeError(
            f"{pre.interrupted}: {action} would go on silently from that partial state. Load "
            "a state_dict saved before that step (optimizer.load_state_dict), or build a new "
            "optimizer"
        )


@contextmanager
def step_guard(pre: KFACPreconditioner) -> Iterator[None]:
    """Around a step: refuse it after an interrupted one (:func:`check_not_interrupted`),
    or on the directions the last step wrote (:mod:`.stale_gradients`, which marks this
    step's when it completes);
    if it raises before changing any state, drop what it captured and rewind the sampler
    to before its draws (the rows, the MC targets), so the step taken again after a new
    forward draws as a run that never saw the interruption."""
    check_not_interrupted(pre, "another step")
    check_new_gradients(pre)
    drawn_from, steps = pre.capture.drawn_from, pre.steps
    try:
        yield
    except BaseException:
        if pre.interrupted is None and pre.comm.distributed:
            pre.interrupted = (
                f"step {pre.steps} raised on this rank under torch.distributed, where the "
                "other ranks may have completed it (every rank must load the same state)"
            )
        if pre.interrupted is None:
            pre.capture.discard(drawn_from)
        raise
    if pre.steps != steps:  # a step taken: its directions are in the layers' .grad
        mark_directions(pre, pre.active)
