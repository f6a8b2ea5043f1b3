"""The coarse level (and adaptive damping's exact Fisher products) pair the layers'
per-sample gradients row by row: a layer whose rows are not the samples in the order of
the layers before it is refused when the forward runs (``curvature/row_order.py``), where
it took a coarse term 4e-2 off a step of 0.5 silently. Row moves on parameters alone, on
other dimensions, or before the first layer are not refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from twolevel_kfac.curvature.row_order import moved_rows

N = 4


class Pair(nn.Module):
    """Two layers, with what ``how`` does to the rows between them (or before ``a``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b, self.how = nn.Linear(3, 4), nn.Linear(4, 2), how

    def forward(self, x: Tensor) -> Tensor:
        if self.how == "views":  # two views of the batch concatenated inside forward
            h = torch.tanh(self.a(torch.cat([x, x.flip(-1)])))
            return self.b(h).reshape(2, N, 2).sum(0)
        h = torch.tanh(self.a(x))
        if self.how == "permuted":  # a permutation put back after the next layer
            p = torch.tensor([2, 0, 3, 1])
            return self.b(h[p])[torch.argsort(p)]
        if self.how == "graph":  # messages summed over a ring's edges (as many as nodes)
            src, dst = torch.arange(N), torch.arange(N).roll(1)
            return self.b(torch.zeros_like(h).index_add(0, dst, h[src]))
        if self.how == "graph_chord":  # and one chord: E = N + 1 (let through before 12-05)
            src, dst = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([3, 0, 1, 2, 2])
            return self.b(torch.zeros_like(h).index_add(0, dst, h[src]))
        if self.how == "flipped":
            return self.b(h.flip(0)).flip(0)
        return self.b(h)


def two_level(model: nn.Module) -> torch.optim.Optimizer:
    return tk.TwoLevelKFAC(model, lr=0.1, coarse_space="nicolaides", fisher="empirical")


def adaptive(model: nn.Module) -> torch.optim.Optimizer:
    return tk.KFAC(model, lr=0.1, adaptive_damping=True, fisher="empirical")


def steps(
    model: nn.Module,
    build: Callable[[nn.Module], torch.optim.Optimizer],
    x: Tensor,
    count: int = 1,
) -> None:
    """``count`` steps (with a closure: adaptive damping calls it again) on ``x``."""
    opt, y = build(model), torch.randn(N, 2)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(count):
        opt.step(closure)


def one_step(model: nn.Module, build: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
    steps(model, build, torch.randn(N, 3))


@pytest.mark.parametrize("build", [two_level, adaptive], ids=["two_level", "adaptive_damping"])
@pytest.mark.parametrize(
    ("how", "layer", "why"),
    [
        ("views", "a", "8 rows for the batch of 4"),
        (
            "permuted",
            "b",
            r"moved along the batch dimension \(rows moved by indexing, slicing or concatenating\)",
        ),
        ("graph", "b", r"\(IndexAddBackward0\)"),
        ("graph_chord", "b", r"\(IndexAddBackward0\)"),
        ("flipped", "b", r"\(FlipBackward0\)"),
    ],
)
def test_rows_that_are_not_the_samples_in_order_are_refused(
    build: Callable[[nn.Module], torch.optim.Optimizer], how: str, layer: str, why: str
) -> None:
    with pytest.raises(RuntimeError, match=rf"layer '{layer}': .*{why}.*Use KFAC without them"):
        one_step(Pair(how), build)


@pytest.mark.parametrize("how", ["views", "permuted", "graph", "graph_chord", "flipped"])
def test_kfac_alone_takes_them(how: str) -> None:
    """KFAC's blocks average over the rows: no refusal."""
    one_step(Pair(how), lambda m: tk.KFAC(m, lr=0.1, fisher="empirical"))


class Tokens(nn.Module):
    """What transformers do to rows that is not a move of samples: a class token
    concatenated on the positions, a position table sliced on its rows (parameters alone),
    heads split by view and transpose of dimensions 1 and 2, tokens flattened batch-first
    for a Linear, the class token's row selected on dimension 1, full slices."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.qkv, self.mlp, self.head = (nn.Linear(3, 8), nn.Linear(8, 24),
                                                     nn.Linear(8, 8), nn.Linear(8, 2))  # fmt: skip
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.positions = nn.Parameter(torch.randn(16, 8))

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        h = torch.cat([self.cls.expand(n, -1, -1), self.embed(x)], dim=1)
        h = h + self.positions[: t + 1]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q, k, v = (z.view(n, t + 1, 2, 4).transpose(1, 2) for z in (q, k, v))
        h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t + 1, 8)
        h = h + self.mlp(h[:, :].reshape(n * (t + 1), 8)).view(n, t + 1, 8)
        return self.head(h[:, 0])


@pytest.mark.parametrize("build", [two_level, adaptive], ids=["two_level", "adaptive_damping"])
def test_what_transformers_do_is_not_refused(
    build: Callable[[nn.Module], torch.optim.Optimizer],
) -> None:
    steps(Tokens(), build, torch.randn(N, 5, 3), count=2)


def test_moved_rows_of_each_operation() -> None:
    """The operations that move rows along the first dimension, after a stop (an earlier
    layer's output), and those that do not."""
    layer = nn.Linear(3, 5)
    out = layer(torch.randn(4, 3)).view(4, 1, 5)
    stops = {out.grad_fn}
    idx = torch.tensor([1, 0, 3, 2])
    followed = "rows moved by indexing, slicing or concatenating"  # rows carried along
    moved = [
        (followed, out[idx]),
        (followed, out[idx[:2]]),  # fewer rows
        (followed, out.index_select(0, idx[:3])),
        (followed, torch.cat([out, out])),
        (followed, torch.cat([out[2:], out[:2]])),  # halves swapped
        (followed, torch.cat(out.chunk(2)[::-1])),
        (followed, out[1:]),
        (followed, torch.cat([out[-1:], out[:-1]])),
        ("FlipBackward0", out.flip(0)),
        ("RollBackward0", out.roll(1, 0)),
        ("RepeatBackward0", out.repeat(2, 1, 1)),
        ("GatherBackward0", out.gather(0, idx.view(4, 1, 1).expand(4, 1, 5))),
        (
            "ScatterAddBackward0",
            torch.zeros(4, 1, 5).scatter_add(0, idx.view(4, 1, 1).expand(4, 1, 5), out),
        ),
        ("IndexPutBackward0", torch.zeros(4, 1, 5).index_put((idx,), out)),
        # a graph's messages over E = 5 edges (not a multiple of the 4 nodes) summed into
        # the nodes: let through before 2026-12-05 (a step 0.41 off on 1.75)
        (
            "IndexAddBackward0",
            torch.zeros(4, 1, 5).index_add(0, idx[[0, 1, 2, 3, 0]], out[[1, 2, 3, 0, 2]]),
        ),
        (
            "ScatterReduceBackward0",
            torch.zeros(4, 1, 5).scatter_reduce(
                0, idx[[0, 1, 2, 3, 0]].view(5, 1, 1).expand(5, 1, 5), out[[1, 2, 3, 0, 2]], "mean"
            ),
        ),
        (
            "IndexPutBackward0",
            torch.zeros(4, 1, 5).index_put((idx[[0, 1, 2, 3, 0]],), out[[1, 2, 3, 0, 2]], True),
        ),
        ("MmBackward0", torch.eye(4)[idx] @ out.view(4, 5)),
    ]
    for name, tensor in moved:
        assert moved_rows(torch.tanh(tensor), stops, 4) == name, name
    folded = layer(torch.randn(8, 3))  # two rows per sample, moved, then one row each
    for tensor in (folded.flip(0).view(4, 10), folded.flip(0).view(4, 10)[:]):
        # a full slice takes no rows: the walk goes on through the regrouping reshape
        assert moved_rows(torch.tanh(tensor), {folded.grad_fn}, 4) == "FlipBackward0"
    assert moved_rows(torch.tanh(folded.flip(0).view(4, 10)[-9:]), {folded.grad_fn}, 4)
    assert moved_rows(torch.tanh(out.flip(0)[:3]), stops, 3) is None  # 4 rows are not a batch of 3
    kept = [
        torch.cat(out.chunk(2)),  # pieces put back in order
        torch.cat([out[:1], out[1:3], out[3:]]),
        torch.cat([out[:-2], out[-2:]]),  # negative starts
        out[torch.tensor([-4, -3, -2, -1])],  # and indices
        out.index_select(0, idx)[torch.argsort(idx)],  # a permutation put back before the layer
        out[torch.arange(4), torch.zeros(4, dtype=torch.long)],  # last-token pooling's pick
        out[:, :, idx[:2]],
        out[:],
        out[-9:],  # a start before the first row is the first row
        torch.cat([out[:1], torch.ops.aten.slice(out, 0, 1, None)]),  # an end saved as None
        torch.cat([out, out], dim=-1),
        out.index_select(2, idx[:2]),
        out.transpose(1, 2),
        out.transpose(0, 1).transpose(0, 1),  # attention's sequence-first internals
        out.permute(1, 0, 2).permute(1, 0, 2),
        torch.stack([out, out])[1],  # a stack selected again (as a packed q, k, v)
        out.flip(-1),
        out * nn.Parameter(torch.randn(8, 5))[:4].view(4, 1, 5),  # a table's rows, sliced
    ]
    for tensor in kept:
        assert moved_rows(torch.tanh(tensor), stops, 4) is None


class Sequences(nn.Module):
    """What sequence classifiers do that keeps the samples in order: an LSTM over packed
    unsorted sequences (torch sorts the batch and puts it back), the last real token's
    state picked by ``h[torch.arange(B), last]`` (Hugging Face's classifiers), attention
    with ``add_bias_kv`` (torch concatenates the bias on the sequence-first keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(7, 6), nn.Linear(6, 2)
        self.lstm = nn.LSTM(6, 6, batch_first=True)
        self.attention = nn.MultiheadAttention(6, 2, add_bias_kv=True, batch_first=True)
        self.mlp = nn.Linear(6, 6)

    def forward(self, tokens: Tensor) -> Tensor:
        lengths = torch.tensor([3, 5, 2, 4])[: len(tokens)]
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        h = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True)[0]
        h = self.mlp(h)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head(h[torch.arange(len(h)), lengths - 1])


@pytest.mark.parametrize("build", [two_level, adaptive], ids=["two_level", "adaptive_damping"])
def test_sequence_classifiers_are_not_refused(
    build: Callable[[nn.Module], torch.optim.Optimizer],
) -> None:
    """(Refused at first: the sort put back, the identity pick and the bias on a sequence of
    as many keys as samples looked like moves of the samples.)"""
    steps(Sequences(), build, torch.randint(0, 7, (N, 5)), count=2)


def test_reductions_over_tokens_keep_the_samples() -> None:
    """A reduction without ``keepdim`` drops a dimension: the samples' dimension is mapped
    past it, not onto the tokens by shape (with as many tokens as samples, pooling a flip
    over the tokens was refused, and samples moved then pooled passed)."""
    layer = nn.Linear(3, 5)
    out = layer(torch.randn(4, 4, 3))  # [B, T, D] with T == B
    stops = {out.grad_fn}
    for pooled in (out.flip(1).mean(1), out.amax(1), out.std(1), out.max(1).values):
        assert moved_rows(torch.tanh(pooled), stops, 4) is None
    for pooled in (out[torch.tensor([1, 0, 3, 2])].mean(1), out.roll(1, 0).logsumexp(1)):
        assert moved_rows(torch.tanh(pooled), stops, 4) is not None
    assert moved_rows(torch.tanh(out.topk(4, dim=0).values), stops, 4) == "TopkBackward0"


def test_moves_seen_through_rank_changes_and_not_parameters() -> None:
    """A move before an operation that changes the rank (``unfold``, ``diag_embed``, complex
    views) is seen: the samples' dimension stays first; ``addmm(b, P, h)`` mixes rows; a
    weight's transpose in a recurrent cell's ``addmm`` moves no sample (3 = 6 / 2 rows)."""
    layer = nn.Linear(3, 6)
    out = layer(torch.randn(4, 3))
    stops = {out.grad_fn}
    flipped = out.flip(0)
    for hidden in (flipped.unfold(1, 2, 1).sum(-1), torch.diag_embed(flipped).sum(-1)):
        assert moved_rows(torch.tanh(hidden), stops, 4) == "FlipBackward0"
    mixed = torch.addmm(torch.zeros(4, 6), torch.eye(4).flip(0), out)
    assert moved_rows(torch.tanh(mixed), stops, 4) == "AddmmBackward0"
    out3 = layer(torch.randn(3, 3))  # a batch of 3, and a [6, 6] weight: 6 % 3 == 0
    weight = nn.Parameter(torch.randn(6, 6))
    cell = torch.addmm(torch.zeros(3, 6), out3, weight.t())
    assert moved_rows(torch.tanh(cell), {out3.grad_fn}, 3) is None


@pytest.mark.parametrize(("samples", "tokens"), [(2, 8), (4, 8), (3, 9)])
def test_time_major_rows_are_not_proved_sample_major(samples: int, tokens: int) -> None:
    """Tokens as many as a multiple of the samples, made time-major by a transpose after a
    ``Linear`` on ``[N, T, D]``: the ``Linear``'s own reshapes were taken as a proof that
    the ``[T, N, D]`` rows are ``k`` per sample (KFAC-reduce 1.0–12.5 off, two-level
    accepted 0.13 off); a negative-dimension transpose too."""
    from twolevel_kfac.curvature.calls import sample_major
    from twolevel_kfac.curvature.forward_pass import ForwardPass

    embed, proj = nn.Embedding(7, 3), nn.Linear(3, 5)
    x = torch.randint(0, 7, (samples, tokens))
    forward = ForwardPass(None, samples, first=x)
    h = proj(embed(x))  # its input's view [N, T, 3] -> [N·T, 3] is batch-first
    for time_major in (h.transpose(0, 1), h.transpose(-3, -2) * 1, h.permute(1, 0, 2).clone()):
        assert not sample_major(time_major.reshape(tokens * samples, 5), forward)
        assert not sample_major(time_major, forward)
    assert sample_major(h.reshape(samples * tokens, 5), forward)  # batch-first: proved


def test_rows_picked_from_flattened_tokens_are_followed_to_their_samples() -> None:
    """Rows picked from tokens flattened batch-first (``[B, T, D] → [B·T, D]``) are followed
    through the reshape to their samples (``r // T``): let go before 2026-12-06 (evening),
    so an expert routed ``B`` tokens of several samples passed as one row per sample. A
    token picked per sample in order (the last real one) is its sample's row."""
    layer = nn.Linear(3, 5)
    out = layer(torch.randn(4, 2, 3))  # B = 4, T = 2
    stops, flat = {out.grad_fn}, out.reshape(8, 5)
    followed = "rows moved by indexing, slicing or concatenating"
    for idx in ([0, 1, 2, 3], [6, 4, 2, 0], [0, 2, 3, 5], [1, 0, 3, 2]):
        assert moved_rows(torch.tanh(flat[torch.tensor(idx)]), stops, 4) == followed, idx
    for idx in ([0, 2, 4, 6], [1, 3, 5, 7], [1, 2, 5, 6]):  # one token of each sample
        assert moved_rows(torch.tanh(flat[torch.tensor(idx)]), stops, 4) is None, idx
    tokens = layer(torch.randn(8, 3))  # an earlier layer on the flattened tokens (k = 2)
    picked = tokens.view(4, 2, 5)[:, 1]  # the second token of each sample
    assert moved_rows(torch.tanh(picked), {tokens.grad_fn}, 4) is None
    assert moved_rows(torch.tanh(tokens[torch.tensor([1, 3, 5, 7])]), {tokens.grad_fn}, 4) is None
    assert moved_rows(torch.tanh(tokens[torch.tensor([7, 5, 3, 1])]), {tokens.grad_fn}, 4)


class Expert(nn.Module):
    """An expert routed ``B`` of the ``B·T`` tokens: capacity equal to the batch size."""

    def __init__(self, idx: list[int] | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.expert, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.idx = None if idx is None else torch.tensor(idx)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))  # [B, T, 4]
        rows = h[:, 0] if self.idx is None else h.reshape(-1, 4)[self.idx]
        return self.head(h.mean(1) + self.expert(rows))


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_a_fisher_subset_of_rows_that_are_not_the_samples_is_refused(fisher: str) -> None:
    """``fisher_batch < 1`` under ``mc`` draws targets for the subset's samples and takes
    the same rows of every layer: an expert's tokens of other samples (their ``δ`` 0
    unless their sample was drawn) and rows permuted between layers were taken as the
    subset's samples, silently, before 2026-12-06 (evening). Under ``empirical`` every
    row has its ``δ``, and any rows are a subsample of the layer's: they pass. One token
    per sample, in order, passes."""
    x = torch.randn(N, 2, 3)

    def subset(model: nn.Module) -> torch.optim.Optimizer:
        likelihood = {"likelihood": "gaussian"} if fisher == "mc" else {}
        return tk.KFAC(model, lr=0.1, fisher=fisher, fisher_batch=0.5, **likelihood)

    for other in (Expert([6, 4, 2, 0]), Expert([0, 1, 2, 3])):
        if fisher == "empirical":
            steps(other, subset, x)
            continue
        with pytest.raises(RuntimeError, match=r"layer 'expert': .*fisher_batch=1"):
            steps(other, subset, x)
    for how, layer in (("permuted", "b"), ("flipped", "b")):
        if fisher == "empirical":
            one_step(Pair(how), subset)
            continue
        with pytest.raises(RuntimeError, match=rf"layer '{layer}': .*fisher_batch < 1"):
            one_step(Pair(how), subset)
    routed, first = Expert([0, 2, 4, 6]), Expert(None)  # the first token of each sample
    for model in (routed, first):
        torch.manual_seed(1)
        steps(model, subset, x, count=2)
    for a, b in zip(routed.parameters(), first.parameters(), strict=True):
        assert torch.equal(a, b)
    steps(Sequences(), subset, torch.randint(0, 7, (N, 5)), count=2)  # sorted, put back
