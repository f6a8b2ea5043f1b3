"""Monte-Carlo Fisher: sampled-target statistics converge to the exact expectation over the
model's predictive distribution (statistical tolerances, fixed seeds; curvlinops' recipe)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import twolevel_kfac as tk
from oracles import exact_kfac_factors, tiny_mlp

SAMPLES = 3000


@pytest.mark.parametrize("likelihood", ("categorical", "bernoulli", "gaussian"))
def test_mc_factor_g_converges_to_exact_expectation(float64: None, likelihood: str) -> None:
    """Average the MC G of the last layer over many refreshes (ema = running mean) and
    compare with G_exact = (1/N) Σ_n J_nᵀ H_n J_n of the likelihood."""
    model = tiny_mlp()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    pre = tk.KFACPreconditioner(model, fisher="mc", likelihood=likelihood, ema_decay=0.9999, seed=1)
    for _ in range(SAMPLES):
        out = model(x)
        (out.sum() * 0).backward()  # the user's loss is irrelevant to the MC statistics
        pre.step()
        model.zero_grad()
    name = list(pre.layers)[-1]
    _, g_exact = exact_kfac_factors(model, x, name, likelihood)
    g_mc = pre.factors[name].G
    assert g_mc is not None
    scale = g_exact.abs().max()
    torch.testing.assert_close(g_mc / scale, g_exact / scale, rtol=1e-1, atol=1.5e-2)
    # and the estimate is not trivially equal to something else: the diagonal is positive
    assert bool((torch.diagonal(g_mc) > 0).all())


def test_mc_uses_sampled_not_true_targets(float64: None) -> None:
    """With one sample the MC G differs from the empirical G of the true labels."""
    model = tiny_mlp()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(6, dtype=torch.long)
    factors = {}
    for fisher in ("mc", "empirical"):
        pre = tk.KFACPreconditioner(model, fisher=fisher, ema_decay=0.0, seed=3)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        pre.remove_hooks()
        factors[fisher] = pre.factors[list(pre.layers)[-1]].G
    assert not torch.allclose(factors["mc"], factors["empirical"])
