"""``torch.optim.SGD``'s options in a param group (copied from an SGD set-up): refused
where they would change the step, at construction, ``add_param_group`` or a later step
(``maximize=True`` in a group stepped downhill, silently, before 2026-12-09)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("optimizer", [tk.KFAC, tk.EKFAC, tk.TwoLevelKFAC])
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("maximize", True, "negated objective"),
        ("dampening", 0.5, "without dampening"),
        ("differentiable", True, "torch.no_grad"),
    ],
)
def test_a_group_with_an_sgd_option_that_changes_the_step_is_refused(
    optimizer: type, key: str, value: object, message: str
) -> None:
    model = mlp()
    groups = [{"params": model[0].parameters(), key: value}, {"params": model[2].parameters()}]
    with pytest.raises(ValueError, match=rf"param group sets {key}={value!r}.*{message}"):
        optimizer(model, params=groups, lr=0.1)
    opt = optimizer(model, params=[{"params": model[0].parameters()}], lr=0.1)
    with pytest.raises(ValueError, match=rf"sets {key}="):
        opt.add_param_group({"params": model[2].parameters(), key: value})
    opt = optimizer(model, lr=0.1)
    opt.param_groups[0][key] = value  # set after the group was added
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"param group 0 sets {key}="):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_options_that_change_no_number_and_false_values_pass() -> None:
    """``foreach`` and ``fused`` (implementation flags) and the SGD defaults pass."""
    model = mlp()
    groups = [
        {"params": model[0].parameters(), "foreach": True, "maximize": False},
        {"params": model[2].parameters(), "dampening": 0.0, "differentiable": False},
    ]
    opt = tk.KFAC(model, params=groups, lr=0.1)
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    opt.step()


def test_nesterov_without_momentum_is_refused_as_torch_does() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="nesterov=True needs a momentum"):
        tk.KFAC(model, lr=0.1, momentum=0.0, nesterov=True)
    opt = tk.KFAC(model, params=[{"params": model[0].parameters()}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="nesterov=True needs a momentum"):
        opt.add_param_group({"params": model[2].parameters(), "nesterov": True, "momentum": 0})
    tk.KFAC(mlp(), lr=0.1, momentum=0.9, nesterov=True)  # (with a momentum: taken)
