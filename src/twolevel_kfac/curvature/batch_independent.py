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
output already known not to be so (``stop``), or more than :data:`_WALK` nodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.autograd.graph import Node

__all__ = ["from_parameters_alone"]

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


def from_parameters_alone(inputs: Tensor, stop: set[Node]) -> bool:
    """Whether ``inputs`` is proved to be computed from trained parameters alone (module
    docstring); ``False`` where the walk stops without a proof."""
    node = inputs.grad_fn
    if node is None:
        return False
    stack, seen = [node], {node}
    while stack:
        node = stack.pop()
        if node in stop or type(node).__name__ not in _PURE or len(seen) > _WALK:
            return False
        edges = node.next_functions
        if any(p is None for p, _ in edges) and not _kept_shape(node):
            return False  # an operand without a gradient that broadcasts: the data
        for parent, _ in edges:
            if parent is None:
                continue
            if type(parent).__name__ == "AccumulateGrad":
                if not isinstance(getattr(parent, "variable", None), nn.Parameter):
                    return False  # an input that requires a gradient (adversarial training)
            elif parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return True


def _kept_shape(node: Node) -> bool:
    """An elementwise operation whose output has the shape of its operands with a
    gradient: an operand without one (a number, a dropout mask, a buffer, the data) did not
    broadcast it to more rows (a batch dimension); ``False`` for any other operation."""
    name = type(node).__name__
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
