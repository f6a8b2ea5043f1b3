"""Data-parallel KFAC and two-level KFAC over :mod:`torch.distributed` (all communication).

When ``torch.distributed`` is initialised, :class:`~twolevel_kfac.KFAC` and
:class:`~twolevel_kfac.TwoLevelKFAC` reduce their curvature over ``process_group`` (default:
the world group); the model is wrapped in ``DistributedDataParallel`` (DDP), so ``p.grad``
is already the average over the ranks when ``step()`` runs. One step on ``W`` ranks, rank
``r`` holding ``B_r`` rows of the global batch:

1. **Statistics.** Each rank captures ``ā`` and ``δ`` of its own Fisher mini-batch rows.
   ``δ_n = ∂ℓ_n/∂s_n`` is per sample (empirical: ``B_r·∂L_r/∂s_n`` with ``L_r`` the mean
   loss over the *local* batch, which DDP does not rescale; mc: the sampled per-sample NLL),
   so the global Fisher mini-batch is the union of the local ones (with ``fisher_batch < 1``
   each rank keeps ``round(fisher_batch·B_r)`` of its rows).
2. **Factors.** Each rank packs the upper triangles of its sums ``Σ āāᵀ``, ``Σ δδᵀ`` of all
   layers into one buffer; one all-reduce of it and one of the counts give
   ``A = Σ_r Σ āāᵀ / Σ_r N_r T``: the whole batch's factors, exact for unequal local
   batches too (DDP's gradient is then not the global mean gradient: warned).
3. **Decompositions.** ``distributed_inverses="split"``: each factor (``A`` or ``G`` of a
   layer) is owned by one rank, assigned greedily by cost ``d³`` (largest first, to the
   least-loaded rank); the owner computes its eigendecomposition (``d + d²`` numbers) or,
   for ``inverse_method="cholesky"``, its damped inverse (a packed triangle), and one
   all-gather shares them. ``"replicate"``: every rank decomposes every factor (no traffic).
4. **Two-level.** The coarse level uses the exact Fisher of the global Fisher mini-batch,
   ``F = (1/N) Σ_n ∇ℓ_n∇ℓ_nᵀ`` with ``N = Σ_r N_r``; everything it needs is a sum over
   samples: the coarse matrix ``(1/N) PᵀP + λR₀R₀ᵀ`` (all-reduce the packed local ``PᵀP``),
   Tselepidis' matrix (its two ``L×L`` sum matrices) and each Fisher–vector product
   ``(1/N) Σ_n c_n∇ℓ_n`` (residual bases, A-DEF1/2, balanced: the local weighted gradient
   sums, one layer vector). The pure functions of :mod:`twolevel_kfac.twolevel` stay
   single-process; :mod:`twolevel_kfac.optim.twolevel` sums their per-sample terms with
   :func:`all_reduce_sum` (:mod:`twolevel_kfac.twolevel.global_fisher`).
5. The rest (KL clipping, combinations, momentum) has the same inputs on every rank.

Bytes per rank handed to collectives (``e`` = bytes per factor element; ``L`` layers;
``d_A, d_G`` factor sizes; ``K`` coarse vectors; ``P`` preconditioned parameters):
factor refresh ``e·Σ_l [d_A(d_A+1) + d_G(d_G+1)]/2 + 8·(2L+2)``; split decomposition
``e·max_r Σ_{f owned by r} (d_f² + d_f)`` (cholesky: ``d_f(d_f+1)/2``); coarse matrix
``e·K(K+1)/2`` (Tselepidis ``e·L(L+1)``); ``e·P`` per Fisher–vector product. A ring
all-reduce puts ``2(W−1)/W`` times its payload on the wire, an all-gather ``W−1`` times.
:attr:`Communicator.payload_bytes` counts them (``last_stats["comm_bytes"]`` per step).

**Seeding.** Rank ``r`` samples its Fisher rows and MC targets with a generator seeded
:func:`rank_seed` ``(seed, r)`` (``seed`` on rank 0, as a one-process run; a splitmix64 mix
elsewhere), for the rows it holds only: reproducible for a fixed world size and data split,
not invariant to the split.

**Checkpoints.** Under ``W > 1`` ``state_dict()`` is a collective (call it on every rank,
save rank 0's): it gathers the rank-local parts (samplers, two-level Fisher rows) into
``state["ranks"]``, so rank 0's state restores every rank; on another world size the rows
are re-split and new ranks' samplers start from their seeds (warned).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .curvature.blocks import LayerStats
from .curvature.kronecker import KroneckerFactors, damped_inverse, decompose_factor

_MASK64 = (1 << 64) - 1


def rank_seed(seed: int, rank: int) -> int:
    """The sampler seed of ``rank``: ``seed`` on rank 0, else splitmix64 of
    ``seed + rank·0x9E3779B97F4A7C15`` (mod 2⁶⁴), reduced to ``[0, 2⁶³)``."""
    if rank == 0:
        return seed
    z = (seed + rank * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (layer names, hooks and the
    state dict are then those of the plain model)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


class Communicator:
    """Sum collectives over one process group, counting the bytes handed to them.

    With ``world_size == 1`` it is never asked to communicate: callers test
    :attr:`distributed` and keep their single-process code path.
    """

    def __init__(self, group: Any = None, rank: int = 0, world_size: int = 1) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        self.payload_bytes = 0  # bytes this rank handed to collectives
        self.collectives = 0
        self.seconds = 0.0  # wall time in them (transfer and waiting for the other ranks)

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    def _count(self, tensor: Tensor, start: float) -> None:
        self.payload_bytes += tensor.numel() * tensor.element_size()
        self.collectives += 1
        self.seconds += time.perf_counter() - start

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        start = time.perf_counter()
        dist.all_reduce(tensor, group=self.group)
        self._count(tensor, start)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (equal shapes), in rank order."""
        start = time.perf_counter()
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor, group=self.group)
        self._count(tensor, start)
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (checkpoints, not the hot path)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def make_communicator(process_group: Any = None) -> Communicator:
    """The :class:`Communicator` of ``process_group`` (``None``: the world group when
    ``torch.distributed`` is initialised, else a single process).

    Raises:
        ValueError: if a group is given but ``torch.distributed`` is not initialised, or
            this process is not a member of it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() before building the optimizer"
            )
        return Communicator()
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("process_group: this process is not a member of the group")
    return Communicator(process_group, rank, dist.get_world_size(process_group))


def all_reduce_sum(comm: Communicator, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``Σ_r`` of each tensor, flattened into one collective per ``(dtype, device)``."""
    out = list(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for index in groups.values():
        flat = comm.all_reduce(torch.cat([tensors[i].reshape(-1) for i in index]))
        parts = flat.split([tensors[i].numel() for i in index])
        for i, part in zip(index, parts, strict=True):
            out[i] = part.view_as(tensors[i])
    return out


@functools.lru_cache(maxsize=256)
def _triu(dim: int, device: torch.device) -> Tensor:
    return torch.triu_indices(dim, dim, device=device)


def pack_symmetric(matrix: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of a square matrix, row-major, ``d(d+1)/2``."""
    rows, cols = _triu(matrix.shape[0], matrix.device)
    return matrix[rows, cols]


def unpack_symmetric(packed: Tensor, dim: int) -> Tensor:
    """The symmetric ``dim × dim`` matrix of a :func:`pack_symmetric` triangle."""
    rows, cols = _triu(dim, packed.device)
    out = packed.new_zeros(dim, dim)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out


# ----------------------------------------------------------------------- factors
@dataclass(frozen=True)
class LayerSpec:
    """What every rank knows of a layer: factor sizes, factor and statistics dtypes."""

    dim_a: int
    dim_g: int
    dtype: torch.dtype
    stats_dtype: torch.dtype
    device: torch.device


@dataclass
class ReducedStatistics:
    """The global result of :func:`reduce_statistics`, for the layers some rank saw.

    Attributes:
        factors: ``(A, G, T)`` of the global Fisher mini-batch per layer.
        stats: this rank's statistics of those layers (empty where it saw no sample).
        samples: the global Fisher mini-batch size ``N = Σ_r N_r`` per layer.
    """

    factors: dict[str, tuple[Tensor, Tensor, int]]
    stats: dict[str, LayerStats]
    samples: dict[str, int]


def reduce_statistics(
    comm: Communicator,
    stats: Mapping[str, LayerStats],
    specs: Mapping[str, LayerSpec],
    factor_view: Callable[[LayerStats], LayerStats] | None = None,
) -> ReducedStatistics:
    """Kronecker factors of the union of every rank's statistics (step 2 of the module doc),
    formed from ``factor_view`` of them (``weight_sharing="reduce"``); every rank calls it
    with the same ``specs`` (missing local statistics count as zero samples).

    Raises:
        RuntimeError: if the ranks disagree on a layer's number of locations ``T``.
    """
    sums: list[Tensor] = []
    device = next(iter(specs.values())).device
    counts = torch.zeros(2 * len(specs) + 2, dtype=torch.int64, device=device)
    local_n = 0
    for i, (name, spec) in enumerate(specs.items()):
        s = stats.get(name)
        if s is None:
            for dim in (spec.dim_a, spec.dim_g):
                sums.append(torch.zeros(dim * (dim + 1) // 2, dtype=spec.dtype, device=device))
            continue
        f = factor_view(s) if factor_view is not None else s
        a, g = (
            f.a.reshape(-1, spec.dim_a).to(spec.dtype),
            f.g.reshape(-1, spec.dim_g).to(spec.dtype),
        )
        sums += [pack_symmetric(a.T @ a), pack_symmetric(g.T @ g)]
        counts[2 * i], counts[2 * i + 1] = s.num_samples, a.shape[0]
        local_n = max(local_n, s.num_samples)
    counts[-2], counts[-1] = local_n, local_n * local_n
    *sums, counts = all_reduce_sum(comm, [*sums, counts])
    totals = [int(c) for c in counts.tolist()]
    if comm.world_size * totals[-1] != totals[-2] ** 2:
        warnings.warn(
            "ranks have different Fisher mini-batch sizes: the curvature is weighted by "
            "the sample counts (exact), but DDP's gradient is the unweighted mean of the "
            "ranks' mean gradients, not the global mean gradient",
            stacklevel=4,
        )
    result = ReducedStatistics({}, {}, {})
    for i, (name, spec) in enumerate(specs.items()):
        samples, rows = totals[2 * i], totals[2 * i + 1]
        if rows == 0:
            continue
        if rows % samples:
            raise RuntimeError(f"ranks disagree on the number of locations of layer {name!r}")
        locations = rows // samples
        a_mat = unpack_symmetric(sums[2 * i], spec.dim_a) / rows
        g_mat = unpack_symmetric(sums[2 * i + 1], spec.dim_g) / rows
        result.factors[name] = (a_mat, g_mat, locations)
        result.samples[name] = samples
        result.stats[name] = stats.get(name) or LayerStats(
            torch.zeros(0, locations, spec.dim_a, dtype=spec.stats_dtype, device=spec.device),
            torch.zeros(0, locations, spec.dim_g, dtype=spec.stats_dtype, device=spec.device),
        )
    return result


# ----------------------------------------------------------------- decompositions
def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment: the costliest task first, each to the
    least-loaded rank (the lowest on ties). Deterministic, so every rank agrees."""
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def share_owned(
    comm: Communicator,
    sizes: Sequence[int],
    owners: Sequence[int],
    compute: Callable[[int], Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> list[Tensor]:
    """Task ``i`` (``sizes[i]`` numbers) is computed by rank ``owners[i]`` only; one
    all-gather of the padded per-rank parts gives every rank every result (flat).

    A task whose computation raises ``RuntimeError`` comes back as NaNs, on every rank.
    """
    tasks = [[i for i, o in enumerate(owners) if o == r] for r in range(comm.world_size)]
    lengths = [sum(sizes[i] for i in task) for task in tasks]
    width = max(lengths)
    local = []
    for i in tasks[comm.rank]:
        try:
            local.append(compute(i).reshape(-1).to(dtype))
        except RuntimeError:
            local.append(torch.full((sizes[i],), float("nan"), dtype=dtype, device=device))
    local.append(torch.zeros(width - lengths[comm.rank], dtype=dtype, device=device))
    gathered = comm.all_gather(torch.cat(local))
    out: list[Tensor] = [torch.empty(0)] * len(sizes)
    for r, task in enumerate(tasks):
        parts = gathered[r][: lengths[r]].split([sizes[i] for i in task])
        for i, part in zip(task, parts, strict=True):
            out[i] = part
    return out


def share_decompositions(
    comm: Communicator,
    factors: Mapping[str, KroneckerFactors],
    method: str,
    damping: float,
    mode: str,
) -> None:
    """``distributed_inverses="split"``: step 3 of the module doc, installed in ``factors``.

    Raises:
        RuntimeError: (on every rank) if an owner's decomposition failed.
    """
    names = list(factors)
    tasks = [(name, which) for name in names for which in ("A", "G")]
    mats: list[Tensor] = [getattr(factors[n], w) for n, w in tasks]
    dims = [int(m.shape[0]) for m in mats]
    owners = assign_owners([float(d) ** 3 for d in dims], comm.world_size)
    dtype = functools.reduce(torch.promote_types, [m.dtype for m in mats])
    if method == "eigen":
        sizes = [d + d * d for d in dims]

        def compute(i: int) -> Tensor:
            values, vectors = decompose_factor(mats[i], "eigen")
            return torch.cat([values, vectors.reshape(-1)])
    else:
        for f in factors.values():
            f.decompose(method)  # copies of the factors, the cache key; no real work
        sizes = [d * (d + 1) // 2 for d in dims]
        shifts = [factors[n].factor_shifts(damping, mode)[w == "G"] for n, w in tasks]

        def compute(i: int) -> Tensor:
            return pack_symmetric(damped_inverse(mats[i], shifts[i]))

    flat = share_owned(comm, sizes, owners, compute, dtype, mats[0].device)
    results: dict[tuple[str, str], Any] = {}
    for i, (name, which) in enumerate(tasks):
        if not bool(torch.isfinite(flat[i]).all()):
            raise RuntimeError(
                f"decomposition of factor {which} of layer {name!r} failed on rank {owners[i]}"
            )
        d, part = dims[i], flat[i].to(mats[i].dtype)
        if method == "eigen":
            results[name, which] = (part[:d], part[d:].view(d, d))
        else:
            results[name, which] = unpack_symmetric(part, d)
    for name in names:
        if method == "eigen":
            factors[name].install_decomposition(results[name, "A"], results[name, "G"])
        else:
            factors[name].install_inverses(
                results[name, "A"], results[name, "G"], damping, mode, method
            )


# -------------------------------------------------------------------- checkpoints
def select_rank_state(parts: Sequence[Any], rank: int, world_size: int) -> Any | None:
    """This rank's part of a gathered ``state["ranks"]``; on another world size, with a
    warning, rank ``r``'s old part if there was one, else ``None`` (start from the seed)."""
    if len(parts) == world_size:
        return parts[rank]
    warnings.warn(
        f"the state was saved by {len(parts)} process(es) and is loaded by {world_size}: "
        "the samplers of new ranks restart from their seeds, so the resumed run is not "
        "bit-identical to an uninterrupted one",
        stacklevel=3,
    )
    return parts[rank] if rank < len(parts) else None


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
