"""``inverse_method="auto"`` (the default): eigendecompositions exactly where something
needs the eigenbasis (or a damping that moves between refreshes), Cholesky everywhere else;
and an ``auto`` step is the step of the method it picked, bit for bit."""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk
from twolevel_kfac.optim.levels import FINE_LEVELS
from twolevel_kfac.optim.options import CurvatureOptions, resolve_inverse_method
from twolevel_kfac.twolevel.coarse_spaces import COARSE_SPACES
from twolevel_kfac.twolevel.layer_basis import dense_basis

EIGEN_FINE = {"ekfac", "kfac_corrected"}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def build(**kwargs: Any) -> tk.KFAC:
    cls = tk.TwoLevelKFAC if "coarse_space" in kwargs else tk.KFAC
    return cls(mlp(), lr=0.1, damping=kwargs.pop("damping", 1e-2), **kwargs)


def run(opt: tk.KFAC, steps: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    model = opt.preconditioner.model
    for _ in range(steps):
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def resolved(opt: tk.KFAC) -> str:
    return opt.preconditioner.options.inverse_method


def test_the_default_is_auto_and_plain_kfac_takes_cholesky() -> None:
    assert CurvatureOptions().inverse_method == "auto"
    assert resolved(build()) == "cholesky"
    assert resolved(tk.KPSVD(mlp())) == "cholesky"  # its factors are KFAC-shaped
    assert resolved(build(coarse_space="nicolaides")) == "cholesky"
    # the spectral space reads one extreme eigenpair per factor (curvature.extreme_eigen)
    assert resolved(build(coarse_space="spectral")) == "cholesky"


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"damping_mode": "eigen_sum"}, "A⊗G + λI"),
        ({"damping": lambda k: 1e-2 * 0.9**k}, "schedule"),
        ({"adaptive_damping": True}, "adaptive"),
        ({"fine": "ekfac"}, "EKFAC"),
        ({"fine": "kfac_corrected"}, "KFAC-corrected"),
        ({"factor_dtype": torch.bfloat16}, "bfloat16 factors"),
        ({"factor_dtype": torch.float16, "coarse_space": "spectral"}, "float16 factors"),
    ],
)
def test_auto_takes_the_eigenbasis_where_it_is_needed(kwargs: dict[str, Any], why: str) -> None:
    assert resolved(build(**kwargs)) == "eigen", why


def test_an_explicit_method_is_kept() -> None:
    assert resolved(build(inverse_method="eigen")) == "eigen"
    assert resolved(build(inverse_method="cholesky", damping=lambda k: 0.1)) == "cholesky"
    with pytest.raises(ValueError, match="inverse_method must be one of 'auto'"):
        CurvatureOptions(inverse_method="lu")  # type: ignore[arg-type]


CASES = [
    (mode, schedule, adaptive, fine, space)
    for mode, schedule, adaptive, fine, space in itertools.product(
        ("per_factor", "pi", "eigen_sum"),  # damping_mode
        (False, True),  # damping schedule
        (False, True),  # adaptive damping
        sorted(FINE_LEVELS),
        (None, *COARSE_SPACES),
    )
    if not (schedule and adaptive)  # refused together under every method
]


@pytest.mark.parametrize(("mode", "schedule", "adaptive", "fine", "space"), CASES)
def test_auto_picks_eigen_exactly_where_cholesky_is_refused_or_damping_moves(
    mode: str, schedule: bool, adaptive: bool, fine: str, space: str | None
) -> None:
    """Wherever ``auto`` picks Cholesky, an explicit ``cholesky`` is accepted; wherever it
    picks ``eigen``, an explicit ``cholesky`` is refused or λ moves between refreshes."""
    kwargs: dict[str, Any] = {"damping_mode": mode, "fine": fine, "adaptive_damping": adaptive}
    if schedule:
        kwargs["damping"] = lambda k: 1e-2
    if space is not None:
        kwargs["coarse_space"] = space
    try:
        auto = build(**kwargs)
    except ValueError:  # the combination itself is refused (KFAC-corrected with eigen_sum)
        assert fine == "kfac_corrected" and mode == "eigen_sum"
        with pytest.raises(ValueError, match="KFAC-corrected needs"):
            build(inverse_method="eigen", **kwargs)
        return
    try:
        build(inverse_method="cholesky", **kwargs)
        cholesky_ok = True
    except ValueError:
        cholesky_ok = False
    if resolved(auto) == "cholesky":
        assert cholesky_ok
    else:
        assert not cholesky_ok or schedule or adaptive
    direct = resolve_inverse_method(
        "auto",
        damping_mode=mode,
        damping_varies=schedule or adaptive,
        fine_needs_eigenbasis=fine in EIGEN_FINE,
        coarse_needs_eigenbasis=False,  # no coarse space needs the full eigenpairs
    )
    assert resolved(auto) == direct


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"damping_mode": "pi"}, {"fine": "ekfac"}, {"coarse_space": "residual"}],
    ids=["kfac", "pi", "ekfac", "residual"],
)
def test_an_auto_step_is_the_step_of_the_method_it_picked(kwargs: dict[str, Any]) -> None:
    auto = build(**kwargs)
    explicit = build(inverse_method=resolved(auto), **kwargs)
    for a, b in zip(run(auto), run(explicit), strict=True):
        assert torch.equal(a, b)


def test_the_preconditioner_alone_resolves_auto_too() -> None:
    assert tk.KFACPreconditioner(mlp()).options.inverse_method == "cholesky"
    pre = tk.KFACPreconditioner(mlp(), damping_varies=True)
    assert pre.options.inverse_method == "eigen"


@pytest.mark.parametrize(("saved", "loaded"), [("eigen", "auto"), ("cholesky", "eigen")])
def test_a_checkpoint_of_the_other_method_is_converted(
    float64: None, saved: str, loaded: str
) -> None:
    """A state saved under the old default (eigen) resumes under ``auto`` (Cholesky), and
    back: the decompositions are converted, with a warning, and the next steps agree with
    the uninterrupted run to rounding."""
    reference = build(inverse_method=saved, cov_interval=5, inv_interval=5)
    run(reference, steps=3)
    state = copy.deepcopy(reference.state_dict())  # the reference steps on afterwards
    model_state = {k: v.clone() for k, v in reference.preconditioner.model.state_dict().items()}
    resumed = build(inverse_method=loaded, cov_interval=5, inv_interval=5)
    resumed.preconditioner.model.load_state_dict(model_state)
    with pytest.warns(RuntimeWarning, match="made under another inverse_method; converted"):
        resumed.load_state_dict(state)
    for a, b in zip(run(reference, 1), run(resumed, 1), strict=True):  # no refresh: kept inverses
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _wide_spectral(method: str) -> tk.TwoLevelKFAC:
    """A spectral two-level optimizer on factors past ``extreme_eigen.SMALL`` (101 and 120
    wide) that 16 samples leave rank-deficient: their smallest eigenvalue is a cluster at 0,
    whose eigenvector depends on how it is computed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 120), nn.Tanh(), nn.Linear(120, 70))
    return tk.TwoLevelKFAC(
        model, lr=0.05, inverse_method=method, coarse_space="spectral", combination="adef1",
        cov_interval=3, inv_interval=3, kept_fisher="rows",
    )  # fmt: skip


def _wide_steps(opt: tk.TwoLevelKFAC, first: int, count: int) -> None:
    model = opt.preconditioner.model
    for step in range(first, first + count):
        gen = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(16, 100, generator=gen), torch.randint(70, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _resumed(opt: tk.TwoLevelKFAC, method: str) -> tk.TwoLevelKFAC:
    state = copy.deepcopy(opt.state_dict())
    other = _wide_spectral(method)
    other.preconditioner.model.load_state_dict(opt.preconditioner.model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the conversion's
        other.load_state_dict(state)
    return other


@pytest.mark.parametrize(("saved", "loaded"), [("eigen", "auto"), ("auto", "eigen")])
def test_a_converted_spectral_checkpoint_keeps_its_basis(
    float64: None, saved: str, loaded: str
) -> None:
    """The spectral basis is not saved but rebuilt on load, from the decompositions as
    saved (before they are converted: the converted factor's null eigenvector is another
    one), so it matches the saved ``F_c`` and rows; saved again after the conversion, the
    basis is kept in the state (it no longer rebuilds) and the next load has it too."""
    reference = _wide_spectral(saved)
    _wide_steps(reference, 0, 4)  # a refresh at the third
    assert reference.state_dict()["preconditioner"]["coarse"]["basis"] is None  # rebuilt
    resumed = _resumed(reference, loaded)
    again = _resumed(resumed, "auto")
    expected = reference.preconditioner.coarse_level.basis
    assert expected is not None
    for opt in (resumed, again):
        basis = opt.preconditioner.coarse_level.basis
        assert basis is not None
        for got, want in zip(dense_basis(basis), dense_basis(expected), strict=True):
            assert torch.equal(got, want)
    _wide_steps(reference, 4, 1)  # a step between refreshes: the saved F_c and rows
    _wide_steps(resumed, 4, 1)
    for a, b in zip(reference.param_groups[0]["params"], resumed.param_groups[0]["params"],
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _shifted_steps(opt: tk.KFAC, steps: int = 6) -> None:
    """Steps on 16 inputs of 140 features with a mean of 3 (pixels): a rank-deficient
    ``A`` that bfloat16 rounding leaves indefinite (its smallest eigenvalue about −0.5,
    the largest 1.3e3)."""
    model = opt.preconditioner.model
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        x = torch.randn(16, 140, generator=gen) + 3.0
        y = torch.randint(10, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _shifted_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(140, 150), nn.Tanh(), nn.Linear(150, 10))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs", [{}, {"coarse_space": "spectral"}])
def test_half_factors_take_the_eigenbasis(dtype: torch.dtype, kwargs: dict[str, Any]) -> None:
    """Half factors (``factor_dtype``) resolve ``auto`` to ``eigen``: their
    rounding leaves a rank-deficient factor indefinite by more than the damping, which the
    eigendecomposition clips at 0 and a Cholesky factorisation cannot take."""
    cls = tk.TwoLevelKFAC if kwargs else tk.KFAC
    opt = cls(_shifted_net(), lr=0.05, factor_dtype=dtype, cov_interval=2, inv_interval=3, **kwargs)
    assert resolved(opt) == "eigen"
    _shifted_steps(opt)
    for param in opt.preconditioner.model.parameters():
        assert bool(torch.isfinite(param).all())
    factor = opt.preconditioner.factors["0"].A
    assert factor is not None and float(torch.linalg.eigvalsh(factor.double())[0]) < -0.01
    half_model = _shifted_net().to(dtype)  # its factors are float32 (factor_dtype=None)
    assert resolved(tk.KFAC(half_model, lr=0.05)) == "cholesky"


def test_explicit_cholesky_on_half_factors_fails_clearly() -> None:
    opt = tk.KFAC(_shifted_net(), lr=0.05, factor_dtype=torch.bfloat16, inverse_method="cholesky")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the ladder's rungs
        with pytest.raises(RuntimeError, match=r"use inverse_method='auto' or 'eigen' with half"):
            _shifted_steps(opt, steps=1)


def test_a_refused_load_leaves_a_working_optimizer() -> None:
    """A load refused by the coarse level's option check (``spectral_which`` differs)
    raises before the preconditioner changes: the optimizer steps on as before."""
    saved = _wide_spectral("eigen")
    _wide_steps(saved, 0, 4)
    state = copy.deepcopy(saved.state_dict())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 120), nn.Tanh(), nn.Linear(120, 70))
    other = tk.TwoLevelKFAC(model, lr=0.05, coarse_space="spectral", spectral_which="largest")
    _wide_steps(other, 0, 1)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="rebuilds its coarse basis on load"):
        other.load_state_dict(state)
    after = other.state_dict()
    assert after["preconditioner"]["steps"] == before["preconditioner"]["steps"]
    for name, factors in before["preconditioner"]["factors"].items():
        torch.testing.assert_close(
            after["preconditioner"]["factors"][name], factors, rtol=0, atol=0
        )
    _wide_steps(other, 1, 2)


def test_a_nonfinite_half_factor_keeps_the_plain_error() -> None:
    """The half-factor advice is for rounding only: an infinite entry keeps the ladder's
    own message."""
    from twolevel_kfac.curvature.factor_inverse import damped_inverse

    factor = torch.eye(4, dtype=torch.bfloat16)
    factor[1, 1] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError, match="failed in its dtype") as raised:
            damped_inverse(factor, 0.1)
    assert "half factors" not in str(raised.value)
