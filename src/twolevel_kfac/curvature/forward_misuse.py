"""What a forward tells about the training loop that is likely a mistake, said as it is
found (:class:`~.capture.CurvatureCapture` calls these): more forwards than
``accumulation_steps`` under the empirical Fisher, forwards piling up without a step,
training forwards left in ``eval()``, a layer replaced after the optimizer was built (its
hooks copied onto the new one), and a batch that is not the first tensor argument
(``model(code, x)``)."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..warning_level import caller_level
from .batch_dim import first_is_batch, leads_to_batch
from .hooks import on_gradient
from .layer_types import layer_type
from .pooled_rows import main_output

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from .forward_pass import ForwardPass


__all__ = [
    "HELD",
    "OutsideCalls",
    "batch_not_first",
    "replaced_layer",
    "warn_backward_hooks",
    "warn_eval_forwards",
    "warn_forwards",
    "warn_held",
    "warn_sample_major",
    "warn_unproved_data_rows",
]


def warn_forwards(forwards: int, accumulation_steps: int, warned: set[str]) -> None:
    """Warn, once (``warned``: the kinds said), that several forwards' empirical ``δ`` were
    each scaled as a whole batch."""
    if "forwards" in warned:
        return
    warned.add("forwards")
    warnings.warn(
        f"{forwards} forward passes ran before one step with accumulation_steps="
        f"{accumulation_steps}: fisher='empirical' scales each output gradient by "
        "batch size × accumulation_steps, so a loss averaged over k forwards (two views "
        "of a batch, micro-batches, a contrastive or triplet loss over k separate forwards) "
        "needs accumulation_steps=k; a loss summing the forwards' means needs nothing",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


_SAMPLE_MAJOR: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the layers warned of


def warn_sample_major(
    name: str, module: nn.Module, inputs: Tensor, forward: ForwardPass, reshaped: bool
) -> None:
    """Warn, once per layer, of a ``Linear`` called on ``[K, B, …]`` whose second dimension
    is the batch (``B > 1``) and first is not: KFAC reads the first dimension as the rows
    (``K`` gathered rows of ``B`` locations each) where the samples are the second
    (``torch.distributions`` puts ``rsample((K,))``'s samples first: an IWAE decoder
    stepped 0.21–0.54 off in a trial, silently, before 2026-12-08). Rows proved ``k`` per
    sample (``reshaped``) pass, and so does ``K`` a multiple of ``B`` where its first
    dimension leads to the batch (:func:`~.batch_dim.first_is_batch`: Swin's windows,
    ``k·B`` rows of ``B`` tokens, were warned of, with a wrong fix, before 2026-12-09; a
    time-major ``[2B, B, D]`` passed unwarned before 2026-12-10, 0.56–0.77 off), and so
    does a second dimension followed back to another one than the batch (head-major rows
    ``[H·B, L, d]`` at ``L = B`` were told to move their time first before 2026-12-12)."""
    batch = forward.batch_size
    if reshaped or batch < 2 or not isinstance(module, nn.Linear) or inputs.dim() < 3:
        return
    if inputs.shape[1] != batch or module in _SAMPLE_MAJOR:
        return
    if inputs.shape[0] % batch == 0 and first_is_batch(inputs, forward):
        return  # (k·B rows: flattened batch-first, Swin's windows of k = B tokens)
    if inputs.grad_fn is not None and not leads_to_batch(inputs.grad_fn, forward, dim=1):
        return  # (another dimension of B entries: the time of head-major [H·B, L, d] rows)
    _SAMPLE_MAJOR.add(module)
    warnings.warn(
        f"layer {name!r} was called on an input of shape {tuple(inputs.shape)}, whose second "
        f"dimension is the batch of {batch}: KFAC takes the first dimension as the rows "
        f"({inputs.shape[0]} gathered rows of {batch} locations each), not {batch} samples "
        f"of {inputs.shape[0]} locations. If the samples are the second dimension (sample "
        "dimensions first, as torch.distributions' rsample((K,)) puts them; time-major "
        "sequences), move the batch first (z.transpose(0, 1)) before the layer",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


_UNPROVED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the layers warned of


def warn_unproved_data_rows(
    name: str, module: nn.Module, inputs: Tensor, forward: ForwardPass, reshaped: bool
) -> None:
    """Warn, once per layer, of ``k·B`` input rows (``k > 1``) without autograd's history
    that are neither a view of the model's first argument nor a permuted copy of it
    (:mod:`.data_layout`): a positional encoding of ``x.reshape(B·S, 3)`` (a NeRF's points,
    2.6–4.9 off the per-ray step in a trial, silently, before 2026-12-12) is made by
    operations the graph does not record, so nothing tells whether its rows are ``k``
    locations of each sample in order; KFAC reads them as gathered rows (two augmented
    views concatenated inside ``forward``, ``cat([v1(x), v2(x)])``, are ``k = 2`` rows of
    each sample too, view-major: stacked ``[B, 2, …]`` they are read as its locations)."""
    batch, rows = forward.batch_size, len(inputs) if inputs.dim() else 0
    if reshaped or inputs.grad_fn is not None or isinstance(inputs, nn.Parameter):
        return
    if batch < 2 or rows <= batch or rows % batch or module in _UNPROVED:
        return
    k = rows // batch
    _UNPROVED.add(module)
    warnings.warn(
        f"layer {name!r} was called on {rows} rows for the batch of {batch}, made from the "
        "data by operations autograd does not record (no gradient flows into the data: a "
        "positional encoding of x.reshape(B * S, D), a normalized copy, a view of another "
        "argument than the first), so nothing tells "
        f"whether they are {k} locations of each sample in order: KFAC reads them as "
        "gathered rows (two-level KFAC refuses them). If they are, keep the samples first "
        f"in the layer's input, [B, {k}, ...] (encode x.reshape(B, S, D) and apply the "
        "layers to it unflattened, stack views as [B, 2, ...], look up ids [B, k]), which "
        "KFAC reads as locations of each sample",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def keep_hooks_first(handles: list[RemovableHandle], warned: set[str]) -> None:
    """Put each layer hook of ``handles`` back before its module's other forward hooks
    (called before a forward, not while the hooks run), and warn once (``warned``) of
    global forward hooks, which run before every module's own. A hook registered after the
    optimizer with ``prepend=True`` ran before the layer's, and one replacing the output
    made ``δ`` the gradient at its output: ``torch.ao.quantization.prepare_qat``'s
    observer on a module it does not swap (``nn.Conv1d``) fake-quantizes the output, and
    ``δ`` missed its clip mask while ``∇W`` had it (0.15–0.29 off in a trial before
    2026-12-10, silently)."""
    for handle in handles:
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks and next(iter(hooks)) != handle.id:
            hooks.move_to_end(handle.id, last=False)
    count = len(nn.modules.module._global_forward_hooks)
    if not count or "global hooks" in warned:
        return
    warned.add("global hooks")
    warnings.warn(
        f"{count} global forward hook(s) (torch.nn.modules.module."
        "register_module_forward_hook) run before the optimizer's layer hooks: one that "
        "replaces a layer's output (a fake-quantizing observer, a clamp) makes KFAC take the "
        "output gradients at the replaced output, not the layer's own, and its steps wrong. "
        "Register such a hook on the module (module.register_forward_hook) instead; a hook "
        "that only observes is harmless",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


HELD = 64
"""Forwards waiting for a step, beyond ``4·accumulation_steps``, that :func:`warn_held`
tells of."""


def warn_held(forwards: int, accumulation_steps: int, warned: set[str]) -> None:
    """Warn, once (``warned``), that more than ``HELD + 4·accumulation_steps`` captured
    forwards wait for a step: an optimizer no longer stepped (a first phase's, still held by
    its LR scheduler) that stopped at a step due to capture records every training forward
    of the model (a trial: 913 MiB after 300 steps of an MLP)."""
    if forwards <= HELD + 4 * accumulation_steps or "held" in warned:
        return
    warned.add("held")
    warnings.warn(
        f"{forwards} captured forwards wait for this optimizer's next step() (with "
        f"accumulation_steps={accumulation_steps}), and their layer inputs are kept until "
        "then. An optimizer no longer stepped (a first phase's, still referenced by its LR "
        "scheduler) records every training forward of the model: call "
        "old_optimizer.preconditioner.remove_hooks() or drop every reference to it. A step "
        "after many micro-batches: set accumulation_steps to their number (the limit grows "
        "with it). A network stepped rarely (a discriminator) keeps its forwards until its "
        "step",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def warn_eval_forwards() -> None:
    """Warn that a step due to capture saw forwards in ``eval()`` mode only (a validation
    pass that left the model there): the factors stay as they are."""
    warnings.warn(
        "the model ran in eval() mode (with gradients) at a step that captures curvature, "
        "and no forward ran in train mode: nothing was captured, and the factors stay as "
        "they are (none before the first capture) for as long as the model stays in "
        "eval(). Call model.train() after a validation pass (and run it under "
        "torch.no_grad()); to fine-tune with frozen BatchNorm statistics, put only the "
        "BatchNorm modules in eval(), not the whole model",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def replaced_layer(name: str, module: nn.Module) -> str:
    """What to say when layer ``name``'s hook runs on ``module``, which replaced it after
    the optimizer was built (``torch.ao.quantization.prepare_qat`` swaps modules and copies
    their forward hooks, without ``with_kwargs``): the block belongs to the old module."""
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    return (
        f"layer {name!r} was replaced by a {kind} after the optimizer was built (as "
        "torch.ao.quantization's prepare_qat or convert swaps modules, copying their hooks): "
        "the optimizer's curvature block belongs to the module it replaced. Build the "
        "optimizer after converting the model"
    )


def check_in_model(model: nn.Module, layers: dict[str, nn.Module], called: Iterable[str]) -> None:
    """Refuse, at a capturing step, a layer that was not called and whose weight is no
    parameter of ``model`` any more: replaced after the optimizer was built (``model.fc =
    nn.Linear(…)``, transformers' ``resize_token_embeddings``), whose new module the
    optimizer never sees (it stood still, silently, before 2026-12-06 (late)). Walks the
    model's parameters only where a layer was not called (one unused this step: an
    auxiliary head, a branch).

    Raises:
        ValueError: naming the layer and the fix.
    """
    missing = set(layers) - set(called)
    if not missing:
        return
    present = {id(p) for p in model.parameters()}  # (an attention's in_proj: no submodule)
    gone = [
        name
        for name in layers
        if name in missing and id(getattr(layers[name], "weight", None)) not in present
    ]
    if gone:
        raise ValueError(
            f"layer(s) {gone} are no longer modules of the model: replaced after the optimizer "
            "was built (model.fc = nn.Linear(...), resize_token_embeddings), and the optimizer "
            "holds the old ones, which nothing calls. Build the optimizer after changing the "
            "model"
        )


def batch_not_first(forward: ForwardPass, output: Any) -> str | None:
    """Why the forward's first tensor argument, of one row, is not its batch, or ``None``:
    another argument has ``M > 1`` rows, and the model's main output and a layer's input
    (its rows not proved ``k`` per row of the first argument: a batch of one's tokens
    flattened) have a multiple of ``M``. ``model(code, x)`` with a task code ``[1, D]``
    first: KFAC took a batch of one sample, so the code's layer was not refused as shared
    (its rows hold the gradients summed over the samples) and each ``δ`` was scaled for one
    sample. Pass: a graph-level model on one graph, ``model(graph_ids, x, edge_index,
    batch)`` (one output row); a sequence of one sample whose layers see its one row (a
    recurrent state ``[L, 1, H]`` or a ``[T, T]`` mask beside it, the logits flattened
    after the head) or its rows proved from it."""
    main = main_output(output)
    rows = int(main.shape[0]) if main is not None and main.dim() else 0
    layer_rows = {
        int(r.inputs.shape[0])
        for recs in forward.records.values()
        for r in recs
        if r.inputs.dim() and not r.reshaped
    }
    matched = [
        m
        for m in forward.other_rows
        if 1 < m and rows % m == 0 and any(n > 1 and n % m == 0 for n in layer_rows)
    ]
    if rows < 2 or not matched:
        return None
    return (
        f"the model's first tensor argument has one row, but another has {matched[0]} and "
        f"the output {rows}: KFAC takes the batch of samples from the first tensor argument "
        "of model(...), so it would take one sample here (a task code or a time step drawn "
        "for the batch, passed first: its layer's rows hold the gradients summed over the "
        "samples). Pass the batch first, model(x, code), and expand a shared row to the "
        "batch (code.expand(len(x), -1)) before its layer; if that argument's rows are the "
        "one sample's (a query scored against its documents), give it a batch dimension of "
        "one (docs[None])"
    )


def warn_backward_hooks(model: nn.Module, warned: set[str]) -> None:
    """Warn, once, of modules with module backward hooks (or global ones) at a forward whose
    Monte-Carlo targets are drawn (``fisher="mc"``): their gradients are taken inside
    ``model(x)``, and torch runs the hooks there with the sampled gradient. Opacus's
    per-sample hooks then fail in the user's backward (``IndexError: pop from empty
    list``)."""
    if "backward_hooks" in warned:
        return
    hooked = [  # (a layer, or a module holding one: the root's own hooks run after the pass)
        name
        for name, m in model.named_modules()
        if name
        and (m._backward_hooks or m._backward_pre_hooks)
        and any(layer_type(sub) is not None for sub in m.modules())
    ]
    glob = torch.nn.modules.module
    if glob._global_backward_hooks or glob._global_backward_pre_hooks:
        hooked.append("<global>")
    if not hooked:
        return
    warned.add("backward_hooks")
    warnings.warn(
        f"module(s) {hooked[:5]}{' …' if len(hooked) > 5 else ''} have module backward hooks "
        "(register_full_backward_hook; Opacus's per-sample gradients): under fisher='mc' the "
        "sampled targets' gradients are taken inside model(x), and torch runs these hooks "
        "there with them, before the loss's backward. Opacus then fails in loss.backward() "
        "(IndexError: pop from empty list): use fisher='empirical' with Opacus, and expect "
        "your own hooks to see the sampled gradient first",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


class OutsideCalls:
    """Layer calls outside a call of the optimizer's module at a step that captures (a
    submodule or a method called directly: a Lightning wrapper's ``self.net(x)``, a second
    view through ``model.encoder(x2)``). ``before_root``: such calls before any forward of
    the module since the last step (the refusal for want of statistics names it); layers
    whose outside calls reached a backward are warned of at the step, once: their blocks
    leave those calls out."""

    def __init__(self) -> None:
        self.before_root, self.root_called, self.warned = False, False, False
        self.inside = False  # a forward of the module in flight (functional_call's too)
        self.names: set[str] = set()
        self.swapped: str | None = None  # the forward in flight runs on other tensors (hooks)
        self.swapped_reached = self.swapped_warned = False

    def note(self, name: str, output: Tensor, backward: bool) -> None:
        """Layer ``name`` ran outside the module (``backward``: inside a backward)."""
        self.before_root |= not self.root_called
        if output.requires_grad and not backward and not self.warned:
            on_gradient(output, lambda _: self.names.add(name))

    def root(self) -> None:
        """The optimizer's module was called (its forward runs until its root hook)."""
        self.before_root, self.root_called, self.inside = False, True, True

    def close(self, output: Any) -> None:
        """The module's forward returned; one that ran on other tensors than the layers'
        weights (``torch.func.functional_call``: not captured) is watched for a backward."""
        self.inside, main = False, main_output(output)
        if self.swapped == "computed" and main is not None and main.requires_grad:
            on_gradient(main, lambda _: setattr(self, "swapped_reached", True))
        self.swapped = None

    def judge(self, captured: bool) -> None:
        """At the step: warn of the layers whose outside calls reached a backward, and of a
        forward on swapped parameters that did where others were ``captured``."""
        if self.swapped_reached and captured and not self.swapped_warned:
            self.swapped_warned = True
            warnings.warn(
                "a forward of the model under torch.func.functional_call with other tensors "
                "swapped in for its layers' parameters (fast weights, perturbed weights) "
                "reached a backward at a step that captures curvature: such forwards are not "
                "captured, so the step preconditions their gradient with the curvature of "
                "the model's other forwards (first-order MAML's query loss at the fast "
                "weights took the support set's: a step 1.4 off in a trial). Run the "
                "forward whose gradient is stepped on the model's own parameters",
                RuntimeWarning,
                stacklevel=caller_level(),
            )
        self.swapped_reached = False
        names, self.names, self.root_called = sorted(self.names), set(), False
        if not names or self.warned:
            return
        self.warned = True
        warnings.warn(
            f"layer(s) {names} ran outside a call of the optimizer's module at a step that "
            "captures curvature (a submodule or a method called directly: model.encoder(x2)), "
            "and the loss reached them: the optimizer captures the forwards of the module "
            "itself, so their blocks leave those calls out. Call the module for them (a "
            "forward that takes every input), or build the optimizer on the module you call",
            RuntimeWarning,
            stacklevel=caller_level(),
        )
