"""What a sample is when the batch is not the first argument's rows one for one: a
diffusion time step or a task code drawn once for the whole batch, and a batch of graphs
pooled to one output row per graph. Both took silently wrong KFAC steps (trials: 3.8 off
a step of 3.94; the empirical Fisher ``N/G`` and the MC Fisher ``G/N`` times the
per-graph one); both are refused by name now, and the calls the messages advise are the
exact steps of a hand-written KFAC block."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk

B = 6


def sinusoid(t: Tensor, dim: int = 4) -> Tensor:
    freqs = torch.exp(-math.log(100.0) * torch.arange(dim // 2, dtype=torch.float64) / dim)
    angles = t.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimeConditioned(nn.Module):
    """A denoiser's time MLP: ``emb(sinusoid(t))`` added to every sample's features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.time, self.head = nn.Linear(3, 5), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x) + self.time(sinusoid(t))))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC])
def test_one_time_step_for_the_batch_is_refused(fisher: str, cls: type) -> None:
    model = TimeConditioned().double()
    opt = cls(model, fisher=fisher, likelihood="gaussian")
    x = torch.randn(B, 3, dtype=torch.float64)
    with pytest.raises(
        RuntimeError, match=r"layer 'time'.*\(1, 4\) shared by the batch of 6.*t\.expand\(B\)"
    ):
        model(x, torch.tensor([3]))
    opt.zero_grad()  # the advised call: one row per sample
    F.mse_loss(model(x, torch.tensor([3]).expand(B)), torch.randn(B, 3).double()).backward()
    opt.step()


class FourierTime(TimeConditioned):
    """Learned Fourier features of the time step, ``sin(t·W)`` and ``cos(t·W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.freqs = nn.Parameter(torch.randn(2))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        angles = t.double()[:, None] * self.freqs[None]
        features = torch.cat([angles.sin(), angles.cos()], dim=1)
        return self.head(torch.tanh(self.body(x) + self.time(features)))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_one_time_step_through_learned_fourier_features_is_refused(fisher: str) -> None:
    """``sin(t·W)`` of one ``t`` for the batch is rows shared by it (a step 0.75 off the
    ``t.expand(B)`` one passed before); expanded first, it passes."""
    model = FourierTime().double()
    opt = tk.KFAC(model, fisher=fisher, likelihood="gaussian")
    x = torch.randn(B, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"layer 'time'.*\(1, 4\) shared by the batch"):
        model(x, torch.tensor([3]))
    opt.zero_grad()
    F.mse_loss(model(x, torch.tensor([3]).expand(B)), torch.randn(B, 3).double()).backward()
    opt.step()
    assert opt.preconditioner.factors["time"].ready


class Routed(nn.Module):
    """Two encoders, each on the raw rows of the samples of its kind (a modality)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(3, 5), nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor, kind: Tensor) -> Tensor:
        h = torch.zeros(len(x), 5, dtype=x.dtype)
        h = h.index_put((kind == 0,), self.a(x[kind == 0])).index_put(
            (kind == 1,), self.b(x[kind == 1])
        )
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_one_samples_own_row_routed_to_a_layer_is_not_refused(fisher: str) -> None:
    """A batch where one sample alone is of a kind gives its encoder one row of data: a
    row of the first argument, that sample's, not a row shared by the batch (refused as
    one on 2026-12-05)."""
    model = Routed().double()
    opt = tk.KFAC(model, fisher=fisher)
    x = torch.randn(B, 3, dtype=torch.float64)
    opt.zero_grad()
    F.cross_entropy(
        model(x, torch.tensor([0, 1, 1, 1, 1, 1])), torch.zeros(B, dtype=torch.long)
    ).backward()
    opt.step()
    assert opt.preconditioner.factors["a"].ready


def test_one_time_step_expanded_takes_the_per_sample_kfac_step() -> None:
    """The expanded time rows are the samples': the ``time`` block is ``A ⊗ G`` of its
    ``B`` rows, written by hand here (empirical Fisher, per-factor damping)."""
    model = TimeConditioned().double()
    lam = 0.1
    opt = tk.KFAC(model, lr=1.0, momentum=0.0, damping=lam, fisher="empirical", kl_clip=None,
                  ema_decay=0.0, cov_interval=1, inv_interval=1)  # fmt: skip
    x, y = torch.randn(B, 3, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64)
    t = torch.tensor([3]).expand(B)
    a = torch.cat([sinusoid(t), torch.ones(B, 1, dtype=torch.float64)], dim=1)
    seen: list[Tensor] = []

    def keep(module: nn.Module, inputs: object, output: Tensor) -> None:
        output.register_hook(seen.append)

    handle = model.time.register_forward_hook(keep)
    opt.zero_grad()
    F.mse_loss(model(x, t), y).backward()
    handle.remove()
    grad = torch.cat([model.time.weight.grad, model.time.bias.grad[:, None]], dim=1).clone()
    delta = B * seen[0]
    before = torch.cat([model.time.weight, model.time.bias[:, None]], dim=1).detach().clone()
    opt.step()
    after = torch.cat([model.time.weight, model.time.bias[:, None]], dim=1).detach()
    eye = torch.eye(5, dtype=torch.float64)  # per-factor damping: (A + λI) ⊗ (G + λI)
    damped_a, damped_g = a.T @ a / B + lam * eye, delta.T @ delta / B + lam * eye
    expected = torch.linalg.solve(damped_g, grad) @ torch.linalg.inv(damped_a)
    torch.testing.assert_close(before - after, expected, rtol=1e-10, atol=1e-12)


class GraphLevel(nn.Module):
    """Node layers, a mean over each graph's nodes, a head per graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.node, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor, graph: Tensor, graphs: int) -> Tensor:
        h = torch.tanh(self.node(x))
        pooled = torch.zeros(graphs, 4, dtype=h.dtype).index_add(0, graph, h)
        return self.head(pooled / torch.bincount(graph, minlength=graphs)[:, None])


class GraphsFirst(GraphLevel):
    """The README's way: a tensor with one row per graph comes first."""

    def forward(self, graph_ids: Tensor, x: Tensor, graph: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, graph, len(graph_ids))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_batch_of_graphs_pooled_per_graph_is_refused_with_nodes_first(fisher: str) -> None:
    x, graph = torch.randn(10, 3, dtype=torch.float64), torch.tensor([0] * 4 + [1] * 3 + [2] * 3)
    model = GraphLevel().double()
    opt = tk.KFAC(model, fisher=fisher)
    with pytest.raises(
        RuntimeError,
        match=r"rows pool the 10 rows of its first tensor.*IndexAddBackward0 into 3 rows.*one "
        "row per graph first",
    ):
        model(x, graph, 3)
    first = GraphsFirst().double()
    opt = tk.KFAC(first, fisher=fisher)
    opt.zero_grad()
    F.cross_entropy(first(torch.arange(3), x, graph), torch.tensor([0, 1, 1])).backward()
    opt.step()
    assert opt.preconditioner.factors["head"].ready
    opt.zero_grad()  # one graph: its one row first, its nodes after (not model(code, x))
    one = torch.zeros(4, dtype=torch.long)
    F.cross_entropy(first(torch.arange(1), x[:4], one), torch.tensor([1])).backward()
    opt.step()


@dataclasses.dataclass
class _Batch:
    x: Tensor


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_task_code_passed_before_the_batch_is_refused(fisher: str) -> None:
    """``model(code, x)``, a code ``[1, D]`` drawn for the batch and put through a layer:
    the batch was taken as one sample, so the code's layer passed the shared-row check
    (the MC step 0.91 off the batch-first one). Refused, with the batch in a dict too;
    ``model(x, code)`` refuses the code's layer by name, and the code expanded to the batch
    trains."""

    class Coded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.code, self.a, self.b = nn.Linear(2, 4), nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, code: Tensor, x: Tensor) -> Tensor:
            return self.b(torch.tanh(self.a(x) * self.code(code)))

    model = Coded().double()
    opt = tk.KFAC(model, fisher=fisher, fisher_batch=1)
    x, code = torch.randn(8, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"first tensor argument has one row, but another has 8"):
        model(code, x)
    with pytest.raises(
        RuntimeError, match=r"layer 'code' was called on an input of shape \(1, 2\)"
    ):
        model.forward = lambda x, code: Coded.forward(model, code, x)  # type: ignore[method-assign]
        model(x, code)
    model.forward = lambda code, batch: Coded.forward(model, code, batch["x"])  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"first tensor argument has one row, but another has 8"):
        model(code, {"x": x})  # (the batch inside a dict)
    model.forward = lambda code, batch: Coded.forward(model, code, batch.x)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"first tensor argument has one row, but another has 8"):
        model(code, _Batch(x))  # (inside a dataclass: stepped 2.2 off, 2026-12-10's review)
    del model.forward
    F.cross_entropy(model(code.expand(8, -1), x), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()
    assert opt.preconditioner.factors["code"].ready


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_one_sequence_with_a_mask_of_its_positions_is_not_refused(fisher: str) -> None:
    """A batch of one sequence ``[1, T, D]`` beside a ``[T, T]`` attention mask (or a
    recurrent state ``[L, 1, H]``), the logits flattened to ``[T, V]`` after the head: the
    layers see the one sample's row, so the first argument is the batch (refused before
    the check read the layers' rows)."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: Tensor, mask: Tensor) -> Tensor:
            h = torch.tanh(self.mix(x))  # [1, T, 4]
            h = torch.softmax(h @ h.transpose(1, 2) + mask, -1) @ h
            return self.head(h).reshape(-1, 3)  # [T, 3]

    model = Masked().double()
    opt = tk.KFAC(model, fisher=fisher, class_dim=-1)
    x, mask = torch.randn(1, 6, 4, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64)
    F.cross_entropy(model(x, mask), torch.zeros(6, dtype=torch.long)).backward()
    opt.step()
    assert opt.preconditioner.factors["head"].ready


def test_a_graph_level_tuple_output_is_refused_too() -> None:
    """The check walks every output tensor: ``(logits, embedding)`` of a graph-level model
    with its nodes first took the nodes as samples (a head step 0.46 off the graphs-first
    one in a trial)."""

    class WithEmbedding(GraphLevel):
        def forward(self, x: Tensor, graph: Tensor, graphs: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
            return super().forward(x, graph, graphs), x

    x, graph = torch.randn(10, 3, dtype=torch.float64), torch.tensor([0] * 4 + [1] * 3 + [2] * 3)
    model = WithEmbedding().double()
    opt = tk.KFAC(model, fisher="empirical")
    with pytest.raises(RuntimeError, match=r"IndexAddBackward0 into 3 rows"):
        model(x, graph, 3)
    assert opt.preconditioner.steps == 0


V, D, T = 5, 6, 4
MASK = torch.zeros(B, T, dtype=torch.bool)
MASK[:, 1] = True
MASK[::2, 3] = True  # 9 masked positions of a batch of 6


class MaskedLM(nn.Module):
    """A masked-LM head on every position, or on rows taken from them (``h[mask]``)."""

    def __init__(self, form: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head, self.form = nn.Embedding(V + 1, D), nn.Linear(D, V), form

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.emb(x))
        return self.head(h if self.form is None else self.form(h))


def mean_head_block(gathered: bool, steps: int = 300) -> Tensor:
    """The head's block ``T·(A ⊗ G)`` averaged over ``steps`` MC draws (no step taken)."""
    model = MaskedLM(lambda h: h[MASK] if gathered else h).double()
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    dense = {} if gathered else {"class_dim": -1}
    opt = tk.KFAC(model, lr=1e-300, ema_decay=0.0, loss_reduction="mean", **dense)
    total = torch.zeros(D * V + V, D * V + V, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        opt.set_loss_mask(None if gathered else MASK)
        out = model(x)
        F.cross_entropy(out if gathered else out[MASK], x[MASK]).backward()
        opt.step()
        f = opt.preconditioner.factors["head"]
        assert f.A is not None and f.G is not None
        total += f.num_locations * torch.kron(f.A, f.G) / steps
    return total


def test_a_head_on_the_masked_positions_alone_has_the_dense_heads_mc_fisher() -> None:
    """A masked-LM head on ``h[mask]`` (``M = 9`` rows for 6 samples) is not refused, and
    under ``loss_reduction="mean"`` its MC block is the dense head's with the loss mask, in
    expectation: the mean's scale counts the ``M`` rows (``N/N_tok``). It took the ``M``
    rows for the samples before, a block ``(M/N)² = 2.25`` times too large (measured 2.24;
    a refusal on 2026-12-05 stopped such heads, time-major outputs and ``PackedSequence``
    heads altogether)."""
    dense, gathered = mean_head_block(False), mean_head_block(True)
    assert float(gathered.trace() / dense.trace()) == pytest.approx(1.0, abs=0.1)
    assert float((gathered - dense).norm() / dense.norm()) < 0.3


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("form", ["time_major", "masked", "packed"])
def test_outputs_of_rows_taken_from_the_samples_are_not_refused(fisher: str, form: str) -> None:
    """Rows taken one for one from the samples' pass under either Fisher (they were
    refused on 2026-12-05 as the rows of a graph-level model): a time-major ``[T, N, …]``
    (CTC's layout), the real tokens ``h[mask]``, a ``PackedSequence``'s rows."""
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    lengths = [4, 4, 3, 2, 2, 1]
    forms: dict[str, Callable[[Tensor], Tensor]] = {
        "time_major": lambda h: h.transpose(0, 1),
        "masked": lambda h: h[MASK],
        "packed": lambda h: nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=True).data,
    }
    model = MaskedLM(forms[form]).double()
    opt = tk.KFAC(model, fisher=fisher, class_dim=-1 if form == "time_major" else None)
    opt.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(x)
        targets = torch.randint(0, V, out.shape[:-1]).reshape(-1)
        F.cross_entropy(out.reshape(-1, V), targets).backward()
        opt.step()
    assert opt.preconditioner.factors["head"].ready
    # a time-major head's rows are read as gathered rows, not samples: said since 2026-12-08
    said = [str(w.message) for w in caught if "second dimension is the batch" in str(w.message)]
    assert len(said) == (form == "time_major")


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_gathered_rows_of_one_sample_have_the_block_of_that_sample_twice(fisher: str) -> None:
    """A head on the masked positions of a forward of one sample ``[x]`` has the block of
    the batch ``[x, x]`` (the same sample twice: the same Fisher). It kept the ``M`` rows as
    ``M`` samples there, a block ``1/M`` of that (a last batch of one, micro-batches of
    one); and a gathered output of ``k·N`` rows had dead positions where one of other
    rows had none (the trunk's block 0.35 apart between 8 and 7 masked positions)."""
    x = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([[True, False, True, True]])

    def block(copies: int) -> Tensor:
        model = MaskedLM(lambda h: h[keep.expand(copies, -1)]).double()
        opt = tk.KFAC(model, fisher=fisher, lr=1e-300, ema_decay=0.0, loss_reduction="mean")
        total = torch.zeros(D * V + V, D * V + V, dtype=torch.float64)
        draws = 200 if fisher == "mc" else 1
        for _ in range(draws):
            opt.zero_grad()
            out = model(x.expand(copies, -1))
            F.cross_entropy(out, x.expand(copies, -1)[keep.expand(copies, -1)]).backward()
            opt.step()
            f = opt.preconditioner.factors["head"]
            assert f.A is not None and f.G is not None
            total += f.num_locations * torch.kron(f.A, f.G) / draws
        return total

    one, two = block(1), block(2)
    tolerance = 0.15 if fisher == "mc" else 1e-12
    assert float(one.trace() / two.trace()) == pytest.approx(1.0, abs=tolerance)


def test_a_batch_of_one_with_tokens_flattened_first_is_not_refused_under_empirical() -> None:
    """``x.reshape(-1, D)`` at the start of ``forward``: a batch of one's rows are proved
    ``T`` per sample (a view of the first argument), as a batch of two's; it was refused
    ("pass the batch first": a last micro-batch of one)."""

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 5)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.tanh(self.a(x.reshape(-1, 4))))

    model = Flat().double()
    opt = tk.KFAC(model, fisher="empirical")
    x, y = torch.randn(1, 3, 4, dtype=torch.float64), torch.randint(0, 5, (1, 3))
    F.cross_entropy(model(x), y.flatten()).backward()
    opt.step()
    assert opt.preconditioner.factors["a"].num_locations == 3


class MeanPooled(nn.Module):
    """One graph's readout: the nodes' mean (``global_mean_pool(x, batch=None)``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.node, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.node(x)).mean(0, keepdim=True))


class Dispatched(nn.Module):
    """Tokens dispatched into an expert's capacity slots (``index_put(accumulate=True)``,
    fewer slots than tokens), a head on the masked tokens, and the expert load beside."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.expert, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.emb(x)).flatten(0, 1)  # [B·T, 4]
        slots = torch.arange(len(h)) % 5
        buffer = torch.zeros(5, 4, dtype=h.dtype).index_put((slots,), h, accumulate=True)
        h = h + self.expert(buffer)[slots]
        load = torch.zeros(5, dtype=h.dtype).scatter_add(0, slots, h.sum(1))
        return self.head(h[torch.arange(len(h)) % 3 == 0]), load


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_mean_over_the_batch_is_a_pool_and_a_dispatch_is_not(fisher: str) -> None:
    """``h.mean(0)`` of the nodes is a pool of the samples (it passed since the check
    looked at summing operations alone); an expert's capacity slots (fewer than the
    tokens) and its load beside the logits are not pools (refused at some batches)."""
    pooled = MeanPooled().double()
    opt = tk.KFAC(pooled, fisher=fisher)
    with pytest.raises(RuntimeError, match=r"MeanBackward1 into 1 rows"):
        pooled(torch.randn(10, 3, dtype=torch.float64))
    model = Dispatched().double()
    opt = tk.KFAC(model, fisher="empirical")
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    logits, load = model(x)
    (F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long)) + load.sum()).backward()
    opt.step()
    assert opt.preconditioner.factors["expert"].ready


def test_a_model_returning_a_sum_over_its_samples_is_not_judged() -> None:
    """A 0-dim output (an energy or a loss summed in ``forward``) has no rows to judge: it
    passes as before 2026-12-05 (the pool check raised an ``IndexError`` on it) under the
    empirical Fisher, and is refused under MC, which would draw a Gaussian target for the
    loss itself (it did); one sample's 0-dim prediction is drawn from."""

    class Summed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.tanh(self.a(x))).sum()

    model = Summed().double()
    opt = tk.KFAC(model, fisher="empirical")
    model(torch.randn(6, 3, dtype=torch.float64)).backward()
    opt.step()
    assert opt.preconditioner.factors["a"].ready
    mc = tk.KFAC(model, fisher="mc", likelihood="gaussian", fisher_batch=1)
    with pytest.raises(ValueError, match=r"0-dim tensor for a batch of 6 samples \(its loss\?\)"):
        model(torch.randn(6, 3, dtype=torch.float64))
    model(torch.randn(1, 3, dtype=torch.float64)).backward()
    mc.step()
    assert mc.preconditioner.factors["a"].ready


class SplitPooled(nn.Module):
    """Graphs of equal size pooled by a reshape (``h.view(G, n, D).mean(1)``), or each
    graph's nodes picked and summed in a loop (``torch.stack([h[graph == g].sum(0) …])``)."""

    def __init__(self, loop: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.loop = loop
        self.node, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor, graph: Tensor) -> Tensor:
        h = torch.tanh(self.node(x))
        if self.loop:
            return self.head(torch.stack([h[graph == g].sum(0) for g in range(2)]))
        return self.head(h.view(2, -1, 4).mean(1))


@pytest.mark.parametrize(("loop", "node"), [(False, "MeanBackward1"), (True, "SumBackward1")])
def test_graphs_pooled_by_a_reshape_or_a_loop_are_refused_with_nodes_first(
    loop: bool, node: str
) -> None:
    """Before 2026-12-10 these pools passed: the 6 nodes taken as the samples of 2 graphs'
    losses, silently (a sweep)."""
    model = SplitPooled(loop).double()
    opt = tk.KFAC(model, fisher="empirical")
    x, graph = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(RuntimeError, match=rf"rows pool the 6 rows .*\({node} into"):
        model(x, graph)
    time_major = nn.Linear(3, 2).double()  # (a reshape without a reduction: not a pool)
    opt = tk.KFAC(time_major, fisher="empirical")
    F.cross_entropy(time_major(x).view(3, 2, 2).flatten(0, 1), graph).backward()
    opt.step()
    assert all(f.ready for f in opt.preconditioner.factors.values())
