"""What a two-level refresh step replaces (the basis with ``Q``, ``P`` and the split basis,
the kept Fisher rows or ``W₀``) is dropped before the step folds its statistics, KFAC's own
peak (:meth:`~twolevel_kfac.optim.coarse.CoarseLevel.release_replaced`), and dropping it
there changes no step, also when the step raises in between and is retried."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import twolevel_kfac as tk
from twolevel_kfac.optim.coarse import CoarseLevel
from twolevel_kfac.twolevel.layer_basis import LayerBasis

CASES = {  # label: TwoLevelKFAC settings beside lr, damping and the intervals
    "krylov_residual+adef2": {"coarse_space": "krylov_residual", "combination": "adef2"},
    "residual+faithful": {"coarse_space": "residual", "coarse_refresh": "faithful"},
    "nicolaides+balanced": {"coarse_space": "nicolaides", "combination": "balanced"},
    "spectral+adef1": {"coarse_space": "spectral", "combination": "adef1"},
    # a dense Krylov basis (M⁻¹1 under eigenvalue-sum damping): steps on parts split it
    "krylov_nicolaides dense": {
        "coarse_space": "krylov_nicolaides",
        "inverse_method": "eigen",
        "damping_mode": "eigen_sum",
    },
}


def _tensors(b: LayerBasis) -> tuple[torch.Tensor, ...]:
    return (b,) if isinstance(b, torch.Tensor) else tuple(b)


def _replaced(level: CoarseLevel) -> Iterator[torch.Tensor]:
    """Every tensor of what a refresh replaces: the basis, ``Q``'s split basis, the kept
    rows and ``W₀``."""
    for b in level.basis or []:
        yield from _tensors(b)
    operator = level.coarse_operator
    if operator is not None:
        for split in operator._split.values():
            for entry in split:
                parts = entry if isinstance(entry, tuple) else ()
                yield from (t for t in parts if isinstance(t, torch.Tensor))
    for stats in level.fisher_stats or []:
        yield from (stats.a, stats.g)
    if level.fisher_columns is not None:
        yield from level.fisher_columns.columns


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4, bias=False),
        torch.nn.Tanh(), torch.nn.Linear(4, 3),
    )  # fmt: skip


def _optimizer(model: torch.nn.Module, settings: dict[str, Any]) -> tk.TwoLevelKFAC:
    return tk.TwoLevelKFAC(model, lr=0.1, damping=0.05, cov_interval=2, inv_interval=2, **settings)


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(count)
    ]


def _backward(
    model: torch.nn.Module, opt: tk.TwoLevelKFAC, x: torch.Tensor, y: torch.Tensor
) -> None:
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("label", list(CASES))
def test_a_refresh_step_drops_what_it_replaces_before_it_folds_its_statistics(
    label: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the refresh steps 2 and 4, no tensor of the replaced basis, split basis, rows or
    ``W₀`` lives when the factors are folded; the steps are bit for bit those of a twin
    that keeps them until its rebuild."""
    model = _model()
    twin = copy.deepcopy(model)
    opt, kept = _optimizer(model, CASES[label]), _optimizer(twin, CASES[label])
    level = opt.preconditioner.coarse_level
    assert level is not None
    old: list[weakref.ref[torch.Tensor]] = []
    alive_when_folding: list[bool] = []
    fold = opt.preconditioner._update_factors

    def watched(stats: Any, captured: Any) -> Any:
        alive_when_folding.append(any(ref() is not None for ref in old))
        return fold(stats, captured)

    opt.preconditioner._update_factors = watched  # type: ignore[method-assign]
    for step, (x, y) in enumerate(_batches(5)):
        for net, optimizer in ((model, opt), (twin, kept)):
            _backward(net, optimizer, x, y)
            with monkeypatch.context() as patch:
                if optimizer is kept:
                    patch.setattr(CoarseLevel, "release_replaced", lambda self: None)
                optimizer.step()
        old[:] = [weakref.ref(t) for t in _replaced(level)]
        assert old, step  # held between refreshes (and after step 4), so the check can fail
    assert alive_when_folding == [False, False, False]  # steps 0, 2, 4
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("label", ["krylov_residual+adef2", "residual+faithful"])
def test_a_refresh_step_that_raises_after_the_drop_is_retried_as_if_it_had_kept_them(
    label: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second refresh raises while folding its statistics (after the drop). Retried
    with the next batch, the run continues bit for bit as a twin's that kept what it
    replaces; and a state dict taken right after the error (the level holds no basis),
    loaded into a new optimizer, continues the same way: the retry is again a refresh."""
    model = _model()
    twin = copy.deepcopy(model)
    opt, kept = _optimizer(model, CASES[label]), _optimizer(twin, CASES[label])
    batches = _batches(6)

    def fail(stats: Any, captured: Any) -> Any:
        raise RuntimeError("injected")

    for x, y in batches[:3]:  # steps 0 and 1, then the refresh step 2 raises
        for net, optimizer in ((model, opt), (twin, kept)):
            _backward(net, optimizer, x, y)
            with monkeypatch.context() as patch:
                if optimizer is kept:
                    patch.setattr(CoarseLevel, "release_replaced", lambda self: None)
                if x is batches[2][0]:
                    patch.setattr(optimizer.preconditioner, "_update_factors", fail)
                    with pytest.raises(RuntimeError, match="injected"):
                        optimizer.step()
                else:
                    optimizer.step()
    level = opt.preconditioner.coarse_level
    assert level is not None and level.basis is None and level.fisher_stats is None
    with pytest.raises(RuntimeError, match="run a new forward and backward"):
        opt.step()  # a retry without a new forward has nothing to rebuild from
    saved = copy.deepcopy(opt.state_dict())
    resumed_model = copy.deepcopy(model)
    resumed = _optimizer(resumed_model, CASES[label])
    resumed.load_state_dict(saved)
    for x, y in batches[3:]:  # the retried refresh, then steps 3 and 4
        for net, optimizer in ((model, opt), (twin, kept), (resumed_model, resumed)):
            _backward(net, optimizer, x, y)
            with monkeypatch.context() as patch:
                if optimizer is kept:
                    patch.setattr(CoarseLevel, "release_replaced", lambda self: None)
                optimizer.step()
    assert opt.preconditioner.steps == 5
    for net in (twin, resumed_model):
        for p, q in zip(model.parameters(), net.parameters(), strict=True):
            assert torch.equal(p, q)
