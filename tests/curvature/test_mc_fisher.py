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


@pytest.mark.parametrize("damping_mode", ["pi", "eigen_sum"])
def test_mean_reduction_is_the_sum_reduction_rescaled(float64: None, damping_mode: str) -> None:
    """``loss_reduction="mean"`` (the loss averaged over the ``D`` output features as well,
    torch's default ``MSELoss``): the MC Fisher's ``G`` is ``1/D²`` of ``sum``'s for the same
    samples, and ``mean`` with ``λ/D²`` and ``lr/D`` takes ``sum``'s steps with ``λ`` and ``lr``
    (gradient ``g/D``, direction ``D·d``: the KL clip's ``⟨d, g⟩`` is unchanged)."""
    import copy

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 6))
    x = torch.rand(10, 6)
    d, lr, damping = 6, 0.2, 1e-2
    runs = []
    for reduction in ("sum", "mean"):
        model = copy.deepcopy(base)
        scale = d if reduction == "mean" else 1
        opt = tk.KFAC(
            model,
            lr=lr / scale,
            damping=damping / scale**2,
            damping_mode=damping_mode,
            likelihood="gaussian",
            loss_reduction=reduction,
            kl_clip=1e-3,
        )
        for _ in range(3):
            opt.zero_grad()
            per_feature = 0.5 * (model(x) - x).square()
            loss = per_feature.mean() if reduction == "mean" else per_feature.sum(1).mean()
            loss.backward()
            opt.step()
        runs.append((model, opt))
    (sum_model, sum_opt), (mean_model, mean_opt) = runs
    for name, f in sum_opt.preconditioner.factors.items():
        g_mean = mean_opt.preconditioner.factors[name].G
        torch.testing.assert_close(g_mean * d**2, f.G, rtol=1e-10, atol=1e-14)
    for p, q in zip(sum_model.parameters(), mean_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)
