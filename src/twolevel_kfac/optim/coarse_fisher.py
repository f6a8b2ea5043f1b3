"""What a coarse level (:class:`~.coarse.CoarseLevel`) computes from the exact Fisher of its
kept Fisher mini-batch, on one process or summed over the ranks: ``N``, ``F_c``, ``F̂v``
and ``W = F̂R₀ᵀ``, and which of the mini-batch's rows or ``W`` it keeps between refreshes
(``CoarseOptions.kept_fisher``, :mod:`twolevel_kfac.twolevel.fisher_columns`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..distributed import all_reduce_sum
from ..twolevel.coarse_matrix import coarse_projections, exact_coarse_matrix
from ..twolevel.fisher_columns import (
    FisherColumns,
    columns_are_smaller,
    fisher_columns,
    gradient_sums,
)
from ..twolevel.fisher_products import DISAGREE_HINT, check_stats, damped_fvp
from ..twolevel.global_fisher import (
    global_coarse_matrix,
    global_damped_fvp,
    global_tselepidis_matrix,
)
from ..twolevel.tselepidis import tselepidis_coarse_matrix
from ..twolevel.vectors import LayerVector

if TYPE_CHECKING:
    from .coarse import CoarseLevel

__all__ = ["damped_product", "global_samples", "keeps_columns", "new_coarse_matrix", "new_columns"]


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
            "only F̂R₀ᵀ is kept (kept_fisher='rows' keeps the rows)"
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
    """Whether the level keeps ``W`` instead of the rows after a refresh: its steps between
    refreshes read ``F̂`` only through ``W`` (A-DEF1, A-DEF2 or balanced with a basis fixed
    until the next refresh, no diagnostics), and ``kept_fisher`` says ``columns``, or
    ``auto`` and ``W`` is the smaller."""
    options = level.options
    if options.kept_fisher == "rows" or not level.columns_suffice:
        return False
    if options.kept_fisher == "columns":
        return True
    assert level.fisher_stats is not None and level.fisher_samples is not None
    world = level.host.comm.world_size
    return columns_are_smaller(level.fisher_stats, basis, level.fisher_samples, world)
