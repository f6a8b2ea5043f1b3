"""``zero_grad(set_to_none=False)`` (torch's default before 2.0, common in AMP loops) with a
head used on some steps only: its zeroed ``.grad`` is no gradient of those steps."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk

INTERVALS = {"cov_interval": 3, "inv_interval": 3, "damping": 0.03, "momentum": 0.0, "lr": 0.05}


class Aux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.main, self.aux = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: Tensor, use_aux: bool) -> Tensor:
        h = torch.tanh(self.trunk(x))
        return self.main(h) + self.aux(h) if use_aux else self.main(h)


@pytest.mark.parametrize(
    "make",
    (
        lambda m, f: tk.KFAC(m, fisher=f, **INTERVALS),
        lambda m, f: tk.EKFAC(m, fisher=f, **INTERVALS),
        lambda m, f: tk.TwoLevelKFAC(m, fisher=f, **INTERVALS),
    ),
    ids=("kfac", "ekfac", "twolevel"),
)
@pytest.mark.parametrize("fisher", ("empirical", "mc"))
def test_a_zeroed_gradient_of_an_unused_head_is_no_gradient(
    float64: None, make: Callable[[nn.Module, str], torch.optim.Optimizer], fisher: str
) -> None:
    """The head, first used between two captures and unused at the next capture, kept a
    zero ``.grad`` that counted as a gradient: the step refused it ("no curvature
    statistics"), and a capture that missed it was chased. Now the run is the one with
    ``set_to_none=True`` (without momentum, which torch also applies to a zero ``.grad``)."""
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(16, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen))
        for _ in range(12)
    ]
    runs = {}
    for set_to_none in (True, False):
        model = Aux().double()
        opt = make(model, fisher)
        for i, (x, y) in enumerate(data):
            opt.zero_grad(set_to_none=set_to_none)
            F.cross_entropy(model(x.double(), use_aux=i % 4 == 1), y).backward()
            with pytest.warns(RuntimeWarning) if i == 1 else nullcontext():
                opt.step()  # step 1: the head is first used between two captures
        runs[set_to_none] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(runs[False], runs[True], rtol=0.0, atol=1e-15)
