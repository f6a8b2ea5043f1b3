"""A padded classifier's declared padding (``opt.set_padding_mask(real)``) is left out of
the position-wise layers' factors and location count (``curvature/padding_mask.py``): its
steps do not depend on the padding's length or content, the factors are those of the real
positions, and a mask that would drop positions reaching the loss is refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tests.curvature.test_live_positions import (
    LENGTHS,
    OPTIMIZERS,
    SETTINGS,
    C,
    E,
    N,
    Tagger,
    V,
    padded,
    token_loss,
)
from torch import Tensor, nn

import twolevel_kfac as tk

CLASSIFIER = {**SETTINGS, "class_dim": None}


class TextClassifier(nn.Module):
    """``Linear`` per token → self-attention over the real tokens → ``Linear`` → the mean
    over the real tokens → head: one ``[N, C]`` output, no positions in it."""

    def __init__(self, attend_padding: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(V, E)
        self.attention = nn.MultiheadAttention(E, 2, batch_first=True)
        self.mlp = nn.Linear(E, E)
        self.head = nn.Linear(E, C)
        self.attend_padding = attend_padding

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        keys = None if self.attend_padding else padding
        h = h + self.attention(h, h, h, key_padding_mask=keys, need_weights=False)[0]
        h = torch.tanh(self.mlp(h))
        real = (~padding).unsqueeze(-1).to(h.dtype)
        return self.head((h * real).sum(1) / real.sum(1))


def labels() -> Tensor:
    return torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(3))


def run(
    build: Callable[..., torch.optim.Optimizer], length: int, masked: bool = True, **options: object
) -> list[Tensor]:
    """The parameters after each of three steps on the batch padded to ``length``."""
    torch.manual_seed(0)
    model = TextClassifier().double()
    opt = build(model, **{**CLASSIFIER, **options})
    x, _, padding = padded(length)
    out = []
    for _ in range(3):
        opt.zero_grad()
        if masked:
            opt.set_padding_mask(~padding)  # type: ignore[attr-defined]
        F.cross_entropy(model(x, padding), labels()).backward()
        opt.step()
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out


@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_steps_do_not_depend_on_the_padding(float64: None, method: str) -> None:
    """Padded to 4 or 7 positions of random content: the same steps for every optimizer
    class (without the mask, the padding enters ``A`` and ``T``: KFAC's first steps are
    apart by a fifth of a step)."""
    short, long = run(OPTIMIZERS[method], 4), run(OPTIMIZERS[method], 7)
    for k, (a, b) in enumerate(zip(short, long, strict=True)):
        assert float((a - b).norm()) <= 1e-10 * float(a.norm()), f"step {k}"
    if method == "kfac":
        apart = run(tk.KFAC, 4, masked=False)[0] - run(tk.KFAC, 7, masked=False)[0]
        torch.manual_seed(0)
        moved = short[0] - torch.cat(
            [p.detach().reshape(-1) for p in TextClassifier().parameters()]
        )
        assert float(apart.norm()) > 0.05 * float(moved.norm())


class Tagged(TextClassifier):
    """The classifier returning a tuple (logits and the pooled features): no output
    positions to find padding by, and no tensor for the MC Fisher."""

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        return super().forward(x, padding), x  # type: ignore[return-value]


def test_a_tuple_output_under_the_empirical_fisher(float64: None) -> None:
    """The declared padding is left out whatever the output's form."""
    x, _, padding = padded(4)
    x7, _, padding7 = padded(7)
    steps = []
    for inputs, pads in ((x, padding), (x7, padding7)):
        torch.manual_seed(0)
        model = Tagged().double()
        opt = tk.KFAC(model, **CLASSIFIER)
        opt.set_padding_mask(~pads)
        F.cross_entropy(model(inputs, pads)[0], labels()).backward()
        opt.step()
        steps.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-10, atol=1e-12)


def test_the_monte_carlo_fisher_on_a_fisher_subset(float64: None) -> None:
    """``fisher="mc"`` on half the batch: the mask's rows follow the Fisher mini-batch."""
    settings = {"fisher": "mc", "fisher_batch": 0.5}
    short, long = run(tk.KFAC, 4, **settings), run(tk.KFAC, 7, **settings)
    torch.testing.assert_close(short, long, rtol=1e-10, atol=1e-12)


def test_the_factors_are_those_of_the_real_positions(float64: None) -> None:
    """``A = Σ_real āāᵀ / M`` and ``T = M/N`` (2.5, not 7) for every position-wise layer;
    the head (one row per sample) keeps its ``T = 1``."""
    torch.manual_seed(0)
    model = TextClassifier().double()
    opt = tk.KFAC(model, **CLASSIFIER)
    x, _, padding = padded(7)
    inputs: list[Tensor] = []
    model.mlp.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    opt.set_padding_mask(~padding)
    F.cross_entropy(model(x, padding), labels()).backward()
    opt.step()
    factors = opt.preconditioner.factors
    for name in ("embed", "attention.in_proj", "attention.out_proj", "mlp"):
        assert factors[name].num_locations == sum(LENGTHS) / N, name
    assert factors["head"].num_locations == 1
    rows = torch.cat([inputs[0], torch.ones(*inputs[0].shape[:2], 1)], -1)[~padding]
    torch.testing.assert_close(factors["mlp"].A, rows.T @ rows / sum(LENGTHS))


def test_a_mask_is_for_one_forward(float64: None) -> None:
    """The mask goes with the next forward only: a second forward without one keeps every
    position (``T`` 7)."""
    torch.manual_seed(0)
    model = TextClassifier().double()
    opt = tk.KFAC(model, **CLASSIFIER)
    x, _, padding = padded(7)
    opt.set_padding_mask(~padding)
    with torch.no_grad():
        model(x, padding)  # uncaptured, but it takes the mask
    F.cross_entropy(model(x, padding), labels()).backward()
    opt.step()
    assert opt.preconditioner.factors["mlp"].num_locations == 7


def test_refusals(float64: None) -> None:
    """Padding that reaches the loss (the attention reads it), a mask of another dtype,
    shape, batch or length: each refused with what to do."""
    torch.manual_seed(0)
    x, _, padding = padded(7)
    model = TextClassifier(attend_padding=True).double()
    opt = tk.KFAC(model, **CLASSIFIER)
    opt.set_padding_mask(~padding)
    with pytest.raises(ValueError, match=r"reaches the loss at \d+ position\(s\) marked as pad"):
        F.cross_entropy(model(x, padding), labels()).backward()
        opt.step()
    try:  # the advice is the attention's and the pooling's (the loss has no positions)
        F.cross_entropy(model(x, padding), labels()).backward()
    except ValueError as error:
        assert "key_padding_mask" in str(error) and "set_loss_mask" not in str(error)
    model = TextClassifier().double()
    opt = tk.KFAC(model, **CLASSIFIER)
    for bad, match in [
        ((~padding).long(), "boolean"),
        (~padding[0], r"\[N, T\]"),
        (~padding[:2], "the mask has 2 rows, the model's batch 4"),
        (~padding[:, :5], r"inputs of the mask's layout \[N, T\] = \[4, 5\]"),
        (~padding[:, :E], rf"\[N, T\] = \[4, {E}\]"),  # not the head's [N, E] input
    ]:
        with pytest.raises(ValueError, match=match):
            opt.set_padding_mask(bad)
            model(x, padding)


def test_the_sampled_loss_at_the_padding_names_the_loss_mask(float64: None) -> None:
    """Under ``fisher="mc"`` a tagger's padding mask without a loss mask is refused: the
    sampled loss has a term at every position, padding included. The message named the
    attention and the pooling before 2026-12-13, where ``set_loss_mask`` is the fix; with
    it the padding is left out (the factors of the real positions)."""
    torch.manual_seed(0)
    x, y, padding = padded(7)
    model = Tagger().double()
    opt = tk.KFAC(model, **{**SETTINGS, "fisher": "mc"})
    opt.set_padding_mask(~padding)
    with (
        pytest.raises(ValueError, match=r"The loss has terms at \d+ of them: under fisher='mc'"),
        pytest.warns(RuntimeWarning, match="no loss mask was given"),
    ):
        token_loss(model(x, padding), y).backward()
        opt.step()
    opt.zero_grad()
    opt.set_padding_mask(~padding)
    opt.set_loss_mask(~padding)
    token_loss(model(x, padding), y).backward()
    opt.step()
    assert opt.preconditioner.factors["mlp"].num_locations == sum(LENGTHS) / N


class TokenClassifier(nn.Module):
    """Token ids → ``nn.Embedding`` → a per-token ``Linear`` → the mean over the real
    tokens → head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mlp, self.head = nn.Embedding(9, E), nn.Linear(E, E), nn.Linear(E, C)

    def forward(self, tokens: Tensor, padding: Tensor) -> Tensor:
        h = torch.tanh(self.mlp(self.embed(tokens)))
        real = (~padding).unsqueeze(-1).to(h.dtype)
        return self.head((h * real).sum(1) / real.sum(1))


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_an_embeddings_padding_tokens_are_left_out(float64: None, sharing: str) -> None:
    """The padding's tokens were counted in an embedding's factors under
    ``weight_sharing="reduce"``: 1.0 off a step of 1.2 between padding to 5 and to 8
    positions (the tokens, its block's ``δ`` side, were summed then; averaged over the
    real positions since 2026-12-08: ``test_reduce_view.py``)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 9, (N, max(LENGTHS)), generator=gen)
    steps = []
    for length in (5, 8):
        padded_tokens = torch.cat(
            [tokens, torch.zeros(N, length - tokens.shape[1], dtype=torch.long)], 1
        )
        padding = torch.arange(length).expand(N, -1) >= torch.tensor(LENGTHS).unsqueeze(1)
        padded_tokens = padded_tokens.masked_fill(padding, 0)
        torch.manual_seed(0)
        model = TokenClassifier().double()
        opt = tk.KFAC(model, weight_sharing=sharing, **CLASSIFIER)
        for _ in range(2):
            opt.zero_grad()
            opt.set_padding_mask(~padding)
            F.cross_entropy(model(padded_tokens, padding), labels()).backward()
            opt.step()
        steps.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-10, atol=1e-12)


class Gated(nn.Module):
    """Per-position ``Linear → tanh → Linear`` to a density and a value; the loss reads the
    value through ``relu(density)`` (a NeRF's raw output, rendered in the loss): a position
    of density ≤ 0 has ``δ = 0`` in every layer, a real point, not padding."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(V, E), nn.Linear(E, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inner(x)))


def test_positions_declared_real_are_kept_whatever_their_gradient(float64: None) -> None:
    """``set_padding_mask`` says which positions are real: those it marks real are kept in
    ``A`` and ``T`` even where every layer's ``δ`` is zero there (they were left out as
    dead before 2026-12-12, whatever the mask said: 0.76 off a step in a NeRF trial)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(N, 5, V, generator=gen, dtype=torch.float64)
    y = torch.randn(N, 5, generator=gen, dtype=torch.float64)
    factors, dead = [], []
    for declared in (False, True):
        torch.manual_seed(0)
        model = Gated().double()
        opt = tk.KFAC(model, **SETTINGS)
        if declared:
            opt.set_padding_mask(torch.ones(N, 5, dtype=torch.bool))
        raw = model(x)
        dead.append(raw[..., 0] <= 0)
        F.mse_loss(torch.relu(raw[..., 0]) * raw[..., 1], y).backward()
        opt.step()
        factors.append(opt.preconditioner.factors["inner"])
    assert torch.equal(dead[0], dead[1]) and 0 < int(dead[0].sum()) < dead[0].numel()
    automatic, kept = factors
    live = ~dead[0].reshape(-1)
    assert automatic.num_locations == int(live.sum()) / N
    assert kept.num_locations == 5
    rows = torch.cat([x, torch.ones(N, 5, 1, dtype=x.dtype)], -1).reshape(N * 5, -1)
    torch.testing.assert_close(kept.A, rows.T @ rows / (N * 5))
    torch.testing.assert_close(automatic.A, rows[live].T @ rows[live] / int(live.sum()))


@pytest.mark.parametrize(
    "options",
    [{}, {"combination": "adef2"}, {"coarse_space": "spectral"}, {"coarse_space": "residual"}],
)
def test_a_first_capture_with_every_position_dead(float64: None, options: dict) -> None:
    """Every density ≤ 0 at the first step: no position has a loss term, the gradient is 0
    and nothing folds. Two-level KFAC raised there before 2026-12-12 ("captured but never
    folded", or an inverse asked before any decomposition: a NeRF trial); it takes KFAC's
    step now (none), and the next, live, capture builds the level as a first one does."""
    x, y = torch.randn(N, 5, V, dtype=torch.float64), torch.randn(N, 5, dtype=torch.float64)
    torch.manual_seed(0)
    model = Gated().double()
    opt = tk.TwoLevelKFAC(model, **SETTINGS, **options)
    for live in (False, True):
        with torch.no_grad():
            model.out.bias[0] = 5.0 if live else -5.0
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        raw = model(x)
        F.mse_loss(torch.relu(raw[..., 0]) * raw[..., 1], y).backward()
        opt.step()
        moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
        assert any(moved) == live
    assert opt.preconditioner.coarse_level.fisher_samples == N
