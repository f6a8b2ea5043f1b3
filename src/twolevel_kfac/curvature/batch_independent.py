"""Whether a layer input is computed from parameters alone, so that it is the same for
every sample of the batch (a Perceiver's or Q-Former's learned latents normalised or
projected before a layer: ``to_q(norm(latents))``, ``[L, D]``).

Such a layer's output rows receive the gradient summed over the samples: KFAC would take
them as rows of their own (``L`` gathered rows, a step 0.18 to 2.2 off in a trial), so
:func:`~.forward_checks.check_batched_input` refuses the layer. The proof walks autograd's
graph back from the input: every path must end at a trained ``nn.Parameter`` through
operations whose every tensor operand is an edge of the graph (:data:`_PURE`: arithmetic,
matrix products, norms, activations, reshapes, slices, casts), or, for elementwise
arithmetic, an operand without a gradient that leaves the shape as it is (a number, a
dropout mask, a buffer; also a batch statistic such as ``x.mean(0)``, which makes the rows
no more per sample). Anything else stops it without a proof: an operand without a gradient
that broadcasts (the data, with its batch dimension) or enters another operation, an operation
with hidden tensor operands (an embedding's or an index's integers, ``where``'s
condition), an ``expand`` or ``repeat`` (latents broadcast to the batch *before* the layer,
``latents.expand(B, L, D)``, are one row per sample: the right call), a node of a layer
output already known not to be so (``stop``), or more than :data:`_WALK` nodes. The walk
returns the parameters it reached: one with the batch's ``B`` rows may hold a row per
sample (a perturbation ``x + delta``, full-batch embeddings), which the check lets pass.
A compiled graph (``torch.compile``) is one node it cannot see through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.autograd.graph import Node

__all__ = ["from_parameters_alone", "gathered"]

_PURE = frozenset(
    {
        *(f"{op}Backward{i}" for op in ("Add", "Sub", "Mul", "Div") for i in (0, 1)),
        *(f"{op}Backward0" for op in ("Neg", "Addmm", "Mm", "Bmm", "T", "Transpose")),
        *(f"{op}Backward0" for op in ("Permute", "View", "UnsafeView", "ReshapeAlias")),
        *(f"{op}Backward0" for op in ("NativeLayerNorm", "Tanh", "Relu", "Gelu", "Sigmoid")),
        *(f"{op}Backward0" for op in ("Silu", "Softmax", "LogSoftmax", "Clone", "ToCopy")),
        *(f"{op}Backward0" for op in ("Pow", "Sqrt", "Rsqrt", "Exp", "Unsqueeze", "Slice")),
        *(f"{op}Backward0" for op in ("Select", "Cat", "NativeDropout")),
        *(f"{op}Backward{i}" for op in ("Mean", "Sum", "Squeeze") for i in (0, 1, 2)),
    }
)
_WALK = 256  # autograd nodes looked at, at most


def from_parameters_alone(inputs: Tensor, stop: set[Node]) -> list[nn.Parameter] | None:
    """The trained parameters ``inputs`` is proved to be computed from alone (module
    docstring); ``None`` where the walk stops without a proof."""
    node = inputs.grad_fn
    if node is None:
        return None
    stack, seen, reached = [node], {node}, []
    while stack:
        node = stack.pop()
        if node in stop or type(node).__name__ not in _PURE or len(seen) > _WALK:
            return None
        edges = node.next_functions
        if any(p is None for p, _ in edges) and not _without_data(node):
            return None  # an operand without a gradient that broadcasts: the data
        for parent, _ in edges:
            if parent is None:
                continue
            if type(parent).__name__ == "AccumulateGrad":
                variable = getattr(parent, "variable", None)
                if not isinstance(variable, nn.Parameter):
                    return None  # an input that requires a gradient (adversarial training)
                reached.append(variable)
            elif parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return reached


def gathered(inputs: Tensor) -> bool:
    """Whether ``inputs`` was made by gathering rows (indexing with a tensor,
    ``index_select``, ``gather``, ``masked_select``; a view of such rows too): a
    mixture-of-experts expert's tokens, which may be one row."""
    node = inputs.grad_fn
    while node is not None and type(node).__name__ in _VIEWS:
        node = node.next_functions[0][0] if node.next_functions else None
    return node is not None and type(node).__name__ in _GATHERS


_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
_VIEWS |= {"UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1"}
_GATHERS = frozenset({"IndexBackward0", "IndexSelectBackward0", "GatherBackward0"})
_GATHERS |= {"MaskedSelectBackward0", "TakeBackward0"}


def _without_data(node: Node) -> bool:
    """Whether the operands without a gradient of ``node`` cannot be the data: a layer
    norm's absent weight or bias (``elementwise_affine=False``, ``bias=False``: its input
    has one), or an elementwise operation whose output has the shape of its operands with a
    gradient (a number, a dropout mask, a buffer: the data would have broadcast it to more
    rows, a batch dimension); ``False`` for any other operation."""
    name = type(node).__name__
    if name == "NativeLayerNormBackward0":
        return node.next_functions[0][0] is not None
    shape = getattr(node, "_input_metadata", None)  # the output's (the gradient's) shape
    if name[:3] not in ("Add", "Sub", "Mul", "Div") or not shape:
        return False
    for parent, index in node.next_functions:
        if parent is None:
            continue
        variable = getattr(parent, "variable", None)
        got = variable.shape if variable is not None else parent._input_metadata[index].shape
        if tuple(got) != tuple(shape[0].shape):
            return False
    return True
