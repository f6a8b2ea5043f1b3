"""``fallback=``: the parameters without a curvature block take torch's AdamW step exactly
(or the default momentum-SGD step), their state is checkpointed with the optimizer's, and
the optimizer lists which parameter got which block."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


ADAMW = {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.05}


def assert_steps_of_adamw(
    model: nn.Module, opt: torch.optim.Optimizer, adamw: dict[str, object], steps: int
) -> None:
    """The norm's (``model[1]``) steps are those of ``torch.optim.AdamW(**adamw)``, bit for
    bit, on the same gradients."""
    norm = list(model[1].parameters())
    twins = [p.detach().clone().requires_grad_(True) for p in norm]
    reference = torch.optim.AdamW(twins, **adamw)  # type: ignore[arg-type]
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(batch(step)[0]), batch(step)[1]).backward()
        for twin, p in zip(twins, norm, strict=True):
            twin.grad = p.grad.clone()
        opt.step()
        reference.step()
        for twin, p in zip(twins, norm, strict=True):
            assert torch.equal(p, twin)


@pytest.mark.parametrize("cls", [tk.KFAC, tk.EKFAC, tk.TwoLevelKFAC])
def test_the_adamw_fallback_is_torchs_step(cls: type[tk.KFAC]) -> None:
    model = net()
    opt = cls(model, lr=0.1, fallback="adamw", fallback_options=ADAMW)
    assert_steps_of_adamw(model, opt, ADAMW, steps=4)
    # the preconditioned layers did not take AdamW's step (their state is momentum SGD)
    assert "momentum_buffer" in opt.state[model[0].weight]
    assert "exp_avg" not in opt.state[model[0].weight]


def grouped(model: nn.Module) -> list[dict[str, object]]:
    """Decay / no-decay groups with layer-wise rates: the norm at a tenth of the rate,
    without decay; the first layer in a group that names no decay."""
    return [
        {"params": list(model[0].parameters())},
        {"params": list(model[1].parameters()), "lr": 0.01, "weight_decay": 0.0},
        {"params": list(model[3].parameters()), "weight_decay": 0.1},
    ]


def test_the_adamw_fallback_keeps_the_groups_rates_and_decay() -> None:
    """The norm in a group at a tenth of the rate, without decay, takes torch's AdamW step
    at a tenth of AdamW's rate and without decay (it took AdamW's default decay 0.01 and
    full rate: 1.0e-3 moved where 1e-5 was asked, before 2026-12-06)."""
    model = net()
    opt = tk.KFAC(model, lr=0.1, weight_decay=0.01, params=grouped(model), fallback="adamw")
    assert_steps_of_adamw(model, opt, {"lr": 1e-4, "weight_decay": 0.0}, steps=3)
    assert opt.fallback is not None
    groups = opt.fallback.optimizer.param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(pytest.approx(1e-4), 0.0)]
    assert all("lr_factor" not in g for g in groups)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    decayed = [{"params": list(model[1].parameters()), "weight_decay": 1e-4}]
    decayed.append({"params": [*model[0].parameters(), *model[3].parameters()]})
    opt = tk.KFAC(model, params=decayed, fallback="adamw", fallback_options={"weight_decay": 0.05})
    assert opt.fallback is not None  # (a group decaying at KFAC's rate takes AdamW's decay)
    assert [g["weight_decay"] for g in opt.fallback.optimizer.param_groups] == [0.05]


def test_a_single_group_adamw_checkpoint_loads_into_the_groups() -> None:
    """A checkpoint saved when the fallback was one AdamW group over every parameter
    (before 2026-12-06) loads into the mirrored groups: each parameter's moments,
    this optimizer's rates."""
    model = nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3), nn.LayerNorm(3)
    )
    twin = copy.deepcopy(model)

    def build(net: nn.Module) -> tk.KFAC:
        groups = [{"params": list(net[i].parameters()), "lr": 0.1 * (i + 1)} for i in (0, 1, 3, 4)]
        return tk.KFAC(net, lr=0.1, params=groups, fallback="adamw")

    opt, loaded = build(model), build(twin)
    opt.zero_grad()
    F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    opt.step()
    state = opt.state_dict()
    saved = state["fallback"]
    assert len(saved["param_groups"]) == 2
    flat = [i for group in saved["param_groups"] for i in group["params"]]
    one = {**saved["param_groups"][0], "params": flat, "lr": 1e-3}
    state["fallback"] = {**saved, "param_groups": [one]}  # (as saved before)
    loaded.load_state_dict(state)
    assert opt.fallback is not None and loaded.fallback is not None
    adamw = loaded.fallback.optimizer
    assert [g["lr"] for g in adamw.param_groups] == [pytest.approx(2e-3), pytest.approx(5e-3)]
    for mine, theirs in zip(model[4].parameters(), twin[4].parameters(), strict=True):
        before = opt.fallback.optimizer.state[mine]["exp_avg"]
        torch.testing.assert_close(adamw.state[theirs]["exp_avg"], before)


def test_the_default_fallback_is_the_momentum_step() -> None:
    model = net()
    opt = tk.KFAC(model, lr=0.1, momentum=0.9)
    norm = model[1].weight
    before = norm.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    grad = norm.grad.detach().clone()
    opt.step()
    torch.testing.assert_close(norm, before - 0.1 * grad, rtol=0, atol=0)
    assert opt.fallback is None


def test_blocks_are_listed_at_construction(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="twolevel_kfac"):
        opt = tk.KFAC(net(), fallback="adamw")
    table = opt.describe_blocks().splitlines()
    assert [line.split()[0] for line in table] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    ]
    assert "KFAC Linear '0'" in table[0] and "AdamW (no block)" in table[2]
    assert "KFAC blocks:" in caplog.text and "1.bias" in caplog.text


def test_the_fallback_state_is_checkpointed() -> None:
    def run(split: int | None) -> list[torch.Tensor]:
        model = net()
        opt = tk.KFAC(model, lr=0.1, fallback="adamw", cov_interval=2, inv_interval=2)
        for step in range(5):
            if step == split:
                saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
                model = net()
                opt = tk.KFAC(model, lr=0.1, fallback="adamw", cov_interval=2, inv_interval=2)
                model.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
            opt.zero_grad()
            F.cross_entropy(model(batch(step)[0]), batch(step)[1]).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(None), run(3), strict=True):
        assert torch.equal(a, b)
    state = tk.KFAC(net(), fallback="adamw").state_dict()
    with pytest.raises(ValueError, match="saved with another fallback than 'sgd'"):
        tk.KFAC(net()).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"fallback": "adam"}, ValueError, "fallback must be one of 'sgd', 'adamw'"),
        ({"fallback_options": {"lr": 1e-3}}, ValueError, "fallback_options apply to"),
        ({"fallback": "adamw", "fallback_options": {"momentum": 0.9}}, TypeError, "momentum"),
        (
            {"fallback": "adamw", "qmodel_lr_momentum": True},
            ValueError,
            "model every parameter's step",
        ),
        (
            {"fallback": "adamw", "adaptive_damping": True},
            ValueError,
            "model every parameter's step",
        ),
    ],
)
def test_bad_fallback_arguments_are_named(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        tk.KFAC(net(), **kwargs)


def test_adamw_fallback_refuses_a_sparse_embedding_when_built() -> None:
    """AdamW cannot step sparse gradients: said when the optimizer is built, not at its
    first step (``fallback='sgd'`` steps them)."""
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with (
        pytest.warns(UserWarning, match="sparse=True"),
        pytest.raises(
            ValueError, match=r"fallback='adamw' cannot step the sparse gradients of \['0'\]"
        ),
    ):
        tk.KFAC(model, fallback="adamw")
    with pytest.warns(UserWarning, match="sparse=True"):
        tk.KFAC(model)


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    opt.zero_grad()
    F.cross_entropy(model(batch(seed)[0]), batch(seed)[1]).backward()
    opt.step()


def test_parameters_added_later_are_listed_with_the_step_they_take() -> None:
    """Under ``fallback="adamw"`` a norm added with ``add_param_group`` takes KFAC's plain
    momentum step (AdamW's parameters are fixed when it is built): ``describe_blocks``
    says so (it said AdamW), and so does the warning, naming its parameters."""
    model = net()
    model[1].requires_grad_(False)
    opt = tk.KFAC(model, lr=0.1, momentum=0.0, fallback="adamw")
    model[1].requires_grad_(True)
    match = r"parameter\(s\) \['1.weight', '1.bias'\] added with add_param_group .* plain momentum"
    with pytest.warns(UserWarning, match=match):
        opt.add_param_group({"params": list(model[1].parameters()), "lr": 0.01})
    assert "1.weight  momentum SGD (no block)" in opt.describe_blocks()
    plain = net()
    sgd = tk.KFAC(plain, params=[*plain[0].parameters(), *plain[3].parameters()], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback step is the plain step: nothing to say
        sgd.add_param_group({"params": list(plain[1].parameters())})
    weight = model[1].weight.detach().clone()
    _step(model, opt, 0)
    assert model[1].weight.grad is not None
    torch.testing.assert_close(model[1].weight.detach(), weight - 0.01 * model[1].weight.grad)


def test_a_layer_unfrozen_outside_the_default_params_is_warned_of_once() -> None:
    """``KFAC(model)`` takes the parameters that train when it is built: a layer unfrozen
    later has gradients but no step moves it, which a warning says (once), naming it and
    the fix; built with ``params=model.parameters()`` it is preconditioned, no warning."""
    model = net()
    model[0].requires_grad_(False)
    opt = tk.KFAC(model, lr=0.1)
    _step(model, opt, 0)
    model[0].requires_grad_(True)
    weight = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"\['0.weight', '0.bias'\] were frozen .* params=model"):
        _step(model, opt, 1)
    assert torch.equal(model[0].weight, weight)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(model, opt, 2)
        model = net()
        model[0].requires_grad_(False)
        opt = tk.KFAC(model, params=model.parameters(), lr=0.1)
        _step(model, opt, 0)
        model[0].requires_grad_(True)
        _step(model, opt, 1)
    assert not [w for w in caught if "were frozen" in str(w.message)]
    assert not torch.equal(model[0].weight, weight)
