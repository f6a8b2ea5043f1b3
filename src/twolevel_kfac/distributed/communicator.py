"""The process group, its collectives and packed symmetric matrices; rank and step seeds."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

_MASK64 = (1 << 64) - 1


def rank_seed(seed: int, rank: int) -> int:
    """The sampler seed of ``rank``: ``seed`` on rank 0, else splitmix64 of
    ``seed + rank·0x9E3779B97F4A7C15`` (mod 2⁶⁴), reduced to ``[0, 2⁶³)``."""
    return seed if rank == 0 else _splitmix(seed + rank * 0x9E3779B97F4A7C15)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The sampler seed of ``rank`` for the draws of step ``step`` under
    ``torch.distributed``: :func:`rank_seed` at step 0, else splitmix64 of it plus
    ``step·0xD1B54A32D192ED03``. Seeded at every step, no rank's sampler has state to
    save, so ``state_dict()`` needs no collective (``if rank == 0: torch.save(…)``)."""
    base = rank_seed(seed, rank)
    return base if step == 0 else _splitmix(base + step * 0xD1B54A32D192ED03)


def _splitmix(value: int) -> int:
    z = value & _MASK64
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

    def check_world(self) -> None:
        """Refuse a single-process communicator of the default group (built before
        ``torch.distributed`` was initialised) once a world of more than one process exists:
        the optimizer then reduced nothing across the ranks, and the replicas drifted apart
        silently (2.0e-2 on a step of 2.3e-2 after 3 steps in a trial: Hugging Face's
        ``TrainingArguments``, which initialises the group, built after the optimizer).

        Raises:
            RuntimeError: saying to build the optimizer after the group, or to pass one.
        """
        if self.group is not None or self.distributed or not dist.is_available():
            return
        if dist.is_initialized() and (world := dist.get_world_size()) > 1:
            raise RuntimeError(
                f"torch.distributed was initialised ({world} processes) after this optimizer "
                "was built, so it reduces its curvature over none of them and each replica "
                "would step on its own: build the optimizer after init_process_group (with "
                "Hugging Face's Trainer, after TrainingArguments(...), which initialises it); "
                "for a run of its own on each rank, build it after the group too, with "
                "process_group= a group of that rank alone (torch.distributed.new_group)"
            )

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

    def rendezvous(self, what: str) -> None:
        """Wait for every rank to reach ``what`` (a collective of a checkpoint): under gloo a
        monitored barrier, whose timeout (the group's) names the ranks that did not come,
        instead of a bare send/recv timeout in the collective after it.

        Raises:
            RuntimeError: naming ``what``, the likely cause and the ranks missing.
        """
        if dist.get_backend(self.group) != "gloo":
            return
        group = self.group if self.group is not None else dist.group.WORLD
        try:  # (the group's timeout: monitored_barrier's own default is 30 minutes)
            timeout = group._get_backend(torch.device("cpu")).options._timeout  # type: ignore[union-attr]
        except (AttributeError, RuntimeError):
            timeout = None
        try:
            dist.monitored_barrier(group=self.group, timeout=timeout, wait_all_ranks=True)
        except RuntimeError as error:
            raise RuntimeError(
                f"{what} is a collective under torch.distributed: every rank must call it "
                "(under `if rank == 0:` the other ranks never come; call it on every rank and "
                f"save rank 0's result). {error}"
            ) from error

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
