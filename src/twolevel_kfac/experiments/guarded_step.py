"""One training step that lets no NaN/Inf through (the runner's non-finite policy).

A step whose loss or gradient is not finite, or whose forward left a non-finite buffer (a
BatchNorm running variance overflows while the normalised outputs and the loss stay
finite), is *skipped*: the parameters, the optimizer
state, KFAC's running factors and the model's buffers (BatchNorm running statistics, which
the forward already updated) are left exactly as they were before the step. The KFAC family
skips and counts such steps itself (``opt.nonfinite_steps``); for other optimizers the
gradients are checked here before ``step()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from twolevel_kfac.finite import all_finite


def guarded_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    compute_loss: Callable[[], Tensor],
    reduce: Callable[[float], float] | None = None,
) -> tuple[float, bool]:
    """Run forward, backward and ``optimizer.step()`` unless something is non-finite.

    Args:
        model: the model (its buffers are restored when the step is skipped).
        optimizer: any torch optimizer; KFAC-family optimizers skip by themselves.
        compute_loss: the forward pass, returning the minibatch's loss.
        reduce: maps the loss value to the one that decides and is returned, before
            ``backward`` (a data-parallel run: the global batch's loss, so that every
            process skips the same steps).

    Returns:
        ``(loss value, stepped)``: ``stepped`` is ``False`` for a skipped step.
    """
    optimizer.zero_grad(set_to_none=True)
    buffers = [b.detach().clone() for b in model.buffers()]
    loss = compute_loss()
    value = float(loss.detach())
    if not all_finite(model.buffers()):
        value = math.nan  # before ``reduce``, so every process skips this step
    if reduce is not None:
        value = reduce(value)
    stepped = math.isfinite(value) and _backward_and_step(optimizer, loss)
    if not stepped:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        _discard_capture(optimizer)
        optimizer.zero_grad(set_to_none=True)
    return value, stepped


def _backward_and_step(optimizer: torch.optim.Optimizer, loss: Tensor) -> bool:
    """Backward and step; ``False`` when the step was skipped for a NaN/Inf gradient."""
    loss.backward()
    skipped_before = getattr(optimizer, "nonfinite_steps", None)
    if skipped_before is not None:  # the KFAC family skips and counts by itself
        optimizer.step()
        return int(getattr(optimizer, "nonfinite_steps", 0)) == skipped_before
    grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
    if not all(bool(torch.isfinite(g).all()) for g in grads if g is not None):
        return False
    optimizer.step()
    return True


def _discard_capture(optimizer: torch.optim.Optimizer) -> None:
    """Drop the curvature statistics a KFAC-family forward captured for a skipped step."""
    capture = getattr(getattr(optimizer, "preconditioner", None), "capture", None)
    if capture is not None:
        capture.discard()
