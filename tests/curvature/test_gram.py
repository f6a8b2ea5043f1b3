"""The Kronecker factors' batch estimates (``curvature/gram.py``) and the memory the
statistics they read live in (``captured_batch._joined``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk
from twolevel_kfac.curvature.captured_batch import _joined
from twolevel_kfac.curvature.gram import position_gram


@pytest.mark.parametrize("layout", ["rows", "im2col"])
def test_position_gram_is_the_second_moment(layout: str) -> None:
    """``scale · Σ_{n,t} x_nt x_ntᵀ`` whatever the memory order of ``x`` ``[N, T, d]``:
    row-major, or im2col's ``[N, d, T]`` (read through a ``[d, N·T]`` copy of contiguous
    runs since 2026-12-08, where the row-major copy transposed)."""
    gen = torch.Generator().manual_seed(0)
    n, t, d = 5, 7, 4
    x = torch.randn(n, t, d, generator=gen, dtype=torch.float64)
    if layout == "im2col":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        assert not x.is_contiguous()
    want = sum(x[i, j, :, None] * x[i, j, None, :] for i in range(n) for j in range(t)) * 0.3
    torch.testing.assert_close(position_gram(x, 0.3), want, rtol=1e-13, atol=1e-14)


def test_rows_are_copied_only_where_they_share_memory() -> None:
    """One forward's rows are kept as they are where their memory is their own (a
    convolution's patches, in im2col's order: ``torch.cat`` copied them row-major,
    transposing) and copied where a layer's input or output gradient holds it (the
    statistics' ``δ`` are scaled in place)."""
    held = torch.randn(4, 3, 5)
    patches = torch.randn(4, 5, 3).transpose(1, 2)  # [N, T, d] in [N, d, T] memory
    assert _joined([patches], [held]) is patches
    for view in (held, held.transpose(1, 2), held[:, :, :2]):
        rows = _joined([view], [held])
        assert torch.equal(rows, view) and rows.untyped_storage().data_ptr() != (
            held.untyped_storage().data_ptr()
        )
    assert _joined([held.transpose(1, 2)], [held]).stride() == held.transpose(1, 2).stride()
    both = _joined([patches, patches], [])
    assert torch.equal(both, torch.cat([patches, patches])) and both.is_contiguous()


def test_a_convolutions_factors_from_im2col_order() -> None:
    """A convolution's factors, its statistics kept in im2col's order, against the patches
    and output gradients written out (float64)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(48, 4)).double()
    opt = tk.KFAC(model, fisher="empirical", cov_interval=1, inv_interval=1, ema_decay=0.0)
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
    out: list[torch.Tensor] = []
    conv.register_forward_hook(lambda m, i, o: out.append(o))
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, out[0], retain_graph=True)
    loss.backward()
    opt.step()
    patches = F.unfold(x, 3, padding=1).transpose(1, 2)  # [N, 16, 18]
    rows = torch.cat([patches, torch.ones(6, 16, 1, dtype=torch.float64)], 2).reshape(-1, 19)
    delta = (6 * grad).flatten(2).transpose(1, 2).reshape(-1, 3)
    factors = opt.preconditioner.factors["0"]
    torch.testing.assert_close(factors.A, rows.T @ rows / 96, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(factors.G, delta.T @ delta / 96, rtol=1e-12, atol=1e-14)
