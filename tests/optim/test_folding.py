"""Folding a refresh step's statistics: KFAC alone forms each layer's statistics when it
folds them and drops them then (one layer's unfolded rows alive at a time), and so does
the default coarse level (``tests/optim/test_coarse_absorb.py``); EKFAC, the other coarse
levels and adaptive damping read them after the fold and keep them."""

from __future__ import annotations

import warnings
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


def train(model: nn.Module, opt: tk.KFAC, steps: int) -> None:
    for seed in range(steps):
        x, y = batch(seed)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("inverse_method", ["cholesky", "eigen"])
def test_a_refresh_step_decomposes_each_layer_as_it_is_folded(inverse_method: str) -> None:
    """At a refresh step each layer is decomposed right after its fold, so its old
    decomposition is gone before the next layer is folded (eigenpairs freed; a Cholesky
    step's frozen factor, the factor itself, updated in place: no second copy), and the
    refresh decomposes nothing again (one decomposition per factor and refresh)."""
    model = conv_net()
    opt = tk.KFAC(model, cov_interval=2, inv_interval=2, inverse_method=inverse_method)
    train(model, opt, 2)  # refreshed at step 0
    pre = opt.preconditioner
    fine, names = pre.fine, list(pre.layers)
    assert fine.decomposes_at_fold()  # step 2 refreshes
    old = [pre.factors[n].decomp_a[0] for n in names]
    versions = [t._version for t in old]
    refs = [weakref.ref(t) for t in old]
    del old
    store, replaced = fine.store, []

    def gone(i: int, name: str) -> bool:
        if inverse_method == "eigen":
            return refs[i]() is None
        factors = pre.factors[name]  # the same tensor, written: frozen again at once
        a = refs[i]()
        return a is factors.A and factors.decomp_a[0] is a and a._version > versions[i]

    def watched(name: str, *args: Any) -> bool:
        stored = store(name, *args)
        replaced.append([gone(i, n) for i, n in enumerate(names)])
        return stored

    calls: list[str] = []
    for name, factors in pre.factors.items():
        decompose = factors.decompose
        factors.decompose = lambda method, n=name, d=decompose: (calls.append(n), d(method))[1]  # type: ignore[method-assign]
    fine.store = watched  # type: ignore[method-assign]
    train(model, opt, 1)
    assert replaced == [[True, False, False], [True, True, False], [True, True, True]]
    assert calls == names  # once each, at the fold: the refresh left them alone
    assert not fine.decomposes_at_fold()  # step 3 folds nothing


@pytest.mark.parametrize(
    "settings",
    [
        {"cov_interval": 2, "inv_interval": 2},
        {"cov_interval": 1, "inv_interval": 3},
        {"inverse_method": "eigen", "cov_interval": 2, "inv_interval": 2},
    ],
)
def test_decomposing_at_the_fold_gives_the_steps_of_the_refresh(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any]
) -> None:
    model = conv_net()
    twin = conv_net()
    opt, other = tk.KFAC(model, **settings), tk.KFAC(twin, **settings)
    train(model, opt, 7)
    monkeypatch.setattr(type(other.preconditioner.fine), "decomposes_at_fold", lambda self: False)
    train(twin, other, 7)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("cov_interval", "weight_sharing", "warns"),
    [(2, "expand", True), (1, "expand", False), (2, "reduce", False)],
)
def test_a_changed_number_of_locations_is_told(
    cov_interval: int, weight_sharing: str, warns: bool
) -> None:
    """Inputs of another size at a later capture (multi-scale training): the steps between
    captures divide by the last capture's ``T``, which a warning says once per layer; not
    when every step captures, nor under ``reduce`` (no division by ``T``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 2))  # fmt: skip
    opt = tk.KFAC(
        model, fisher="empirical", cov_interval=cov_interval, inv_interval=cov_interval,
        weight_sharing=weight_sharing,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for side in (6, 6, 9, 9, 6, 6, 9, 9):
            opt.zero_grad()
            x, y = torch.randn(4, 2, side, side), torch.randint(0, 2, (4,))
            F.cross_entropy(model(x), y).backward()
            opt.step()
    told = [str(w.message) for w in caught if "number of locations T" in str(w.message)]
    assert len(told) == (1 if warns else 0)
    if warns:
        assert "layer '0'" in told[0] and "(16 → 49)" in told[0]


@pytest.mark.parametrize(
    ("first", "warns"), [((5, 6, 7, 8), False), ((5, 5, 5, 5), False), ((2, 3, 2, 3), True)]
)  # real positions per sample at the first capture; at the second (6, 7, 8, 8): T = 7.25
def test_a_sequences_real_positions_are_told_only_when_they_move_by_half(
    first: tuple[int, ...], warns: bool
) -> None:
    """Batches padded to their longest sequence: the real positions per sample (``T =
    M/N``) move by tens of percent from batch to batch; told only beyond half (a newcomer's
    padded language model was warned at every run, and told to use ``reduce``, which does
    not suit a loss per position), and then without that advice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    opt = tk.KFAC(model, fisher="empirical", class_dim=-1, cov_interval=2, inv_interval=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for lengths in (first, first, (6, 7, 8, 8), (6, 7, 8, 8)):
            opt.zero_grad()
            x, y = torch.randn(4, 8, 3), torch.randint(0, 4, (4, 8))
            for n, length in enumerate(lengths):
                y[n, length:] = -100  # padding: no loss term, dead positions
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
            loss.backward()
            opt.step()
    told = [str(w.message) for w in caught if "number of locations T" in str(w.message)]
    assert len(told) == (1 if warns else 0)
    if warns:
        assert "(2.5 → 7.25)" in told[0] and "reduce" not in told[0]
