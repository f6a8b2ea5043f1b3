"""Capture of per-layer inputs ``a`` and pre-activation gradients ``δ`` with module hooks.

The training loop stays ``loss = loss_fn(model(x), y); loss.backward(); opt.step()``. On a
step where the factors are refreshed (``capture.active``), during ``model(x)``:

1. a forward *pre*-hook on the root picks the Fisher mini-batch: ``round(fisher_batch · B)``
   random rows of the batch (all of them when ``fisher_batch = 1``);
2. a forward hook on every preconditioned layer keeps those rows of its input (detached);
3. the gradients ``δ`` come from either
   * ``fisher="empirical"``: a tensor hook on the layer output, fired by the user's own
     ``loss.backward()``; ``δ_n = B · ∂loss/∂s_n`` because the loss is a mean over the batch;
   * ``fisher="mc"``: a forward hook on the root samples targets from the model's predictive
     distribution (:mod:`.likelihoods`) for those rows and runs ``torch.autograd.grad(Σ_n
     ℓ_n(ŷ_n), layer_outputs, retain_graph=True)``; the user's backward reuses the graph.

Several forwards before one ``step()`` append their samples (``accumulation_steps=k``
scales the empirical ``δ`` by ``B·k``). A layer that several modules share, or that runs
several times in one forward, records each call as a location ``t`` (:mod:`.calls`).
Statistics come in each layer's dtype (float32 under ``torch.autocast``). Nothing is
captured in ``eval()``, under ``no_grad()``, or when inactive. The draws (the subset,
the MC targets) use the optimizer's CPU generator.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils.hooks import RemovableHandle

from . import forward_misuse as misuse
from .attention import attention_modules, recompute_attention
from .blocks import recorded_input, trains
from .call_arguments import batch_argument, other_rows
from .calls import sample_major
from .captured_batch import Call, CapturedBatch, Forward
from .dropped_gradients import Marks, backward_started, settle
from .forward_checks import (
    check_batch_rows,
    check_batched_input,
    check_subset_rows,
    check_unreached,
    check_weight_uses,
)
from .forward_pass import ForwardPass, Record, empirical_hook, fisher_rows
from .hooks import WeakHook, in_backward, parameters_swapped, registered_parameters, remove_all
from .likelihoods import (
    check_output,
    per_sample_output,
    sampled_gradients,
    sampled_nll,
    sampled_output,
)
from .live_positions import watch_positions
from .loss_mask import check_mask_likelihood, counted_mask, drawable, watch_loss_gradient
from .loss_scale import SummedLoss
from .padding_mask import check_padding_matched, padding_rows, real_positions
from .registration_check import check_registration
from .token_mean import TokenMean

FisherType = Literal["mc", "empirical"]
FISHER_TYPES: tuple[str, ...] = get_args(FisherType)


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
        uses: every module computing with each block's weight (tied weights; default: its own).
        dtypes: the dtype of each block's statistics; default: as captured.
        loss_reduction: how ``mc``'s per-sample loss reduces over output features.
        class_dim: the class dimension of categorical logits with positions.
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
        loss_reduction: str = "sum",
        class_dim: int | None = None,
    ) -> None:
        self.model, self.class_dim = model, class_dim
        self._next_mask: Tensor | None = None  # (set_loss_mask, set_padding_mask)
        self._next_padding: Tensor | None = None
        self.aligned = False  # rows checked to be the samples in order (row_order)
        self._warned, self._summed = set[str](), SummedLoss()  # (the kinds warned of, once)
        self._mean = TokenMean(accumulation_steps) if loss_reduction == "sum" else None
        self._watch_loss = partial(watch_loss_gradient, warned=self._warned, token_mean=self._mean)
        self._unreached: set[str] = set()  # MC: layers whose outputs missed the model output
        self.layers, self._weights = layers, registered_parameters(layers)
        self.fisher, self.likelihood, self.loss_reduction = fisher, likelihood, loss_reduction
        self.fisher_batch, self.generator = fisher_batch, generator
        self._drawn_from: Tensor | None = None  # the generator before this step's draws
        self.accumulation_steps, self.dtypes, self.active = accumulation_steps, dtypes or {}, False
        self.empty_batch, self.alone = False, misuse.OutsideCalls()  # (0 rows at the last take)
        self._empty_forward = self._eval_forward = False  # since the last take: 0 rows, eval()
        self._forward: ForwardPass | None = None
        self._records: dict[str, list[Record]] = {name: [] for name in layers}
        self._done: list[ForwardPass] = []  # forwards the user's backward reached, by then
        this = weakref.ref(self)  # (held weakly: a dropped optimizer leaves no hook acting)
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(WeakHook(this, "_root_pre_hook"), with_kwargs=True),
        ]
        uses = uses or {name: [module] for name, module in layers.items()}
        self._first = [  # (before a user's hooks, and kept so: misuse.keep_hooks_first)
            m.register_forward_hook(WeakHook(this, "layer_hook", n), prepend=True, with_kwargs=True)
            for n, modules in uses.items()
            for m in modules
        ]
        self._handles += self._first
        for attention in attention_modules(model, layers):
            hook = WeakHook(this, "_attention_hook")
            self._handles.append(attention.register_forward_hook(hook, with_kwargs=True))
        # after the layers' hooks: a root module that is itself a layer records first
        self._handles.append(model.register_forward_hook(WeakHook(this, "_root_hook")))
        self._marks = Marks(self._handles)  # (what backwards write: dropped_gradients)
        weakref.finalize(self, remove_all, self._handles)

    def remove(self) -> None:
        """Remove every hook (the capture then records nothing)."""
        remove_all(self._handles)

    def _capturing(self, module: nn.Module) -> bool:
        """Whether the forward that starts now is captured: armed, in train mode with
        gradients, not recomputed inside a backward (activation checkpointing), and with the
        layers' own weights and biases (``torch.func.functional_call`` swaps in others)."""
        armed = self.active and module.training and torch.is_grad_enabled() and not in_backward()
        self.alone.swapped = parameters_swapped(self._weights) if armed else None
        return armed and self.alone.swapped is None

    def set_loss_mask(self, mask: Tensor | None) -> None:
        """The positions of the next forward's logits that its loss counts (``[N, T]`` for
        ``[N, T, C]`` logits: ``targets != ignore_index``), for the MC Fisher's sampled
        loss (:mod:`.loss_mask`); the next forward of the model uses it, captured or not.

        Raises:
            ValueError: for ``fisher="mc"`` with a likelihood other than ``categorical``.
        """
        check_mask_likelihood(mask, self.fisher, self.likelihood)
        self._next_mask = None if mask is None else mask.detach()

    def set_padding_mask(self, mask: Tensor | None) -> None:
        """The real positions ``[N, T]`` of the next forward's inputs (``True`` where a token
        is real), whose padding the position-wise layers leave out (:mod:`.padding_mask`)."""
        self._next_padding = real_positions(mask)

    def _root_pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._forward = None
        mask, padding = self._next_mask, self._next_padding
        self._next_mask = self._next_padding = None
        self.alone.root()
        if not self._capturing(module):  # (a training forward left in eval(): told at take)
            self._eval_forward |= self.active and not module.training and torch.is_grad_enabled()
            return
        misuse.keep_hooks_first(self._first, self._warned)  # (prepare_qat prepends its own)
        batch = int((x := batch_argument(args, kwargs)).shape[0])
        if batch == 0:  # no sample: nothing recorded or drawn (an empty batch or DDP share)
            self._empty_forward = True
            return
        index = None
        if self._drawn_from is None:
            self._drawn_from = self.generator.get_state()
        if self.fisher_batch < 1.0:
            size = max(1, round(self.fisher_batch * batch))
            perm = torch.randperm(batch, generator=self.generator)
            index = perm[:size].sort().values.to(x.device)
        padding = padding_rows(padding, batch, index)
        others = other_rows(args, kwargs, x) if batch == 1 else ()  # (model(code, x))
        aligned = self.aligned or (index is not None and self.fisher == "mc")  # (its δ: row i's)
        self._forward = ForwardPass(index, batch, mask, x, others, padding, aligned)
        self._forward.on_backward = weakref.WeakMethod(self._backward_started)

    def layer_hook(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Tensor | None = None,
    ) -> None:
        """Record one call of a block's module in the forward in flight (every layer of a
        captured forward counts, whatever its own train/eval flag: a frozen-BatchNorm
        backbone put in ``eval()`` still trains its Linear and convolution layers)."""
        if output is None:  # copied without ``with_kwargs`` onto a module that replaced it
            raise RuntimeError(misuse.replaced_layer(name, module))
        forward = self._forward
        if forward is None and self.active and not self.alone.inside:
            self.alone.note(name, output, in_backward())
        if forward is None or not output.requires_grad or in_backward() or not trains(module):
            return  # (an output without a graph, or gradients disabled; a layer frozen whole)
        x = args[0] if args else next(iter(kwargs.values()))  # layer(input=x) too
        reshaped = sample_major(x, forward)  # its rows k per sample, in the batch's order
        check_subset_rows(f"the input of layer {name!r}", x, forward, reshaped)
        check_batched_input(name, module, x, forward, reshaped)
        check_registration(name, module, (args, kwargs), output, self.model)
        kept = recorded_input(module, x.detach())
        record = Record(module, fisher_rows(kept, forward), forward, None, reshaped)
        if output.grad_fn is not None:
            forward.add_output(output.grad_fn, module, x)
            if record.reshaped:  # its rows as ordered as its input's
                forward.ordered.add(output.grad_fn)
        forward.records.setdefault(name, []).append(record)
        self._records[name].append(record)
        if self.fisher == "mc":
            forward.outputs.setdefault(name, []).append(get_gradient_edge(output))
        else:
            scale = float(forward.batch_size * self.accumulation_steps)
            output.register_hook(empirical_hook(name, record, forward, scale, output))

    def _attention_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        """In a captured forward, attention's output recomputed with its projections called
        as modules (:mod:`.attention`), also when activation checkpointing reruns it inside
        the backward (armed, without recording); else ``None`` (the output stands)."""
        if in_backward():
            if not (self.active and self.model.training and torch.is_grad_enabled()):
                return None
        elif self._forward is None:
            return None
        return recompute_attention(module, args, kwargs)  # type: ignore[arg-type]

    def _root_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """The model's forward returned: close it (later layer calls are not its samples)
        and, for ``fisher="mc"``, sample its targets' gradients; then let go of its records
        (a reference cycle kept them until Python's collector ran: 12 MiB at a refresh)."""
        forward, self._forward = self._forward, None
        self.alone.close(output)
        if forward is None:
            return
        try:
            self._close(forward, output)
        finally:
            forward.release()
        if self.fisher == "empirical":  # (a loss summed over the samples: loss_scale)
            self._summed.watch(output, forward, self.class_dim)

    def _backward_started(self, forward: ForwardPass) -> None:
        """The user's backward reached ``forward``: :func:`~.dropped_gradients.backward_started`."""
        self._done = backward_started(forward, self._done, self.layers, self._marks)
        misuse.warn_held(len(self._done), self.accumulation_steps, self._warned)

    def _close(self, forward: ForwardPass, output: Any) -> None:
        """:meth:`_root_hook` of a captured forward."""
        calls = {name: len(records) for name, records in forward.records.items()}
        check_weight_uses(output, self.layers, calls, self.model)
        in_order = partial(sample_major, forward=forward)  # (logits flattened in forward)
        watch_positions(output, self.class_dim, forward, in_order, self.fisher == "mc")
        check_padding_matched(forward.padding, (r for rs in forward.records.values() for r in rs))
        empirical = self.fisher == "empirical" and forward.index is None
        check_batch_rows(forward, output, empirical)
        if not forward.outputs:
            return
        output = sampled_output(output)  # the tensor, or a dict's (ModelOutput's) "logits"
        if not output.requires_grad or not drawable(output, self.likelihood, self.class_dim):
            return  # a NaN/Inf output (not -inf logits) gives no statistics this step
        samples, class_dim = self._per_sample(output, forward)
        loss = self._sampled_loss(samples, forward, class_dim)
        keys = [(name, i) for name, outs in forward.outputs.items() for i in range(len(outs))]
        edges = [forward.outputs[n][i] for n, i in keys]
        misuse.warn_backward_hooks(self.model, self._warned)  # (Opacus: run by the MC pass)
        grads = sampled_gradients(loss, edges)
        reached = {n for (n, _), grad in zip(keys, grads, strict=True) if grad is not None}
        self._unreached |= set(forward.outputs) - reached  # judged at take()
        for (name, i), grad in zip(keys, grads, strict=True):
            if grad is not None:  # a call whose output does not reach the output: δ = 0
                forward.records[name][i].grad = fisher_rows(grad.detach(), forward)
        self._watch_loss(output, samples.shape, forward, class_dim, self.likelihood)

    def _per_sample(self, output: Tensor, forward: ForwardPass) -> tuple[Tensor, int | None]:
        """The model output as ``[N, …]`` with its class dimension (logits flattened inside
        ``forward``: :func:`~.likelihoods.per_sample_output`), the loss mask as its positions."""
        if not sample_major(output, forward):  # (other rows under a Fisher subset: refused)
            return output, self.class_dim
        view, class_dim = per_sample_output(
            output, forward.batch_size, self.likelihood, self.class_dim
        )
        mask = forward.mask
        if view is not output and mask is not None and mask.numel() == view.shape[:2].numel():
            forward.mask = mask.reshape(view.shape[:2]) if view.dim() == 3 else mask
        return view, class_dim

    def _sampled_loss(self, output: Tensor, forward: ForwardPass, class_dim: int | None) -> Tensor:
        """The MC Fisher's loss of the Fisher mini-batch rows, with targets sampled from the
        model (:func:`~.likelihoods.sampled_nll`) at the positions the loss mask counts."""
        check_subset_rows("the model output", output, forward)
        check_output(output, self.likelihood, class_dim, forward.batch_size)
        batch = forward.batch_size  # (the output's rows need not be the samples)
        mask, positions = counted_mask(forward.mask, output, class_dim, self.likelihood, batch)
        return sampled_nll(
            fisher_rows(output, forward),
            self.likelihood,
            self.generator,
            self.loss_reduction,
            class_dim,
            None if mask is None else fisher_rows(mask, forward),
            positions,
            forward.samples,
        )

    def take(self, loss_scale: float = 1.0) -> CapturedBatch:
        """The records gathered since the last call (forwards whose backward has run), each
        layer's statistics formed when read (:class:`CapturedBatch`); clears the buffers and
        sets :attr:`empty_batch`: whether only forwards over 0 rows ran (:meth:`_root_pre_hook`).
        The calls of one layer within one forward are concatenated along ``T``, the forwards
        along ``N``; the empirical ``δ`` are divided by ``loss_scale`` (a ``GradScaler``'s)."""
        check_unreached(self._unreached, self.layers)
        self._unreached = set()
        settle(self._done, self.layers, self._records)  # (dropped gradients, held δ)
        taken: dict[str, list[Forward]] = {}
        for name in self.layers:
            records, self._records[name] = self._records[name], []
            calls: dict[int, list[Record]] = {}  # by forward pass
            for record in records:
                if record.owner.backward_done:  # a forward without backward is no sample
                    calls.setdefault(id(record.owner), []).append(record)
            # a call over no rows (a layer the forward sent none of its rows) has no sample
            done = [
                c
                for c in calls.values()
                if any(r.grad is not None for r in c) and c[0].inputs.numel() > 0
            ]
            if len(done) > self.accumulation_steps and self.fisher == "empirical":
                misuse.warn_forwards(len(done), self.accumulation_steps, self._warned)
            if done:
                taken[name] = [(c[0].owner.samples, [Call.of(r) for r in c]) for c in done]
        misuse.check_in_model(self.model, self.layers, taken)  # (a layer replaced since)
        self.empty_batch = self._empty_forward and not taken
        if self._eval_forward and not taken and not self._empty_forward:
            misuse.warn_eval_forwards()
        self._empty_forward = self._eval_forward = False
        self.alone.judge(bool(taken))
        self._forward, self._drawn_from, self._done = None, None, []
        # the empirical δ carry a GradScaler's scale (an embedding's ā carry them)
        scale = loss_scale if self.fisher == "empirical" else 1.0
        self._summed.judge(scale)
        if self._mean is not None:  # (the user's gradient carries a GradScaler's scale)
            self._mean.judge(loss_scale)
        return CapturedBatch(self.layers, taken, self.dtypes, scale)

    def discard(self, drawn_from: Tensor | None = None) -> None:
        """Drop everything captured so far (e.g. on a skipped step), and rewind the generator
        to before the draws made for it (the rows, the MC targets; ``drawn_from``: the
        state :attr:`drawn_from` had before a :meth:`take` that cleared it): a skipped
        step leaves the draws of the steps after it as they would have been without it."""
        self._unreached, self._empty_forward, self._eval_forward = set(), False, False
        self._summed.seen = []
        if self._mean is not None:
            self._mean.seen = []
        for name in self._records:
            self._records[name] = []
        drawn_from = self._drawn_from if self._drawn_from is not None else drawn_from
        if drawn_from is not None:
            self.generator.set_state(drawn_from)
        self._forward, self._drawn_from, self._done = None, None, []

    def pending(self) -> dict[str, Any]:
        """What is captured and not yet taken, with the generator's state: :meth:`restore`
        puts it back (a refused ``load_state_dict`` between ``backward()`` and ``step()``)."""
        state = {key: getattr(self, key) for key in _PENDING.split()}
        state["_records"] = {name: list(r) for name, r in self._records.items()}
        return {**state, "generator": self.generator.get_state()}

    def restore(self, pending: dict[str, Any]) -> None:
        """Put back what :meth:`pending` returned."""
        for key in _PENDING.split():
            setattr(self, key, pending[key])
        self.generator.set_state(pending["generator"])

    @property
    def drawn_from(self) -> Tensor | None:
        """The generator's state before the draws of what is captured now (``None``: no
        draw since the last :meth:`take` or :meth:`discard`)."""
        return self._drawn_from


# the attributes of what a capture holds between a forward and the step that takes it
_PENDING = "_records _unreached _empty_forward _forward _drawn_from active _next_mask _next_padding"
_PENDING += " empty_batch _done"
