"""Losses the KFAC family cannot describe are refused where they would take wrong steps
without a word: derivatives of the model in the loss (a physics-informed residual, a
gradient penalty), and probabilities where ``fisher="mc"`` samples from logits."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twolevel_kfac as tk


class Lambda(nn.Module):
    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)  # type: ignore[no-any-return]


def regression() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_loss_with_derivatives_of_the_model_is_refused(fisher: str) -> None:
    """A physics-informed loss's ``autograd.grad(u, x, create_graph=True)`` fired the
    capture's hooks, which kept ``∂u/∂s`` as the loss's ``δ`` (``G`` 116× too large, the
    step 0.78 off under the empirical Fisher); refused at that call, naming it. A plain
    loss of the same forward steps as before."""
    model = regression()
    opt = tk.KFAC(model, fisher=fisher, likelihood="gaussian")
    x = torch.randn(6, 1, dtype=torch.float64, requires_grad=True)
    u = model(x)
    where = "layer '2'" if fisher == "empirical" else "the model output"
    with pytest.raises(RuntimeError, match=rf"create_graph=True reached {where}.*Dangel"):
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        (0.5 * ((du - torch.cos(x)) ** 2).sum() / 6).backward()
    opt.zero_grad()
    (0.5 * (model(x) - torch.sin(x)).square().sum() / 6).backward()
    opt.step()


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_penalty_on_the_model_output_alone_passes(fisher: str) -> None:
    """A critic's gradient penalty with respect to the model output,
    ``autograd.grad(D(out), out, create_graph=True)``, goes through nothing of the model:
    not refused, and the steps are those of the same loss written through ``out + 0``."""
    runs = []
    for alias in (False, True):
        model = regression()
        opt = tk.KFAC(model, fisher=fisher, likelihood="gaussian", cov_interval=1)
        x = torch.randn(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        opt.zero_grad()
        out = model(x)
        seen = out + 0 if alias else out
        (grad,) = torch.autograd.grad((seen**3).sum(), seen, create_graph=True)
        (0.5 * (out - torch.sin(x)).square().sum() / 6 + 1e-2 * grad.square().mean()).backward()
        opt.step()
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    ("likelihood", "head", "loss"),
    [
        ("categorical", nn.Softmax(-1), lambda p, y: F.nll_loss(p.log(), y)),
        ("bernoulli", nn.Sigmoid(), lambda p, y: F.binary_cross_entropy(p, y.double()[:, None])),
    ],
)
def test_probabilities_are_refused_under_the_mc_fisher(likelihood: str, head, loss) -> None:  # type: ignore[no-untyped-def]
    """A softmax or sigmoid output read as logits gave a ``G`` 0.94 off (trace 0.06×);
    refused, naming the fix, also through views, casts, clamps, flips, concatenations and
    indexing. ``log_softmax``, ``log(p.clamp(min=ε))``, a flattened softmax's logits, the
    empirical Fisher and a Gaussian on a sigmoid (a regression to [0, 1]) pass."""
    torch.manual_seed(0)
    classes = 3 if likelihood == "categorical" else 1
    model = nn.Sequential(nn.Linear(4, classes), head).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    opt = tk.KFAC(model, likelihood=likelihood)
    with pytest.raises(ValueError, match=r"is a (softmax|sigmoid) \(probabilities\).*logits"):
        model(x)
    for other in ({"fisher": "empirical"}, {"likelihood": "gaussian"}):
        opt = tk.KFAC(model, **{"likelihood": likelihood, **other})
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    for view in (
        lambda p: p.float().double(),
        lambda p: p.unsqueeze(-1).flatten(1),
        lambda p: p.T.contiguous().T,
        lambda p: p.clamp(min=1e-7),
        lambda p: p.flip(0),
        lambda p: torch.cat([p[:4], p[4:]]),
        lambda p: p[torch.arange(8)],
        lambda p: torch.where(p > 0.5, p, p.clamp(max=0.5)),
        lambda p: p.masked_fill(torch.arange(p.shape[-1]) == 0, 0.0),  # a class ruled out
        lambda p: F.pad(p, (0, 1)),
        lambda p: p.repeat(1, 1),
    ):
        wrapped = nn.Sequential(model, Lambda(view))
        kept = tk.KFAC(wrapped, likelihood=likelihood)  # (its hooks live with it)
        with pytest.raises(ValueError, match=r"is a (softmax|sigmoid) \(probabilities\)"):
            wrapped(x)
    flat = nn.Sequential(
        nn.Linear(4, 6), nn.Unflatten(-1, (2, 3)), nn.Softmax(-1), nn.Flatten(0, 1)
    )
    kept = tk.KFAC(flat.double(), class_dim=-1)  # noqa: F841  (its hooks live with it)
    with pytest.raises(ValueError, match=r"is a softmax"):
        flat(x)
    mixture = Lambda(  # a mixture of two softmaxes: log(½p₁ + ½p₂)
        lambda z: (
            torch.logsumexp(torch.stack([z.log_softmax(-1), (2 * z).log_softmax(-1)]), 0)
            - math.log(2)
        )
    )
    for head in (
        nn.LogSoftmax(-1),
        Lambda(lambda z: z.softmax(-1).clamp(min=1e-12).log()),
        Lambda(lambda z: z - z.logsumexp(-1, keepdim=True)),  # written out (compiled: alike)
        mixture,
    ):
        logs = nn.Sequential(nn.Linear(4, 3), head).double()
        opt = tk.KFAC(logs)
        with warnings.catch_warnings():  # NLL's −e_y/N at log-probabilities: not judged
            warnings.simplefilter("error")
            opt.zero_grad()
            F.nll_loss(logs(x), y).backward()
            opt.step()


@pytest.mark.parametrize(
    ("fisher", "likelihood"),
    [("empirical", "categorical"), ("mc", "gaussian"), ("mc", "categorical")],
)
def test_one_unbatched_sample_is_refused_by_name(fisher: str, likelihood: str) -> None:
    """A policy called on one state ``[D]`` (torch's ``Linear`` takes it): its features were
    read as samples and the step raised a bare shape error (or, under the MC Fisher, an
    error about logits); refused at the layer, naming the batched call. Unbatched forwards
    under ``no_grad`` pass, and the next batched step is a fresh run's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    twin = copy.deepcopy(model)
    opt = tk.KFAC(model, fisher=fisher, likelihood=likelihood, lr=0.1)
    with pytest.raises(RuntimeError, match=r"layer '0' \(Linear\) was called on one unbatched"):
        model(torch.randn(5, dtype=torch.float64))
    with torch.no_grad():
        model(torch.randn(5, dtype=torch.float64))
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 2, (4,))
    fresh = tk.KFAC(twin, fisher=fisher, likelihood=likelihood, lr=0.1)
    for net, optimizer in ((model, opt), (twin, fresh)):
        torch.manual_seed(1)
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def _nt_xent(z: torch.Tensor) -> torch.Tensor:
    z = F.normalize(z, dim=1)
    sim = (z @ z.T / 0.5).fill_diagonal_(-1e9)
    n = z.shape[0] // 2
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


SOFTMAX_LOSSES = {
    "cross_entropy": lambda f, y: F.cross_entropy(f, y),
    "label_smoothing": lambda f, y: F.cross_entropy(f, y, label_smoothing=0.1),
    "class_weights": lambda f, y: F.cross_entropy(f, y, weight=torch.rand(4).double()),
    "focal": lambda f, y: (
        -((1 - f.softmax(1)) ** 2 * f.log_softmax(1)).gather(1, y[:, None]).mean()
    ),
    "distillation": lambda f, y: F.kl_div(
        (f / 2).log_softmax(1), torch.randn_like(f).softmax(1), reduction="batchmean"
    ),
    "z_loss": lambda f, y: F.cross_entropy(f, y) + 1e-4 * f.logsumexp(1).square().mean(),
}
OTHER_LOSSES = {
    "mse": lambda f, y: F.mse_loss(f, torch.randn_like(f)),
    "multi_label_bce": lambda f, y: F.binary_cross_entropy_with_logits(
        f, (f.detach() > 0).double()
    ),
    "nt_xent": lambda f, y: _nt_xent(f),
    "logit_matching": lambda f, y: F.cross_entropy(f, y) + F.mse_loss(f, torch.randn_like(f)),
}


@pytest.mark.parametrize("name", sorted(SOFTMAX_LOSSES) + sorted(OTHER_LOSSES))
def test_an_output_that_is_not_softmax_logits_is_reported_under_mc(name: str) -> None:
    """Under the default ``fisher="mc"``, ``likelihood="categorical"`` an embedding trained
    by NT-Xent, an MSE or multi-label BCE output took steps along the all-ones direction,
    where the sampled ``G`` has no curvature (``G·1 = 0``): one NT-Xent step raised the
    loss 2.71 → 3.32. Every loss of ``log_softmax`` has a gradient that sums to zero over
    the classes and passes without a word; the others are reported once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    opt = tk.KFAC(model)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 4, (8,))
    loss_fn = {**SOFTMAX_LOSSES, **OTHER_LOSSES}[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    said = [str(w.message) for w in caught if "all-ones direction" in str(w.message)]
    assert len(said) == (name in OTHER_LOSSES), said
    if said:
        assert "fisher='empirical'" in said[0] and "likelihood='gaussian'" in said[0]
    opt = tk.KFAC(model, fisher="empirical")  # reads the loss's own gradients: nothing said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


class LossInside(nn.Module):
    """An HF-style model computing its loss in ``forward``; ``copied``: it returns a float32
    copy of its logits, as accelerate's mixed precision wraps ``forward`` to do."""

    def __init__(self, copied: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head, self.copied = nn.Embedding(20, 8), nn.Linear(8, 20), copied

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.emb(x))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits.float().clone() if self.copied else logits}


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_a_copy_of_the_logits_returned_beside_a_loss_made_inside(fisher: str) -> None:
    """Under ``fisher="mc"`` a forward counted only once the backward reached the returned
    logits: a copy of them (accelerate's ``bf16`` / ``Trainer(bf16=True)``) was never
    reached, and the first step raised "no curvature statistics". The hook sits on the
    tensor the copy was made from: the steps are those of the model returning its logits."""
    x = torch.randint(0, 20, (4, 6))
    runs = []
    for copied in (False, True):
        model = LossInside(copied)
        opt = tk.KFAC(model, lr=0.1, fisher=fisher, class_dim=-1, loss_reduction="mean")
        for _ in range(3):
            opt.zero_grad()
            model(x, x)["loss"].backward()
            opt.step()
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
