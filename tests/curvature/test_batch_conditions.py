"""What a sample is when the batch is not the first argument's rows one for one: a
diffusion time step or a task code drawn once for the whole batch, and a batch of graphs
pooled to one output row per graph. Both took silently wrong KFAC steps (trials: 3.8 off
a step of 3.94; the empirical Fisher ``N/G`` and the MC Fisher ``G/N`` times the
per-graph one); both are refused by name now, and the calls the messages advise are the
exact steps of a hand-written KFAC block."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk

B = 6


def sinusoid(t: Tensor, dim: int = 4) -> Tensor:
    freqs = torch.exp(-math.log(100.0) * torch.arange(dim // 2, dtype=torch.float64) / dim)
    angles = t.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimeConditioned(nn.Module):
    """A denoiser's time MLP: ``emb(sinusoid(t))`` added to every sample's features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.time, self.head = nn.Linear(3, 5), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x) + self.time(sinusoid(t))))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC])
def test_one_time_step_for_the_batch_is_refused(fisher: str, cls: type) -> None:
    model = TimeConditioned().double()
    opt = cls(model, fisher=fisher, likelihood="gaussian")
    x = torch.randn(B, 3, dtype=torch.float64)
    with pytest.raises(
        RuntimeError, match=r"layer 'time'.*\(1, 4\) shared by the batch of 6.*t\.expand\(B\)"
    ):
        model(x, torch.tensor([3]))
    opt.zero_grad()  # the advised call: one row per sample
    F.mse_loss(model(x, torch.tensor([3]).expand(B)), torch.randn(B, 3).double()).backward()
    opt.step()


def test_one_time_step_expanded_takes_the_per_sample_kfac_step() -> None:
    """The expanded time rows are the samples': the ``time`` block is ``A ⊗ G`` of its
    ``B`` rows, written by hand here (empirical Fisher, per-factor damping)."""
    model = TimeConditioned().double()
    lam = 0.1
    opt = tk.KFAC(model, lr=1.0, momentum=0.0, damping=lam, fisher="empirical", kl_clip=None,
                  ema_decay=0.0, cov_interval=1, inv_interval=1)  # fmt: skip
    x, y = torch.randn(B, 3, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64)
    t = torch.tensor([3]).expand(B)
    a = torch.cat([sinusoid(t), torch.ones(B, 1, dtype=torch.float64)], dim=1)
    seen: list[Tensor] = []

    def keep(module: nn.Module, inputs: object, output: Tensor) -> None:
        output.register_hook(seen.append)

    handle = model.time.register_forward_hook(keep)
    opt.zero_grad()
    F.mse_loss(model(x, t), y).backward()
    handle.remove()
    grad = torch.cat([model.time.weight.grad, model.time.bias.grad[:, None]], dim=1).clone()
    delta = B * seen[0]
    before = torch.cat([model.time.weight, model.time.bias[:, None]], dim=1).detach().clone()
    opt.step()
    after = torch.cat([model.time.weight, model.time.bias[:, None]], dim=1).detach()
    eye = torch.eye(5, dtype=torch.float64)  # per-factor damping: (A + λI) ⊗ (G + λI)
    damped_a, damped_g = a.T @ a / B + lam * eye, delta.T @ delta / B + lam * eye
    expected = torch.linalg.solve(damped_g, grad) @ torch.linalg.inv(damped_a)
    torch.testing.assert_close(before - after, expected, rtol=1e-10, atol=1e-12)


class GraphLevel(nn.Module):
    """Node layers, a mean over each graph's nodes, a head per graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.node, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor, graph: Tensor, graphs: int) -> Tensor:
        h = torch.tanh(self.node(x))
        pooled = torch.zeros(graphs, 4, dtype=h.dtype).index_add(0, graph, h)
        return self.head(pooled / torch.bincount(graph, minlength=graphs)[:, None])


class GraphsFirst(GraphLevel):
    """The README's way: a tensor with one row per graph comes first."""

    def forward(self, graph_ids: Tensor, x: Tensor, graph: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, graph, len(graph_ids))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_batch_of_graphs_pooled_per_graph_is_refused_with_nodes_first(fisher: str) -> None:
    x, graph = torch.randn(10, 3, dtype=torch.float64), torch.tensor([0] * 4 + [1] * 3 + [2] * 3)
    model = GraphLevel().double()
    opt = tk.KFAC(model, fisher=fisher)
    with pytest.raises(
        RuntimeError,
        match=r"output has 3 rows, but the first tensor .* has 10.*one row per graph first",
    ):
        model(x, graph, 3)
    first = GraphsFirst().double()
    opt = tk.KFAC(first, fisher=fisher)
    opt.zero_grad()
    F.cross_entropy(first(torch.arange(3), x, graph), torch.tensor([0, 1, 1])).backward()
    opt.step()
    assert opt.preconditioner.factors["head"].ready
