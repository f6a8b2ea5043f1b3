"""A checkpoint taken between a captured backward and its ``step()`` (a SIGTERM handler's
save, a callback after ``backward()``): the sampler is saved as it was before that step's
draws, so a resume that redoes the step's forward and backward continues bit for bit (it
drew other targets and rows before 2026-12-06 (night): 0.06–0.07 off under ``mc``), with a
warning that the captured statistics are not saved. The GradScaler's skip count is saved."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk

Build = Callable[[nn.Module], torch.optim.Optimizer]
BUILDS: dict[str, Build] = {
    "kfac_mc": lambda m: tk.KFAC(m, lr=0.1, damping=1e-2, fisher_batch=0.5),
    "twolevel": lambda m: tk.TwoLevelKFAC(m, lr=0.1, damping=1e-2, coarse_space="residual"),
}
REFRESH, END = 10, 13  # a refresh step at the default intervals


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _backward(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    opt.zero_grad()
    F.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=gen)).backward()


def _round_trip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("build", list(BUILDS))
def test_a_resume_redoing_the_step_continues_bit_for_bit(build: str) -> None:
    make = BUILDS[build]
    model = _model()
    opt = make(model)
    for seed in range(END):  # uninterrupted
        _backward(model, opt, seed)
        opt.step()
    run = _model()
    run_opt = make(run)
    for seed in range(REFRESH):
        _backward(run, run_opt, seed)
        run_opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a save at a step boundary says nothing
            run_opt.state_dict()
    _backward(run, run_opt, REFRESH)  # the refresh step's backward; its step() not yet
    with pytest.warns(RuntimeWarning, match="between a captured backward and step"):
        saved = _round_trip({"model": run.state_dict(), "opt": run_opt.state_dict()})
    assert isinstance(saved, dict)
    resumed = _model()
    resumed_opt = make(resumed)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    for seed in range(REFRESH, END):  # the step redone from its forward
        _backward(resumed, resumed_opt, seed)
        resumed_opt.step()
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_load_between_backward_and_step_does_not_warn() -> None:
    """A (refused) load between ``backward()`` and ``step()`` copies the state to fall back
    to: no checkpoint, no warning."""
    model = _model()
    opt = tk.KFAC(model, cov_interval=1)
    _backward(model, opt, 0)
    other = tk.KFAC(nn.Sequential(nn.Linear(6, 3)).double()).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="state is for layers"):
            opt.load_state_dict(other)
    opt.step()


def test_the_gradscaler_skip_count_is_restored() -> None:
    model = _model()
    opt = tk.KFAC(model)
    opt.amp_skipped_steps = 3
    resumed = tk.KFAC(_model())
    resumed.load_state_dict(opt.state_dict())
    assert resumed.amp_skipped_steps == 3
