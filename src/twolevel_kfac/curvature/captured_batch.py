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

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from .blocks import LayerStats, input_features, layer_stats, output_gradients
from .calls import calls_statistics, per_sample
from .live_positions import dead_positions, position_wise

if TYPE_CHECKING:
    from .forward_pass import Record

Dead = Mapping[tuple[object, int, int], Tensor]

__all__ = ["Call", "CapturedBatch", "Forward", "forward_statistics", "scaled_gradient"]


class Call(NamedTuple):
    """One call of a layer in one forward."""

    module: nn.Module
    inputs: Tensor  # its recorded input
    grad: Tensor | None  # its output gradient (None: the output did not reach the loss)
    reshaped: bool = False  # its rows in the batch's order (calls.sample_major)
    forward: object = None  # which forward pass it belongs to (its key)

    @classmethod
    def of(cls, record: Record) -> Call:
        """The call of a captured record."""
        return cls(record.module, record.inputs, record.grad, record.reshaped, id(record.owner))


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

    def __iter__(self) -> Iterator[tuple[str, LayerStats]]:
        if self._dead is None:  # before any layer's records are dropped
            self._dead = dead_positions(
                (call.forward, call_rows(self._layers[name], call, samples))
                for name, forwards in self._forwards.items()
                if position_wise(self._layers[name])
                for samples, calls in forwards
                for call in calls
                if call.grad is not None
            )
        while self._forwards:
            name = next(iter(self._forwards))
            forwards = self._forwards.pop(name)  # its records go with its statistics
            module, dtype = self._layers[name], self._dtypes.get(name)
            yield name, forward_statistics(name, module, forwards, dtype, self._scale, self._dead)


def forward_statistics(
    name: str,
    module: nn.Module,
    forwards: list[Forward],
    dtype: torch.dtype | None,
    loss_scale: float = 1.0,
    dead: Dead | None = None,
) -> LayerStats:
    """Layer ``name``'s statistics of its forwards' calls (:func:`~.calls.calls_statistics`
    per forward, concatenated along ``N``), the ``δ`` divided by ``loss_scale``; a
    position-wise layer's positions marked in ``dead`` (per forward and layout:
    :func:`~.live_positions.dead_positions`) are its statistics' ``dead``."""
    pairs = [
        calls_statistics(
            name,
            [call._replace(grad=_unscaled(call.grad, loss_scale)) for call in calls],
            dtype,
            samples,
        )
        for samples, calls in forwards
    ]
    # torch.cat copies even one tensor: the statistics never alias a layer's input
    a, g = torch.cat([a for a, _ in pairs]), torch.cat([g for _, g in pairs])
    stats = layer_stats(module, a, g)
    if dead and type(stats) is LayerStats and position_wise(module):
        mask = torch.cat([_dead_of(module, calls, samples, dead) for samples, calls in forwards])
        stats.dead = mask.to(a.device) if bool(mask.any()) else None
    return stats


def call_rows(module: nn.Module, call: Call, samples: int | None) -> Tensor:
    """A call's output gradients ``[N', T', d]`` as its statistics read them per sample
    (:func:`~.calls.per_sample`; its input features where it has none)."""
    if call.grad is None:
        rows = input_features(module, call.inputs)
    else:
        rows = output_gradients(module, call.grad)
    return per_sample((rows, rows), samples, call.reshaped)[0]


def _dead_of(module: nn.Module, calls: list[Call], samples: int, dead: Dead) -> Tensor:
    """The dead positions ``[N', ΣT']`` of one forward's calls of a layer, side by side."""
    masks = []
    for call in calls:
        rows = call_rows(module, call, samples)
        layout = (call.forward, int(rows.shape[0]), int(rows.shape[1]))
        default = torch.zeros(rows.shape[:2], dtype=torch.bool, device=rows.device)
        masks.append(dead.get(layout, default).to(rows.device))
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
