"""One eigenvector of an extreme eigenvalue that is the same wherever the factor is formed.

Where a factor's extreme eigenvalue is repeated (the rank-deficient factors of real data:
dead pixels, fewer distinct tokens than features), every unit vector of its eigenspace is
such an eigenvector, and the one ``eigh`` or a subspace iteration returns depends on the
rounding: the same factor summed in another order (the ranks of ``torch.distributed``
against one process, the samples of a batch permuted) gave another vector, so another
spectral coarse space and another step. :func:`canonical_vector` returns instead the
projection of a fixed reference vector onto the cluster's eigenspace, normalised: a
function of the eigenspace alone, as far as its eigenvalues are apart from the others
(``Q = R₀ᵀ(R₀F̂R₀ᵀ)⁻¹R₀`` does not see the vector's sign or scale). Likewise
:func:`cluster_mean` makes EKFAC's scalings in such an eigenbasis a function of its
eigenspaces: the mean of each repeated eigenvalue's entries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "TOLERANCE",
    "canonical_vector",
    "cluster_mean",
    "cluster_tolerance",
    "extreme_vector",
    "reference_vector",
]

TOLERANCE = 8.0  # c of τ = c·ε·√n·‖M‖_F (here and in curvature.extreme_eigen)
_SEED = 0x5EC7


def cluster_tolerance(values: Tensor, dtype: torch.dtype) -> float:
    """``τ = c · ε · √n · ‖M‖_F`` of a symmetric matrix from its eigenvalues
    (``‖M‖_F = ‖λ‖₂``), ``ε`` of ``dtype``: eigenvalues closer than ``τ`` are one cluster."""
    norm = float(torch.linalg.vector_norm(values.double()))
    return TOLERANCE * torch.finfo(dtype).eps * math.sqrt(values.numel()) * norm


def reference_vector(size: int, like: Tensor) -> Tensor:
    """The fixed pseudo-random unit vector of length ``size`` (float64 draws, then
    ``like``'s dtype and device) that :func:`canonical_vector` projects."""
    generator = torch.Generator().manual_seed(_SEED)
    vector = torch.randn(size, generator=generator, dtype=torch.float64)
    return (vector / vector.norm()).to(dtype=like.dtype, device=like.device)


def extreme_vector(vectors: Tensor, values: Tensor, which: str, dtype: torch.dtype) -> Tensor:
    """:func:`canonical_vector` of a decomposition with its clusters' :func:`cluster_tolerance`
    in ``dtype`` (the dtype the decomposition was computed in)."""
    return canonical_vector(vectors, values, which, cluster_tolerance(values, dtype))


def canonical_vector(vectors: Tensor, values: Tensor, which: str, tau: float) -> Tensor:
    """The eigenvector (a column of ``vectors``) of the smallest (``which``) or largest
    eigenvalue of ``values``, or, where other eigenvalues lie within ``tau`` of it, the
    unit vector of their span closest to :func:`reference_vector`: ``P r / ‖P r‖`` with
    ``P = V_c V_cᵀ`` (module docstring). A single eigenvector is returned as it is (bit
    for bit)."""
    index = int(values.argmin() if which == "smallest" else values.argmax())
    close = (values - values[index]).abs() <= tau
    close[index] = True
    if int(close.sum()) == 1:
        return vectors[:, index]
    basis = vectors[:, close]
    reference = reference_vector(vectors.shape[0], basis)
    projected = basis @ (basis.T @ reference)
    norm = float(projected.norm())
    if not math.isfinite(norm) or norm <= 1e-3:  # the reference (nearly) orthogonal to it
        return vectors[:, index]
    return projected / norm


def _capped_runs(values: list[float], tau: float) -> list[tuple[int, int]]:
    """The clusters of more than one of ascending ``values``, as index ranges: a cluster
    starts at its smallest eigenvalue and takes the next ones while they are within
    ``tau·√k`` of it, ``k`` the cluster's count with them (the rounding spreads an
    eigenvalue repeated ``k`` times over about ``√k`` times a pair's gap; no chain of
    close neighbours grows wider)."""
    runs, start = [], 0
    for index, value in enumerate(values):
        if value - values[start] > tau * math.sqrt(index - start + 1):
            if index - start > 1:
                runs.append((start, index))
            start = index
    if len(values) - start > 1:
        runs.append((start, len(values)))
    return runs


def _clusters(values: list[float], null: float, repeat: float) -> list[tuple[int, int]]:
    """The index ranges of ascending ``values`` to average: the eigenvalues at most
    ``null`` (a rank-deficient factor's null space, with its rounding), then runs of
    repeated ones (:func:`_capped_runs` with ``repeat``)."""
    count = sum(1 for value in values if value <= null)
    runs = [(0, count)] if count > 1 else []
    start = count if count > 1 else 0
    return runs + [(a + start, b + start) for a, b in _capped_runs(values[start:], repeat)]


def cluster_mean(
    matrix: Tensor, values: Tensor, vectors: Tensor, dim: int, dtype: torch.dtype
) -> Tensor:
    """``matrix`` with its entries along ``dim`` (``-1`` or ``-2``, one per eigenpair of
    ``values``, ascending, and ``vectors``, stacked ``[..., n]`` and ``[..., n, n]`` like
    ``matrix``'s leading dimensions) replaced by their mean over each cluster of
    eigenvalues that ``eigh`` in ``dtype`` cannot tell apart, whose basis it picks by the
    rounding: the null space of a rank-deficient factor (eigenvalues at most
    ``8ε‖λ‖₂``, its rounding), and eigenvalues repeated to ``2ε·max|λ|·√k`` elsewhere (a
    cluster of ``k`` spans at most that from its smallest; distinct eigenvalues that a
    float32 factor resolves stay apart). The mean is the diagonal of ``Q diag(·) Qᵀ`` for
    every pick. A decomposition whose eigenvectors are the standard basis (signed, in any
    order: an exactly diagonal factor, an embedding's token counts) is no pick and keeps
    its entries, as does every cluster of one eigenvalue (``matrix`` itself, not a copy,
    where nothing changes)."""
    n = values.shape[-1]
    flat, vectors = values.double().reshape(-1, n), vectors.reshape(-1, n, n)
    eps = torch.finfo(dtype).eps
    nulls = TOLERANCE * eps * torch.linalg.vector_norm(flat, dim=-1)
    repeats = 2 * eps * flat.abs().amax(dim=-1)
    if n < 2:
        return matrix
    close = (flat.diff(dim=-1) <= repeats[:, None]).any(dim=-1) | (flat[:, 1] <= nulls)
    if not bool(close.any()):
        return matrix
    standard = (vectors != 0).sum(dim=(-2, -1)) == n  # (a permutation's columns: no pick)
    picked = (close & ~standard).tolist()
    if not any(picked):
        return matrix
    out = matrix.clone()
    rows = out.reshape(-1, *out.shape[-2:])  # (a view of the clone)
    rows = rows if dim == -1 else rows.mT
    bounds = zip(flat.tolist(), nulls.tolist(), repeats.tolist(), picked, strict=True)
    for row, (v, null, repeat, p) in enumerate(bounds):
        for start, end in _clusters(v, null, repeat) if p else ():
            rows[row, :, start:end] = rows[row, :, start:end].mean(-1, keepdim=True)
    return out
