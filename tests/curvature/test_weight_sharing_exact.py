"""Eschenhagen et al. (2023): for a linear layer with weight sharing and a Gaussian
likelihood, KFAC-expand is the exact Fisher block when the loss has a term per location
(the expand setting), and KFAC-reduce is when one prediction per sample is made from the
locations' mean (the reduce setting). Checked in expectation: the MC factors are averaged
over many refreshes and compared with the dense Fisher (torch.func); each mode is also shown
to be wrong in the other setting, so the check can fail."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import exact_fisher

N, T, D, C = 5, 4, 3, 2
REFRESHES = 2000


class Expand(nn.Module):
    """``f_nt = W x_nt``: a prediction (and a loss term) per location."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(D, C, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class Reduce(Expand):
    """``f_n = W mean_t x_nt`` (as the layer's mean output): one prediction per sample."""

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x).mean(dim=1)


def kfac_block(model: nn.Module, x: Tensor, mode: str) -> Tensor:
    """The effective dense block ``T_eff · (G ⊗ A)`` (row-major ``vec(W)``) of the MC
    factors averaged over :data:`REFRESHES` refreshes."""
    pre = tk.KFACPreconditioner(
        model,
        likelihood="gaussian",
        ema_decay=1 - 1 / REFRESHES,
        cov_interval=1,
        inv_interval=1,
        weight_sharing=mode,
        seed=3,
    )
    for _ in range(REFRESHES):
        (model(x).sum() * 0).backward()
        pre.step()
        model.zero_grad()
    factors = pre.factors["layer"]
    assert factors.A is not None and factors.G is not None
    return factors.num_locations * torch.kron(factors.G, factors.A)


def relative_error(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize(("setting", "right", "wrong"), [(Expand, "expand", "reduce"),
                                                         (Reduce, "reduce", "expand")])  # fmt: skip
def test_each_mode_is_exact_in_its_setting(
    float64: None, setting: type[nn.Module], right: str, wrong: str
) -> None:
    x = torch.randn(N, T, D, generator=torch.Generator().manual_seed(1)) + 0.5
    model = setting()
    fisher = exact_fisher(model, x, "gaussian")
    assert relative_error(kfac_block(model, x, right), fisher) < 0.06
    assert relative_error(kfac_block(model, x, wrong), fisher) > 0.3
