"""Layers that some ranks' forwards skip or see in other shares of the batch, under
``torch.distributed`` (two gloo processes, DDP with ``find_unused_parameters``): a head
that each rank runs alone, and mixture-of-experts experts given other numbers of tokens
on each rank. Every optimizer class takes one process's steps on the whole batch."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from test_accumulation import TiedLM
from worker_pair import gloo_group, run_ranks

WORLD, BATCH, TOKENS, STEPS = 2, 8, 3, 3
SETTINGS = {"lr": 0.1, "damping": 0.05, "cov_interval": 1, "inv_interval": 1, "kl_clip": None}
SETTINGS |= {"fisher": "empirical", "fisher_batch": 1.0}  # no draws: one process is the oracle
SETTINGS |= {"norm_blocks": True}
CLASSES: dict[str, tuple[type, dict[str, Any]]] = {
    "KFAC": (tk.KFAC, {}),
    "EKFAC": (tk.EKFAC, {}),
    "KPSVD": (tk.KPSVD, {}),
    "KFACCorrected": (tk.KFACCorrected, {}),
}


class Experts(nn.Module):
    """Tokens routed top-1 to one of two experts by the sign of their first feature (rows
    gathered from the batch's ``B·T`` tokens: each expert's rows are not the samples), a
    head on the tokens' mean. With ``task >= 0``, rank ``task``'s half of the batch; with
    ``-1`` the whole batch in one forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 6)
        self.experts = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor, task: int) -> Tensor:
        h = torch.tanh(self.embed(x))  # [B, T, 6]
        flat = h.reshape(-1, h.shape[-1])
        route = flat[:, 0] > 0
        mixed = flat.clone()
        for expert, chosen in zip(self.experts, (route, ~route), strict=True):
            index = chosen.nonzero().squeeze(1)
            mixed = mixed.index_add(0, index, expert(flat[index]))
        return self.head(mixed.view_as(h).mean(dim=1))


class RankHeads(Experts):
    """Each rank's rows through its own token table and its own head with a LayerNorm
    (layers the other rank's forward skips); in one process the two halves of the batch
    through the two, in one forward."""

    def __init__(self) -> None:
        super().__init__()
        # (a table over 4096 rows has a block type of its own)
        self.tables = nn.ModuleList(nn.Embedding(rows, 6) for rows in (5, 4100))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 3)) for _ in range(2)
        )

    def forward(self, x: Tensor, task: int) -> Tensor:
        ids = (x[..., 1].abs() * 2).long().clamp(max=4)
        h = torch.tanh(self.embed(x))
        if task >= 0:
            return self.heads[task]((h + self.tables[task](ids)).mean(dim=1))
        half = len(x) // 2
        parts = [
            self.heads[k]((h[rows] + self.tables[k](ids[rows])).mean(dim=1))
            for k, rows in enumerate((slice(0, half), slice(half, None)))
        ]
        return torch.cat(parts)


# (no coarse level: it pairs rows as samples, and refuses a layer on some rows only)
CASES = [(model, name) for model in (Experts, RankHeads) for name in CLASSES]


def batch(step: int) -> tuple[Tensor, Tensor]:
    """Step ``step``'s batch: rank 0's half has tokens routed mostly to expert 0, rank 1's
    mostly to expert 1 (the experts' shares of each rank's tokens differ)."""
    gen = torch.Generator().manual_seed(300 + step)
    x = torch.randn(BATCH, TOKENS, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (BATCH,), generator=gen)
    return x, y


def run(model_type: type[nn.Module], name: str, rank: int | None) -> list[Tensor]:
    """:data:`STEPS` steps of ``name``'s optimizer; on rank ``rank``'s half of each batch
    under DDP, or on the whole batch in one process (``None``)."""
    cls, extra = CLASSES[name]
    model = model_type().double()
    net: nn.Module = model
    if rank is not None:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = cls(model, **SETTINGS, **extra)
    part = (
        slice(None) if rank is None else slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    )
    for k in range(STEPS):
        x, y = batch(k)
        opt.zero_grad()
        F.cross_entropy(net(x[part], -1 if rank is None else rank), y[part]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


class RankTiedLM(TiedLM):
    """:class:`TiedLM` on rank 0's rows (token ids made from them), its classifier on
    rank 1's."""

    def __init__(self) -> None:
        super().__init__(features=4, classes=3)

    def forward(self, x: Tensor, task: int) -> Tensor:
        if task == 0:
            ids = (x[..., 0].abs() * 3).long().clamp(max=6)
            return super().forward(ids, 0).flatten(0, 1)
        return super().forward(x, 1)


def run_tied(name: str, rank: int | None) -> list[Tensor]:
    """:data:`STEPS` steps of ``name``'s optimizer on :class:`RankTiedLM`: rank ``r``'s half
    of each batch through task ``r`` under DDP, or in one process the two halves as two
    micro-batches (``None``)."""
    cls, extra = CLASSES[name]
    model = RankTiedLM().double()
    net: nn.Module = model
    if rank is not None:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    micro = 1 if rank is not None else 2
    opt = cls(model, **SETTINGS, **extra, accumulation_steps=micro)
    for k in range(STEPS):
        x, y = batch(k)
        opt.zero_grad()
        for task in (0, 1) if rank is None else (rank,):
            part = slice(task * BATCH // WORLD, (task + 1) * BATCH // WORLD)
            out = net(x[part], task)
            target = (
                (x[part][..., 1].abs() * 3).long().clamp(max=6).flatten() if task == 0 else y[part]
            )
            F.cross_entropy(out, target).div(micro).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, port: int, out: Path) -> None:
    with gloo_group(rank, port, WORLD):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results: dict[str, Any] = {
                f"{model.__name__}/{name}": run(model, name, rank) for model, name in CASES
            }
            results |= {f"TiedLM/{name}": run_tied(name, rank) for name in ("KFAC", "EKFAC")}
        results["warnings"] = [str(w.message) for w in caught]
        torch.save(results, out / f"rank{rank}.pt")
    os._exit(0)  # saved: a gloo thread may abort or hang the interpreter's exit


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_worker, tmp_path_factory.mktemp("skipped"), "fork", WORLD)


def test_the_experts_shares_differ_between_the_ranks() -> None:
    """(The premise of the tests below.)"""
    x, _ = batch(0)
    model = Experts().double()
    flat = torch.tanh(model.embed(x)).reshape(WORLD, -1, 6)
    routed = (flat[:, :, 0] > 0).sum(dim=1).tolist()
    assert routed[0] != routed[1] and all(0 < r < BATCH * TOKENS // WORLD for r in routed)


@pytest.mark.parametrize(("model", "name"), CASES)
def test_each_rank_steps_as_one_process(
    runs: list[dict[str, Any]], model: type[nn.Module], name: str
) -> None:
    """Experts given other numbers of a rank's tokens, and a token table and a head with a
    LayerNorm that each rank runs alone, have the whole batch's blocks, for the Kronecker
    factors and for what a fine level reads from the statistics after them (EKFAC's
    scalings, KPSVD's and KFAC-corrected's fits). Before 2026-12-06
    (day), the experts' ``δ`` were scaled per rank (``G`` off by the spread of their
    shares); the skipped head's norm and the other fine levels' statistics of its
    ``Linear`` averaged over the rank that ran it (21-49 % off one process's step, warned
    but for the norm)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = run(model, name, None)
    for rank in runs:
        for got, want in zip(rank[f"{model.__name__}/{name}"], single, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["KFAC", "EKFAC"])
def test_a_tied_table_one_rank_skips_steps_as_one_process(
    runs: list[dict[str, Any]], name: str
) -> None:
    """A table tied to an LM head that rank 1 skips: its block is the whole batch's, as
    one process's with the ranks' halves as two micro-batches. On 2026-12-06 (day) the
    step's share scaled the captured output gradients for a while, which are the table's
    ``ā`` and the head's ``δ``: a step 24 % off."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = run_tied(name, None)
    for rank in runs:
        for got, want in zip(rank[f"TiedLM/{name}"], single, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_no_rank_warns_of_a_skipped_layer(runs: list[dict[str, Any]]) -> None:
    """The warning that other fine levels' statistics of a skipped layer were the ranks'
    that ran it is gone with the cause."""
    for rank in runs:
        assert not [w for w in rank["warnings"] if "skipped by the forwards" in w]
