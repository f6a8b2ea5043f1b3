"""``W = F̂R₀ᵀ`` kept in place of the Fisher mini-batch's rows (``kept_fisher``): its
products are ``F̂``'s, the combinations written with it take the ``F̂``-map forms' steps,
and a step between refreshes that reads only ``W`` equals the dense two-level formula."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import COARSE_SPACES, dense_twolevel_update
from test_kfac_exact import CONTRACT, make_batch, one_step, prepare
from test_twolevel_exact import NETS, TokenNet, assert_relative_error
from twolevel_kfac.twolevel.coarse_matrix import coarse_projections, prolong, restrict
from twolevel_kfac.twolevel.column_combinations import (
    COLUMN_COMBINATIONS,
    fisher_prolong,
    fisher_restrict,
)
from twolevel_kfac.twolevel.combinations import get_combination
from twolevel_kfac.twolevel.fisher_columns import (
    FisherColumns,
    coarse_size,
    fisher_columns,
    gradient_sums,
    rows_size,
)
from twolevel_kfac.twolevel.layer_basis import dense_layer, layer_count
from twolevel_kfac.twolevel.parts import split_basis

LOSS = nn.CrossEntropyLoss()
READING = ("adef1", "adef2", "balanced")  # the combinations that read F̂


def refreshed_level(space: str, kept: str = "rows") -> tuple[Any, Any]:
    """A two-level preconditioner after one refresh step on the conv net, rows kept (the
    next step would read them)."""
    build, shape, classes = NETS["conv"]
    model = prepare(build())
    settings = {**CONTRACT, "cov_interval": 2}  # rows kept for the steps until the next
    opt = tk.TwoLevelKFAC(
        model, damping=0.05, coarse_space=space, combination="adef2", kept_fisher=kept, **settings
    )
    one_step(model, opt, *make_batch(shape, classes, 8))
    return opt.preconditioner, opt.preconditioner.coarse_level


def undamped_columns(level: Any) -> FisherColumns:
    """``W₀ = FR₀ᵀ`` of the level's kept rows and operator basis."""
    stats, basis = level.fisher_stats, level.coarse_operator.basis
    sums = gradient_sums(stats, coarse_projections(stats, basis))
    return fisher_columns(sums, basis, level.fisher_samples)


def random_vector(level: Any, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    assert level.basis is not None
    return [torch.randn(dense_layer(b).shape[1:], generator=gen) for b in level.basis]


@pytest.mark.parametrize("space", ["nicolaides", "spectral", "krylov_residual"])
def test_columns_are_the_fisher_products_of_the_basis(float64: None, space: str) -> None:
    _, level = refreshed_level(space)
    operator = level.coarse_operator
    basis = operator.basis
    w = undamped_columns(level)
    k = sum(layer_count(b) for b in basis)
    u = torch.linspace(-1.0, 2.0, k)
    for damping in (0.05, 0.3):  # the damping of the step, whatever the refresh's was
        level.host.damping = damping
        got = fisher_prolong(operator, w, damping, u)
        for a, b in zip(got, level.fhat(prolong(basis, u)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        v = random_vector(level, 1)
        want = restrict(basis, level.fhat(v))
        torch.testing.assert_close(
            fisher_restrict(operator, w, damping, v), want, rtol=1e-12, atol=0
        )
    parts = [(x[:, :-1], x[:, -1]) for x in v]  # every layer here has a bias
    torch.testing.assert_close(w.restrict_parts(parts), w.restrict(v), rtol=1e-13, atol=0)
    assert w.numel() == k * sum(int(dense_layer(b)[0].numel()) for b in basis)
    assert len(split_basis(w.columns, [True] * len(basis))) == len(basis)


@pytest.mark.parametrize("combination", READING)
@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.parametrize("space", ["nicolaides", "residual", "tselepidis"])
def test_column_combinations_equal_the_fhat_forms(
    float64: None, combination: str, scale: float, space: str
) -> None:
    _, level = refreshed_level(space)
    operator, w = level.coarse_operator, undamped_columns(level)
    g = random_vector(level, 2)
    want = get_combination(combination)(
        [x.clone() for x in g], level.minv, operator, level.fhat, coarse_scale=scale
    ).direction
    got = COLUMN_COMBINATIONS[combination](g, level.minv, operator, w, 0.05, scale)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


NET_CASES = [
    (net, space, comb)
    for net, space, comb in itertools.product(NETS, COARSE_SPACES, READING)
    if space != "tselepidis" or net == "mlp"  # the dense Tselepidis oracle: T = 1 layers
]


def between_refreshes(
    model: nn.Module, x: Tensor, y: Tensor, **kwargs: Any
) -> tuple[dict[str, Tensor], Any]:
    """A refresh step with ``lr = 0`` on ``(x, y)``, then the step between refreshes on
    the same batch at the same parameters: it reads the kept ``F̂`` and factors of
    ``(x, y)``, so it must equal the dense formula of ``(x, y)``."""
    opt = tk.TwoLevelKFAC(model, **{**CONTRACT, "damping": 0.05, **kwargs})
    opt.param_groups[0]["lr"] = 0.0
    one_step(model, opt, x, y)
    opt.param_groups[0]["lr"] = 1.0
    return one_step(model, opt, x, y), opt.preconditioner


@pytest.mark.parametrize(("net", "space", "combination"), NET_CASES)
def test_a_step_reading_only_the_columns_equals_dense_formula(
    float64: None, net: str, space: str, combination: str
) -> None:
    build, shape, classes = NETS[net]
    model = prepare(build())
    x, y = make_batch(shape, classes, 8)
    expected = dense_twolevel_update(
        copy.deepcopy(model), LOSS, x, y, damping=0.05, coarse_space=space, combination=combination
    )
    settings = {"cov_interval": 2, "inv_interval": 2, "kept_fisher": "columns"}
    delta, pre = between_refreshes(
        model, x, y, coarse_space=space, combination=combination, **settings
    )
    assert pre.fisher_columns is not None and pre.fisher_stats is None
    tol = 1e-8 if space == "krylov_residual" else 1e-9
    assert_relative_error(delta, expected, tol)


def two_dampings(step: int) -> float:
    return 0.05 if step == 0 else 0.2


@pytest.mark.parametrize("kept", ["rows", "columns"])
@pytest.mark.parametrize(
    ("net", "space", "combination"),
    [
        ("conv", "nicolaides", "adef2"),
        ("conv", "spectral", "balanced"),
        ("mlp", "tselepidis", "adef1"),
        ("mixed_bn", "nicolaides", "balanced"),
    ],
)
def test_a_step_after_the_damping_changed_equals_dense_formula_at_the_new_damping(
    float64: None, kept: str, net: str, space: str, combination: str
) -> None:
    """A refresh at λ = 0.05, then a step at λ = 0.2 (a schedule): ``M⁻¹``, ``F̂`` and
    ``F_c = R₀F̂R₀ᵀ`` all take the new λ (``F_c`` shifted by ``0.15·R₀R₀ᵀ``), so the step
    equals the dense formula at λ = 0.2. The bases here do not depend on λ (the residual
    and Krylov ones are built at the refresh's)."""
    build, shape, classes = NETS[net]
    model = prepare(build())
    x, y = make_batch(shape, classes, 8)
    expected = dense_twolevel_update(
        copy.deepcopy(model), LOSS, x, y, damping=0.2, coarse_space=space, combination=combination
    )
    delta, pre = between_refreshes(
        model,
        x,
        y,
        damping=two_dampings,
        coarse_space=space,
        combination=combination,
        cov_interval=2,
        inv_interval=2,
        kept_fisher=kept,
    )
    assert pre.damping == 0.2 and pre.level.coarse_damping == 0.2
    assert_relative_error(delta, expected, 1e-9)


def damping_schedule(step: int) -> float:
    return 0.05 * (1 + step)


@pytest.mark.parametrize("combination", READING)
@pytest.mark.parametrize(
    ("norm_blocks", "damping"), [(False, 0.05), (True, 0.05), (False, damping_schedule)]
)
def test_rows_and_columns_take_the_same_steps(
    float64: None, combination: str, norm_blocks: bool, damping: Any
) -> None:
    """Six steps, refreshes every second, on a net of convolutions, a BatchNorm (a block of
    its own with ``norm_blocks``) and Linear layers: the two kept forms agree to rounding,
    also when the damping changes between refreshes (a schedule: both read the current
    one)."""
    build, shape, classes = NETS["mixed_bn"]
    runs = []
    for kept in ("rows", "columns"):
        model = prepare(build())
        opt = tk.TwoLevelKFAC(
            model,
            **{**CONTRACT, "lr": 0.1, "cov_interval": 2, "inv_interval": 2, "momentum": 0.5},
            damping=damping,
            combination=combination,
            norm_blocks=norm_blocks,
            kept_fisher=kept,
        )
        for seed in range(6):
            one_step(model, opt, *make_batch(shape, classes, 8, seed=seed))
        assert (opt.preconditioner.fisher_columns is not None) is (kept == "columns")
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-10, atol=1e-12)


def test_an_embedding_table_steps_alike_on_columns(float64: None) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 6, (8, 4), generator=gen), torch.randint(0, 3, (8,), generator=gen)
    expected = dense_twolevel_update(
        TokenNet(), LOSS, tokens, y, damping=0.05, coarse_space="residual", combination="balanced"
    )
    delta, pre = between_refreshes(
        TokenNet(),
        tokens,
        y,
        coarse_space="residual",
        combination="balanced",
        cov_interval=2,
        inv_interval=2,
        kept_fisher="columns",
    )
    assert pre.fisher_columns is not None
    assert_relative_error(delta, expected, 1e-9)


def test_auto_keeps_the_smaller_form() -> None:
    """The per-location rows of a convolution outgrow ``K·P``; a wide MLP's rows do not."""
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    mlp = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    )
    for model, shape, columns in [(conv, (1, 8, 8), True), (mlp, (64,), False)]:
        opt = tk.TwoLevelKFAC(model, lr=0.01, combination="adef2", cov_interval=2)
        for seed in range(2):
            one_step(model, opt, *make_batch(shape, 3, 16, seed=seed))
        pre = opt.preconditioner
        assert (pre.fisher_columns is not None) is columns
        assert (pre.fisher_stats is None) is columns


def test_the_sizes_compared_count_numbers() -> None:
    basis = [torch.zeros(1, 4, 10), torch.zeros(1, 3, 5)]  # K = 2, P = 55: W₀ holds 110
    stats = [
        type("S", (), {"a": torch.zeros(3, 2, 10), "g": torch.zeros(3, 2, 4)})(),
        type("S", (), {"a": torch.zeros(3, 1, 5), "g": torch.zeros(3, 1, 3)})(),
    ]  # per sample 2·14 + 8 = 36 numbers
    assert coarse_size(basis) == 110
    assert rows_size(stats) == 108  # type: ignore[arg-type]


def test_cov_interval_one_keeps_neither_rows_nor_columns() -> None:
    """Every step refreshes: no step between refreshes reads the Fisher mini-batch, so
    neither ``W₀`` nor the rows outlive the step (and a state without them resumes)."""
    build, shape, classes = NETS["conv"]
    model = prepare(build())
    opt = tk.TwoLevelKFAC(
        model, lr=0.01, combination="adef1", kept_fisher="columns", cov_interval=1
    )
    for seed in range(3):
        one_step(model, opt, *make_batch(shape, classes, 8, seed=seed))
        assert opt.preconditioner.fisher_columns is None
        assert opt.preconditioner.fisher_stats is None  # no step before the next refresh
    saved = opt.state_dict()  # KFAC's state, plus basis and F_c
    other = tk.TwoLevelKFAC(
        model, lr=0.01, combination="adef1", kept_fisher="columns", cov_interval=1
    )
    other.load_state_dict(saved)
    one_step(model, other, *make_batch(shape, classes, 8, seed=4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kept_fisher": "all"}, "kept_fisher"),
        ({"kept_fisher": "columns", "diagnostics": True}, "diagnostics=True"),
        (
            {"kept_fisher": "columns", "coarse_space": "residual", "coarse_refresh": "faithful"},
            "changes at every step",
        ),
    ],
)
def test_impossible_kept_forms_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tk.TwoLevelKFAC(nn.Linear(3, 2), **kwargs)


def test_a_columns_state_is_refused_where_the_rows_are_read() -> None:
    x, y = make_batch((6,), 3, 10, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = tk.TwoLevelKFAC(model, lr=0.05, combination="adef2", kept_fisher="columns")
    one_step(model, opt, x, y)
    assert opt.preconditioner.fisher_stats is not None  # W₀ is built by the next step
    one_step(model, opt, x, y)
    other = tk.TwoLevelKFAC(model, lr=0.05, combination="adef2", diagnostics=True)
    with pytest.raises(ValueError, match=r"only W₀ = FR₀ᵀ.*diagnostics=True"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(RuntimeError, match="only W₀ = FR₀ᵀ is kept"):
        opt.preconditioner.fhat([torch.zeros(5, 7), torch.zeros(3, 6)])
    third = tk.TwoLevelKFAC(model, lr=0.05, combination="balanced")  # W serves any of them
    third.load_state_dict(opt.state_dict())
    assert third.preconditioner.fisher_columns is not None


def stepped_schedule(step: int) -> float:
    return {0: 0.05, 1: 0.05, 2: 0.1, 3: 0.1}.get(step, 0.4)


def test_the_faithful_average_of_f_c_holds_the_current_damping(float64: None) -> None:
    """The faithful schedule averages ``F_c`` over refreshes; with ``lr = 0`` (the same
    curvature at every refresh) a damping that moved at the refreshes (0.05 → 0.1 → 0.4)
    must leave the same ``F_c`` as 0.4 throughout: the old average is shifted to the
    current λ before it is averaged with the new estimate."""
    build, shape, classes = NETS["mlp"]
    x, y = make_batch(shape, classes, 8)
    start, matrices = prepare(build()), []
    for damping in (0.4, stepped_schedule):
        model = copy.deepcopy(start)
        settings = {**CONTRACT, "cov_interval": 2, "ema_decay": 0.9}
        opt = tk.TwoLevelKFAC(
            model, damping=damping, combination="adef2", coarse_refresh="faithful", **settings
        )
        opt.param_groups[0]["lr"] = 0.0
        for _ in range(6):
            one_step(model, opt, x, y)
        assert opt.preconditioner.damping == 0.4
        matrices.append(opt.preconditioner.coarse_matrix)
    torch.testing.assert_close(matrices[1], matrices[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("combination", ["adef2", "adef1", "balanced"])
def test_a_damping_change_keeps_the_projections_of_the_basis(
    float64: None, monkeypatch: pytest.MonkeyPatch, combination: str
) -> None:
    """A-DEF2, A-DEF1 and balanced on parts with the rows: ``P = JR₀ᵀ`` is formed once per
    refresh, also when ``λ`` (and so ``F_c``'s operator) changes at every step."""
    import twolevel_kfac.optim.coarse_parts as coarse_parts

    calls: list[int] = []
    original = coarse_parts.coarse_projections

    def counted(*args: Any) -> Tensor:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(coarse_parts, "coarse_projections", counted)
    build, shape, classes = NETS["mlp"]
    model = prepare(build())
    settings = {**CONTRACT, "lr": 0.1, "cov_interval": 5, "inv_interval": 5}
    opt = tk.TwoLevelKFAC(
        model, damping=damping_schedule, combination=combination, kept_fisher="rows", **settings
    )
    for seed in range(5):
        one_step(model, opt, *make_batch(shape, classes, 8, seed=seed))
    assert len(calls) == 1


def test_a_state_of_the_old_damped_columns_is_refused() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = tk.TwoLevelKFAC(model, lr=0.05, combination="adef2")
    one_step(model, opt, *make_batch((6,), 3, 10))
    state = opt.state_dict()
    state["preconditioner"]["coarse"]["fisher_columns"] = None
    with pytest.raises(ValueError, match="development version"):
        tk.TwoLevelKFAC(model, lr=0.05, combination="adef2").load_state_dict(state)


@pytest.mark.parametrize("space", ["nicolaides", "residual"])
@pytest.mark.parametrize("kept", ["rows", "columns"])
@pytest.mark.parametrize("combination", ["additive", "adef2", "adef1", "balanced"])
def test_steps_between_refreshes_run_on_parts(
    monkeypatch: pytest.MonkeyPatch, combination: str, kept: str, space: str
) -> None:
    """Every combination works on the gradients' parts
    (:mod:`twolevel_kfac.optim.coarse_parts`) between refreshes, with the rows or with
    ``W₀`` kept, and on refresh steps too, the residual spaces' included: the ``W̄`` path
    never runs."""
    from twolevel_kfac.optim.coarse import CoarseLevel

    calls: list[int] = []
    original = CoarseLevel.precondition

    def counted(self: CoarseLevel, *args: Any) -> Any:
        calls.append(self.host.steps)
        return original(self, *args)

    monkeypatch.setattr(CoarseLevel, "precondition", counted)
    build, shape, classes = NETS["mlp"]
    model = prepare(build())
    settings = {**CONTRACT, "lr": 0.1, "cov_interval": 3, "inv_interval": 3}
    opt = tk.TwoLevelKFAC(
        model, coarse_space=space, combination=combination, kept_fisher=kept, **settings
    )
    for seed in range(6):
        one_step(model, opt, *make_batch(shape, classes, 8, seed=seed))
    assert calls == []
