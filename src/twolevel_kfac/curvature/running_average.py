"""The running average every curvature estimate uses: Kronecker factors, EKFAC's scalings,
KFAC-corrected's second Kronecker term and the faithful schedule's coarse matrix.

``X ← ρ X + (1 − ρ) X_new`` with ``ρ = min(1 − 1/k, ema_decay)`` for the ``k``-th estimate
(Martens & Grosse 2015 §5: the first estimate replaces the average, the next ones average
uniformly until the cap ``ema_decay`` is reached).

A refresh with Cholesky inverses freezes a factor by keeping the factor itself, not a copy
(:func:`~.factor_inverse.decompose_factor`): the next update of such a factor writes a new
tensor (``in_place=False``, :func:`shares_memory`), the same arithmetic as in place, except
at a step that decomposes each layer as soon as it is folded
(:meth:`~twolevel_kfac.optim.fine.FineLevel.decomposes_at_fold`), which replaces the frozen
factor right after and so updates it in place. With ``cov_interval = inv_interval`` the
factors then live once between refreshes, not twice, and a refresh forms no second copy.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["ema_weight", "running_average", "shares_memory"]


def ema_weight(num_updates: int, ema_decay: float) -> float:
    """``ρ = min(1 − 1/k, ema_decay)`` for the ``k``-th update (so the first replaces)."""
    return min(1.0 - 1.0 / num_updates, ema_decay)


def running_average(
    average: Tensor | None, new: Tensor, weight: float, in_place: bool = True
) -> Tensor:
    """``ρ X + (1 − ρ) X_new`` with ``ρ = weight``, written into ``average`` in place (one
    pass, no temporary), or a copy of ``new`` when there is no average yet or ``ρ = 0``.

    Args:
        average: the running average, or ``None`` before the first estimate.
        new: this estimate (not modified, never aliased by the result).
        weight: ``ρ`` (:func:`ema_weight`).
        in_place: ``False`` when something else reads ``average`` (a frozen decomposition
            that is the factor itself): the result is a new tensor, rounded alike.

    Returns:
        The updated average: ``average`` itself, or a new tensor.
    """
    if average is None or weight == 0.0:
        return new.clone()
    if not in_place:
        return average.mul(weight).add_(new, alpha=1.0 - weight)
    return average.mul_(weight).add_(new, alpha=1.0 - weight)


def shares_memory(tensor: Tensor | None, *others: Tensor | None) -> bool:
    """Whether ``tensor`` shares its storage with one of ``others`` (also after a
    ``torch.load``, which keeps shared storages shared but not the tensor objects)."""
    if tensor is None:
        return False
    ptr = tensor.untyped_storage().data_ptr()
    return any(o is not None and o.untyped_storage().data_ptr() == ptr for o in others)
