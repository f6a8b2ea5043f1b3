"""``weight_sharing="reduce"`` on embedding tables (``curvature/reduce_view.py``): the mean
input and summed output gradient per sample, the input of a table being its tokens."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk

V, D, C, N, T = 11, 4, 3, 6, 5
LENGTHS = torch.tensor([5, 3, 1, 4, 2, 5])
EXACT = {
    "lr": 1.0,
    "momentum": 0.0,
    "fisher": "empirical",
    "cov_interval": 1,
    "inv_interval": 1,
    "ema_decay": 0.0,
    "kl_clip": None,
}


class Pooled(nn.Module):
    """Tokens → table (an ``nn.Embedding``, or the same map as a ``Linear`` on one-hot
    tokens) → tanh → mean over the real positions → head: a prediction per sample."""

    def __init__(self, as_linear: bool) -> None:
        super().__init__()
        self.as_linear = as_linear
        self.emb = nn.Linear(V, D, bias=False) if as_linear else nn.Embedding(V, D)
        self.head = nn.Linear(D, C)

    def forward(self, tokens: Tensor, real: Tensor) -> Tensor:
        e = self.emb(F.one_hot(tokens, V).to(self.head.weight.dtype)) if self.as_linear else None
        h = torch.tanh(self.emb(tokens) if e is None else e)
        weights = real.unsqueeze(-1).to(h.dtype)
        return self.head((h * weights).sum(1) / weights.sum(1))


def _batch(padded: bool) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, V, (N, T), generator=gen)
    real = torch.arange(T) < LENGTHS.unsqueeze(1) if padded else torch.ones(N, T, dtype=torch.bool)
    return tokens.masked_fill(~real, 0), real, torch.randint(0, C, (N,), generator=gen)


def _step(model: Pooled, sharing: str, damping: float, padded: bool) -> tuple[Tensor, tk.KFAC]:
    tokens, real, y = _batch(padded)
    opt = tk.KFAC(model, damping=damping, weight_sharing=sharing, **EXACT)
    before = model.emb.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        if padded:
            opt.set_padding_mask(real)
        F.cross_entropy(model(tokens, real), y).backward()
        opt.step()
    moved = model.emb.weight.detach() - before
    return (moved.T if model.as_linear else moved), opt


def _pair() -> tuple[Pooled, Pooled]:
    torch.manual_seed(0)
    table, linear = Pooled(False).double(), Pooled(True).double()
    with torch.no_grad():
        linear.emb.weight.copy_(table.emb.weight.T)
        linear.head.load_state_dict(table.head.state_dict())
    return table, linear


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("damping", [0.1, 1e-3])
@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_a_table_steps_as_a_linear_on_one_hot_tokens(
    sharing: str, damping: float, padded: bool
) -> None:
    """The README: a table is "a ``Linear`` on one-hot tokens", and ``reduce`` takes "the
    mean input and summed output gradient per sample". Under ``reduce`` a table took its
    tokens summed and its output gradients averaged (the sides of a ``Linear``'s block):
    0.12–0.71 off the ``Linear``'s step in a trial, silently. Now the same step."""
    table, linear = _pair()
    ours, _ = _step(table, sharing, damping, padded)
    want, _ = _step(linear, sharing, damping, padded)
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-12)


def test_the_reduced_factors_of_a_table_by_hand() -> None:
    """Its factors against the formula, written out: ``ā_n`` the mean one-hot token over
    the real positions (``G``, the table's rows), ``δ_n`` the summed output gradients
    (``A``), each averaged over the ``N`` samples."""
    table, _ = _pair()
    tokens, real, y = _batch(padded=True)
    outputs: list[Tensor] = []
    table.emb.register_forward_hook(lambda m, i, out: outputs.append(out))
    opt = tk.KFAC(table, damping=0.1, weight_sharing="reduce", **EXACT)
    opt.zero_grad()
    opt.set_padding_mask(real)
    loss = F.cross_entropy(table(tokens, real), y)
    (grad,) = torch.autograd.grad(loss, outputs[-1], retain_graph=True)
    loss.backward()
    opt.step()
    mask = real.unsqueeze(-1).double()
    mean_token = (F.one_hot(tokens, V).double() * mask).sum(1) / mask.sum(1)  # [N, V]
    summed = (N * grad * mask).sum(1)  # [N, D]: δ of the per-sample losses
    factors = opt.preconditioner.factors["emb"]
    torch.testing.assert_close(factors.G, mean_token.T @ mean_token / N, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(factors.A, summed.T @ summed / N, rtol=1e-12, atol=1e-14)


class TiedLM(nn.Module):
    """A table tied to a ``Linear`` head (``head.weight = wte.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.mid = nn.Embedding(V, D), nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.wte(tokens))))


def test_a_table_tied_to_a_head_keeps_the_expand_view_and_says_so() -> None:
    """A tied table's block holds the head's inputs in ``a`` and the table's in ``g``: no
    mean-input view exists. It takes expand's step under ``reduce`` (the first: ``mid``
    moves differently under each view, and with it the next gradients), warned once."""
    tokens = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(2))
    first_steps = []
    for sharing in ("expand", "reduce"):
        torch.manual_seed(0)
        model = TiedLM().double()
        opt = tk.KFAC(model, damping=0.1, weight_sharing=sharing, **EXACT)
        weights = [model.wte.weight.detach().clone()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                opt.zero_grad()
                logits = model(tokens[:, :-1])
                F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
                opt.step()
                weights.append(model.wte.weight.detach().clone())
        told = [w for w in caught if "keeps the expand view" in str(w.message)]
        assert len(told) == (sharing == "reduce"), [str(w.message) for w in caught]
        first_steps.append(weights[1] - weights[0])
    torch.testing.assert_close(first_steps[1], first_steps[0], rtol=1e-12, atol=1e-14)
