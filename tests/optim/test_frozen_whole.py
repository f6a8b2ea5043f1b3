"""A layer frozen whole during training (``requires_grad_(False)`` on all its parameters)
is left alone: not captured, stepped or checked, its factors kept for when it is unfrozen;
a coarse level that spans it takes no coarse term until its next refresh, which leaves the
layer out (:mod:`twolevel_kfac.optim.frozen`)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk

SETTINGS = {"cov_interval": 3, "inv_interval": 3, "kl_clip": None, "momentum": 0.9}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=gen),
        )
        for _ in range(count)
    ]


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch, set_to_none: bool = True) -> None:  # type: ignore[no-untyped-def]
    opt.zero_grad(set_to_none=set_to_none)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()


def _groups(model: nn.Module, index: int) -> list[dict]:  # type: ignore[type-arg]
    frozen = list(model[index].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in frozen)]
    return [{"params": frozen, "lr": 0.1}, {"params": rest, "lr": 0.1}]


@pytest.mark.parametrize("index", [0, 2, 4])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_kfac_leaves_a_layer_frozen_whole_alone(index: int, set_to_none: bool) -> None:
    """Frozen at step 4 (between refreshes), the layer never moves again (with
    ``zero_grad(set_to_none=False)`` too: its stale zero ``.grad`` is no gradient), and the
    other layers take, bit for bit, the steps of a twin that keeps the layer trainable at a
    learning rate of 0 (block-diagonal KFAC without a KL clip: no layer's step reads
    another's block). Unfrozen at step 11, it is preconditioned again from its old
    factors."""
    model, twin = _net(), _net()
    opt = tk.KFAC(model, params=_groups(model, index), **SETTINGS)
    twin_opt = tk.KFAC(twin, params=_groups(twin, index), **SETTINGS)
    batches = _batches(14)
    for step, batch in enumerate(batches):
        if step == 4:
            model[index].requires_grad_(False)
            twin_opt.param_groups[0]["lr"] = 0.0
            frozen = [p.detach().clone() for p in model[index].parameters()]
            factors = copy.deepcopy(opt.preconditioner.factors[str(index)].state_dict())
        if step == 11:
            model[index].requires_grad_(True)
            assert all(
                torch.equal(p, q) for p, q in zip(model[index].parameters(), frozen, strict=True)
            )
            kept = opt.preconditioner.factors[str(index)].state_dict()
            assert torch.equal(kept["A"], factors["A"]) and torch.equal(kept["G"], factors["G"])
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                if all(p is not r for r in model[index].parameters()):
                    assert torch.equal(p, q)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to warn about under KFAC
            _step(model, opt, batch, set_to_none)
        if step < 11:
            _step(twin, twin_opt, batch, set_to_none)
    moved = [not torch.equal(p, q) for p, q in zip(model[index].parameters(), frozen, strict=True)]
    assert all(moved) and opt.preconditioner.factors[str(index)].ready


@pytest.mark.parametrize("space", ["nicolaides", "residual", "spectral"])
@pytest.mark.parametrize("combination", ["additive", "adef2"])
def test_a_coarse_level_drops_a_layer_frozen_whole_at_its_next_refresh(
    space: str, combination: str
) -> None:
    """Frozen between two refreshes, a layer the coarse level spans: the steps until the
    next refresh take the fine level's direction alone (one warning); from the refresh on
    the coarse level spans the other layers only. The layer never moves."""
    model = _net()
    opt = tk.TwoLevelKFAC(model, coarse_space=space, combination=combination, **SETTINGS)
    level = opt.preconditioner.coarse_level
    assert level is not None
    batches = _batches(10)
    for step, batch in enumerate(batches):
        if step == 4:
            model[2].requires_grad_(False)
            frozen = [p.detach().clone() for p in model[2].parameters()]
        if step == 4:
            with pytest.warns(RuntimeWarning, match=r"layer\(s\) \['2'\] were frozen whole"):
                _step(model, opt, batch)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                _step(model, opt, batch)
        expected = ["0", "2", "4"] if step < 6 else ["0", "4"]
        assert level.names == expected, step
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), frozen, strict=True))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_between_the_freeze_and_the_refresh_the_steps_are_the_fine_levels() -> None:
    """The fallback is KFAC's own step: a KFAC loaded with the two-level optimizer's state
    at the freeze (factors, decompositions, momentum; the coarse state dropped) takes the
    same steps, bit for bit, until the coarse level's next refresh (step 6), and another
    one there (the coarse term is back, over the layers that train)."""
    model = _net()
    opt = tk.TwoLevelKFAC(model, **SETTINGS)
    batches = _batches(7)
    for batch in batches[:4]:
        _step(model, opt, batch)
    twin = copy.deepcopy(model)
    twin_opt = tk.KFAC(twin, **SETTINGS)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    model[2].requires_grad_(False)
    twin[2].requires_grad_(False)
    for step, batch in enumerate(batches[4:], start=4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _step(model, opt, batch)
        _step(twin, twin_opt, batch)
        same = all(
            torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True)
        )
        assert same == (step < 6), step


@pytest.mark.parametrize(
    "damping", [{"adaptive_damping": True, "damping_interval": 1}, {"qmodel_lr_momentum": True}]
)
def test_the_quadratic_model_leaves_a_layer_frozen_whole_out(damping: dict) -> None:  # type: ignore[type-arg]
    """Adaptive damping's ``ρ`` and the quadratic-model step read the kept mini-batch's
    Fisher over the layers that train: a layer frozen mid-run (its retained rows of the
    old block) is left out instead of failing on a shape, and never moves."""
    model = _net()
    opt = tk.KFAC(model, lr=0.1, cov_interval=2, inv_interval=2, **damping)
    for step, (x, y) in enumerate(_batches(8)):
        if step == 3:
            model[2].requires_grad_(False)
            frozen = [p.detach().clone() for p in model[2].parameters()]

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x), y)  # noqa: B023
            loss.backward()
            return loss

        opt.step(closure)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), frozen, strict=True))
    assert torch.isfinite(torch.tensor(opt.preconditioner.damping))


@pytest.mark.parametrize("fallback", ["sgd", "adamw"])
def test_a_frozen_fallback_parameter_is_not_moved(fallback: str) -> None:
    """A parameter without a block (a LayerNorm: the fallback's step) frozen mid-run keeps
    its value under ``zero_grad(set_to_none=False)`` with either fallback (torch's AdamW
    would move it by its moments), while the others train."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = tk.KFAC(model, lr=0.05, fallback=fallback, weight_decay=0.1)
    for step, batch in enumerate(_batches(6)):
        if step == 2:
            model[1].requires_grad_(False)
            frozen = [p.detach().clone() for p in model[1].parameters()]
            before = model[3].weight.detach().clone()
        _step(model, opt, batch, set_to_none=False)
    assert all(torch.equal(p, q) for p, q in zip(model[1].parameters(), frozen, strict=True))
    assert not torch.equal(model[3].weight, before)


def test_adaptive_damping_with_no_layer_of_the_kept_batch_training() -> None:
    """The kept mini-batch used only a layer frozen since, and this step trains another:
    the quadratic model has no Fisher term (its ``ρ`` from the slope and the damping),
    instead of failing on an empty list of layers."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(6, 3).double(), nn.Linear(6, 3).double()

        def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
            return self.b(x) if use_b else self.a(x)

    model = Two()
    settings = {"cov_interval": 3, "inv_interval": 3, "damping_interval": 1}
    opt = tk.KFAC(model, lr=0.1, adaptive_damping=True, **settings)
    for step, (x, y) in enumerate(_batches(6)):
        use_b = step >= 4
        if step == 4:  # the batch kept at step 3 used only a
            model.a.requires_grad_(False)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x, use_b), y)  # noqa: B023
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure)
        assert math.isfinite(opt.last_stats["rho"]), step


@pytest.mark.parametrize(
    ("cls", "extra"),
    [(tk.KFAC, {}), (tk.TwoLevelKFAC, {"coarse_space": "nicolaides"}), (tk.EKFAC, {})],
)
@pytest.mark.parametrize("save_at", [5, 7])
def test_a_state_saved_while_a_layer_is_frozen_loads_while_it_is_frozen(
    cls: type,
    extra: dict,
    save_at: int,  # type: ignore[type-arg]
) -> None:
    """Saved while layer 2 is frozen whole (before and after the refresh that drops it from
    the coarse level), loaded by an optimizer whose model has it frozen the same way: the
    resumed run, unfrozen later, steps bit for bit as the uninterrupted one (the load
    checked the frozen layer's factors against a block it has no longer: "the model
    changed since it was saved")."""
    batches = _batches(14)
    model = _net()
    opt = cls(model, lr=0.1, **SETTINGS, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, batch in enumerate(batches):
            if k == 4:
                model[2].requires_grad_(False)
            if k == save_at:
                saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
                resumed = _net()
                resumed.load_state_dict(saved[0])
                resumed_opt = cls(resumed, lr=0.1, **SETTINGS, **extra)
                resumed[2].requires_grad_(False)
                resumed_opt.load_state_dict(saved[1])
            if k == 10:
                model[2].requires_grad_(True)
                resumed[2].requires_grad_(True)
            _step(model, opt, batch)
            if k >= save_at:
                _step(resumed, resumed_opt, batch)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("cls", "extra"),
    [
        (tk.KFAC, {}),
        (tk.KFAC, {"inverse_method": "eigen"}),
        (tk.KFAC, {"damping_mode": "pi"}),
        (tk.EKFAC, {}),
        (tk.KPSVD, {}),
        *(
            (tk.TwoLevelKFAC, {"coarse_space": space, "combination": combination})
            for space in ("nicolaides", "krylov_nicolaides", "spectral", "residual")
            for combination in ("additive", "adef2")
        ),
    ],
)
@pytest.mark.parametrize("unfreeze_first", [True, False], ids=["unfrozen", "frozen"])
def test_a_layer_frozen_when_built_resumes_bit_identically_after_it_was_unfrozen(
    cls: type,
    extra: dict,  # type: ignore[type-arg]
    unfreeze_first: bool,
) -> None:
    """The backbone frozen when the optimizer is built and unfrozen at step 2, the state
    saved at step 5 and loaded by a run built as at the start (its layers frozen), which
    unfreezes them before or after the load: the resumed steps are the uninterrupted ones,
    bit for bit. Before 2026-12-05 the uninterrupted run applied its unfrozen layers'
    ``A⁻¹`` unbordered (1.6e-14 off after four steps), and a Nicolaides or Krylov basis
    rebuilt on load while they were frozen had the weight's shape alone: the next step
    raised a size mismatch."""
    batches = _batches(9)

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _net()
        for index in (0, 2):
            model[index].requires_grad_(False)
        return model, cls(model, params=model.parameters(), lr=0.1, **SETTINGS, **extra)

    def unfreeze(model: nn.Module) -> None:
        for index in (0, 2):
            model[index].requires_grad_(True)

    (model, opt), runs = build(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, batch in enumerate(batches):
            if k == 2:
                unfreeze(model)
            if k == 5:
                saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
                resumed, resumed_opt = build()
                if unfreeze_first:
                    unfreeze(resumed)
                resumed.load_state_dict(saved[0])
                resumed_opt.load_state_dict(saved[1])
                unfreeze(resumed)
            _step(model, opt, batch)
            if k >= 5:
                _step(resumed, resumed_opt, batch)
    runs = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (model, resumed)]
    assert torch.equal(runs[0], runs[1])
