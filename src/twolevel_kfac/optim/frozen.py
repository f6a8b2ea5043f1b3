"""A layer frozen whole during training (``layer.requires_grad_(False)``) and the coarse
level that spans it.

Such a layer is left alone: nothing captures its statistics, steps it or checks its
block, and its factors stay as they were, so unfrozen it continues from them
(:func:`~twolevel_kfac.curvature.blocks.trains`). A coarse level spans the layers its
last refresh covered; until its next refresh (which covers only layers that train) the
layer frozen since still holds coarse vectors of its old block, so those steps take the
fine level's direction alone, with one warning per layer, rather than a coarse term
formed for another parameter space. A checkpoint loaded while such a layer is frozen
restores its factors and coarse vectors of the block it had when they were estimated
(:func:`trained_as`), so that unfrozen again it continues as the saved run would.

The fine direction that stands without a coarse term, in those steps and elsewhere (a
layer outside the coarse level, ``coarse_scale = 0``), is :func:`fine_alone`'s
``ω_f M⁻¹g``: ``additive``'s formula with ``Q = 0`` there.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..curvature.blocks import LayerStats, factor_shapes, trains
from ..warning_level import caller_level

if TYPE_CHECKING:
    from torch import Tensor, nn

    from .coarse import CoarseLevel
    from .preconditioner import KFACPreconditioner

__all__ = ["coarse_term", "fine_alone", "fine_weight", "trained_as"]


@contextmanager
def trained_as(module: nn.Module, shapes: tuple[Any, ...]) -> Iterator[bool]:
    """Within the block, ``module``'s weight and bias train as in the block whose factor
    ``shapes`` are given (weight and bias, the weight alone, or the bias alone: the first
    that has them), and whether one has them; afterwards their ``requires_grad`` is as it
    was. A layer frozen whole is read as it trained when its saved state was estimated."""
    params = [module._parameters.get(key) for key in ("weight", "bias")]
    present = [p for p in params if p is not None]
    flags = [p.requires_grad for p in present]
    found = False
    try:
        for trained in ((True, True), (True, False), (False, True)):
            for p, on in zip(params, trained, strict=True):
                if p is not None:
                    p.requires_grad_(on)
            found = trains(module) and tuple(factor_shapes(module)) == tuple(shapes)
            if found:
                break
        else:
            for p, flag in zip(present, flags, strict=True):
                p.requires_grad_(flag)
        yield found
    finally:
        for p, flag in zip(present, flags, strict=True):
            p.requires_grad_(flag)


def coarse_term(pre: KFACPreconditioner, stats: dict[str, LayerStats]) -> CoarseLevel | None:
    """The coarse level when this step takes its term: it has one, and it refreshes now
    (``stats``, or products taken at the fold) or every layer it spans still trains since
    a refresh; else ``None`` (module docstring; before any refresh: a first capture whose
    positions were all dead, where KFAC's step is its fine level's)."""
    level = pre.coarse_level
    if level is None or level.refreshing(stats):
        return level
    if level.fisher_samples is None:  # (never refreshed: a first capture folded nothing)
        return None
    frozen = [name for name in level.names if not trains(pre.layers[name])]
    if not frozen:
        return level
    new = [name for name in frozen if name not in pre.frozen_warned]
    if new:
        pre.frozen_warned.update(new)
        warnings.warn(
            f"layer(s) {new} were frozen whole since the coarse level's last refresh, which "
            "spans them: until its next refresh (which leaves them out) the steps are the "
            "fine level's alone, without the coarse term",
            RuntimeWarning,
            stacklevel=caller_level(),
        )
    return None


def fine_alone(pre: KFACPreconditioner, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """``ω_f M⁻¹g`` of each layer of ``grads``: its direction without a coarse term (a
    layer outside the coarse level, or every layer while :func:`coarse_term` pauses it),
    ``additive``'s ``d = ω_f M⁻¹g + ω_c Qg`` with ``Q = 0`` there (``ω_f``: ``fine_weight``,
    1 but in ``additive``; it was left out on these paths before 2026-12-06 (night))."""
    weight = fine_weight(pre)
    directions = {name: pre.apply_fine(name, grad) for name, grad in grads.items()}
    return directions if weight == 1.0 else {n: weight * d for n, d in directions.items()}


def fine_weight(pre: KFACPreconditioner) -> float:
    """``ω_f`` of :func:`fine_alone`: the coarse level's ``fine_weight``, 1 without one."""
    return 1.0 if pre.coarse_level is None else pre.coarse_level.options.fine_weight
