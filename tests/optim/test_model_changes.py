"""The model changed after the optimizer was built: its dtype (``model.double()``,
``.half()``, ``.to(dtype)``) is refused by name at the next step, and the documented way on
(a new optimizer with ``factor_dtype`` loading the old state) runs for every class."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk

CLASSES: dict[str, Any] = {
    "kfac": tk.KFAC,
    "ekfac": tk.EKFAC,
    "kpsvd": tk.KPSVD,
    "twolevel": tk.TwoLevelKFAC,
    "residual_adef2": lambda m, **k: tk.TwoLevelKFAC(
        m, coarse_space="residual", combination="adef2", **k
    ),
}


def _run(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_whose_dtype_changed_is_refused_then_resumes(name: str, dtype: Any) -> None:
    """``model.to(dtype)`` after two steps: the next step is refused, naming the layer,
    both dtypes and the fix, and moves nothing (KFAC kept float32 statistics of a float64
    model, 1.5e-6 off on a step of 10; EKFAC, KPSVD and two-level raised a bare dtype
    mismatch). A new optimizer built on the converted model with the old
    ``factor_dtype`` loads the old state and steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = CLASSES[name](model, lr=0.1)
    _run(model, opt, 2)
    model.to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    told = rf"weight is {dtype} but was torch.float32 .*factor_dtype"
    with pytest.raises(ValueError, match=told):
        _run(model, opt, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    again = CLASSES[name](model, lr=0.1, factor_dtype=torch.float32)
    again.load_state_dict(opt.state_dict())
    _run(model, again, 3)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("build", [tk.KFAC, tk.TwoLevelKFAC, tk.KFACPreconditioner])
def test_copies_of_the_optimizer_are_refused_and_its_state_dict_is_the_way(build: Any) -> None:
    """``copy.deepcopy``, ``copy.copy`` and ``torch.save`` of an optimizer or a
    preconditioner raise, naming ``state_dict()`` (the optimizer's copy had no
    preconditioner and failed at its first step; the preconditioner's did nothing while a
    torch optimizer beside it took a plain step); the model still copies and pickles."""
    import copy
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = build(model)
    for copier in (copy.deepcopy, copy.copy, lambda o: torch.save(o, io.BytesIO())):
        with pytest.raises(TypeError, match=r"cannot be copied or pickled.*state_dict\(\)"):
            copier(opt)
    torch.save(copy.deepcopy(model), io.BytesIO())
