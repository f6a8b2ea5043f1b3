"""Adaptive Levenberg–Marquardt damping and the quadratic-model step (Martens & Grosse
2015 §6.5, §7): ρ exactly 1 where the quadratic model is exact, ρ against the dense
formula with the exact empirical Fisher elsewhere, λ moving the right way on schedule,
(α, μ) minimising the dense damped model, and bit-identical resume."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import dense_fisher, layer_param_vector, loss_gradient, per_sample_vectors, tiny_mlp
from twolevel_kfac.optim.damping import DampingOptions, adjust_damping, solve_step_and_momentum

OMEGA = (19 / 20) ** 5
BASE = {"fisher": "empirical", "ema_decay": 0.0, "kl_clip": None, "momentum": 0.0}


def mse(output: Tensor, target: Tensor) -> Tensor:
    return 0.5 * (output - target).square().sum() / len(output)


def quadratic_problem(residual: float, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """Linear model + MSE with every residual ±``residual``: the loss is exactly quadratic,
    and for ``residual = 1`` its Hessian equals the empirical Fisher (δ_n = ±1), so the
    quadratic model of the step is exact."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    x = torch.randn(8, 3)
    with torch.no_grad():
        y = model(x) + residual * torch.sign(torch.randn(8, 1))
    return model, x, y


def closure_of(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, loss_fn):  # type: ignore[no-untyped-def]
    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC, tk.EKFAC])
def test_rho_is_one_on_an_exact_quadratic_and_damping_shrinks(float64: None, cls: type) -> None:
    model, x, y = quadratic_problem(1.0)
    opt = cls(model, lr=1.0, damping=0.1, adaptive_damping=True, **BASE)
    opt.step(closure_of(model, opt, x, y, mse))
    assert opt.last_stats["rho"] == pytest.approx(1.0, abs=1e-12)
    assert opt.preconditioner.damping == pytest.approx(0.1 * OMEGA, rel=1e-14)


def test_damping_grows_when_the_model_is_too_optimistic(float64: None) -> None:
    """Residuals ±0.01: the empirical Fisher is 10⁻⁴ × the Hessian, the step overshoots,
    ρ < 1/4 and λ ← λ/ω₁."""
    model, x, y = quadratic_problem(0.01)
    opt = tk.KFAC(model, lr=1.0, damping=0.1, adaptive_damping=True, **BASE)
    opt.step(closure_of(model, opt, x, y, mse))
    assert opt.last_stats["rho"] < 0.25
    assert opt.preconditioner.damping == pytest.approx(0.1 / OMEGA, rel=1e-14)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_rho_equals_the_dense_formula(float64: None, weight_decay: float) -> None:
    """ρ = (h(θ+δ) − h(θ)) / (∇hᵀδ + ½δᵀ(F + η)δ), F the exact empirical Fisher (all
    layers, inter-layer blocks included), h = L + (η/2)‖θ‖²."""
    torch.manual_seed(2)
    model = tiny_mlp()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 2, (6,), generator=gen)
    loss_fn = nn.functional.cross_entropy
    theta = layer_param_vector(model)
    g = layer_param_vector(model, loss_gradient(model, loss_fn, x, y))
    fisher = dense_fisher(per_sample_vectors(model, loss_fn, x, y))
    with torch.no_grad():
        h0 = float(loss_fn(model(x), y)) + 0.5 * weight_decay * float(theta @ theta)
    opt = tk.KFAC(
        model, lr=0.5, damping=0.05, weight_decay=weight_decay, adaptive_damping=True, **BASE
    )
    opt.step(closure_of(model, opt, x, y, loss_fn))
    new = layer_param_vector(model)
    delta = new - theta
    with torch.no_grad():
        h1 = float(loss_fn(model(x), y)) + 0.5 * weight_decay * float(new @ new)
    predicted = float((g + weight_decay * theta) @ delta) + 0.5 * float(
        delta @ (fisher @ delta) + weight_decay * delta @ delta
    )
    assert opt.last_stats["rho"] == pytest.approx((h1 - h0) / predicted, rel=1e-10)
    assert opt.last_stats["predicted_change"] == pytest.approx(predicted, rel=1e-10)


def test_damping_changes_only_every_interval(float64: None) -> None:
    model, x, y = quadratic_problem(1.0)
    opt = tk.KFAC(model, lr=0.5, damping=0.1, adaptive_damping=True, damping_interval=3, **BASE)
    closure = closure_of(model, opt, x, y, mse)
    dampings = []
    for _ in range(7):
        opt.step(closure)
        dampings.append(opt.preconditioner.damping)
        assert ("rho" in opt.last_stats) == (opt.preconditioner.steps % 3 == 1)
    assert dampings[0] == pytest.approx(0.1 * (19 / 20) ** 3)  # ρ = 1 on the first step
    for k in (1, 2, 4, 5):
        assert dampings[k] == dampings[k - 1]


def test_qmodel_step_minimises_the_dense_damped_model(float64: None) -> None:
    """(α, μ) make the gradient of ∇hᵀδ + ½δᵀ(F + λ)δ orthogonal to Δ and δ₀ (M&G §7)."""
    torch.manual_seed(4)
    model = tiny_mlp()
    gen = torch.Generator().manual_seed(5)
    loss_fn = nn.functional.cross_entropy
    opt = tk.KFAC(model, damping=0.1, qmodel_lr_momentum=True, **BASE)
    previous = None
    for step in range(3):
        x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 2, (6,), generator=gen)
        theta = layer_param_vector(model)
        opt.preconditioner.capture.active = False  # the oracle must not feed the optimizer
        g = layer_param_vector(model, loss_gradient(model, loss_fn, x, y))
        curvature = dense_fisher(per_sample_vectors(model, loss_fn, x, y))
        curvature = curvature + 0.1 * torch.eye(len(g))
        opt.preconditioner.capture.active = True
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        delta = layer_param_vector(model) - theta
        alpha, mu = opt.last_stats["qmodel_alpha"], opt.last_stats["qmodel_mu"]
        assert (mu == 0.0) == (step == 0)
        direction = (delta - mu * previous) / alpha if step else delta / alpha
        slope = curvature @ delta + g
        scale = float(g.norm() * direction.norm())
        assert abs(float(direction @ slope)) < 1e-10 * scale
        if step:
            assert abs(float(previous @ slope)) < 1e-10 * float(g.norm() * previous.norm())
        previous = delta


def test_resume_with_adaptive_damping_is_bit_identical() -> None:
    def make(model: nn.Module) -> tk.KFAC:
        return tk.KFAC(
            model,
            damping=0.05,
            fisher="mc",
            cov_interval=2,
            adaptive_damping=True,
            damping_interval=2,
            qmodel_lr_momentum=True,
        )

    def train(model: nn.Module, opt: tk.KFAC, seeds: range) -> None:
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen)
            opt.step(closure_of(model, opt, x, y, nn.functional.cross_entropy))

    torch.manual_seed(0)
    model = tiny_mlp()
    opt = make(model)
    train(model, opt, range(3))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, range(3, 7))
    resumed = tiny_mlp()
    resumed.load_state_dict(saved[0])
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(saved[1])
    train(resumed, resumed_opt, range(3, 7))
    assert resumed_opt.preconditioner.damping == opt.preconditioner.damping
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_pure_rules() -> None:
    options = DampingOptions(adaptive_damping=True, damping_interval=2, min_damping=1e-3)
    omega = (19 / 20) ** 2
    assert adjust_damping(1.0, 0.9, options) == pytest.approx(omega)
    assert adjust_damping(1.0, 0.1, options) == pytest.approx(1 / omega)
    assert adjust_damping(1.0, -float("inf"), options) == pytest.approx(1 / omega)
    assert adjust_damping(1.0, 0.5, options) == 1.0
    assert adjust_damping(1.0, float("nan"), options) == 1.0
    assert adjust_damping(1e-3, 0.9, options) == 1e-3
    # minimise α b₁ + μ b₂ + ½[α μ]C[α μ]ᵀ: C [α μ]ᵀ = −b
    alpha, mu = solve_step_and_momentum((2.0, 0.5, 1.0), (1.0, -1.0))
    assert 2.0 * alpha + 0.5 * mu == pytest.approx(-1.0)
    assert 0.5 * alpha + 1.0 * mu == pytest.approx(1.0)
    assert solve_step_and_momentum((2.0, 0.0, 0.0), (1.0, 0.0)) == (-0.5, 0.0)


def test_arguments_and_missing_closure_are_clear_errors() -> None:
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="damping_interval"):
        tk.KFAC(model, adaptive_damping=True, damping_interval=0)
    with pytest.raises(TypeError, match="adaptive_damping"):
        tk.KFAC(model, adaptive_damping="yes")
    opt = tk.KFAC(model, adaptive_damping=True, fisher="empirical")
    mse(model(torch.randn(4, 3)), torch.zeros(4, 1)).backward()
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def _one_step(model: nn.Module, opt: tk.KFAC, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen)
    opt.step(closure_of(model, opt, x, y, nn.functional.cross_entropy))


@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC])
def test_a_constant_damping_given_at_resume_is_the_one_used(cls: type) -> None:
    """A constant ``damping`` is this optimizer's option (raised after a divergence, it
    takes effect): loaded from a checkpoint that ran another one, the steps are those of
    an optimizer built with the new ``λ`` around the same factors, with a warning; the
    same ``λ`` loads silently and bit-identically."""
    torch.manual_seed(0)
    model = tiny_mlp()
    opt = cls(model, damping=1e-3, cov_interval=2, inv_interval=2)
    for seed in range(3):
        _one_step(model, opt, seed)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    runs = {}
    for damping in (1e-3, 0.1):
        resumed = tiny_mlp()
        resumed.load_state_dict(saved[0])
        resumed_opt = cls(resumed, damping=damping, cov_interval=2, inv_interval=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed_opt.load_state_dict(copy.deepcopy(saved[1]))
        messages = [str(w.message) for w in caught]
        if damping == 1e-3:
            assert messages == []
        else:
            assert any("damping=0.001" in m and "damping=0.1" in m for m in messages)
        assert resumed_opt.preconditioner.damping == damping
        for seed in range(3, 6):
            _one_step(resumed, resumed_opt, seed)
        assert resumed_opt.last_stats["damping"] == damping
        runs[damping] = [p.detach().clone() for p in resumed.parameters()]
    for seed in range(3, 6):
        _one_step(model, opt, seed)
    assert all(torch.equal(a, b) for a, b in zip(runs[1e-3], model.parameters(), strict=True))
    # the raised λ: a twin of the saved optimizer whose λ was changed in memory
    twin = tiny_mlp()
    twin.load_state_dict(saved[0])
    twin_opt = cls(twin, damping=1e-3, cov_interval=2, inv_interval=2)
    twin_opt.load_state_dict(copy.deepcopy(saved[1]))
    twin_opt.preconditioner.options = dataclasses.replace(
        twin_opt.preconditioner.options, damping=0.1
    )
    twin_opt.preconditioner.damping = 0.1
    for seed in range(3, 6):
        _one_step(twin, twin_opt, seed)
    assert all(torch.equal(a, b) for a, b in zip(runs[0.1], twin.parameters(), strict=True))
    assert not torch.equal(runs[0.1][0], runs[1e-3][0])


def test_adaptive_damping_resumes_its_own_lambda_and_says_so() -> None:
    """Under adaptive damping ``λ`` is state: the checkpoint's continues, and an optimizer
    built with another starting ``damping`` is told it is not used."""
    torch.manual_seed(0)
    model = tiny_mlp()
    settings = {"cov_interval": 2, "adaptive_damping": True, "damping_interval": 1}
    opt = tk.KFAC(model, damping=0.05, **settings)
    for seed in range(3):
        _one_step(model, opt, seed)
    current = opt.preconditioner.damping
    assert current != 0.05
    for start, warned in ((0.05, False), (0.5, True)):
        resumed_opt = tk.KFAC(tiny_mlp(), damping=start, **settings)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        assert resumed_opt.preconditioner.damping == current
        assert any("adaptive damping continues" in str(w.message) for w in caught) == warned


def test_the_quadratic_model_step_takes_no_kl_clip(float64: None) -> None:
    """``qmodel_lr_momentum`` picks the step's scale itself (M&G §7): under the default
    ``kl_clip`` the clip rescaled the preconditioned directions against the weight decay
    and a fallback LayerNorm's raw gradient before the model chose ``α, μ`` (a trial's
    first step 60 % off). The clip is off there by default, and refused when asked for."""

    def run(**extra: Any) -> list[Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
        opt = tk.KFAC(model, damping=0.5, weight_decay=1e-2, qmodel_lr_momentum=True,
                      fisher="empirical", **extra)  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for default, unclipped in zip(run(), run(kl_clip=None), strict=True):
        assert torch.equal(default, unclipped)
    with pytest.raises(ValueError, match=r"qmodel_lr_momentum .*kl_clip=0.01.*pass kl_clip=None"):
        run(kl_clip=1e-2)
    with pytest.raises(ValueError, match=r"pass CurvatureOptions\(..., kl_clip=None\)"):
        run(curvature=tk.CurvatureOptions())  # (its default clip: it cannot tell)


def test_a_first_damping_outside_the_adapted_range_is_refused() -> None:
    """``damping=1e-3`` with ``min_damping=0.1`` took 1e-3 until the first adaptation, then
    jumped to 0.1 whatever ρ said; it is refused now, naming the range."""
    with pytest.raises(ValueError, match=r"damping=0.001 is outside \[min_damping, max_damping\]"):
        tk.KFAC(tiny_mlp(), damping=1e-3, adaptive_damping=True, min_damping=0.1)
    tk.KFAC(tiny_mlp(), damping=1e-3, min_damping=0.1)  # (not adapted: no range)
    with pytest.raises(ValueError, match=r"damping=0.001 is outside"):  # the default λ too
        tk.KFAC(tiny_mlp(), adaptive_damping=True, min_damping=0.1)
