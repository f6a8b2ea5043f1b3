"""A NaN/Inf loss or gradient never reaches the parameters, the momentum or the factors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk


def model_and_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("optimizer", (tk.KFAC, tk.TwoLevelKFAC))
@pytest.mark.parametrize("fisher", ("mc", "empirical"))
def test_poisoned_batch_changes_nothing(optimizer: type[tk.KFAC], fisher: str) -> None:
    model, x, y = model_and_batch()
    opt = optimizer(model, lr=0.1, fisher=fisher, cov_interval=1)
    step(model, opt, x, y)
    params = copy.deepcopy(list(model.parameters()))
    factors = {
        n: (f.A.clone(), f.G.clone())
        for n, f in opt.preconditioner.factors.items()
        if f.A is not None and f.G is not None
    }
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    poisoned = x.clone()
    poisoned[3, 2] = float("nan")
    step(model, opt, poisoned, y)
    for before, after in zip(params, model.parameters(), strict=True):
        assert torch.equal(before, after)
    for name, (a, g) in factors.items():
        assert torch.equal(opt.preconditioner.factors[name].A, a)
        assert torch.equal(opt.preconditioner.factors[name].G, g)
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], momentum[id(p)])
    assert opt.nonfinite_steps == 1 and opt.consecutive_nonfinite == 1
    assert opt.last_stats == {"nonfinite_skipped": 1.0}
    step(model, opt, x, y)  # training goes on with the next good batch
    assert opt.consecutive_nonfinite == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_policy_raise() -> None:
    model, x, y = model_and_batch()
    opt = tk.KFAC(model, lr=0.1, nonfinite_policy="raise")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        step(model, opt, x * float("inf"), y)
    with pytest.raises(ValueError, match="nonfinite_policy must be one of"):
        tk.KFAC(model, nonfinite_policy="ignore")
