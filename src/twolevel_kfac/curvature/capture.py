"""Capture of per-layer inputs ``a`` and pre-activation gradients ``δ`` with module hooks.

The training loop stays ``loss = loss_fn(model(x), y); loss.backward(); opt.step()``. On a
step where the factors are refreshed (``capture.active``), during ``model(x)``:

1. a forward *pre*-hook on the root module picks the Fisher mini-batch: a random subset of
   ``round(fisher_batch · B)`` rows of the batch (all rows when ``fisher_batch = 1``);
2. a forward hook on every preconditioned layer keeps the subset's layer input (detached);
3. the gradients ``δ`` come from either
   * ``fisher="empirical"``: a tensor hook on the layer output, fired by the user's own
     ``loss.backward()``; ``δ_n = B · ∂loss/∂s_n`` because the loss is a mean over the batch;
   * ``fisher="mc"``: a forward hook on the root module samples targets from the model's
     predictive distribution (:mod:`.likelihoods`) for the subset rows and runs
     ``torch.autograd.grad(Σ_n ℓ_n(ŷ_n), layer_outputs, retain_graph=True)`` before the
     forward returns. The user's backward later reuses the retained graph untouched.

Several forwards before one ``step()`` (gradient accumulation) append their samples; with
``k`` micro-batches whose losses are divided by ``k``, ``accumulation_steps=k`` scales the
empirical ``δ`` by ``B·k`` so the statistics equal those of the whole batch.
A layer whose weight several modules share (tied weights), or that runs several times in
one forward, records each call; the calls of one forward are its locations ``t`` (they are
concatenated along ``T``, the weight-sharing view of :mod:`.discovery`).
The statistics are returned in the dtype given per layer (float32 for a float32 model
under ``torch.autocast``, whose layers see and emit bfloat16 / float16 tensors).
Nothing is captured in ``eval()`` mode, under ``torch.no_grad()``, or when inactive.
The random draws (the subset, the MC targets) use the optimizer's CPU generator whatever the
model's device (the subset's indices, then the targets, are moved to the data's device).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .blocks import LayerStats, input_features, output_gradients
from .likelihoods import sampled_nll

FisherType = Literal["mc", "empirical"]
FISHER_TYPES: tuple[str, ...] = get_args(FisherType)


@dataclass
class _Record:
    """One call's captured rows of one layer (one module use)."""

    module: nn.Module
    inputs: Tensor
    forward: int  # which forward pass it belongs to
    grad: Tensor | None = None


@dataclass
class _Forward:
    """State of the forward pass in flight."""

    index: Tensor | None
    batch_size: int
    number: int
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)
    records: dict[str, list[_Record]] = field(default_factory=dict)


def _rows(tensor: Tensor, forward: _Forward) -> Tensor:
    """The Fisher mini-batch's rows of a batched tensor."""
    return tensor if forward.index is None else tensor.index_select(0, forward.index)


def _check_rows(what: str, tensor: Tensor, forward: _Forward) -> None:
    """Refuse a Fisher subset whose rows would be taken from a tensor whose first dimension
    is not the batch (e.g. logits flattened to ``[N·T, C]`` inside ``forward``).

    Raises:
        RuntimeError: naming ``what`` and the shapes.
    """
    if forward.index is not None and (tensor.dim() == 0 or tensor.shape[0] != forward.batch_size):
        raise RuntimeError(
            f"{what} has shape {tuple(tensor.shape)}, but the model's input has "
            f"{forward.batch_size} rows: fisher_batch < 1 picks the Fisher mini-batch on the "
            "first dimension of every layer's input and of the model output, so it must be "
            "the batch there too (keep logits [N, ..., C] and flatten them in the loss, not "
            "in forward), or use fisher_batch=1"
        )


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The first tensor among a call's positional and keyword arguments."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


class CurvatureCapture:
    """Hooks that collect :class:`LayerStats` of the Fisher mini-batch for named layers.

    Args:
        model: the root module (its forward picks the Fisher mini-batch).
        layers: the blocks, by name.
        fisher: ``mc`` | ``empirical``.
        likelihood: what ``mc`` samples from (:mod:`.likelihoods`).
        fisher_batch: the fraction of the batch's rows in the Fisher mini-batch.
        generator: the sampler of the rows and the MC targets.
        accumulation_steps: micro-batches per step (scales the empirical ``δ``).
        uses: every module computing with each block's weight (tied weights); default: the
            block's own module.
        dtypes: the dtype of each block's statistics; default: as captured.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        fisher: str,
        likelihood: str,
        fisher_batch: float,
        generator: torch.Generator,
        accumulation_steps: int = 1,
        uses: dict[str, list[nn.Module]] | None = None,
        dtypes: dict[str, torch.dtype] | None = None,
    ) -> None:
        self.model = model
        self.layers = layers
        self.fisher = fisher
        self.likelihood = likelihood
        self.fisher_batch = fisher_batch
        self.generator = generator
        self.accumulation_steps = accumulation_steps
        self.dtypes = dtypes or {}
        self.active = False
        self._forward: _Forward | None = None
        self._forwards = 0
        self._records: dict[str, list[_Record]] = {name: [] for name in layers}
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True),
        ]
        if fisher == "mc":
            self._handles.append(model.register_forward_hook(self._root_hook))
        uses = uses or {name: [module] for name, module in layers.items()}
        for name, modules in uses.items():
            for module in modules:
                self._handles.append(module.register_forward_hook(self._layer_hook(name)))

    def remove(self) -> None:
        """Remove every hook (the capture then records nothing)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _capturing(self, module: nn.Module) -> bool:
        return self.active and module.training and torch.is_grad_enabled()

    def _root_pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._forward = None
        if not self._capturing(module):
            return
        x = first_tensor(args, kwargs)
        if x is None or x.dim() == 0:
            raise RuntimeError("KFAC capture: the model's first argument must be a batched tensor")
        batch = int(x.shape[0])
        index = None
        if self.fisher_batch < 1.0:
            size = max(1, round(self.fisher_batch * batch))
            perm = torch.randperm(batch, generator=self.generator)
            index = perm[:size].sort().values.to(x.device)
        self._forwards += 1
        self._forward = _Forward(index=index, batch_size=batch, number=self._forwards)

    def _layer_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            forward = self._forward
            if forward is None or not self._capturing(module):
                return
            _check_rows(f"the input of layer {name!r}", args[0], forward)
            record = _Record(module, _rows(args[0].detach(), forward), forward.number)
            forward.records.setdefault(name, []).append(record)
            self._records[name].append(record)
            if self.fisher == "mc":
                forward.outputs.setdefault(name, []).append(output)
            elif output.requires_grad:
                scale = float(forward.batch_size * self.accumulation_steps)

                def grad_hook(grad: Tensor) -> None:
                    record.grad = _rows(grad.detach(), forward) * scale

                output.register_hook(grad_hook)

        return hook

    def _root_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        forward = self._forward
        if forward is None or not forward.outputs:
            return
        if not isinstance(output, Tensor):
            raise TypeError("fisher='mc' needs a model that returns one tensor of outputs")
        if not output.requires_grad or not bool(torch.isfinite(output.detach()).all()):
            forward.outputs.clear()  # a non-finite output gives no statistics this step
            return
        try:
            _check_rows("the model output", output, forward)
            loss = sampled_nll(_rows(output, forward), self.likelihood, self.generator)
        except (RuntimeError, ValueError):
            forward.outputs.clear()
            raise
        keys = [(name, i) for name, outs in forward.outputs.items() for i in range(len(outs))]
        grads = torch.autograd.grad(
            loss,
            [forward.outputs[n][i] for n, i in keys],
            retain_graph=True,
            allow_unused=True,
        )
        pairs = zip(keys, grads, strict=True)
        unreached = sorted({name for (name, _), grad in pairs if grad is None})
        if unreached:
            forward.outputs.clear()
            raise RuntimeError(
                f"fisher='mc' cannot differentiate the sampled loss with respect to the "
                f"output of layer(s) {unreached}: they do not reach the model output in "
                "autograd's graph (a torch.compile'd model hides its layers' outputs this "
                "way; its Fisher would silently be zero). Use fisher='empirical' or an "
                "eager model"
            )
        for (name, i), grad in zip(keys, grads, strict=True):
            forward.records[name][i].grad = _rows(grad.detach(), forward)
        forward.outputs.clear()

    def has_statistics(self) -> bool:
        """Whether any forward of this step has its output gradients."""
        return any(r.grad is not None for records in self._records.values() for r in records)

    def collect(self) -> dict[str, LayerStats]:
        """The statistics gathered since the last call (forwards whose backward has run), in
        ``[N, T, features]`` format; clears the buffers. The calls of one layer within one
        forward are concatenated along ``T``, the forwards along ``N``."""
        stats: dict[str, LayerStats] = {}
        for name in self.layers:
            records, self._records[name] = self._records[name], []
            calls: dict[int, list[_Record]] = {}
            for record in records:
                calls.setdefault(record.forward, []).append(record)
            done = [c for c in calls.values() if any(r.grad is not None for r in c)]
            if not done:
                continue
            pairs = [_forward_stats(name, c, self.dtypes.get(name)) for c in done]
            # torch.cat copies even one tensor: the statistics never alias a layer's input
            a = torch.cat([a for a, _ in pairs])
            stats[name] = LayerStats(a, torch.cat([g for _, g in pairs]))
        self._forward = None
        return stats

    def discard(self) -> None:
        """Drop everything captured so far (e.g. on a skipped step)."""
        for name in self._records:
            self._records[name] = []
        self._forward = None


def _forward_stats(
    name: str, calls: list[_Record], dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """``ā`` and ``δ`` (``[N, T, d]``, in ``dtype``) of one forward's calls of a layer: each
    call's locations side by side (a call whose output did not reach the loss has ``δ = 0``).

    Raises:
        RuntimeError: if the calls saw different numbers of rows.
    """
    inputs = [_cast(input_features(r.module, r.inputs), dtype) for r in calls]
    grads = [
        None if r.grad is None else _cast(output_gradients(r.module, r.grad), dtype) for r in calls
    ]
    d_out = next(g for g in grads if g is not None).shape[-1]
    grads = [
        g if g is not None else a.new_zeros(a.shape[0], a.shape[1], d_out)
        for a, g in zip(inputs, grads, strict=True)
    ]
    rows = sorted({int(a.shape[0]) for a in inputs})
    if len(rows) > 1:
        raise RuntimeError(
            f"layer {name!r} (or a module tied to it) ran {len(calls)} times in one forward "
            f"with different numbers of rows {rows}: KFAC treats the calls of a shared "
            "weight as more locations of the same samples"
        )
    if len(calls) == 1:
        return inputs[0], grads[0]  # type: ignore[return-value]
    return torch.cat(inputs, dim=1), torch.cat(grads, dim=1)  # type: ignore[arg-type]


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor if dtype is None else tensor.to(dtype)
