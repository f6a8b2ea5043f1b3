"""What a coarse level (:class:`~.coarse.CoarseLevel`) computes from the exact Fisher of its
kept Fisher mini-batch, on one process or summed over the ranks: ``N``, ``F_c``, ``F̂v``
and ``W₀ = FR₀ᵀ``, and which of the mini-batch's rows or ``W₀`` it keeps between refreshes
(``CoarseOptions.kept_fisher``, :mod:`twolevel_kfac.twolevel.fisher_columns`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..distributed import all_reduce_sum
from ..twolevel.coarse_matrix import basis_gram, coarse_projections, exact_coarse_matrix
from ..twolevel.fisher_columns import (
    FisherColumns,
    coarse_size,
    fisher_columns,
    gradient_sums,
    rows_size,
)
from ..twolevel.fisher_products import (
    DISAGREE_HINT,
    check_stats,
    damped_fvp,
    sample_coefficients_parts,
)
from ..twolevel.global_fisher import (
    global_coarse_matrix,
    global_damped_fvp,
    global_tselepidis_matrix,
)
from ..twolevel.parts import restrict_parts
from ..twolevel.tselepidis import tselepidis_coarse_matrix
from ..twolevel.vectors import LayerVector, Parts

if TYPE_CHECKING:
    from .coarse import CoarseLevel

__all__ = [
    "damped_product",
    "global_samples",
    "keeps_columns",
    "new_coarse_matrix",
    "new_columns",
    "restricted_residual",
    "shifted_coarse_matrix",
]


def global_samples(level: CoarseLevel) -> int:
    """``N`` of the Fisher mini-batch just stored (summed over the ranks).

    Raises:
        RuntimeError / ValueError: the layers disagree on it.
    """
    assert level.fisher_stats is not None
    if not level.host.comm.distributed:
        return check_stats(level.fisher_stats)
    sizes = {level.host.sample_counts[n] for n in level.names}
    if len(sizes) != 1:
        raise RuntimeError(
            f"layers disagree on the Fisher mini-batch size: {sorted(sizes)}" + DISAGREE_HINT
        )
    return sizes.pop()


def damped_product(level: CoarseLevel, v: LayerVector) -> LayerVector:
    """``F̂v = (F + λI)v`` with the exact Fisher of the kept Fisher mini-batch.

    Raises:
        RuntimeError: when no Fisher mini-batch is kept.
    """
    stats, n, comm = level.fisher_stats, level.fisher_samples, level.host.comm
    if stats is None or n is None:
        kept = (
            "only W₀ = FR₀ᵀ is kept (kept_fisher='rows' keeps the rows)"
            if level.fisher_columns is not None
            else f"with combination={level.options.combination!r} and the consistent refresh "
            "it is dropped once Q is built"
        )
        raise RuntimeError(
            "F̂v needs the Fisher mini-batch, and none is kept: before the first step, or "
            f"{kept}; CoarseOptions(diagnostics=True) keeps it"
        )
    if comm.distributed:
        return global_damped_fvp(comm, stats, v, level.host.damping, n)
    return damped_fvp(stats, v, level.host.damping)


def new_coarse_matrix(level: CoarseLevel, basis: list[Tensor]) -> Tensor:
    """``F_c`` of ``basis`` on the kept Fisher mini-batch (Tselepidis' Kronecker sums for
    ``coarse_space="tselepidis"``, the rows no step may move left out of its damping)."""
    stats, n, host = level.fisher_stats, level.fisher_samples, level.host
    assert stats is not None and n is not None
    if level.options.coarse_space == "tselepidis":
        numels = [
            s.numel() - len(host.fixed_rows.get(name, ())) * b.shape[-1]
            for s, name, b in zip(stats, level.names, basis, strict=True)
        ]
        if host.comm.distributed:
            return global_tselepidis_matrix(host.comm, stats, host.damping, n, numels)
        return tselepidis_coarse_matrix(stats, host.damping, numels)
    if host.comm.distributed:
        return global_coarse_matrix(host.comm, stats, basis, host.damping, n)
    return exact_coarse_matrix(stats, basis, host.damping)


def shifted_coarse_matrix(level: CoarseLevel, basis: list[Tensor]) -> Tensor | None:
    """``F_c`` at the current damping: ``F_c + (λ − λ_c)R₀R₀ᵀ`` for ``F_c`` formed at
    ``λ_c`` (``coarse_damping``; the damping term of the exact ``F_c`` and of Tselepidis'
    is ``λR₀R₀ᵀ``, ``R₀`` = ``basis``), or ``None`` when ``λ`` has not changed or no
    ``F_c`` is built."""
    damping, matrix, formed = level.host.damping, level.coarse_matrix, level.coarse_damping
    if matrix is None or formed is None or damping == formed:
        return None
    return matrix + (damping - formed) * basis_gram(basis).to(matrix)


def restricted_residual(level: CoarseLevel, g: Parts, minv_g: Parts) -> Tensor:
    """``R₀(g − F̂M⁻¹g) = R₀g − Pᵀc/N − λR₀M⁻¹g`` with ``P[n, k] = ⟨r_k, ∇ℓ_n⟩`` (kept
    from the refresh in ``level.projections``) and ``c_n = ⟨∇ℓ_n, M⁻¹g⟩``: A-DEF2 needs
    the residual only through ``R₀``, so the Fisher product's second half (the weighted sum
    of per-sample gradients, a full pass over the layers) is never done. With
    ``W₀ = FR₀ᵀ`` kept instead of the rows, ``Pᵀc/N = W₀ᵀM⁻¹g``. ``g``, ``M⁻¹g``: weight
    and bias parts."""
    operator, stats, samples = level.coarse_operator, level.fisher_stats, level.fisher_samples
    assert operator is not None
    split = operator.parts_basis(tuple(b is not None for _, b in g))
    if level.fisher_columns is not None:
        fisher = level.fisher_columns.restrict_parts(minv_g)
    else:
        assert stats is not None and samples is not None
        if level.projections is None or level.projections[0] is not operator:
            level.projections = (operator, coarse_projections(stats, operator.basis))
        coefficients = sample_coefficients_parts(stats, minv_g)
        fisher = level.projections[1].T @ coefficients / samples
    restricted = restrict_parts(split, g) - fisher
    return restricted.sub_(restrict_parts(split, minv_g), alpha=level.host.damping)


def new_columns(level: CoarseLevel, basis: list[Tensor]) -> FisherColumns:
    """``W₀ = FR₀ᵀ`` of ``basis`` on the kept Fisher mini-batch (every rank's rows; the
    damping is added where it is used)."""
    stats, n, host = level.fisher_stats, level.fisher_samples, level.host
    assert stats is not None and n is not None
    sums = gradient_sums(stats, coarse_projections(stats, basis))
    if host.comm.distributed:
        sums = all_reduce_sum(host.comm, sums)
    return fisher_columns(sums, basis, n)


def keeps_columns(level: CoarseLevel, basis: list[Tensor]) -> bool:
    """Whether the level trades its rows for ``W₀ = FR₀ᵀ`` after a refresh.

    ``W₀`` holds ``K·P`` numbers, the same on every rank; the steps between refreshes
    must read ``F̂`` only through it (:attr:`~.coarse.CoarseLevel.columns_suffice`). Then
    ``kept_fisher="columns"`` keeps it, and ``"auto"`` where

    * ``K·P`` is smaller than a rank's share of the rows (all ranks' sizes summed: one
      tiny collective, so every rank decides alike even when their ``T`` differ), and
    * under ``torch.distributed``, building ``W₀`` (one all-reduce of ``K·P`` numbers per
      refresh) sends no more than the rows' products would until the next refresh
      (``P`` numbers per ``F̂`` product: one per step, two for balanced).
    """
    options, host = level.options, level.host
    if options.kept_fisher == "rows" or not level.columns_suffice:
        return False
    if options.kept_fisher == "columns":
        return True
    assert level.fisher_stats is not None
    rows = float(rows_size(level.fisher_stats))
    world = host.comm.world_size
    if host.comm.distributed:
        device = level.fisher_stats[0].g.device
        count = torch.tensor([rows], dtype=torch.float64, device=device)
        (total,) = all_reduce_sum(host.comm, [count])
        rows = float(total) / world
        products = (2 if options.combination == "balanced" else 1) * (host.options.cov_interval - 1)
        if sum(int(b.shape[0]) for b in basis) > products:
            return False
    return coarse_size(basis) < rows
