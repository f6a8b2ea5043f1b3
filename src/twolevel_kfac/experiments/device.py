"""Where a run computes: ``problem.device`` (or ``--device``) resolved for one process, and
the ``torch.distributed`` backend that goes with it.

* ``auto`` (the default): ``cuda`` when torch sees a GPU, else ``cpu``.
* ``cpu``: everything on the CPU (the runner before this option existed, bit for bit).
* ``cuda``: one GPU per process: the process with local rank ``r`` (``--nproc``: rank ``r``;
  under torchrun ``LOCAL_RANK``) uses ``cuda:r``, so ``N`` processes on a machine need ``N``
  GPUs there.
* ``cuda:K``: GPU ``K``, for a single process per machine.

Backend: gloo on the CPU; on GPUs ``"cpu:gloo,cuda:nccl"``, i.e. NCCL for every CUDA tensor
(DDP's gradient buckets, the optimizers' factors, decompositions and coarse matrices) and
gloo for the runner's few CPU tensors (a step's loss, stop flags, the checkpoint handed
from rank 0: :mod:`twolevel_kfac.experiments.parallel`) and object collectives.

Data: the data set stays in host memory and each minibatch (and each evaluation chunk) is
copied to the device when it is used: a few MB per step for the paper's problems, and no
data set needs to fit on the GPU. On the CPU the copy is no copy (``Tensor.to`` returns
the tensor itself). Checkpoints hold CPU tensors only (:mod:`twolevel_kfac.placement`),
and the optimizers put their loaded state on their parameters' device, so a run
checkpointed on a GPU resumes on the CPU and vice versa (with other kernels, so not
bit-identically).
"""

from __future__ import annotations

import os
import re

import torch

__all__ = ["DEVICES", "backend_for", "check_device_spec", "resolve_device"]

DEVICES = "'auto', 'cpu', 'cuda' or 'cuda:K'"
_SPEC = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device_spec(spec: str) -> str:
    """``spec`` if it is one of :data:`DEVICES`.

    Raises:
        ValueError: anything else.
    """
    if not _SPEC.fullmatch(spec):
        raise ValueError(f"device must be {DEVICES}; got {spec!r}")
    return spec


def _local_slot(rank: int, world_size: int) -> tuple[int, int]:
    """``(local rank, processes on this machine)``: torchrun's ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE`` where set, else ``(rank, world_size)`` (``--nproc`` starts every
    process on this machine)."""
    if "LOCAL_RANK" not in os.environ:
        return rank, world_size
    local_rank = int(os.environ["LOCAL_RANK"])
    return local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))


def resolve_device(spec: str, rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of process ``rank`` of ``world_size`` for ``problem.device: spec``.

    Raises:
        ValueError: an unknown ``spec``; ``cuda`` asked for (``auto`` never asks) without a
            GPU; more processes on this machine than GPUs; ``cuda:K`` for several processes
            on this machine or for a GPU torch does not see.
    """
    check_device_spec(spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(
            f"device {spec!r} needs a GPU, but torch sees none (torch.cuda.is_available() is "
            "False: no GPU, or a CPU-only torch build); use --device cpu"
        )
    local_rank, local_world = _local_slot(rank, world_size)
    if spec.startswith("cuda:"):
        index = int(spec.removeprefix("cuda:"))
        if local_world > 1:
            raise ValueError(
                f"device {spec!r} names one GPU, but {local_world} processes run on this "
                "machine (--nproc): use 'cuda', one GPU per process"
            )
        if index >= count:
            raise ValueError(f"device {spec!r}, but torch sees {count} GPU(s) (cuda:0 …)")
        return torch.device("cuda", index)
    if local_world > count or local_rank >= count:
        raise ValueError(
            f"{local_world} processes on this machine (--nproc) need as many GPUs, but torch "
            f"sees {count}: use at most {count} processes, or --device cpu"
        )
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """The ``init_process_group`` backend for processes computing on ``device``."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
