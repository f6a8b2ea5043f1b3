"""Dead positions (no loss term depends on them: padding) are left out of a ``Linear``'s
factors and location count (``curvature/live_positions.py``): the steps of a padded batch
do not depend on the padding's length or content, and one layer's structural zero (a
causal query at position 0) is not a dead position. Convolutions and ``T = 1`` layers keep
KFC's / KFAC's factors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from twolevel_kfac.curvature import layer_types
from twolevel_kfac.curvature.blocks import LayerStats, kronecker_factors_at
from twolevel_kfac.curvature.live_positions import (
    PositionGrads,
    dead_positions,
    live_rows,
    output_positions,
    position_wise,
)

N, V, E, C = 4, 3, 6, 5  # batch, input features, width, classes
LENGTHS = (4, 2, 3, 1)
IGNORE = -100


class Tagger(nn.Module):
    """A sequence tagger: ``Linear`` → self-attention over the real positions
    (``key_padding_mask``) → ``Linear`` → head, at every position."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(V, E)
        self.attention = nn.MultiheadAttention(E, 2, batch_first=True)
        self.mlp = nn.Linear(E, E)
        self.head = nn.Linear(E, C)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        h = h + self.attention(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return self.head(torch.tanh(self.mlp(h)))


def padded(length: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The same samples padded to ``length`` positions, the padding random (content that a
    correct step never reads): inputs, targets (``IGNORE`` at the padding), padding mask."""
    gen = torch.Generator().manual_seed(seed)
    longest = max(LENGTHS)
    x = torch.randn(N, longest, V, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N, longest), generator=gen)
    junk = torch.Generator().manual_seed(100 + length)
    x = torch.cat([x, torch.randn(N, length - longest, V, generator=junk, dtype=x.dtype)], 1)
    y = torch.cat([y, y.new_zeros(N, length - longest)], 1)
    padding = torch.arange(length).expand(N, -1) >= torch.tensor(LENGTHS).unsqueeze(1)
    x = torch.where(padding.unsqueeze(-1), torch.randn(x.shape, generator=junk).double(), x)
    return x, y.masked_fill(padding, IGNORE), padding


def token_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "kfac": tk.KFAC,
    "kfac_pi": lambda m, **k: tk.KFAC(m, damping_mode="pi", **k),
    "ekfac": tk.EKFAC,
    "kpsvd": tk.KPSVD,
    "kfac_corrected": lambda m, **k: tk.KFACCorrected(m, inverse_method="eigen", **k),
    "nicolaides": lambda m, **k: tk.TwoLevelKFAC(m, coarse_space="nicolaides", **k),
    "residual_adef2": lambda m, **k: tk.TwoLevelKFAC(
        m, coarse_space="residual", combination="adef2", **k
    ),
    "kfac_reduce": lambda m, **k: tk.KFAC(m, weight_sharing="reduce", **k),
    "kpsvd_reduce": lambda m, **k: tk.KPSVD(m, weight_sharing="reduce", **k),
}
SETTINGS: dict[str, Any] = {
    "lr": 0.5,
    "damping": 0.1,
    "fisher": "empirical",
    "class_dim": -1,
    "cov_interval": 1,
    "inv_interval": 1,
    "momentum": 0.0,
    "kl_clip": None,
}


def run(
    build: Callable[..., torch.optim.Optimizer],
    length: int,
    steps: int = 3,
    model: Callable[[], nn.Module] = lambda: Tagger(),
) -> list[Tensor]:
    """The parameters at the start and after each step of a run of ``model`` (a
    :class:`Tagger`) on the batch padded to ``length``."""
    torch.manual_seed(0)
    model = model().double()
    opt = build(model, **SETTINGS)
    x, y, padding = padded(length)
    out = [torch.cat([p.detach().reshape(-1) for p in model.parameters()])]
    for _ in range(steps):
        opt.zero_grad()
        token_loss(model(x, padding), y).backward()
        opt.step()
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out


@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_steps_do_not_depend_on_the_padding(float64: None, method: str) -> None:
    """Padded to 4 (the longest sample) or 7 positions of random content: the same steps
    (≤ 5e-16 on steps of 0.3–2). Before, the padding entered ``A`` and ``T``: the first steps
    were 0.29 apart on a step of 0.70 (KFAC), 0.54 on 1.28 (KPSVD), 0.15 on 0.58 (RESIDU
    A-DEF2), and ``reduce`` averaged ``ā`` over the padded positions too."""
    short, long = run(OPTIMIZERS[method], 4), run(OPTIMIZERS[method], 7)
    for k in range(1, len(short)):
        moved = float((short[k] - short[0]).norm())
        assert moved > 1e-3
        assert float((short[k] - long[k]).norm()) <= 1e-10 * moved, f"step {k}"


class LoopTagger(nn.Module):
    """A tagger stepping through the positions one at a time (a decoder's loop): its
    ``Linear`` layers are called once per position on ``[N, ·]`` rows."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(V, E), nn.Linear(E, C)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        h, out = x.new_zeros(len(x), E), []
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + 0.5 * h)
            out.append(self.head(h))
        return torch.stack(out, dim=1)


@pytest.mark.parametrize("method", ["kfac", "ekfac", "nicolaides"])
def test_a_loops_padded_steps_are_dead_positions(float64: None, method: str) -> None:
    """A loop over the positions calls each layer once per position: the calls are its
    locations, and the trailing padded steps, which no loss term reaches in either layer,
    are dead (kept before 2026-12-06 (evening): steps 0.39–0.58 apart with the targets
    padded to 5 or 9 in a trial): the same steps padded to 4 or 7, ``T`` the mean length."""
    short, long = (
        run(OPTIMIZERS[method], 4, model=LoopTagger),
        run(OPTIMIZERS[method], 7, model=LoopTagger),
    )
    for k in range(1, len(short)):
        moved = float((short[k] - short[0]).norm())
        assert moved > 1e-3
        assert float((short[k] - long[k]).norm()) <= 1e-10 * moved, f"step {k}"
    assert len(real_locations(LoopTagger)) == 2


def real_locations(make: Callable[[], nn.Module]) -> dict[str, object]:
    """The factors after one step on the batch padded to 7: each layer's ``T`` is the mean
    real length ``Σ lengths / N``."""
    torch.manual_seed(0)
    model = make().double()
    opt = tk.KFAC(model, **SETTINGS)
    x, y, padding = padded(7)
    token_loss(model(x, padding), y).backward()
    opt.step()
    factors = opt.preconditioner.factors
    for name, layer in factors.items():
        assert layer.num_locations == sum(LENGTHS) / N, name
    return dict(factors)


def test_padding_is_left_out_of_the_factors(float64: None) -> None:
    """The factors are those of the real positions: ``T = Σ lengths / N`` (2.5, not 7)."""
    assert len(real_locations(Tagger)) == 5  # embed, the attention's projections, mlp, head


class CausalSelfAttention(nn.Module):
    """Separate ``q``, ``k``, ``v`` projections and causal attention, by
    ``F.scaled_dot_product_attention`` or written out: the query at position 0 attends to
    one key, so its gradient is a structural zero, computed as 0 or as a 1e-18 residue."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.q, self.k, self.v, self.head = (nn.Linear(V, E), nn.Linear(V, E), nn.Linear(V, E),
                                             nn.Linear(E, C))  # fmt: skip
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.fused:
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / E**0.5
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
            h = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("only_query", [False, True])
def test_a_structural_zero_of_one_layer_is_not_a_dead_position(
    float64: None, only_query: bool
) -> None:
    """The query projection's zero gradient at position 0 (exact or a rounding residue,
    by the attention's implementation) does not leave the position out: the keys, values
    and head reach the loss there, and where the query alone trains, one layer's zeros
    mark nothing. Both implementations take the same steps (dropping positions by one
    layer's zeros made them 20 % apart on ``q``; 11 % with the query alone)."""
    x = torch.randn(3, 6, V, dtype=torch.float64)
    y = torch.randint(0, C, (3, 6))
    steps = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = CausalSelfAttention(fused).double()
        params = list(model.q.parameters()) if only_query else list(model.parameters())
        opt = tk.KFAC(model, params=params, **SETTINGS)
        token_loss(model(x), y).backward()
        opt.step()
        assert opt.preconditioner.factors["q"].num_locations == 6
        steps.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-12, atol=1e-13)


class LoraQuery(CausalSelfAttention):
    """A low-rank adapter on the query alone: two layers behind the same softmax."""

    def __init__(self, fused: bool) -> None:
        super().__init__(fused)
        self.qa, self.qb = nn.Linear(V, 2, bias=False), nn.Linear(2, E, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        q, k, v = (z.view(n, t, 2, E // 2).transpose(1, 2)  # two heads
                   for z in (self.q(x) + self.qb(self.qa(x)), self.k(x), self.v(x)))  # fmt: skip
        if self.fused:
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / (E // 2) ** 0.5
            causal = torch.ones(t, t, dtype=torch.bool).triu(1)
            h = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        return self.head(torch.tanh(h.transpose(1, 2).reshape(n, t, E)))


def test_a_structural_zero_seen_by_two_layers_is_dead_to_rounding() -> None:
    """LoRA on the query alone (float64): both adapter layers see position 0's structural
    zero, exact in the written-out attention and a residue of a few eps in torch's fused
    kernel. It is dead in both (below 16 eps of the largest ``|δ|``), for every sample: the
    steps agree (whether each sample's position 0 counted followed the kernel's rounding
    before 2026-12-06 (evening): ``T`` 5.75 or 6 against 5, a step 0.26 off). In float32
    only exact zeros are dead (next test)."""
    dtype = torch.float64
    torch.manual_seed(3)
    x = torch.randn(8, 6, V, dtype=dtype)
    y = torch.randint(0, C, (8, 6))
    steps = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = LoraQuery(fused).to(dtype)
        params = [*model.qa.parameters(), *model.qb.parameters()]
        opt = tk.KFAC(model, params=params, **SETTINGS)
        token_loss(model(x), y).backward()
        opt.step()
        assert [opt.preconditioner.factors[n].num_locations for n in ("qa", "qb")] == [5, 5]
        steps.append(torch.cat([p.detach().reshape(-1) for p in params]))
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-12, atol=1e-12)


def test_confident_positions_stay_live_in_float32() -> None:
    """A per-position model predicting most tokens confidently: their gradients are tiny,
    not 0, and in float32 as small as a structural zero's residue (a bar of 16 eps of the
    largest left out half the positions: the float32 step 0.39 off the float64 one, 18×
    under ``mc`` with the KL clip). Exact zeros alone are dead there: the float32 and
    float64 steps agree to float32's rounding."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(8, 6), nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8))
    net = net.double()
    adam = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(400):  # tokens below 4 predict the next one; the others nothing
        tokens = torch.randint(0, 8, (64, 6))
        targets = torch.where(tokens < 4, (tokens + 1) % 8, torch.randint(0, 8, tokens.shape))
        adam.zero_grad()
        F.cross_entropy(net(tokens).flatten(0, 1), targets.flatten()).backward()
        adam.step()
    with torch.no_grad():
        net[3].weight.mul_(2.0)
        net[3].bias.mul_(2.0)
        tokens = torch.randint(0, 8, (8, 6), generator=torch.Generator().manual_seed(3))
        targets = (tokens + 1) % 8
        gap = (net(tokens).softmax(-1) - F.one_hot(targets, 8)).abs().amax(-1)
    assert float((gap < 16 * torch.finfo(torch.float32).eps * gap.max()).double().mean()) > 0.3
    state = {k: v.clone() for k, v in net.state_dict().items()}
    steps = []
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(net).to(dtype)
        model.load_state_dict(state)
        opt = tk.KFAC(model, lr=1.0, damping=1e-3, fisher="empirical", class_dim=-1, kl_clip=None)
        F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
        opt.step()
        steps.append(torch.cat([(p.double() - state[n].double()).flatten()
                                for n, p in model.state_dict().items()]))  # fmt: skip
    assert float((steps[0] - steps[1]).norm() / steps[1].norm()) < 1e-3


def test_dead_positions_and_the_rows_kept() -> None:
    """A position is dead where every position-wise layer of its forward and layout has
    ``δ = 0`` there; the factors then average over the other rows, ``T = M/N``, as the
    oracle's; every row where none or all are dead, and for ``T = 1``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)
    g[0, 2:] = 0  # padding: zero in this layer ...
    g[2, 0] = 0
    other = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    other[0, 2:] = 0  # ... and in the other: dead
    dead = dead_positions(
        PositionGrads(*given)
        for given in [
            ("fwd", "a", g),
            ("fwd", "b", other),
            ("fwd", "a", g[:, :1]),
            ("other", "b", other),
        ]
    )
    assert set(dead) == {("fwd", 3, 4)}  # T = 1, and one layer's layout, are not marked
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[0, 2:] = True  # (2, 0) is zero in one layer only: not dead
    assert torch.equal(dead[("fwd", 3, 4)], expected)
    stats = LayerStats(a, g, dead=expected)
    rows_a, rows_g, locations = live_rows(stats)
    assert rows_a.shape == (10, 5) and rows_g.shape == (10, 2) and locations == 10 / 3
    big_a, big_g, count = kronecker_factors_at(stats)
    kept = ~expected
    torch.testing.assert_close(big_a, a[kept].T @ a[kept] / 10)
    torch.testing.assert_close(big_g, g[kept].T @ g[kept] / 10)
    assert count == 10 / 3
    none = live_rows(LayerStats(a, g, dead=torch.ones(3, 4, dtype=torch.bool)))
    assert none[0].shape == (0, 5) and none[2] == 0  # all dead: no curvature to fold
    for keeps_all in (
        LayerStats(a, g),  # no mask
        LayerStats(a[:, :1], g[:, :1], dead=torch.zeros(3, 1, dtype=torch.bool)),  # T = 1
    ):
        rows_a, _, locations = live_rows(keeps_all)
        assert rows_a.shape[0] == keeps_all.a.shape[0] * keeps_all.a.shape[1]
        assert locations == keeps_all.a.shape[1] and isinstance(locations, int)
    assert position_wise(nn.Linear(2, 2)) and position_wise(nn.Embedding(3, 2))
    assert not position_wise(nn.Conv1d(2, 2, 1))


def test_a_fractional_location_count_resumes_bit_identically(float64: None) -> None:
    """``T = 2.5`` is saved and loaded as it is: the resumed run equals the uninterrupted."""
    x, y, padding = padded(6)

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = Tagger().double()
        return model, tk.KFAC(model, **{**SETTINGS, "inv_interval": 2})

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        token_loss(model(x, padding), y).backward()
        opt.step()

    model, opt = fresh()
    step(model, opt)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for _ in range(2):
        step(model, opt)
    resumed, opt2 = fresh()
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    assert opt2.preconditioner.factors["mlp"].num_locations == 2.5
    for _ in range(2):
        step(resumed, opt2)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


class LanguageModel(nn.Module):
    """Token embedding (``padding_idx=0``) → causal self-attention → head tied to the table
    or not: a language model's layers, the padding token in the batch."""

    def __init__(self, vocab: int, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, E, padding_idx=0)
        self.attention = nn.MultiheadAttention(E, 2, batch_first=True)
        self.head = nn.Linear(E, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)
        return self.head(torch.tanh(h + self.attention(h, h, h, attn_mask=causal)[0]))


def lm_steps(vocab: int, tied: bool, length: int, build: Any = tk.KFAC) -> Tensor:
    """The parameters after two steps on the same token sequences right-padded (token 0,
    target ignored) to ``length``."""
    gen = torch.Generator().manual_seed(3)
    longest = max(LENGTHS)
    tokens = torch.randint(1, vocab, (N, longest), generator=gen)
    real = torch.arange(longest).expand(N, -1) < torch.tensor(LENGTHS).unsqueeze(1)
    tokens = torch.cat([tokens.masked_fill(~real, 0), tokens.new_zeros(N, length - longest)], 1)
    following = torch.roll(tokens, -1, 1)
    following[:, -1] = 0
    targets = following.masked_fill(following == 0, IGNORE)
    torch.manual_seed(0)
    model = LanguageModel(vocab, tied).double()
    opt = build(model, **SETTINGS)
    for _ in range(2):
        opt.zero_grad()
        token_loss(model(tokens), targets).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(("vocab", "tied"), [(11, False), (11, True), (12, False)])
def test_a_language_models_embedding_leaves_the_padding_out(
    float64: None, vocab: int, tied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token table (dense, tied to the head, or a large table's diagonal path, here
    forced by a lower row limit) leaves the padding out too: it kept it (31 % of its step
    apart between paddings; tied 0.15 on 0.63)."""
    if vocab == 12:
        monkeypatch.setattr(layer_types, "EMBEDDING_MAX_ROWS", 8)
    for build in (tk.KFAC, tk.EKFAC):
        short, long = (lm_steps(vocab, tied, length, build) for length in (5, 9))
        torch.testing.assert_close(short, long, rtol=1e-10, atol=1e-12)


def summed_loss(logits: Tensor, y: Tensor) -> Tensor:
    """The tokens' losses summed over the whole batch's ``N`` samples (the same loss for a
    micro-batch and for the batch, whatever each is padded to)."""
    flat = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
    return flat / N


def test_micro_batches_padded_to_different_lengths(float64: None) -> None:
    """Two accumulated micro-batches, each padded to its own longest sequence: the step of
    the whole batch padded to one length (it raised a bare ``torch.cat`` size error)."""
    x, y, padding = padded(7)
    steps = []
    for split in (False, True):
        torch.manual_seed(0)
        model = Tagger().double()
        opt = tk.KFAC(model, **{**SETTINGS, "accumulation_steps": 2 if split else 1})
        if split:  # the first two samples have lengths 4 and 2; the others 3 and 1
            for rows, length in ((slice(0, 2), 4), (slice(2, 4), 3)):
                part = x[rows, :length], y[rows, :length], padding[rows, :length]
                summed_loss(model(part[0], part[2]), part[1]).backward()
        else:
            summed_loss(model(x, padding), y).backward()
        opt.step()
        steps.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-10, atol=1e-12)


def test_a_step_without_a_loss_term_folds_nothing(float64: None) -> None:
    """A capture where every target is ignored (every position dead) adds no curvature:
    the runs padded to 4 and 7 stay equal after it (it folded every row, padding included:
    19–27 % apart)."""

    def run_with_empty_step(length: int) -> Tensor:
        torch.manual_seed(0)
        model = Tagger().double()
        opt = tk.KFAC(model, **{**SETTINGS, "ema_decay": 0.9})
        x, y, padding = padded(length)
        for empty in (False, True, False):
            opt.zero_grad()
            out = model(x, padding)
            (out.sum() * 0 if empty else token_loss(out, y)).backward()  # no loss term: δ = 0
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    torch.testing.assert_close(
        run_with_empty_step(4), run_with_empty_step(7), rtol=1e-10, atol=1e-12
    )


def test_a_model_without_output_positions_marks_nothing(float64: None) -> None:
    """A point-cloud classifier (per-point ``Linear`` layers, max over the points, ``[N, C]``
    output): points that no channel's maximum picks have ``δ = 0`` in every layer, but they
    are not padding, so the factors keep them (``T`` 12, not the 3–5 points picked; one
    layer's step went from 0.58 to 1.62)."""

    class PointNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2, self.head = nn.Linear(V, E), nn.Linear(E, 3), nn.Linear(3, C)

        def forward(self, points: Tensor) -> Tensor:
            return self.head(self.l2(torch.relu(self.l1(points))).amax(dim=1))

    for likelihood in ("categorical", "gaussian"):  # a classifier's [N, C], a regression's
        torch.manual_seed(0)
        model = PointNet().double()
        opt = tk.KFAC(model, **{**SETTINGS, "likelihood": likelihood})
        out = model(torch.randn(N, 12, V))
        if likelihood == "gaussian":
            F.mse_loss(out, torch.randn(N, C)).backward()
        else:
            F.cross_entropy(out, torch.randint(0, C, (N,))).backward()
        opt.step()
        assert opt.preconditioner.factors["l2"].num_locations == 12


def test_a_large_tables_fractional_count_resumes(
    float64: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large table's ``T = M/N`` (2.5) is loaded as saved (it was cut to an int: 0.12 off
    on an embedding step of 0.48 after resuming)."""
    monkeypatch.setattr(layer_types, "EMBEDDING_MAX_ROWS", 8)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 12, (N, 4), generator=gen)
    tokens[torch.arange(4).expand(N, -1) >= torch.tensor(LENGTHS).unsqueeze(1)] = 0
    following = torch.roll(tokens, -1, 1)
    following[:, -1] = 0
    targets = following.masked_fill(following == 0, IGNORE)
    torch.manual_seed(0)
    model = LanguageModel(12, tied=False).double()
    opt = tk.KFAC(model, **SETTINGS)
    token_loss(model(tokens), targets).backward()
    opt.step()
    saved = opt.preconditioner.factors["embed"].num_locations
    assert saved not in (1, 4) and saved != int(saved)
    resumed = tk.KFAC(model, **SETTINGS)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.preconditioner.factors["embed"].num_locations == saved


@pytest.mark.parametrize("container", ["dict", "tuple"])
def test_logits_in_a_dict_leave_the_padding_out_a_tuple_keeps_it(
    float64: None, container: str
) -> None:
    """Logits in a dict's ``"logits"`` (an HF ``ModelOutput``): the same steps for both
    paddings. A tuple does not say which tensor is the logits (hidden states or attention
    maps may come first: a point cloud's features read as logits dropped 50 of 64 points),
    so its forward keeps every position, as before 2026-12-04."""

    class Wrapped(Tagger):
        def forward(self, x: Tensor, padding: Tensor) -> Any:  # type: ignore[override]
            logits = super().forward(x, padding)
            return {"logits": logits} if container == "dict" else (logits.new_zeros(()), logits)

    def steps(length: int) -> tuple[Tensor, float]:
        torch.manual_seed(0)
        model = Wrapped().double()
        opt = tk.KFAC(model, **SETTINGS)
        x, y, padding = padded(length)
        out = model(x, padding)
        token_loss(out["logits"] if container == "dict" else out[-1], y).backward()
        opt.step()
        locations = float(opt.preconditioner.factors["mlp"].num_locations)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), locations

    (short, t_short), (long, t_long) = steps(4), steps(7)
    if container == "dict":
        torch.testing.assert_close(short, long, rtol=1e-10, atol=1e-12)
        assert t_short == t_long == sum(LENGTHS) / N
    else:
        assert (t_short, t_long) == (4, 7)


def test_flattened_logits_have_positions_only_where_proved_sample_major() -> None:
    """``[k·N, C]`` logits are ``k`` positions per sample only where their rows are proved
    sample-major: a head on gathered rows (``h[mask]``, 8 of a batch of 4) has none, as
    with 7 rows (its trunk's dead positions were dropped at 8 and kept at 7: blocks 0.35
    apart)."""
    logits = torch.zeros(8, 3)
    assert output_positions(logits, None, 4, lambda t: True) == 2
    assert output_positions(logits, None, 4, lambda t: False) is None
    assert output_positions(torch.zeros(7, 3), None, 4, lambda t: True) is None


class DropPathBlock(nn.Module):
    """A residual block whose branch (two position-wise ``Linear`` layers, the only trained
    layers of the ``[N, T]`` layout) stochastic depth drops for some samples, then a fixed
    per-position read-out: every position of a dropped sample has ``δ = 0`` in both layers,
    yet its loss terms depend on it through the residual path."""

    def __init__(self, keep: Tensor) -> None:
        super().__init__()
        self.pw1, self.pw2 = nn.Linear(E, 2 * E), nn.Linear(2 * E, E)
        self.register_buffer("keep", keep)
        self.register_buffer("readout", torch.randn(E, C))

    def forward(self, x: Tensor) -> Tensor:
        branch = self.pw2(torch.tanh(self.pw1(x)))
        return (x + self.keep[:, None, None] * branch) @ self.readout


@pytest.mark.parametrize("method", ["kfac", "nicolaides"])
def test_a_sample_that_stochastic_depth_dropped_keeps_its_positions(
    float64: None, method: str
) -> None:
    """The dropped samples are samples with ``δ = 0``, not padding: the step is the oracle's
    KFAC over all ``N·T`` positions (≤ 1e-12; left out before 2026-12-06 (late), 0.15–0.56
    off in a segmentation net). The same samples with no loss term stay dead."""
    from tests.oracles import dense_kfac_update

    torch.manual_seed(0)
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    model = DropPathBlock(keep).double()
    x, y = torch.randn(N, 5, E, dtype=torch.float64), torch.randint(0, C, (N, 5))
    expected = dense_kfac_update(model, token_loss, x, y, damping=SETTINGS["damping"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = OPTIMIZERS[method](model, **{**SETTINGS, "lr": 1.0, "ema_decay": 0.0})
    opt.zero_grad()
    token_loss(model(x), y).backward()
    opt.step()
    if method == "kfac":
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                p.detach() - before[name], expected[name], rtol=1e-10, atol=1e-12
            )
    assert opt.preconditioner.factors["pw1"].num_locations == 5
    silent = y.masked_fill(keep[:, None] == 0, IGNORE)  # the dropped samples without a loss term
    opt.zero_grad()
    token_loss(model(x), silent).backward()
    opt.step()
    assert opt.preconditioner.factors["pw1"].num_locations == 5 * 2 / N  # theirs left out


def test_under_mc_a_dropped_sample_stays_in_the_factors(float64: None) -> None:
    """Under ``fisher="mc"`` the sampled loss reaches the dropped samples through the
    residual path too: ``A`` of the branch's first layer is that of all ``N·T`` inputs."""
    torch.manual_seed(0)
    model = DropPathBlock(torch.tensor([1.0, 0.0, 1.0, 0.0])).double()
    opt = tk.KFAC(model, **{**SETTINGS, "fisher": "mc", "ema_decay": 0.0})
    x = torch.randn(N, 5, E, dtype=torch.float64)
    token_loss(model(x), torch.randint(0, C, (N, 5))).backward()
    opt.step()
    rows = torch.cat([x, torch.ones(N, 5, 1, dtype=x.dtype)], -1).reshape(N * 5, -1)
    factors = opt.preconditioner.factors["pw1"]
    assert factors.num_locations == 5
    torch.testing.assert_close(factors.A, rows.T @ rows / (N * 5))


class EmptyContext(nn.Module):
    """A tagger ``[N, T] → [N, C, T]`` with a side context ``[N, S]`` padded, encoded by two
    ``Linear`` layers and mean-pooled over its real positions; sample 0's context is empty."""

    def __init__(self) -> None:
        super().__init__()
        self.t1, self.t2 = nn.Linear(E, E), nn.Linear(E, E)
        self.c1, self.c2 = nn.Linear(E, E), nn.Linear(E, E)
        self.head = nn.Conv1d(E, C, 1)

    def forward(self, x: Tensor, context: Tensor, real: Tensor) -> Tensor:
        w = real.unsqueeze(-1).to(x.dtype)
        encoded = self.c2(torch.tanh(self.c1(context))) * w
        pooled = encoded.sum(1) / w.sum(1).clamp_min(1.0)
        return self.head((self.t2(torch.tanh(self.t1(x))) + pooled[:, None]).transpose(1, 2))


class Transposed(nn.Module):
    """Two position-wise layers on ``[N, W, H, D]`` (an axial block's layout) for per-pixel
    logits ``[N, C, H, W]``: the same positions as the output's, in another order."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.pw1, self.pw2, self.transposed = nn.Linear(V, E), nn.Linear(E, C), transposed

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(1, 2) if self.transposed else x
        out = self.pw2(torch.tanh(self.pw1(h)))
        return (out.transpose(1, 2) if self.transposed else out).permute(0, 3, 1, 2)


def test_padding_stays_dead_where_other_layouts_or_orders_are_read(float64: None) -> None:
    """A review of 2026-12-06 (late) found two forms of the stochastic-depth rescue keeping
    padding, both exact now: a sample whose side context is all padding (its steps moved
    with the context's padding, 0.33–0.41 off), and pixels the loss ignores under a layout
    of the output's size in another order (0.14–0.22 off its twin in the output's order)."""
    settings = {**SETTINGS, "lr": 1.0, "ema_decay": 0.0, "class_dim": 1}
    steps = []
    for length in (4, 7):
        torch.manual_seed(0)
        model = EmptyContext().double()
        opt = tk.KFAC(model, **settings)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(3, 5, E, generator=gen, dtype=torch.float64), torch.randint(0, C, (3, 5))
        context = torch.randn(3, 7, E, generator=gen, dtype=torch.float64)[:, :length]
        real = torch.arange(length) < torch.tensor([0, 2, 3]).unsqueeze(1)
        F.cross_entropy(model(x, context.masked_fill(~real[..., None], 0), real), y).backward()
        opt.step()
        assert opt.preconditioner.factors["c1"].num_locations == 5 / 3
        steps.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-12, atol=1e-13)
    twins = []
    x = torch.randn(N, 2, 3, V, dtype=torch.float64)
    y = torch.randint(0, C, (N, 2, 3)).masked_fill(torch.rand(N, 2, 3) < 0.4, IGNORE)
    for transposed in (False, True):
        torch.manual_seed(0)
        model = Transposed(transposed).double()
        opt = tk.KFAC(model, **settings)
        F.cross_entropy(model(x), y, ignore_index=IGNORE).backward()
        opt.step()
        twins.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(twins[0], twins[1], rtol=1e-12, atol=1e-13)
