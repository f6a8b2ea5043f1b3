"""``opt.state_dict()`` called on rank 0 alone (``if rank == 0: torch.save(opt.state_dict(),
…)``): a collective the other ranks never join. It waited for the group's timeout (30
minutes by default) and failed in a bare gloo send/recv; now a monitored barrier fails it
at that timeout saying what happened (a 3-second group timeout here)."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk
from worker_pair import run_ranks


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # this child's environment only
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=3),
    )
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    opt = tk.KFAC(model)
    F.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 1, 0])).backward()
    opt.step()
    said, waited = "", 0.0
    if rank == 0:
        start = time.perf_counter()
        try:
            opt.state_dict()
        except RuntimeError as error:
            said = str(error)
        waited = time.perf_counter() - start
    else:
        time.sleep(9)  # (past rank 0's timeout, without joining)
    torch.save({"said": said, "waited": waited}, out / f"rank{rank}.pt")
    os._exit(0)  # (a gloo thread may abort the interpreter's exit after a timeout)


def test_a_rank_zero_only_state_dict_says_it_is_a_collective(tmp_path: Path) -> None:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    runs: list[dict[str, Any]] = run_ranks(_worker, tmp_path, "spawn", 2)
    said = runs[0]["said"]
    assert "state_dict() is a collective under torch.distributed" in said
    assert "if rank == 0" in said
    assert runs[0]["waited"] < 8  # the group's 3 s, not monitored_barrier's 30 minutes
