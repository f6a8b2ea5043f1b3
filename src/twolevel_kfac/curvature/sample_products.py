"""Products of a layer's per-sample gradients ``∇_W̄ ℓ_n = Σ_t δ_{n,t} ā_{n,t}ᵀ`` from its
captured statistics (:class:`~.blocks.LayerStats`), formed without the ``[N, d_out,
d_in']`` gradients wherever the optimizer uses them: the exact Fisher products of the
coarse level and of the analysis. A block type of its own
(:class:`~.blocks.BlockStats`) gives its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blocks import BlockStats, LayerStats

__all__ = [
    "per_sample_dots",
    "per_sample_dots_parts",
    "per_sample_gradients",
    "weighted_gradient_sum",
]


def per_sample_gradients(stats: LayerStats) -> Tensor:
    """``∇_W̄ ℓ_n = Σ_t δ_{n,t} ā_{n,t}ᵀ`` for every sample, shape ``[N, d_out, d_in']``.

    Materialises ``N·d_out·d_in'`` numbers: for tests and the analysis only, never in the
    optimizer's hot path.
    """
    if isinstance(stats, BlockStats):
        return stats.sample_gradients()
    return torch.einsum("nto,nti->noi", stats.g, stats.a)


def per_sample_dots(stats: LayerStats, vectors: Tensor) -> Tensor:
    """``⟨r_k, ∇_W̄ ℓ_n⟩ = Σ_t δ_{n,t}ᵀ r_k ā_{n,t}`` for ``vectors`` of shape
    ``[K, d_out, d_in']``, without forming per-sample gradients. Returns ``[N, K]``.

    One GEMM ``δ [r_1 … r_K]`` of shape ``[N·T, K·d_in']``, multiplied by ``ā`` in place
    and summed over ``(t, i)``: costs ``O(N·T·K·d_out·d_in')`` and memory
    ``O(N·T·K·d_in')`` (faster than the same contraction as two ``einsum`` calls).
    """
    if isinstance(stats, BlockStats):
        return stats.sample_dots(vectors)
    n, locations, d_out = stats.g.shape
    k, _, d_in = vectors.shape
    columns = vectors.transpose(0, 1).reshape(d_out, k * d_in)
    projected = (stats.g.reshape(n * locations, d_out) @ columns).view(n, locations, k, d_in)
    return projected.mul_(stats.a.unsqueeze(2)).sum((1, 3))


def weighted_gradient_sum(stats: LayerStats, weights: Tensor) -> Tensor:
    """``Σ_n w_n ∇_W̄ ℓ_n = Σ_{n,t} w_n δ_{n,t} ā_{n,t}ᵀ`` for ``weights`` of shape ``[N]``
    (or ``[N, K]``, giving ``[K, d_out, d_in']``), without per-sample gradients."""
    if isinstance(stats, BlockStats):
        return stats.weighted_sum(weights)
    if weights.dim() == 1:
        scaled = stats.g * weights[:, None, None]
        return scaled.flatten(0, 1).T @ stats.a.flatten(0, 1)
    # one GEMM per column: a δ-sized temporary at a time (an einsum of the three operands
    # forms an [N, K, T, d_out] intermediate and a copy of it)
    if weights.shape[1] == 0:
        return stats.g.new_zeros(0, stats.g.shape[-1], stats.a.shape[-1])
    return torch.stack([weighted_gradient_sum(stats, w) for w in weights.T])


def per_sample_dots_parts(stats: LayerStats, weight: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`per_sample_dots` of one vector ``W̄ = [V, b]`` given as its parts:
    ``⟨∇_W̄ ℓ_n, W̄⟩ = Σ_t δ_{n,t}ᵀ V a_{n,t} + δ_{n,t}ᵀ b`` (``a`` is ``ā`` without its
    homogeneous coordinate, read in place: no copy of the slice). Returns ``[N]``."""
    if isinstance(stats, BlockStats):
        joined = weight if bias is None else torch.cat([weight, bias.unsqueeze(1)], dim=1)
        return per_sample_dots(stats, joined.unsqueeze(0))[:, 0]
    a = stats.a[..., :-1] if bias is not None else stats.a
    dots = (stats.g @ weight).mul_(a).sum((1, 2))
    if bias is not None:
        dots += (stats.g @ bias).sum(1)
    return dots
