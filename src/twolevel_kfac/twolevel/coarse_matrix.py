"""The coarse (Galerkin) matrix ``F_c = R₀ (F + λI) R₀ᵀ`` and the coarse correction ``Q``.

Paper.md §2: with ``R₀`` block-diagonal (vectors of layer ``i`` supported on layer ``i``)
and ``F`` the *exact* Fisher of the Fisher mini-batch of ``N`` samples,

    F_c[k,l] = (1/N) Σ_n p_{n,k} p_{n,l} + λ ⟨r_k, r_l⟩ [k, l of the same layer],
    p_{n,k} = ⟨r_k, ∇ℓ_n⟩ = Σ_t δ_{n,t}ᵀ r_k ā_{n,t},

computed from the per-sample statistics without per-sample gradients. The coarse
correction is ``Q = R₀ᵀ F_c⁻¹ R₀`` (:class:`CoarseOperator`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from twolevel_kfac.curvature.blocks import LayerStats
from twolevel_kfac.curvature.running_average import running_average
from twolevel_kfac.twolevel.fisher_products import check_stats
from twolevel_kfac.twolevel.layer_basis import (
    CoarseBasis,
    LayerBasis,
    dense_layer,
    gram_layer,
    layer_count,
    prolong_add_layer,
    restrict_layer,
    sample_dots_layer,
)
from twolevel_kfac.twolevel.parts import (
    SplitBasis,
    prolong_add_into_parts,
    restrict_parts,
    split_basis,
)
from twolevel_kfac.twolevel.vectors import LayerVector, Parts


def restrict(basis: Sequence[LayerBasis], v: LayerVector) -> Tensor:
    """``R₀ v``: the inner products ``⟨r_k, v_{layer(k)}⟩``, shape ``[K]``.

    Args:
        basis: per layer a ``[k_i, d_out_i, d_in'_i]`` tensor or its
            :class:`~.layer_basis.OuterVectors`.
        v: a layer vector.

    Returns:
        ``R₀ v`` of shape ``[K]`` (layer-major order, as in the basis).
    """
    # a flat matrix-vector product (faster than the equivalent einsum)
    return torch.cat([restrict_layer(b, vi) for b, vi in zip(basis, v, strict=True)])


def prolong(basis: Sequence[LayerBasis], y: Tensor) -> LayerVector:
    """``R₀ᵀ y = Σ_k y_k r_k``, one matrix per layer.

    Args:
        basis: per layer a ``[k_i, d_out_i, d_in'_i]`` tensor or its
            :class:`~.layer_basis.OuterVectors`.
        y: coefficients of shape ``[K]``.

    Returns:
        ``R₀ᵀ y`` as a layer vector.
    """
    parts = torch.split(y, [layer_count(b) for b in basis])
    return [
        torch.einsum("k,koi->oi", yi, dense_layer(b)) for yi, b in zip(parts, basis, strict=True)
    ]


def prolong_add_into(
    basis: Sequence[LayerBasis], y: Tensor, target: LayerVector, alpha: float
) -> LayerVector:
    """``target ← target + α R₀ᵀ y`` in place, returning ``target``.

    One GEMV (a rank-``k`` update for :class:`~.layer_basis.OuterVectors`) per layer accumulates
    straight into ``target``, instead of :func:`prolong` followed by an axpy, which writes
    and rereads a full-size temporary.
    """
    parts = torch.split(y, [layer_count(b) for b in basis])
    for yi, b, t in zip(parts, basis, target, strict=True):
        prolong_add_layer(b, yi.to(t.dtype), t, alpha)
    return target


def coarse_projections(stats: Sequence[LayerStats], basis: Sequence[LayerBasis]) -> Tensor:
    """``P[n, k] = ⟨r_k, ∇ℓ_n⟩`` (via :func:`~.layer_basis.sample_dots_layer`), shape ``[N, K]``.

    Args:
        stats: one :class:`LayerStats` per layer.
        basis: per layer a ``[k_i, d_out_i, d_in'_i]`` tensor or its
            :class:`~.layer_basis.OuterVectors`.

    Returns:
        The per-sample projected gradients ``P = J R₀ᵀ``.
    """
    check_stats(stats, len(basis))
    return torch.cat([sample_dots_layer(s, b) for s, b in zip(stats, basis, strict=True)], dim=1)


def basis_gram(basis: Sequence[LayerBasis]) -> Tensor:
    """``R₀ R₀ᵀ``: block-diagonal, ``⟨r_k, r_l⟩`` for vectors of the same layer, ``[K, K]``.

    Args:
        basis: per layer a ``[k_i, d_out_i, d_in'_i]`` tensor or its
            :class:`~.layer_basis.OuterVectors`.

    Returns:
        The Gram matrix of the basis.
    """
    return torch.block_diag(*[gram_layer(b) for b in basis])


def exact_coarse_matrix(
    stats: Sequence[LayerStats], basis: Sequence[LayerBasis], damping: float
) -> Tensor:
    """``F_c = R₀ (F + λI) R₀ᵀ = (1/N) PᵀP + λ R₀R₀ᵀ`` with the exact Fisher
    (Koroko et al. 2023, §2).

    For the Nicolaides basis ``λ R₀R₀ᵀ = λ·diag(numel_i)``, the authors' damping term.

    Args:
        stats: one :class:`LayerStats` per layer (the Fisher mini-batch).
        basis: per layer a ``[k_i, d_out_i, d_in'_i]`` tensor or its
            :class:`~.layer_basis.OuterVectors`.
        damping: ``λ``.

    Returns:
        ``F_c`` of shape ``[K, K]``.
    """
    n = check_stats(stats, len(basis))
    return projected_coarse_matrix(coarse_projections(stats, basis), n, basis, damping)


def projected_coarse_matrix(
    projections: Tensor, samples: int, basis: Sequence[LayerBasis], damping: float
) -> Tensor:
    """``F_c = (1/N) PᵀP + λ R₀R₀ᵀ`` from ``P = JR₀ᵀ`` (:func:`coarse_projections`, ``[N, K]``)
    and ``N = samples``: :func:`exact_coarse_matrix` once ``P`` is formed."""
    fc = projections.T @ projections / samples
    if damping != 0.0:
        fc = fc + damping * basis_gram(basis)
    return fc


def ema_coarse_matrix(average: Tensor | None, new: Tensor, decay: float) -> Tensor:
    """Running average ``F_c ← ρ F_c + (1 − ρ) F_c^new`` (the authors' "faithful" schedule).

    Args:
        average: the current average, or ``None`` before the first estimate (which then
            replaces it).
        new: the estimate of this refresh.
        decay: ``ρ ∈ [0, 1)``; ``0`` keeps only ``new``.

    Returns:
        The updated average (a new tensor).

    Raises:
        ValueError: if ``decay`` is outside ``[0, 1)`` or the shapes differ.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if average is not None and average.shape != new.shape:
        raise ValueError(
            f"coarse matrix shape changed: {tuple(average.shape)} → {tuple(new.shape)}"
        )
    # a new tensor: the caller's average may be held elsewhere (F_c is tiny)
    return running_average(None if average is None else average.clone(), new, decay)


def default_rcond(dtype: torch.dtype) -> float:
    """Relative eigenvalue cutoff: ``1e-12`` in float64, ``10·ε`` of coarser dtypes."""
    return max(1e-12, 10.0 * torch.finfo(dtype).eps)


def _jacobi_scaling(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``s_k = F_c[k,k]^{-1/2}`` (0 for a non-positive/non-finite diagonal) and ``S F_c S``.

    The scaled matrix has unit diagonal on the active coordinates and zero rows/columns on
    the inactive ones (zero or non-finite basis vectors).
    """
    diag = torch.diagonal(matrix)
    active = torch.isfinite(diag) & (diag > 0)
    scale = torch.where(active, diag.clamp_min(torch.finfo(diag.dtype).tiny).rsqrt(), 0.0)
    pair = active[:, None] & active[None, :]
    scaled = torch.where(pair, scale[:, None] * matrix * scale[None, :], 0.0)
    return scale, scaled


@dataclass(frozen=True)
class CoarseOperator:
    """``Q = R₀ᵀ F_c⁻¹ R₀`` with a robust factorisation of ``F_c`` (Koroko et al. 2023, §2).

    Build it with :meth:`from_matrix`. ``F_c`` is symmetrised, upcast to float64 and
    Jacobi-scaled, ``F̃ = S F_c S`` with ``S = diag(F_c)^{-1/2}``, which makes ``Q``
    invariant to rescaling the basis vectors. ``F̃`` is factorised by Cholesky
    (``torch.linalg.cholesky_ex``); it is accepted when it succeeds with every pivot
    ``L_kk² ≥ rcond`` (``F̃`` has unit diagonal, so ``λ_max(F̃) ∈ [1, K]``). Otherwise —
    zero or linearly dependent basis vectors, an indefinite or non-finite ``F_c`` — the
    pseudo-inverse from ``torch.linalg.eigh`` is used, dropping eigenvalues
    ``≤ rcond·λ_max``. Coordinates with a zero/non-finite diagonal are dropped, and a
    non-finite ``F̃`` gives ``Q = 0`` (rank 0), with which every combination reduces to
    ``M⁻¹g``. Because ``F̂ = F + λI`` is SPD, the pseudo-inverse ``Q`` depends only on
    the span of the basis: the F̂-orthogonal projector ``QF̂`` onto it.

    Attributes:
        basis: per layer a ``[k_i, d_out_i, d_in'_i]`` tensor or its
            :class:`~.layer_basis.OuterVectors`.
        scale: ``s`` (float64, ``[K]``), zero on dropped coordinates.
        cholesky: lower Cholesky factor of ``F̃`` (float64), or ``None``.
        eigvecs: eigenvectors of ``F̃`` kept by the pseudo-inverse, or ``None``.
        inv_eigvals: their inverse eigenvalues, or ``None``.
        rank: the rank of the factorised ``F_c``.
    """

    basis: CoarseBasis
    scale: Tensor
    cholesky: Tensor | None
    eigvecs: Tensor | None
    inv_eigvals: Tensor | None
    rank: int
    _split: dict[tuple[bool, ...], SplitBasis] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def from_matrix(
        cls, basis: Sequence[LayerBasis], matrix: Tensor, rcond: float | None = None
    ) -> CoarseOperator:
        """Factorise ``F_c`` (``[K, K]``) for the coarse basis ``basis``.

        Args:
            basis: per layer a ``[k_i, d_out_i, d_in'_i]`` tensor or its
                :class:`~.layer_basis.OuterVectors`, ``K = Σ k_i``.
            matrix: ``F_c``, e.g. :func:`exact_coarse_matrix` or its running average.
            rcond: relative eigenvalue cutoff; default :func:`default_rcond` of
                ``matrix.dtype`` (``1e-12`` in float64).

        Returns:
            The operator.

        Raises:
            ValueError: if ``matrix`` is not ``[K, K]``.
        """
        basis = list(basis)
        k = sum(layer_count(b) for b in basis)
        if matrix.shape != (k, k):
            raise ValueError(f"matrix has shape {tuple(matrix.shape)}, basis needs ({k}, {k})")
        cut = default_rcond(matrix.dtype) if rcond is None else rcond
        m = matrix.detach().to(torch.float64)
        scale, scaled = _jacobi_scaling((m + m.T) / 2)
        if k == 0 or not bool(torch.isfinite(scaled).all()):
            return cls(basis, torch.zeros_like(scale), None, None, None, 0)
        active = scale > 0
        chol, info = torch.linalg.cholesky_ex(scaled + torch.diag((~active).to(m.dtype)))
        if int(info) == 0 and bool((torch.diagonal(chol) ** 2 >= cut).all()):
            return cls(basis, scale, chol, None, None, int(active.sum()))
        vals, vecs = torch.linalg.eigh(scaled)
        keep = vals > cut * vals.max().clamp_min(0.0)
        inv = torch.where(keep, 1.0 / torch.where(keep, vals, 1.0), 0.0)
        return cls(basis, scale, None, vecs, inv, int(keep.sum()))

    def with_matrix(self, matrix: Tensor) -> CoarseOperator:
        """The operator of the same basis with another ``F_c`` (e.g. at a new damping),
        keeping the split basis already formed (:meth:`parts_basis`)."""
        operator = CoarseOperator.from_matrix(self.basis, matrix)
        operator._split.update(self._split)
        return operator

    def solve(self, y: Tensor) -> Tensor:
        """``F_c⁻¹ y`` (the pseudo-inverse in the fallback), same dtype as ``y``.

        Args:
            y: a coarse vector of shape ``[K]``.

        Returns:
            ``F_c⁻¹ y`` of shape ``[K]``.
        """
        ys = torch.where(self.scale > 0, self.scale * y.to(torch.float64), 0.0)
        if self.cholesky is not None:
            z = torch.cholesky_solve(ys[:, None], self.cholesky)[:, 0]
        elif self.eigvecs is not None and self.inv_eigvals is not None:
            z = self.eigvecs @ (self.inv_eigvals * (self.eigvecs.T @ ys))
        else:
            z = torch.zeros_like(ys)
        return (self.scale * z).to(y.dtype)

    def apply(self, v: LayerVector) -> LayerVector:
        """``Q v = R₀ᵀ F_c⁻¹ R₀ v``.

        Args:
            v: a layer vector.

        Returns:
            ``Q v`` as a layer vector.
        """
        return prolong(self.basis, self.solve(restrict(self.basis, v)))

    __call__ = apply

    def add_into(self, alpha: float, v: LayerVector, target: LayerVector) -> LayerVector:
        """``target ← target + α Q v`` in place (:func:`prolong_add_into`), returning it."""
        return prolong_add_into(self.basis, self.solve(restrict(self.basis, v)), target, alpha)

    def parts_basis(self, has_bias: tuple[bool, ...]) -> SplitBasis:
        """The basis split into weight and bias parts (:func:`split_basis`), once per
        operator and layer layout."""
        split = self._split.get(has_bias)
        if split is None:
            split = self._split[has_bias] = split_basis(self.basis, has_bias)
        return split

    def add_into_parts(self, alpha: float, v: Parts, target: Parts) -> Parts:
        """:meth:`add_into` on vectors given as :data:`Parts` (``target``'s parts
        contiguous)."""
        split = self.parts_basis(tuple(b is not None for _, b in v))
        return self.add_restricted_into_parts(alpha, restrict_parts(split, v), target)

    def add_restricted_into_parts(self, alpha: float, restricted: Tensor, target: Parts) -> Parts:
        """``target ← target + α R₀ᵀ F_c⁻¹ y`` for a given ``y = R₀v`` (``[K]``)."""
        split = self.parts_basis(tuple(b is not None for _, b in target))
        return prolong_add_into_parts(split, self.solve(restricted), target, alpha)

    def energy_gain(self, res: LayerVector) -> Tensor:
        """``−(R₀ res)ᵀ F_c⁻¹ (R₀ res)``: the authors' ``E(β*) − E(0)`` diagnostic.

        With ``res = g − F̂M⁻¹g`` and the squared error ``E(β) = ‖F̂⁻¹g − (M⁻¹g + R₀ᵀβ)‖²_F̂``
        of the KFAC step corrected in the coarse space, the minimiser is
        ``β* = F_c⁻¹R₀res`` (the A-DEF2 correction) and ``E(β*) − E(0)`` is this value.

        Args:
            res: the residual layer vector.

        Returns:
            A 0-d tensor ``≤ 0``.
        """
        y = restrict(self.basis, res)
        return -(y * self.solve(y)).sum()
