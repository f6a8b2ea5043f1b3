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
from torch.optim.lr_scheduler import LRScheduler

import twolevel_kfac as tk


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


ADAMW = {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.05}


def assert_steps_of_adamw(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    adamw: dict[str, object],
    steps: int,
    halve_every: int | None = None,
) -> None:
    """The norm's (``model[1]``) steps are those of ``torch.optim.AdamW(**adamw)``, bit for
    bit, on the same gradients (``halve_every``: both under a ``StepLR`` halving the rate)."""
    norm = list(model[1].parameters())
    twins = [p.detach().clone().requires_grad_(True) for p in norm]
    reference = torch.optim.AdamW(twins, **adamw)  # type: ignore[arg-type]
    schedulers = (
        [torch.optim.lr_scheduler.StepLR(o, halve_every, gamma=0.5) for o in (opt, reference)]
        if halve_every
        else []
    )
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(batch(step)[0]), batch(step)[1]).backward()
        for twin, p in zip(twins, norm, strict=True):
            twin.grad = p.grad.clone()
        opt.step()
        reference.step()
        for scheduler in schedulers:
            scheduler.step()
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


def scheduled_run(steps: int, on_fallback: bool = False) -> tuple[nn.Module, list[float]]:
    """:func:`scheduled` run for ``steps``: the fallback group's ``lr`` at each step."""
    model, opt, schedulers = scheduled(on_fallback)
    assert opt.fallback is not None and opt.fallback.optimizer is not None
    rates = []
    for step in range(steps):
        run(model, opt, [], range(step, step + 1))
        rates.append(opt.fallback.optimizer.param_groups[0]["lr"])
        for scheduler in schedulers:
            scheduler.step()
    return model, rates


def test_an_lr_scheduler_on_the_optimizer_reaches_the_adamw_fallback() -> None:
    """The fallback's rate follows its group's: a scheduler on the KFAC optimizer (Hugging
    Face's Trainer builds its schedule on it) halves AdamW's too; the steps are torch's
    AdamW's under the same schedule, bit for bit (AdamW stayed at its first rate before
    2026-12-06 (evening))."""
    _, rates = scheduled_run(5)
    assert rates == [3e-3, 3e-3, 1.5e-3, 1.5e-3, 7.5e-4]
    model = net()
    opt = tk.KFAC(model, lr=0.1, fallback="adamw", fallback_options=ADAMW)
    assert_steps_of_adamw(model, opt, ADAMW, steps=5, halve_every=2)


def test_a_scheduler_on_the_fallback_itself_keeps_it_with_a_warning() -> None:
    """A scheduler on ``opt.fallback.optimizer`` takes the group over: from its first change
    (0.1× the rate followed until then, at step 3) AdamW's rate is the one it sets, no
    longer halved with the KFAC group's, and a warning says so once."""
    with pytest.warns(RuntimeWarning, match="changed outside the KFAC optimizer") as caught:
        _, rates = scheduled_run(7, on_fallback=True)
    assert sum("changed outside" in str(w.message) for w in caught) == 1
    assert rates == pytest.approx([3e-3, 3e-3, 1.5e-3, 1.5e-4, 1.5e-4, 1.5e-4, 1.5e-5])


def scheduled(on_fallback: bool) -> tuple[nn.Module, tk.KFAC, list[LRScheduler]]:
    """The model, optimizer and schedulers of :func:`scheduled_run`."""
    model = net()
    opt = tk.KFAC(model, lr=0.1, fallback="adamw", fallback_options=ADAMW)
    assert opt.fallback is not None and opt.fallback.optimizer is not None
    schedulers: list[LRScheduler] = [torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)]
    if on_fallback:
        schedulers.append(torch.optim.lr_scheduler.StepLR(opt.fallback.optimizer, 3, gamma=0.1))
    return model, opt, schedulers


def run(model: nn.Module, opt: tk.KFAC, schedulers: list[LRScheduler], steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        F.cross_entropy(model(batch(step)[0]), batch(step)[1]).backward()
        opt.step()
        for scheduler in schedulers:
            scheduler.step()


@pytest.mark.parametrize("on_fallback", [False, True])
def test_a_followed_or_left_fallback_resumes_bit_for_bit(on_fallback: bool) -> None:
    """A checkpoint mid-schedule resumes with the same rates and steps, whether the group
    followed the KFAC group's rate or was left to its own scheduler."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model, opt, schedulers = scheduled(on_fallback)
        run(model, opt, schedulers, range(7))
        first, opt, schedulers = scheduled(on_fallback)
        run(first, opt, schedulers, range(3))
        resumed, again, later = scheduled(on_fallback)
        resumed.load_state_dict(first.state_dict())
        again.load_state_dict(copy.deepcopy(opt.state_dict()))
        for scheduler, saved in zip(later, schedulers, strict=True):
            scheduler.load_state_dict(saved.state_dict())
        run(resumed, again, later, range(3, 7))
    for mine, theirs in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_a_checkpoint_saved_before_the_groups_followed_keeps_its_rate() -> None:
    """A checkpoint saved before 2026-12-06 (evening) (no ``source`` in its AdamW groups)
    continues as that code ran: the fallback's rate is the one saved (a scheduler on the
    fallback itself, which the README advised then, keeps setting it), not the KFAC
    group's (following reset a scheduled 1e-5 to 1e-3 in a review)."""
    first, opt, schedulers = scheduled(on_fallback=False)
    run(first, opt, schedulers, range(3))
    state = copy.deepcopy(opt.state_dict())
    for group in state["fallback"]["param_groups"]:
        del group["source"], group["lr_set"]
        group["lr"] = 1e-5  # (as its own scheduler left it)
    model, again, later = scheduled(on_fallback=False)
    model.load_state_dict(first.state_dict())
    again.load_state_dict(state)
    later[0].load_state_dict(schedulers[0].state_dict())
    assert again.fallback is not None and again.fallback.optimizer is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, again, later, range(3, 6))
    assert again.fallback.optimizer.param_groups[0]["lr"] == 1e-5


def test_most_parameters_on_the_fallback_step_are_warned_of() -> None:
    """A recurrent model whose LSTM holds most of the parameters trained them on the
    fallback step with no word of it; now a warning names the share and the layers (none
    where blocks hold most, as a norm beside two Linear layers)."""

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(16, 64, batch_first=True), nn.Linear(64, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0])

    with pytest.warns(RuntimeWarning, match=r"recurrent layers hold 98% .*'rnn' \(98%\)"):
        tk.KFAC(Recurrent(), class_dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.KFAC(net(), fallback="adamw")


def test_a_pruned_bias_takes_the_fallback_step() -> None:
    """``prune.l1_unstructured(layer, "bias", …)`` leaves ``bias_orig`` as the parameter and
    ``bias`` a plain tensor: the layer's block is ``W``'s alone, but ``bias_orig`` was
    counted as preconditioned, listed as ``KFAC Linear`` and stepped by KFAC's momentum
    step at KFAC's rate under ``fallback="adamw"`` (8–10× AdamW's step in a trial). It
    takes the fallback's step now, AdamW's bit for bit."""
    from torch.nn.utils import prune

    model = net()
    prune.l1_unstructured(model[0], "bias", amount=0.5)
    opt = tk.KFAC(model, lr=0.1, fallback="adamw", fallback_options=ADAMW)
    listed = [line.split() for line in opt.describe_blocks().splitlines()]
    assert ["0.bias_orig", "AdamW", "(no", "block)"] in listed
    twin = model[0].bias_orig.detach().clone().requires_grad_(True)
    reference = torch.optim.AdamW([twin], **ADAMW)  # type: ignore[arg-type]
    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(model(batch(step)[0]), batch(step)[1]).backward()
        twin.grad = model[0].bias_orig.grad.clone()
        opt.step()
        reference.step()
        assert torch.equal(model[0].bias_orig, twin)


@pytest.mark.parametrize("how", ["parameter", "module"])
def test_a_replaced_parameter_without_a_block_is_refused(how: str) -> None:
    """``ln.weight = nn.Parameter(…)`` or ``model.ln = nn.LayerNorm(…)`` after the optimizer
    was built: the new parameter was in no group and never moved (its gradient 9.4e-2 in
    a trial), silently, while the same on a ``Linear`` was refused. Refused now at the next
    capturing step, before anything moves."""
    model = net()
    opt = tk.KFAC(model, lr=0.1, cov_interval=1)  # (default: at most 10 steps later)
    _step(model, opt, 0)
    if how == "parameter":
        model[1].weight = nn.Parameter(model[1].weight.detach().clone())
    else:
        model[1] = nn.LayerNorm(8)
    before = [p.detach().clone() for p in model.parameters()]
    names = r"\['1.weight'\]" if how == "parameter" else r"\['1.weight', '1.bias'\]"
    with pytest.raises(ValueError, match=rf"parameter\(s\) {names} have gradients but are not"):
        _step(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_parameters_outside_given_params_or_added_are_not_refused() -> None:
    """With ``params=`` the optimizer owns those alone (another optimizer may step a new
    head), and ``add_param_group`` hands it new ones: neither is refused."""
    model = net()
    opt = tk.KFAC(model, lr=0.1, params=list(model.parameters()), cov_interval=1)
    model[1] = nn.LayerNorm(8)
    _step(model, opt, 0)
    model = net()
    opt = tk.KFAC(model, lr=0.1, cov_interval=1)
    model[1] = nn.LayerNorm(8)
    opt.add_param_group({"params": list(model[1].parameters())})
    before = model[1].weight.detach().clone()
    _step(model, opt, 0)
    assert not torch.equal(before, model[1].weight)


def test_a_layer_added_after_building_is_refused() -> None:
    """An adapter ``nn.Linear`` added to the forward after the optimizer was built was
    never moved, silently (a review): a module of a block type was left to the
    preconditioner's checks, which find replaced layers only. Refused now, by name."""
    model = net()
    opt = tk.KFAC(model, lr=0.1, cov_interval=1)
    _step(model, opt, 0)
    model.insert(3, nn.Linear(8, 8))  # (after the Tanh)
    with pytest.raises(ValueError, match=r"parameter\(s\) \['3.weight', '3.bias'\] have"):
        _step(model, opt, 1)
