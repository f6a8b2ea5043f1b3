"""Whether a layer input's rows are the same for every sample of the batch: computed from
parameters alone (a Perceiver's or Q-Former's learned latents normalised or projected
before a layer: ``to_q(norm(latents))``, ``[L, D]``), or one row looked up from them (a
prompt ``prompts[i]``).

Such a layer's output rows receive the gradient summed over the samples: KFAC would take
them as rows of their own (``L`` gathered rows, a step 0.18 to 2.2 off in a trial), so
:func:`~.forward_checks.check_batched_input` refuses the layer. The proof walks autograd's
graph back from the input: every path must end at a trained ``nn.Parameter`` through
operations whose every tensor operand is an edge of the graph (:data:`_PURE`: arithmetic,
matrix products, norms, activations, reshapes, slices, casts), lookups by indices
(:data:`_LOOKUPS`), or, for elementwise arithmetic, an operand without a gradient that
leaves the shape as it is and the rows not the batch's (a number, a dropout mask, a
buffer; also a batch statistic such as ``x.mean(0)``, which makes the rows no more per
sample). Anything else stops it without a proof: an operand without a gradient that
broadcasts (the data, with its batch dimension) or meets a parameter of the batch's rows
(``x + delta``), an operation with other hidden operands (``where``'s condition), an
``expand`` or ``repeat`` (latents broadcast to the batch *before* the layer,
``latents.expand(B, L, D)``, are one row per sample: the right call), a node of a layer
output already known not to be so (``stop``), or more than :data:`_WALK` nodes. Rows looked
up by indices may be each sample's (a prompt per sample's task): only one such row is
taken as shared. A compiled graph (``torch.compile``) is one node it cannot see through;
latents as many as the samples, with a number added, pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.autograd.graph import Node

__all__ = ["shared_rows"]

_PURE = frozenset(
    {
        *(f"{op}Backward{i}" for op in ("Add", "Sub", "Mul", "Div") for i in (0, 1)),
        *(f"{op}Backward0" for op in ("Neg", "Addmm", "Mm", "Bmm", "T", "Transpose")),
        *(f"{op}Backward0" for op in ("Permute", "View", "UnsafeView", "ReshapeAlias")),
        *(f"{op}Backward0" for op in ("NativeLayerNorm", "Tanh", "Relu", "Gelu", "Sigmoid")),
        *(f"{op}Backward0" for op in ("Silu", "Softmax", "LogSoftmax", "Clone", "ToCopy")),
        *(f"{op}Backward0" for op in ("Pow", "Sqrt", "Rsqrt", "Exp", "Unsqueeze", "Slice")),
        *(f"{op}Backward0" for op in ("Select", "Cat", "NativeDropout", "Sin", "Cos")),
        *(f"{op}Backward0" for op in ("Log", "Log1p", "Expm1", "Abs", "Erf", "Reciprocal")),
        *(f"{op}Backward0" for op in ("Softplus", "Elu", "LeakyRelu", "Mish", "Hardtanh")),
        *(f"{op}Backward{i}" for op in ("Mean", "Sum", "Squeeze") for i in (0, 1, 2)),
    }
)
_WALK = 256  # autograd nodes looked at, at most


def shared_rows(inputs: Tensor, stop: set[Node], batch: int) -> bool:
    """Whether every row of ``inputs`` is proved the same for every sample of the batch of
    ``batch`` (module docstring): computed from trained parameters alone, or one row
    looked up from them (``prompts[i]``); ``False`` where the walk stops without a proof."""
    node = inputs.grad_fn
    if node is None:
        return False
    stack, seen, looked_up = [node], {node}, False
    while stack:
        node = stack.pop()
        name = type(node).__name__
        looked_up = looked_up or name in _LOOKUPS
        if node in stop or (name not in _PURE and name not in _LOOKUPS) or len(seen) > _WALK:
            return False
        edges = node.next_functions
        if name not in _LOOKUPS and any(p is None for p, _ in edges):
            if not _without_data(node, batch):
                return False  # an operand without a gradient that may be the data
        for parent, _ in edges:
            if parent is None:
                continue
            if type(parent).__name__ == "AccumulateGrad":
                if not isinstance(getattr(parent, "variable", None), nn.Parameter):
                    return False  # an input that requires a gradient (adversarial training)
            elif parent not in seen:
                seen.add(parent)
                stack.append(parent)
    # rows looked up by indices may be each sample's (a per-sample prompt): one row is not
    return not looked_up or len(inputs) == 1


_LOOKUPS = frozenset({"IndexBackward0", "IndexSelectBackward0", "EmbeddingBackward0"})


def _without_data(node: Node, batch: int) -> bool:
    """Whether the operands without a gradient of ``node`` cannot be the data: a layer
    norm's absent weight or bias (``elementwise_affine=False``, ``bias=False``: its input
    has one), or an elementwise operation whose output has the shape of its operands with a
    gradient and not ``batch`` rows (a number, a dropout mask, a buffer: data of the batch
    would have broadcast it to ``batch`` rows, or met a parameter of as many, ``x + delta``);
    ``False`` for any other operation."""
    name = type(node).__name__
    if name == "NativeLayerNormBackward0":
        return node.next_functions[0][0] is not None
    shape = getattr(node, "_input_metadata", None)  # the output's (the gradient's) shape
    if name[:3] not in ("Add", "Sub", "Mul", "Div") or not shape:
        return False
    if len(shape[0].shape) and int(shape[0].shape[0]) == batch:
        return False
    for parent, index in node.next_functions:
        if parent is None:
            continue
        variable = getattr(parent, "variable", None)
        got = variable.shape if variable is not None else parent._input_metadata[index].shape
        if tuple(got) != tuple(shape[0].shape):
            return False
    return True
