"""A layer input computed from parameters alone is the same for every sample: the walk of
``curvature/batch_independent.py`` proves it, and a ``Linear`` called on it is refused (a
Perceiver's ``to_q(norm(latents))`` took steps 0.32 apart from the batched call's 0.14)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from twolevel_kfac.curvature.batch_independent import shared_rows

torch.manual_seed(0)
LATENTS = nn.Parameter(torch.randn(3, 4))
DATA = torch.randn(8, 3, 4)
NORM, RMS = nn.LayerNorm(4), nn.RMSNorm(4)
PROMPTS = nn.Parameter(torch.randn(3, 2, 4))

PROVED: dict[str, Callable[[], Tensor]] = {
    "layer norm": lambda: NORM(LATENTS),
    "layer norm without bias": lambda: nn.LayerNorm(4, bias=False)(LATENTS),
    "layer norm without affine": lambda: nn.LayerNorm(4, elementwise_affine=False)(LATENTS),
    "rms norm": lambda: RMS(LATENTS),
    "numbers": lambda: (LATENTS * 2 + 1).tanh() / 3,
    "dropout": lambda: F.dropout(LATENTS, 0.1),
    "slices and cat": lambda: torch.cat([LATENTS[:1], LATENTS[1:].t().t()]),
    "a batch statistic": lambda: LATENTS + DATA.mean(0),
    "one looked-up prompt": lambda: PROMPTS[torch.tensor([1])],
    "as many latents as samples": lambda: NORM(nn.Parameter(torch.randn(8, 4))),
}
NOT_PROVED: dict[str, Callable[[], Tensor]] = {
    "the data": lambda: NORM(DATA),
    "expanded to the batch": lambda: NORM(LATENTS.expand(8, 3, 4)),
    "times the data": lambda: LATENTS * DATA,
    "plus the data": lambda: LATENTS + DATA,
    "an input with a gradient": lambda: DATA.clone().requires_grad_() * 2,
    "a leaf": lambda: LATENTS.detach(),
    "an embedding": lambda: nn.Embedding(5, 4)(torch.tensor([0, 1, 2])),
    "a prompt per sample": lambda: PROMPTS[torch.arange(8) % 3],
    "a perturbation beside the data": lambda: DATA + nn.Parameter(torch.randn(8, 3, 4)),
}


@pytest.mark.parametrize("case", list(PROVED))
def test_computed_from_parameters_alone_is_proved(case: str) -> None:
    assert shared_rows(PROVED[case](), set(), batch=8)


@pytest.mark.parametrize("case", list(NOT_PROVED))
def test_what_may_hold_samples_is_not(case: str) -> None:
    assert not shared_rows(NOT_PROVED[case](), set(), batch=8)


def test_the_walk_stops_at_a_layer_output_already_passed() -> None:
    """A node of ``stop`` (a layer output whose input held samples) ends the walk: a deep
    network's layers do not each walk back to its first."""
    inner = NORM(LATENTS)
    assert not shared_rows(inner.tanh(), {inner.grad_fn}, batch=8)


class _Perceiver(nn.Module):
    """Learned latents normalised, projected by ``to_q`` and attending over the input:
    ``computed`` normalises the ``[L, D]`` latents and broadcasts the projection, ``batched``
    expands the latents to the batch first (the same forward)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.latents = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.norm = nn.LayerNorm(4, dtype=torch.float64)
        self.to_q = nn.Linear(4, 4, dtype=torch.float64)
        self.head = nn.Linear(4, 3, dtype=torch.float64)
        self.form = form

    def forward(self, x: Tensor) -> Tensor:
        n = len(x)
        latents = self.latents.expand(n, 3, 4) if self.form == "batched" else self.latents
        q = self.to_q(self.norm(latents)).expand(n, 3, 4)
        return self.head(torch.softmax(q @ x.transpose(1, 2), -1) @ x).mean(1)


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_a_layer_on_computed_latents_is_refused(fisher: str) -> None:
    """``to_q(norm(latents))`` is refused by name at the first captured forward, with the
    fix; the latents expanded to the batch before the norm train, and match the forward."""
    x, y = torch.randn(8, 5, 4, dtype=torch.float64), torch.arange(8) % 3
    computed, batched = _Perceiver("computed"), _Perceiver("batched")
    torch.testing.assert_close(computed(x), batched(x), rtol=0, atol=1e-14)
    opt = tk.KFAC(computed, fisher=fisher)
    with pytest.raises(RuntimeError, match=r"'to_q'.*computed from parameters alone"):
        F.cross_entropy(computed(x), y).backward()
    opt = tk.KFAC(batched, fisher=fisher)
    before = batched.to_q.weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(batched(x), y).backward()
    opt.step()
    assert not torch.equal(batched.to_q.weight, before)


class _PerSample(nn.Module):
    """Layers whose inputs hold a row per sample: ``a(x + delta)`` (a perturbation
    ``[B, T, F]`` held as a parameter), ``a(tanh(codes))`` (per-sample codes ``[B, D]``
    passed as a tensor with ``requires_grad``), an expert ``Linear → GELU → Linear`` routed
    one token; and shared ones: the same codes as an ``nn.Parameter`` (which cannot be told
    from latents), a prompt or an embedding's task code looked up for the whole batch; and
    calls on parts of the batch: the loop ``a(h[[i]])``, two chunks of 4; an expert called
    once per routing slot on more tokens than samples; a layer called again on its own
    gathered rows, ``r + a(r)``, which the graph cannot tell from routing slots."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.form = form
        self.delta = nn.Parameter(0.1 * torch.randn(8, 3, 4, dtype=torch.float64))
        codes = torch.randn(8, 4, dtype=torch.float64)
        self.codes = nn.Parameter(codes) if form == "parameter codes" else codes.requires_grad_()
        self.prompts = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.task = nn.Embedding(3, 4, dtype=torch.float64)
        self.a = nn.Linear(4, 4, dtype=torch.float64)
        self.e = nn.Sequential(
            nn.Linear(4, 6, dtype=torch.float64), nn.GELU(), nn.Linear(6, 4, dtype=torch.float64)
        )
        self.head = nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        if self.form == "perturbation":
            return self.head(self.a(x + self.delta).tanh()).mean(1)
        if self.form in ("codes", "parameter codes"):
            return self.head(self.a(torch.tanh(self.codes)) + x.mean(1))
        if self.form == "prompt":
            return self.head(self.a(self.prompts[torch.tensor([1])]) + x.mean(1))
        if self.form == "task code":  # one row of an embedding for the whole batch
            return self.head(self.task(torch.tensor([1])) + x.mean(1))
        if self.form == "recurrence":  # a layer called again on its own rows: r + a(r)
            rows = x.reshape(-1, 4)[torch.arange(0, 24, 2)]  # 12 tokens gathered
            for _ in range(2):
                rows = rows + torch.tanh(self.a(rows))
            return self.head(rows.view(4, 3, 4).mean(1).repeat(2, 1))
        if self.form == "slots":  # an expert called once per routing slot, on 12 tokens each
            flat, out = x.reshape(-1, 4), x.reshape(-1, 4).clone()
            for idx in torch.arange(24).view(2, 12).flip(1):  # (slot k's tokens)
                out = out.index_add(0, idx, self.a(flat[idx]))
            return self.head(out.view(8, 3, 4).mean(1))
        h = self.a(x.mean(1))
        if self.form == "loop":
            return self.head(torch.cat([self.a(h[[i]]) for i in range(len(h))]))
        if self.form == "chunks":
            return self.head(torch.cat([self.a(h[i : i + 4]) for i in (0, 4)]))
        idx = torch.tensor([5])
        return self.head(h.index_add(0, idx, self.e(h[idx])))


@pytest.mark.parametrize(
    ("form", "refused"),
    [
        ("perturbation", None),
        ("codes", None),
        ("expert", None),
        ("parameter codes", "computed from parameters alone"),
        ("prompt", "looked-up prompt"),
        ("loop", "on parts of the batch"),
        ("chunks", "on parts of the batch"),
        ("slots", "or rows gathered from it"),
        ("recurrence", "or rows gathered from it"),
        ("task code", "not one row per sample"),
    ],
)
def test_rows_of_their_own_sample_train_and_shared_ones_are_refused(
    form: str, refused: str | None
) -> None:
    """Rows each sample's own train (an expert routed one token was refused, and crashed
    runs at random); shared rows are refused by name, also where they are looked up by a
    tensor index or an embedding (the task code: 0.58 off a step of 0.50); so are calls on
    parts of the batch (chunks of 4 of 8: 0.54 off a step of 1.34) or on rows gathered
    from it (an expert's two routing slots of 12 tokens each, taken for two locations of 12
    samples before 2026-12-06 (day): EKFAC 49 % off, KFAC 21 %)."""
    x, y = torch.randn(8, 3, 4, dtype=torch.float64), torch.arange(8) % 3
    model = _PerSample(form)
    opt = tk.KFAC(model, fisher="empirical")
    if refused is not None:
        with pytest.raises(RuntimeError, match=refused):
            F.cross_entropy(model(x), y)
        return
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _TimeMajorCell(nn.Module):
    """A recurrent cell looped over ``x[t]`` of a time-major ``x`` ``[T, B, D]``."""

    def __init__(self) -> None:
        super().__init__()
        self.i, self.o = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[1], 5)
        for t in range(len(x)):
            h = torch.tanh(self.i(x[t]) + h)
        return self.o(h)


@pytest.mark.parametrize("steps", [3, 6])
def test_a_time_major_loop_is_told_to_pass_the_batch_first(steps: int) -> None:
    """A cell looped over a time-major input's steps is refused (its first dimension is
    taken for the batch) and, since 2026-12-12, told to pass the input batch-first: the
    refusal named chunks, experts and finished samples only, none of which it was."""
    model = _TimeMajorCell()
    opt = tk.KFAC(model, fisher="empirical")  # noqa: F841 (kept: its hooks)
    with pytest.raises(RuntimeError, match=r"loop over x\[t\] of x \[T, B, \.\.\.\]"):
        model(torch.randn(steps, 4, 3))
    chunked = _PerSample("chunks")
    held = tk.KFAC(chunked, fisher="empirical")  # noqa: F841 (kept: its hooks)
    with pytest.raises(RuntimeError, match="on parts of the batch") as chunks:
        chunked(torch.randn(8, 3, 4, dtype=torch.float64))
    assert "x[t]" not in str(chunks.value)  # (chunks of a batch: no such hint)
