"""The combinations that read ``F̂``, written with ``W = F̂R₀ᵀ`` in its place.

:mod:`twolevel_kfac.twolevel.combinations` states A-DEF1, A-DEF2 and balanced with a map
``v ↦ F̂v``. Each meets ``F̂`` only as ``F̂R₀ᵀu`` or inside ``R₀F̂v``, so with the columns
``W = W₀ + λR₀ᵀ`` of :mod:`twolevel_kfac.twolevel.fisher_columns` (``W₀ = FR₀ᵀ`` kept,
``λ`` the current damping, ``Q = R₀ᵀF_c⁻¹R₀``, ``ω_c`` the coarse scale,
``u = ω_c F_c⁻¹R₀g``) they read

* A-DEF2:   ``d = M⁻¹g + ω_c R₀ᵀF_c⁻¹(R₀g − WᵀM⁻¹g)``,
* A-DEF1:   ``d = R₀ᵀu + M⁻¹(g − Wu)``,
* balanced: ``z = M⁻¹(g − Wu)``, ``d = z + ω_c R₀ᵀF_c⁻¹(R₀g − Wᵀz)``,

the same directions as the ``F̂``-map forms (Tang et al. 2009) in exact arithmetic. Each
takes ``g``, ``v ↦ M⁻¹v`` (applied once), the coarse operator, ``W₀``, ``λ`` and
``ω_c > 0``, and returns the direction; none writes into ``g``.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from twolevel_kfac.twolevel.coarse_matrix import CoarseOperator, prolong_add_into, restrict
from twolevel_kfac.twolevel.fisher_columns import FisherColumns
from twolevel_kfac.twolevel.vectors import LayerVector, LinearMap, sub_into

__all__ = ["COLUMN_COMBINATIONS", "ColumnCombination"]


class ColumnCombination(Protocol):
    """The signature of :data:`COLUMN_COMBINATIONS`."""

    def __call__(
        self,
        g: LayerVector,
        minv: LinearMap,
        operator: CoarseOperator,
        columns: FisherColumns,
        damping: float,
        coarse_scale: float,
    ) -> LayerVector:
        """The direction for gradient ``g``."""
        ...


def fisher_prolong(
    operator: CoarseOperator, columns: FisherColumns, damping: float, u: Tensor
) -> LayerVector:
    """``F̂R₀ᵀu = W₀u + λR₀ᵀu`` (a new layer vector)."""
    return prolong_add_into(operator.basis, u, columns.apply(u), damping)


def fisher_restrict(
    operator: CoarseOperator, columns: FisherColumns, damping: float, v: LayerVector
) -> Tensor:
    """``R₀F̂v = W₀ᵀv + λR₀v``, shape ``[K]``."""
    restricted = columns.restrict(v)
    return restricted.add_(restrict(operator.basis, v), alpha=damping)


def adef2_on_columns(
    g: LayerVector,
    minv: LinearMap,
    operator: CoarseOperator,
    columns: FisherColumns,
    damping: float,
    coarse_scale: float,
) -> LayerVector:
    """A-DEF2, ``d = M⁻¹g + ω_c R₀ᵀF_c⁻¹(R₀g − WᵀM⁻¹g)``."""
    minv_g = minv(g)
    restricted = restrict(operator.basis, g) - fisher_restrict(operator, columns, damping, minv_g)
    return prolong_add_into(operator.basis, operator.solve(restricted), minv_g, coarse_scale)


def adef1_on_columns(
    g: LayerVector,
    minv: LinearMap,
    operator: CoarseOperator,
    columns: FisherColumns,
    damping: float,
    coarse_scale: float,
) -> LayerVector:
    """A-DEF1, ``d = R₀ᵀu + M⁻¹(g − Wu)`` with ``u = ω_c F_c⁻¹R₀g``."""
    u = operator.solve(restrict(operator.basis, g)).mul_(coarse_scale)
    direction = minv(sub_into(g, fisher_prolong(operator, columns, damping, u)))
    return prolong_add_into(operator.basis, u, direction, 1.0)


def balanced_on_columns(
    g: LayerVector,
    minv: LinearMap,
    operator: CoarseOperator,
    columns: FisherColumns,
    damping: float,
    coarse_scale: float,
) -> LayerVector:
    """Balanced, ``z = M⁻¹(g − Wu)``, ``d = z + ω_c R₀ᵀF_c⁻¹(R₀g − Wᵀz)``."""
    restricted_g = restrict(operator.basis, g)
    u = operator.solve(restricted_g).mul_(coarse_scale)
    z = minv(sub_into(g, fisher_prolong(operator, columns, damping, u)))
    correction = operator.solve(restricted_g - fisher_restrict(operator, columns, damping, z))
    return prolong_add_into(operator.basis, correction, z, coarse_scale)


COLUMN_COMBINATIONS: dict[str, ColumnCombination] = {
    "adef1": adef1_on_columns,
    "adef2": adef2_on_columns,
    "balanced": balanced_on_columns,
}
"""The combinations that read ``F̂``, on ``W`` (``additive`` never reads it)."""
