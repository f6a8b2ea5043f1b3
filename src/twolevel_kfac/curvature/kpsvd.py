"""Kronecker-product SVD of a layer's exact Fisher block, and the simultaneous
diagonalisation of a pair of Kronecker products (Koroko et al., ESAIM: Proceedings and
Surveys 73, 2023; Van Loan & Pitsianis 1993).

Scale convention (the one of :class:`~.kronecker.KroneckerFactors`): the block of a layer
with ``T`` locations is modelled as ``T·(A ⊗ G)`` and the damped inverse is divided by ``T``,
so KFAC's ``T·(A ⊗ G)`` (``A = Σ āāᵀ/(NT)``, ``G = Σ δδᵀ/(NT)``) and the factors returned
here share one damping code path.

* **KPSVD** (:func:`nearest_kronecker`): ``T·(A_k ⊗ G_k) = σ₁ X ⊗ Y`` with ``vec(X), vec(Y)``
  the leading singular pair of the rearranged block ``R(F)`` (:mod:`.persample`), the
  Frobenius-nearest Kronecker product to ``F``: ``‖F − T A_k⊗G_k‖_F² = ‖F‖_F² − σ₁²``.
* **KFAC-corrected** (:func:`kronecker_correction`): ``T·(A₂ ⊗ G₂)`` the leading Kronecker
  term of ``F − T·(A ⊗ G)``, from ``R(F) − T vec(A) vec(G)ᵀ``, so
  ``‖F − T(A⊗G + A₂⊗G₂)‖_F² = ‖F − T A⊗G‖_F² − σ₁²``.

Both run a power iteration ``y ← Rᵀx/‖Rᵀx‖, x ← Ry/‖Ry‖`` whose products are per-sample
contractions (:func:`~.persample.rearranged_product`); ``reduce`` sums them over the
ranks of a distributed run. The split of the scale between the factors is fixed by
``‖A_k‖_F / ‖G_k‖_F = ‖A‖_F / ‖G‖_F`` (KFAC's ratio), so an exactly Kronecker block
``F = T·A⊗G`` comes back as ``(A, G)`` itself. The sign of the pair makes ``⟨Y, start⟩ ≥ 0``:
for KPSVD, started from a PSD ``G``, the factors are then PSD (the leading singular vectors
of the PSD block are PSD matrices up to sign, Van Loan & Pitsianis 1993); for the
correction, warm-started from the running ``G₂``, successive terms keep one orientation, so
their running averages do not cancel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import LayerStats
from .factor_inverse import eigh_or_none
from .persample import rearranged_adjoint_product, rearranged_product

Reduce = Callable[[Tensor], Tensor]
"""Sums a per-rank partial sum over the ranks (identity in one process)."""


@dataclass(frozen=True)
class PowerIteration:
    """Stopping rule of the power iteration: at most ``iterations`` sweeps, or until both
    unit singular vectors move by at most ``max(tol, 32·eps)`` (Euclidean norm, ``eps`` of
    the factors' dtype: float32 rounding alone moves them by ~2e-7) in one sweep."""

    iterations: int = 50
    tol: float = 1e-8


@dataclass
class KroneckerTerm:
    """``σ X ⊗ Y`` with ``‖X‖_F = ‖Y‖_F = 1`` and the sweeps it took."""

    x: Tensor
    y: Tensor
    sigma: float
    sweeps: int


def _unit(matrix: Tensor) -> tuple[Tensor, float]:
    norm = float(torch.linalg.matrix_norm(matrix))
    return (matrix / norm if norm > 0 else matrix), norm


def leading_term(
    product: Callable[[Tensor], Tensor],
    adjoint: Callable[[Tensor], Tensor],
    start: Tensor,
    rule: PowerIteration,
) -> KroneckerTerm:
    """Leading singular triple of a rearranged operator given by its products.

    Args:
        product: ``Y ↦ R vec(Y)`` as a ``d_A × d_A`` matrix.
        adjoint: ``X ↦ Rᵀ vec(X)`` as a ``d_G × d_G`` matrix.
        start: the initial ``Y`` (must not be orthogonal to the leading right vector); the
            result is signed so that ``⟨Y, start⟩ ≥ 0`` (``tr X ≥ 0`` if it is 0).
        rule: the stopping rule.

    Returns:
        ``σ X ⊗ Y`` with ``R ≈ σ vec(X) vec(Y)ᵀ`` (``σ = 0`` and zero matrices if ``R y = 0``).
    """
    y, _ = _unit(start)
    x, sigma = _unit(product(y))
    tol = max(rule.tol, 32 * torch.finfo(x.dtype).eps)
    sweeps = 0
    while sigma > 0 and sweeps < rule.iterations:
        sweeps += 1
        y_new, _ = _unit(adjoint(x))
        x_new, sigma = _unit(product(y_new))
        moved = float(torch.linalg.matrix_norm(x_new - x) + torch.linalg.matrix_norm(y_new - y))
        x, y = x_new, y_new
        if moved <= tol:
            break
    if sigma == 0 or not math.isfinite(sigma):
        return KroneckerTerm(torch.zeros_like(x), torch.zeros_like(y), sigma, sweeps)
    inner = float((y * start).sum())  # orient like the start (running factors stay aligned)
    if (inner < 0) if inner != 0 else float(x.trace()) < 0:
        x, y = -x, -y
    return KroneckerTerm(0.5 * (x + x.T), 0.5 * (y + y.T), sigma, sweeps)


def balanced_factors(
    term: KroneckerTerm, locations: float, reference: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """``(A', G')`` with ``T·(A' ⊗ G') = σ X ⊗ Y`` and ``‖A'‖/‖G'‖ = ‖A_ref‖/‖G_ref‖``."""
    scale = term.sigma / locations
    norm_a = float(torch.linalg.matrix_norm(reference[0]))
    norm_g = float(torch.linalg.matrix_norm(reference[1]))
    ratio = norm_a / norm_g if norm_a > 0 and norm_g > 0 else 1.0
    split = math.sqrt(scale * ratio)
    if split == 0:
        return torch.zeros_like(term.x), torch.zeros_like(term.y)
    return split * term.x, (scale / split) * term.y


def _operators(
    stats: LayerStats, count: int, reduce: Reduce
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``R(F)`` and ``R(F)ᵀ`` of the block of ``count`` samples (summed by ``reduce``)."""

    def product(y: Tensor) -> Tensor:
        return reduce(rearranged_product(stats, y)) / count

    def adjoint(x: Tensor) -> Tensor:
        return reduce(rearranged_adjoint_product(stats, x)) / count

    return product, adjoint


def nearest_kronecker(
    stats: LayerStats,
    factors: tuple[Tensor, Tensor],
    count: int,
    rule: PowerIteration,
    reduce: Reduce = lambda t: t,
    start: Tensor | None = None,
    locations: float | None = None,
) -> tuple[Tensor, Tensor, KroneckerTerm]:
    """KPSVD factors ``(A_k, G_k)`` of the block of ``stats`` (see the module docstring).

    Whatever the number of sweeps, ``‖F − T·A_k⊗G_k‖_F² = ‖F‖_F² − σ²`` with ``σ`` at least
    that of the start, so from KFAC's ``G`` (the default) the error never exceeds that of
    the best multiple of KFAC's ``A ⊗ G``.

    Args:
        stats: this rank's statistics of the layer.
        factors: KFAC's ``(A, G)`` of the same samples (scale ratio, default start).
        count: the number of samples ``N`` of the block (all ranks).
        rule: the power iteration's stopping rule.
        reduce: sums a partial result over the ranks.
        start: the initial ``Y`` (e.g. the running ``G_k``: a warm start).
        locations: ``T`` of KFAC's factors (default: the statistics'; ``1`` for
            ``weight_sharing="reduce"``'s view, which divides nothing by ``T``; ``M/N`` where
            positions that do not reach the loss are left out, ``live_rows``).

    Returns:
        ``(A_k, G_k, term)`` with ``T·(A_k ⊗ G_k)`` the nearest Kronecker product to ``F``.
    """
    product, adjoint = _operators(stats, count, reduce)
    term = leading_term(product, adjoint, factors[1] if start is None else start, rule)
    count_t = stats.num_locations if locations is None else locations
    return (*balanced_factors(term, count_t, factors), term)


def kronecker_correction(
    stats: LayerStats,
    factors: tuple[Tensor, Tensor],
    count: int,
    rule: PowerIteration,
    reduce: Reduce = lambda t: t,
    start: Tensor | None = None,
    locations: float | None = None,
) -> tuple[Tensor, Tensor, KroneckerTerm]:
    """``(A₂, G₂)``: ``T·(A₂ ⊗ G₂)`` is the leading Kronecker term of ``F − T·(A ⊗ G)``.

    Whatever the number of sweeps, ``‖F − T(A⊗G + A₂⊗G₂)‖_F² = ‖F − T·A⊗G‖_F² − σ²``.

    Args:
        stats: this rank's statistics of the layer.
        factors: KFAC's ``(A, G)`` of the same samples.
        count: the number of samples ``N`` of the block (all ranks).
        rule: the power iteration's stopping rule.
        reduce: sums a partial result over the ranks.
        start: the initial ``Y`` (default: a fixed pseudo-random symmetric matrix).
        locations: ``T`` of KFAC's factors (default: the statistics').

    Returns:
        ``(A₂, G₂, term)``; zeros when KFAC is exact (``F = T·A⊗G``).
    """
    a, g = factors
    locations = stats.num_locations if locations is None else locations
    product, adjoint = _operators(stats, count, reduce)

    def residual(y: Tensor) -> Tensor:
        return product(y) - locations * float((g * y).sum()) * a

    def residual_adjoint(x: Tensor) -> Tensor:
        return adjoint(x) - locations * float((a * x).sum()) * g

    if start is None or not bool(start.abs().sum() > 0):
        generator = torch.Generator().manual_seed(0)  # a fixed generic start, not the sampler's
        start = torch.randn(g.shape, generator=generator, dtype=torch.float64).to(g)
        start = start + start.T
    term = leading_term(residual, residual_adjoint, start, rule)
    return (*balanced_factors(term, locations, factors), term)


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric (possibly indefinite) matrix, retried in float64.

    Raises:
        RuntimeError: if the matrix is not finite or both attempts fail.
    """
    if not torch.isfinite(matrix).all():
        raise RuntimeError("cannot decompose a matrix with NaN/Inf entries")
    sym = 0.5 * (matrix + matrix.T)
    result = eigh_or_none(sym) or eigh_or_none(sym.double())
    if result is None:
        raise RuntimeError(f"eigendecomposition of a {tuple(sym.shape)} matrix failed")
    return result[0].to(matrix.dtype), result[1].to(matrix.dtype)


def pencil_eigh(eigen: tuple[Tensor, Tensor], shift: float, other: Tensor) -> tuple[Tensor, Tensor]:
    """Simultaneous diagonalisation of ``M + shift·I`` (positive definite) and ``C``.

    With ``M = Q diag(d) Qᵀ`` and ``W = Q diag(d + shift)^{-1/2}`` (so ``Wᵀ(M + shift I)W = I``)
    and ``WᵀCW = U diag(μ) Uᵀ``, ``V = W U`` satisfies ``Vᵀ(M + shift I)V = I`` and
    ``VᵀCV = diag(μ)`` — the generalised eigendecomposition ``C v = μ (M + shift I) v``.

    Args:
        eigen: ``(d, Q)``, the eigenpairs of ``M``.
        shift: the damping added to ``M`` (``d + shift`` must be positive).
        other: the symmetric matrix ``C``.

    Returns:
        ``(μ, V)``.
    """
    values, vectors = eigen
    whiten = vectors * (values + shift).rsqrt()
    mu, rotation = symmetric_eigh(whiten.T @ other @ whiten)
    return mu, whiten @ rotation
