"""``F̂R₀ᵀ = W₀ + λR₀ᵀ``: what the coarse level needs of the Fisher mini-batch between refreshes.

Every combination of :mod:`twolevel_kfac.twolevel.combinations` meets ``F̂ = F + λI``
only as ``F̂y`` with ``y = R₀ᵀu`` in the coarse range (A-DEF1, balanced) or as ``R₀F̂v``
inside ``Q = R₀ᵀF_c⁻¹R₀`` (A-DEF2, balanced). Both are products with the ``K`` columns of

    W = F̂R₀ᵀ = W₀ + λR₀ᵀ,   W₀[:, k] = FR₀ᵀ[:, k] = (1/N) Σ_n p_{n,k} ∇ℓ_n,
    p_{n,k} = ⟨r_k, ∇ℓ_n⟩

(Koroko et al. 2023, §2; ``p = J R₀ᵀ`` of :func:`~twolevel_kfac.twolevel.coarse_matrix.
coarse_projections`), so ``F̂R₀ᵀu = W₀u + λR₀ᵀu`` and ``R₀F̂v = W₀ᵀv + λR₀v`` exactly.
A coarse level whose basis is fixed between refreshes can keep ``W₀`` (``K`` numbers per
parameter; the damping is added at each use, so ``λ`` is the current one, as with the
rows) instead of the mini-batch's per-sample rows (``N·T·(d_in' + d_out)`` numbers per
layer): far smaller for convolutions, whose rows are per location, and ``K`` instead of
``N·T`` passes over a layer per product (:func:`coarse_size`, :func:`rows_size`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from twolevel_kfac.curvature.blocks import LayerStats
from twolevel_kfac.curvature.sample_products import weighted_gradient_sum
from twolevel_kfac.twolevel.layer_basis import LayerBasis, layer_count, layer_dtype, layer_numel
from twolevel_kfac.twolevel.vectors import LayerVector, Parts

__all__ = ["FisherColumns", "coarse_size", "fisher_columns", "gradient_sums", "rows_size"]


@dataclass(frozen=True)
class FisherColumns:
    """``W₀ = FR₀ᵀ`` (the undamped Fisher) held per layer: ``columns[i]`` of shape
    ``[K, d_out_i, d_in'_i]`` is layer ``i``'s part of the ``K`` columns (every coarse
    vector's, not only layer ``i``'s: ``F`` couples the layers)."""

    columns: list[Tensor]

    def apply(self, u: Tensor) -> LayerVector:
        """``FR₀ᵀu = W₀u`` (``u`` of shape ``[K]``), a new layer vector."""
        return [(u.to(w.dtype) @ w.flatten(1)).view(w.shape[1:]) for w in self.columns]

    def restrict(self, v: LayerVector) -> Tensor:
        """``R₀Fv = W₀ᵀv``, shape ``[K]``: the inner products summed over the layers."""
        total = self.columns[0].flatten(1) @ v[0].flatten()
        for w, vi in zip(self.columns[1:], v[1:], strict=True):
            total = total.addmv_(w.flatten(1), vi.flatten())
        return total

    def restrict_parts(self, v: Parts) -> Tensor:
        """:meth:`restrict` of a vector given as weight and bias parts, joined into
        ``W̄ = [V, b]`` (a copy of ``v``, ``P`` numbers, not of ``W₀``'s ``K·P``)."""
        return self.restrict(
            [vw if vb is None else torch.cat([vw, vb.unsqueeze(1)], dim=1) for vw, vb in v]
        )

    def numel(self) -> int:
        """How many numbers ``W₀`` holds (``K`` per parameter)."""
        return sum(w.numel() for w in self.columns)


def gradient_sums(stats: Sequence[LayerStats], projections: Tensor) -> list[Tensor]:
    """``Σ_n p_{n,k} ∇_iℓ_n`` per layer ``i`` (``[K, d_out_i, d_in'_i]``) for the rows held
    here: ``N·W₀`` (summed over the ranks by the caller)."""
    return [weighted_gradient_sum(s, projections) for s in stats]


def fisher_columns(sums: list[Tensor], basis: Sequence[LayerBasis], n: int) -> FisherColumns:
    """``W₀ = sums / N`` in the basis' dtype (``sums`` from :func:`gradient_sums` of the
    whole Fisher mini-batch of ``N`` samples)."""
    return FisherColumns([s.div(n).to(layer_dtype(b)) for s, b in zip(sums, basis, strict=True)])


def coarse_size(basis: Sequence[LayerBasis]) -> int:
    """``K·P``: how many numbers ``W₀`` of ``basis`` holds."""
    k = sum(layer_count(b) for b in basis)
    return k * sum(layer_numel(b) for b in basis)


def rows_size(stats: Sequence[LayerStats]) -> int:
    """How many numbers the per-sample rows ``(ā, δ)`` held here take."""
    return sum(int(s.a.numel() + s.g.numel()) for s in stats)
