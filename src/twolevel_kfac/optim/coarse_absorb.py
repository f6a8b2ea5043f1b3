"""A refresh's coarse matrix formed as its statistics are folded, layer by layer.

With the additive combination and KFAC's own fine level in one process (the default
two-level configuration among them, :func:`absorbs_statistics`), a refresh reads the
Fisher mini-batch only to form

``F_c = (1/N) PᵀP + λR₀R₀ᵀ``, ``P = JR₀ᵀ`` (``[N, K]``, Koroko et al. 2023, §2),

and the columns of ``P`` that belong to layer ``i``, ``P[n, i] = ⟨r_i, ∇ℓ_n⟩``, read layer
``i``'s statistics and basis vector alone. Where that vector is known once layer ``i`` is
folded, the level takes the layer's columns when :func:`~.folding.fold_statistics` folds
it (:func:`absorber`), and the statistics are dropped with the layer's batch factors, as
KFAC alone drops them: a refresh never holds every layer's statistics (their unfolded
rows are a convolution network's largest tensors). That is so for

* the Nicolaides basis (all ones, rows no step may move set to zero): the layer shapes
  alone;
* the spectral basis at a step that refreshes the fine level, which then decomposes each
  layer as soon as it is folded (:meth:`~.fine.FineLevel.decomposes_at_fold`; every
  refresh step at the defaults, ``cov_interval = inv_interval``): ``q_G q_Aᵀ`` of that
  decomposition (:func:`~.coarse_basis.refresh_layer_basis`; its extreme pairs under
  Cholesky inverses are found then, and the refresh's basis reads them again). At a fold
  between two refreshes (``cov_interval < inv_interval``) the statistics are kept.

``F_c`` is then formed from the columns (:func:`absorbed_coarse_matrix`), the same numbers
as from the kept statistics (:func:`~twolevel_kfac.twolevel.coarse_matrix.
exact_coarse_matrix`), bit for bit.
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
from .coarse_basis import refresh_layer_basis
from .fine import FOLD_DECOMPOSED

if TYPE_CHECKING:
    from .coarse import CoarseLevel

__all__ = ["AbsorbedBatch", "absorbed_coarse_matrix", "absorber", "absorbs_statistics"]


@dataclass
class AbsorbedBatch:
    """The columns of ``P = JR₀ᵀ`` of a refresh's Fisher mini-batch, per layer, taken as
    its statistics were folded.

    Attributes:
        names: the layers of the refresh, in the preconditioner's order.
        columns: ``[N, k_i]`` per layer folded so far.
        sizes: ``N`` as each layer's statistics gave it.
    """

    names: list[str]
    columns: dict[str, Tensor] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def folded(self) -> list[str]:
        """The layers of the refresh whose statistics were folded (a layer whose positions
        were all dead folds none, and stays out of the refresh, as with its statistics)."""
        return [n for n in self.names if n in self.columns]

    def samples(self) -> int:
        """``N`` of the Fisher mini-batch.

        Raises:
            ValueError: the layers disagree on it (as the kept statistics would).
        """
        return shared_size(self.sizes)


def absorbs_statistics(level: CoarseLevel) -> bool:
    """Whether ``level`` takes this step's Fisher products as the statistics are folded
    (module docstring): the Nicolaides basis, or the spectral one where this step
    decomposes at the fold and every block is Kronecker-factored (a table's too)
    (of :class:`~.coarse.CoarseLevel` itself, not a subclass's); the additive combination
    with a coarse term, no diagnostics, KFAC's own fine level, no exact Fisher products
    kept for adaptive damping, one process."""
    from .coarse import CoarseLevel

    options, host = level.options, level.host
    return (
        _basis_known_at_fold(level)
        and type(level).build_basis is CoarseLevel.build_basis
        and options.combination == "additive"
        and options.coarse_scale != 0.0
        and not options.diagnostics
        and host.fine.plain
        and not host.retain_statistics
        and not host.comm.distributed
    )


def _basis_known_at_fold(level: CoarseLevel) -> bool:
    """Whether each layer's basis vector of this step's refresh is known once the layer is
    folded (:func:`~.coarse_basis.refresh_layer_basis`; module docstring)."""
    space, host = level.options.coarse_space, level.host
    if space == "nicolaides":
        return True
    return (
        space == "spectral"
        and host.fine.decomposes_at_fold()
        and all(type(f) in FOLD_DECOMPOSED for f in host.factors.values())
    )


def absorber(level: CoarseLevel, captured: Collection[str]) -> Callable[[str, LayerStats], None]:
    """Start a refresh on the layers ``captured`` (the level itself is left as it is until
    ``F_c`` is formed, so a step that raises in the fold changes none of its state): the
    consumer returned forms a folded layer's basis vector (the one :meth:`~.coarse.
    CoarseLevel.basis_of` builds after the fold, :func:`~.coarse_basis.refresh_layer_basis`)
    and takes its columns ``P[:, i] = ⟨r_i, ∇ℓ_n⟩`` into :attr:`~.coarse.CoarseLevel.absorbed`."""
    names = [n for n in level.host.layers if n in captured]
    absorbed = AbsorbedBatch(names)
    level.absorbed = absorbed  # until F_c is formed, or the next step begins

    def consume(name: str, stats: LayerStats) -> None:
        if not level.host.factors[name].ready:  # a first fold dropped as non-finite: no
            return  # basis vector (check_statistics refuses the step if the layer moves)
        vector = refresh_layer_basis(level, names, name)
        absorbed.columns[name] = sample_dots_layer(stats, vector)
        absorbed.sizes[name] = stats.num_samples

    return consume


def absorbed_coarse_matrix(absorbed: AbsorbedBatch, basis: CoarseBasis, damping: float) -> Tensor:
    """``F_c`` of ``basis`` (the one rebuilt after the fold: equal to the absorbed one) from
    the absorbed columns, as :func:`~twolevel_kfac.twolevel.coarse_matrix.
    exact_coarse_matrix` forms it from the statistics."""
    projections = torch.cat([absorbed.columns[n] for n in absorbed.folded()], dim=1)
    return projected_coarse_matrix(projections, absorbed.samples(), basis, damping)
