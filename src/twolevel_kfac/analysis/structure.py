"""The Fisher's layer × layer block structure: block norms, off-diagonal mass, and the share
of it a coarse space captures — from the dense Fisher, or without it.

Block norms ``‖F_ij‖_F`` (:func:`fisher_block_norms`), in order of preference:

* ``dense``: from the dense ``F`` when it was computed;
* ``gram`` (exact, no ``P × P`` matrix): with ``Ψ_i`` the ``N × P_i`` per-sample gradients of
  layer ``i`` over the ``N`` virtual samples of the statistics (``F = ΨᵀΨ/N``) and
  ``Γ_i = Ψ_iΨ_iᵀ`` their ``N × N`` Gram matrix,
  ``‖F_ij‖²_F = ‖Ψ_iᵀΨ_j‖²_F/N² = ⟨Γ_i, Γ_j⟩_F/N²`` and ``tr F = Σ_i tr Γ_i/N``; memory
  ``N·max P_i + L·N²`` numbers, used when that is at most ``max_numbers``;
* ``hutchinson`` (an estimate): ``‖F_ij‖²_F = E_z ‖F_ij z_j‖²`` for Rademacher ``z_j`` on layer
  ``j``; ``S`` probes per layer, one Fisher–vector product each (``F`` applied to ``z_j``
  embedded in layer ``j`` gives column ``j`` of every block), with the standard error of
  the mean; ``tr F = Σ_j E[z_jᵀF_jj z_j]`` from the same products.

:func:`captured_off_diagonal` is :func:`.metrics.captured_off_diagonal` for a coarse basis
whose vectors each live on one layer (the optimizer's bases): with ``U_i`` an orthonormal
basis of layer ``i``'s coarse vectors, ``Π = blockdiag(U_iU_iᵀ)`` and ``O = F − blockdiag(F)``,
``‖ΠOΠ‖²_F = Σ_{layer(k) ≠ layer(l)} (u_kᵀ F u_l)²`` — ``K`` Fisher–vector products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..curvature.blocks import LayerStats
from ..curvature.sample_products import per_sample_gradients
from . import metrics
from .products import statistics_mismatch

if TYPE_CHECKING:
    from .exact import Curvature

MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class BlockNorms:
    """``‖F_ij‖_F`` (``[L, L]``), ``tr F`` and how they were obtained.

    Attributes:
        norms: the block norms.
        trace: ``tr F``.
        method: ``dense`` | ``gram`` | ``hutchinson``.
        probes: Rademacher probes per layer (``hutchinson`` only).
        stderr: standard error of the estimated ``‖F_ij‖²_F`` (``hutchinson`` only).
    """

    norms: Tensor
    trace: float
    method: str
    probes: int = 0
    stderr: Tensor | None = None


def gram_numbers(stats: Sequence[LayerStats]) -> int:
    """The numbers held by :func:`gram_block_norms`: ``N·max P_i + L·N²``."""
    n = stats[0].num_samples
    largest = max(int(s.g.shape[-1]) * int(s.a.shape[-1]) for s in stats)
    return n * largest + len(stats) * n * n


def gram_block_norms(stats: Sequence[LayerStats]) -> tuple[Tensor, float]:
    """Exact ``‖F_ij‖_F`` and ``tr F`` from the per-layer Gram matrices (module docstring).

    Args:
        stats: the virtual-sample statistics of the Fisher (all layers, same ``N``).

    Returns:
        ``(norms [L, L], tr F)``.
    """
    grams = []
    for s in stats:
        psi = per_sample_gradients(s).flatten(1)
        grams.append(psi @ psi.T)
    n = grams[0].shape[0]
    flat = torch.stack(grams).flatten(1)
    squared = (flat @ flat.T).clamp_min(0.0) / n**2
    trace = sum(float(gram.trace()) for gram in grams) / n
    return squared.sqrt(), trace


def hutchinson_block_norms(
    fisher: MatVec, sizes: Sequence[int], probes: int, generator: torch.Generator
) -> BlockNorms:
    """Estimated ``‖F_ij‖_F`` and ``tr F`` from ``probes`` Rademacher probes per layer.

    Args:
        fisher: ``v ↦ F v`` on flat vectors.
        sizes: the layer block sizes ``P_i``.
        probes: ``S``, probes per layer (≥ 2 for a standard error).
        generator: the probes' random source.

    Returns:
        The :class:`BlockNorms` (``method="hutchinson"``).
    """
    bounds = [0, *torch.tensor(list(sizes)).cumsum(0).tolist()]
    total = bounds[-1]
    layers = len(sizes)
    samples = torch.zeros(probes, layers, layers, dtype=torch.float64)
    trace = 0.0
    for j in range(layers):
        lo, hi = bounds[j], bounds[j + 1]
        for s in range(probes):
            z = torch.zeros(total, dtype=torch.float64)
            signs = torch.randint(0, 2, (hi - lo,), generator=generator, dtype=torch.float64)
            z[lo:hi] = 2.0 * signs - 1.0
            y = fisher(z).to(torch.float64)
            for i in range(layers):
                samples[s, i, j] = y[bounds[i] : bounds[i + 1]].square().sum()
            trace += float(z[lo:hi] @ y[lo:hi]) / probes
    mean = samples.mean(0)
    stderr = samples.std(0) / math.sqrt(probes) if probes > 1 else torch.zeros_like(mean)
    return BlockNorms(mean.sqrt(), trace, "hutchinson", probes, stderr)


def fisher_block_norms(
    curvature: Curvature, *, probes: int = 32, max_numbers: int = 50_000_000, seed: int = 0
) -> BlockNorms:
    """The block norms of ``curvature`` (dense, else Gram, else Hutchinson; cached on it).

    Args:
        curvature: the batch's exact curvature.
        probes: Hutchinson probes per layer.
        max_numbers: the most numbers the exact Gram computation may hold.
        seed: seed of the Hutchinson probes.

    Returns:
        The :class:`BlockNorms`.
    """
    if curvature.block_norms is None:
        if curvature.fisher is not None:
            fisher = curvature.fisher
            norms = metrics.block_norms(fisher, curvature.sizes)
            curvature.block_norms = BlockNorms(norms, float(fisher.trace()), "dense")
        elif gram_numbers(curvature.stats) <= max_numbers:
            curvature.block_norms = BlockNorms(*gram_block_norms(curvature.stats), "gram")
        else:
            assert curvature.products is not None
            generator = torch.Generator().manual_seed(seed)
            curvature.block_norms = hutchinson_block_norms(
                curvature.products, curvature.sizes, probes, generator
            )
    return curvature.block_norms


def fisher_structure(
    curvature: Curvature, *, probes: int = 32, max_numbers: int = 50_000_000, seed: int = 0
) -> dict[str, Any]:
    """Block norms ``‖F_ij‖_F``, the off-diagonal mass share, ``tr F`` and consistency checks.

    ``statistics_vs_dense`` (with the dense ``F``) is ``max|F_stats − F_dense| / max|F_dense|``
    between the Gram matrix of the optimizer-format statistics and the torch.func Fisher;
    ``fvp_func_vs_stats`` the relative difference of the torch.func Fisher–vector product
    and the optimizer's on a random probe. Both ≈ 1e-16.

    Returns:
        A JSON-ready dictionary (``block_norms_method``: ``dense`` | ``gram`` |
        ``hutchinson``; ``block_norms_stderr`` for the estimate).
    """
    blocks = fisher_block_norms(curvature, probes=probes, max_numbers=max_numbers, seed=seed)
    out: dict[str, Any] = {
        "layers": list(curvature.names),
        "block_sizes": list(curvature.sizes),
        "block_norms": blocks.norms.tolist(),
        "block_norms_method": blocks.method,
        "off_diagonal_fraction": metrics.off_diagonal_share(blocks.norms),
        "trace": blocks.trace,
    }
    if blocks.stderr is not None:
        out["block_norms_probes"] = blocks.probes
        out["block_norms_squared_stderr"] = blocks.stderr.tolist()
    if curvature.fisher is not None:
        from .exact import fisher_from_statistics

        fisher = curvature.fisher
        scale = float(fisher.abs().max())
        diff = float((fisher_from_statistics(curvature.stats) - fisher).abs().max())
        out["statistics_vs_dense"] = diff / scale if scale else 0.0
    if curvature.products is not None:
        generator = torch.Generator().manual_seed(seed + 1)
        out["fvp_func_vs_stats"] = statistics_mismatch(
            curvature.products, curvature.stats, generator
        )
    return out


def layer_orthonormal_bases(basis: Sequence[Tensor]) -> list[Tensor]:
    """Per layer an orthonormal basis ``U_i`` (``[P_i, r_i]``) of the span of its coarse
    vectors (``[k_i, d_out, d_in']``), dropping singular values ``≤ 1e-10·σ_max`` (``σ_max``
    over all layers, as :func:`.metrics.captured_off_diagonal` does)."""
    svds = [torch.linalg.svd(b.reshape(b.shape[0], -1).T, full_matrices=False) for b in basis]
    top = max((float(sv.max()) for _, sv, _ in svds if sv.numel()), default=0.0)
    cut = max(top, 1e-300) * 1e-10
    return [u[:, sv > cut] for u, sv, _ in svds]


def captured_off_diagonal(fisher: MatVec, basis: Sequence[Tensor], off_mass: float) -> float:
    """``‖ΠOΠ‖²_F / ‖O‖²_F`` for a layer-supported coarse basis, matrix-free (module docstring).

    Args:
        fisher: ``v ↦ F v`` on flat vectors.
        basis: one ``[k_i, d_out_i, d_in'_i]`` tensor per layer.
        off_mass: ``‖O‖²_F = Σ_{i≠j} ‖F_ij‖²_F``.

    Returns:
        A number in ``[0, 1]`` (0 when ``off_mass = 0``).
    """
    if off_mass <= 0.0:
        return 0.0
    bases = layer_orthonormal_bases(basis)
    sizes = [int(b[0].numel()) for b in basis]
    columns, owner = [], []
    for i, u in enumerate(bases):
        before, after = sum(sizes[:i]), sum(sizes[i + 1 :])
        for col in u.T:
            columns.append(torch.cat([col.new_zeros(before), col, col.new_zeros(after)]))
            owner.append(i)
    if not columns:
        return 0.0
    u_all = torch.stack(columns)  # [r, P]
    coarse = u_all @ torch.stack([fisher(c) for c in columns]).T
    layer = torch.tensor(owner)
    cross = layer[:, None] != layer[None, :]
    return float(coarse[cross].square().sum()) / off_mass
