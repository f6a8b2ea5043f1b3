"""Step 2 of :mod:`twolevel_kfac.distributed`: the factors of the union of every rank's
statistics (Kronecker factors, and the factors of the block types of their own)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..curvature.blocks import (
    LayerStats,
    block_parameters,
    kronecker_factors,
    layer_shape,
    layer_stats,
    own_statistics,
)
from ..curvature.live_positions import kept_locations, live_grams
from ..warning_level import caller_level
from .communicator import Communicator, all_reduce_sum, pack_symmetric, unpack_symmetric


# ----------------------------------------------------------------------- factors
@dataclass(frozen=True)
class LayerSpec:
    """What every rank knows of a layer: factor sizes, factor and statistics dtypes."""

    dim_a: int
    dim_g: int
    dtype: torch.dtype
    stats_dtype: torch.dtype
    device: torch.device
    # a block type of its own: its statistics from (a, g), and BlockStats.shapes
    own: Callable[[Tensor, Tensor], LayerStats] | None = None
    shapes: tuple[tuple[int, ...], ...] = ()
    exact_inputs: bool = False  # ``ā`` holds ids kept in float64 (a large embedding table)
    pooled: bool = False  # a block type whose count is its rows kept (dead positions left out)


def layer_specs(
    layers: Mapping[str, nn.Module], factor_dtype: Callable[[str], torch.dtype]
) -> dict[str, LayerSpec]:
    """What every rank knows of each layer's block (:class:`LayerSpec`)."""
    specs = {}
    for name, module in layers.items():
        weight, (d_out, d_in) = block_parameters(module)[0], layer_shape(module)
        own = own_statistics(module)
        specs[name] = LayerSpec(
            d_in,
            d_out,
            factor_dtype(name),
            weight.dtype,
            weight.device,
            None if own is None else functools.partial(layer_stats, module),
            () if own is None else own.shapes(module),
            own is not None and own.exact_inputs,
            own is not None and own.dead_rows,
        )
    return specs


@dataclass
class ReducedStatistics:
    """The global result of :func:`reduce_statistics`, for the layers some rank saw.

    Attributes:
        factors: ``(A, G, T)`` of the global Fisher mini-batch per layer.
        stats: this rank's statistics of those layers (empty where it saw no sample).
        samples: the global Fisher mini-batch size ``N = Σ_r N_r`` per layer.
    """

    factors: dict[str, tuple[Tensor, Tensor, float]]
    stats: dict[str, LayerStats]
    samples: dict[str, int]


def reduce_statistics(
    comm: Communicator,
    stats: Mapping[str, LayerStats],
    specs: Mapping[str, LayerSpec],
    factor_view: Callable[[str, LayerStats], LayerStats] | None = None,
    samples: int = 0,
    batch: int = 0,
    checksum: int = 0,
) -> ReducedStatistics:
    """Kronecker factors of the union of every rank's statistics (step 2 of the module doc),
    formed from ``factor_view(name, stats)`` of them (``weight_sharing="reduce"``); every
    rank calls it with the same ``specs`` (missing local statistics count as zero samples).

    Each layer's ``T`` is the rows its factors average over per sample, whatever each
    rank's own ``T`` (sequences padded to other lengths, dead positions left out).
    ``samples``: this rank's samples of the step (every forward's; default: the most any
    layer has). A layer that the forwards of some samples skipped (a branch one rank or
    micro-batch does not run), or whose rows are gathered from the batch's, has its ``δ``
    scaled to the step of every rank before (:func:`step_totals`). ``batch``: this rank's
    batch rows of the step (default ``samples``), whose inequality across ranks is warned
    of; ``checksum``: this rank's :func:`gradient_checksum`, whose inequality is warned of
    too.
    """
    sums, counts = _local_sums(stats, specs, factor_view, samples, batch)
    counts = torch.cat([counts, counts.new_tensor([checksum, checksum * checksum])])
    *sums, counts = all_reduce_sum(comm, [*sums, counts])
    totals = [int(c) for c in counts.tolist()]
    checks, totals = totals[-2:], totals[:-2]
    if comm.world_size * checks[1] != checks[0] ** 2:
        warnings.warn(
            "the ranks' gradients differ at this step (a checksum of the preconditioned "
            "layers' .grad): each rank steps on its own gradient, with the curvature of all "
            "ranks' samples, and the replicas drift apart. Wrap the model in "
            "DistributedDataParallel, or all-reduce the gradients (averaged) before step()",
            stacklevel=caller_level(),
        )
    if comm.world_size * totals[-1] != totals[-2] ** 2:
        warnings.warn(
            "ranks have different local batch sizes: the curvature counts every sample "
            "once. With each rank's loss its own mean, DDP's gradient is the unweighted "
            "mean of the ranks' mean gradients, not the global mean gradient: weight each "
            "rank's gradient by its share of the batch (a DDP comm hook, as tlkfac run "
            "installs: README, Distributed), after which this warning can be ignored. "
            "Weighting the loss instead (a sum / the global batch × world size) gives the "
            "global mean gradient but scales each rank's empirical Fisher rows by its "
            "weight (B_r·W/B), so the curvature is off: use the comm hook",
            stacklevel=caller_level(),
        )
    result = ReducedStatistics({}, {}, {})
    for i, (name, spec) in enumerate(specs.items()):
        samples, rows, live = totals[3 * i : 3 * i + 3]
        if rows == 0:
            continue
        locations = rows // samples
        if spec.own is not None:  # its factors weighted by their counts (rows kept)
            a_mat, g_mat = (sums[2 * i + k].view(spec.shapes[2 + k]) / rows for k in (0, 1))
            count: float = locations
            if spec.pooled:  # every rank's rows kept per sample (ranks' padding differs)
                count = rows / samples
            elif name in stats:
                count = kept_locations(stats[name])
        else:  # ranks' padded lengths may differ: T is the rows kept per sample
            a_mat = unpack_symmetric(sums[2 * i], spec.dim_a) / max(live, 1)
            g_mat = unpack_symmetric(sums[2 * i + 1], spec.dim_g) / max(live, 1)
            count = locations if live == rows and not rows % samples else live / samples
        result.factors[name] = (a_mat, g_mat, count)
        result.samples[name] = samples
        make = spec.own or LayerStats
        a_shape, g_shape = spec.shapes[:2] if spec.own else ((spec.dim_a,), (spec.dim_g,))
        a_dtype = torch.float64 if spec.exact_inputs else spec.stats_dtype  # ids stay exact
        result.stats[name] = stats.get(name) or make(
            torch.zeros(0, locations, *a_shape, dtype=a_dtype, device=spec.device),
            torch.zeros(0, locations, *g_shape, dtype=spec.stats_dtype, device=spec.device),
        )
    return result


_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # by element size


def gradient_checksum(layers: Mapping[str, nn.Module]) -> int:
    """The bits of the layers' ``.grad`` summed as integers of their element size (a view:
    no copy, whatever the storage offset of DDP's bucket views), modulo a prime below
    2²⁰ (so that ``W·Σ c²`` fits 64 bits): equal on every rank whose gradients are equal
    bit for bit (what ``DistributedDataParallel`` leaves), almost surely not otherwise."""
    parts = [  # (summed on the device, one host sync)
        grad.detach().reshape(-1).view(_WORDS[grad.element_size()]).sum(dtype=torch.int64)
        % 1_048_573
        for module in layers.values()
        for param in module.parameters(recurse=False)
        if (grad := param.grad) is not None and grad.layout == torch.strided
    ]
    return int(torch.stack(parts).cpu().sum()) % 1_048_573 if parts else 0


def step_totals(
    comm: Communicator,
    rows: Mapping[str, int],
    samples: int,
    specs: Mapping[str, LayerSpec],
) -> tuple[dict[str, int], int]:
    """Each layer's rows of its statistics (``rows``: this rank's,
    :attr:`~..curvature.captured_batch.CapturedBatch.rows`) and the step's ``samples``,
    summed over the ranks (one all-reduce of ``L + 1`` integers, every rank calling with
    the same ``specs``): what a layer's ``δ`` are scaled by
    (:func:`~..curvature.captured_batch.fisher_scale`) before any rank forms its
    statistics, so that a layer some ranks skip (a head, an expert given no token) or whose
    rows are gathered in different numbers on each rank is the whole batch's, for the
    factors and for every statistic read after them (EKFAC's scalings, KPSVD's fits, the
    coarse level's Fisher products) alike."""
    device = next(iter(specs.values())).device
    local = torch.tensor([*(rows.get(name, 0) for name in specs), samples], device=device)
    (total,) = all_reduce_sum(comm, [local])
    values = [int(v) for v in total.tolist()]
    return dict(zip(specs, values[:-1], strict=True)), values[-1]


def _local_sums(
    stats: Mapping[str, LayerStats],
    specs: Mapping[str, LayerSpec],
    factor_view: Callable[[str, LayerStats], LayerStats] | None,
    samples: int = 0,
    batch: int = 0,
) -> tuple[list[Tensor], Tensor]:
    """This rank's part of :func:`reduce_statistics`: each layer's factor sums (packed
    ``āᵀā``, ``δᵀδ`` of the rows the factors average over, or a block type's factors times
    their count) and the counts, per layer the samples, the rows ``N·T`` and the rows
    averaged over (:func:`~..curvature.live_positions.live_grams`), then ``B_r`` (``batch``,
    default ``samples``, else the most samples any layer has) and ``B_r²`` (unequal
    batches are told)."""
    sums: list[Tensor] = []
    device = next(iter(specs.values())).device
    counts = torch.zeros(3 * len(specs) + 2, dtype=torch.int64, device=device)
    local_n = 0
    for i, (name, spec) in enumerate(specs.items()):
        s = stats.get(name)
        if spec.own is not None:  # the block's factors times their count
            own = [torch.zeros(shape, dtype=spec.dtype, device=device) for shape in spec.shapes[2:]]
            if s is not None:
                f = factor_view(name, s) if factor_view is not None else s
                count = f.factor_count()  # type: ignore[attr-defined]
                own = [t.to(spec.dtype) * count for t in kronecker_factors(f)]
                counts[3 * i], counts[3 * i + 1], counts[3 * i + 2] = s.num_samples, count, count
                local_n = max(local_n, s.num_samples)
            sums += [t.reshape(-1) for t in own]
            continue
        if s is None:
            for dim in (spec.dim_a, spec.dim_g):
                sums.append(torch.zeros(dim * (dim + 1) // 2, dtype=spec.dtype, device=device))
            continue
        f = factor_view(name, s) if factor_view is not None else s
        cast = replace(f, a=f.a.to(spec.dtype), g=f.g.to(spec.dtype))
        a_sum, g_sum, live, _ = live_grams(cast, mean=False)
        sums += [pack_symmetric(a_sum), pack_symmetric(g_sum)]
        counts[3 * i], counts[3 * i + 1] = s.num_samples, f.a.shape[0] * f.a.shape[1]
        counts[3 * i + 2] = live
        local_n = max(local_n, s.num_samples)
    rows = batch or samples or local_n  # (a layer's gathered rows may outnumber the samples)
    counts[-2], counts[-1] = rows, rows * rows
    return sums, counts
