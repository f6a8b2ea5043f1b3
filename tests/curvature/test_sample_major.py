"""A ``Linear`` on ``[K, B, …]`` whose second dimension is the batch (sample dimensions
first, time-major sequences): KFAC reads the first dimension as rows; warned of."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import step_change

N, D, C = 5, 4, 3
EXACT = {"lr": 1.0, "fisher": "empirical", "cov_interval": 1, "inv_interval": 1,
         "ema_decay": 0.0, "kl_clip": None, "momentum": 0.0, "damping": 0.1}  # fmt: skip


class TimeMajor(nn.Module):
    """Two ``Linear`` layers on ``[T, N, D]`` (``time_major``) or ``[N, T, D]``."""

    def __init__(self, time_major: bool) -> None:
        super().__init__()
        self.time_major = time_major
        self.l1, self.l2 = nn.Linear(D, 6), nn.Linear(6, C)

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(0, 1) if self.time_major else x
        out = self.l2(torch.tanh(self.l1(h)))
        return out.transpose(0, 1) if self.time_major else out


def _step(time_major: bool, length: int) -> tuple[Tensor, list[str]]:
    torch.manual_seed(0)
    model = TimeMajor(time_major).double()
    opt = tk.KFAC(model, class_dim=-1, loss_reduction="mean", **EXACT)
    x = torch.randn(N, length, D, dtype=torch.float64)
    y = torch.randint(0, C, (N, length))
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
    pairs = zip(model.parameters(), before, strict=True)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in pairs])
    return moved, [str(w.message) for w in caught if "second dimension" in str(w.message)]


@pytest.mark.parametrize("length", [3, N, 2 * N])
def test_a_time_major_linear_is_warned_of(length: int) -> None:
    """The same map on ``[T, N, D]`` stepped 0.34 off the batch-first one here (an IWAE
    decoder on ``q.rsample((K,))``: 0.21–0.54 off in a trial), silently. Warned of once
    per layer now. At ``T = N`` (the layout not told by the sizes) and ``T = 2N`` (a
    multiple of the batch, as Swin's windows are) it passed unwarned before 2026-12-10
    (0.56–0.77 off in a trial): the first dimension is followed back to the data now."""
    time_major, said = _step(True, length)
    batch_first, quiet = _step(False, length)
    assert quiet == []
    assert len(said) == 2 and "layer 'l1'" in said[0] and "z.transpose(0, 1)" in said[0]
    gap = float((time_major - batch_first).norm() / batch_first.norm())
    assert gap > 0.1 or length == N  # (the rows are not the samples; at T = N KFAC's
    # expand view gives the same factors, two-level KFAC does not: 0.13–0.42 in a trial)


class FlattenedTimeMajor(nn.Module):
    """A head on ``[T, N, d]`` flattened, its rows time-major, made from ``[N, T, d]`` by
    ``kind``: an op behind a transpose (``tanh(h.transpose(0, 1))``), a buffer filled in a
    loop (``buf[t] = tanh(h[:, t])``) or ``F.grid_sample`` with a grid that transposes;
    ``gathered`` picks the rows by an index (rows any proof refuses)."""

    def __init__(self, gathered: bool, kind: str = "op") -> None:
        super().__init__()
        self.gathered, self.kind = gathered, kind
        self.l1, self.l2 = nn.Linear(D, 6), nn.Linear(6, C)

    def forward(self, x: Tensor) -> Tensor:
        length, h = x.shape[1], self.l1(x)
        rows = _time_major(h, self.kind).reshape(length * N, 6)
        if self.gathered:
            rows = rows[torch.arange(length * N)]
        return self.l2(rows).view(length, N, C).transpose(0, 1)


def _time_major(h: Tensor, kind: str) -> Tensor:
    """``tanh`` of ``h`` (``[N, T, d]``) as ``[T, N, d]``, made as ``kind`` says."""
    length = h.shape[1]
    if kind == "buffer":
        buffer = h.new_zeros(length, N, h.shape[2])
        for t in range(length):
            buffer[t] = torch.tanh(h[:, t])
        return buffer
    if kind == "rows":  # (rows[t·N:(t + 1)·N] = …: time-major rows written in slices)
        rows = h.new_zeros(length * N, h.shape[2])
        for t in range(length):
            rows[t * N : (t + 1) * N] = torch.tanh(h[:, t])
        return rows.view(length, N, -1)
    if kind == "merged":  # (buf[t] = … into [T, N·d]: the batch merged with the features)
        merged = h.new_zeros(length, N * h.shape[2])
        for t in range(length):
            merged[t] = torch.tanh(h[:, t]).reshape(-1)
        return merged.view(length, N, -1)
    if kind == "stacked":  # (torch.stack of merged [N·d] steps: the batch inside each)
        steps = [torch.tanh(h[:, t]).reshape(-1) for t in range(length)]
        return torch.stack(steps).view(length, N, -1)
    if kind in ("slices", "halves"):  # (buf[t:t+1] = …[None]; a bidirectional RNN's halves)
        buffer, half = h.new_zeros(length, N, h.shape[2]), h.shape[2] // 2
        for t in range(length):
            if kind == "slices":
                buffer[t : t + 1] = torch.tanh(h[:, t])[None]
            else:
                buffer[t, :, :half] = torch.tanh(h[:, t, :half])
                buffer[t, :, half:] = torch.sigmoid(h[:, length - 1 - t, half:])
        return buffer
    if kind == "grid":  # ([1, d, N, T] sampled at its transposed grid: [1, d, T, N])
        rows, cols = torch.meshgrid(
            torch.linspace(-1, 1, N), torch.linspace(-1, 1, length), indexing="ij"
        )
        grid = torch.stack([cols, rows], -1).transpose(0, 1)[None].to(h)
        moved = F.grid_sample(h.permute(2, 0, 1)[None], grid, align_corners=True)
        return torch.tanh(moved[0].permute(1, 2, 0))
    return torch.tanh(h.transpose(0, 1))


def _flattened_step(optimizer: type[tk.KFAC], gathered: bool, kind: str = "op") -> Tensor:
    torch.manual_seed(0)
    model = FlattenedTimeMajor(gathered, kind).double()
    opt = optimizer(model, class_dim=-1, loss_reduction="mean", **EXACT)
    x = torch.randn(N, N, D, dtype=torch.float64)  # T = N
    y = torch.randint(0, C, (N, N))
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    opt.step()
    pairs = zip(model.parameters(), before, strict=True)
    return torch.cat([(p.detach() - b).flatten() for p, b in pairs])


@pytest.mark.parametrize(
    "kind", ["op", "buffer", "slices", "halves", "rows", "merged", "stacked", "grid"]
)
def test_a_time_major_flatten_is_not_regrouped_at_t_equal_n(kind: str) -> None:
    """At ``T = N`` the flattened ``[T·N, d]`` has a first dimension of ``N`` entries before
    the reshape: its rows were regrouped as ``T`` locations of each sample (1.7–3.0 off in
    a review, silently; two-level KFAC took them as samples). Its first dimension is
    followed back to the transpose now (2026-12-10): the rows are gathered rows, as at
    ``T ≠ N``, and two-level KFAC refuses them. A buffer filled in place and ``grid_sample``
    were still regrouped (4.5–5.0 off a step in a review): the shapes do not tell which
    dimension ``buf[t] = …`` picks (its backward does), and ``grid_sample`` resamples its
    spatial dimensions; followed and refused since 2026-12-11 (a review of the first
    version found ``buf[t:t + 1] = …`` and a bidirectional RNN's halves still regrouped,
    0.55–3.9 off; a second, rows written in slices of rows, at any sizes, and the batch
    merged with the features, ``[T, N·d]``, 1.1–2.5 off). Merged ``[N·d]`` steps stacked
    were regrouped until 2026-12-12 (0.99 off)."""
    moved = _flattened_step(tk.KFAC, False, kind)
    gathered = _flattened_step(tk.KFAC, True, kind)
    torch.testing.assert_close(moved, gathered, rtol=0, atol=1e-14)
    with pytest.raises(RuntimeError, match="layer 'l2': 25 rows for the batch of 5"):
        _flattened_step(tk.TwoLevelKFAC, False, kind)


class BatchFirstBuffer(nn.Module):
    """A head on ``[N, T, d]`` flattened, filled as ``buf[:, t] = tanh(h[:, t])`` in a loop
    (``buffer``; in halves in float64, one of them by ``-=``, whole in another ``dtype``)
    or written at once."""

    def __init__(self, buffer: bool, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.buffer, self.dtype = buffer, dtype
        self.l1, self.l2 = nn.Linear(D, 6), nn.Linear(6, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.l1(x)
        out = h.new_zeros(h.shape, dtype=self.dtype) if self.buffer else torch.tanh(h)
        for t in range(h.shape[1] if self.buffer else 0):
            if self.dtype == torch.float64:  # (in halves, one subtracted: a factor -1)
                out[:, t, :3] = torch.tanh(h[:, t, :3])
                out[:, t, 3:] -= -torch.tanh(h[:, t, 3:])
            else:
                out[:, t] = torch.tanh(h[:, t])
        return self.l2(out.to(h.dtype).reshape(-1, 6)).view(len(x), -1, C)


@pytest.mark.parametrize("length", [3, N])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_batch_first_buffer_is_proved(length: int, dtype: torch.dtype) -> None:
    """The control of the buffer above: ``buf[:, t] = …`` into ``[N, T, d]`` keeps the
    rows of the values written, and the head steps as on the tensor written at once (two-level
    KFAC too), at ``T = N`` as well, where the shapes are a time-major buffer's: the
    dimension written along is read from the write's own backward there (a bfloat16 buffer
    of more than 128 entries was refused by the first version: the probe numbered every
    entry; it holds the coordinates along one dimension now)."""
    x = torch.randn(N, length, D, dtype=torch.float64)
    y = torch.randint(0, C, (N, length))
    for make in (tk.KFAC, tk.TwoLevelKFAC):
        moved = []
        for buffer in (True, False):
            model = BatchFirstBuffer(buffer, dtype).double()
            opt = make(model, class_dim=-1, loss_reduction="mean", **EXACT)
            moved.append(
                step_change(
                    opt, model.l2.weight, F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                )
            )
        assert moved[1].abs().max() > 1e-3
        if dtype == torch.float64:  # (bfloat16: the proof, not the values)
            torch.testing.assert_close(moved[0], moved[1], rtol=0, atol=1e-13)


class Positions(nn.Module):
    """nanoGPT's positions, ``pos(torch.arange(T))`` broadcast over the batch, or one row
    of them per sample (``expand(B, T)``)."""

    def __init__(self, broadcast: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.broadcast = broadcast
        self.tok, self.pos, self.head = nn.Embedding(7, D), nn.Embedding(6, D), nn.Linear(D, C)

    def forward(self, tokens: Tensor) -> Tensor:
        index = torch.arange(tokens.shape[1])
        positions = self.pos(index if self.broadcast else index.expand(len(tokens), -1))
        return self.head(torch.tanh(self.tok(tokens) + positions).cumsum(1))


@pytest.mark.parametrize("optimizer", [tk.KFAC, tk.TwoLevelKFAC])
def test_one_samples_rows_are_its_positions_whatever_their_layout(optimizer: type) -> None:
    """A forward of one sample: every row of a layer input is that sample's. Its ``T`` rows
    given as ``[T, …]`` (a time-major ``Linear``, positions broadcast, accumulation over
    micro-batches of one) were not proved sample-major and took the gathered-rows block,
    2–3× off the same sample written batch-first, silently (a trial, before 2026-12-10;
    two-level KFAC refused them, suggesting KFAC); read as its ``T`` positions now."""
    steps = []
    for time_major in (True, False):
        torch.manual_seed(0)
        model = TimeMajor(time_major).double()
        opt = optimizer(model, class_dim=-1, loss_reduction="mean", **EXACT)
        x, y = torch.randn(1, 5, D, dtype=torch.float64), torch.randint(0, C, (1, 5))
        before = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        steps.append(
            torch.cat(
                [
                    (p.detach() - b).flatten()
                    for p, b in zip(model.parameters(), before, strict=True)
                ]
            )
        )
    torch.testing.assert_close(steps[0], steps[1], rtol=0, atol=1e-13)
    moved = []
    for broadcast in (True, False):
        net = Positions(broadcast).double()
        opt = optimizer(net, class_dim=-1, loss_reduction="mean", **EXACT)
        tokens, y = torch.randint(0, 7, (1, 5)), torch.randint(0, C, (1, 5))
        moved.append(
            step_change(
                opt, net.pos.weight, F.cross_entropy(net(tokens).flatten(0, 1), y.flatten())
            )
        )
    assert moved[1].abs().max() > 1e-3
    torch.testing.assert_close(moved[0], moved[1], rtol=0, atol=1e-13)


def test_micro_batches_of_one_with_broadcast_positions_step_as_the_whole_batch() -> None:
    """nanoGPT's positions broadcast, accumulated over micro-batches of one sample (a
    trial: 2.9 off the whole batch's step before 2026-12-10, silently; micro-batches of two
    are refused by name): each micro-batch's rows are its one sample's positions now."""
    moved = []
    for micro in (1, 4):
        net = Positions(broadcast=micro == 1).double()
        opt = tk.KFAC(
            net, class_dim=-1, loss_reduction="mean", accumulation_steps=4 // micro, **EXACT
        )
        tokens, y = torch.randint(0, 7, (4, 5)), torch.randint(0, C, (4, 5))
        before = net.pos.weight.detach().clone()
        for start in range(0, 4, micro):
            part = slice(start, start + micro)
            logits = net(tokens[part])
            loss = F.cross_entropy(logits.flatten(0, 1), y[part].flatten()) * micro / 4
            loss.backward()
        opt.step()
        moved.append(net.pos.weight.detach() - before)
    assert moved[1].abs().max() > 1e-3
    torch.testing.assert_close(moved[0], moved[1], rtol=0, atol=1e-13)


class PermutedData(nn.Module):
    """A layer on the data's ``[N, C, H, W]`` entries as token rows: a copy permuted
    batch-first (``x.permute(0, 2, 3, 1).reshape(N·L, C)``, ``layout="rows"``), the same
    unflattened (``"grid"``: a ``Linear`` on ``[N, H, W, C]``), or location-major
    (``"location"``: ``x.permute(2, 3, 0, 1).reshape(L·N, C)``, picked by an index where
    ``gathered``); a second layer on its output's rows in the same layout."""

    def __init__(self, layout: str, gathered: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layout, self.gathered = layout, gathered
        self.l1, self.l2, self.head = nn.Linear(D, 6), nn.Linear(6, 6), nn.Linear(6, C)

    def forward(self, x: Tensor) -> Tensor:
        n, _, height, width = x.shape
        length = height * width
        if self.layout in ("location", "location_view"):
            rows = x.permute(2, 3, 0, 1).contiguous()  # (a view of this copy, or a copy)
            rows = rows.view(-1, D) if self.layout == "location_view" else rows.reshape(-1, D)
            rows = rows[torch.arange(length * n)] if self.gathered else rows
            h = torch.tanh(self.l1(rows)).view(length, n, 6)
            h = self.l2(h.reshape(length * n, 6)).view(length, n, 6).transpose(0, 1)
        elif self.layout == "rows":
            h = torch.tanh(self.l1(x.permute(0, 2, 3, 1).reshape(n * length, D)))
            h = self.l2(h).view(n, length, 6)
        else:
            h = self.l2(torch.tanh(self.l1(x.permute(0, 2, 3, 1)))).view(n, length, 6)
        return self.head(torch.tanh(h).mean(1))


def _permuted_step(
    optimizer: type[tk.KFAC], layout: str, gathered: bool, bits: bool = False, **kw: str
) -> Tensor:
    model = PermutedData(layout, gathered).double()
    opt = optimizer(model, **EXACT, **kw)
    x = torch.randn(4, D, 2, 2, dtype=torch.float64)  # H·W = N
    x = (x > 0).double() if bits else x  # (0/1: several permutations give the copy)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    pairs = zip(model.parameters(), before, strict=True)
    return torch.cat([(p.detach() - b).flatten() for p, b in pairs])


def test_rows_of_the_data_permuted_are_told_by_their_values() -> None:
    """A copy of the data permuted has no graph, and no storage ties it to the model's
    argument: a batch-first copy of token rows (a patch embedding's) was read as gathered
    rows, two-level KFAC refusing it; a location-major one at ``H·W = N`` was proved
    ``H·W`` rows per sample (6.8 off a step under ``reduce`` in a trial, silently). The
    permutation is found from the values now (2026-12-11): the batch-first rows step as
    the unflattened layer's, two-level KFAC too; the location-major ones as gathered
    rows, through a view of the copy too, and where several permutations give the copy
    (data of zeros and ones: 1.6–2.7 off in a review of the first version)."""
    for optimizer in (tk.KFAC, tk.TwoLevelKFAC):
        rows = _permuted_step(optimizer, "rows", False, weight_sharing="reduce")
        grid = _permuted_step(optimizer, "grid", False, weight_sharing="reduce")
        assert grid.abs().max() > 1e-3
        torch.testing.assert_close(rows, grid, rtol=0, atol=1e-13)
    for layout, bits in (("location", False), ("location_view", False), ("location", True)):
        moved = _permuted_step(tk.KFAC, layout, False, bits, weight_sharing="reduce")
        gathered = _permuted_step(tk.KFAC, layout, True, bits, weight_sharing="reduce")
        torch.testing.assert_close(moved, gathered, rtol=0, atol=1e-13)


class Patches(nn.Module):
    """PatchTST's channel-independent overlapping patches of the data, ``x.reshape(N·C,
    L).unfold(-1, P, S)`` (``flat``), or the same patches as ``[N, C, n, P]``."""

    def __init__(self, flat: bool, patches: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.flat = flat
        self.embed, self.head = nn.Linear(4, 3), nn.Linear(2 * patches * 3, C)

    def forward(self, x: Tensor) -> Tensor:
        n, channels, length = x.shape
        patches = x.reshape(n * channels, length) if self.flat else x
        h = torch.tanh(self.embed(patches.unfold(-1, 4, 2)))  # (5 patches of 4, stride 2)
        return self.head(h.reshape(n, -1))


def test_overlapping_patches_of_the_data_are_told_by_their_strides() -> None:
    """Overlapping patches cut from a view of the data are a view with other strides and
    more entries than the data: they were read as gathered rows (KFAC 0.64–1.0 off a step
    in a trial, two-level KFAC refusing them). Each row's storage lies in one sample's, so
    they are proved since 2026-12-11: the steps of the patches as ``[N, C, n, P]``; with
    as many patches as samples, no warning that the batch is their second dimension."""
    x = torch.randn(3, 2, 12, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    for make in (tk.KFAC, tk.TwoLevelKFAC):
        moved = []
        for flat in (True, False):
            model = Patches(flat).double()
            opt = make(model, weight_sharing="reduce", **EXACT)
            moved.append(step_change(opt, model.embed.weight, F.cross_entropy(model(x), y)))
        assert moved[1].abs().max() > 1e-3
        torch.testing.assert_close(moved[0], moved[1], rtol=0, atol=1e-13)


class ChannelAttention(nn.Module):
    """PatchTST's channel independence: ``[N, C, S, E]`` tokens as ``[N·C, S, E]`` rows
    through ``nn.MultiheadAttention(batch_first=True)`` (``torch_attention``) or the same
    attention written with ``Linear`` projections (its weights copied)."""

    def __init__(self, torch_attention: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.torch_attention, width = torch_attention, 4
        self.pre, self.head = nn.Linear(width, width), nn.Linear(width, C)
        self.mha = nn.MultiheadAttention(width, 1, batch_first=True)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        with torch.no_grad():
            for i, layer in enumerate((self.q, self.k, self.v)):
                layer.weight.copy_(self.mha.in_proj_weight[i * width : (i + 1) * width])
                layer.bias.copy_(self.mha.in_proj_bias[i * width : (i + 1) * width])
            self.out.weight.copy_(self.mha.out_proj.weight)
            self.out.bias.copy_(self.mha.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, channels, length, width = x.shape
        u = self.pre(x).reshape(n * channels, length, width)
        if self.torch_attention:
            a = self.mha(u, u, u, need_weights=False)[0]
        else:
            weights = torch.softmax(self.q(u) @ self.k(u).transpose(1, 2) / 2.0, -1)
            a = self.out(weights @ self.v(u))
        return self.head((u + a).mean(1)).reshape(n, channels, -1).mean(1)


def test_torch_attention_on_rows_of_the_batch_times_channels_is_proved() -> None:
    """``nn.MultiheadAttention(batch_first=True)`` transposes its ``[N·C, S, E]`` input
    and its output back: ``out_proj``'s rows were a transpose of rows, read as gathered
    rows (0.63–0.86 off a step from ``out_proj`` on, in a forecasting trial; two-level
    KFAC refused them). The transpose is followed back to the batch since 2026-12-11: the
    output projection and the head step as in the same attention written with
    ``Linear`` layers."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    moved = []
    for torch_attention in (True, False):
        model = ChannelAttention(torch_attention).double()
        opt = tk.KFAC(model, weight_sharing="reduce", **EXACT)
        out = model.mha.out_proj if torch_attention else model.out
        before = [out.weight.detach().clone(), model.head.weight.detach().clone()]
        F.cross_entropy(model(x), y).backward()
        opt.step()
        moved.append(
            torch.cat(
                [(out.weight - before[0]).flatten(), (model.head.weight - before[1]).flatten()]
            ).detach()
        )
    assert moved[1].abs().max() > 1e-3
    torch.testing.assert_close(moved[0], moved[1], rtol=0, atol=1e-12)
    model = ChannelAttention(True).double()
    opt = tk.TwoLevelKFAC(model, **EXACT)
    F.cross_entropy(model(x), y).backward()
    opt.step()  # (refused before)
    model = Patches(True, patches=3).double()
    opt = tk.KFAC(model, **EXACT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (3 patches of 4, stride 2, for 3 samples)
        F.cross_entropy(model(torch.randn(3, 2, 8, dtype=torch.float64)), y).backward()
        opt.step()


class EncodedPoints(nn.Module):
    """A NeRF's coordinate MLP on each ray's ``S`` points ``[N, S, 3]``: a positional
    encoding of the points flattened to ``[N·S, 3]`` (``"flat"``), the points flattened
    alone (``"view"``), or the encoding kept ``[N, S, 3·(1 + 2F)]`` (``"rays"``)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.form, self.l1, self.l2 = form, nn.Linear(9, 6), nn.Linear(6, 1)

    def forward(self, points: Tensor) -> Tensor:
        n, s, _ = points.shape
        if self.form == "view":
            return self.l2(torch.tanh(self.l1(points.reshape(n * s, 9)))).view(n, s).sum(1)
        flat = points[..., :3].reshape(n * s, 3) if self.form == "flat" else points[..., :3]
        encoded = torch.cat([flat, torch.sin(flat), torch.cos(flat)], -1)
        return self.l2(torch.tanh(self.l1(encoded))).reshape(n, s).sum(1)


@pytest.mark.parametrize("form", ["flat", "view", "rays"])
def test_rows_encoded_from_the_data_flattened_are_warned_of(form: str) -> None:
    """An encoding of the flattened data has no graph and is no copy of the data: its
    ``N·S`` rows are read as gathered rows (2.6–4.9 off the per-ray step in a NeRF trial),
    and since 2026-12-12 that is warned of once per layer, with the unflattened form that
    KFAC reads as ``S`` points of each ray. A view of the data flattened is proved (no
    warning), and so is the encoding kept ``[N, S, …]``."""
    model = EncodedPoints(form).double()
    opt = tk.KFAC(model, **EXACT)
    points = torch.randn(4, 5, 9, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moved = step_change(opt, model.l1.weight, F.mse_loss(model(points), torch.ones(4)))
    said = [str(w.message) for w in caught if "autograd does not record" in str(w.message)]
    assert len(said) == (form == "flat")
    if said:
        assert "layer 'l1' was called on 20 rows for the batch of 4" in said[0]
        assert "[B, 5, ...]" in said[0]
    else:
        assert bool(moved.abs().max() > 1e-3)


class HeadMajor(nn.Module):
    """A ``Linear`` shared by the heads on head-major rows ``[H·N, L, d]`` (``L = N``: the
    second dimension has the batch's size and is the time)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.per_head, self.head = nn.Linear(D, 2 * N), nn.Linear(2, 2), nn.Linear(2, C)

    def forward(self, x: Tensor) -> Tensor:  # x [N, L, D]
        heads = self.qkv(x).reshape(N, N, N, 2).permute(2, 0, 1, 3)  # [H, N, L, 2]
        rows = self.per_head(torch.tanh(heads).reshape(N * N, N, 2))
        return self.head(rows.reshape(N, N, N, 2).mean((0, 2)))


def test_a_second_dimension_that_is_not_the_batch_is_not_warned_of() -> None:
    """Head-major rows at ``L = N`` were told their second dimension is the batch, and to
    move it first (a state-space trial: the advice breaks the model). The dimension is
    followed back to the time now (2026-12-12): no such warning; the rows are gathered
    rows, as any head-major rows are."""
    model = HeadMajor().double()
    opt = tk.KFAC(model, **EXACT)
    x = torch.randn(N, N, D, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moved = step_change(
            opt, model.per_head.weight, F.cross_entropy(model(x), torch.arange(N) % C)
        )
    assert not [w for w in caught if "second dimension" in str(w.message)]
    assert bool(moved.abs().max() > 1e-3)
