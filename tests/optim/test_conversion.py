"""transformers' ``Conv1D`` (``x @ W + b``, ``W`` stored ``[in, out]``) swapped for the
``nn.Linear`` of the same map (``twolevel_kfac.conversion``): the same outputs, a KFAC block
for each (they took the fallback step), and the trained weights put back for saving."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as GPT-2 has it."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c_fc, self.c_proj, self.head = Conv1D(6, 4), Conv1D(4, 6), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + self.c_proj(torch.tanh(self.c_fc(x))))


def test_the_swap_keeps_the_outputs_and_gives_each_a_block() -> None:
    x, y = torch.randn(5, 7, 4, dtype=torch.float64), torch.randint(0, 3, (5, 7))
    model = Block().double()
    before = model(x)
    with pytest.warns(UserWarning, match="Conv1D has a weight matrix but no block"):
        tk.KFAC(model, class_dim=-1)
    swapped = tk.linear_from_conv1d(model)
    assert sorted(swapped) == ["c_fc", "c_proj"] and isinstance(model.c_fc, nn.Linear)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-14)
    opt = tk.KFAC(model, class_dim=-1, lr=0.1)
    assert set(opt.preconditioner.layers) == {"c_fc", "c_proj", "head"}
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
    trained = model(x)
    tk.conv1d_from_linear(model, swapped)
    assert type(model.c_fc) is Conv1D and model.c_fc.weight.shape == (4, 6)
    torch.testing.assert_close(model(x), trained, rtol=0, atol=1e-14)


def test_a_tied_conv1d_is_not_swapped() -> None:
    model = Block()
    model.c_proj.weight = nn.Parameter(model.c_fc.weight.t().contiguous())
    model.c_proj.bias = model.c_fc.bias = nn.Parameter(torch.zeros(6))
    model.c_proj.nf = 6
    with pytest.raises(
        ValueError, match="'c_fc' \\(Conv1D\\) shares a parameter with \\['c_proj'\\]"
    ):
        tk.linear_from_conv1d(model)


def test_putting_back_checks_the_module() -> None:
    model = Block()
    swapped = tk.linear_from_conv1d(model)
    model.c_fc = nn.Linear(4, 5)
    with pytest.raises(ValueError, match="'c_fc' is not the Linear"):
        tk.conv1d_from_linear(model, swapped)


def test_an_embedding_bag_is_told_its_preconditioned_form() -> None:
    """``nn.EmbeddingBag`` takes the fallback step; the warning told it to convert to
    ``nn.Linear`` (not a linear map of a vector input). Since 2026-12-12 it names the
    lookup and the sum over the slots, which KFAC preconditions."""
    model = nn.Sequential(nn.EmbeddingBag(10, 4, mode="sum"), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"padding_idx=p\)\(ids\)\.sum\(1\)") as said:
        tk.KFAC(model)
    assert "convert it to nn.Linear" not in str(said[0].message)
