"""Step 3 of :mod:`twolevel_kfac.distributed`: each factor decomposed by one rank, shared
(``distributed_inverses="split"``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..curvature.factor_inverse import damped_inverse, decompose_factor
from ..curvature.kronecker import KroneckerFactors
from .communicator import Communicator, pack_symmetric, unpack_symmetric


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
