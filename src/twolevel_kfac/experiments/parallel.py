"""This process's part in a data-parallel run of the runner (``torch.distributed`` + DDP).

When ``torch.distributed`` is initialised, :func:`~twolevel_kfac.experiments.runner.train_run`
trains on all ranks of the world group together (:class:`Parallel`; with one process every
method is the identity, so the one-process runner is unchanged):

* **Data.** Every rank draws the global batch order of a one-process run (the epoch
  permutation seeded by ``(seed, epoch)``, cut into batches of ``problem.batch_size``) and
  takes the ``r``-th contiguous part of each batch (``tensor_split``: the local sizes
  ``B_r`` differ by at most one). Every rank must hold at least one row of every batch,
  the last one included; :meth:`Parallel.check_split` refuses a split where one would not.
* **Gradient.** The model is wrapped in ``DistributedDataParallel`` with a communication
  hook that sums ``(B_r/B)·∇L_r`` over the ranks (``L_r`` the mean loss of the local rows,
  ``B = Σ_r B_r``): the mean gradient of the global batch, also for unequal local batches,
  where DDP's default (the unweighted mean of the ranks' means) is not. The optimizers'
  curvature is weighted by sample counts (:mod:`twolevel_kfac.distributed`), so their
  warning about unequal Fisher mini-batches does not apply and is silenced.
* **Loss.** The logged loss of a step is that of the global batch, ``Σ_r B_r L_r / B``
  (one all-reduce, before ``backward``, so that every rank skips a non-finite step).
* **Agreement.** Decisions that end the loop (Ctrl-C on some rank, the time budget) are
  all-reduced (:meth:`Parallel.any`), so no rank leaves while others wait in a collective;
  everything else the loop decides on (losses, step counts, parameters) is the same on
  every rank.
* **Files.** Rank 0 alone writes ``config.yaml``, ``metrics.jsonl`` and checkpoints, and
  alone reads the run directory: what it reads (the checkpoint to resume, or an error) is
  broadcast (:meth:`Parallel.from_main`), so every rank resumes from the same checkpoint
  and other nodes need no shared file system. Collectives such as ``opt.state_dict()`` are
  still called on every rank.
* **Devices.** The collectives here (loss, flags, checkpoint) use CPU tensors: on GPUs they
  go through the gloo part of the ``"cpu:gloo,cuda:nccl"`` group, the gradients and the
  optimizers' curvature through NCCL (:mod:`twolevel_kfac.experiments.device`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Parallel"]

T = TypeVar("T")


class Parallel:
    """The rank and world size of this process, and the runner's collectives.

    Args:
        rank: This process's rank in the world group.
        world_size: The number of processes; ``1`` (the default) is a one-process run.
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        self.local_rows, self.global_rows = 1, 1  # of the current batch (``shard``)

    @classmethod
    def current(cls) -> Parallel:
        """The world group when ``torch.distributed`` is initialised, else one process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that logs and writes)."""
        return self.rank == 0

    def check_split(self, n_rows: int, batch_size: int) -> None:
        """Refuse a data set whose batches cannot give every rank at least one row.

        Raises:
            ValueError: ``batch_size`` or the last batch of an epoch (``n_rows % batch_size``
                rows) is smaller than the number of processes.
        """
        last = n_rows % batch_size
        if batch_size < self.world_size:
            raise ValueError(
                f"problem.batch_size {batch_size} is smaller than the {self.world_size} "
                "processes (--nproc): every process needs at least one row of every batch"
            )
        if 0 < last < self.world_size:
            raise ValueError(
                f"the last batch of an epoch has {last} row(s) ({n_rows} training examples, "
                f"problem.batch_size {batch_size}), fewer than the {self.world_size} processes "
                "(--nproc): change the batch size, dataset.n_train or --nproc so that it has "
                "none or at least one row per process"
            )

    def shard(self, batch: Tensor) -> Tensor:
        """This rank's contiguous part of a global batch (of indices); remembers both sizes
        for the gradient weights and the loss of the step."""
        if not self.distributed:
            return batch
        local = batch.tensor_split(self.world_size)[self.rank]
        self.local_rows, self.global_rows = len(local), len(batch)
        return local

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` with the weighted-mean gradient hook
        (the model itself in a one-process run)."""
        if not self.distributed:
            return model
        warnings.filterwarnings("ignore", message="ranks have different local batch sizes")
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(self, _weighted_mean_hook)
        return ddp

    def global_loss(self, value: float) -> float:
        """The loss of the global batch from this rank's mean loss ``value`` (a collective:
        every rank calls it once per step, after ``shard``)."""
        if not self.distributed:
            return value
        total = torch.tensor([value * self.local_rows], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total) / self.global_rows

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank (a collective)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value)

    def from_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` run on rank 0 only, its result (or exception) on every rank.

        The result travels in ``torch.save`` format, which writes a storage shared by
        several tensors once (``pickle``, which ``broadcast_object_list`` uses, writes it
        once per tensor: ten times the bytes for a KFAC state whose factors are views of
        one all-reduced buffer).

        Raises:
            Exception: whatever ``compute`` raised on rank 0, on every rank.
        """
        if not self.distributed:
            return compute()
        payload = torch.empty(0, dtype=torch.uint8)
        if self.is_main:
            try:
                outcome: tuple[bool, Any] = (True, compute())
            except Exception as error:  # re-raised below, on every rank
                outcome = (False, error)
            buffer = io.BytesIO()
            torch.save(outcome, buffer)
            payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        size = torch.tensor([payload.numel()])
        dist.broadcast(size, src=0)
        if not self.is_main:
            payload = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(payload, src=0)
        ok, value = torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=False)
        if not ok:
            raise value
        return value


def _weighted_mean_hook(state: Parallel, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: ``Σ_r (B_r/B)·∇L_r``, the global batch's mean gradient."""
    tensor = bucket.buffer().mul_(state.local_rows / state.global_rows)
    future = dist.all_reduce(tensor, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


# DDP compares the hook's annotations with these objects; ``from __future__ import
# annotations`` left strings in their place.
_weighted_mean_hook.__annotations__.update(
    {"bucket": dist.GradBucket, "return": torch.futures.Future[Tensor]}
)
