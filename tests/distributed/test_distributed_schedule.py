"""The capture schedule under ``torch.distributed`` (two gloo processes, DDP with
``find_unused_parameters``): heads used on some steps only are chased as in one process
(the same capturing steps, decided alike on every rank from what the ranks share), and a
resume mid-chase is bit-identical."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from worker_pair import gloo_group, run_ranks

WORLD, BATCH, STEPS, SAVE = 2, 8, 30, 13
SETTINGS = {"lr": 0.1, "damping": 0.05, "cov_interval": 5, "inv_interval": 5, "kl_clip": None}
SETTINGS |= {"fisher": "empirical", "fisher_batch": 1.0}  # no draws: one process is the oracle


class Heads(nn.Module):
    """A body and three heads: ``a`` on even steps, ``b`` and ``c`` taking turns on odd."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(7, 3) for _ in range(3))

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.heads[task](self.body(x))


def _task(step: int) -> int:
    return 0 if step % 2 == 0 else (1 if step % 4 == 1 else 2)


def _run(net: nn.Module, opt: Any, steps: range, part: slice) -> list[bool]:
    """Steps on the batches of ``steps`` (this rank's rows ``part``); whether each captured."""
    captured = []
    for k in steps:
        gen = torch.Generator().manual_seed(100 + k)
        x = torch.randn(BATCH, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (BATCH,), generator=gen)
        captured.append(bool(opt.preconditioner.capture.active))
        opt.zero_grad()
        F.cross_entropy(net(x[part], _task(k)), y[part]).backward()
        opt.step()
    return captured


def _build(cls: type, wrap: bool) -> tuple[nn.Module, nn.Module, Any]:
    model = Heads().double()
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if wrap else model
    return model, net, cls(model, **SETTINGS)


class RankHeads(Heads):
    """Each rank's rows through its own head (a branch a rank's forward skips); in one
    process the two halves of the batch through the two heads, in one forward."""

    def forward(self, x: Tensor, task: int) -> Tensor:  # task: the rank, or -1 for both
        h = self.body(x)
        if task >= 0:
            return self.heads[task](h)
        half = len(x) // 2
        return torch.cat([self.heads[0](h[:half]), self.heads[1](h[half:])])


class Views(Heads):
    """Two views of each sample concatenated inside ``forward``: the body sees twice the
    samples' rows (gathered rows, not samples)."""

    def forward(self, x: Tensor, task: int) -> Tensor:
        h = self.body(torch.cat([x, 2 * x]))
        return self.heads[0](h[: len(x)] + h[len(x) :])


def _split_run(net: nn.Module, model: nn.Module, task: int, part: slice) -> list[Tensor]:
    """Three capturing KFAC steps of :class:`RankHeads` (this rank's rows ``part``)."""
    opt = tk.KFAC(model, **(SETTINGS | {"cov_interval": 1, "inv_interval": 1}))
    for k in range(3):
        gen = torch.Generator().manual_seed(200 + k)
        x = torch.randn(BATCH, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (BATCH,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(x[part], task), y[part]).backward()
        opt.step()
    return _params(model)


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, port: int, out: Path) -> None:
    warnings.simplefilter("ignore")
    part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    with gloo_group(rank, port, WORLD):
        results = {}
        for cls in (tk.KFAC, tk.TwoLevelKFAC):
            model, net, opt = _build(cls, wrap=True)
            captured = _run(net, opt, range(SAVE), part)
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))  # a collective
            captured += _run(net, opt, range(SAVE, STEPS), part)
            resumed, resumed_net, resumed_opt = _build(cls, wrap=True)
            resumed.load_state_dict(saved[0])
            resumed_opt.load_state_dict(saved[1])
            again = _run(resumed_net, resumed_opt, range(SAVE, STEPS), part)
            results[cls.__name__] = (captured, _params(model), again, _params(resumed))
        split = RankHeads().double()
        wrapped = nn.parallel.DistributedDataParallel(split, find_unused_parameters=True)
        results["split"] = _split_run(wrapped, split, rank, part)
        views = Views().double()
        wrapped = nn.parallel.DistributedDataParallel(views, find_unused_parameters=True)
        results["views"] = _split_run(wrapped, views, 0, part)
        for reduced in (False, True):  # (no DDP: the gradients reduced by hand, or not)
            bare = Heads().double()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt = tk.KFAC(bare, **SETTINGS)
                gen = torch.Generator().manual_seed(7)
                x = torch.randn(BATCH, 5, generator=gen, dtype=torch.float64)
                y = torch.randint(0, 3, (BATCH,), generator=gen)
                F.cross_entropy(bare(x[part], 0), y[part]).backward()
                for p in (p for p in bare.parameters() if p.grad is not None and reduced):
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
                opt.step()
            results[f"bare_{reduced}"] = [str(w.message) for w in caught]
        torch.save(results, out / f"rank{rank}.pt")
    os._exit(0)  # saved: a gloo thread may abort or hang the interpreter's exit


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_worker, tmp_path_factory.mktemp("schedule"), "spawn", WORLD)


@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC])
def test_heads_are_chased_as_in_one_process(runs: list[dict[str, Any]], cls: type) -> None:
    """Both ranks capture on the steps one process on the whole batch captures (the chase
    of heads ``b`` and ``c``, used every 4th step, included: under ``torch.distributed``
    it used to be one step after a head's first use, so they kept their first statistics,
    or none), and take its steps (1e-9); a resume mid-chase continues bit for bit."""
    model, net, opt = _build(cls, wrap=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = _run(net, opt, range(STEPS), slice(None))
    assert [i for i, c in enumerate(single) if c] != list(range(0, STEPS, 5))  # chases
    for rank in runs:
        captured, final, again, resumed = rank[cls.__name__]
        assert captured == single and again == captured[SAVE:]
        for p, q, r in zip(final, resumed, _params(model), strict=True):
            assert torch.equal(p, q)
            torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-12)


def test_rows_gathered_inside_forward_leave_the_other_layers_alone(
    runs: list[dict[str, Any]],
) -> None:
    """Two views concatenated inside ``forward`` under DDP: the body's rows outnumber the
    samples, which made every layer's ``G`` half its one-process value (the step's samples
    were counted from the largest layer's rows) for a while on 2026-12-06; the steps
    equal one process's."""
    model = Views().double()
    single = _split_run(model, model, 0, slice(None))
    for rank in runs:
        for p, q in zip(rank["views"], single, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_a_head_one_rank_skips_has_the_one_process_block(runs: list[dict[str, Any]]) -> None:
    """Each rank's rows through its own head (DDP with ``find_unused_parameters``): each
    head's block is that of one process sending the halves of the batch through the two
    heads (its ``G`` was over the samples of the rank that ran it: 2×, a step 38 % off
    before 2026-12-06); the steps equal one process's."""
    model = RankHeads().double()
    single = _split_run(model, model, -1, slice(None))
    for rank in runs:
        for p, q in zip(rank["split"], single, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_gradients_left_unreduced_across_ranks_are_warned_of(runs: list[dict[str, Any]]) -> None:
    """No DDP and no all-reduce of the gradients: each rank stepped on its own gradient
    with every rank's curvature, and the replicas drifted apart silently (4.33 apart
    after 4 steps in a trial). A checksum of the gradients, sent with the factors, tells;
    gradients averaged by hand pass."""
    for rank in runs:
        said = [w for w in rank["bare_False"] if "gradients differ" in w]
        assert said and "DistributedDataParallel" in said[0]
        assert not [w for w in rank["bare_True"] if "gradients differ" in w]
