"""Whether a loss taken as ``loss_reduction="sum"`` is torch's mean over the tokens.

Under ``fisher="mc"`` the sampled loss of categorical logits with positions ``[N, T, C]``
is ``ℓ_n = s Σ_t CE(f_nt, ŷ_nt)`` with ``s = 1`` (``sum``: the training loss summed over
each sample's positions, then averaged over the samples) or ``s = N/N_tok`` (``mean``:
``F.cross_entropy(logits.flatten(0, 1), y.flatten())``, the mean over the ``N_tok``
counted tokens). Nothing in the forward says which the training loss is, and the usual
language-model loss under the default ``sum`` makes the MC Fisher ``T̄²`` times too large
for it (a newcomer's model: a loss 45× higher after 100 steps than with ``mean``).

The training loss's gradient at the logits tells afterwards. At a position with a hard
target ``y`` (or a smoothed one, ``(1 − ε)e_y + ε/C``) it is ``g = a(p − q)``, so over the
classes ``c ≠ y`` it is affine in ``p_c`` with slope ``a``: ``a = 1/N`` for a per-sample
sum, ``1/N_tok`` for the token mean (``1/(kN…)`` over ``k`` micro-batches, each loss
divided by ``k``; ``S`` times that under a ``GradScaler`` of scale ``S``). The mean of
``r = N·a`` over the positions whose gradient fits that form is ``1`` for ``sum`` and
``1/T̄`` for the token mean, ``T̄ = N_tok/N`` the counted positions per sample:
:class:`TokenMean` warns where ``r T̄`` is within 25 % of 1 over ``T̄ ≥ 4``. The form: an
affine ``g_c`` in ``p_c`` (``R² ≥ 0.99``) over 4 or more classes ``c ≠ y``, else (2–4
classes, binary segmentation) ``g_c = a p_c`` with one ratio; one slope for all positions
(within 5 %), or for those of each target class (class weights ``w_y``: torch's weighted
mean divides by ``Σ w_y``: the ``a`` sum to 1 over the tokens), so not a distillation's
nor a focal loss's, ``a f(p_y)``, which vary; with 2–4 classes only where ``p_y`` varies
by 20 % or more (a Dice loss near a uniform output has one slope where ``p_y`` is the same).
Before 2026-12-06 (night) only 5 or more classes with one slope for all were judged.
Judged on at most 64 positions of each of the first 8 backwards of steps taken (passes
over ``64·C`` numbers, not over the logits). Not judged: a gradient unscaled by
``scaler.unscale_(opt)`` before ``scaler.step`` (its scale is then unknown here), targets
all soft, label smoothing with 2–4 classes (``g_c = a(p_c − ε/C)`` is not ``a p_c``: told
or not by how much ``p_c`` varies).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..warning_level import caller_level

__all__ = ["TokenMean", "token_scale"]

_POSITIONS = 64  # positions judged per backward
_CHECKS = 8  # backwards judged


def token_scale(grad: Tensor, values: Tensor, class_dim: int) -> tuple[float, float] | None:
    """``(r, T̄)`` of categorical logits with positions (``values``, ``[N, T…, C]`` with the
    classes at ``class_dim``) and the training loss's gradient ``grad`` there (module
    docstring), from at most :data:`_POSITIONS` evenly spread positions; ``None`` where
    fewer than 8 of them fit the hard-target form or their slopes do not tell."""
    classes, samples = int(grad.shape[class_dim]), len(grad)
    if classes < 2:
        return None
    g, p = _picked(grad, class_dim), _picked(values, class_dim).softmax(-1)  # [K, C]
    counted = g.abs().amax(dim=-1) > 0
    positions = float(counted.float().mean()) * grad.numel() / classes / samples  # T̄
    g, p = g[counted].double(), p[counted].double()
    target = g.argmin(dim=1, keepdim=True)  # (the most negative: the target's class)
    slope, fits = (_affine if classes >= 5 else _proportional)(g, p, target)
    if int(fits.sum()) < 8:
        return None
    target, p_y = target.squeeze(1)[fits], p.gather(1, target).squeeze(1)[fits]
    if not _one_slope_per_class(slope[fits], target, p_y, varied=classes < 5):
        return None
    return float(slope[fits].mean()) * samples, positions


def _affine(g: Tensor, p: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Each position's slope ``a`` of ``g_c = a p_c + b`` over the classes ``c ≠ y`` (a
    hard or smoothed target), and whether it fits (``R² ≥ 0.99``: 4 or more classes, where
    a line through them is a test)."""
    others = g.shape[1] - 1

    def over_others(z: Tensor) -> Tensor:  # Σ over the classes c ≠ target
        return z.sum(dim=1) - z.gather(1, target).squeeze(1)

    mean_g, mean_p = over_others(g) / others, over_others(p) / others
    cov = over_others(g * p) - others * mean_g * mean_p
    var = over_others(p * p) - others * mean_p**2
    spread = over_others(g * g) - others * mean_g**2
    slope = cov / var.clamp_min(torch.finfo(var.dtype).tiny)
    return slope, (var > 0) & (spread - slope * cov <= 0.01 * spread)


def _proportional(g: Tensor, p: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Each position's ``a`` of ``g_c = a p_c`` over the classes ``c ≠ y`` (a hard target;
    1 to 3 such classes, through which a line with an intercept would always pass), and
    whether it fits: one ratio ``g_c / p_c > 0`` for all, within 1 %."""
    other = torch.ones_like(g, dtype=torch.bool).scatter_(1, target, False)
    ratio = torch.where(other, g / p.clamp_min(torch.finfo(p.dtype).tiny), torch.nan)
    low, high = ratio.nan_to_num(torch.inf).amin(dim=1), ratio.nan_to_num(-torch.inf).amax(dim=1)
    return low, (low > 0) & (high - low <= 0.01 * low) & (p.amin(dim=1) > 0)


def _one_slope_per_class(slope: Tensor, target: Tensor, p_y: Tensor, varied: bool) -> bool:
    """Whether the positions share one slope, or else those of each target class do (class
    weights give each class its own; 8 or more positions in classes seen twice or more):
    a focal loss's, ``a f(p_y)``, and a distillation's vary. One slope: the middle half
    within 5 %, or, ``varied``, all of them, where ``p_y`` varies by 20 % or more (with
    1–3 other classes the form of one position is no test, and a loss of ``p`` alone, a
    Dice loss near a uniform output, has one slope where ``p_y`` is the same)."""
    if not varied:
        low, mid, high = torch.quantile(slope, slope.new_tensor([0.25, 0.5, 0.75])).tolist()
        if high - low <= 0.05 * abs(mid):
            return True
    if _within(slope):
        return not varied or _varies(p_y)
    groups = [mine for label in target.unique().tolist() if (mine := target == label).sum() > 1]
    if not all(_within(slope[mine]) for mine in groups):
        return False
    telling = not varied or any(_varies(p_y[mine]) for mine in groups)
    return telling and sum(int(mine.sum()) for mine in groups) >= 8


def _within(values: Tensor) -> bool:
    """Whether ``values`` lie within 5 % of their median."""
    return float(values.amax() - values.amin()) <= 0.05 * abs(float(values.median()))


def _varies(values: Tensor) -> bool:
    """Whether the largest of ``values`` is 1.2 times the smallest or more."""
    return float(values.amax()) >= 1.2 * float(values.amin())


def _picked(tensor: Tensor, class_dim: int) -> Tensor:
    """At most :data:`_POSITIONS` evenly spread positions of ``[N, T…, C]`` (classes at
    ``class_dim``, ``1`` or last) as ``[K, C]`` float32, gathered without a copy of the
    whole (a view ``[N, T, C]`` or ``[N, C, T]``)."""
    first = class_dim % tensor.dim() == 1 and tensor.dim() > 2
    classes = tensor.shape[1] if first else -1
    flat = tensor.detach().reshape(len(tensor), classes, -1 if first else tensor.shape[-1])
    count = flat.shape[0] * flat.shape[2 if first else 1]
    pick = torch.linspace(0, count - 1, min(_POSITIONS, count), device=flat.device).long()
    n, t = pick // (count // len(flat)), pick % (count // len(flat))
    return (flat[n, :, t] if first else flat[n, t]).float()


class TokenMean:
    """The :func:`token_scale` of the first backwards of a capture's forwards (``note``),
    judged at the step (``judge``) with the loss scale then known; ``steps``: the
    micro-batches per step, whose losses are each divided by it."""

    def __init__(self, steps: int) -> None:
        self.steps, self.checks, self.warned = steps, 0, False
        self.seen: list[tuple[float, float]] = []  # (r, T̄) of the backwards since the step

    def note(self, grad: Tensor, values: Tensor, class_dim: int) -> None:
        """Judge one backward's gradient at the logits (the first :data:`_CHECKS`)."""
        if self.warned or self.checks + len(self.seen) >= _CHECKS:
            return
        found = token_scale(grad, values, class_dim)
        if found is not None:
            self.seen.append((found[0] * self.steps, found[1]))

    def judge(self, loss_scale: float = 1.0) -> None:
        """Warn, once, where a noted backward's ``r`` (unscaled by ``loss_scale``, a
        ``GradScaler``'s) is ``1/T̄`` within 25 % over ``T̄ ≥ 4`` counted positions."""
        seen, self.seen = self.seen, []
        self.checks += len(seen)  # (a step dropped for an overflow judges nothing: discard)
        for ratio, positions in seen:
            ratio /= loss_scale
            if self.warned or positions < 4 or not 0.8 <= ratio * positions <= 1.25:
                continue
            self.warned = True
            warnings.warn(
                f"the training loss's gradient at the logits is {ratio:.2g} times what "
                "loss_reduction='sum' (a loss summed over each sample's positions and divided "
                f"by the batch size) gives, about 1 over the {positions:.3g} counted positions "
                "per sample: is the loss a mean over the tokens (F.cross_entropy(logits."
                "flatten(0, 1), y.flatten()))? Then pass loss_reduction='mean', or the "
                f"Monte-Carlo Fisher is about {positions:.3g}² times too large for it (a "
                "per-sample sum weighted by about that on purpose is not wrong: ignore this)",
                RuntimeWarning,
                stacklevel=caller_level(),
            )
