"""``opt.state_dict()`` called on rank 0 alone (``if rank == 0: torch.save(opt.state_dict(),
…)``, what Hugging Face's Trainer and most DDP scripts do). Each rank's sampler is seeded per
step, so the state holds nothing rank-local and saving is no collective: rank 0's state
resumes both ranks bit for bit. Before 2026-12-06 (day) it was a collective the other ranks
never joined, and rank 0 waited for the group's timeout (30 minutes by default). Only a
two-level optimizer whose steps read the Fisher mini-batch (A-DEF1/2, BALANCED) needs every rank:
a monitored barrier fails it at the group's timeout saying so (3 seconds here)."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk
from worker_pair import run_ranks

MAKERS: dict[str, Callable[[nn.Module], Any]] = {  # each drawing from its sampler every step
    "KFAC": lambda m: tk.KFAC(m, cov_interval=1, inv_interval=1, fisher_batch=0.5),
    "TwoLevelKFAC": lambda m: tk.TwoLevelKFAC(m, cov_interval=2, inv_interval=2),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _train(net: nn.Module, opt: Any, steps: range, rank: int) -> None:
    for k in steps:
        gen = torch.Generator().manual_seed(50 + k)
        x, y = torch.randn(8, 3, generator=gen), torch.randint(0, 2, (8,), generator=gen)
        part = slice(4 * rank, 4 * rank + 4)
        opt.zero_grad()
        F.cross_entropy(net(x[part]), y[part]).backward()
        opt.step()


def _resumed_alike(name: str, rank: int, out: Path) -> tuple[bool, float]:
    """Three steps, rank 0 alone saving the model and the optimizer, three more; then
    both ranks resumed from rank 0's file for the same three: whether they end bit for bit
    where the straight run did, and how long rank 0's ``state_dict()`` took."""
    model = _model()
    net = nn.parallel.DistributedDataParallel(model)
    opt = MAKERS[name](model)
    _train(net, opt, range(3), rank)
    took = 0.0
    if rank == 0:
        start = time.perf_counter()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out / f"{name}.pt")
        took = time.perf_counter() - start
    dist.barrier()
    _train(net, opt, range(3, 6), rank)
    resumed = _model()
    resumed_net = nn.parallel.DistributedDataParallel(resumed)
    resumed_opt = MAKERS[name](resumed)
    saved = torch.load(out / f"{name}.pt", weights_only=False)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    _train(resumed_net, resumed_opt, range(3, 6), rank)
    alike = all(
        torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters(), strict=True)
    )
    return alike, took


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # this child's environment only
    torch.set_num_threads(1)
    early = _model()
    early_opt = tk.KFAC(early)  # (built before the group exists)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=3),
    )
    results: dict[str, Any] = {name: _resumed_alike(name, rank, out) for name in MAKERS}
    try:
        _train(nn.parallel.DistributedDataParallel(early), early_opt, range(1), rank)
        results["early"] = ""
    except RuntimeError as error:
        results["early"] = str(error)
    model = _model()
    net = nn.parallel.DistributedDataParallel(model)
    opt = tk.TwoLevelKFAC(model, combination="adef2", cov_interval=5)
    _train(net, opt, range(2), rank)  # (W₀ built from its rows at the second step)
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
    results |= {"said": said, "waited": waited}
    torch.save(results, out / f"rank{rank}.pt")
    os._exit(0)  # (a gloo thread may abort the interpreter's exit after a timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_worker, tmp_path_factory.mktemp("save"), "spawn", 2)


@pytest.mark.parametrize("name", list(MAKERS))
def test_rank_zeros_state_alone_resumes_every_rank_bit_for_bit(
    runs: list[dict[str, Any]], name: str
) -> None:
    """KFAC drawing an MC Fisher of half the rows at every step, and the default two-level
    KFAC: rank 0's ``state_dict()`` alone takes no wait, and both ranks resumed from it
    take the straight run's steps exactly (their samplers seeded per step alike)."""
    for rank in runs:
        alike, took = rank[name]
        assert alike
        assert took < 2.0  # (the group's timeout is 3 s)


def test_a_rank_zero_only_save_of_a_combination_reading_the_fisher_says_it_is_a_collective(
    runs: list[dict[str, Any]],
) -> None:
    """A-DEF2 (its steps read the Fisher mini-batch: each rank's rows, or ``W₀`` built from
    them at the step after a refresh, here after it): every rank must call
    ``state_dict()`` at every step, whatever it holds then (it was a collective only while
    rows were held for a while on 2026-12-06 (day)); rank 0 alone is told so at the group's
    timeout, not at ``monitored_barrier``'s own 30 minutes, nor in a bare send/recv
    error."""
    said = runs[0]["said"]
    assert "read the Fisher mini-batch" in said
    assert "is a collective under torch.distributed" in said
    assert "if rank == 0" in said
    assert runs[0]["waited"] < 8  # the group's 3 s, not monitored_barrier's 30 minutes


def test_an_optimizer_built_before_the_group_is_refused_at_its_step(
    runs: list[dict[str, Any]],
) -> None:
    """An optimizer built before ``init_process_group`` (Hugging Face's
    ``TrainingArguments`` initialises the group: built after the optimizer) reduced nothing
    across the ranks, and the replicas drifted apart silently (2.0e-2 on a step of 2.3e-2
    after 3 steps in a trial); its first step is refused, saying to build it after."""
    for rank in runs:
        assert "initialised (2 processes) after this optimizer was built" in rank["early"]
        assert "TrainingArguments" in rank["early"]
