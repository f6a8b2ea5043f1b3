"""KFAC optimizer behaviour: schedules, EMA, KL clipping, momentum / weight-decay order,
non-preconditioned parameters, state_dict round trip, argument validation."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import twolevel_kfac as tk
from test_kfac_exact import CONTRACT
from twolevel_kfac.curvature.blocks import gradient_matrix, parameter_matrix


def mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias))


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_factor_schedule_and_ema(float64: None) -> None:
    """Factors change only every cov_interval steps, with ρ = min(1 − 1/k, ema_decay)."""
    model = mlp()
    opt = tk.KFAC(model, lr=0.1, fisher="empirical", cov_interval=3, inv_interval=3, ema_decay=0.9)
    factors = opt.preconditioner.factors["0"]
    history = []
    for step in range(7):
        train_step(model, opt, *batch(seed=step))
        assert factors.A is not None
        history.append((factors.num_updates, factors.A.clone()))
    assert [k for k, _ in history] == [1, 1, 1, 2, 2, 2, 3]
    assert torch.equal(history[0][1], history[2][1])
    assert not torch.equal(history[2][1], history[3][1])


def test_ema_weights_first_update_replaces(float64: None) -> None:
    model = mlp()
    pre = tk.KFACPreconditioner(model, fisher="empirical", ema_decay=0.5, cov_interval=1)
    captured = []
    for step in range(3):
        x, y = batch(seed=step)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        a_in = x
        captured.append(torch.cat([a_in, torch.ones(len(x), 1)], 1))
        pre.step()
    a0, a1, a2 = (c.T @ c / len(c) for c in captured)
    # k=1: ρ=0 → A=a0; k=2: ρ=min(1/2, 0.5)=0.5; k=3: ρ=min(2/3, 0.5)=0.5
    expected = 0.5 * (0.5 * a0 + 0.5 * a1) + 0.5 * a2
    torch.testing.assert_close(pre.factors["0"].A, expected, rtol=1e-12, atol=1e-12)


def test_inverse_interval_keeps_decomposition(float64: None) -> None:
    model = mlp()
    opt = tk.KFAC(model, lr=0.1, fisher="empirical", cov_interval=1, inv_interval=2)
    factors = opt.preconditioner.factors["2"]
    train_step(model, opt, *batch(seed=0))
    first = factors.decomp_g
    train_step(model, opt, *batch(seed=1))
    assert factors.decomp_g is first
    train_step(model, opt, *batch(seed=2))
    assert factors.decomp_g is not first


def test_kl_clip_paper_and_lr_squared_forms(float64: None) -> None:
    for form, lr in (("paper", 0.5), ("lr_squared", 0.5)):
        model = mlp()
        clip = 1e-4
        opt = tk.KFAC(model, **{**CONTRACT, "lr": lr, "kl_clip": None})
        ref_model = copy.deepcopy(model)
        x, y = batch()
        train_step(model, opt, x, y)
        unclipped = {n: parameter_matrix(m) for n, m in opt.preconditioner.layers.items()}

        opt2 = tk.KFAC(ref_model, **{**CONTRACT, "lr": lr, "kl_clip": clip, "kl_clip_form": form})
        start = {n: parameter_matrix(m) for n, m in opt2.preconditioner.layers.items()}
        opt2.zero_grad()
        F.cross_entropy(ref_model(x), y).backward()
        grads = {n: gradient_matrix(m) for n, m in opt2.preconditioner.layers.items()}
        opt2.step()
        # d_i = (start − unclipped)/lr; ν = min(1, √(c / Σ|⟨d, g⟩|)) (· 1/lr² inside for Ba)
        total = sum(float(((start[n] - unclipped[n]) / lr * grads[n]).sum()) for n in grads)
        total = abs(total) * (lr * lr if form == "lr_squared" else 1.0)
        nu = min(1.0, math.sqrt(clip / total))
        assert nu < 1.0
        assert opt2.last_stats["kl_scale"] == pytest.approx(nu, rel=1e-12)
        for n, m in opt2.preconditioner.layers.items():
            torch.testing.assert_close(
                parameter_matrix(m),
                start[n] - nu * (start[n] - unclipped[n]),
                rtol=1e-10,
                atol=1e-12,
            )


def test_momentum_and_weight_decay_after_preconditioning(float64: None) -> None:
    """θ_{k+1} = θ_k − lr·buf, buf = μ buf + (d + wd θ): weight decay is not preconditioned."""
    model = mlp()
    lr, mu, wd = 0.3, 0.9, 0.01
    base = {**CONTRACT, "lr": 1.0}
    shadow = copy.deepcopy(model)
    shadow_opt = tk.KFAC(shadow, **base)  # contract settings: θ changes by exactly −d
    opt = tk.KFAC(model, **{**base, "lr": lr, "momentum": mu, "weight_decay": wd})
    buf = None
    for step in range(3):
        x, y = batch(seed=step)
        shadow.load_state_dict(model.state_dict())
        shadow_opt.preconditioner.load_state_dict(opt.preconditioner.state_dict())
        theta = parameters_vector(model)
        train_step(shadow, shadow_opt, x, y)
        d = theta - parameters_vector(shadow)
        direction = d + wd * theta
        buf = direction if buf is None else mu * buf + direction
        train_step(model, opt, x, y)
        torch.testing.assert_close(
            parameters_vector(model), theta - lr * buf, rtol=1e-10, atol=1e-12
        )


def parameters_vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def test_non_preconditioned_parameters_get_momentum_sgd(float64: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    opt = tk.KFAC(model, lr=0.1, momentum=0.0, weight_decay=0.0, fisher="empirical")
    assert set(opt.preconditioner.layers) == {"0", "3"}
    assert "preconditioned=[0, 3]" in repr(opt)
    x, y = batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    bn_before = model[1].weight.detach().clone()
    bn_grad = model[1].weight.grad.detach().clone()
    opt.step()
    torch.testing.assert_close(model[1].weight.detach(), bn_before - 0.1 * bn_grad)


def test_state_dict_round_trip_continues_identically(float64: None) -> None:
    def run(split: int | None) -> torch.Tensor:
        model = mlp()
        opt = tk.KFAC(
            model,
            lr=0.05,
            fisher="mc",
            fisher_batch=0.5,
            cov_interval=2,
            inv_interval=3,
            ema_decay=0.95,
        )
        for step in range(8):
            if split is not None and step == split:
                saved_model, saved_opt = copy.deepcopy(model.state_dict()), opt.state_dict()
                saved_opt = copy.deepcopy(saved_opt)
                model = mlp()
                opt = tk.KFAC(
                    model,
                    lr=0.05,
                    fisher="mc",
                    fisher_batch=0.5,
                    cov_interval=2,
                    inv_interval=3,
                    ema_decay=0.95,
                )
                model.load_state_dict(saved_model)
                opt.load_state_dict(saved_opt)
            train_step(model, opt, *batch(seed=step))
        return parameters_vector(model)

    uninterrupted = run(None)
    for split in (3, 5):
        assert torch.equal(run(split), uninterrupted)


def test_load_state_dict_rejects_other_model() -> None:
    opt = tk.KFAC(mlp(), lr=0.1)
    other = tk.KFAC(nn.Sequential(nn.Linear(5, 3)), lr=0.1)
    with pytest.raises(ValueError, match="layers"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="preconditioner"):
        opt.load_state_dict(torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"damping_mode": "tikhonov"}, "damping_mode must be one of"),
        ({"fisher": "exact"}, "fisher must be one of"),
        ({"likelihood": "poisson"}, "likelihood must be one of"),
        ({"damping": 0.0}, "damping must be"),
        ({"fisher_batch": 1.5}, "fisher_batch must be"),
        ({"ema_decay": 1.0}, "ema_decay must be"),
        ({"cov_interval": 0}, "cov_interval must be"),
        ({"inv_interval": 2.5}, "inv_interval must be"),
        ({"lr": -1.0}, "lr must be"),
        ({"kl_clip": -1.0}, "kl_clip must be"),
        ({"kl_clip": 0}, "kl_clip must be .*; kl_clip=None turns the KL clip off"),
        ({"inverse_method": "cholesky", "damping_mode": "eigen_sum"}, "eigen_sum"),
        ({"dampign": 1e-3}, "unknown argument.*did you mean 'damping'"),
        ({"moment": 0.9}, "did you mean 'momentum'.*it takes: .*lr"),  # its own too
        ({"adaptive_dampin": True}, "did you mean 'adaptive_damping'"),
        # torch.optim.SGD's: what to do instead, not a near name ('damping' is another thing)
        ({"dampening": 0.1}, r"'dampening' is torch.optim.SGD's, not taken here: the momentum"),
        ({"maximize": True}, r"'maximize' is torch.optim.SGD's.*negated objective"),
        ({"fused": True}, r"unknown argument\(s\) \['fused'\]; 'fused' is torch.optim.SGD's"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        tk.KFAC(mlp(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dampin": 1e-3}, r"KFACPreconditioner got unknown argument.*did you mean 'damping'"),
        ({"coarse_space": "spectral"}, r"did you mean 'coarse'.*it takes: .*params"),
        ({"power_iteration": 2}, r"did you mean 'power_iterations'"),  # KPSVD's own (taken before)
    ],
)
def test_preconditioner_typos_are_named(kwargs: dict[str, object], message: str) -> None:
    """The preconditioner used alone names a mistyped option as the optimizers do: before
    it was ``CurvatureOptions.__init__``'s ``TypeError``, without the nearest name."""
    fine = {"fine": "kpsvd"} if "power_iteration" in kwargs else {}
    with pytest.raises(TypeError, match=message):
        tk.KFACPreconditioner(mlp(), **fine, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "hint"), [({"coarse_scal": 1.0}, "coarse_scale"), ({"fin": "kfac"}, "fine")]
)
def test_two_level_preconditioner_typos_name_the_coarse_options(
    kwargs: dict[str, object], hint: str
) -> None:
    """Its coarse fields and ``fine`` were left out of the names: ``coarse_scal`` got "did
    you mean 'coarse'", ``fin`` no hint."""
    with pytest.raises(TypeError, match=rf"did you mean '{hint}' for"):
        tk.TwoLevelPreconditioner(mlp(), **kwargs)
    assert tk.TwoLevelPreconditioner(mlp(), fine=None).fine_level is not None  # (the default)


@pytest.mark.parametrize(
    ("build", "own", "fine"),
    [
        (tk.EKFAC, "ekfac", "kpsvd"),
        (tk.KPSVD, "kpsvd", "kfac"),
        (tk.KFACCorrected, "kfac_corrected", "ekfac"),
        (tk.EKFACPreconditioner, "ekfac", "kfac_corrected"),
    ],
)
def test_a_preset_refuses_another_fine_level(build: Any, own: str, fine: str) -> None:
    """``EKFAC(model, fine="kpsvd")`` ran KPSVD's fine level under EKFAC's name (its
    ``describe_blocks``, logs and checkpoints said EKFAC); a preset now takes its own level
    only, and the message names where the other one is given."""
    with pytest.raises(ValueError, match=rf"fine={fine!r} names another: give fine="):
        build(mlp(), fine=fine)
    built = build(mlp(), fine=own)  # its own name is accepted
    assert getattr(built, "preconditioner", built).fine.name == own


@pytest.mark.parametrize("fine", [None, "kfac", "ekfac", "kpsvd", "kfac_corrected"])
def test_the_general_classes_take_every_fine_level(fine: str | None) -> None:
    """``KFAC``, ``TwoLevelKFAC`` and the preconditioners take any fine level by name, and
    ``fine=None`` for their default (``TwoLevelKFAC(fine=None)`` raised before 2026-12-06)."""
    expected = "kfac" if fine is None else fine
    for build in (tk.KFAC, tk.TwoLevelKFAC):
        assert build(mlp(), fine=fine).preconditioner.fine.name == expected
    for precondition in (tk.KFACPreconditioner, tk.TwoLevelPreconditioner):
        assert precondition(mlp(), fine=fine).fine.name == expected


def test_param_groups_passed_as_lr_are_named() -> None:
    """``functools.partial(tk.KFAC, model)`` as a wrapper's base optimizer (SAM's) passes
    the param groups where ``lr`` is: the error said "lr must be a real number" and dumped
    every parameter (9.5 kB); it names params= now, in a line."""
    model = mlp()
    with pytest.raises(
        TypeError, match=r"go in params= \(KFAC\(model, params=groups\)\)"
    ) as caught:
        tk.KFAC(model, [{"params": list(model.parameters())}])  # type: ignore[arg-type]
    assert len(str(caught.value)) < 300


def test_lazy_modules_not_yet_run_are_named() -> None:
    """An optimizer built before a lazy model's first forward is refused naming the
    parameters and the fix (torch's own error, raised from inside, named no layer)."""
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias', '2.weight', '2.bias'\] are "
                       "not initialized yet.*run one forward with a dummy batch"):  # fmt: skip
        tk.KFAC(model)
    model(torch.randn(2, 3, 5, 5))
    assert list(tk.KFAC(model).preconditioner.layers) == ["0", "2"]
    partial = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))  # a lazy head left out: built
    assert list(tk.KFAC(partial, params=partial[0].parameters()).preconditioner.layers) == ["0"]


def test_unsupported_layers_warn_or_raise() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 4, 5, 5))
    with pytest.warns(UserWarning, match=r"module '0'.*ConvTranspose2d"):
        opt = tk.KFAC(model)
    assert list(opt.preconditioner.layers) == ["2"]
    with pytest.raises(ValueError, match=r"module '0'.*ConvTranspose2d"):
        tk.KFAC(model, unsupported="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.KFAC(
            nn.Sequential(nn.ConvTranspose2d(2, 2, 3), nn.Flatten(), nn.Linear(2, 2)),
            unsupported="ignore",
        )


def test_modules_refused_for_one_reason_are_one_warning() -> None:
    """A U-Net decoder's transposed convolutions gave one warning each (a helper's note of
    2026-12-06): now one warning names them all, and a tie without its bias is one too."""
    up = [nn.ConvTranspose2d(2, 2, 3) for _ in range(8)]
    model = nn.Sequential(*up, nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 2, 3, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tk.KFAC(model)
    refused = [str(w.message) for w in caught if "ConvTranspose2d" in str(w.message)]
    assert len(refused) == 1, refused
    assert refused[0].startswith("modules '0', '1', '2', '3', '4', '5' and 2 more: ")
    assert "their parameters get the un-preconditioned fallback step" in refused[0]
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight  # tied without the bias: no [W, b] block for either
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tk.KFAC(nn.Sequential(a, nn.Tanh(), b, nn.Linear(3, 2)))
    tied = [str(w.message) for w in caught if "share a weight but not its bias" in str(w.message)]
    assert tied == [tied[0]] and tied[0].startswith("modules '0', '2': modules '0' and '2'")


class LinearInOut(nn.Module):
    """transformers' ``Conv1D``: ``x @ W + b`` with ``W`` stored ``[in, out]``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight)


def test_modules_with_a_weight_matrix_but_no_block_type_are_warned_of_once_per_type() -> None:
    """Leaves of a type without a block whose own weight is a matrix (GPT-2's ``Conv1D``, a
    bilinear layer) take the fallback step: a warning says so, once per type (they fell
    back without a word), under ``unsupported="error"`` too (such a module may be no linear
    map: a position table), not under ``"ignore"``; nothing else changes."""
    model = nn.Sequential(
        LinearInOut(4, 6), nn.Tanh(), LinearInOut(6, 6), nn.LayerNorm(6), LinearInOut(6, 5),
        LinearInOut(5, 5), nn.Tanh(), nn.Linear(5, 3),
    )  # fmt: skip
    for unsupported in ("warn", "error"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = tk.KFAC(model, unsupported=unsupported)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1, messages
        assert messages[0].startswith("modules '0', '2', '4' and 1 more: LinearInOut has a weight")
        assert "convert it to nn.Linear" in messages[0] and "fallback step" in messages[0]
        assert list(opt.preconditioner.layers) == ["7"]
        assert "0.weight  momentum SGD (no block)" in opt.describe_blocks()
    with pytest.warns(UserWarning, match=r"module '0': Bilinear has a weight matrix"):
        tk.KFAC(nn.Sequential(nn.Bilinear(3, 3, 2), nn.Linear(2, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.KFAC(model, unsupported="ignore")
        tk.KFAC(model, params=model[7].parameters())  # (the reported ones are not in it)


class StackedExperts(nn.Module):
    """Experts as transformers 5 stores Mixtral's: ``[E, 2I, H]`` and ``[E, H, I]``
    parameters of one module (with its activation as a child), applied by index."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 6, 5))
        self.down_proj = nn.Parameter(torch.randn(4, 5, 3))
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = (h @ self.gate_up_proj[0].T).chunk(2, dim=-1)
        return h + self.act(gate) * up @ self.down_proj[0].T


def test_stacked_expert_matrices_are_warned_of_with_their_share() -> None:
    """Experts held as 3-D parameters (74 % of a tiny Mixtral's parameters in a trial) took
    the fallback step with a warning that named only the routers (before 2026-12-06 (day)):
    the module is named now, with the share of the parameters it holds."""
    model = nn.Sequential(nn.Linear(5, 5), StackedExperts(), nn.Linear(5, 3))
    with pytest.warns(
        UserWarning, match=r"module '1': StackedExperts holds parameters of"
    ) as caught:
        tk.KFAC(model)
    (message,) = [str(w.message) for w in caught if "StackedExperts" in str(w.message)]
    assert "gate_up_proj, down_proj" in message and "(79% of the model's trained" in message
    shared = StackedExperts()
    twice = nn.Sequential(nn.Linear(5, 5), shared, shared, nn.Linear(5, 3))
    with pytest.warns(UserWarning, match="holds parameters of") as caught:
        tk.KFAC(twice)  # (a module used twice: its parameters counted once)
    assert any("(79% of" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # left out of params=, or frozen: not reported
        tk.KFAC(model, params=[*model[0].parameters(), *model[2].parameters()])
        model[1].requires_grad_(False)
        tk.KFAC(model)


def test_warnings_point_at_the_users_line() -> None:
    """A warning raised while building the optimizer (any class), inside ``model(x)``'s
    hooks or inside ``loss.backward()`` names the training loop's line, not a line of the
    library or of torch (they named ``kfac.py``, ``twolevel.py`` or torch's ``graph.py``)."""
    model = nn.Sequential(
        nn.Linear(4, 4), nn.ConvTranspose1d(4, 4, 1), nn.Flatten(), nn.Linear(4, 3)
    )
    for cls in (tk.KFAC, tk.TwoLevelKFAC, tk.KFACPreconditioner):
        with pytest.warns(UserWarning, match="ConvTranspose1d is not supported") as caught:
            cls(model)
        assert {w.filename for w in caught} == {__file__}
    lm = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    opt = tk.KFAC(lm, class_dim=-1)
    tokens, targets = torch.randint(0, 7, (4, 5)), torch.randint(0, 7, (4, 5))
    targets[:, -1] = -100  # ignored by the loss, not by a mask: reported at the backward
    with pytest.warns(RuntimeWarning, match="set_loss_mask") as caught:
        F.cross_entropy(lm(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
    assert {w.filename for w in caught} == {__file__}
    opt.step()


def test_step_without_statistics_is_a_clear_error() -> None:
    model = mlp()
    opt = tk.KFAC(model)
    x, _y = batch()
    with torch.no_grad():
        model(x)
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # a zero .grad is no gradient (zero_grad(set_to_none=False))
    with pytest.raises(RuntimeError, match="no curvature statistics"):
        opt.step()


def test_layers_called_outside_the_optimizers_module_are_named_so() -> None:
    """A Lightning-style wrapper holds the optimizer while the loop calls ``self.net(x)``:
    the refusal says that the layers ran outside a call of the module it was built on
    (it said "run the model's forward"); calling the wrapper itself trains."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    wrapper = Wrapper()
    opt = tk.KFAC(wrapper)
    x, y = batch()
    F.cross_entropy(wrapper.net(x), y).backward()
    with (
        pytest.raises(RuntimeError, match=r"ran outside a call of the module the optimizer"),
        pytest.warns(RuntimeWarning, match=r"ran outside a call of the optimizer's module"),
    ):
        opt.step()
    opt.zero_grad()
    F.cross_entropy(wrapper(x), y).backward()
    opt.step()
    assert all(f.ready for f in opt.preconditioner.factors.values())


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (tk.KFAC, {}),
        (tk.EKFAC, {}),
        (tk.TwoLevelKFAC, {"combination": "adef2"}),
        (tk.TwoLevelKFAC, {"coarse_space": "residual", "coarse_refresh": "faithful"}),
    ],
)
def test_an_empty_batch_is_a_no_op_after_the_first_step(
    float64: None, cls: type[tk.KFAC], kwargs: dict[str, object], fisher: str
) -> None:
    """A batch of 0 rows (the last, uneven batch of a loader; a DDP rank's empty share) has
    no statistics: as the first step it is refused by name; later it changes nothing (its
    gradient is 0), and the next step equals a twin's that never saw it."""
    settings = {**CONTRACT, "lr": 0.1, "fisher": fisher, "ema_decay": 0.9, **kwargs}
    empty = (torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    model = mlp()
    opt = cls(model, **settings)
    with pytest.raises(RuntimeError, match=r"batch was empty \(0 rows\), and the first step"):
        train_step(model, opt, *empty)
    model, twin = mlp(), mlp()
    opt, twin_opt = cls(model, **settings), cls(twin, **settings)
    for seed in range(2):
        train_step(model, opt, *batch(seed=seed))
        train_step(twin, twin_opt, *batch(seed=seed))
    before = [p.detach().clone() for p in model.parameters()]
    factors = {n: (f.A.clone(), f.G.clone()) for n, f in opt.preconditioner.factors.items()}
    train_step(model, opt, *empty)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    for name, f in opt.preconditioner.factors.items():
        assert torch.equal(f.A, factors[name][0]) and torch.equal(f.G, factors[name][1])
    train_step(model, opt, *batch(seed=2))
    train_step(twin, twin_opt, *batch(seed=2))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("model", "shape", "loss", "kwargs"),
    [
        (lambda: nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)), (5,),
         lambda o, y: F.cross_entropy(o, y), {"norm_blocks": True}),
        (lambda: nn.Linear(5, 3), (2, 5), lambda o, y: F.cross_entropy(o.flatten(0, 1),
         y.repeat_interleave(2)), {"class_dim": -1}),
        (lambda: nn.Linear(5, 1), (5,), lambda o, y: F.binary_cross_entropy_with_logits(
         o, (y[:, None] > 0).float()), {"likelihood": "bernoulli", "loss_reduction": "mean"}),
        (lambda: nn.Linear(5, 1), (5,), lambda o, y: F.mse_loss(o, y[:, None].float()),
         {"likelihood": "gaussian", "loss_reduction": "mean"}),
    ],
    ids=["layer_norm_block", "class_dim", "bernoulli_mean", "gaussian_mean"],
)  # fmt: skip
def test_an_empty_batch_reaches_no_hook(model: Any, shape: tuple[int, ...], loss: Any,
                                        kwargs: dict[str, object]) -> None:  # fmt: skip
    """The forward of an empty batch records and draws nothing (the Monte-Carlo targets of
    a positions' or a mean-reduced likelihood, a LayerNorm block's input): the step after
    a normal one is skipped, the parameters unchanged."""
    torch.manual_seed(0)
    net = model()
    opt = tk.KFAC(net, lr=0.1, momentum=0.0, cov_interval=1, inv_interval=1, **kwargs)
    for n in (4, 0):
        x, y = torch.randn(n, *shape), torch.randint(0, 3, (n,))
        before = [p.detach().clone() for p in net.parameters()]
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()
    assert opt.last_stats.get("empty_batch") == 1.0
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))


def test_an_empty_batch_with_a_noise_gradient_is_preconditioned(float64: None) -> None:
    """DP-SGD's empty Poisson batch: its gradient is the privacy noise alone, not 0. At a
    capturing step it folds nothing and takes the step of the factors there are, as a step
    without a forward does (it was stepped raw before 2026-12-06 (evening): 0.98 off)."""
    settings = {**CONTRACT, "lr": 0.1, "momentum": 0.0, "ema_decay": 0.9}
    noise = torch.Generator().manual_seed(5)
    runs = []
    for with_forward in (True, False):
        model = mlp()
        opt = tk.KFAC(model, **settings)
        for seed in range(2):
            train_step(model, opt, *batch(seed=seed))
        opt.zero_grad()
        if with_forward:
            F.cross_entropy(model(torch.zeros(0, 5)), torch.zeros(0, dtype=torch.long)).backward()
        noise.manual_seed(5)
        for p in model.parameters():
            p.grad = 0.3 * torch.randn(p.shape, generator=noise, dtype=p.dtype)
        raw = [p.detach() - 0.1 * p.grad for p in model.parameters()]
        opt.step()
        assert "empty_batch" not in opt.last_stats
        runs.append([p.detach().clone() for p in model.parameters()])
        assert not all(torch.allclose(p, q) for p, q in zip(runs[-1], raw, strict=True))
    for p, q in zip(*runs, strict=True):
        assert torch.equal(p, q)
    model = mlp()  # a coarse level whose step reads the batch's rows has none: skipped
    opt = tk.TwoLevelKFAC(model, **{**settings, "combination": "adef2"})
    for seed in range(2):
        train_step(model, opt, *batch(seed=seed))
    opt.zero_grad()
    F.cross_entropy(model(torch.zeros(0, 5)), torch.zeros(0, dtype=torch.long)).backward()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # (an AssertionError in a review before it was skipped)
    assert opt.last_stats.get("empty_batch") == 1.0


def test_preconditioner_drives_any_torch_optimizer(float64: None) -> None:
    model = mlp()
    reference = copy.deepcopy(model)
    pre = tk.KFACPreconditioner(model, fisher="empirical", ema_decay=0.0, kl_clip=None)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = tk.KFAC(reference, **CONTRACT)
    x, y = batch()
    adam.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    ref_opt.zero_grad()
    F.cross_entropy(reference(x), y).backward()
    before = parameters_vector(reference)
    ref_opt.step()
    natural = before - parameters_vector(reference)
    torch.testing.assert_close(
        torch.cat([p.grad.reshape(-1) for p in model.parameters()]), natural, rtol=1e-10, atol=1e-12
    )
    adam.step()


def test_lr_scheduler_acts_on_lr() -> None:
    opt = tk.KFAC(mlp(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model = opt.preconditioner.model
    train_step(model, opt, *batch())
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 6),
    hidden=st.integers(1, 6),
    d_out=st.integers(2, 4),
    n=st.integers(1, 6),
    damping=st.floats(1e-6, 1.0),
    mode=st.sampled_from(["per_factor", "pi", "eigen_sum"]),
    fisher=st.sampled_from(["mc", "empirical"]),
    bias=st.booleans(),
)
def test_no_nan_for_any_shape(
    d_in: int, hidden: int, d_out: int, n: int, damping: float, mode: str, fisher: str, bias: bool
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(d_in, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, d_out, bias=bias)
    )
    opt = tk.KFAC(model, lr=0.1, damping=damping, damping_mode=mode, fisher=fisher, kl_clip=None)
    x, y = torch.randn(n, d_in), torch.randint(0, d_out, (n,))
    for _ in range(2):
        train_step(model, opt, x, y)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _DetachedHidden(nn.Module):
    """A hidden layer whose output is cut from the graph before the head uses it."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)).detach())


def test_mc_fisher_leaves_layers_cut_from_the_graph_alone() -> None:
    """A layer whose output is detached before the head gets no gradient: no Monte-Carlo
    statistics, no step, no error (a layer with a gradient whose output misses the model
    output is refused at the step: ``test_training_setups``)."""
    model = _DetachedHidden()
    before = model.hidden.weight.detach().clone()
    opt = tk.KFAC(model, lr=0.1, cov_interval=1)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(model.hidden.weight, before)
    assert not opt.preconditioner.factors["hidden"].ready


def test_mc_fisher_on_a_compiled_model_trains_as_the_eager_model() -> None:
    """``torch.compile`` (AOTAutograd) breaks its graphs at the capture's hooks, so the
    layer outputs stay in autograd's graph: three MC steps equal the eager model's."""
    model = mlp()
    twin = copy.deepcopy(model)
    x, y = batch()
    results = []
    for net, compiled in ((model, True), (twin, False)):
        opt = tk.KFAC(net, lr=0.1)
        forward = torch.compile(net, backend="aot_eager") if compiled else net
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    assert torch.equal(results[0], results[1])


def test_mc_fisher_leaves_a_layer_that_does_not_reach_the_output_alone() -> None:
    """A layer called in the forward whose output is thrown away has no gradient: left
    alone like any unused layer."""

    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.dead = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.dead(x)
            return self.used(x)

    model = Dead()
    opt = tk.KFAC(model, cov_interval=1)
    F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
    opt.step()
    assert opt.preconditioner.factors["used"].ready
    assert not opt.preconditioner.factors["dead"].ready


def test_sum_abs_layer_dots_matches_the_definition() -> None:
    """The KL clip's ``Σ_i |Σ_parts ⟨d, g⟩|``: weight and bias parts of a layer are summed
    before the absolute value, in one sync or (mixed dtypes) one per part."""
    from twolevel_kfac.optim.directions import sum_abs_layer_dots

    gen = torch.Generator().manual_seed(0)

    def pair(*shape: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(*shape, generator=gen).to(dtype) for _ in range(2))

    layers = [[pair(3, 4), pair(3)], [pair(2, 5)], [pair(4, 2), pair(4)]]
    # a layer whose parts cancel: |a − a| = 0, where Σ|parts| would be 2|a|
    d, g = pair(3, 3)
    layers.append([(d, g), (-d, g)])
    expected = sum(
        abs(sum(float((d.double() * g.double()).sum()) for d, g in pairs)) for pairs in layers
    )
    assert sum_abs_layer_dots(layers) == pytest.approx(expected, rel=1e-6)
    mixed = [*layers, [pair(2, 2, dtype=torch.float64)]]
    extra = abs(float((mixed[-1][0][0] * mixed[-1][0][1]).sum()))
    assert sum_abs_layer_dots(mixed) == pytest.approx(expected + extra, rel=1e-6)
    assert sum_abs_layer_dots([]) == 0.0


def test_kl_clip_scale_forms_and_finiteness() -> None:
    """``ν = min(1, √(c / S))`` with ``S = Σ_i |⟨d_i, ∇_i⟩|`` (``lr²·S`` in Ba et al.'s
    form); ``ν = 1`` for ``S = 0`` or a non-finite ``S``, which is reported."""
    from twolevel_kfac.optim.directions import kl_clip_scale

    d = torch.tensor([2.0, 0.0])
    layers = [[(d, torch.tensor([3.0, 5.0]))]]  # S = 6
    assert kl_clip_scale(layers, 1.5) == (pytest.approx(0.5), True)
    assert kl_clip_scale(layers, 100.0) == (1.0, True)
    assert kl_clip_scale(layers, 0.06, lrs=[0.1]) == (pytest.approx(1.0), True)
    assert kl_clip_scale(layers, 0.015, lrs=[0.1]) == (pytest.approx(0.5), True)
    assert kl_clip_scale([[(d, torch.zeros(2))]], 1.0) == (1.0, True)
    poisoned = [[(torch.tensor([float("inf"), 0.0]), torch.tensor([0.0, 1.0]))]]  # Inf·0
    assert kl_clip_scale(poisoned, 1.0) == (1.0, False)


def _bucket_gradients(model: nn.Module) -> torch.Tensor:
    """Make every ``.grad`` a view of one flat bucket (DDP's ``gradient_as_bucket_view``)."""
    params = [p for p in model.parameters() if p.grad is not None]
    bucket = torch.cat([p.grad.reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.grad = bucket[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return bucket


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "bucket", "float64_factors"])
def test_directions_written_over_the_gradients_without_kl_clip(layout: str) -> None:
    """Without a KL clip plain KFAC writes each direction over the gradient autograd left
    instead of into a fresh tensor: the same step as with a KL clip that never binds
    (fresh directions handed to ``.grad``), in every gradient layout; a contiguous or
    bucket-view ``.grad`` keeps its storage (the bucket holds the directions)."""
    from oracles import tiny_convnet

    x = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (6,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(4)
    models = [tiny_convnet(bias=True), None]
    if layout == "channels_last":
        models[0] = models[0].to(memory_format=torch.channels_last)
    models[1] = copy.deepcopy(models[0])
    extra = {"factor_dtype": torch.float64} if layout == "float64_factors" else {}
    directions, kept = [], []
    for model, clip in zip(models, (None, 1e30), strict=True):
        settings = {**CONTRACT, "kl_clip": clip, **extra}
        opt = tk.KFAC(model, **settings)
        for _ in range(2):  # the second step runs on kept decompositions
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            bucket = _bucket_gradients(model) if layout == "bucket" else None
            pointers = [p.grad.data_ptr() for p in model.parameters()]
            opt.step()
        kept.append([p.grad.data_ptr() for p in model.parameters()] == pointers)
        directions.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        if bucket is not None:
            torch.testing.assert_close(bucket, directions[-1], rtol=0, atol=0)
    torch.testing.assert_close(directions[0], directions[1], rtol=1e-6, atol=1e-9)
    assert kept[0] == (layout != "channels_last")  # a reshaped channels-last grad is a copy
    assert kept[1] == (layout == "bucket")  # fresh directions, copied only into a bucket


def test_damping_schedule_gives_each_steps_own_damping(float64: None) -> None:
    """``damping=callable``: step ``k`` uses ``λ_k = schedule(k)``: each step equals the
    dense damped KFAC step with that λ; a schedule returning λ ≤ 0 is refused, naming the
    step; combined with ``adaptive_damping`` it is refused."""
    from test_training_setups import joined_grad, joined_params, kfac_direction, use_statistics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    dampings = [0.3, 0.05, 0.01]
    opt = tk.KFAC(model, **{**CONTRACT, "damping": lambda k: dampings[k]})
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    for damping in dampings:
        layers = [model[0], model[2]]
        stats = [use_statistics(model, [m], loss_fn, x) for m in layers]
        opt.zero_grad()
        loss_fn(model(x)).backward()
        expected = [
            joined_params(m) - kfac_direction(a, g, joined_grad(m), damping)
            for m, (a, g) in zip(layers, stats, strict=True)
        ]
        opt.step()
        assert opt.last_stats["damping"] == damping
        for m, e in zip(layers, expected, strict=True):
            torch.testing.assert_close(joined_params(m), e, rtol=1e-10, atol=1e-12)
    opt.preconditioner.remove_hooks()
    with pytest.raises(ValueError, match="damping schedule at step 0"):
        tk.KFAC(model, damping=lambda k: 0.0)
    bad = tk.KFAC(model, damping=lambda k: 0.1 if k == 0 else -1.0)
    for _ in range(2):
        bad.zero_grad()
        loss_fn(model(x)).backward()
        if bad.preconditioner.steps == 1:
            with pytest.raises(ValueError, match="damping schedule at step 1"):
                bad.step()
        else:
            bad.step()
    with pytest.raises(ValueError, match="schedule cannot be combined"):
        tk.KFAC(model, damping=lambda k: 0.1, adaptive_damping=True)


def test_options_objects_equal_their_keywords() -> None:
    """``KFAC(model, curvature=CurvatureOptions(...))`` and ``TwoLevelKFAC(...,
    coarse=CoarseOptions(...))`` take the same steps as the same fields given as keywords;
    an object and its keywords together are refused."""
    x, y = batch()
    fields = {"damping": 0.1, "fisher": "empirical", "kl_clip": 1e-3}
    coarse = {"coarse_space": "residual", "combination": "adef2"}
    for cls, extra in ((tk.KFAC, {}), (tk.TwoLevelKFAC, coarse)):
        runs = []
        for as_object in (False, True):
            model = mlp()
            if as_object:
                objects = {"curvature": tk.CurvatureOptions(**fields)}
                if extra:
                    objects["coarse"] = tk.CoarseOptions(**extra)
                opt = cls(model, lr=0.1, **objects)
            else:
                opt = cls(model, lr=0.1, **fields, **extra)
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        assert torch.equal(runs[0], runs[1])
    with pytest.raises(TypeError, match="not both"):
        tk.KFAC(mlp(), curvature=tk.CurvatureOptions(), damping=0.1)


def test_one_optimizer_class_drives_every_level() -> None:
    """``KFAC(model, fine=..., coarse=CoarseOptions(...))`` takes the steps of the presets
    ``EKFAC``, ``KPSVD`` and ``TwoLevelKFAC(fine=...)``: the levels are objects the one
    preconditioner holds, not subclasses."""
    x, y = batch()
    cases = [
        (tk.EKFAC, {}, {"fine": "ekfac"}),
        (tk.KPSVD, {"power_iterations": 7}, {"fine": "kpsvd", "power_iterations": 7}),
        (
            tk.TwoLevelKFAC,
            {"fine": "ekfac", "coarse_space": "residual", "combination": "adef2"},
            {
                "fine": "ekfac",
                "coarse": tk.CoarseOptions(coarse_space="residual", combination="adef2"),
            },
        ),
    ]
    for preset, preset_args, kfac_args in cases:
        runs = []
        for cls, args in ((preset, preset_args), (tk.KFAC, kfac_args)):
            model = mlp()
            opt = cls(model, lr=0.1, **args)
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        assert torch.equal(runs[0], runs[1]), preset.__name__


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (tk.KFAC, {}),
        (tk.KFACCorrected, {}),
        (tk.TwoLevelKFAC, {"coarse_space": "krylov_nicolaides"}),
    ],
)
def test_a_fold_with_another_sequence_length_rescales_the_inverse(cls: type, kwargs: dict) -> None:
    """A fold whose ``T`` differs from the last one's, between two refreshes: the next
    steps divide by the new ``T`` (the cached inverse is keyed by it), so a run resumed
    after that fold (which rebuilds its inverses) steps as the uninterrupted one."""
    lengths = [3, 5, 5, 5, 2, 2]  # folds at steps 0, 2, 4; refreshes at 0 and 4

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(step)
        return torch.randn(6, lengths[step], 4, generator=gen), torch.randint(
            0, 3, (6,), generator=gen
        )

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), Mean(), nn.Linear(5, 3))
        opt = cls(model, lr=0.1, cov_interval=2, inv_interval=4, **kwargs)
        return model, opt

    def run(split: int | None) -> torch.Tensor:
        model, opt = build()
        for step in range(6):
            if step == split:
                state = copy.deepcopy((model.state_dict(), opt.state_dict()))
                model, opt = build()
                model.load_state_dict(state[0])
                opt.load_state_dict(state[1])
            x, y = batch(step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    assert torch.equal(run(3), run(None))


class Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def test_a_second_view_through_a_submodule_is_warned_of() -> None:
    """``model(x)`` and ``model.body(x2)`` under one loss: the optimizer captures the
    model's own forwards, so the body's block leaves the second call out (silently before
    2026-12-06); warned of once, naming the layers. A validation call of a submodule whose
    output no backward reaches is not."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.body(x)))

    torch.manual_seed(0)
    model = Net()
    opt = tk.KFAC(model, cov_interval=1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.body(x).sum()  # (no backward reaches it)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y) + model.body(2 * x).pow(2).mean()
    loss.backward()
    with pytest.warns(RuntimeWarning, match=r"layer\(s\) \['body'\] ran outside a call"):
        opt.step()


def _replace_parameters(model: nn.Module, how: str) -> None:
    if how == "overwrite_on_conversion":
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            model.to(torch.float32)  # same dtype, yet every Parameter is a new object
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(False)
    elif how == "load_state_dict_assign":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
    elif how == "module":  # model.fc = nn.Linear(...), transformers' resize_token_embeddings
        model[2] = nn.Linear(4, 3)
    else:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        last.weight = nn.Parameter(last.weight.detach().clone())


@pytest.mark.parametrize(
    "how", ["overwrite_on_conversion", "load_state_dict_assign", "assigned", "module"]
)
@pytest.mark.parametrize("build", [tk.KFAC, tk.EKFAC, tk.TwoLevelKFAC])
def test_parameters_replaced_after_building_are_refused(how: str, build: Any) -> None:
    """A user trial (2026-12-06, late): parameters replaced after the optimizer was built
    (the optimizer holds the old ones) left the model where it was at every later step,
    silently (moved by 0.0); so did a module replaced (found by a review). Now the step is
    refused by name before anything moves (a module: at the next capturing step), after a
    step or before the first."""
    x, y = batch()
    for steps_before in (1, 0):
        model = mlp()
        opt = build(model, lr=0.1, fisher="empirical", cov_interval=1, inv_interval=1)
        for _ in range(steps_before):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        _replace_parameters(model, how)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        said = "are not parameters the optimizer" if how == "module" else "is not the parameter it"
        with pytest.raises(ValueError, match=said):
            opt.step()
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_a_preconditioner_warns_of_layers_unfrozen_after_it_was_built() -> None:
    """A user trial (2026-12-06, late): ``KFACPreconditioner(model)`` takes the layers that
    train when it is built; a body unfrozen later and trained by the torch optimizer beside
    it (``add_param_group``) kept its raw gradient, silently. Now a warning names it, once;
    built with ``params=model.parameters()`` it is preconditioned and nothing warns."""
    x, y = batch()
    for params in (None, "all"):
        model = mlp()
        model[0].requires_grad_(False)
        given = None if params is None else model.parameters()
        precond = tk.KFACPreconditioner(model, params=given, fisher="empirical", cov_interval=1)
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model[0].requires_grad_(True)
        sgd.add_param_group({"params": model[0].parameters()})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                sgd.zero_grad()
                F.cross_entropy(model(x), y).backward()
                raw = model[0].weight.grad.clone()
                precond.step()
                sgd.step()
        said = [
            str(w.message)
            for w in caught
            if "were frozen when the preconditioner" in str(w.message)
        ]
        if params is None:
            assert len(said) == 1 and said[0].startswith("layer(s) ['0'] were frozen")
            assert torch.equal(model[0].weight.grad, raw)  # not preconditioned
        else:
            assert not said and not torch.equal(model[0].weight.grad, raw)


def test_a_norm_unfrozen_beside_a_preconditioner_is_not_warned_of() -> None:
    """Without ``norm_blocks`` a norm layer has no block whether it was frozen or not: its
    unfreezing is not warned of (the review of 2026-12-06 (late): the advice changed
    nothing); with ``norm_blocks=True`` it is."""
    x, y = batch()
    for norm_blocks in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
        model[1].requires_grad_(False)
        precond = tk.KFACPreconditioner(
            model, fisher="empirical", cov_interval=1, norm_blocks=norm_blocks
        )
        model[1].requires_grad_(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            F.cross_entropy(model(x), y).backward()
            precond.step()
        said = [
            str(w.message)
            for w in caught
            if "were frozen when the preconditioner" in str(w.message)
        ]
        assert len(said) == int(norm_blocks), said


@pytest.mark.parametrize("value", [-1.0, -1e-3, 0.0, math.nan, math.inf])
def test_damping_set_between_steps_is_checked(value: float) -> None:
    """``opt.preconditioner.damping = λ`` (the README's way to change λ in a run) took any
    value: a negative λ stepped with denominators ``(d − 1)``, NaN or 0 skipped every step
    without a word. It is checked as the constructor's ``damping`` is."""
    opt = tk.KFAC(mlp())
    with pytest.raises(ValueError, match=r"damping must be a finite number in \(0.0, inf\)"):
        opt.preconditioner.damping = value
    opt.preconditioner.damping = 0.5
    assert opt.preconditioner.damping == 0.5


def test_a_layer_pruned_after_building_is_named() -> None:
    """``prune.l1_unstructured(layer, "weight", …)`` after the optimizer was built is
    refused: the message said "Linear's weight is not a parameter of its own", without
    saying which of the model's Linears; it names the layer now."""
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = tk.KFAC(model)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for index in (2, 0):  # (the first layer is read before the others: a review)
        prune.l1_unstructured(model[index], "weight", amount=0.5)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(TypeError, match=rf"layer '{index}': Linear's weight is not a"):
            opt.step()
        prune.remove(model[index], "weight")


def test_damping_set_as_a_numpy_or_torch_scalar_is_taken() -> None:
    """A λ computed with numpy or torch (a review: the new check refused them, where the
    setter took them before): taken as the float it holds."""
    import numpy as np

    opt = tk.KFAC(mlp())
    for value in (np.float32(0.25), np.float64(0.5), torch.tensor(0.125)):
        opt.preconditioner.damping = value  # type: ignore[assignment]
        assert opt.preconditioner.damping == float(value)
        assert type(opt.preconditioner.damping) is float
    opt.preconditioner.damping = torch.tensor([0.75])  # type: ignore[assignment]
    assert opt.preconditioner.damping == 0.75
    opt.preconditioner.damping = np.array([0.5])  # type: ignore[assignment]
    assert opt.preconditioner.damping == 0.5
    with pytest.raises(TypeError, match="damping must be a real number"):
        opt.preconditioner.damping = torch.tensor([0.1, 0.2])  # type: ignore[assignment]


def test_a_curvature_option_set_in_a_param_group_is_warned_of_once() -> None:
    """``opt.param_groups[0]["damping"] = 1e-2`` is not read (the curvature options are the
    optimizer's): it was taken without a word; a warning names it and the fix, once."""
    model = mlp()
    opt = tk.KFAC(model)
    x, y = batch()
    opt.param_groups[0]["damping"] = 1e-2
    with pytest.warns(
        RuntimeWarning, match=r"\['damping'\] are curvature options.*preconditioner.damping"
    ):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


class _FusedLinear(nn.Module):
    """What ``prepare_qat`` swaps a fused ``nni`` sequence for: a new module computing with
    the old layer's weight (shared, not copied)."""

    def __init__(self, old: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = old.weight, old.bias

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(F.linear(x, self.weight, self.bias))


def test_a_layer_replaced_by_a_module_sharing_its_weight_is_named_as_replaced() -> None:
    """A trial: an optimizer built on ``fuse_modules_qat``'s sequences, then
    ``prepare_qat(inplace=True)``: the new module reads the old layer's weight, and the
    refusal spoke of a functional use "such as a tied decoder"; it names the replacement
    now (2026-12-10)."""
    model = mlp()
    opt = tk.KFAC(model, fisher="empirical")
    model[0] = _FusedLinear(model[0])
    with pytest.raises(ValueError, match=r"layer '0' is no longer a module of the model, but"):
        model(batch()[0])
    assert opt.preconditioner.layers
