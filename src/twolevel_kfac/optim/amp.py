"""``torch.amp.GradScaler`` support: the optimizers unscale the gradients and the
empirical Fisher themselves, and drop a step the scaler found infinite, statistics included.

The optimizers set ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` hands them the
scale (``opt.grad_scale``, ``None`` when ``scaler.unscale_(opt)`` already ran) and whether
the scaled gradients overflowed (``opt.found_inf``) instead of unscaling behind their back.
That matters because the hooks of ``fisher="empirical"`` record the *scaled* output
gradients ``S·δ``: without the scale ``G`` would be ``S²`` too large. A step the scaler
skips must also drop the statistics its forward captured (else the next step folds in
the overflowed batch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from ..curvature.blocks import block_parameters
from ..finite import all_finite

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

__all__ = [
    "AmpState",
    "drops_overflow",
    "forget_amp_state",
    "forgets_amp_state_on_error",
    "take_amp_state",
    "unscale_gradients",
]

T = TypeVar("T")

AmpState = tuple[float | None, bool]
"""``(loss scale S or None when the gradients are already unscaled, found_inf)``."""


def take_amp_state(optimizer: Any) -> AmpState | None:
    """What ``GradScaler.step`` handed ``optimizer`` for this step (the scaler deletes
    the attributes after it), or ``None`` outside a scaler."""
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return None
    scale = getattr(optimizer, "grad_scale", None)
    return (None if scale is None else float(scale)), bool(found_inf.sum() > 0)


def forget_amp_state(optimizer: Any) -> None:
    """Remove what ``GradScaler.step`` handed ``optimizer``: the scaler deletes it only when
    ``step`` returns, and multiplies a ``grad_scale`` it finds into the next one (so after
    a step that raised, the next step would unscale by ``S²``)."""
    for name in ("grad_scale", "found_inf"):
        optimizer.__dict__.pop(name, None)


def forgets_amp_state_on_error(step: Callable[..., T]) -> Callable[..., T]:
    """``step`` that removes the scaler's attributes (:func:`forget_amp_state`) when it
    raises."""

    @functools.wraps(step)
    def guarded(optimizer: Any, *args: Any, **kwargs: Any) -> T:
        try:
            return step(optimizer, *args, **kwargs)
        except BaseException:
            forget_amp_state(optimizer)
            raise

    return guarded


def unscale_gradients(groups: Iterable[dict[str, Any]], scale: float) -> None:
    """``p.grad ← p.grad / S`` for every parameter of ``groups`` with a gradient, as the
    scaler's own ``unscale_`` does (multiplied by the float32 ``1/S``)."""
    grads: list[Tensor] = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    if grads:
        inverse = float(torch.tensor(scale, dtype=torch.float64).reciprocal().float())
        torch._foreach_mul_(grads, inverse)


def amp_loss_scale(optimizer: Any, fisher: str) -> float | None:
    """The loss scale of this step's empirical statistics (1 outside a GradScaler),
    with the gradients unscaled here; ``None`` when the scaler found an inf.

    Raises:
        RuntimeError: for ``fisher="empirical"`` after ``scaler.unscale_(opt)``, which
            leaves the scale of the captured output gradients unknown.
    """
    state = take_amp_state(optimizer)
    if state is None:
        return 1.0
    scale, found_inf = state
    if found_inf:
        return None
    if scale is not None:
        unscale_gradients(optimizer.param_groups, scale)
        return scale
    if fisher == "empirical":
        raise RuntimeError(
            f"{type(optimizer).__name__}(fisher='empirical') under GradScaler after "
            "scaler.unscale_(opt): the captured output gradients carry the loss scale, "
            "which is then unknown here. Call scaler.step(opt) without unscale_ (to bound "
            "the step, use kl_clip: see 'Gradient clipping' in docs/training_loops.md) or "
            "use fisher='mc'"
        )
    return 1.0


def drops_overflow(pre: KFACPreconditioner, loss_scale: float) -> bool:
    """``KFACPreconditioner.step(loss_scale=S)`` beside your own optimizer and a
    ``GradScaler`` (``S ≠ 1``, the gradients unscaled by ``scaler.unscale_``): whether a
    layer's gradient overflowed. Then the step is dropped as the optimizers drop one the
    scaler skips: its captured statistics discarded (the next forward captures again),
    nothing counted, the gradients left for ``scaler.step`` to find and skip
    (``last_stats["amp_skipped"]``). An overflowed first step has no statistics to
    report missing. One pass over the gradients, only under a scaler."""
    if loss_scale == 1.0:
        return False
    parameters = (p for m in pre.layers.values() for p in block_parameters(m) if p is not None)
    if all_finite(p.grad for p in parameters if p.grad is not None):
        return False
    pre.capture.discard()
    pre.last_stats = {"amp_skipped": 1.0}
    return True
