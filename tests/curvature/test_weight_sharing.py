"""``weight_sharing``: a ``Linear`` on ``[N, T, D]`` inputs forms its factors as KFAC-expand
(every location a sample, direction divided by ``T``) or KFAC-reduce (mean inputs, summed
output gradients per sample; Eschenhagen et al. 2023), checked against the definitions on
statistics captured by the oracle's own hooks; the exact Fisher products keep every
location either way."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import capture_layer_stats
from twolevel_kfac.curvature.blocks import LayerStats
from twolevel_kfac.curvature.reduce_view import reduce_locations
from twolevel_kfac.distributed import layer_specs, make_communicator, reduce_statistics

N, T, D, H, C = 6, 5, 4, 3, 2


class Pooled(nn.Module):
    """A shared ``Linear`` over ``T`` positions, mean-pooled, then a head: the setting
    KFAC-reduce is made for (one prediction per sample)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared, self.head = nn.Linear(D, H), nn.Linear(H, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(x)).mean(dim=1))


def data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, T, D, generator=gen), torch.randint(0, C, (N,), generator=gen)


def gram(rows: Tensor) -> Tensor:
    return rows.T @ rows / rows.shape[0]


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_factors_follow_the_definitions(float64: None, mode: str) -> None:
    model, (x, y) = Pooled(), data()
    a, g = capture_layer_stats(model, nn.CrossEntropyLoss(), x, y)["shared"]
    assert a.shape == (N, T, D + 1) and g.shape == (N, T, H)
    if mode == "expand":
        expected = (gram(a.reshape(-1, D + 1)), gram(g.reshape(-1, H)), T)
    else:
        expected = (gram(a.mean(dim=1)), gram(g.sum(dim=1)), 1)
    pre = tk.KFACPreconditioner(
        model, fisher="empirical", ema_decay=0.0, weight_sharing=mode, kl_clip=None
    )
    F.cross_entropy(model(x), y).backward()
    pre.step()
    factors = pre.factors["shared"]
    torch.testing.assert_close(factors.A, expected[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(factors.G, expected[1], rtol=1e-12, atol=1e-14)
    assert factors.num_locations == expected[2]


def test_a_reduce_step_is_the_damped_reduce_inverse(float64: None) -> None:
    model, (x, y) = Pooled(), data()
    a, g = capture_layer_stats(model, nn.CrossEntropyLoss(), x, y)["shared"]
    A, G = gram(a.mean(dim=1)), gram(g.sum(dim=1))
    lam, lr = 0.05, 0.1
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([model.shared.weight.grad, model.shared.bias.grad.unsqueeze(1)], dim=1)
    direction = torch.linalg.solve(G + lam * torch.eye(H), grad) @ torch.linalg.inv(
        A + lam * torch.eye(D + 1)
    )  # no division by T
    before = torch.cat([model.shared.weight, model.shared.bias.unsqueeze(1)], dim=1).detach()
    opt = tk.KFAC(
        model,
        lr=lr,
        momentum=0.0,
        damping=lam,
        fisher="empirical",
        ema_decay=0.0,
        kl_clip=None,
        weight_sharing="reduce",
    )
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = torch.cat([model.shared.weight, model.shared.bias.unsqueeze(1)], dim=1).detach()
    torch.testing.assert_close(after, before - lr * direction, rtol=1e-10, atol=1e-12)


def test_the_exact_fisher_keeps_every_location(float64: None) -> None:
    """The coarse level's Fisher mini-batch is the per-location statistics under both modes
    (the reduce view would give wrong per-sample gradients)."""
    model, (x, y) = Pooled(), data()
    opt = tk.TwoLevelKFAC(model, lr=0.1, weight_sharing="reduce", diagnostics=True)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    pre = opt.preconditioner
    assert isinstance(pre, tk.TwoLevelPreconditioner) and pre.fisher_stats is not None
    assert pre.fisher_stats[0].a.shape == (N, T, D + 1)
    assert pre.factors["shared"].num_locations == 1


def test_the_distributed_reduction_takes_the_same_view(float64: None) -> None:
    """``reduce_statistics`` (one process) forms the reduce factors from the view and
    returns the statistics themselves."""
    model, (x, y) = Pooled(), data()
    a, g = capture_layer_stats(model, nn.CrossEntropyLoss(), x, y)["shared"]
    pre = tk.KFACPreconditioner(model, fisher="empirical")
    specs = {"shared": layer_specs(pre.layers, pre.factor_dtype)["shared"]}
    stats = {"shared": LayerStats(a, g)}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        comm = make_communicator()
        assert comm.distributed or comm.world_size == 1
        reduced = reduce_statistics(comm, stats, specs, lambda _, s: reduce_locations(s))
    finally:
        dist.destroy_process_group()
    A, G, locations = reduced.factors["shared"]
    torch.testing.assert_close(A, gram(a.mean(dim=1)))
    torch.testing.assert_close(G, gram(g.sum(dim=1)))
    assert locations == 1 and reduced.stats["shared"].a.shape == (N, T, D + 1)


def test_a_bad_weight_sharing_is_named() -> None:
    with pytest.raises(ValueError, match="weight_sharing must be one of 'expand', 'reduce'"):
        tk.CurvatureOptions(weight_sharing="mean")  # type: ignore[arg-type]
