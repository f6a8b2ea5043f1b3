"""Gradient accumulation over micro-batches equals one step on the whole batch (empirical
Fisher: ``accumulation_steps`` scales δ; MC statistics need no scaling)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import twolevel_kfac as tk
from oracles import assert_close_report, tiny_convnet
from test_kfac_exact import CONTRACT, make_batch, prepare


def update(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batches: int,
) -> list[torch.Tensor]:
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
        (nn.functional.cross_entropy(model(xs), ys) / micro_batches).backward()
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]


@pytest.mark.parametrize(
    ("optimizer", "extra"),
    [(tk.KFAC, {}), (tk.TwoLevelKFAC, {"coarse_space": "residual", "combination": "adef2"})],
)
def test_accumulated_micro_batches_equal_one_batch(
    float64: None, optimizer: type[tk.KFAC], extra: dict[str, str]
) -> None:
    model = prepare(tiny_convnet())
    twin = copy.deepcopy(model)
    x, y = make_batch((2, 5, 5), 2, 8)
    whole = update(model, optimizer(model, damping=0.05, **CONTRACT, **extra), x, y, 1)
    accumulated = update(
        twin, optimizer(twin, damping=0.05, accumulation_steps=4, **CONTRACT, **extra), x, y, 4
    )
    for got, want in zip(accumulated, whole, strict=True):
        assert_close_report(got, want, rtol=1e-9, atol=1e-12)


def test_accumulation_steps_is_validated() -> None:
    with pytest.raises(ValueError, match="accumulation_steps must be"):
        tk.KFAC(tiny_convnet(), accumulation_steps=0)
