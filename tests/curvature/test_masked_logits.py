"""Logits masked with ``-inf`` (invalid actions, masked classes) under ``fisher="mc"``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk

N, D, C = 8, 4, 4


class Policy(nn.Module):
    """Logits with the invalid actions filled with ``fill``."""

    def __init__(self, fill: float) -> None:
        super().__init__()
        self.fill = fill
        self.l1, self.l2 = nn.Linear(D, 8), nn.Linear(8, C)

    def forward(self, s: Tensor, valid: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(s))).masked_fill(~valid, self.fill)


def _run(fill: float, masked_steps: set[int]) -> tuple[list[Tensor], tk.KFAC]:
    torch.manual_seed(0)
    model = Policy(fill).double()
    opt = tk.KFAC(model, lr=0.1, damping=0.05, fisher="mc", cov_interval=1, inv_interval=1,
                  ema_decay=0.0, kl_clip=None, momentum=0.0)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    steps = []
    for step in range(4):
        s = torch.randn(N, D, generator=gen, dtype=torch.float64)
        valid = torch.ones(N, C, dtype=torch.bool)
        if step in masked_steps:
            valid[::2, 3] = False  # action 3 invalid in half the states
        actions = torch.randint(0, 3, (N,), generator=gen)
        advantages = torch.randn(N, generator=gen, dtype=torch.float64)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        logp = F.log_softmax(model(s, valid), -1).gather(1, actions[:, None])[:, 0]
        (-(logp * advantages).mean()).backward()
        opt.step()
        steps.append(
            torch.cat(
                [
                    (p.detach() - b).flatten()
                    for p, b in zip(model.parameters(), before, strict=True)
                ]
            )
        )
    return steps, opt


@pytest.mark.parametrize("masked_steps", [{2}, {0, 1, 2, 3}])
def test_minus_inf_logits_step_as_a_large_negative_fill(masked_steps: set[int]) -> None:
    """``masked_fill(~valid, -inf)``: softmax gives the masked actions probability 0, the
    draws never take them, the sampled loss is finite. Any ``-inf`` skipped the step's
    statistics before 2026-12-08: masked on some steps, the step took the previous
    batch's factors (1.09 off in a trial), silently; masked on every step, it failed with
    a message about ``torch.no_grad``. Now the step of a ``-1e9`` fill (the same draws:
    ``exp(-1e9) = 0``), which a trial checked against its own reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours, opt = _run(float("-inf"), masked_steps)
        want, _ = _run(-1e9, masked_steps)
    for got, expected in zip(ours, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert opt.preconditioner.factors["l2"].num_updates == 4


def test_a_row_with_every_action_masked_gives_no_statistics() -> None:
    """A state with no valid action (every logit ``-inf``) has no distribution to draw
    from (``torch.multinomial`` would raise inside the forward): that step's statistics
    are skipped, as any non-finite output's (its loss is NaN; the gradient of its row,
    through ``masked_fill``, is 0)."""
    torch.manual_seed(0)
    model = Policy(float("-inf")).double()
    opt = tk.KFAC(model, fisher="mc", cov_interval=1, inv_interval=1)
    s = torch.randn(N, D, dtype=torch.float64)
    valid = torch.ones(N, C, dtype=torch.bool)
    losses = []
    for _ in range(2):  # a step of valid actions first, then one with a state without any
        opt.zero_grad()
        loss = -F.log_softmax(model(s, valid), -1)[:, 0].mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        valid[0] = False
    assert math.isfinite(losses[0]) and math.isnan(losses[1])
    assert opt.preconditioner.factors["l2"].num_updates == 1
