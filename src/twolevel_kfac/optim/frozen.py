"""A layer frozen whole during training (``layer.requires_grad_(False)``) and the coarse
level that spans it.

Such a layer is left alone: nothing captures its statistics, steps it or checks its
block, and its factors stay as they were, so unfrozen it continues from them
(:func:`~twolevel_kfac.curvature.blocks.trains`). A coarse level spans the layers its
last refresh covered; until its next refresh (which covers only layers that train) the
layer frozen since still holds coarse vectors of its old block, so those steps take the
fine level's direction alone, with one warning per layer, rather than a coarse term
formed for another parameter space.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from ..curvature.blocks import LayerStats, trains

if TYPE_CHECKING:
    from .coarse import CoarseLevel
    from .preconditioner import KFACPreconditioner

__all__ = ["coarse_term"]


def coarse_term(pre: KFACPreconditioner, stats: dict[str, LayerStats]) -> CoarseLevel | None:
    """The coarse level when this step takes its term: it has one, and it refreshes now
    (``stats``, or products taken at the fold) or every layer it spans still trains; else
    ``None`` (module docstring)."""
    level = pre.coarse_level
    if level is None or level.refreshing(stats):
        return level
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
            stacklevel=5,
        )
    return None
