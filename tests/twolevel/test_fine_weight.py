"""``fine_weight`` ``w`` (Tselepidis' ω₁) weighs every ``M⁻¹g`` of ``additive``'s
``d = w·M⁻¹g + cQg``, where no coarse term stands beside it too: ``coarse_scale = 0``, a
layer outside the coarse level (unused at its last refresh), and the steps a layer frozen
since the refresh pauses the coarse term for (``optim/frozen.py``). Each of these took
``M⁻¹g`` before 2026-12-06 (night), ``1/w`` times the formula's step (``c = 0``: KFAC's
whole step, while ``c = 1e-300`` gave ``w·M⁻¹g``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk

EXACT = {"fisher": "empirical", "ema_decay": 0.0, "kl_clip": None, "momentum": 0.0}


class Branched(nn.Module):
    """``head(tanh(branch(tanh(body(x)))))``, the branch taken only where ``use``."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.branch, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.use = True

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        return self.head(torch.tanh(self.branch(h)) if self.use else h)


def _batch(seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (12,), generator=gen)


def _deltas(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> dict[str, Tensor]:
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt.zero_grad()
    x, y = _batch(seed)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return {k: p.detach() - before[k] for k, p in model.named_parameters()}


@pytest.mark.parametrize("space", ["nicolaides", "residual"])
def test_coarse_scale_zero_takes_the_weighted_fine_step(space: str) -> None:
    """``c = 0`` with ``w = 0.5``: KFAC's steps at half the rate, to rounding (it took
    KFAC's whole step, 0.55 off on a step of 1.1 in a trial)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    twin = copy.deepcopy(model)
    kfac = tk.KFAC(model, lr=0.25, cov_interval=2, **EXACT)
    two = tk.TwoLevelKFAC(twin, lr=0.5, cov_interval=2, coarse_space=space, coarse_scale=0.0,
                          fine_weight=0.5, **EXACT)  # fmt: skip
    for seed in range(4):
        want, got = _deltas(model, kfac, seed), _deltas(twin, two, seed)
        for name, step in want.items():
            torch.testing.assert_close(got[name], step, rtol=1e-11, atol=1e-14)


def _paired_steps(weight: float, frozen: bool) -> dict[str, Tensor]:
    """Step 3 (no refresh) of a branched net whose steps 0–2 move nothing (``lr = 0``: both
    weights reach it in the same state), with the branch unused at the refresh of step 2
    (so outside the coarse level at step 3) or, ``frozen``, used all along and ``body``
    frozen after that refresh (the coarse term paused)."""
    torch.manual_seed(0)
    model = Branched().double()
    opt = tk.TwoLevelKFAC(model, lr=0.0, cov_interval=2, inv_interval=2, fine_weight=weight,
                          damping=0.05, **EXACT)  # fmt: skip
    for seed in range(3):
        model.use = frozen or seed != 2
        _deltas(model, opt, seed)
    model.use = True
    if frozen:
        model.body.requires_grad_(False)
    for group in opt.param_groups:
        group["lr"] = 1.0
    return _deltas(model, opt, 3)


def test_a_layer_outside_the_coarse_level_takes_the_weighted_fine_step() -> None:
    """The branch, unused at the last refresh, is outside the coarse level: its step is
    ``w·M⁻¹g`` (it was ``M⁻¹g``, beside ``w·M⁻¹g + cQg`` on the other layers)."""
    weighted, plain = _paired_steps(0.3, frozen=False), _paired_steps(1.0, frozen=False)
    for key in ("branch.weight", "branch.bias"):
        torch.testing.assert_close(weighted[key], 0.3 * plain[key], rtol=1e-12, atol=1e-15)
    assert not torch.allclose(weighted["body.weight"], 0.3 * plain["body.weight"])  # (+cQg)


def test_the_steps_a_frozen_layer_pauses_the_coarse_term_for_are_weighted() -> None:
    """A layer frozen whole since the refresh pauses the coarse term: every layer then
    takes ``w·M⁻¹g`` (it took ``M⁻¹g``)."""
    with pytest.warns(RuntimeWarning, match="frozen whole"):
        weighted = _paired_steps(0.3, frozen=True)
    with pytest.warns(RuntimeWarning, match="frozen whole"):
        plain = _paired_steps(1.0, frozen=True)
    assert not weighted["body.weight"].any()
    for key, step in plain.items():
        torch.testing.assert_close(weighted[key], 0.3 * step, rtol=1e-12, atol=1e-15)
