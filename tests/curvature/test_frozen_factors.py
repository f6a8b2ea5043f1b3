"""A Cholesky refresh freezes each factor by keeping the factor itself, not a copy
(``decompose_factor``); the factor's next update then writes a new tensor. The frozen
factor must never move with the running one: between refreshes (``cov_interval <
inv_interval``), after a ``torch.load`` (which keeps the shared storage shared but not the
tensor objects) and for an embedding table's factors (``TokenFactors``)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from test_embedding import C, D, N, T, TokenNet, V
from twolevel_kfac.curvature.kronecker import KroneckerFactors
from twolevel_kfac.curvature.running_average import running_average, shares_memory
from twolevel_kfac.curvature.tokens import TokenFactors

SETTINGS: dict[str, Any] = {
    "lr": 0.1,
    "damping": 0.1,
    "fisher": "mc",
    "inverse_method": "cholesky",
    "ema_decay": 0.9,
    "momentum": 0.9,
    "class_dim": -1,
}


class BigTableNet(TokenNet):
    """:class:`TokenNet` over a 5,000-row table (tokens ``0 … V−1`` of it are used): its
    factors are :class:`TokenFactors` (a diagonal token-frequency factor)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5000, D)


def batch(seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randint(0, V, (N, T), generator=gen), torch.randint(0, C, (N, T), generator=gen)


def train(model: nn.Module, opt: tk.KFAC, seeds: range) -> None:
    for seed in seeds:
        tokens, y = batch(seed)
        opt.zero_grad()
        F.cross_entropy(model(tokens).flatten(0, 1), y.flatten()).backward()
        opt.step()


def frozen_and_running(factors: object) -> list[tuple[Tensor, Tensor]]:
    """(frozen, running) pairs of a layer's factors."""
    if isinstance(factors, TokenFactors):
        assert factors.a_decomposition is not None and factors.frozen_frequencies is not None
        assert factors.a_factor is not None and factors.frequencies is not None
        return [
            (factors.a_decomposition[0], factors.a_factor),
            (factors.frozen_frequencies, factors.frequencies),
        ]
    assert isinstance(factors, KroneckerFactors)
    assert factors.decomp_a is not None and factors.decomp_g is not None
    assert factors.A is not None and factors.G is not None
    return [(factors.decomp_a[0], factors.A), (factors.decomp_g[0], factors.G)]


def test_out_of_place_average_rounds_as_in_place() -> None:
    gen = torch.Generator().manual_seed(0)
    average, new = torch.randn(7, 7, generator=gen), torch.randn(7, 7, generator=gen)
    kept = average.clone()
    out = running_average(average, new, 0.95, in_place=False)
    assert out is not average and torch.equal(average, kept)
    assert torch.equal(out, running_average(kept, new, 0.95))
    assert shares_memory(kept, out, kept[1:]) and not shares_memory(out, kept, None)


def test_equal_intervals_keep_one_copy_of_each_factor() -> None:
    """``cov_interval = inv_interval`` (the defaults): the running factors are the frozen
    ones between refreshes, in memory and in the saved state."""
    model = BigTableNet()
    opt = tk.KFAC(model, **SETTINGS, cov_interval=2, inv_interval=2)
    train(model, opt, range(3))
    pre = opt.preconditioner
    assert isinstance(pre.factors["emb"], TokenFactors)
    for factors in pre.factors.values():
        for frozen, running in frozen_and_running(factors):
            assert frozen is running
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for name in pre.factors:
        state = loaded["preconditioner"]["factors"][name]
        first, second = (
            (state["A"], state["decomp_a"][0])
            if "A" in state
            else (state["a_factor"], state["a_decomposition"][0])
        )
        assert shares_memory(first, second), name  # saved once


@pytest.mark.parametrize("resume_at", [None, 3, 4])
def test_the_frozen_factors_stay_while_the_running_ones_move(resume_at: int | None) -> None:
    """``cov_interval=1, inv_interval=3``: the factors move at every step, the frozen ones
    equal the factors of the last refresh; a run reloaded (``torch.load``) right after a
    refresh (step 4) or between refreshes (step 3) steps bit-identically."""
    model = BigTableNet()
    opt = tk.KFAC(model, **SETTINGS, cov_interval=1, inv_interval=3)
    pre = opt.preconditioner
    snapshots: dict[str, list[Tensor]] = {}
    for step in range(8):
        train(model, opt, range(step, step + 1))
        if step + 1 == resume_at:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
            model = BigTableNet()
            model.load_state_dict(saved["model"])
            opt = tk.KFAC(model, **SETTINGS, cov_interval=1, inv_interval=3)
            opt.load_state_dict(saved["opt"])
            pre = opt.preconditioner
        for name, factors in pre.factors.items():
            pairs = frozen_and_running(factors)
            if step % 3 == 0:  # a refresh: the frozen factors are this step's
                assert all(frozen is running for frozen, running in pairs), name
                snapshots[name] = [running.clone() for _, running in pairs]
            else:
                for (frozen, running), kept in zip(pairs, snapshots[name], strict=True):
                    assert torch.equal(frozen, kept) and not torch.equal(running, kept), name
    reference = BigTableNet()
    train(reference, tk.KFAC(reference, **SETTINGS, cov_interval=1, inv_interval=3), range(8))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
