"""The design contract for ``TwoLevelKFAC``: under the contract settings one ``step()``
changes all layers together by ``−P g`` with ``P`` the combination's formula built from the
exact (empirical) Fisher of the batch — for every coarse space × combination — plus the
limiting cases that must hold exactly."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import (
    COARSE_SPACES,
    COMBINATIONS,
    assert_close_report,
    build_dense_problem,
    dense_twolevel_update,
    energy_error,
    layer_param_vector,
    tiny_convnet,
    tiny_mlp,
)
from test_kfac_exact import (
    CONTRACT,
    conv1d_net,
    conv3d_net,
    make_batch,
    mixed_net,
    one_step,
    prepare,
)
from twolevel_kfac.curvature.blocks import layer_shape
from twolevel_kfac.optim.coarse import CoarseLevel
from twolevel_kfac.optim.twolevel import TwoLevelPreconditioner

SPACES = COARSE_SPACES
LOSS = nn.CrossEntropyLoss()
NETS = {
    "mlp": (lambda: tiny_mlp(), (4,), 2),
    "conv": (lambda: tiny_convnet(), (2, 5, 5), 2),
    "mixed_bn": (mixed_net, (2, 6, 6), 3),
    "conv1d": (conv1d_net, (2, 8), 3),  # the registry's 1-d and 3-d convolutions
    "conv3d": (conv3d_net, (1, 3, 4, 3), 2),
}


# The dense Tselepidis oracle covers T = 1 layers only (conv: see the diagonal test).
CASES = [
    (net, space, comb)
    for net, space, comb in itertools.product(NETS, SPACES, COMBINATIONS)
    if space != "tselepidis" or net == "mlp"
]


@pytest.mark.parametrize(("net", "space", "combination"), CASES)
def test_step_equals_dense_formula(float64: None, net: str, space: str, combination: str) -> None:
    build, shape, classes = NETS[net]
    model = prepare(build())
    x, y = make_batch(shape, classes, 8)
    expected = dense_twolevel_update(
        model, LOSS, x, y, damping=0.05, coarse_space=space, combination=combination
    )
    opt = tk.TwoLevelKFAC(
        model, damping=0.05, coarse_space=space, combination=combination, **CONTRACT
    )
    # krylov_residual applies M⁻¹ inside its basis and again in the step; its error varied
    # from run to run between 3e-10 and 2e-9 (MKL's rounding depends on memory alignment),
    # so it gets 1e-8; a slip in the formula shows as an O(1) error.
    tol = 1e-8 if space == "krylov_residual" else 1e-9
    assert_relative_error(one_step(model, opt, x, y), expected, tol)


class TokenNet(nn.Module):
    """``Embedding → Linear → tanh → mean over positions → Linear``: an embedding block
    (``T`` = the positions) beside ``T = 1`` layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.emb = nn.Embedding(6, 3)
        self.mix = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))).mean(dim=1))


@pytest.mark.parametrize(("space", "combination"), [
    (s, c) for s, c in itertools.product(SPACES, COMBINATIONS) if s != "tselepidis"
])  # fmt: skip
def test_step_over_an_embedding_equals_dense_formula(
    float64: None, space: str, combination: str
) -> None:
    model = TokenNet()
    gen = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 6, (8, 4), generator=gen), torch.randint(0, 3, (8,), generator=gen)
    expected = dense_twolevel_update(
        model, LOSS, tokens, y, damping=0.05, coarse_space=space, combination=combination
    )
    opt = tk.TwoLevelKFAC(
        model, damping=0.05, coarse_space=space, combination=combination, **CONTRACT
    )
    tol = 1e-8 if space == "krylov_residual" else 1e-9
    assert_relative_error(one_step(model, opt, tokens, y), expected, tol)


def assert_relative_error(
    actual: dict[str, Tensor], expected: dict[str, Tensor], tol: float = 1e-9
) -> None:
    """‖Δ − Δ_dense‖ / ‖Δ_dense‖ ≤ tol over all parameters together (the coarse solve mixes
    layers, so entrywise tolerances would measure F_c's conditioning, not correctness)."""
    names = sorted(expected)
    got = torch.cat([actual[n].reshape(-1) for n in names])
    want = torch.cat([expected[n].reshape(-1) for n in names])
    error = float((got - want).norm() / want.norm())
    assert error <= tol, f"relative error {error:.3e} > {tol:.0e}"
    scale = float(want.abs().max())
    for name in names:  # and entrywise at a looser tolerance, so a sign/layer slip shows
        assert_close_report(
            actual[name], expected[name], rtol=100 * tol, atol=tol * scale, name=name
        )


@pytest.mark.parametrize("mode", ("pi", "eigen_sum"))
def test_other_damping_modes_equal_dense(float64: None, mode: str) -> None:
    model = prepare(tiny_convnet())
    x, y = make_batch((2, 5, 5), 2, 6)
    expected = dense_twolevel_update(
        model, LOSS, x, y, damping=0.05, mode=mode, coarse_space="residual", combination="adef2"
    )
    opt = tk.TwoLevelKFAC(
        model,
        damping=0.05,
        damping_mode=mode,
        coarse_space="residual",
        combination="adef2",
        **CONTRACT,
    )
    assert_relative_error(one_step(model, opt, x, y), expected)


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_coarse_scale_zero_is_kfac(float64: None, combination: str) -> None:
    """``coarse_scale=0`` takes KFAC's steps (to rounding: plain KFAC's own path never
    concatenates the bias column, the two-level path does)."""
    settings = {"lr": 0.05, "fisher_batch": 0.5, "cov_interval": 2, "ema_decay": 0.9}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    kfac = tk.KFAC(model, **settings)
    two = tk.TwoLevelKFAC(
        twin, coarse_scale=0.0, combination=combination, coarse_space="residual", **settings
    )
    for step in range(4):
        x, y = make_batch((6,), 3, 10, seed=step)
        one_step(model, kfac, x, y)
        one_step(twin, two, x, y)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_close_report(q, p, rtol=1e-12, atol=1e-14)


class FullRankCoarse(CoarseLevel):
    """Test-only coarse space: every coordinate is its own coarse vector (scaled)."""

    scale = 1.0

    def build_basis(self, minv_res: list[Tensor] | None) -> list[Tensor]:
        basis = []
        for name in self.names:
            d_out, d_in = layer_shape(self.host.layers[name])
            eye = torch.eye(d_out * d_in).reshape(-1, d_out, d_in)
            weights = torch.linspace(0.5, 2.0, d_out * d_in)[:, None, None] * self.scale
            basis.append(eye * weights)
        return basis


class FullRankPreconditioner(TwoLevelPreconditioner):
    coarse_level_type = FullRankCoarse


class FullRankKFAC(tk.TwoLevelKFAC):
    preconditioner_class = FullRankPreconditioner

    def _make_preconditioner(
        self, model: nn.Module, kwargs: dict, params: list
    ) -> TwoLevelPreconditioner:
        return FullRankPreconditioner(model, params=params, **kwargs)


@pytest.mark.parametrize("combination", ("adef1", "adef2", "balanced"))
@pytest.mark.parametrize("scale", (1.0, 1e-5, 1e5))
def test_full_rank_coarse_space_gives_exact_natural_gradient(
    float64: None, combination: str, scale: float
) -> None:
    model = prepare(tiny_convnet())
    x, y = make_batch((2, 5, 5), 2, 6)
    problem = build_dense_problem(model, LOSS, x, y, damping=0.05)
    exact = torch.linalg.solve(problem.fisher_damped, problem.grad)
    FullRankCoarse.scale = scale
    opt = FullRankKFAC(model, damping=0.05, combination=combination, **CONTRACT)
    before = layer_param_vector(model)
    one_step(model, opt, x, y)
    assert_close_report(before - layer_param_vector(model), exact, rtol=1e-9, atol=1e-12)


def test_scaling_coarse_vectors_does_not_change_the_step(float64: None) -> None:
    model = prepare(tiny_mlp())
    twin = copy.deepcopy(model)
    x, y = make_batch((4,), 2, 8)
    FullRankCoarse.scale = 1.0
    one = one_step(model, FullRankKFAC(model, combination="additive", **CONTRACT), x, y)
    FullRankCoarse.scale = 1e4
    two = one_step(twin, FullRankKFAC(twin, combination="additive", **CONTRACT), x, y)
    for name in one:
        assert_close_report(two[name], one[name], rtol=1e-9, atol=1e-12, name=name)


@pytest.mark.parametrize("space", SPACES[:-1])
def test_adef2_energy_error_never_exceeds_kfac(float64: None, space: str) -> None:
    """Inequality check: ‖d − F̂⁻¹g‖_F̂ of A-DEF2 ≤ KFAC's (holds by construction), and the
    reported energy gain equals the dense E(β*) − E(0)."""
    for seed in range(3):
        model = prepare(tiny_convnet())
        x, y = make_batch((2, 5, 5), 2, 8, seed=seed)
        problem = build_dense_problem(model, LOSS, x, y, damping=0.05)
        opt = tk.TwoLevelKFAC(
            model,
            damping=0.05,
            coarse_space=space,
            combination="adef2",
            diagnostics=True,
            **CONTRACT,
        )
        before = layer_param_vector(model)
        one_step(model, opt, x, y)
        direction = before - layer_param_vector(model)
        kfac_direction = problem.kfac_inv @ problem.grad
        two_err = energy_error(direction, problem.grad, problem.fisher_damped)
        kfac_err = energy_error(kfac_direction, problem.grad, problem.fisher_damped)
        assert two_err <= kfac_err * (1 + 1e-12)
        assert float(two_err - kfac_err) == pytest.approx(
            opt.last_stats["energy_gain"], rel=1e-8, abs=1e-12
        )


def test_tselepidis_diagonal_is_kronecker_sum(float64: None) -> None:
    """F_c[i,i] = 1ᵀ(T_i·A_i⊗G_i)1 + λ·numel_i = T_i·sum(A_i)·sum(G_i) + λ·numel_i: KFC's
    block of the fine level, conv included (without ``T_i`` before 2026-12-04)."""
    model = prepare(mixed_net())
    x, y = make_batch((2, 6, 6), 3, 5)
    opt = tk.TwoLevelKFAC(model, damping=0.05, coarse_space="tselepidis", **CONTRACT)
    one_step(model, opt, x, y)
    pre = opt.preconditioner
    assert isinstance(pre, TwoLevelPreconditioner) and pre.coarse_matrix is not None
    for i, name in enumerate(pre.names):
        factors = pre.factors[name]
        assert factors.A is not None and factors.G is not None
        numel = factors.A.shape[0] * factors.G.shape[0]
        assert name != "0" or factors.num_locations > 1  # the conv
        expected = factors.num_locations * factors.A.sum() * factors.G.sum() + 0.05 * numel
        assert float(pre.coarse_matrix[i, i]) == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize("space", ("residual", "krylov_residual"))
def test_faithful_refresh_rebuilds_basis_every_step(space: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = tk.TwoLevelKFAC(
        model, lr=0.05, coarse_space=space, coarse_refresh="faithful", cov_interval=3
    )
    consistent = tk.TwoLevelKFAC(copy.deepcopy(model), lr=0.05, coarse_space=space, cov_interval=3)
    bases, kept = [], []
    for step in range(3):
        x, y = make_batch((6,), 3, 10, seed=step)
        one_step(model, opt, x, y)
        one_step(consistent.preconditioner.model, consistent, x, y)
        bases.append(opt.preconditioner.coarse_level.basis)
        kept.append(consistent.preconditioner.coarse_level.basis)
    assert bases[0] is not bases[1] and bases[1] is not bases[2]
    assert kept[0] is kept[1] is kept[2]
    # faithful keeps F_c of the refresh step; consistent recomputes it with its basis
    assert opt.preconditioner.coarse_updates == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coarse_space": "multigrid"}, "coarse_space must be one of"),
        ({"combination": "multiplicative"}, "combination must be one of"),
        ({"coarse_refresh": "sometimes"}, "coarse_refresh must be one of"),
        ({"coarse_scale": -1.0}, "coarse_scale must be"),
        ({"fine_weight": 0.5, "combination": "adef2"}, "fine_weight"),
        ({"spectral_which": "middle"}, "spectral_which must be one of"),
        ({"coarse_spcae": "nicolaides"}, "unknown argument.*did you mean 'coarse_space'"),
    ],
)
def test_bad_coarse_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        tk.TwoLevelKFAC(tiny_mlp(), **kwargs)


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize(
    ("combination", "kl_clip", "fine_weight"),
    [
        ("additive", None, 1.0),
        ("additive", 1e-4, 0.7),
        ("adef2", None, 1.0),
        ("adef2", 1e-4, 1.0),
        ("adef1", 1e-4, 1.0),
        ("balanced", None, 1.0),
    ],
)
def test_step_on_parts_equals_the_joined_path(
    float64: None,
    net: str,
    space: str,
    combination: str,
    kl_clip: float | None,
    fine_weight: float,
) -> None:
    """Between refreshes every combination works on the gradients' weight and bias parts
    (no ``W̄`` concatenation), and so do the refresh steps (the residual spaces join only
    their residual); they take the same steps as the ``W̄`` path, which the dense tests
    above prove exact."""
    settings = {
        "coarse_space": space,
        "combination": combination,
        "kl_clip": kl_clip,
        "fine_weight": fine_weight,
    }
    tol = 1e-8 if space == "krylov_residual" else 1e-10  # as above: its basis amplifies
    assert _parts_against_joined(net, settings, tol) == [True, True, True, True]


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("space", ["residual", "krylov_residual"])
@pytest.mark.parametrize("combination", ["additive", "adef2", "adef1", "balanced"])
def test_the_faithful_schedule_steps_on_parts(
    float64: None, net: str, space: str, combination: str
) -> None:
    """The faithful residual schedule rebuilds its basis at every step, on parts as well:
    only the residual is joined; the steps equal the ``W̄`` path's."""
    settings = {"coarse_space": space, "combination": combination, "coarse_refresh": "faithful"}
    tol = 1e-8 if space == "krylov_residual" else 1e-10
    assert _parts_against_joined(net, settings, tol) == [True, True, True, True]


def _parts_against_joined(net: str, options: dict[str, Any], tol: float) -> list[bool]:
    """Four steps (refreshes at 0 and 3) of a two-level optimizer with ``options`` against a
    twin forced onto the ``W̄`` path, within ``tol``; which steps the first took on parts."""
    build, shape, classes = NETS[net]
    model = prepare(build())
    twin = copy.deepcopy(model)
    settings = {**CONTRACT, "damping": 0.05, "cov_interval": 3, "inv_interval": 3, **options}
    fast, joined = tk.TwoLevelKFAC(model, **settings), tk.TwoLevelKFAC(twin, **settings)
    joined_level = joined.preconditioner.coarse_level
    joined_level._steps_on_parts = lambda: False  # type: ignore[method-assign]
    joined_level._refreshes_on_parts = lambda stats: False  # type: ignore[method-assign]
    fast_level = fast.preconditioner.coarse_level
    decide, decide_refresh = fast_level._steps_on_parts, fast_level._refreshes_on_parts
    used: list[bool] = []
    fast_level._steps_on_parts = (  # type: ignore[method-assign]
        lambda: used.append(decide()) or used[-1]
    )
    fast_level._refreshes_on_parts = (  # type: ignore[method-assign]
        lambda stats: used.append(decide_refresh(stats)) or used[-1]
    )
    for seed in range(4):
        x, y = make_batch(shape, classes, 8, seed=seed)
        a, b = one_step(model, fast, x, y), one_step(twin, joined, x, y)
        assert_relative_error(a, b, tol)
    return used
