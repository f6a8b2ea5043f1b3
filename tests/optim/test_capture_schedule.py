"""Layers used on other steps than the regular captures (:mod:`twolevel_kfac.optim.
schedule`): two task heads taking turns are both preconditioned and both refreshed; a
layer used once is chased for ``cov_interval`` steps at most; a model whose layers all
run every step captures on the interval alone; a resume mid-chase is bit-identical."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk


class TwoHeads(nn.Module):
    """A shared body and two heads; ``task`` picks the head of a step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.h1, self.h2 = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: Tensor, task: int) -> Tensor:
        return (self.h1 if task == 0 else self.h2)(self.body(x))


def _run(model: TwoHeads, opt: tk.KFAC, tasks: list[int], seed: int = 1) -> list[bool]:
    """Steps on ``tasks``; returns whether each step captured statistics."""
    gen = torch.Generator().manual_seed(seed)
    captured = []
    for task in tasks:
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        captured.append(opt.preconditioner.capture.active)
        opt.zero_grad()
        F.cross_entropy(model(x, task), y).backward()
        opt.step()
    return captured


@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC])
def test_heads_taking_turns_are_both_preconditioned_and_refreshed(cls: type) -> None:
    """At the default ``cov_interval=10`` the regular captures fall on ``h1``'s steps
    (even); ``h2`` gets its statistics on the step after it is first met (one warning),
    and is refreshed about every 10 of its steps after, at two extra captures per interval
    (the regular one sees ``h1``, then the chase one ``h1`` and one ``h2``)."""
    model = TwoHeads()
    opt = cls(model, lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captured = _run(model, opt, [step % 2 for step in range(100)])
    assert sum("no curvature statistics yet" in str(w.message) for w in caught) == 1
    factors = opt.preconditioner.factors
    assert factors["h2"].ready and factors["h2"].num_updates >= 9
    assert factors["h1"].num_updates >= 10
    assert sum(captured) <= 30  # 10 regular, and two chasing h2 per interval (h1, then h2)


def test_every_layer_every_step_captures_on_the_interval_alone() -> None:
    model = TwoHeads()
    opt = tk.KFAC(model, lr=0.05, cov_interval=5, inv_interval=5)
    captured = _run(model, opt, [0] * 23)
    assert [i for i, c in enumerate(captured) if c] == [0, 5, 10, 15, 20]


def test_a_layer_used_once_is_chased_for_one_interval() -> None:
    """``h2`` used once, at step 3 (no capture): the next 5 steps capture looking for it,
    then the schedule is the interval's again; ``h2`` keeps no statistics."""
    model = TwoHeads()
    opt = tk.KFAC(model, lr=0.05, cov_interval=5, inv_interval=5)
    tasks = [0] * 23
    tasks[3] = 1
    with pytest.warns(RuntimeWarning, match=r"\['h2'\] have gradients but no curvature"):
        captured = _run(model, opt, tasks)
    assert [i for i, c in enumerate(captured) if c] == [0, 4, 5, 6, 7, 10, 15, 20]
    assert not opt.preconditioner.factors["h2"].ready


def test_a_resume_while_a_layer_is_chased_is_bit_identical() -> None:
    """Saved while ``h2`` is chased (stale after the regular captures saw only ``h1``),
    the resumed run captures on the same steps and takes the same steps."""
    tasks = [step % 2 for step in range(30)]
    model = TwoHeads()
    opt = tk.KFAC(model, lr=0.05, cov_interval=4, inv_interval=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(model, opt, tasks[:14])
    assert opt.preconditioner.schedule.pending  # h2 is chased at the save
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    rest = _run(model, opt, tasks[14:], seed=2)
    resumed = TwoHeads()
    resumed.load_state_dict(saved[0])
    resumed_opt = tk.KFAC(resumed, lr=0.05, cov_interval=4, inv_interval=4)
    resumed_opt.load_state_dict(saved[1])
    assert _run(resumed, resumed_opt, tasks[14:], seed=2) == rest
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


class ManyHeads(nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 3) for _ in range(heads))

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.heads[task](self.body(x))


@pytest.mark.parametrize("pattern", ["random", "every_11th"])
def test_chasing_costs_at_most_two_captures_per_interval(pattern: str) -> None:
    """Eight heads drawn at random each step: at most 2 chasing captures per interval
    beside the regular one (the bound); a head used every 11th step at ``cov_interval=10``
    is chased where its gap says it comes next: once that gap is known every chasing
    capture meets it, and it is refreshed about every 11 steps."""
    gen = torch.Generator().manual_seed(3)
    if pattern == "random":
        tasks = torch.randint(0, 8, (200,), generator=gen).tolist()
    else:
        tasks = [1 if step % 11 == 5 else 0 for step in range(200)]
    model = ManyHeads(8)
    opt = tk.KFAC(model, lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = _run(model, opt, tasks)  # type: ignore[arg-type]
    steps = [i for i, c in enumerate(captured) if c]
    per_interval = [sum(1 for s in steps if s // 10 == w) for w in range(20)]
    assert max(per_interval) <= 3 and all(s in steps for s in range(0, 200, 10))
    if pattern == "every_11th":  # once its gap is known, its chases meet the head
        met = [s for s in steps if s % 10 and tasks[s] == 1]
        assert len(met) >= 5 and opt.preconditioner.factors["heads.1"].num_updates >= 8


def test_a_resumed_run_does_not_warn_again_about_a_layer_it_warned_about() -> None:
    """``h2`` is first used between captures (a warning), saved before it has statistics,
    and used again between captures after the resume: the resumed run stays silent, as
    the uninterrupted one does."""
    tasks = [0] * 12
    tasks[2] = tasks[8] = 1
    model = TwoHeads()
    opt = tk.KFAC(model, lr=0.05, cov_interval=5, inv_interval=5)
    with pytest.warns(RuntimeWarning, match=r"\['h2'\] have gradients but no curvature"):
        _run(model, opt, tasks[:7])
    assert not opt.preconditioner.factors["h2"].ready
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    resumed = TwoHeads()
    resumed.load_state_dict(saved[0])
    resumed_opt = tk.KFAC(resumed, lr=0.05, cov_interval=5, inv_interval=5)
    resumed_opt.load_state_dict(saved[1])
    for run_model, run_opt in ((model, opt), (resumed, resumed_opt)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _run(run_model, run_opt, tasks[7:], seed=2)
