"""A refresh's coarse matrix formed as its statistics are folded, layer by layer.

With the Nicolaides basis, the additive combination and KFAC's own fine level in one
process (the default two-level configuration, :func:`absorbs_statistics`), a refresh reads
the Fisher mini-batch only to form

``F_c = (1/N) PᵀP + λR₀R₀ᵀ``, ``P = JR₀ᵀ`` (``[N, K]``, Koroko et al. 2023, §2),

and the columns of ``P`` that belong to layer ``i``, ``P[n, i] = ⟨r_i, ∇ℓ_n⟩``, read layer
``i``'s statistics and basis vector alone; the basis (all ones, rows no step may move set
to zero) depends on the layer shapes alone, so it exists before the fold. The level
therefore takes each layer's columns when :func:`~.folding.fold_statistics` folds the
layer (:func:`absorber`), and the statistics are dropped with the layer's batch factors,
as KFAC alone drops them: a refresh never holds every layer's statistics (their
unfolded rows are a convolution network's largest tensors). ``F_c`` is then formed from
the columns (:func:`absorbed_coarse_matrix`), the same numbers as from the kept
statistics (:func:`~twolevel_kfac.twolevel.coarse_matrix.exact_coarse_matrix`), bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..curvature.blocks import LayerStats
from ..twolevel.coarse_matrix import projected_coarse_matrix
from ..twolevel.fisher_products import shared_size
from ..twolevel.layer_basis import CoarseBasis, sample_dots_layer
from .coarse_basis import nicolaides_basis, with_fixed_rows

if TYPE_CHECKING:
    from .coarse import CoarseLevel

__all__ = ["AbsorbedBatch", "absorbed_coarse_matrix", "absorber", "absorbs_statistics"]


@dataclass
class AbsorbedBatch:
    """The columns of ``P = JR₀ᵀ`` of a refresh's Fisher mini-batch, per layer, taken as
    its statistics were folded.

    Attributes:
        names: the layers of the refresh, in the preconditioner's order.
        basis: the basis the columns were taken with.
        columns: ``[N, k_i]`` per layer folded so far.
        sizes: ``N`` as each layer's statistics gave it.
    """

    names: list[str]
    basis: CoarseBasis
    columns: dict[str, Tensor] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def samples(self) -> int:
        """``N`` of the Fisher mini-batch.

        Raises:
            ValueError: the layers disagree on it (as the kept statistics would), or a
                layer of the refresh was not folded.
        """
        missing = [n for n in self.names if n not in self.columns]
        if missing:
            raise ValueError(f"layer(s) {missing} were captured but never folded")
        return shared_size(self.sizes.values())


def absorbs_statistics(level: CoarseLevel) -> bool:
    """Whether ``level`` takes its refresh's Fisher products as the statistics are folded
    (module docstring): the Nicolaides basis (of :class:`~.coarse.CoarseLevel` itself, not a
    subclass's), the additive combination with a coarse term, no diagnostics, KFAC's own
    fine level, no exact Fisher products kept for adaptive damping, one process."""
    from .coarse import CoarseLevel

    options, host = level.options, level.host
    return (
        options.coarse_space == "nicolaides"
        and type(level).build_basis is CoarseLevel.build_basis
        and options.combination == "additive"
        and options.coarse_scale != 0.0
        and not options.diagnostics
        and host.fine.plain
        and not host.retain_statistics
        and not host.comm.distributed
    )


def absorber(level: CoarseLevel, captured: Collection[str]) -> Callable[[str, LayerStats], None]:
    """Start a refresh on the layers ``captured``: their basis is formed (the one
    :meth:`~.coarse.CoarseLevel.basis_of` builds after the fold; the level itself is left as
    it is until then, so a step that raises in the fold changes none of its state), and
    the consumer returned takes a folded layer's columns ``P[:, i] = ⟨r_i, ∇ℓ_n⟩`` into
    :attr:`~.coarse.CoarseLevel.absorbed`."""
    names = [n for n in level.host.layers if n in captured]
    basis = with_fixed_rows(level, names, nicolaides_basis(level, names))
    absorbed = AbsorbedBatch(names, basis)
    level.absorbed = absorbed  # until F_c is formed, or the next step begins
    index = {name: i for i, name in enumerate(absorbed.names)}

    def consume(name: str, stats: LayerStats) -> None:
        absorbed.columns[name] = sample_dots_layer(stats, absorbed.basis[index[name]])
        absorbed.sizes[name] = stats.num_samples

    return consume


def absorbed_coarse_matrix(absorbed: AbsorbedBatch, basis: CoarseBasis, damping: float) -> Tensor:
    """``F_c`` of ``basis`` (the one rebuilt after the fold: equal to the absorbed one) from
    the absorbed columns, as :func:`~twolevel_kfac.twolevel.coarse_matrix.
    exact_coarse_matrix` forms it from the statistics."""
    projections = torch.cat([absorbed.columns[n] for n in absorbed.names], dim=1)
    return projected_coarse_matrix(projections, absorbed.samples(), basis, damping)
