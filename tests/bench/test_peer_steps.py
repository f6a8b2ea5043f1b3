"""``docs/migrating.md``'s ASDL rows: our KFAC configured as the guide says takes ASDL's
step (``KfacGradientMaker`` with the empirical Fisher, then torch's SGD), in float64 on
an MLP without biases and with a ``LayerNorm``, and it does not where the guide says it
cannot (a ``Linear`` with a bias: ASDL has no homogeneous coordinate). Skipped without
ASDL (the ``bench`` extra: ``pip install asdfghjkl``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from twolevel_kfac.bench import external

pytestmark = [
    pytest.mark.skipif(external.asdl_status() is not None, reason=str(external.asdl_status())),
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning"),
]

Batches = list[tuple[Tensor, Tensor]]
DAMPING, LR, MOMENTUM, DECAY = 1e-2, 0.1, 0.9, 1e-2


def _mlp(bias: bool, norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    middle: list[nn.Module] = [nn.LayerNorm(5)] if norm else []
    return nn.Sequential(
        nn.Linear(6, 5, bias=bias), *middle, nn.Tanh(), nn.Linear(5, 3, bias=bias)
    ).double()


def _batches() -> Batches:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=gen),
        )
        for _ in range(5)
    ]


def _asdl(model: nn.Module, batches: Batches, interval: int) -> list[Tensor]:
    from asdl import KfacGradientMaker, PreconditioningConfig

    config = PreconditioningConfig(
        data_size=len(batches[0][0]),
        damping=DAMPING,
        preconditioner_upd_interval=interval,
        curvature_upd_interval=interval,
    )
    maker = KfacGradientMaker(model, config, fisher_type="fisher_emp", loss_type="cross_entropy")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)

    def step(x: Tensor, y: Tensor) -> None:
        dummy = maker.setup_model_call(model, x)
        maker.setup_loss_call(F.cross_entropy, dummy, y)
        maker.forward_and_backward()

    return _trajectory(model, batches, opt, step)


def _ours(model: nn.Module, batches: Batches, interval: int, norm: bool) -> list[Tensor]:
    opt = tk.KFAC(
        model,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=DECAY,
        damping=DAMPING,
        damping_mode="pi",
        inverse_method="cholesky",
        fisher="empirical",
        ema_decay=0.0,
        kl_clip=None,
        cov_interval=interval,
        inv_interval=interval,
        norm_blocks=norm,
    )

    def step(x: Tensor, y: Tensor) -> None:
        F.cross_entropy(model(x), y).backward()

    return _trajectory(model, batches, opt, step)


def _trajectory(
    model: nn.Module,
    batches: Batches,
    opt: torch.optim.Optimizer,
    step: Callable[[Tensor, Tensor], None],
) -> list[Tensor]:
    out = []
    for x, y in batches:
        opt.zero_grad()
        step(x, y)
        opt.step()
        out.append(_flat(model))
    return out


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _distance(bias: bool, norm: bool, interval: int) -> float:
    """``max_k ‖θ_ASDL − θ_ours‖ / ‖θ_ASDL − θ₀‖`` over the 5 steps."""
    start = _flat(_mlp(bias, norm))
    theirs = _asdl(_mlp(bias, norm), _batches(), interval)
    ours = _ours(_mlp(bias, norm), _batches(), interval, norm)
    return max(
        float((a - b).norm() / (a - start).norm()) for a, b in zip(theirs, ours, strict=True)
    )


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("norm", [False, True], ids=["mlp", "layernorm"])
def test_the_guides_settings_take_asdls_step(interval: int, norm: bool) -> None:
    assert _distance(bias=False, norm=norm, interval=interval) < 1e-10


def test_a_bias_is_where_the_guide_says_the_steps_part() -> None:
    assert _distance(bias=True, norm=False, interval=1) > 0.1
