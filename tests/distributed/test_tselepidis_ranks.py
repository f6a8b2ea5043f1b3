"""``coarse_space="tselepidis"`` under ``torch.distributed`` with ranks whose sequences are
padded to different lengths: each rank resampled its layers' locations to its own grid,
so the ranks built different coarse matrices and the replicas drifted apart silently
(steps 0.11 off on 2.39). Refused on every rank now; equal lengths give one matrix."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from worker_pair import run_ranks


class _Sequence(nn.Module):
    """Token ids ``[B, T]`` → embedding → ``Linear`` per position → mean → head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.lin, self.head = nn.Embedding(7, 4), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(self.emb(ids))).mean(1))


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # this child's environment only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    warnings.simplefilter("ignore")
    results: dict[str, Any] = {}
    try:
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 7, (6, 6), generator=gen), torch.randint(0, 3, (6,), generator=gen)
        x, y = x[rank * 3 : (rank + 1) * 3], y[rank * 3 : (rank + 1) * 3]
        for padded in (False, True):
            ids = torch.cat([x, torch.zeros(3, 3, dtype=x.dtype)], 1) if padded and rank else x
            model = nn.parallel.DistributedDataParallel(_Sequence())
            opt = tk.TwoLevelKFAC(model, coarse_space="tselepidis", fisher="empirical")
            opt.zero_grad()
            F.cross_entropy(model(ids), y).backward()
            try:
                opt.step()
                level = opt.preconditioner.coarse_level
                results[str(padded)] = level.coarse_matrix.clone()
            except RuntimeError as error:
                results[str(padded)] = str(error)
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)  # saved: a gloo thread may abort or hang the interpreter's exit


def test_ranks_of_other_lengths_are_refused_and_equal_ones_agree(tmp_path: Path) -> None:
    ranks = run_ranks(_worker, tmp_path, "fork")
    assert torch.equal(ranks[0]["False"], ranks[1]["False"])
    for rank in ranks:
        assert "the same number of locations per layer on every rank" in rank["True"]
