"""A float32 model's step against the same step in float64, where the float32 arithmetic
of the library (not the float32 statistics) decided the error: the eigendecompositions."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk


def _step(model: nn.Module, build: Any, kwargs: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    kwargs = {"damping": 1e-3, **kwargs}
    opt = build(model, lr=1.0, momentum=0.0, fisher="empirical", kl_clip=None,
                cov_interval=1, inv_interval=1, ema_decay=0.0, **kwargs)  # fmt: skip
    y = torch.arange(len(x)) % 10
    before = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y).backward()
    opt.step()
    after = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    return after - before


@pytest.mark.parametrize(
    ("build", "kwargs", "tolerance"),
    [
        (tk.KFAC, {"inverse_method": "eigen"}, 1e-4),
        (tk.KFAC, {"inverse_method": "eigen", "damping_mode": "pi"}, 1e-4),
        (tk.KFAC, {"damping_mode": "eigen_sum"}, 1e-4),
        (tk.KFAC, {"damping": lambda k: 1e-3}, 1e-4),  # a schedule: auto picks eigen
        (tk.EKFAC, {}, 1e-3),  # (its scalings: float32 sums of squares)
        (tk.EKFAC, {"damping_mode": "eigen_sum"}, 1e-3),
    ],
    ids=["eigen", "eigen_pi", "eigen_sum", "schedule", "ekfac", "ekfac_eigen_sum"],
)
def test_a_float32_eigen_step_on_raw_pixels_is_the_float64_step(
    build: Any, kwargs: dict[str, Any], tolerance: float
) -> None:
    """Raw pixel inputs in [0, 255]: the float32 ``eigh`` of their factor is off by about
    ``ε₃₂‖A‖`` = 0.3 in every eigenvalue against a damping of 1e-3, and the step was
    0.2–1.5 off the float64 one in a trial (here 1e-2; 4.5e-2 with other seeds), where
    Cholesky (``auto``) is 2e-5 off. π-damping (a shift scaled up with ``A``) and
    ``eigen_sum`` were 3e-5 off at most here; a damping schedule (``auto`` picks the
    eigenpairs) as per-factor ``eigen``. With the eigenpairs from a float64 ``eigh`` all are
    within 2e-5. EKFAC's default damping adds ``λ(d_G + d_A) + λ²`` to its scalings from
    the eigenvalues: 7e-3 to 0.14 off over four seeds in a review, 1.3e-4 at most with
    float64 pairs (``eigen_sum``: 4e-4 at most either way)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    x = (torch.rand(128, 64) ** 3 * 255).round()
    wide = copy.deepcopy(model).double()
    got = _step(model, build, kwargs, x)
    want = _step(wide, build, kwargs, x.double())
    assert float((got - want).norm() / want.norm()) < tolerance
