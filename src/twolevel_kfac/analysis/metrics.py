"""Approximation metrics: pure functions on dense tensors (hand-checkable on 2×2 cases).

Notation: ``g`` the gradient, ``F`` the Fisher, ``F̂ = F + λI``, ``d* = F̂⁻¹g`` the exact
(damped) natural-gradient direction, ``d`` a method's direction (the step is ``−α d``),
``P`` a preconditioner (``d = P g``), ``R`` a coarse basis (rows = coarse vectors).

The metrics that only multiply by ``F`` or ``F̂`` (:func:`energy_error`,
:func:`quadratic_decrease`, :func:`coarse_gain`) take an :data:`Operator`: a dense matrix
or a matrix-vector product ``v ↦ A v`` (the matrix-free analysis).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Operator = Tensor | Callable[[Tensor], Tensor]
"""A symmetric matrix, dense or as ``v ↦ A v``."""


def apply(op: Operator, v: Tensor) -> Tensor:
    """``A v`` for a dense matrix or a matrix-vector product."""
    return op @ v if isinstance(op, Tensor) else op(v)


def galerkin(op: Operator, basis: Tensor) -> Tensor:
    """``R A Rᵀ`` (``[K, K]``) for a basis ``R`` of shape ``[K, P]`` (``K`` products)."""
    if isinstance(op, Tensor):
        return basis @ op @ basis.T
    if basis.shape[0] == 0:
        return basis.new_zeros(0, 0)
    return basis @ torch.stack([op(r) for r in basis]).T


def _check_vector(name: str, v: Tensor) -> None:
    if v.dim() != 1:
        raise ValueError(f"{name} must be a vector, got shape {tuple(v.shape)}")


def cosine(u: Tensor, v: Tensor) -> float:
    """``uᵀv / (‖u‖ ‖v‖)`` (0 when either vector is zero).

    Args:
        u: a vector.
        v: a vector of the same length.

    Returns:
        The cosine similarity.
    """
    _check_vector("u", u)
    _check_vector("v", v)
    norm = float(u.norm() * v.norm())
    return 0.0 if norm == 0.0 else float(u @ v) / norm


def relative_error(d: Tensor, reference: Tensor) -> float:
    """``‖d − d_ref‖ / ‖d_ref‖`` (Euclidean).

    Args:
        d: a direction.
        reference: the reference direction (non-zero).

    Returns:
        The relative error.
    """
    return float((d - reference).norm() / reference.norm())


def energy_error(d: Tensor, d_star: Tensor, fhat: Operator) -> float:
    """``E(d) = ‖d − d*‖²_F̂ = (d − d*)ᵀ F̂ (d − d*)``, with ``d* = F̂⁻¹g``.

    Args:
        d: a direction.
        d_star: the exact direction ``F̂⁻¹g``.
        fhat: ``F̂`` (SPD).

    Returns:
        The F̂-norm error squared.
    """
    e = d - d_star
    return float(e @ apply(fhat, e))


def coarse_gain(residual: Tensor, basis: Tensor, fhat: Operator) -> float:
    """``E(β*) − E(0) = −(R res)ᵀ (R F̂ Rᵀ)⁺ (R res)`` (the authors' diagnostic).

    With ``E(β) = ‖M⁻¹g + Rᵀβ − F̂⁻¹g‖²_F̂`` and ``res = g − F̂M⁻¹g``, the optimal coarse
    correction ``β* = (RF̂Rᵀ)⁻¹R res`` lowers the error by this amount (≤ 0). A rank-
    deficient ``R`` uses the pseudo-inverse (the minimum over ``span Rᵀ`` is the same).

    Args:
        residual: ``res = g − F̂M⁻¹g``.
        basis: ``R`` of shape ``[K, P]``.
        fhat: ``F̂``.

    Returns:
        The (non-positive) change of the energy error.
    """
    r = basis @ residual
    coarse = galerkin(fhat, basis)
    return -float(r @ torch.linalg.pinv(coarse, hermitian=True) @ r)


def quadratic_decrease(g: Tensor, d: Tensor, curvature: Operator, step: float) -> float:
    """Decrease ``α gᵀd − ½ α² dᵀ C d`` of the quadratic model for the step ``−α d``.

    Args:
        g: the gradient.
        d: the direction.
        curvature: ``C`` (the analysis uses the undamped Fisher, the Gauss–Newton matrix
            of these likelihoods).
        step: ``α``.

    Returns:
        The predicted decrease (positive = the model predicts the loss goes down).
    """
    return float(step * (g @ d) - 0.5 * step * step * (d @ apply(curvature, d)))


def preconditioned_spectrum(
    p: Tensor, fhat: Tensor, sym_tol: float = 1e-10
) -> tuple[Tensor, float]:
    """Eigenvalues of ``P F̂``, ascending, and the largest relative imaginary part.

    With ``F̂ = LLᵀ``, ``PF̂`` is similar to ``C = LᵀPL``; ``C`` is symmetric when ``P`` is
    (then ``eigvalsh``), otherwise ``eigvals`` is used and the real parts are returned
    (A-DEF1 / A-DEF2 with an exact Galerkin coarse solve have real spectra).

    Args:
        p: the preconditioner ``[P, P]``.
        fhat: ``F̂`` (SPD).
        sym_tol: relative asymmetry below which ``P`` is treated as symmetric.

    Returns:
        ``(eigenvalues, max |Im λ| / max |λ|)``.
    """
    chol = torch.linalg.cholesky(fhat)
    c = chol.T @ p @ chol
    asym = float((c - c.T).abs().max() / c.abs().max().clamp_min(1e-300))
    if asym <= sym_tol:
        return torch.linalg.eigvalsh(0.5 * (c + c.T)), 0.0
    vals = torch.linalg.eigvals(c)
    imag = float(vals.imag.abs().max() / vals.abs().max().clamp_min(1e-300))
    return torch.sort(vals.real).values, imag


def condition_number(eigenvalues: Tensor) -> float:
    """``λ_max / λ_min`` of a spectrum (``inf`` when ``λ_min ≤ 0``).

    Args:
        eigenvalues: real eigenvalues.

    Returns:
        The spectral condition number.
    """
    lo, hi = float(eigenvalues.min()), float(eigenvalues.max())
    return float("inf") if lo <= 0.0 else hi / lo


def _slices(sizes: Sequence[int]) -> list[slice]:
    bounds = [0, *itertools.accumulate(int(s) for s in sizes)]
    return [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def block_norms(matrix: Tensor, sizes: Sequence[int]) -> Tensor:
    """Frobenius norms ``‖F_ij‖_F`` of the layer × layer blocks, ``[L, L]``.

    Args:
        matrix: ``[P, P]``.
        sizes: the block sizes (``Σ = P``).

    Returns:
        The matrix of block norms.

    Raises:
        ValueError: if the sizes do not add up to the matrix size.
    """
    if sum(sizes) != matrix.shape[0]:
        raise ValueError(f"block sizes add up to {sum(sizes)}, matrix is {matrix.shape[0]}")
    sl = _slices(sizes)
    return torch.stack([torch.stack([matrix[a, b].norm() for b in sl]) for a in sl])


def block_diagonal(matrix: Tensor, sizes: Sequence[int]) -> Tensor:
    """The block-diagonal part of ``matrix`` (off-diagonal blocks set to zero)."""
    out = torch.zeros_like(matrix)
    for s in _slices(sizes):
        out[s, s] = matrix[s, s]
    return out


def off_diagonal_fraction(matrix: Tensor, sizes: Sequence[int]) -> float:
    """``Σ_{i≠j} ‖F_ij‖²_F / ‖F‖²_F``: the share of the Fisher's squared Frobenius mass
    outside the diagonal (per-layer) blocks that KFAC keeps."""
    return off_diagonal_share(block_norms(matrix, sizes))


def off_diagonal_mass(norms: Tensor) -> float:
    """``Σ_{i≠j} ‖F_ij‖²_F`` from the block norms ``[L, L]``."""
    squared = norms**2
    return float(squared.sum() - squared.diagonal().sum())


def off_diagonal_share(norms: Tensor) -> float:
    """:func:`off_diagonal_fraction` from the block norms ``[L, L]``."""
    total = float((norms**2).sum())
    return 0.0 if total == 0.0 else off_diagonal_mass(norms) / total


def captured_off_diagonal(matrix: Tensor, sizes: Sequence[int], basis: Tensor) -> float:
    """Share of the off-diagonal Fisher mass inside the coarse space: ``‖ΠOΠ‖²_F / ‖O‖²_F``.

    ``O = F − blockdiag(F)`` and ``Π = UUᵀ`` the Euclidean orthogonal projector onto
    ``span Rᵀ`` (``U`` an orthonormal basis of it, so ``‖ΠOΠ‖_F = ‖UᵀOU‖_F``, cost
    ``O(P²K)``). A two-level method can only restore the inter-layer interactions inside
    its coarse space; with one vector ``u_i`` per layer this is
    ``Σ_{i≠j} (u_iᵀF_ij u_j)² / Σ_{i≠j} ‖F_ij‖²`` for unit ``u_i``.

    Args:
        matrix: ``F`` ``[P, P]``.
        sizes: the layer block sizes.
        basis: ``R`` ``[K, P]`` (zero or dependent rows are allowed).

    Returns:
        A number in ``[0, 1]`` (0 when ``O = 0``).
    """
    off = matrix - block_diagonal(matrix, sizes)
    total = float((off**2).sum())
    if total == 0.0:
        return 0.0
    u, sv, _ = torch.linalg.svd(basis.T, full_matrices=False)
    keep = sv > sv.max().clamp_min(1e-300) * 1e-10 if sv.numel() else sv > 0
    u = u[:, keep]
    return float(((u.T @ off @ u) ** 2).sum()) / total


def spectrum_summary(eigenvalues: Tensor) -> dict[str, float]:
    """``min``, ``max``, ``condition_number`` and the 10/50/90 % quantiles of a spectrum."""
    q = torch.quantile(eigenvalues, eigenvalues.new_tensor([0.1, 0.5, 0.9]))
    return {
        "eig_min": float(eigenvalues.min()),
        "eig_max": float(eigenvalues.max()),
        "eig_q10": float(q[0]),
        "eig_median": float(q[1]),
        "eig_q90": float(q[2]),
        "condition_number": condition_number(eigenvalues),
    }
