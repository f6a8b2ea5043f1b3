"""Half precision and ``torch.amp.GradScaler`` overflows: the empirical ``δ`` captured under
fp16 autocast, ``KFACPreconditioner`` beside a user's optimizer and a scaler, and a factor
update dropped for non-finite statistics (which says so)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk
from twolevel_kfac.curvature.captured_batch import scaled_gradient


class InfGrad(torch.autograd.Function):
    """The identity whose backward overflows (a scaled loss too large for fp16)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * float("inf")


def regression() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    gen = torch.Generator().manual_seed(1)
    y = torch.zeros(64, 1)
    y[5] = 100.0  # one large residual r: S·r passes 65504, the parameters' S·r/B do not
    return model, torch.randn(64, 8, generator=gen), y


def test_a_half_gradient_is_scaled_in_float32() -> None:
    grad = torch.full((2, 3), 1024.0, dtype=torch.float16)
    delta = scaled_gradient(grad, 128.0)
    assert delta.dtype == torch.float32
    assert torch.equal(delta, torch.full((2, 3), 131072.0))  # fp16 would overflow (65504)
    assert scaled_gradient(grad.double(), 2.0).dtype == torch.float64


def test_fp16_autocast_under_a_grad_scaler_keeps_the_empirical_statistics() -> None:
    """``S·B·∂loss/∂s`` passes fp16's range while the parameters' gradients do not: the
    first step's factor update was dropped and the step refused ("no curvature
    statistics"). Now its factors are the float32 run's, to fp16 rounding."""
    model, x, y = regression()
    reference = copy.deepcopy(model)
    factors = {}
    for net, half in ((model, True), (reference, False)):
        opt = tk.KFAC(net, lr=0.05, fisher="empirical", likelihood="gaussian")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=half)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            out = net(x)
        scaler.scale(0.5 * F.mse_loss(out.float(), y, reduction="sum") / len(x)).backward()
        scaler.step(opt)
        scaler.update()
        assert opt.last_stats["nonfinite_factor_updates"] == 0.0
        assert opt.preconditioner.steps == 1
        factors[half] = {n: f.G.clone() for n, f in opt.preconditioner.factors.items()}
    for name, g in factors[False].items():
        torch.testing.assert_close(
            factors[True][name], g, rtol=2e-2, atol=1e-3 * float(g.abs().max())
        )


def test_a_dropped_factor_update_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import twolevel_kfac.optim.folding as folding

    model, x, y = regression()
    opt = tk.KFAC(model, lr=0.05, fisher="empirical", likelihood="gaussian")
    monkeypatch.setattr(folding, "all_finite", lambda tensors: False)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match=r"were not finite, while the gradients were"):
        with pytest.raises(RuntimeError, match="no curvature statistics"):
            opt.step()  # nothing was ever folded: the first step has no factors


@pytest.mark.parametrize(
    "make", (tk.KFACPreconditioner, tk.TwoLevelPreconditioner, tk.EKFACPreconditioner)
)
@pytest.mark.parametrize("fisher", ("empirical", "mc"))
def test_preconditioner_beside_a_scaler_drops_an_overflowed_step(make: type, fisher: str) -> None:
    """README's ``scaler.unscale_(sgd); precond.step(loss_scale=…); scaler.step(sgd)``: an
    overflowed step (the first, and a capturing one later) is dropped with its statistics,
    so the run equals the one without those batches, bit for bit (a power-of-two scale)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(32, 6, generator=gen), torch.randint(0, 4, (32,), generator=gen))
        for _ in range(14)
    ]
    runs = {}
    for poisoned in ((), (0, 11)):  # 11: the second capturing step (cov_interval=10)
        model = copy.deepcopy(base)
        pre = make(model, fisher=fisher, damping=0.03)
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        batches = list(data)
        for at in poisoned:
            batches.insert(at, None)  # type: ignore[arg-type]
        for batch in batches:
            x, y = data[0] if batch is None else batch
            sgd.zero_grad()
            out = model(x)
            if batch is None:
                out = InfGrad.apply(out)
            scaler.scale(F.cross_entropy(out, y)).backward()
            scaler.unscale_(sgd)
            pre.step(loss_scale=scaler.get_scale())
            assert pre.last_stats.get("amp_skipped", 0.0) == float(batch is None)
            scaler.step(sgd)
            scaler.update(2.0**12)  # the scale a clean run keeps (a skipped step halves it)
        assert pre.steps == len(data)
        runs[poisoned] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(runs[()], runs[(0, 11)])
