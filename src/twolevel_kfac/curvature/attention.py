"""``nn.MultiheadAttention`` with curvature blocks: its packed input projection
(``in_proj_weight``, ``in_proj_bias``: one ``Linear`` block ``[3E, E + 1]``) and its output
projection ``out_proj`` (a ``Linear`` block ``[E, E + 1]``).

Attention runs its projections functionally (``F.multi_head_attention_forward`` reads the
weights), so no hook sees their inputs or output gradients. On a step that captures
statistics, a forward hook on the attention module therefore recomputes its output with the
projections called as modules (:func:`recompute_attention`), and returns that output in
place of the one just computed: the layer hooks see the projections' inputs and outputs,
and the loss is differentiated through the recomputation. The attention itself (masks,
``is_causal``, dropout, ``bias_k``/``bias_v``, ``add_zero_attn``, the returned weights) is
still torch's own function, given identity projections (``x Iᵀ + 0 = x`` exactly). A
capturing forward thus computes each attention twice; the steps in between run torch's
module untouched.

The packed projection is one block applied at every position of every input it projects:
for self-attention (``query is key is value``) that is the Kronecker block of a ``Linear``
on ``x``; for cross-attention it is called on the query and on the memory, and only the
rows each call feeds (``W_q`` for the query, ``W_k``, ``W_v`` for the memory) get a gradient
from it: the other rows' output gradients are zero, and the block sums over both calls'
locations (the *expand* view of a weight shared by several calls, as for tied weights).
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionInProjection",
    "attention_blocks",
    "attention_modules",
    "attention_reason",
    "recompute_attention",
]


class AttentionInProjection(nn.Linear):
    """The packed input projection of a ``MultiheadAttention`` seen as a ``Linear``
    ``E → 3E``: it holds the attention's own ``in_proj_weight`` and ``in_proj_bias``
    parameters (it is not a submodule of the model: the model's parameters and state dict
    are unchanged)."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        nn.Module.__init__(self)
        self.in_features = attention.embed_dim
        self.out_features = 3 * attention.embed_dim
        self.weight = attention.in_proj_weight
        self.bias = attention.in_proj_bias


_PROJECTIONS: weakref.WeakKeyDictionary[nn.MultiheadAttention, AttentionInProjection] = (
    weakref.WeakKeyDictionary()
)


def in_projection(attention: nn.MultiheadAttention) -> AttentionInProjection:
    """The one :class:`AttentionInProjection` of ``attention`` (the same object for every
    optimizer: its hooks and blocks refer to it)."""
    projection = _PROJECTIONS.get(attention)
    if projection is None or projection.weight is not attention.in_proj_weight:
        projection = _PROJECTIONS[attention] = AttentionInProjection(attention)
    return projection


def attention_reason(attention: nn.MultiheadAttention) -> str | None:
    """Why ``attention`` gets no blocks (``None``: it gets them)."""
    if not attention._qkv_same_embed_dim:
        return (
            "MultiheadAttention with kdim/vdim other than embed_dim (separate q/k/v "
            "projection weights around one packed bias) has no curvature block"
        )
    return None


def attention_blocks(attention: nn.MultiheadAttention) -> list[tuple[str, nn.Linear]]:
    """``(name suffix, layer)`` of the attention's blocks: ``in_proj``, ``out_proj``."""
    return [("in_proj", in_projection(attention)), ("out_proj", attention.out_proj)]


_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def attention_modules(
    model: nn.Module, layers: dict[str, nn.Module]
) -> list[nn.MultiheadAttention]:
    """The attention modules of ``model`` with a block among ``layers`` (their forwards
    are recomputed in a captured forward)."""
    kept = {id(layer) for layer in layers.values()}
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
        and any(id(layer) in kept for _, layer in attention_blocks(module))
    ]


def recompute_attention(
    attention: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Tensor, Tensor | None]:
    """``attention(*args, **kwargs)`` with its projections called as modules (module doc).

    Raises:
        ValueError: an unbatched (2-d) query: KFAC needs the batch first.
    """
    call = _SIGNATURE.bind(attention, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    query, key, value = a["query"], a["key"], a["value"]
    if query.dim() != 3:
        raise ValueError(
            f"MultiheadAttention got an unbatched query of shape {tuple(query.shape)}: KFAC "
            "takes the first dimension of every layer input as the batch"
        )
    width = attention.embed_dim
    projection = in_projection(attention)
    projected: dict[int, Tensor] = {}
    for tensor in (query, key, value):
        if id(tensor) not in projected:
            projected[id(tensor)] = projection(tensor)
    q, k, v = (
        projected[id(t)][..., i * width : (i + 1) * width].transpose(0, 1)
        for i, t in enumerate((query, key, value))
    )
    eye = torch.eye(width, dtype=q.dtype, device=q.device)
    context, weights = F.multi_head_attention_forward(
        q,
        k,
        v,
        width,
        attention.num_heads,
        None,
        None,
        attention.bias_k,
        attention.bias_v,
        attention.add_zero_attn,
        attention.dropout,
        eye,
        None,
        training=attention.training,
        key_padding_mask=a["key_padding_mask"],
        need_weights=a["need_weights"],
        attn_mask=a["attn_mask"],
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=a["average_attn_weights"],
        is_causal=a["is_causal"],
    )
    return attention.out_proj(context.transpose(0, 1)), weights
