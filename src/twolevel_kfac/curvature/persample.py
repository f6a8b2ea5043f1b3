"""Per-sample contractions of a layer's statistics that EKFAC and KPSVD need.

With ``ψ_n = ∇_W̄ ℓ_n = Σ_t δ_{n,t} ā_{n,t}ᵀ`` (``d_out × d_in'``, :mod:`.blocks`) and the
layer's exact Fisher block ``F = (1/N) Σ_n vec(ψ_n) vec(ψ_n)ᵀ`` (column-major ``vec``, so
``A ⊗ G`` acts as ``V ↦ G V A``), every function here returns a *sum over the samples* of
one rank (callers divide by the global ``N``, after an all-reduce under
``torch.distributed``). None of them forms ``F``:

* :func:`rotated_second_moments`: ``Σ_n (Q_Gᵀ ψ_n Q_A)²`` (EKFAC's ``S``, George et al.
  2018 eq. (9)) — for ``T = 1`` as ``(Q_Gᵀδ)²ᵀ (Q_Aᵀā)²`` without any per-sample matrix;
* :func:`rearranged_product` / :func:`rearranged_adjoint_product`: ``R(F)`` of Van Loan &
  Pitsianis (1993) applied to a ``d_G × d_G`` / ``d_A × d_A`` matrix, where
  ``R(F)[(i,i'),(o,o')] = F[(o,i),(o',i')]`` so that ``R(A ⊗ G) = vec(A) vec(G)ᵀ``:
  ``N·R(F) vec(Y) = vec(Σ_n ψ_nᵀ Y ψ_n)`` and ``N·R(F)ᵀ vec(X) = vec(Σ_n ψ_n X ψ_nᵀ)``
  (for ``T = 1``: ``Σ_n (δ_nᵀYδ_n) ā_nā_nᵀ`` and ``Σ_n (ā_nᵀXā_n) δ_nδ_nᵀ``).

For ``T > 1`` the per-sample gradients are formed in chunks of samples with at most
``CHUNK_ELEMENTS`` numbers (one batched matmul per chunk, no loop over samples).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from .blocks import LayerStats

CHUNK_ELEMENTS = 1 << 22


def sample_chunks(stats: LayerStats, max_elements: int = CHUNK_ELEMENTS) -> Iterator[Tensor]:
    """The per-sample gradients ``ψ_n`` (``[n, d_out, d_in']``) in chunks of samples whose
    gradients hold at most ``max_elements`` numbers (at least one sample per chunk)."""
    num, d_out, d_in = stats.num_samples, stats.g.shape[-1], stats.a.shape[-1]
    step = max(1, max_elements // max(1, d_out * d_in))
    for start in range(0, num, step):
        chunk = slice(start, start + step)
        yield stats.g[chunk].transpose(1, 2) @ stats.a[chunk]


def rotated_second_moments(stats: LayerStats, vectors_a: Tensor, vectors_g: Tensor) -> Tensor:
    """``Σ_n (Q_Gᵀ ψ_n Q_A)²`` (elementwise square), shape ``(d_out, d_in')``.

    Args:
        stats: the layer's ``ā`` ``[N, T, d_in']`` and ``δ`` ``[N, T, d_out]``.
        vectors_a: ``Q_A`` (``d_in' × d_in'``, orthonormal columns).
        vectors_g: ``Q_G`` (``d_out × d_out``).

    Returns:
        The sum over this rank's samples (divide by ``N`` for EKFAC's ``S``).
    """
    rotated = LayerStats(stats.a @ vectors_a, stats.g @ vectors_g)
    if rotated.num_locations == 1:  # ψ̃_n = g̃_n ã_nᵀ is rank one: (ψ̃_n)² = g̃_n² (ã_n²)ᵀ
        return rotated.g[:, 0].square().T @ rotated.a[:, 0].square()
    total = vectors_g.new_zeros(vectors_g.shape[0], vectors_a.shape[0])
    for psi in sample_chunks(rotated):
        total += psi.square().sum(0)
    return total


def rearranged_product(stats: LayerStats, y: Tensor) -> Tensor:
    """``Σ_n ψ_nᵀ Y ψ_n`` (``d_in' × d_in'``) for a ``d_out × d_out`` matrix ``Y``."""
    if stats.num_locations == 1:
        a, g = stats.a[:, 0], stats.g[:, 0]
        weights = ((g @ y) * g).sum(1)
        return (a * weights[:, None]).T @ a
    total = y.new_zeros(stats.a.shape[-1], stats.a.shape[-1])
    for psi in sample_chunks(stats):
        total += psi.flatten(0, 1).T @ (y @ psi).flatten(0, 1)
    return total


def rearranged_adjoint_product(stats: LayerStats, x: Tensor) -> Tensor:
    """``Σ_n ψ_n X ψ_nᵀ`` (``d_out × d_out``) for a ``d_in' × d_in'`` matrix ``X``."""
    if stats.num_locations == 1:
        a, g = stats.a[:, 0], stats.g[:, 0]
        weights = ((a @ x) * a).sum(1)
        return (g * weights[:, None]).T @ g
    total = x.new_zeros(stats.g.shape[-1], stats.g.shape[-1])
    for psi in sample_chunks(stats):
        rows = psi.transpose(1, 2).flatten(0, 1)  # [(n, i), d_out]
        total += rows.T @ (psi @ x.T).transpose(1, 2).flatten(0, 1)
    return total


def eigenbasis_diagonal_transport(
    scalings: Tensor, old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]
) -> Tensor:
    """The diagonal, in a new Kronecker eigenbasis, of ``(Q_A ⊗ Q_G) diag(S) (Q_A ⊗ Q_G)ᵀ``
    given in an old one: ``(P_G∘P_G) S (P_A∘P_A)ᵀ`` with ``P = Q_newᵀ Q_old``.

    Args:
        scalings: ``S`` in the old basis, ``(d_out, d_in')`` (or stacked ``[G, ·, ·]``
            with the bases, one per group of a block).
        old: ``(Q_A, Q_G)`` of the old basis.
        new: ``(Q_A, Q_G)`` of the new basis.
    """
    p_a = (new[0].mT @ old[0]).square()
    p_g = (new[1].mT @ old[1]).square()
    return p_g @ scalings @ p_a.mT
