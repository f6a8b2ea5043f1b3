"""What a coarse level (:class:`~.coarse.CoarseLevel`) computes from the exact Fisher of its
kept Fisher mini-batch, on one process or summed over the ranks: ``N``, ``F_c``, ``F̂v``
and ``W₀ = FR₀ᵀ``, and which of the mini-batch's rows or ``W₀`` it keeps between refreshes
(``CoarseOptions.kept_fisher``, :mod:`twolevel_kfac.twolevel.fisher_columns`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..curvature.sample_products import weighted_gradient_sum
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
    check_stats,
    damped_fvp,
    sample_coefficients_parts,
    shared_size,
)
from ..twolevel.global_fisher import (
    global_coarse_matrix,
    global_damped_fvp,
    global_tselepidis_matrix,
)
from ..twolevel.layer_basis import CoarseBasis, layer_count, layer_width
from ..twolevel.tselepidis import tselepidis_coarse_matrix
from ..twolevel.vectors import LayerVector, Parts
from .coarse_absorb import absorbed_coarse_matrix

if TYPE_CHECKING:
    from .coarse import CoarseLevel

__all__ = [
    "columns_from_rows",
    "damped_product",
    "fisher_product_parts",
    "global_samples",
    "keeps_columns",
    "new_coarse_matrix",
    "new_columns",
    "shifted_coarse_matrix",
]


def global_samples(level: CoarseLevel) -> int:
    """``N`` of the Fisher mini-batch just stored (summed over the ranks).

    Raises:
        RuntimeError / ValueError: the layers disagree on it.
    """
    assert level.fisher_stats is not None
    if not level.host.comm.distributed:
        stats = level.fisher_stats
        shared_size({n: s.num_samples for n, s in zip(level.names, stats, strict=True)})
        return check_stats(stats)
    return shared_size({n: level.host.sample_counts[n] for n in level.names})


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
            "F̂v needs the Fisher mini-batch, and none is kept: before the first step, after "
            "a refresh step that raised (run a new forward and backward before step()), at "
            "a refresh step whose batch was empty on every rank, or "
            f"{kept}; CoarseOptions(diagnostics=True) keeps it"
        )
    if comm.distributed:
        return global_damped_fvp(comm, stats, v, level.host.damping, n)
    return damped_fvp(stats, v, level.host.damping)


def fisher_product_parts(level: CoarseLevel, v: Parts) -> LayerVector:
    """``Fv`` (undamped) of a vector given as weight and bias parts, as ``W̄`` matrices in
    fresh tensors: ``Σ_n c_n ∇ℓ_n / N`` with ``c_n = ⟨∇ℓ_n, v⟩`` from the kept rows (every
    rank's sums, all-reduced, under ``torch.distributed``)."""
    stats, n, comm = level.fisher_stats, level.fisher_samples, level.host.comm
    assert stats is not None and n is not None
    coefficients = sample_coefficients_parts(stats, v)
    if comm.distributed:
        sums = all_reduce_sum(comm, [weighted_gradient_sum(s, coefficients) for s in stats])
        return [total.div_(n) for total in sums]
    weights = coefficients / n
    return [weighted_gradient_sum(s, weights) for s in stats]


def new_coarse_matrix(level: CoarseLevel, basis: CoarseBasis) -> Tensor:
    """``F_c`` of ``basis`` on the kept Fisher mini-batch, or on the columns of ``P = JR₀ᵀ``
    taken as it was folded (:mod:`.coarse_absorb`; Tselepidis' Kronecker sums for
    ``coarse_space="tselepidis"``, the rows no step may move left out of its damping)."""
    stats, n, host = level.fisher_stats, level.fisher_samples, level.host
    if level.absorbed is not None:  # the columns of P taken as the statistics were folded
        return absorbed_coarse_matrix(level.absorbed, basis, host.damping)
    if stats is None or n is None:
        raise RuntimeError(
            "the coarse level has no F_c and no Fisher mini-batch to form it from: a step "
            "was interrupted before its refresh completed; resume from a state saved "
            "after a completed step"
        )
    if level.options.coarse_space == "tselepidis":
        numels = [
            s.numel() - len(host.fixed_rows.get(name, ())) * layer_width(b)
            for s, name, b in zip(stats, level.names, basis, strict=True)
        ]
        if host.comm.distributed:
            return global_tselepidis_matrix(host.comm, stats, host.damping, n, numels)
        return tselepidis_coarse_matrix(stats, host.damping, numels)
    if host.comm.distributed:
        return global_coarse_matrix(host.comm, stats, basis, host.damping, n)
    return exact_coarse_matrix(stats, basis, host.damping)


def shifted_coarse_matrix(level: CoarseLevel, basis: CoarseBasis) -> Tensor | None:
    """``F_c`` at the current damping: ``F_c + (λ − λ_c)R₀R₀ᵀ`` for ``F_c`` formed at
    ``λ_c`` (``coarse_damping``; the damping term of the exact ``F_c`` and of Tselepidis'
    is ``λR₀R₀ᵀ``, ``R₀`` = ``basis``), or ``None`` when ``λ`` has not changed or no
    ``F_c`` is built."""
    damping, matrix, formed = level.host.damping, level.coarse_matrix, level.coarse_damping
    if matrix is None or formed is None or damping == formed:
        return None
    return matrix + (damping - formed) * basis_gram(basis).to(matrix)


def new_columns(level: CoarseLevel, basis: CoarseBasis) -> FisherColumns:
    """``W₀ = FR₀ᵀ`` of ``basis`` on the kept Fisher mini-batch (every rank's rows; the
    damping is added where it is used)."""
    stats, n, host = level.fisher_stats, level.fisher_samples, level.host
    assert stats is not None and n is not None
    sums = gradient_sums(stats, coarse_projections(stats, basis))
    if host.comm.distributed:
        sums = all_reduce_sum(host.comm, sums)
    return fisher_columns(sums, basis, n)


def keeps_columns(level: CoarseLevel, basis: CoarseBasis) -> bool:
    """Whether the level trades its rows for ``W₀ = FR₀ᵀ`` after a refresh.

    ``W₀`` holds ``K·P`` numbers, the same on every rank; the steps between refreshes
    must read ``F̂`` only through it (:attr:`~.coarse.CoarseLevel.columns_suffice`). Then
    ``kept_fisher="columns"`` keeps it, and ``"auto"`` where

    * ``K·P`` is smaller than a rank's share of the rows (all ranks' sizes summed: one
      tiny collective, so every rank decides alike even when their ``T`` differ),
    * building it (``K`` passes over the rows, like ``K`` weight gradients) costs no more
      than the rows' ``F̂`` products until the next refresh (one pass per product: one
      per step, two for balanced), or ``K·P`` is at most a quarter of the rows (memory
      decides: a convolution's rows are per location). A GPT-like net (``K = 13`` at
      ``cov_interval = 10``, ``W₀`` 0.97× the rows) took 1.47× KFAC's step with ``W₀``,
      most of it that build at the first step after each refresh; and
    * under ``torch.distributed``, building ``W₀`` (one all-reduce of ``K·P`` numbers per
      refresh) sends no more than the rows' products would until the next refresh
      (``P`` numbers per ``F̂`` product).
    """
    options, host = level.options, level.host
    if options.kept_fisher == "rows" or not level.columns_suffice:
        return False
    if options.kept_fisher == "columns":
        return True
    assert level.fisher_stats is not None
    rows = float(rows_size(level.fisher_stats))
    columns = sum(layer_count(b) for b in basis)  # K
    products = (2 if options.combination == "balanced" else 1) * (host.options.cov_interval - 1)
    if host.comm.distributed:
        device = level.fisher_stats[0].g.device
        count = torch.tensor([rows], dtype=torch.float64, device=device)
        (total,) = all_reduce_sum(host.comm, [count])
        rows = float(total) / host.comm.world_size
        if columns > products:
            return False
    size = coarse_size(basis)
    return size < rows and (columns <= products or 4 * size <= rows)


def columns_from_rows(level: CoarseLevel) -> None:
    """On the first step after a refresh, trade the kept rows for ``W₀ = FR₀ᵀ`` where
    :func:`keeps_columns` says so (once per refresh; never with
    ``cov_interval=1``, where no step reads it)."""
    rows, operator = level.fisher_stats, level.coarse_operator
    if rows is None or operator is None or level.fisher_columns is not None:
        return
    if level._rows_chosen or not level.columns_suffice:
        return
    if keeps_columns(level, operator.basis):
        level.fisher_columns, level.fisher_stats = new_columns(level, operator.basis), None
    else:
        level._rows_chosen = True
