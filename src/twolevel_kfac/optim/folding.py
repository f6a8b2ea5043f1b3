"""Folding a step's statistics into the running factors (Martens & Grosse 2015 §5:
``A ← ρA + (1 − ρ) E[āāᵀ]``, ``G`` alike, :mod:`~twolevel_kfac.curvature.running_average`).

One layer at a time: its batch factors are formed when its turn comes and dropped once
folded, never every layer's beside the running factors. Where nothing reads the Fisher
mini-batch's statistics after they are folded (:func:`keeps_statistics`: KFAC alone, in
one process), the statistics themselves are formed one layer at a time too
(:class:`~twolevel_kfac.curvature.captured_batch.CapturedBatch`) and dropped once folded: a
convolution's unfolded rows are the largest tensors of a step (a ResNet-18 of width 16 on
CIFAR-shaped batches of 64: 300 MiB for all layers, 40 MiB for the largest). Under
``torch.distributed`` the ranks' factor sums travel together
(:func:`~twolevel_kfac.distributed.reduce_statistics`).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from torch import Tensor

from ..curvature import layer_types
from ..curvature.blocks import LayerStats, kronecker_factors_as
from ..curvature.captured_batch import CapturedBatch
from ..curvature.live_positions import position_wise
from ..curvature.reduce_view import mixed_blocks, reduce_view
from ..curvature.token_form import keeps_frequencies
from ..distributed import gradient_checksum, layer_specs, reduce_statistics, step_totals
from ..finite import all_finite
from ..warning_level import caller_level
from .coarse_absorb import absorbs_statistics
from .interrupted import partial_step

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

__all__ = ["fold_statistics", "keeps_statistics"]

# the preconditioners that have warned of a changed number of locations
_WARNED_LOCATIONS: weakref.WeakSet[KFACPreconditioner] = weakref.WeakSet()
# those that have warned of a tied table keeping the expand view under weight_sharing="reduce"
_WARNED_MIXED: weakref.WeakSet[KFACPreconditioner] = weakref.WeakSet()


def _reduce_view(pre: KFACPreconditioner) -> Callable[[str, LayerStats], LayerStats]:
    """:func:`.reduce_view` of ``pre``'s blocks; a table tied to a ``Linear`` head, and
    one over ``EMBEDDING_MAX_ROWS`` rows (:mod:`~twolevel_kfac.curvature.tokens`), keep the
    expand view, warned of once per preconditioner (the large tables silently before
    2026-12-09)."""
    mixed = mixed_blocks(pre.uses)
    large = [name for name, m in pre.layers.items() if keeps_frequencies(m)]
    if (mixed or large) and pre not in _WARNED_MIXED:
        _WARNED_MIXED.add(pre)
        why = [
            f"{', '.join(map(repr, mixed))}: an embedding table tied to a Linear head, whose "
            "calls hold their inputs on opposite sides of the block" * bool(mixed),
            f"{', '.join(map(repr, large))}: an embedding table of more than "
            f"{layer_types.EMBEDDING_MAX_ROWS} rows, whose token factor is kept as its "
            "diagonal (the reduce view's per-sample token counts have a dense one)" * bool(large),
        ]
        warnings.warn(
            f"weight_sharing='reduce': {'; '.join(w for w in why if w)}: "
            f"{'they keep' if len(mixed) + len(large) > 1 else 'it keeps'} the expand view "
            "(every position a sample, direction ÷ T)",
            RuntimeWarning,
            stacklevel=caller_level(),
        )
    return reduce_view(pre.uses)


def keeps_statistics(pre: KFACPreconditioner) -> bool:
    """Whether something reads a step's statistics after they are folded: a coarse level
    (its Fisher products), a fine level other than KFAC's (EKFAC's scalings), exact Fisher
    products of adaptive damping (``retain_statistics``), or the other ranks."""
    coarse = pre.coarse_level
    coarse_keeps_none = coarse is None or absorbs_statistics(coarse)
    plain = pre.fine.plain and coarse_keeps_none and not pre.retain_statistics
    return not plain or pre.comm.distributed


def fold_statistics(
    pre: KFACPreconditioner,
    layers: Iterable[tuple[str, LayerStats]],
    keep: bool = True,
    consume: Callable[[str, LayerStats], None] | None = None,
) -> dict[str, LayerStats]:
    """Fold each layer's statistics into ``pre``'s running factors (a NaN/Inf batch never
    reaches them: counted in ``last_stats["nonfinite_factor_updates"]``).

    Args:
        pre: the preconditioner.
        layers: ``(name, statistics)`` of this step's Fisher mini-batch, in layer order;
            read once, so a lazy source forms each layer's only when it is folded.
        keep: whether to return the statistics (``False``: each is dropped once folded).
        consume: called with each layer's name and statistics once they are folded (a
            coarse level's products: :func:`.coarse_absorb.absorber`).

    Returns:
        The statistics kept (``{}`` when not ``keep``). Under ``torch.distributed`` (which
        keeps them) the factors are those of every rank's statistics together, and the
        result has this rank's statistics of every layer some rank saw (empty where this
        one saw none); ``pre.sample_counts`` holds the global sample counts.
    """
    view = _reduce_view(pre) if pre.options.weight_sharing == "reduce" else None
    new: Iterable[tuple[str, LayerStats, tuple[Tensor, Tensor, float]]]
    kept: dict[str, LayerStats] = {}
    if pre.comm.distributed:
        total = batch = 0  # this rank's samples and batch rows of the step
        specs = layer_specs(pre.layers, pre.factor_dtype)
        if isinstance(layers, CapturedBatch):  # each layer's δ scaled to every rank's step
            rows, samples = step_totals(pre.comm, layers.rows, layers.samples, specs)
            layers.spread_over(rows, samples)
            total, batch = layers.samples, layers.batch
        check = gradient_checksum(pre.layers)  # (the ranks' gradients: one, DDP's)
        reduced = reduce_statistics(pre.comm, dict(layers), specs, view, total, batch, check)
        kept, pre.sample_counts = reduced.stats, reduced.samples
        new = ((n, kept[n], f) for n, f in reduced.factors.items())
    else:
        new = (
            (n, s, kronecker_factors_as(view(n, s) if view else s, pre.factor_dtype(n)))
            for n, s in layers
        )
    skipped: list[str] = []
    for name, stats, (new_a, new_g, locations) in new:
        _check_locations(pre, name, locations)
        finite = all_finite((new_a, new_g))
        pre.interrupted = pre.interrupted or partial_step(pre, folds=True)  # until the step ends
        if locations == 0:  # every position dead (no loss term): nothing to fold
            if not pre.factors[name].ready:  # (nor kept: a refresh leaves out a layer
                continue  # without a block yet; 2026-12-12: it raised at the first step)
        elif not (finite and pre.fine.store(name, new_a, new_g, locations, stats)):
            skipped.append(name)
        del new_a, new_g  # folded: not held beside what ``consume`` forms
        if keep and not pre.comm.distributed:
            kept[name] = stats
        if consume is not None:
            consume(name, stats)
    pre.last_stats["nonfinite_factor_updates"] = float(len(skipped))
    if skipped:
        _warn_skipped(skipped)
    return kept


def _check_locations(pre: KFACPreconditioner, name: str, locations: float) -> None:
    """Warn (once per preconditioner) where a layer's number of locations ``T`` moved since
    its last capture while steps between captures reuse it: the inverse is divided by the
    last capture's ``T``, so a step on inputs of another size is scaled by their ratio. By
    more than 10 % for a convolution's output positions (multi-scale training); for the
    positions of a ``Linear`` or an embedding (a sequence's real positions, ``T = M/N``:
    batches padded to their longest sequence or of one sequence vary by tens of percent
    from batch to batch, as the tokens the gradient sums do) by more than half, since
    2026-12-06 (late): a warning at every padded language model before, whose advice,
    ``weight_sharing="reduce"``, is not the choice for a loss with a term per position.
    Between the two, the steps between captures are scaled by up to 1.5× unsaid."""
    factors = pre.factors.get(name)
    if factors is None or not factors.ready or pre.options.cov_interval == 1 or not locations:
        return
    previous = float(getattr(factors, "num_locations", locations))
    positions = position_wise(pre.layers[name])  # (a Linear's or a table's: not a conv's)
    bound = 0.5 if positions else 0.1
    if abs(locations - previous) <= bound * previous or pre in _WARNED_LOCATIONS:
        return
    _WARNED_LOCATIONS.add(pre)
    fix = "" if positions else ", or weight_sharing='reduce' (no division by T),"
    warnings.warn(
        f"layer {name!r}: its number of locations T (a convolution's output positions, a "
        f"sequence's real positions) changed between two captures ({previous:g} → "
        f"{locations:g}). The steps between captures (cov_interval="
        f"{pre.options.cov_interval}) divide its inverse by the last capture's T, so inputs "
        "whose size changes from step to step (multi-scale training, batches padded to "
        "their longest sequence) take steps scaled by the ratio of the two T; "
        f"cov_interval=1{fix} avoids it",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def _warn_skipped(names: list[str]) -> None:
    """Say that layers' factor updates were dropped for non-finite statistics while the
    step itself went on (its gradients were finite): their factors keep their last values."""
    warnings.warn(
        f"the curvature statistics of layer(s) {names} were not finite, while the gradients "
        "were: their factor updates were skipped and their factors keep their last values "
        "(counted in last_stats['nonfinite_factor_updates']). An activation or output "
        "gradient overflowing a half-precision dtype is the usual cause",
        RuntimeWarning,
        stacklevel=caller_level(),
    )
