"""Whether the training loss is a mean over the samples, as KFAC takes it: a loss summed
over the batch (``reduction="sum"``) is not, and nothing else says so.

Under ``fisher="empirical"`` each row's gradient is scaled by the batch size ``N``
(``δ_n = N·∂L/∂s_n``, the per-sample gradient of a mean loss), so a summed loss's ``G``
is ``N²`` too large (a trial: 30 steps at the defaults reached a loss of 2.15 against the
mean loss's 0.11). (Under ``fisher="mc"`` the step is ``N`` times the mean loss's, as
SGD's is: not judged.)

Told from the gradient at softmax logits (one that sums to zero over the classes:
:func:`~.loss_mask.off_simplex_share`). A mean over the samples of losses of
``log_softmax`` has ``Σ_n ‖∂L/∂f_n‖₁ ≤ 2`` per position of a sample (``‖softmax(f) −
q‖₁ ≤ 2`` for any target distribution ``q``, weighted or smoothed; distillation's ``T²``
term at most ``2T``); a sum over ``N`` samples has ``N`` times a mean's, which passes
:data:`LIMIT` per position while the model is far from its targets. A sum over each
sample's positions divided by ``N`` (a language model's per-sample loss) is a mean over
the samples and passes.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..warning_level import caller_level
from .hooks import on_gradient
from .loss_mask import off_simplex_share
from .pooled_rows import main_output

if TYPE_CHECKING:
    from .forward_pass import ForwardPass

__all__ = ["LIMIT", "SummedLoss", "summed_share"]

LIMIT = 16.0
"""``Σ_n ‖∂L/∂f_n‖₁`` per position above which the loss is no mean over the samples (8×
the bound of a mean of softmax losses; distillation at ``T ≤ 8`` stays under it)."""


def summed_share(grad: Tensor, samples: int, class_dim: int | None) -> float | None:
    """``Σ_n ‖∂L/∂f_n‖₁`` per position of a sample, for a gradient at categorical logits
    (``[N·k, C]``, or ``class_dim`` given) that sums to zero over the classes; ``None`` for
    another gradient."""
    if grad.dim() < 2 or (grad.dim() > 2 and class_dim is None) or samples < 2:
        return None
    dim = -1 if class_dim is None else class_dim
    classes = int(grad.shape[dim])
    if classes < 2 or not grad.is_floating_point():
        return None
    if off_simplex_share(grad, class_dim) > 0.01:  # (not a softmax loss's gradient)
        return None
    total = float(grad.abs().sum())
    return total * samples * classes / grad.numel() if math.isfinite(total) else None


class SummedLoss:
    """Under ``fisher="empirical"``, the :func:`summed_share` of the gradient each user's
    backward handed a captured forward's main output since the last :meth:`judge`, which
    warns, once, of a loss summed over the samples (module docstring), reading the shares
    of the step's samples alone (an attack's forwards, whose gradients are dropped, may
    sum their losses)."""

    def __init__(self) -> None:
        self.seen: list[tuple[ForwardPass, float]] = []
        self.warned = False

    def watch(self, output: Any, forward: ForwardPass, class_dim: int | None) -> None:
        """Hook the gradient of the main output of ``forward``, where it may be logits."""
        main = main_output(output)
        if self.warned or main is None or main.dim() < 2 or not main.requires_grad:
            return

        def seen(grad: Tensor) -> None:
            share = summed_share(grad.detach(), forward.batch_size, class_dim)
            if share is not None:
                self.seen.append((forward, share))

        on_gradient(main, seen)

    def judge(self, loss_scale: float = 1.0) -> None:
        """At the step, the gradients unscaled by ``loss_scale`` (a ``GradScaler``'s): warn
        where a share of a forward that is a sample (its gradient not dropped) passed
        :data:`LIMIT`; forget the shares."""
        shares = [(s / loss_scale, f.batch_size) for f, s in self.seen if f.backward_done]
        self.seen = []
        share, samples = max(shares, default=(0.0, 0))
        if self.warned or share <= LIMIT:
            return
        self.warned = True
        warnings.warn(
            f"the training loss's gradient at the logits has an L1 norm of {share:.3g} per "
            f"position over a batch of {samples} samples, more than a mean over the samples "
            "of softmax cross-entropies can have (2): is the loss summed over the batch "
            "(reduction='sum')? fisher='empirical' takes it as a mean over the samples and "
            "scales each row's gradient by the batch size, so G would be "
            f"{samples}² times too large for a sum: use reduction='mean' (a sum over each "
            "sample's positions divided by the batch size is a mean over the samples). A "
            "mean scaled on purpose (a loss weight, a temperature or CosFace's scale inside "
            "the loss) is not wrong: the empirical Fisher is that of the scaled losses",
            RuntimeWarning,
            stacklevel=caller_level(),
        )
