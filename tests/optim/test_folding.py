"""Folding a refresh step's statistics: KFAC alone forms each layer's statistics when it
folds them and drops them then (one layer's unfolded rows alive at a time), and so does
the default coarse level (``tests/optim/test_coarse_absorb.py``); EKFAC, the other coarse
levels and adaptive damping read them after the fold and keep them."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from twolevel_kfac.optim.folding import keeps_statistics


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip


def batch(seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 2, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def alive_at_each_fold(cls: type[tk.KFAC], **kwargs: Any) -> tuple[list[int], tk.KFAC]:
    """How many earlier layers' statistics are alive when each layer is folded (a refresh
    step), and the optimizer."""
    model = conv_net()
    opt = cls(model, cov_interval=1, inv_interval=1, **kwargs)
    fine = opt.preconditioner.fine
    store, seen, alive = fine.store, [], []

    def watched(name: str, new_a: Tensor, new_g: Tensor, locations: int, stats: Any) -> bool:
        alive.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(stats.a))
        return store(name, new_a, new_g, locations, stats)

    fine.store = watched  # type: ignore[method-assign]
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return alive, opt


def test_kfac_holds_one_layer_statistics_at_a_time() -> None:
    alive, opt = alive_at_each_fold(tk.KFAC)
    assert alive == [0, 0, 0]
    assert not keeps_statistics(opt.preconditioner)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (tk.EKFAC, {}),
        (tk.TwoLevelKFAC, {"combination": "adef2"}),
        (tk.KFAC, {"adaptive_damping": True}),
    ],
)
def test_the_levels_that_read_statistics_after_the_fold_keep_them(
    cls: type[tk.KFAC], kwargs: dict[str, Any]
) -> None:
    if kwargs.get("adaptive_damping"):  # needs a closure: checked through the rule alone
        pre = cls(conv_net(), **kwargs).preconditioner
        assert pre.retain_statistics and keeps_statistics(pre)
        return
    alive, opt = alive_at_each_fold(cls, **kwargs)
    assert alive == [0, 1, 2]
    assert keeps_statistics(opt.preconditioner)
