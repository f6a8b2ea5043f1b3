"""Steps taken out of the usual order: ``step()`` again with no backward since the last one
is refused before it changes anything (it preconditioned the direction the last step wrote
into ``.grad``: 1.37e4 against a step of 7.9), whatever the class; the loops that do run a
backward before each step are not."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk

CLASSES: dict[str, Any] = {
    "kfac": lambda m: tk.KFAC(m, lr=0.1, weight_decay=0.1),
    "ekfac": lambda m: tk.EKFAC(m, lr=0.1),
    "twolevel_adef2": lambda m: tk.TwoLevelKFAC(m, lr=0.1, combination="adef2"),
    "adamw_fallback": lambda m: tk.KFAC(m, lr=0.1, fallback="adamw"),
}
X, Y = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3))


def _step(model: nn.Module, opt: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    opt.zero_grad(set_to_none=set_to_none)
    F.cross_entropy(model(X), Y).backward()
    opt.step()


@pytest.mark.parametrize("name", list(CLASSES))
def test_a_second_step_without_backward_is_refused_and_changes_nothing(name: str) -> None:
    models = [_model(), _model()]
    opts = [CLASSES[name](m) for m in models]
    for step in range(4):
        for i, (model, opt) in enumerate(zip(models, opts, strict=True)):
            _step(model, opt)
            if i == 0 and step in (0, 2):  # after a capturing step and after a plain one
                with pytest.raises(RuntimeError, match=r"step\(\) was called on layer"):
                    opt.step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_preconditioner_beside_a_torch_optimizer_is_refused_too() -> None:
    model = _model()
    pre, sgd = tk.KFACPreconditioner(model), torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(X), Y).backward()
    pre.step()
    sgd.step()
    with pytest.raises(RuntimeError, match="no backward since a step wrote"):
        pre.step()


@pytest.mark.parametrize("name", list(CLASSES))
def test_backward_before_each_step_is_not_refused(name: str) -> None:
    """``zero_grad(set_to_none=False)`` (the gradients zeroed in place, then accumulated)
    and ``step(closure)`` run a backward before each step: not refused."""
    model = _model()
    opt = CLASSES[name](model)
    for _ in range(3):
        _step(model, opt, set_to_none=False)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)


@pytest.mark.parametrize("name", list(CLASSES))
def test_a_step_before_any_backward_does_nothing(name: str) -> None:
    """``step()`` before the first backward: nothing moves, and the run after it is its
    twin's (two-level KFAC raised "decompose() must run before apply_inverse()")."""
    models = [_model(), _model()]
    opts = [CLASSES[name](m) for m in models]
    opts[0].step()
    for _ in range(3):
        for model, opt in zip(models, opts, strict=True):
            _step(model, opt)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)
