"""Checks of one captured forward against what the curvature blocks assume, refusing the
set-ups that would make a step silently wrong (run by :class:`~.capture.CurvatureCapture`).

* :func:`check_weight_uses`: a block's weight read outside its modules' calls.
* :func:`check_batch_rows`: a first tensor argument whose rows are not the batch.
* :func:`check_subset_rows`: a Fisher subset taken from a tensor whose rows are not the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .batch_independent import shared_rows
from .blocks import bias_only, block_parameters, has_gradient
from .forward_misuse import batch_not_first, warn_sample_major, warn_unproved_data_rows
from .pooled_rows import pooled_by
from .row_order import moved_rows
from .shared_indices import check_unbatched_embedding

if TYPE_CHECKING:
    from .forward_pass import ForwardPass

__all__ = [
    "check_batch_rows",
    "check_batched_input",
    "check_calls_on_parts",
    "check_subset_rows",
    "check_unreached",
    "check_weight_uses",
    "output_tensors",
]


def output_tensors(output: Any) -> Iterator[Tensor]:
    """The tensors of a model output: a tensor, or nested tuples, lists and dicts of them."""
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from output_tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from output_tensors(value)


def check_weight_uses(
    output: Any, layers: dict[str, nn.Module], calls: dict[str, int], model: nn.Module
) -> None:
    """Refuse a weight the forward also uses outside its modules' calls.

    Walks autograd's graph from every tensor of the model ``output`` and counts, for each
    block's weight, the operations that read it; more than the calls its modules made
    (``calls``) means a functional use, e.g. a tied decoder
    ``F.linear(h, encoder.weight.t())``, whose curvature the block would not see while
    preconditioning its gradient; an embedding's lookup counts as a read like any other (a
    head ``F.linear(h, wte.weight)`` tied to it is refused, a tied ``nn.Linear`` head that
    is a call of the shared block is not). Under autocast a weight's cast is cached and
    shared, so uses there may go unseen. A layer whose module is no longer one of
    ``model``'s, its weight read by the module that replaced it (``prepare_qat`` swapping a
    fused ``nni`` sequence after the optimizer was built), is named as replaced.

    Raises:
        ValueError: naming the layer, the counts and the fix.
    """
    # a layer that trains its bias alone: the bias (its frozen weight has no AccumulateGrad)
    weights = {id(block_parameters(m)[0]): name for name, m in layers.items()}
    reads: dict[str, int] = dict.fromkeys(layers, 0)
    custom: dict[str, str] = {}  # (a weight read by a custom autograd.Function's backward)
    seen: set[int] = set()
    stack: list[Any] = [t.grad_fn for t in output_tensors(output) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for child, _ in node.next_functions:
            variable = getattr(child, "variable", None)  # an AccumulateGrad node
            name = weights.get(id(variable)) if variable is not None else None
            if name is not None:
                reads[name] += 1
                if hasattr(node, "_forward_cls"):  # (the user's class, not its backward's)
                    custom[name] = getattr(node._forward_cls, "__name__", type(node).__name__)
            stack.append(child)
    for name, count in reads.items():
        if count > calls.get(name, 0):
            if not calls.get(name) and all(m is not layers[name] for m in model.modules()):
                raise ValueError(
                    f"layer {name!r} is no longer a module of the model, but its weight is "
                    "read in the forward: its module was replaced after the optimizer was "
                    "built (prepare_qat, fuse_modules(inplace=True), model.fc = ...), and the "
                    "optimizer's block belongs to the old one. Build the optimizer after "
                    "changing the model"
                )
            what = "bias" if bias_only(layers[name]) else "weight"  # a bias alone: its key
            if name in custom:
                raise ValueError(
                    f"layer {name!r}: its {what} is read by a custom autograd.Function "
                    f"({custom[name]}), whose backward makes its gradient outside the "
                    "module's calls (an adjoint ODE solver, a hand-written backward): the "
                    "layer's block never sees that curvature. Backpropagate through the "
                    "module's calls instead (odeint without the adjoint), or leave the layer "
                    "out with params="
                )
            if not calls.get(name) and isinstance(layers[name], nn.Embedding):
                raise ValueError(
                    f"layer {name!r}: its table is read {count} times in the forward, but "
                    "the module never ran: read whole, as DETR's query_embed.weight or "
                    "learned latents are (unsqueeze(0).repeat(B, 1, 1)), its rows are no "
                    "sample's lookups and its block cannot see them. Look them up by "
                    "calling it, query(torch.arange(Q).expand(B, Q)) (the same values, one "
                    "row per sample), or leave the layer out with params="
                )
            raise ValueError(
                f"layer {name!r}: its {what} is read {count} times in the forward but its "
                f"module(s) ran {calls.get(name, 0)} times. The forward reuses a tensor "
                "from an earlier forward that still carries its graph: where one backward "
                "should run through both (a recurrent cell stepped outside forward, h = "
                "model(x[:, t], h)), move the loop into the model's forward; where not "
                "(iterative sampling or generation with gradients on: a diffusion sampler's "
                "x = x - model(x, t), a KV cache), run those forwards under torch.no_grad() "
                "or detach the cache. Or a functional use (such as a tied decoder F.linear(h, "
                "encoder.weight.t())) adds gradient that the layer's block never sees: untie "
                "it, make the other use a module sharing the weight (b.weight = a.weight), "
                "or leave the layer out with params="
            )


def check_batch_rows(forward: ForwardPass, output: Any, empirical: bool) -> None:
    """Refuse a forward whose one-row first argument is not its batch (``model(code, x)``:
    :func:`~.forward_misuse.batch_not_first`), and a model output whose rows pool the
    batch's (the rows of the model's first tensor argument:
    :func:`~.pooled_rows.pooled_by`): a graph-level model called as
    ``model(x, edge_index, batch)`` pools its ``N`` node rows into ``G`` graph rows, and
    its nodes were taken as the samples (the empirical Fisher ``N/G`` times the per-graph
    one). Output rows taken one for one from the samples' (``head(h[mask])``) pass. Under
    the ``empirical`` Fisher of the whole batch, also a batch size that no layer input
    has (it scales each ``δ``; the forward's records say which its layers have). A layer
    may see a multiple of a batch of more than one sample (tokens flattened into rows), and
    a batch of one's rows proved ``k`` per sample.

    Raises:
        RuntimeError: naming the counts and the fix.
    """
    batch, records = forward.batch_size, forward.records
    if forward.other_rows and (why := batch_not_first(forward, output)) is not None:
        raise RuntimeError(why)
    pooled = pooled_by(output, batch, forward.per_sample)
    if pooled is not None:
        raise RuntimeError(
            f"the model output's rows pool the {batch} rows of its first tensor argument, "
            f"which KFAC takes as the batch of samples ({pooled}): a graph-level model called "
            "as model(x, edge_index, batch) pools its nodes into graphs, and the losses are "
            "the graphs', not the nodes'. Pass a tensor with one row per graph first "
            "(model(graph_ids, x, edge_index, batch)), so that the graphs are the samples"
        )
    if not empirical or not records:
        return
    rows = {int(r.inputs.shape[0]) for recs in records.values() for r in recs}
    rows |= {int(t.shape[0]) for t in output_tensors(output) if t.dim() > 0}
    if batch in rows or (batch > 1 and any(r % batch == 0 for r in rows)):
        return
    if any(r.reshaped for recs in records.values() for r in recs):
        return  # (rows proved k per sample of the batch, a batch of one's flattened tokens)
    raise RuntimeError(
        f"the model's first tensor argument has {batch} rows, but its layers see "
        f"{sorted(rows)}: KFAC takes the batch size (the empirical Fisher's scale) from the "
        "first tensor argument of model(...); pass the batch first"
    )


def check_unreached(unreached: set[str], layers: dict[str, nn.Module]) -> None:
    """Refuse, at the step, a layer whose outputs did not reach the model output in a
    captured forward (``fisher="mc"`` differentiates the sampled loss of the output) but
    that has a gradient: its Fisher would silently be zero. A layer without a gradient (a
    detached branch, a logged value) is left alone, as every unused layer is.

    Raises:
        RuntimeError: naming the layers and the usual causes.
    """
    wrong = sorted(name for name in unreached if has_gradient(layers[name]))
    if wrong:
        raise RuntimeError(
            f"fisher='mc' cannot differentiate the sampled loss with respect to the output "
            f"of layer(s) {wrong}, which have gradients: their outputs do not reach the "
            "model output fisher='mc' samples from (they feed a loss of their own: a value "
            "head beside a dict's 'logits', an auxiliary loss computed from a stored "
            "activation; or a torch.compile'd model hides its layers' outputs); their Fisher "
            "would silently be zero. Step them with another optimizer (leave them out of "
            "params=), or use fisher='empirical', or an eager model whose loss reads the "
            "sampled output"
        )


def check_subset_rows(what: str, tensor: Tensor, forward: ForwardPass, k: bool = False) -> None:
    """Refuse a Fisher subset (``forward.index``: its rows of the batch, ``None`` without
    one) whose rows would be taken from a tensor whose first dimension is not the batch
    (e.g. logits flattened to ``[N·T, C]`` inside ``forward``), unless they are proved
    ``k`` per sample in its order (``k``: a layer's input, :func:`~.calls.sample_major`;
    refused before 2026-12-06 (evening)), whose subset is the ``k`` rows of its samples.

    Raises:
        RuntimeError: naming ``what`` and the shapes.
    """
    index, batch_size = forward.index, forward.batch_size
    if index is not None and not k and (tensor.dim() == 0 or tensor.shape[0] != batch_size):
        raise RuntimeError(
            f"{what} has shape {tuple(tensor.shape)}, but the model's input has "
            f"{batch_size} rows: fisher_batch < 1 picks the Fisher mini-batch on the "
            "first dimension of every layer's input and of the model output, so it must be "
            "the batch there too (or proved k rows per sample: x.reshape(B * T, D) of a "
            "batch-first tensor; not rows through a product of computed tensors, as "
            "attention on windows folded into the batch). Use fisher_batch=1 (every row): "
            "rows gathered from the "
            "batch's (an expert's tokens, h[mask]) cannot be picked by sample; or, for "
            "outputs flattened to [N·T, C], keep the batch first in forward and flatten in "
            "the loss (fisher='mc' with likelihood='categorical' needs [N, C] logits)"
        )


_SAMPLE_RANKS = {nn.Linear: 1, nn.Conv1d: 2, nn.Conv2d: 3, nn.Conv3d: 4}


def check_unbatched_sample(name: str, module: nn.Module, inputs: Tensor) -> None:
    """Refuse a ``Linear`` or convolution called on one unbatched sample (``[D]``,
    ``[C, L]``, ``[C, H, W]``, ``[C, D, H, W]``, which torch accepts): KFAC takes the first
    dimension of a layer input as the batch (the rows of a policy's single state were read
    as samples, and the step raised a bare shape error).

    Raises:
        RuntimeError: naming the layer and the batched call.
    """
    rank = next((r for t, r in _SAMPLE_RANKS.items() if isinstance(module, t)), None)
    if rank is not None and inputs.dim() == rank:
        raise RuntimeError(
            f"layer {name!r} ({type(module).__name__}) was called on one unbatched sample "
            f"of shape {tuple(inputs.shape)} in a forward the optimizer captures: KFAC takes "
            "the first dimension of a layer input as the batch. Call the model on a batch "
            "(x[None] for one sample; a value shared by the batch, such as a diffusion time "
            "step t of shape [], expanded to it: t.expand(B)), or run such forwards under "
            "torch.no_grad() or eval()"
        )


def check_batched_input(
    name: str, module: nn.Module, inputs: Tensor, forward: ForwardPass, reshaped: bool
) -> None:
    """Refuse a layer called on rows shared by the forward's batch of ``B > 1``: a
    parameter (``to_q(self.latents)``: no row of it is a sample's), rows computed from
    parameters alone or one row looked up from them (``to_q(norm(self.latents))``, latents
    or queries ``[1, L, D]`` or a CLS token broadcast to the samples after the layer, a
    prompt ``prompts[i]``: :func:`~.batch_independent.shared_rows`, its walk stopped at the
    nodes of layer outputs already passed, ``forward.per_sample``), calls on parts of the
    batch (:func:`check_calls_on_parts`), an embedding's shared positions or one row
    (:func:`~.shared_indices.check_unbatched_embedding`), and one row of data without a
    graph (a diffusion time step drawn once for the batch, put through a UNet's time
    MLP; a task code: a step 3.8 off on one of 3.94; a row of the model's first
    argument, one sample's routed to this layer, passes). Their rows hold the gradients
    summed over the samples, which KFAC would take as one sample's (a step 0.42 off on one
    of 0.76; computed latents taken as gathered rows: 0.18 to 2.2 off). One computed row
    passes: a mixture-of-experts expert may be routed one token. Other shared inputs
    (positions looked up for the whole batch, a compiled graph) are not recognised.

    Raises:
        RuntimeError: naming the layer and the batched call that fixes it.
    """
    batch = forward.batch_size
    check_unbatched_sample(name, module, inputs)
    check_unbatched_embedding(name, module, inputs, batch)
    check_calls_on_parts(name, inputs, forward, reshaped)
    warn_sample_major(name, module, inputs, forward, reshaped)
    warn_unproved_data_rows(name, module, inputs, forward, reshaped)
    if isinstance(inputs, nn.Parameter):
        what = "a parameter"
    elif batch > 1 and inputs.dim() > 1 and len(inputs) == 1 and inputs.grad_fn is None:
        if _row_of(inputs, forward.first):  # one sample's own row, routed to this layer
            return
        what = "one row of data, as a diffusion time step or a task code drawn for the batch"
    elif batch > 1 and shared_rows(inputs, forward.per_sample, batch):
        what = "computed from parameters alone, as norm(latents) or a looked-up prompt is, or "
        what += "from them and one row of data: sin(t·W)"
    else:
        if forward.aligned:
            check_row_order(name, inputs, forward, reshaped)
        return
    raise RuntimeError(
        f"layer {name!r} was called on an input of shape {tuple(inputs.shape)} shared "
        f"by the batch of {batch} ({what}). Its rows hold the gradients summed over the "
        "samples, which KFAC would take as one sample's; call it once with a row per "
        "sample, e.g. on latents.expand(B, L, D) for [1, L, D] or [L, D] latents, or "
        "t.expand(B) for one time step, before the layer (and any norm on the way). A "
        "parameter that holds one row per sample "
        "(per-sample codes): pass it as a tensor with requires_grad=True instead"
    )


def _row_of(row: Tensor, first: Tensor | None) -> bool:
    """Whether ``row`` (``[1, …]``) equals a row of the model's first argument."""
    if first is None or first.shape[1:] != row.shape[1:] or first.dtype != row.dtype:
        return False
    same = (first == row.to(first.device)).reshape(len(first), -1)
    return bool(same.all(dim=1).any())


def check_row_order(name: str, inputs: Tensor, forward: ForwardPass, reshaped: bool) -> None:
    """Where the layers' per-sample gradients are paired row by row (a coarse level,
    adaptive damping's exact Fisher products) or the same rows of every layer are taken for
    a Fisher mini-batch whose targets are drawn (``fisher_batch < 1`` under ``mc``: the
    ``δ`` of samples not drawn are 0; under ``empirical`` any rows are a subsample of the
    layer's): ``forward.aligned``, refuse a layer whose
    rows are not the samples in the order of the layers before it (:mod:`.row_order`):
    rows of another count not proved ``k`` per sample in order (``reshaped``:
    :func:`~.calls.sample_major`),
    or rows moved along the batch dimension since an earlier layer's output.

    Raises:
        RuntimeError: naming the layer, what its rows are, and the ways out.
    """
    batch, rows = forward.batch_size, int(inputs.shape[0]) if inputs.dim() else 0
    if batch < 2:
        return
    if rows != batch and not reshaped:
        why = f"{rows} rows for the batch of {batch}, not proved k per sample in its order"
    elif (moved := moved_rows(inputs, forward.per_sample, batch)) is not None:
        why = f"rows moved along the batch dimension ({moved}) since an earlier layer"
    else:
        return
    if forward.index is not None:
        needs = "With fisher_batch < 1 under fisher='mc' the targets are drawn for the "
        needs += "samples of the Fisher mini-batch, taken as the same rows of every layer"
        way = "Use fisher_batch=1 or fisher='empirical'"
    else:
        needs = "Two-level KFAC's coarse level and adaptive damping's exact Fisher products "
        needs += "pair the layers' per-sample gradients row by row"
        way = "Use KFAC without them"
    raise RuntimeError(
        f"layer {name!r}: {why}. {needs}, which would take these rows for other samples' "
        "(views concatenated inside forward, gathered tokens, a graph's edges, an expert's "
        f"routed tokens, rows permuted and put back). {way} (KFAC's blocks read such rows "
        "as locations of the batch), or keep one row per sample in the batch's order from "
        "layer to layer"
    )


def check_calls_on_parts(
    name: str, inputs: Tensor, forward: ForwardPass, reshaped: bool = False
) -> None:
    """Refuse a layer called more than once in a forward where a call has fewer rows than
    the batch of ``B > 1``, or other rows than ``B`` not proved ``k`` per sample in its
    order (``reshaped``: :func:`~.calls.sample_major`): parts of the batch (chunks, one
    sample at a time, a recurrent cell on the ``h[:n]`` still running) or rows gathered
    from it (an expert called once per routing slot on ``B`` or more tokens), whose calls
    KFAC would take as more locations of the same samples, pairing row ``i`` of each
    (chunks of 2 and 4 of 8: steps 0.88 and 0.54 off one of 1.34; an expert's two slots:
    EKFAC 49 % off). A layer called again on its own gathered rows (``r + f(r)`` for
    ``r = h[mask]``) is refused too: its calls cannot be told from routing slots by the
    graph (a walk that let them pass let slots through, 4-92 % off). Without a Fisher
    subset only (with one, every input has the batch's rows).

    Raises:
        RuntimeError: naming the layer and the fix.
    """
    earlier = forward.records.get(name, ())
    batch = forward.batch_size
    if not earlier or batch <= 1 or forward.index is not None or inputs.dim() == 0:
        return
    rows = [len(r.inputs) for r in earlier] + [len(inputs)]
    proved = [r.reshaped for r in earlier] + [reshaped]
    gathered = any(n != batch and not ok for n, ok in zip(rows, proved, strict=True))
    if min(rows) >= batch and not gathered:
        return
    first = forward.first
    steps = first is not None and first.dim() > 1 and set(rows) == {first.shape[1]} != {batch}
    raise RuntimeError(
        f"layer {name!r} was called {len(rows)} times in one forward on parts of the batch "
        f"of {batch} or rows gathered from it (rows {rows}): KFAC takes the calls of one "
        "layer as more locations of the same samples, which these are not. Call it once on "
        "every row (concatenate the parts first: one call per expert for all its tokens, the "
        "batch at once instead of a loop over samples or chunks, a recurrent cell on every "
        "sample with the finished ones masked)"
        + (
            f". The batch is the first dimension of the model's first argument ({batch}), "
            "and every call has as many rows as its second: if the first is time steps (a "
            "loop over x[t] of x [T, B, ...]), pass x batch-first and loop over x[:, t]"
            if steps
            else ""
        )
    )
