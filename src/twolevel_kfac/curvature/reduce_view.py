"""KFAC-reduce's view of a block's statistics (``weight_sharing="reduce"``, Eschenhagen et
al. 2023): one row per sample, the **mean input** and the **summed output gradient**
over its ``T`` locations.

    ā_n = (1/T_n) Σ_t ā_nt,    δ_n = Σ_t δ_nt,    A = E_n[ā_n ā_nᵀ],  G = E_n[δ_n δ_nᵀ],

no division by ``T`` (``T_n``: the positions of sample ``n`` that reach the loss,
:mod:`.live_positions`; for ``T = 1`` the statistics themselves). Only the factors are
built from it: the exact Fisher products (coarse level, EKFAC) keep every location.

Which side holds the inputs depends on the layer. A ``Linear`` or a convolution keeps
them in ``a``. An embedding table ``[V, D]`` is a ``Linear`` on one-hot tokens in the
table's orientation (:mod:`.layer_types`, ``rows_from_inputs``): its tokens are ``g`` and
its output gradients ``a``, so the tokens are averaged and the output gradients summed
(before 2026-12-08 the sides were taken as for a ``Linear``: the tokens summed, the
gradients averaged, 0.12–0.71 off the step of the same model written as a ``Linear`` on
one-hot tokens, silently). A table tied to a ``Linear`` head mixes both orientations in
one block (the head's inputs in ``a``, the table's in ``g``): no mean-input view exists
for it, and it keeps the expand view (:func:`mixed_blocks`, warned of once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from .blocks import BlockStats, LayerStats
from .layer_types import layer_type

__all__ = ["mixed_blocks", "position_mean", "reduce_locations", "reduce_view"]


def position_mean(x: Tensor, dead: Tensor | None) -> Tensor:
    """``x̄_n = (1/T_n) Σ_t x_nt`` (``[N, 1, d]``) over the ``T_n`` positions of sample
    ``n`` that are not ``dead`` (all ``T`` for a sample whose every position is)."""
    if dead is None:
        return x.mean(dim=1, keepdim=True)
    keep = ~dead.unsqueeze(-1)  # [N, T, 1]
    keep = keep | ~keep.any(dim=1, keepdim=True)
    weights = keep.to(x.dtype)
    return (x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)


def position_sum(x: Tensor, dead: Tensor | None) -> Tensor:
    """``Σ_t x_nt`` (``[N, 1, d]``) over the positions that are not ``dead``."""
    kept = x if dead is None else x.masked_fill(dead.unsqueeze(-1), 0)
    return kept.sum(dim=1, keepdim=True)


def reduce_locations(stats: LayerStats, inputs_in_g: bool = False) -> LayerStats:
    """The reduce view of ``stats`` (module docstring): ``a`` averaged and ``g`` summed
    per sample, or the other way round where ``g`` holds the inputs (``inputs_in_g``: an
    embedding table). A block type of its own forms its view itself
    (:meth:`.BlockStats.reduced`)."""
    if isinstance(stats, BlockStats):
        return stats.reduced()
    if stats.num_locations == 1:
        return stats
    if inputs_in_g:
        return LayerStats(position_sum(stats.a, stats.dead), position_mean(stats.g, stats.dead))
    return LayerStats(position_mean(stats.a, stats.dead), position_sum(stats.g, stats.dead))


def _tables(modules: Sequence[nn.Module]) -> list[bool]:
    """For each module of a block, whether it is a table (its inputs index the rows)."""
    return [bool(getattr(layer_type(m), "rows_from_inputs", False)) for m in modules]


def mixed_blocks(uses: Mapping[str, Sequence[nn.Module]]) -> list[str]:
    """The blocks computed both by a table and by a module of the other orientation (a
    table tied to a ``Linear`` head): they keep the expand view under ``reduce``."""
    return [name for name, modules in uses.items() if len(set(_tables(modules))) > 1]


def reduce_view(
    uses: Mapping[str, Sequence[nn.Module]],
) -> Callable[[str, LayerStats], LayerStats]:
    """``view(name, stats)``: the reduce view of layer ``name``'s statistics, given the
    modules computing with each block's weight (``uses``): the tokens averaged for a
    table, the inputs for the rest, the statistics as they are for :func:`mixed_blocks`."""
    mixed = set(mixed_blocks(uses))
    tables = {name for name, modules in uses.items() if all(_tables(modules)) and modules}

    def view(name: str, stats: LayerStats) -> LayerStats:
        if name in mixed:
            return stats
        return reduce_locations(stats, inputs_in_g=name in tables)

    return view
