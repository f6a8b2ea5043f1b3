"""One step's captured records, each layer's statistics formed only when read.

A layer's statistics (``ā`` and ``δ`` in ``[N, T, features]`` format: a convolution's
unfolded rows, cast to the factors' dtype, the forwards concatenated) are the largest
tensors of a refresh step; formed for every layer at once they are a multiple of the
largest (a ResNet-18 of width 16 on CIFAR-shaped batches of 64: 300 MiB for its 21 layers,
40 MiB for the largest). :class:`CapturedBatch` forms them in layer order as it is
iterated and drops each layer's records when it does, so a caller that folds and drops
each layer's statistics (:func:`twolevel_kfac.optim.folding.fold_statistics`) holds one
layer's at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from .blocks import LayerStats, input_features, layer_stats, output_gradients, own_statistics
from .calls import CallsStatistics, calls_statistics, per_sample, sample_rows
from .layer_types import is_token_table
from .live_positions import PositionGrads, dead_positions, position_wise

if TYPE_CHECKING:
    from .forward_pass import Record

Dead = Mapping[tuple[object, int, int], Tensor]

__all__ = [
    "Call",
    "CapturedBatch",
    "Forward",
    "fisher_scale",
    "forward_statistics",
    "layer_rows",
    "scaled_gradient",
]


class Call(NamedTuple):
    """One call of a layer in one forward."""

    module: nn.Module
    inputs: Tensor  # its recorded input
    grad: Tensor | None  # its output gradient (None: the output did not reach the loss)
    reshaped: bool = False  # its rows in the batch's order (calls.sample_major)
    forward: object = None  # which forward pass it belongs to (its key)
    positions: int | None = None  # that forward's output positions per sample
    padding: Tensor | None = None  # that forward's real positions (set_padding_mask)
    batch: int = 0  # that forward's batch size (its Fisher mini-batch may be fewer)
    reached: Tensor | None = None  # that forward's output positions with a loss term

    @classmethod
    def of(cls, record: Record) -> Call:
        """The call of a captured record."""
        owner = record.owner
        return cls(record.module, record.inputs, record.grad, record.reshaped, id(owner),
                   owner.positions, owner.padding, owner.batch_size, owner.reached)  # fmt: skip


Forward = tuple[int, list[Call]]
"""One forward's calls of a layer, with ``N``: the samples of its Fisher mini-batch."""


class CapturedBatch:
    """The records of one step by layer (``forwards[name]``: each forward's calls),
    iterable once as ``(name, statistics)`` in layer order.

    Args:
        layers: the blocks, by name.
        forwards: each layer's calls, by forward (with its samples), for the layers with
            statistics.
        dtypes: the dtype of each block's statistics (default: as captured).
        loss_scale: what the captured ``δ`` are divided by (a ``GradScaler``'s scale).
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        forwards: dict[str, list[Forward]],
        dtypes: dict[str, torch.dtype],
        loss_scale: float = 1.0,
    ) -> None:
        self.names = list(forwards)
        self._layers, self._forwards, self._dtypes = layers, forwards, dtypes
        self._scale = loss_scale
        self._dead: Dead | None = None
        samples = step_samples(forwards)
        self.samples = sum(samples.values())  # the step's, every forward's
        self.rows = layer_rows(forwards)  # per layer: its statistics' rows over the step
        batches = {c.forward: c.batch for fs in forwards.values() for _, cs in fs for c in cs}
        self.batch = sum(batches.values())  # the step's batch rows (its samples: a subset)
        self._totals: tuple[Mapping[str, int], int] | None = None

    def spread_over(self, rows: Mapping[str, int], samples: int) -> None:
        """Scale each layer's ``δ`` (:func:`fisher_scale`) by its ``rows`` and the step's
        ``samples`` summed over the ranks under ``torch.distributed`` (each rank's own
        :attr:`rows` and :attr:`samples`, all-reduced), not this rank's alone: the ranks'
        statistics together are then one process's of the whole batch."""
        self._totals = (dict(rows), samples)

    def __iter__(self) -> Iterator[tuple[str, LayerStats]]:
        if self._dead is None:  # before any layer's records are dropped
            grads = (  # of forwards with output positions or padding
                PositionGrads(c.forward, name, call_rows(c, n), bool(c.positions), c.padding)
                for name, forwards in self._forwards.items()
                for n, calls in forwards
                for c in calls
                if c.grad is not None
                and position_wise(c.module)
                and (c.positions or c.padding is not None)
            )
            reached = {
                c.forward: c.reached for fs in self._forwards.values() for _, cs in fs for c in cs
            }
            self._dead = dead_positions(grads, reached.get)
        while self._forwards:
            name = next(iter(self._forwards))
            forwards = self._forwards.pop(name)  # its records go with its statistics
            module, dtype = self._layers[name], self._dtypes.get(name)
            rows, samples = self._totals or (self.rows, self.samples)
            factor = fisher_scale(rows.get(name, 0), samples)
            yield (
                name,
                forward_statistics(name, module, forwards, dtype, self._scale, self._dead, factor),
            )


def step_samples(forwards: Mapping[str, list[Forward]]) -> dict[object, int]:
    """Each forward of the step (its key) with the samples of its Fisher mini-batch."""
    return {call.forward: n for fs in forwards.values() for n, calls in fs for call in calls}


def layer_rows(forwards: Mapping[str, list[Forward]]) -> dict[str, int]:
    """Each layer's rows ``M`` of its statistics over the step's forwards that ran it
    (:func:`~.calls.sample_rows`): ``N_f`` of each forward, or its ``R_f`` rows gathered
    from the batch's (a branch on some samples, an expert's tokens)."""
    return {
        name: sum(
            sample_rows(_rows(calls[0].inputs), samples, calls[0].reshaped) for samples, calls in fs
        )
        for name, fs in forwards.items()
    }


def _rows(inputs: Tensor) -> int:
    return int(inputs.shape[0]) if inputs.dim() else 0


def fisher_scale(rows: int, samples: int) -> float:
    """``√(M/N)``: what a layer's ``δ`` are multiplied by, ``M`` the rows of its statistics
    over the step (:func:`layer_rows`) and ``N`` the step's samples (every forward's, every
    rank's), so that its block, whose factors average over the ``M`` rows, is that of the
    step's batch Fisher ``Σ āāᵀ/M ⊗ Σ δδᵀ/N`` (Martens & Grosse 2015 eq. (1) over the
    ``N`` samples: a sample whose forward did not run the layer, or whose rows the layer
    did not see, adds ``δ = 0``). One scale per layer and step, whatever the rows' spread
    over the forwards: a head that one of two micro-batches skips (``M = N/2``), an expert
    given 4 tokens of one micro-batch and 6 of the next (``M = 10``). Scaled per forward,
    by ``√(R_f/N_f)``, the expert's ``G`` was off by the spread of the ``R_f/N_f``
    (1.5–23 % in a trial); taken over the samples of its forwards alone, the head's ``G``
    was 2×. ``1`` where ``M`` is ``N`` or ``0``."""
    if rows <= 0 or samples <= 0 or rows == samples:
        return 1.0
    return math.sqrt(rows / samples)


def forward_statistics(
    name: str,
    module: nn.Module,
    forwards: list[Forward],
    dtype: torch.dtype | None,
    loss_scale: float = 1.0,
    dead: Dead | None = None,
    factor: float = 1.0,
) -> LayerStats:
    """Layer ``name``'s statistics of its forwards' calls (:func:`~.calls.calls_statistics`
    per forward, concatenated along ``N``), the captured output gradients divided by
    ``loss_scale``, the block's ``δ`` times ``factor`` (:func:`fisher_scale`: the block's
    own ``δ``, after :func:`~.blocks.block_statistics`, which for an embedding table are
    the one-hot rows, its output gradients being its ``ā``; scaled in the output gradients,
    a table tied to a head had its factors scaled in the table's locations and not in the
    head's, a step 24 % off under DDP in a trial); a
    position-wise layer's positions marked in ``dead`` (per forward and layout:
    :func:`~.live_positions.dead_positions`) are its statistics' ``dead``, and forwards
    of different lengths (micro-batches padded each to its longest sequence; since
    2026-12-12 a convolution's too, DINO's global and local crops, refused before) are
    padded to the longest with dead positions.

    Raises:
        RuntimeError: forwards of different numbers of locations of a layer type of its
            own (a norm's, a grouped convolution's).
    """
    forwards = [(samples, _reached(calls)) for samples, calls in forwards]
    located = [
        calls_statistics(
            name,
            [call._replace(grad=_unscaled(call.grad, loss_scale)) for call in calls],
            dtype,
            samples,
        )
        for samples, calls in forwards
    ]
    pairs = [(s.a, s.g) for s in located]
    lengths = sorted({int(a.shape[1]) for a, _ in pairs})
    own = own_statistics(module)
    padded_out = own is None or own.dead_rows  # (its rows may be left out: A ⊗ G's)
    wise = padded_out and all(position_wise(c.module) for _, calls in forwards for c in calls)
    if len(lengths) > 1 and not padded_out:
        raise RuntimeError(
            f"layer {name!r}: the forwards of one step have {lengths} locations per sample; "
            "its block needs one number (a layer type of its own: a grouped or depthwise "
            "convolution, a norm): give the step's forwards inputs of one size"
        )
    masks = None
    if (wise and dead) or len(lengths) > 1:  # (a convolution's: padding alone is dead)
        masks = [
            _dead_of(calls, samples, (dead or {}) if wise else {}) for samples, calls in forwards
        ]
        pairs, masks = _padded(pairs, masks, lengths[-1])
    held = [t for _, calls in forwards for c in calls for t in (c.inputs, c.grad) if t is not None]
    a, g = _joined([a for a, _ in pairs], held), _joined([g for _, g in pairs], held)
    if factor != 1.0:
        g.mul_(factor)  # (its own copy)
    stats = layer_stats(module, a, g)
    if masks is not None:
        mask = torch.cat(masks).to(a.device)
        stats.dead = mask if bool(mask.any()) else None
    padded = _padding_slots(stats, forwards, located)
    if padded is not None:  # (left out of the factors, as dead positions are)
        stats.dead = padded if stats.dead is None else stats.dead | padded
    return stats


def _reached(calls: list[Call]) -> list[Call]:
    """The calls of one forward whose output the backward reached (an output gradient was
    captured), unless none was: a call with gradients on whose output no loss reads (a
    monitoring ``layer(z.detach()).norm()``, a deep equilibrium model's ``f(z0, x)`` read
    only by a gradient hook's ``autograd.grad``) adds nothing to the gradient, and counted
    as a location with ``δ = 0`` it took a share of ``A`` and of ``T`` (0.27–0.47 off a step
    in a trial, before 2026-12-11)."""
    kept = [call for call in calls if call.grad is not None]
    return kept or calls


def _padding_slots(
    stats: LayerStats, forwards: list[Forward], located: list[CallsStatistics]
) -> Tensor | None:
    """The positions of an embedding table's calls in its block that hold a ``padding_idx``
    token (``[N, T]``; ``None`` for none, or a block without a table): no gradient reaches
    the table from them, but their ``ā`` (the token's output gradient) is not zero where a
    loss or a pooled bag (``emb(ids).sum(1)``) reaches them, which counted in ``A`` and in
    ``T`` (the same samples padded to 5 or 10 slots stepped 34–38 % apart, silently, in a
    trial, before 2026-12-09; in a table tied to a ``Linear`` head, 8 % of a step in a
    review, before 2026-12-10): they are left out of the factors. A tied head's positions
    are kept, whatever their ``δ``."""
    modules = [c.module for _, calls in forwards for c in calls]
    if all(getattr(m, "padding_idx", None) is None for m in modules):
        return None
    padded = getattr(stats, "padded", None)  # (the vector form: ids; dense: zero one-hot rows)
    slots = padded if isinstance(padded, Tensor) else ~stats.g.ne(0).any(dim=-1)
    if not is_token_table(modules):  # (a tied head's positions beside the table's)
        length, tables = int(slots.shape[1]), []
        for (_, calls), forward in zip(forwards, located, strict=True):
            own = [
                torch.full((n,), isinstance(c.module, nn.Embedding), device=slots.device)
                for c, n in zip(calls, forward.lengths, strict=True)
            ]
            mark = torch.cat([*own, slots.new_zeros(length - sum(forward.lengths))])
            tables.append(mark.expand(int(forward.a.shape[0]), -1))
        slots = slots & torch.cat(tables)
    return slots if bool(slots.any()) else None


def _joined(parts: list[Tensor], held: list[Tensor]) -> Tensor:
    """The forwards' rows along ``N``, in memory of their own: the statistics never alias a
    layer's input or output gradient (``held``), which the user may change in place. One
    forward's rows stay as they are where they are new already (a convolution's patches, a
    ``Linear``'s rows with the bias' 1), else are copied in their layout: a convolution's
    ``[N, T, d]`` lies in im2col's order (``[N, d, T]`` in memory), and the row-major copy
    ``torch.cat`` made of it transposed (13.6 ms of a 32 × 32 layer's refresh in a trial,
    more than its unfold); :func:`~.gram.position_gram` reads that order as it is."""
    if len(parts) > 1:
        return torch.cat(parts)
    rows = parts[0]
    memory = rows.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == memory for t in held):
        return rows.clone()  # (torch.preserve_format: strides kept)
    return rows


def _padded(
    pairs: list[tuple[Tensor, Tensor]], masks: list[Tensor], length: int
) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
    """Each forward's ``(ā, δ)`` and dead positions padded to ``length`` locations with zero
    rows that are dead."""
    out_pairs, out_masks = [], []
    for (a, g), mask in zip(pairs, masks, strict=True):
        extra = length - int(a.shape[1])
        if extra:
            a = torch.cat([a, a.new_zeros(a.shape[0], extra, *a.shape[2:])], dim=1)
            g = torch.cat([g, g.new_zeros(g.shape[0], extra, *g.shape[2:])], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=1)
        out_pairs.append((a, g))
        out_masks.append(mask)
    return out_pairs, out_masks


def call_rows(call: Call, samples: int | None) -> Tensor:
    """A call's output gradients ``[N', T', d]`` as its statistics read them per sample
    (:func:`~.calls.per_sample`; its input features where it has none)."""
    if call.grad is None:
        rows = input_features(call.module, call.inputs)
    else:
        rows = output_gradients(call.module, call.grad)
    return per_sample((rows, rows), samples, call.reshaped)[0]


def _dead_of(calls: list[Call], samples: int, dead: Dead) -> Tensor:
    """The dead positions ``[N', ΣT']`` of one forward's calls of a layer, side by side (of
    ``k`` calls on one position each, their ``[N', k]`` layout: :func:`~.live_positions.
    loop_calls`)."""
    masks = []
    for call in calls:
        rows = call_rows(call, samples)
        layout = (call.forward, int(rows.shape[0]), int(rows.shape[1]))
        default = torch.zeros(rows.shape[:2], dtype=torch.bool, device=rows.device)
        masks.append(dead.get(layout, default).to(rows.device))
    looped = (calls[0].forward, int(masks[0].shape[0]), len(masks))
    if len(masks) > 1 and all(m.shape[1] == 1 for m in masks) and looped in dead:
        return dead[looped].to(masks[0].device)
    return torch.cat(masks, dim=1)


def _unscaled(grad: Tensor | None, loss_scale: float) -> Tensor | None:
    """A captured output gradient without a ``GradScaler``'s scale."""
    return grad if grad is None or loss_scale == 1.0 else grad / loss_scale


def scaled_gradient(grad: Tensor, scale: float) -> Tensor:
    """The empirical ``δ = scale · grad`` (``scale = B·k``), a half-precision ``grad`` in
    float32 first: under fp16 autocast with a ``GradScaler`` the captured gradient carries
    the loss scale ``S`` as well, and ``S·B·∂loss/∂s_n`` passes fp16's 65504 while the
    parameters' gradients (``S·∂loss/∂θ``) stay finite, so the scaler skips nothing and the
    layer's factor update was dropped as non-finite (the statistics are float32 anyway)."""
    if grad.dtype in (torch.float16, torch.bfloat16):
        grad = grad.float()
    return grad * scale
