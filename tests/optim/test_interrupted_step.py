"""A step interrupted part-way (:mod:`twolevel_kfac.optim.interrupted`): once it has folded
some layers' statistics (or carried EKFAC's scalings into some new eigenbases), the next
step and ``state_dict()`` refuse, naming the step, and loading a state saved before it
continues bit for bit as a run that was never interrupted; a step interrupted before it
changed anything is simply taken again."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk
from twolevel_kfac.curvature.kronecker import KroneckerFactors

SETTINGS = {"cov_interval": 2, "inv_interval": 2, "lr": 0.1}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen))
        for _ in range(8)
    ]


def _step(model: nn.Module, opt: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()


def _raise_on_call(patch: pytest.MonkeyPatch, owner: type, name: str, call: int) -> None:
    """``owner.name`` raises ``KeyboardInterrupt`` on its ``call``-th call (1-based)."""
    original, count = getattr(owner, name), [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    patch.setattr(owner, name, wrapped)


def _twins(
    cls: type, settings: dict[str, Any], steps: int
) -> tuple[nn.Module, Any, nn.Module, Any]:
    """A model and optimizer and their twin, both after ``steps`` equal steps."""
    model, twin = _net(), _net()
    opt, twin_opt = cls(model, **settings), cls(twin, **settings)
    for batch in _batches()[:steps]:
        _step(model, opt, batch)
        _step(twin, twin_opt, batch)
    return model, opt, twin, twin_opt


def _interrupted_step(
    patch: pytest.MonkeyPatch, method: str, model: nn.Module, opt: Any, batch: Any
) -> None:
    """One step whose ``KroneckerFactors.<method>`` raises ``KeyboardInterrupt`` at its
    second call (the second layer's)."""
    with patch.context() as inner:
        _raise_on_call(inner, KroneckerFactors, method, 2)
        with pytest.raises(KeyboardInterrupt):
            _step(model, opt, batch)


@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC, tk.EKFAC])
def test_an_interrupted_fold_is_refused_until_a_saved_state_is_loaded(
    cls: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C as the second layer's factors are updated at step 4 (a fold): the first
    layer's running factors already hold the batch, so the next step and saving refuse;
    the state saved before step 4 loads and the run then equals an uninterrupted one."""
    batches = _batches()
    model, opt, twin, twin_opt = _twins(cls, SETTINGS, 4)
    saved = copy.deepcopy(opt.state_dict())
    _interrupted_step(monkeypatch, "update", model, opt, batches[4])
    with pytest.raises(RuntimeError, match=r"step 4 was interrupted while it folded"):
        _step(model, opt, batches[4])
    with pytest.raises(RuntimeError, match=r"step 4 was interrupted.*saving this state"):
        opt.state_dict()
    opt.load_state_dict(saved)
    for batch in batches[4:]:
        _step(model, opt, batch)
        _step(twin, twin_opt, batch)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_an_interrupted_refresh_of_ekfac_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refresh that folds nothing (``cov_interval=3``, ``inv_interval=2``: step 2) but
    carries EKFAC's scalings into new eigenbases, interrupted in the second layer's
    decomposition: refused."""
    model = _net()
    opt = tk.EKFAC(model, cov_interval=3, inv_interval=2, lr=0.1)
    batches = _batches()
    for batch in batches[:2]:
        _step(model, opt, batch)
    _interrupted_step(monkeypatch, "decompose", model, opt, batches[2])
    with pytest.raises(RuntimeError, match=r"step 2 was interrupted while its refresh"):
        _step(model, opt, batches[2])


@pytest.mark.parametrize("space", ["nicolaides", "spectral", "krylov_nicolaides"])
def test_a_refresh_that_only_decomposes_is_taken_again(
    space: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted in the second layer's decomposition at a refresh that folds nothing
    (``cov_interval=2``, ``inv_interval=3``: step 3), KFAC's state is its factors alone: the step is
    taken again, and a state saved right after the interruption resumes bit for bit as the
    optimizer that took it again (the coarse basis is saved, not rebuilt from half-new
    decompositions), both equal to a run never interrupted."""
    settings = {"cov_interval": 2, "inv_interval": 3, "lr": 0.1, "coarse_space": space}
    batches = _batches()
    model, opt, twin, twin_opt = _twins(tk.TwoLevelKFAC, settings, 3)
    _interrupted_step(monkeypatch, "decompose", model, opt, batches[3])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    resumed = _net()
    resumed.load_state_dict(saved[0])
    resumed_opt = tk.TwoLevelKFAC(resumed, **settings)
    resumed_opt.load_state_dict(saved[1])
    for batch in batches[3:]:
        for net, optimizer in ((model, opt), (twin, twin_opt), (resumed, resumed_opt)):
            _step(net, optimizer, batch)
    for net in (twin, resumed):
        for p, q in zip(model.parameters(), net.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("fisher_batch", [1.0, 0.5])
def test_a_step_interrupted_before_any_change_is_retried_with_the_same_draws(
    fisher_batch: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fisher="mc"`` (and a Fisher subset) draws in the forward and backward: a step that
    raises before it folds anything drops its capture and rewinds the sampler, so the step
    retried after a new forward equals, bit for bit, a run that was never interrupted."""
    settings = {**SETTINGS, "fisher": "mc", "fisher_batch": fisher_batch}
    batches = _batches()
    model, opt, twin, twin_opt = _twins(tk.KFAC, settings, 4)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(opt.preconditioner, "_update_factors", fail)
        with pytest.raises(KeyboardInterrupt):
            _step(model, opt, batches[4])
    for batch in batches[4:]:
        _step(model, opt, batch)
        _step(twin, twin_opt, batch)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_raised_step_under_a_grad_scaler_leaves_no_scale_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``GradScaler.step`` hands the optimizer ``grad_scale`` and deletes it only when the
    step returns, multiplying a leftover one into the next: a step that raises removes
    it, so loading the states saved before it (optimizer and scaler) continues bit for bit
    as a run never interrupted (it was off by 1.27 after 5 steps)."""
    batches = _batches()
    model, twin = _net(), _net()
    opt, twin_opt = tk.KFAC(model, **SETTINGS), tk.KFAC(twin, **SETTINGS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def scaled_step(net: nn.Module, optimizer: Any, grad_scaler: Any, batch: Any) -> None:
        optimizer.zero_grad()
        grad_scaler.scale(F.cross_entropy(net(batch[0]), batch[1])).backward()
        grad_scaler.step(optimizer)
        grad_scaler.update()

    for batch in batches[:4]:
        scaled_step(model, opt, scaler, batch)
        scaled_step(twin, twin_opt, twin_scaler, batch)
    saved = copy.deepcopy((opt.state_dict(), scaler.state_dict()))
    with monkeypatch.context() as patch:
        _raise_on_call(patch, KroneckerFactors, "update", 2)
        with pytest.raises(KeyboardInterrupt):
            scaled_step(model, opt, scaler, batches[4])
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.load_state_dict(saved[0])
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(saved[1])
    for batch in batches[4:]:
        scaled_step(model, opt, scaler, batch)
        scaled_step(twin, twin_opt, twin_scaler, batch)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


class _OtherRanks:
    """The preconditioner's communicator as seen under ``torch.distributed`` (nothing here
    reaches a collective: the step raises before any)."""

    def __init__(self, comm: Any) -> None:
        self._comm = comm
        self.distributed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)


@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC])
def test_under_distributed_any_raised_step_is_refused_after(
    cls: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``torch.distributed`` a step that raised on one rank before changing anything
    is marked too: the other ranks may have taken it (a two-rank run went on a step apart,
    3.6e-2 after one step, until a collective mismatched), so the next step and
    ``state_dict()`` refuse, naming every rank's way back."""
    model, opt, _, _ = _twins(cls, SETTINGS, 1)  # step 1 does not capture
    pre = opt.preconditioner
    pre.comm = _OtherRanks(pre.comm)
    with monkeypatch.context() as inner:
        _raise_on_call(inner, type(pre), "_precondition_grads", 1)
        with pytest.raises(KeyboardInterrupt):
            _step(model, opt, _batches()[1])
    with pytest.raises(RuntimeError, match="every rank must load the same state"):
        _step(model, opt, _batches()[2])
    with pytest.raises(RuntimeError, match="step 1 raised on this rank"):
        opt.state_dict()
