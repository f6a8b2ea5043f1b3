"""Forwards whose gradients are dropped before the step (SAM's first pass, an attack's
``loss.backward()`` on its input) under DDP with ``gradient_as_bucket_view=True``: DDP puts
its bucket's views in ``.grad`` after the backward, which no backward of ours marks.
Taken for gradients the user assigned (SAM 0.79 off one process's step) or carrying an
earlier backward's marks (the attack 0.68 off) before 2026-12-06 (evening); now both
loops take one process's steps on the whole batch, with bucket views or without."""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from test_dropped_gradients import sam_ascent
from worker_pair import gloo_group, run_ranks

HALF = 8


def data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 2 * HALF, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (3, 2 * HALF), generator=gen
    )


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def loop(net: nn.Module, style: str, rows: slice) -> Tensor:
    """Three steps of SAM (its second forward's statistics) or of training on an attack's
    inputs (the attack's own backward writes ``.grad``, dropped by ``zero_grad()``)."""
    opt = tk.KFAC(net, lr=0.1, momentum=0.0, damping=1e-3, fisher="empirical", cov_interval=1)
    params, (xs, ys) = list(net.parameters()), data()
    for x, y in zip(xs[:, rows], ys[:, rows], strict=True):
        opt.zero_grad()
        if style == "sam":
            F.cross_entropy(net(x), y).backward()
            moves = sam_ascent(params, [p.grad.clone() for p in params])
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            with torch.no_grad():
                for p, e in zip(params, moves, strict=True):
                    p.sub_(e)
        else:
            attacked = x.clone().requires_grad_(True)
            F.cross_entropy(net(attacked), y).backward()
            x = (x + 0.1 * attacked.grad.sign()).detach()
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


def worker(style: str, views: bool, rank: int, port: int, out: Path) -> None:
    warnings.simplefilter("ignore")
    with gloo_group(rank, port):
        net = nn.parallel.DistributedDataParallel(model(), gradient_as_bucket_view=views)
        result = loop(net, style, slice(HALF * rank, HALF * (rank + 1)))
        torch.save(result, out / f"rank{rank}.pt")
        del net
    os._exit(0)  # saved: a gloo thread may hang the interpreter's exit (1 run in 5 here)


@pytest.mark.parametrize("views", [False, True])
@pytest.mark.parametrize("style", ["sam", "attack"])
def test_dropped_gradients_under_bucket_views(tmp_path: Path, style: str, views: bool) -> None:
    got = run_ranks(partial(worker, style, views), tmp_path, "fork")[0]
    reference = loop(model(), style, slice(0, 2 * HALF))
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-11)
