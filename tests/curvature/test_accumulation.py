"""Gradient accumulation over micro-batches equals one step on the whole batch (empirical
Fisher: ``accumulation_steps`` scales δ; MC statistics need no scaling)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import twolevel_kfac as tk
from oracles import assert_close_report, tiny_convnet
from test_kfac_exact import CONTRACT, make_batch, prepare


def update(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batches: int,
) -> list[torch.Tensor]:
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
        (nn.functional.cross_entropy(model(xs), ys) / micro_batches).backward()
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]


@pytest.mark.parametrize(
    ("optimizer", "extra"),
    [(tk.KFAC, {}), (tk.TwoLevelKFAC, {"coarse_space": "residual", "combination": "adef2"})],
)
def test_accumulated_micro_batches_equal_one_batch(
    float64: None, optimizer: type[tk.KFAC], extra: dict[str, str]
) -> None:
    model = prepare(tiny_convnet())
    twin = copy.deepcopy(model)
    x, y = make_batch((2, 5, 5), 2, 8)
    whole = update(model, optimizer(model, damping=0.05, **CONTRACT, **extra), x, y, 1)
    accumulated = update(
        twin, optimizer(twin, damping=0.05, accumulation_steps=4, **CONTRACT, **extra), x, y, 4
    )
    for got, want in zip(accumulated, whole, strict=True):
        assert_close_report(got, want, rtol=1e-9, atol=1e-12)


def test_accumulation_steps_is_validated() -> None:
    with pytest.raises(ValueError, match="accumulation_steps must be"):
        tk.KFAC(tiny_convnet(), accumulation_steps=0)


class Branched(nn.Module):
    """A trunk, a head on the samples of a flagged micro-batch only (an expert or a task
    head that some micro-batches do not call)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.head, self.out = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        if rows is not None:  # the head on the first ``rows`` rows
            h = torch.cat([h[:rows] + self.head(h[:rows]), h[rows:]])
        return self.out(h)


def test_a_head_some_micro_batches_skip_has_the_batch_fisher_block() -> None:
    """The head runs on the 4 samples of the first of two micro-batches: its block is
    that of the head on those 4 rows of one forward of the 8, ``Σ āāᵀ/R ⊗ Σ δδᵀ/N`` (it
    was taken over the 4 samples of its own forward: ``G`` 2×, a step 38 % off under DDP
    in a trial, as with micro-batches). The scaling is the Fisher's own: under MC too."""
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    options = {"fisher": "empirical", "ema_decay": 0.0, "cov_interval": 1, "kl_clip": None}
    factors = []
    for micro in (False, True):
        model = Branched().double()
        opt = tk.KFAC(model, fisher_batch=1, accumulation_steps=2 if micro else 1, **options)
        opt.zero_grad()
        if micro:
            for part, rows in ((slice(0, 4), 4), (slice(4, 8), None)):
                nn.functional.cross_entropy(model(x[part], rows), y[part]).div(2).backward()
        else:
            nn.functional.cross_entropy(model(x, 4), y).backward()
        opt.step()
        head = opt.preconditioner.factors["head"]
        assert head.A is not None and head.G is not None
        factors.append((head.A.clone(), head.G.clone()))
    for one, two in zip(*factors, strict=True):
        torch.testing.assert_close(two, one, rtol=1e-12, atol=1e-14)


class Routed(nn.Module):
    """Tokens routed top-1 to one of two experts by the sign of their first feature: each
    expert's rows are gathered from the batch's ``B·T`` tokens, in another share of each
    micro-batch's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.experts = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.tanh(self.embed(x)).reshape(-1, 6)
        route, mixed = flat[:, 0] > 0, flat.clone()
        for expert, chosen in zip(self.experts, (route, ~route), strict=True):
            index = chosen.nonzero().squeeze(1)
            mixed = mixed.index_add(0, index, expert(flat[index]))
        return self.head(mixed.view(x.shape[0], x.shape[1], 6).mean(dim=1))


def test_experts_routed_other_shares_of_each_micro_batch_have_the_batch_fisher_block() -> None:
    """An expert given other shares of two micro-batches' tokens has the block of the
    whole batch, ``Σ āāᵀ/R ⊗ Σ δδᵀ/N`` over its ``R`` rows of the step and its ``N``
    samples (``δ = N·∂L/∂s``, read off autograd here), and so does the whole batch in
    one forward. Before 2026-12-06 (day) each micro-batch's ``δ`` were scaled by its own
    ``√(R_f/N_f)``: ``G`` off by the spread of the shares."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    options = {"fisher": "empirical", "ema_decay": 0.0, "cov_interval": 1, "kl_clip": None}
    factors = []
    for micro in (1, 2):
        model = Routed().double()
        opt = tk.KFAC(model, fisher_batch=1, accumulation_steps=micro, **options)
        opt.zero_grad()
        rows: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        hooks = [
            model.experts[0].register_forward_hook(lambda m, i, o, r=rows: r.append(i[0])),
            model.experts[0].register_full_backward_hook(lambda m, i, o, g=grads: g.append(o[0])),
        ]
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            nn.functional.cross_entropy(model(xs), ys).div(micro).backward()
        for hook in hooks:
            hook.remove()
        opt.step()
        expert = opt.preconditioner.factors["experts.0"]
        assert expert.A is not None and expert.G is not None
        factors.append((expert.A.clone(), expert.G.clone()))
        shares = [len(r) / len(xs) for r in rows]
        a = torch.cat([torch.cat(rows), torch.ones(sum(map(len, rows)), 1)], dim=1).detach()
        delta = torch.cat(grads) * len(x)  # N·∂L/∂s of the whole batch's mean loss
        want = (a.T @ a / len(a), delta.T @ delta / len(x))
        assert micro == 1 or shares[0] != shares[1]  # (the premise)
        for got, expected in zip(factors[-1], want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


class TiedLM(nn.Module):
    """An embedding table tied to the LM head (one block, two calls: the table's output
    gradients are its ``ā`` and its one-hot ids its ``δ``, the head the other way round),
    and a classifier that skips them (``task=1``)."""

    def __init__(self, features: int = 3, classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.body = nn.Embedding(7, 5), nn.Linear(5, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.emb.weight
        self.other, self.cls = nn.Linear(features, 5), nn.Linear(5, classes)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        if task == 0:
            return self.head(torch.tanh(self.body(self.emb(x))))
        return self.cls(torch.tanh(self.body(self.other(x))).mean(1))


def test_a_tied_table_and_head_one_micro_batch_skips_have_half_the_block() -> None:
    """The tied block of a step whose second micro-batch skips it is half that of the
    same step with the first micro-batch twice, ``½ A ⊗ G`` in every entry: the step's
    share scales the block's own ``δ`` (the table's one-hot rows, the head's output
    gradients). Before 2026-12-06 (day) it scaled the captured output gradients, which
    are the table's ``ā`` and the head's ``δ``: the Kronecker product 0.03-1.08 of the
    expected instead of 0.5 (a step 24 % off under DDP)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (4, 3), generator=gen)
    x = torch.randn(4, 3, 3, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 2, (4,), generator=gen)
    options = {"fisher": "empirical", "ema_decay": 0.0, "cov_interval": 1, "kl_clip": None}
    blocks = []
    for skip in (False, True):
        model = TiedLM().double()
        opt = tk.KFAC(model, accumulation_steps=2, **options)
        opt.zero_grad()
        lm = model(ids, 0).reshape(-1, 7)
        nn.functional.cross_entropy(lm, ids.reshape(-1)).div(2).backward()
        if skip:
            nn.functional.cross_entropy(model(x, 1), y).div(2).backward()
        else:
            lm = model(ids, 0).reshape(-1, 7)
            nn.functional.cross_entropy(lm, ids.reshape(-1)).div(2).backward()
        opt.step()
        factors = opt.preconditioner.factors["emb"]
        assert factors.A is not None and factors.G is not None
        blocks.append(torch.kron(factors.A, factors.G))
    torch.testing.assert_close(blocks[1], blocks[0] / 2, rtol=1e-12, atol=1e-15)


class Patches(nn.Module):
    """A patch embedding (patch 2, stride 2) as a ``Conv2d`` or as a ``Linear`` on the
    unfolded patches, then a token ``Linear`` and a mean over the tokens."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = conv
        self.embed = nn.Conv2d(2, 4, 2, stride=2) if conv else nn.Linear(8, 4)
        self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            tokens = self.embed(x).flatten(2).transpose(1, 2)
        else:
            tokens = self.embed(nn.functional.unfold(x, 2, stride=2).transpose(1, 2))
        return self.head(torch.tanh(self.mix(torch.tanh(tokens))).mean(1))


@pytest.mark.parametrize("optimizer", [tk.KFAC, tk.TwoLevelKFAC])
def test_crops_of_two_sizes_in_one_step_through_a_convolution(
    float64: None, optimizer: type[tk.KFAC]
) -> None:
    """DINO's multi-crop: global crops (16 patches) and local ones (4) as two forwards of
    one step. A convolution's statistics of the two are padded to the longer with dead
    locations, as a ``Linear``'s are (refused before 2026-12-12: "the forwards of one step
    have [4, 16] locations per sample"): the ``Conv2d`` patch embedding takes the steps
    of the same map as a ``Linear`` on the unfolded patches, which the tests of dead
    positions check against their oracle."""
    gen = torch.Generator().manual_seed(1)
    crops = [torch.randn(3, 2, 8, 8, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)]
    conv, linear = Patches(True).double(), Patches(False).double()
    with torch.no_grad():  # the same map: the kernel [4, 2, 2, 2] as [4, 8]
        linear.embed.weight.copy_(conv.embed.weight.flatten(1))
        linear.embed.bias.copy_(conv.embed.bias)
        for name in ("mix", "head"):
            getattr(linear, name).load_state_dict(getattr(conv, name).state_dict())
    steps = []
    for model in (conv, linear):
        opt = optimizer(model, **CONTRACT, accumulation_steps=2)
        before = [p.detach().clone() for p in model.parameters()]
        for x in crops:
            (nn.functional.cross_entropy(model(x.double()), torch.arange(3)) / 2).backward()
        opt.step()
        pairs = zip(model.parameters(), before, strict=True)
        steps.append(torch.cat([(p.detach() - b).flatten() for p, b in pairs]))
    assert float(steps[0].abs().max()) > 1e-3
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-10, atol=1e-12)
