"""Krylov solvers for the matrix-free analysis: conjugate gradients and Lanczos.

Pure functions on flat vectors; the operators are callables ``v ↦ A v``, so the same code
runs on a dense matrix (the tests) and on exact Fisher–vector products (the analysis).

* :func:`conjugate_gradient` solves ``A x = b`` for SPD ``A`` (Hestenes–Stiefel) and reports
  the *true* relative residual ``‖b − A x‖/‖b‖`` of the returned ``x``;
* :func:`lanczos` gives Ritz values of ``P B`` for symmetric ``P`` and SPD ``B``: ``P B`` is
  self-adjoint in the ``B``-inner product ``⟨u, v⟩_B = uᵀBv``, so Lanczos in that inner
  product builds a ``B``-orthonormal basis ``V`` of the Krylov space with
  ``Vᵀ B (P B) V = T`` tridiagonal. The extreme Ritz values (eigenvalues of ``T``) converge
  to the extreme eigenvalues of ``P B`` from inside (``θ_min ≥ λ_min``, ``θ_max ≤ λ_max``), so
  ``θ_max/θ_min`` is a lower bound of the condition number; each Ritz value ``θ_i`` lies
  within ``β_m |s_{m,i}|`` of an eigenvalue (``s_i`` its eigenvector of ``T``, ``β_m`` the last
  off-diagonal). With ``B = I`` this is the standard Lanczos process on ``P``. The basis
  is fully reorthogonalised (twice, classical Gram–Schmidt), which costs ``O(m²n)`` for
  ``m`` steps but keeps the Ritz values free of spurious copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class CGResult:
    """The outcome of :func:`conjugate_gradient`.

    Attributes:
        solution: ``x ≈ A⁻¹b``.
        iterations: the number of products with ``A`` in the iteration.
        relative_residual: ``‖b − A x‖/‖b‖`` of ``solution``, recomputed with one more
            product (not the recursively updated residual).
        converged: whether the recursive residual reached ``tol·‖b‖``.
    """

    solution: Tensor
    iterations: int
    relative_residual: float
    converged: bool


def conjugate_gradient(
    apply: MatVec, b: Tensor, tol: float = 1e-10, max_iter: int | None = None
) -> CGResult:
    """Solve ``A x = b`` for SPD ``A`` by conjugate gradients from ``x₀ = 0``.

    Iterates ``α = rᵀr / pᵀAp``, ``x ← x + αp``, ``r ← r − αAp``, ``p ← r + (r'ᵀr'/rᵀr) p``
    until ``‖r‖ ≤ tol·‖b‖`` or ``max_iter`` products.

    Args:
        apply: ``v ↦ A v``.
        b: the right-hand side.
        tol: relative residual tolerance.
        max_iter: the most products with ``A`` (default ``10·len(b)``).

    Returns:
        The :class:`CGResult`.
    """
    limit = 10 * b.numel() if max_iter is None else max_iter
    x = torch.zeros_like(b)
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return CGResult(x, 0, 0.0, True)
    r = b.clone()
    p = r.clone()
    rr = float(r @ r)
    target = (tol * b_norm) ** 2
    iterations = 0
    while rr > target and iterations < limit:
        ap = apply(p)
        iterations += 1
        curvature = float(p @ ap)
        if curvature <= 0.0:  # A is not SPD along p (or p vanished): stop
            break
        alpha = rr / curvature
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    true = float((b - apply(x)).norm()) / b_norm
    return CGResult(x, iterations, true, rr <= target)


@dataclass(frozen=True)
class LanczosResult:
    """The outcome of :func:`lanczos`.

    Attributes:
        ritz_values: the eigenvalues of ``T``, ascending.
        residual_bounds: ``β_m |s_{m,i}|`` per Ritz value (the distance to the nearest
            eigenvalue of ``P B`` is at most this).
        steps: the Lanczos steps taken (fewer than asked when the Krylov space became
            invariant).
    """

    ritz_values: Tensor
    residual_bounds: Tensor
    steps: int


def _b_orthogonalise(w: Tensor, basis: Tensor, b_basis: Tensor) -> Tensor:
    """``w − V (BV)ᵀ w`` twice (classical Gram–Schmidt in the ``B``-inner product)."""
    for _ in range(2):
        w = w - basis.T @ (b_basis @ w)
    return w


def lanczos(
    apply_p: MatVec,
    start: Tensor,
    steps: int,
    apply_b: MatVec | None = None,
    breakdown: float = 1e-12,
) -> LanczosResult:
    """Ritz values of ``P B`` by ``steps`` Lanczos steps in the ``B``-inner product.

    ``P`` must be symmetric and ``B`` SPD (module docstring); ``B = I`` when ``apply_b`` is
    ``None``. Step ``j``: ``w = P(B v_j)``, ``α_j = ⟨w, v_j⟩_B``, ``w`` minus its ``B``-projection
    on all of ``v_1 … v_j`` (the three-term recurrence ``w − α_j v_j − β_{j−1}v_{j−1}`` plus full
    reorthogonalisation), ``β_j = ‖w‖_B``, ``v_{j+1} = w/β_j``. One product with ``P`` and one
    with ``B`` per step. The process stops early when ``β_j ≤ breakdown·max|T|``
    (an invariant subspace: the Ritz values are then eigenvalues).

    Args:
        apply_p: ``v ↦ P v``.
        start: the starting vector (non-zero).
        steps: the most Lanczos steps (at most ``len(start)`` are useful).
        apply_b: ``v ↦ B v``, default the identity.
        breakdown: relative size of ``β`` that ends the process.

    Returns:
        The :class:`LanczosResult`.

    Raises:
        ValueError: if ``steps < 1`` or ``start`` is zero.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b_op: MatVec = apply_b if apply_b is not None else (lambda v: v)
    steps = min(steps, start.numel())
    bv = b_op(start)
    norm = float(start @ bv) ** 0.5
    if norm == 0.0:
        raise ValueError("the Lanczos start vector must be non-zero")
    # rows 0..j of the preallocated bases hold v_1..v_{j+1} and B v_1..B v_{j+1}
    basis = start.new_empty(steps, start.numel())
    b_basis = start.new_empty(steps, start.numel())
    basis[0], b_basis[0] = start / norm, bv / norm
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for j in range(steps):
        w = apply_p(b_basis[j])
        alpha = float(w @ b_basis[j])
        alphas.append(alpha)
        scale = max(scale, abs(alpha))
        w = _b_orthogonalise(w, basis[: j + 1], b_basis[: j + 1])
        bw = b_op(w)
        beta = max(float(w @ bw), 0.0) ** 0.5
        betas.append(beta)
        scale = max(scale, beta)
        if beta <= breakdown * scale or j + 1 == steps:
            break
        basis[j + 1], b_basis[j + 1] = w / beta, bw / beta
    m = len(alphas)
    off = torch.tensor(betas[: m - 1], dtype=start.dtype)
    t = (
        torch.diag(torch.tensor(alphas, dtype=start.dtype))
        + torch.diag(off, 1)
        + torch.diag(off, -1)
    )
    values, vecs = torch.linalg.eigh(t)
    return LanczosResult(values, betas[m - 1] * vecs[-1].abs(), m)
