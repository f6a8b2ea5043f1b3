"""The exact Fisher of the *global* Fisher mini-batch under ``torch.distributed``.

Each rank keeps its own rows ``(ā, δ)`` of the Fisher mini-batch; the coarse level of
:class:`~twolevel_kfac.optim.twolevel.TwoLevelPreconditioner` needs products with the
Fisher of all ranks' rows together, ``F = (1/n) Σ_ranks Σ_rows ∇ℓ ∇ℓᵀ``. Every product is
a sum of per-sample terms, so each rank forms its own sums and one
:func:`~twolevel_kfac.distributed.all_reduce_sum` adds them (symmetric matrices travel as
their packed upper triangles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..curvature.blocks import LayerStats
from ..curvature.sample_products import weighted_gradient_sum
from ..distributed import (
    Communicator,
    all_reduce_sum,
    pack_symmetric,
    unpack_symmetric,
)
from .coarse_matrix import basis_gram, coarse_projections
from .fisher_products import sample_coefficients
from .layer_basis import LayerBasis
from .tselepidis import tselepidis_from_sums, tselepidis_sums
from .vectors import LayerVector

__all__ = ["global_coarse_matrix", "global_damped_fvp", "global_tselepidis_matrix"]


def global_damped_fvp(
    comm: Communicator, stats: Sequence[LayerStats], v: LayerVector, damping: float, n: int
) -> LayerVector:
    """``(F + λI)v`` with the exact Fisher of the global Fisher mini-batch of ``n`` samples."""
    coeffs = sample_coefficients(stats, v)
    sums = all_reduce_sum(comm, [weighted_gradient_sum(s, coeffs) for s in stats])
    return [s.div_(n).add_(vi, alpha=damping) for s, vi in zip(sums, v, strict=True)]


def global_coarse_matrix(
    comm: Communicator,
    stats: Sequence[LayerStats],
    basis: Sequence[LayerBasis],
    damping: float,
    n: int,
) -> Tensor:
    """``F_c = (1/n) Σ_r P_rᵀP_r + λR₀R₀ᵀ`` (``exact_coarse_matrix`` of the
    global Fisher mini-batch)."""
    p = coarse_projections(stats, basis)
    (packed,) = all_reduce_sum(comm, [pack_symmetric(p.T @ p)])
    fc = unpack_symmetric(packed, p.shape[1]) / n
    return fc + damping * basis_gram(basis) if damping != 0.0 else fc


def global_tselepidis_matrix(
    comm: Communicator,
    stats: Sequence[LayerStats],
    damping: float,
    n: int,
    numels: Sequence[int] | None = None,
) -> Tensor:
    """``tselepidis_coarse_matrix`` of the global Fisher mini-batch (``sum(A_ss')`` and
    ``sum(G_ss')`` over the sub-blocks are sums over samples: reduced separately, then
    multiplied). The ranks' locations are reduced with them: ranks whose layers have other
    numbers of locations (sequences padded to other lengths) would resample differently and
    build different matrices (the replicas drifted apart: steps 0.11 off on 2.39).

    Raises:
        RuntimeError: on every rank, when their numbers of locations differ.
    """
    sum_a, sum_g, locations, owner = tselepidis_sums(stats)
    num = len(owner)
    packed_a, packed_g, total = all_reduce_sum(
        comm, [pack_symmetric(sum_a), pack_symmetric(sum_g), locations.diagonal().clone()]
    )
    if not torch.equal(total, comm.world_size * locations.diagonal()):
        raise RuntimeError(
            "coarse_space='tselepidis' under torch.distributed needs the same number of "
            "locations per layer on every rank (the ranks' sequences were padded to "
            "different lengths, or their images have other sizes): pad every rank's batch "
            "to one length, or use another coarse space"
        )
    return tselepidis_from_sums(
        unpack_symmetric(packed_a, num),
        unpack_symmetric(packed_g, num),
        locations,
        owner,
        n,
        stats,
        damping,
        numels,
    )


def own_statistics(
    per_rank: list[list[LayerStats]] | None, rank: int, world_size: int
) -> list[LayerStats] | None:
    """This rank's Fisher mini-batch rows from the saved ones of every rank (re-split
    contiguously when the world size changed)."""
    if per_rank is None:
        return None
    if len(per_rank) == world_size:
        return per_rank[rank]
    return split_statistics(per_rank, rank, world_size)


def split_statistics(
    per_rank: Sequence[Sequence[LayerStats]], rank: int, world_size: int
) -> list[LayerStats]:
    """Rank ``rank``'s contiguous share of the union of every saved rank's statistics."""
    out = []
    for layer in zip(*per_rank, strict=True):
        a = torch.cat([s.a for s in layer]).tensor_split(world_size)[rank]
        g = torch.cat([s.g for s in layer]).tensor_split(world_size)[rank]
        out.append(replace(layer[0], a=a, g=g))  # the statistics' own type
    return out
