"""Windows of a feature map as rows (Swin's ``window_partition``: ``view → permute keeping
the batch first → reshape → view``; timm's attention on them): each window's tokens are
locations of their sample,
so a position-wise layer on ``[B·n, s², C]`` takes the step it takes on ``[B, H·W, C]``
(before 2026-12-09 the last ``view``, which keeps the rows, ended the proof: the windows
were read as gathered rows, 3× off KFC's step, silently; and at ``s² = B`` the
sample-major warning fired, advising to move the batch first)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from test_kfac_exact import CONTRACT

B, H, C, S = 4, 4, 6, 2  # S² = B: the coincidence that set the warning off


def windows(x: Tensor) -> Tensor:
    """``[B, H, H, C] → [B·n, S², C]`` as timm's Swin partitions them."""
    b, h, w, c = x.shape
    parts = x.view(b, h // S, S, w // S, S, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, S, S, c)
    return parts.view(-1, S * S, c)


def merged(parts: Tensor) -> Tensor:
    """The inverse of :func:`windows`."""
    c = parts.shape[-1]
    grid = parts.view(B, H // S, H // S, S, S, c).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(B, H, H, c)


class WindowNet(nn.Module):
    """Window attention, its projections on the windows (``inside``) or on the map."""

    def __init__(self, inside: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.qkv = nn.Linear(C, C), nn.Linear(C, 3 * C)  # (a patch embedding)
        self.proj, self.head = nn.Linear(C, C), nn.Linear(C, 3)
        self.inside = inside

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        if self.inside:
            q, k, v = self.qkv(windows(x)).chunk(3, dim=-1)
        else:
            q, k, v = windows(self.qkv(x)).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v)
        out = merged(self.proj(attended)) if self.inside else self.proj(merged(attended))
        return self.head(out.mean(dim=(1, 2)))


class TimmWindowNet(WindowNet):
    """timm's ``WindowAttention`` on the windows: heads split by ``reshape → permute(2, 0,
    3, 1, 4) → unbind(0)`` (the rows moved second, then first again), a relative position
    bias gathered from a parameter table and broadcast in with ``unsqueeze(0)``, heads put
    back by ``transpose(1, 2).reshape``; on the map (``inside=False``) the same attention
    from projections of ``[B, H, H, C]``."""

    heads = 2

    def __init__(self, inside: bool) -> None:
        super().__init__(inside)
        self.table = nn.Parameter(torch.randn((2 * S - 1) ** 2, self.heads) * 0.1)
        self.index = torch.randint(0, (2 * S - 1) ** 2, (S * S, S * S))

    def attend(self, qkv: Tensor) -> Tensor:
        rows, n = qkv.shape[:2]
        q, k, v = qkv.reshape(rows, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        scores = (q * 0.5) @ k.transpose(-2, -1) + bias.unsqueeze(0)
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(rows, n, -1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        if self.inside:
            out = merged(self.proj(self.attend(self.qkv(windows(x)))))
        else:
            out = self.proj(merged(self.attend(windows(self.qkv(x)))))
        return self.head(out.mean(dim=(1, 2)))


@pytest.mark.parametrize("model", [WindowNet, TimmWindowNet])
@pytest.mark.parametrize("optimizer", [tk.KFAC, tk.TwoLevelKFAC])
def test_window_rows_take_the_steps_of_the_map(
    float64: None, optimizer: type, model: type[WindowNet]
) -> None:
    x = torch.randn(B, H, H, C, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(2))
    moved = []
    for inside in (False, True):
        net = model(inside)
        opt = optimizer(net, damping=0.1, **CONTRACT)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no sample-major warning at S² = B)
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
        moved.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.testing.assert_close(moved[1], moved[0], rtol=1e-10, atol=1e-12)
