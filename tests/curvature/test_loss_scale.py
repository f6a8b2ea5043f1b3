"""A training loss summed over the samples under ``fisher="empirical"`` is warned of
(``curvature/loss_scale.py``): each row's gradient is scaled by the batch size, so its
``G`` is ``N²`` too large. Means over the samples, whatever their weights, smoothing,
positions or ``GradScaler`` scale, pass."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from twolevel_kfac.curvature.loss_scale import LIMIT, summed_share

N, C = 32, 4


def run(loss_fn: Callable[[Tensor, Tensor], Tensor], fisher: str = "empirical") -> list[str]:
    """Two steps of a small classifier; the warnings of the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, C)).double()
    opt = tk.KFAC(model, fisher=fisher)
    x, y = torch.randn(N, 5, dtype=torch.float64), torch.randint(0, C, (N,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    return [str(w.message) for w in caught if "per position" in str(w.message)]


def test_a_loss_summed_over_the_batch_is_warned_of_once() -> None:
    said = run(lambda out, y: F.cross_entropy(out, y, reduction="sum"))
    assert len(said) == 1
    assert "reduction='sum'" in said[0] and f"G would be {N}² times too large" in said[0]


@pytest.mark.parametrize(
    "loss",
    [
        lambda out, y: F.cross_entropy(out, y),
        lambda out, y: F.cross_entropy(out, y, label_smoothing=0.2),
        lambda out, y: F.cross_entropy(out, y, weight=torch.tensor([9.0, 1, 1, 1]).double()),
        lambda out, y: (
            16
            * F.kl_div(  # distillation at T = 4 from a far teacher
                F.log_softmax(out / 4, -1), F.softmax(-out.detach(), -1), reduction="batchmean"
            )
        ),
    ],
    ids=["mean", "smoothed", "class weights", "distillation T=4"],
)
def test_means_over_the_samples_pass(loss: Callable[[Tensor, Tensor], Tensor]) -> None:
    assert run(loss) == []


def test_under_mc_a_summed_loss_is_not_judged() -> None:
    """Under MC the Fisher is the sampled loss's; a summed loss scales the step as it
    scales SGD's (``kl_clip`` bounds it)."""
    assert run(lambda out, y: F.cross_entropy(out, y, reduction="sum"), fisher="mc") == []


def test_the_share_is_per_position_of_a_sample() -> None:
    """A language model's per-sample loss (a sum over a sample's positions, divided by the
    batch size) is a mean over the samples: its share is at most 2 per position; a sum over
    everything is ``N`` times that; a gradient off the simplex is no logits'."""
    torch.manual_seed(0)
    logits = torch.randn(N, 6, C, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (N, 6))
    per_sample = F.cross_entropy(logits.transpose(1, 2), y, reduction="sum") / N
    (grad,) = torch.autograd.grad(per_sample, logits)
    share = summed_share(grad, N, -1)
    assert share is not None and 1.0 < share <= 2.0
    assert summed_share(grad * N, N, -1) == pytest.approx(share * N) and share * N > LIMIT
    assert summed_share(grad + 1.0, N, -1) is None
    assert summed_share(grad, N, None) is None  # [N, T, C] without its class dimension


def test_a_grad_scalers_scale_is_taken_off() -> None:
    """Under ``GradScaler`` the gradient at the logits carries its scale (2¹² here): a
    mean loss passes, a summed one is still warned of."""
    for reduction, warned in (("mean", False), ("sum", True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, C))
        opt = tk.KFAC(model, fisher="empirical")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        x, y = torch.randn(N, 5), torch.randint(0, C, (N,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scaler.scale(F.cross_entropy(model(x), y, reduction=reduction)).backward()
            scaler.step(opt)
            scaler.update()
        said = [w for w in caught if "per position" in str(w.message)]
        assert bool(said) == warned, reduction


def test_an_attacks_summed_loss_is_not_the_training_losss() -> None:
    """A PGD attack in train mode sums its loss (advertorch's default) for the gradient of
    the input: its forwards are no samples, and their gradients are not judged (warned of
    before the shares were read per forward); the training loss is a mean."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, C)).double()
    opt = tk.KFAC(model, fisher="empirical")
    x, y = torch.randn(N, 5, dtype=torch.float64), torch.randint(0, C, (N,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            delta = torch.zeros_like(x, requires_grad=True)
            for _ in range(2):
                loss = F.cross_entropy(model(x + delta), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta + 0.01 * grad.sign()).detach().requires_grad_(True)
            opt.zero_grad()
            F.cross_entropy(model(x + delta.detach()), y).backward()
            opt.step()
    assert not [w for w in caught if "per position" in str(w.message)]
