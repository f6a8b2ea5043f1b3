"""Rows of frames folded into the batch (``[B·T, …]``) joined, repeated or regrouped along
another dimension keep their samples (``curvature/row_proof.py``): a per-frame CLS token
joined to each frame's tokens, two streams' features, TimeSformer's frames put back, a
video's 5-D layout folded. Each was read as gathered rows before 2026-12-12: KFAC 1–3 off
the per-video step in a trial, silently; two-level KFAC refused. A view of another
argument is not proved (tabular models' ``forward(x_num, x_cat)``): warned of."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import step_change

B, T, N, D = 3, 2, 4, 4
EXACT = {"lr": 1.0, "fisher": "empirical", "cov_interval": 1, "inv_interval": 1,
         "ema_decay": 0.0, "kl_clip": None, "momentum": 0.0, "damping": 0.1}  # fmt: skip


class Frames(nn.Module):
    """A per-frame token ``Linear`` on ``[B·T, N, D]`` folded frames, a per-frame joining
    ``form``, a ``Linear`` after it and a head on the mean. ``folded_late`` joins on
    ``[B, T, …]`` and folds after, the form every proof already covered (its reference)."""

    def __init__(self, form: str, folded_late: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.form, self.late = form, folded_late
        self.embed, self.mix, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, D, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, N, D]
        h = torch.tanh(self.embed(x if self.late else x.reshape(B * T, N, D)))
        shape = (B, T) if self.late else (B * T,)
        if self.form == "cls":  # a CLS parameter joined to each frame's tokens
            h = torch.cat([self.cls.expand(*shape, 1, D), h], -2)
        elif self.form == "streams":  # two streams' features side by side
            h = torch.cat([h, h.flip(-1) ** 2], -1)[..., ::2]
        elif self.form == "stacked":
            h = torch.stack([h, 2 * h], -2).flatten(-3, -2)
        elif self.form == "repeat":  # a per-video token repeated over the frames
            video = h.reshape(B, -1, D).mean(1, keepdim=True)
            token = video.unsqueeze(1).repeat(1, T, 1, 1) if self.late else video.repeat(
                1, T, 1).reshape(B * T, 1, D)  # fmt: skip
            h = torch.cat([token, h], -2)
        out = torch.tanh(self.mix(h))
        return self.head(out.reshape(B, -1, D).mean(1))


@pytest.mark.parametrize("optimizer", [tk.KFAC, tk.TwoLevelKFAC])
@pytest.mark.parametrize("form", ["cls", "streams", "stacked", "repeat"])
def test_rows_of_folded_frames_keep_their_samples(optimizer: type[tk.KFAC], form: str) -> None:
    x = torch.randn(B, T, N, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    moved = {}
    for late in (False, True):
        model = Frames(form, late).double()
        opt = optimizer(model, **EXACT)
        moved[late] = step_change(opt, model.mix.weight, F.cross_entropy(model(x), y))
    assert float(moved[True].abs().max()) > 1e-3
    torch.testing.assert_close(moved[False], moved[True], rtol=1e-10, atol=1e-12)


class DividedAttention(nn.Module):
    """TimeSformer's divided space-time block on tokens ``[B, N·T, D]`` (``(n t)`` order):
    the time embedding added to the time rows ``[B·N, T, D]``, put back to ``[B, N·T, D]``
    in one reshape or, as einops does, in two (``two_steps``: each merging or splitting
    leading dimensions); time attention, then space attention on the frames ``[B·T,
    1 + N, D]``, a CLS token joined to each."""

    def __init__(self, two_steps: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.two_steps = two_steps
        self.embed, self.time, self.tfc = nn.Linear(D, D), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.space, self.head = nn.Linear(D, 3 * D), nn.Linear(D, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, D, dtype=torch.float64))
        self.when = nn.Parameter(torch.randn(1, T, D, dtype=torch.float64))  # time embedding

    @staticmethod
    def _attend(qkv: Tensor) -> Tensor:
        q, k, v = qkv.chunk(3, -1)
        return torch.softmax(q @ k.transpose(-2, -1), -1) @ v

    def forward(self, x: Tensor) -> Tensor:  # x [B, N·T, D]
        x = self.embed(x).reshape(B, N, T, D).reshape(B * N, T, D) + self.when  # (time rows)
        if self.two_steps:
            x = x.reshape(B, N, T, D).reshape(B, N * T, D)
        else:
            x = x.reshape(B, N * T, D)
        rows = self._attend(self.time(x.reshape(B, N, T, D).reshape(B * N, T, D)))
        x = x + self.tfc(rows.reshape(B, N, T, D).reshape(B, N * T, D))
        frames = x.reshape(B, N, T, D).permute(0, 2, 1, 3).reshape(B * T, N, D)
        frames = torch.cat([self.cls.expand(B * T, 1, D), frames], 1)
        out = self._attend(self.space(frames))[:, 0]
        return self.head(out.reshape(B, T, D).mean(1))


@pytest.mark.parametrize("optimizer", [tk.KFAC, tk.TwoLevelKFAC])
def test_time_rows_put_back_in_one_reshape(optimizer: type[tk.KFAC]) -> None:
    """``[B·N, T, D] → [B, N·T, D]`` in one reshape: each row of the input lies inside one
    row of the output. Proved since 2026-12-12 (only merged or split leading dimensions
    were, einops' two steps: the space attention 0.97 off as gathered rows, silently)."""
    x, y = torch.randn(B, N * T, D, dtype=torch.float64), torch.tensor([0, 1, 2])
    moved = []
    for two_steps in (False, True):
        model = DividedAttention(two_steps).double()
        opt = optimizer(model, **EXACT)
        moved.append(step_change(opt, model.space.weight, F.cross_entropy(model(x), y)))
    assert float(moved[1].abs().max()) > 1e-3
    torch.testing.assert_close(moved[0], moved[1], rtol=1e-10, atol=1e-12)


class Tabular(nn.Module):
    """``forward(x_num, x_cat)``: a table looked up on the categories flattened
    (``flat``) or as ``[B, columns]``."""

    def __init__(self, flat: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.flat, self.table = flat, nn.Embedding(6, 2)
        self.head = nn.Linear(2 * 3 + 2, 3)

    def forward(self, x_num: Tensor, x_cat: Tensor) -> Tensor:
        if self.flat:
            codes = self.table(x_cat.reshape(-1)).view(len(x_cat), -1)
        else:
            codes = self.table(x_cat).flatten(1)
        return self.head(torch.cat([codes, x_num], 1))


def test_a_view_of_another_argument_is_warned_of() -> None:
    """The categories flattened in ``forward`` are read as gathered rows (the table's step
    0.23 off at the default damping, 1.78 at 0.1, in a trial): another argument with the
    batch's rows need not hold the samples (time-major, a support set, a memory bank:
    proving them took steps 0.4–14 off in a review), so nothing proves them. Warned of
    since 2026-12-12, with the lookup on ``[B, columns]`` that KFAC reads as 3 positions
    of each sample."""
    x_num, x_cat = torch.randn(5, 2), torch.randint(0, 6, (5, 3))
    model = Tabular(flat=True).double()
    opt = tk.KFAC(model, **EXACT)  # noqa: F841 (kept: its hooks)
    with pytest.warns(RuntimeWarning, match=r"'table' was called on 15 rows.*look up ids"):
        model(x_num.double(), x_cat)
