"""What ``fisher="mc"`` samples from: the model's output tensor, or a dict's (an HF
``ModelOutput``'s) ``"logits"``; other forms are refused with the ways out."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk


class Net(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.body, self.head, self.form = nn.Linear(5, 8), nn.Linear(8, 3), form

    def forward(self, x: Tensor) -> object:
        logits = self.head(torch.tanh(self.body(x)))
        if self.form == "dict":
            return {"loss_free": x.sum(), "logits": logits}
        return (logits, x) if self.form == "tuple" else logits


def logits_of(out: object) -> Tensor:
    return out["logits"] if isinstance(out, dict) else out  # type: ignore[return-value]


def steps(form: str) -> Tensor:
    torch.manual_seed(0)
    model = Net(form).double()
    opt = tk.KFAC(model, lr=0.3, cov_interval=1, inv_interval=1, seed=3)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(logits_of(model(x)), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_a_dict_with_logits_samples_from_them() -> None:
    """The same steps as the model returning the logits tensor (bit for bit)."""
    assert torch.equal(steps("dict"), steps("tensor"))


def test_a_tuple_is_refused_with_the_ways_out() -> None:
    with pytest.raises(TypeError, match=r"got tuple\. Return the tensor .* fisher='empirical'"):
        steps("tuple")


def test_a_dict_of_inputs_is_refused_with_the_way_out() -> None:
    """``model(batch)`` with a dict: the capture cannot tell the batch; ``model(**batch)``."""

    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(5, 3)

        def forward(
            self, batch: dict[str, Tensor] | None = None, x: Tensor | None = None
        ) -> Tensor:
            return self.body(batch["x"] if batch is not None else x)  # type: ignore[index]

    model = Keyed()
    opt = tk.KFAC(model, lr=0.1)
    with pytest.raises(RuntimeError, match=r"got dict\)\. .*call model\(\*\*batch\)"):
        model({"x": torch.randn(4, 5)})
    opt.zero_grad()
    F.cross_entropy(model(x=torch.randn(4, 5)), torch.randint(0, 3, (4,))).backward()
    opt.step()


def test_gaussian_outputs_the_loss_ignores_are_warned_of() -> None:
    """A denoiser that also predicts a variance (``[ε̂, v]`` on 6 channels, the MSE on the
    first 3): ``likelihood="gaussian"`` samples all 6 at unit variance, a ``G`` the loss's
    Fisher is not; the loss's gradient is exactly 0 on the others for every sample, which
    is said once (since 2026-12-06 (evening)). The loss on every output says nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
    x, noise = torch.randn(8, 4), torch.randn(8, 3)
    for reads, warns in ((3, True), (6, False)):
        opt = tk.KFAC(model, likelihood="gaussian", loss_reduction="mean", cov_interval=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                opt.zero_grad()
                out = model(x)
                F.mse_loss(out[:, :reads], torch.cat([noise, noise], 1)[:, :reads]).backward()
                opt.step()
        said = [w for w in caught if "exactly 0 at" in str(w.message)]
        assert len(said) == int(warns)
        if warns:
            assert "3 of the 6 output elements" in str(said[0].message)
    relu = nn.Sequential(nn.Linear(4, 6), nn.ReLU())  # outputs 0 where their targets are
    with torch.no_grad():
        relu[0].bias[3:] = -100.0
    opt = tk.KFAC(relu, likelihood="gaussian", loss_reduction="mean", cov_interval=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target = torch.cat([noise, torch.zeros(8, 3)], 1)
        F.mse_loss(relu(x), target).backward()  # (read, its gradient 0: not warned of)
        opt.step()


def test_one_logit_per_sample_under_the_default_likelihood_names_bernoulli() -> None:
    """A click model's ``[N]`` logits under ``fisher='mc'``'s categorical default: the
    refusal names the likelihoods that fit (it asked for a batch, which it was)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0))
    opt = tk.KFAC(model, lr=0.1)
    with pytest.raises(ValueError, match=r"got \(8,\): one logit per sample .*='bernoulli'"):
        F.binary_cross_entropy_with_logits(model(torch.randn(8, 4)), torch.rand(8)).backward()
        opt.step()
    tk.KFAC(model, lr=0.1, likelihood="bernoulli")  # (and with it the step is taken)
