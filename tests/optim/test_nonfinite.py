"""A NaN/Inf loss or gradient never reaches the parameters, the momentum or the factors."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk


def model_and_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("optimizer", (tk.KFAC, tk.TwoLevelKFAC))
@pytest.mark.parametrize("fisher", ("mc", "empirical"))
def test_poisoned_batch_changes_nothing(optimizer: type[tk.KFAC], fisher: str) -> None:
    model, x, y = model_and_batch()
    opt = optimizer(model, lr=0.1, fisher=fisher, cov_interval=1)
    step(model, opt, x, y)
    params = copy.deepcopy(list(model.parameters()))
    factors = {
        n: (f.A.clone(), f.G.clone())
        for n, f in opt.preconditioner.factors.items()
        if f.A is not None and f.G is not None
    }
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    poisoned = x.clone()
    poisoned[3, 2] = float("nan")
    step(model, opt, poisoned, y)
    for before, after in zip(params, model.parameters(), strict=True):
        assert torch.equal(before, after)
    for name, (a, g) in factors.items():
        assert torch.equal(opt.preconditioner.factors[name].A, a)
        assert torch.equal(opt.preconditioner.factors[name].G, g)
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], momentum[id(p)])
    assert opt.nonfinite_steps == 1 and opt.consecutive_nonfinite == 1
    assert opt.last_stats == {"nonfinite_skipped": 1.0}
    step(model, opt, x, y)  # training goes on with the next good batch
    assert opt.consecutive_nonfinite == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_policy_raise() -> None:
    model, x, y = model_and_batch()
    opt = tk.KFAC(model, lr=0.1, nonfinite_policy="raise")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        step(model, opt, x * float("inf"), y)
    with pytest.raises(ValueError, match="nonfinite_policy must be one of"):
        tk.KFAC(model, nonfinite_policy="ignore")


def test_a_run_whose_steps_are_all_skipped_is_warned_of_once() -> None:
    """Parameters blown up by a far too large rate: every later loss is NaN, and every
    step was skipped and counted without a word, forever. After ten in a row one warning
    says the run has diverged; a good step ends the streak, and the next streak of ten
    warns again."""
    model, x, y = model_and_batch()
    opt = tk.KFAC(model, lr=0.1)
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))  # (a blown-up run: every loss NaN)
    with pytest.warns(RuntimeWarning, match=r"the last 10 steps were all skipped") as caught:
        for _ in range(15):
            step(model, opt, x, y)
    assert len([w for w in caught if "all skipped" in str(w.message)]) == 1
    assert opt.nonfinite_steps == opt.consecutive_nonfinite == 15
    opt.consecutive_nonfinite = 0  # (as a finite step would)
    with pytest.warns(RuntimeWarning, match=r"the last 10 steps"):
        for _ in range(10):
            step(model, opt, x, y)


def _tiny_run(method: str, **problem: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A 2-layer deep-linear run's config on 48 in-memory examples (6 batches of 8), and
    the examples."""
    from twolevel_kfac.experiments.config import parse_config

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 5, generator=gen), torch.randint(0, 3, (48,), generator=gen)
    entry = {"lr": 0.05} if method != "kfac" else {"lr": 0.05, "damping": 0.1}
    problem = {
        "model": {"name": "deep_linear", "kwargs": {"depth": 2, "width": 4, "in_features": 5}},
        "dataset": {"name": "in-memory"},
        "loss": "cross_entropy",
        "batch_size": 8,
        **problem,
    }
    config = parse_config({"problem": problem, "methods": {method: entry}}).for_run(method, 0)
    return config, x, y


@pytest.mark.parametrize("method", ("kfac", "sgd", "adam"))
def test_runner_skips_counts_and_stops(tmp_path: Path, method: str) -> None:
    """A poisoned example skips its step (counted); all-poisoned data stops the run."""
    from twolevel_kfac.experiments.runner import Data, train_run

    config, x, y = _tiny_run(method, epochs=2, max_consecutive_nonfinite=3)
    x[7, 1] = float("nan")  # one bad example: one skipped step per epoch
    result = train_run(config, tmp_path / "a", data=Data((x, y), None, None), progress=False)
    assert result.stop_reason == "epochs"
    assert [r["nonfinite_steps"] for r in result.records] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) for r in result.records)
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values())
    bad = Data((x * float("nan"), y), None, None)
    result = train_run(config, tmp_path / "b", data=bad, progress=False)
    assert result.stop_reason == "diverged" and result.step == 3
    assert result.records[-1]["diverged"] is True and result.records[-1]["nonfinite_steps"] == 3


@pytest.mark.parametrize("enabled", (True, False))
def test_grad_scaler_with_kfac(enabled: bool) -> None:
    """``torch.amp.GradScaler`` on CPU drives KFAC; an inf gradient skips the step."""
    model, x, y = model_and_batch()
    opt = tk.KFAC(model, lr=0.1, damping=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=enabled)
    for poison in (False, True, False):
        before = copy.deepcopy(list(model.parameters()))
        opt.zero_grad()
        batch = x * float("inf") if poison else x
        scaler.scale(F.cross_entropy(model(batch), y)).backward()
        scaler.step(opt)
        scaler.update()
        changed = any(
            not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
        )
        assert changed != poison
    assert all(torch.isfinite(p).all() for p in model.parameters())


def bn_model_and_batches() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))]
    return model, batches * 6


DEFERRING = {  # optimizer, extra settings, whether a step without statistics defers
    "kfac": (tk.KFAC, {}, True),
    "ekfac": (tk.EKFAC, {"inv_interval": 3}, True),
    "nicolaides": (tk.TwoLevelKFAC, {"coarse_space": "nicolaides"}, True),
    "residual-adef2": (tk.TwoLevelKFAC, {"coarse_space": "residual", "combination": "adef2"}, True),
    "residual-faithful": (
        tk.TwoLevelKFAC,
        {"coarse_space": "residual", "coarse_refresh": "faithful"},
        False,
    ),
    "ekfac-refreshing": (tk.EKFAC, {"inv_interval": 1}, False),
    "two-level-ekfac-refreshing": (tk.TwoLevelKFAC, {"fine": "ekfac", "inv_interval": 1}, False),
}


@pytest.mark.parametrize("method", DEFERRING)
@pytest.mark.parametrize("kl_clip", (1e-2, None))
@pytest.mark.parametrize("where", ("0.weight", "0.bias", "3.weight", "1.weight"))
@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
def test_gradient_checked_after_the_step_changes_nothing(
    method: str, kl_clip: float | None, where: str, bad: float
) -> None:
    """A step that folds no statistics and keeps no state checks its gradients through
    the directions (the KL clip's sum, or one pass after preconditioning) and rewinds the
    schedule: a NaN/Inf in any gradient (a preconditioned layer's weight or bias, or
    BatchNorm's) leaves parameters, momentum, factors and step counter as they were, and
    the run then continues bit for bit as if the step had never been tried. The faithful
    residual schedule rebuilds its basis from every gradient, and EKFAC carries its
    scalings into every new eigenbasis, so they check first."""
    optimizer, extra, defers = DEFERRING[method]
    model, batches = bn_model_and_batches()
    twin = copy.deepcopy(model)
    settings = {"lr": 0.1, "damping": 0.1, "kl_clip": kl_clip, "cov_interval": 3, **extra}
    opt, clean = optimizer(model, **settings), optimizer(twin, **settings)
    for x, y in batches[:2]:  # step 0 folds statistics, step 1 does not
        step(model, opt, x, y)
        step(twin, clean, x, y)
    pre = opt.preconditioner
    assert pre.defers_gradient_check() == defers
    params = copy.deepcopy(list(model.parameters()))
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    factors = {n: (f.A.clone(), f.G.clone()) for n, f in pre.factors.items()}
    x, y = batches[2]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = dict(model.named_parameters())[where].grad
    assert grad is not None
    grad.view(-1)[0] = bad
    opt.step()
    assert opt.nonfinite_steps == 1 and pre.steps == 2 and not pre.capture.active
    for before, after in zip(params, model.parameters(), strict=True):
        assert torch.equal(before, after)
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], momentum[id(p)])
    for name, (a, g) in factors.items():
        assert torch.equal(pre.factors[name].A, a) and torch.equal(pre.factors[name].G, g)
    for x, y in batches[2:]:
        step(model, opt, x, y)
        step(twin, clean, x, y)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_deferred_check_names_both_causes() -> None:
    model, x, y = model_and_batch()
    opt = tk.KFAC(model, lr=0.1, nonfinite_policy="raise", cov_interval=2)
    step(model, opt, x, y)
    with pytest.raises(FloatingPointError, match="non-finite gradient or preconditioned"):
        step(model, opt, x * float("inf"), y)
    assert opt.preconditioner.steps == 1


def test_unchecked_policy_does_the_same_steps_without_looking() -> None:
    """``nonfinite_policy="unchecked"`` takes the same steps as ``skip`` on finite data,
    and (by contract) lets a NaN gradient through instead of reading every gradient."""
    model, x, y = model_and_batch()
    twin = copy.deepcopy(model)
    checked = tk.KFAC(model, lr=0.1, cov_interval=2)
    unchecked = tk.KFAC(twin, lr=0.1, cov_interval=2, nonfinite_policy="unchecked")
    for _ in range(4):
        step(model, checked, x, y)
        step(twin, unchecked, x, y)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    step(twin, unchecked, x * float("nan"), y)
    assert unchecked.nonfinite_steps == 0
    assert not all(torch.isfinite(p).all() for p in twin.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_large_finite_half_tensor_is_finite(dtype: torch.dtype) -> None:
    """A float16 factor of 141² entries of 10 sums past float16's 65504: summed in float32,
    it is finite (it was dropped as a non-finite factor update); a NaN still is not."""
    from twolevel_kfac.finite import all_finite

    big = torch.full((141, 141), 10.0, dtype=dtype)
    assert all_finite([big, torch.ones(3)])
    big[3, 4] = math.nan
    assert not all_finite([big])


@pytest.mark.parametrize(
    ("optimizer", "settings"),
    [
        (tk.KFAC, {"fisher": "mc"}),
        (tk.KFAC, {"fisher": "empirical", "fisher_batch": 0.5}),
        (tk.KFAC, {"fisher": "mc", "fisher_batch": 0.5, "accumulation_steps": 2}),
        (tk.TwoLevelKFAC, {"fisher": "mc", "coarse_space": "residual"}),
        (tk.TwoLevelKFAC, {"fisher": "mc", "coarse_refresh": "faithful"}),
    ],
)
def test_a_skipped_refresh_step_leaves_the_later_draws_alone(
    optimizer: type[tk.KFAC], settings: dict[str, object]
) -> None:
    """A NaN gradient skipped on a step that captures statistics: the step had drawn its MC
    targets (and its Fisher rows) from the optimizer's generator, and the skip rewinds it,
    so the run goes on bit for bit as one that never saw the bad step (the draws of later
    steps included)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))]
    batches += [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))
                for _ in range(5)]  # fmt: skip
    micro = int(settings.get("accumulation_steps", 1))  # type: ignore[call-overload]
    common = {"lr": 0.1, "damping": 0.1, "cov_interval": 2, "inv_interval": 2, **settings}
    opt, clean = optimizer(model, **common), optimizer(twin, **common)

    def run(net: nn.Module, o: tk.KFAC, x: torch.Tensor, y: torch.Tensor, bad: bool) -> None:
        o.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            F.cross_entropy(net(xs), ys).backward()
        if bad:
            grad = net[2].weight.grad
            assert grad is not None
            grad[0, 0] = float("nan")
        o.step()

    for x, y in batches[:2]:
        run(model, opt, x, y, False)
        run(twin, clean, x, y, False)
    assert opt.preconditioner.capture.active  # step 2 captures and refreshes
    run(model, opt, *batches[2], True)
    assert opt.nonfinite_steps == 1
    for x, y in batches[2:]:
        run(model, opt, x, y, False)
        run(twin, clean, x, y, False)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    state, want = opt.preconditioner.generator.get_state(), clean.preconditioner.generator
    assert torch.equal(state, want.get_state())


def test_a_load_after_a_captured_forward_keeps_the_saved_generator() -> None:
    """``load_state_dict`` drops what a forward captured before it, and restores the saved
    generator after that: the drop's rewind (of the draws the forward made) does not undo
    the restore, so the resumed run draws what the saved one would have."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    twin = copy.deepcopy(model)  # before any optimizer hooks into model
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(4)]  # fmt: skip
    opt = tk.KFAC(model, lr=0.1, fisher="mc", cov_interval=1)
    step(model, opt, *batches[0])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    resumed = tk.KFAC(twin, lr=0.1, fisher="mc", cov_interval=1, seed=7)
    twin(batches[3][0])  # a captured forward (its MC draws) before the load
    twin.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    state = resumed.preconditioner.generator.get_state()
    assert torch.equal(state, opt.preconditioner.generator.get_state())
    for x, y in batches[1:]:
        step(model, opt, x, y)
        step(twin, resumed, x, y)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", ["sgd", "kfac"])
def test_a_run_stuck_for_an_epoch_is_diverged(tmp_path: Path, method: str) -> None:
    """Every batch NaN for a whole epoch, the epoch shorter than
    ``max_consecutive_nonfinite`` (20): the run is stopped as diverged at that epoch's end.
    It ran to its last epoch as ``"epochs"`` with null losses, so ``tlkfac tune`` scored it
    by an earlier epoch and picked it, and the report counted it among the finished runs.
    One bad example (one skipped step an epoch, shuffled across the epoch boundary) still
    trains to the end."""
    from twolevel_kfac.experiments.runner import Data, train_run

    config, x, y = _tiny_run(method, epochs=4)
    result = train_run(
        config, tmp_path / "a", data=Data((x * float("nan"), y), None, None), progress=False
    )
    assert result.stop_reason == "diverged" and result.step == 6  # 48 / 8 batches
    assert result.records[-1]["diverged"] is True
    config, x, y = _tiny_run(method, epochs=4, batch_size=24)  # 2 batches an epoch
    x[7, 1] = float("nan")
    result = train_run(config, tmp_path / "b", data=Data((x, y), None, None), progress=False)
    assert result.stop_reason == "epochs" and result.step == 8
    assert all(math.isfinite(r["train_loss"]) for r in result.records)


def test_a_first_capture_whose_statistics_overflow_is_named() -> None:
    """One input of 1e30 in the first batch: the loss and gradients are finite, the
    activations' second moments are not, so the first layer has no factors. The error
    told the user to run the forward and backward, which they had; it names the overflow
    now and nothing moved (the optimizer is built again: the other layers' statistics of
    that step may be folded)."""
    model, x, y = model_and_batch()
    opt = tk.KFAC(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    poisoned = x.clone()
    poisoned[5, 2] = 1e30
    with pytest.warns(RuntimeWarning, match="statistics of layer"):
        with pytest.raises(
            RuntimeError, match=r"layer\(s\) \['0', '2'\]: this step's, their first"
        ):
            step(model, opt, poisoned, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    opt = tk.KFAC(model, lr=0.1)
    step(model, opt, x, y)
    assert opt.preconditioner.steps == 1
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
