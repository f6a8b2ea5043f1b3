"""The layer types with a Kronecker-factored block ``A ⊗ G`` of ``W̄ = [W, b]``: one entry
per module type saying how its inputs ``ā`` and pre-activation gradients ``δ`` look at each
location ``t`` (``[N, T, d_in]`` and ``[N, T, d_out]``, columns in the order of
``weight.reshape(d_out, -1)``). Everything else about the block (factors, damped inverses,
coarse spaces) is shared. Adding a layer type is one :func:`register_layer_type` call; a
user can register their own module (a weight ``[d_out, …]``, an optional bias ``[d_out]``).

Built in: ``nn.Linear`` (extra leading input dimensions, e.g. a sequence, are locations:
the *expand* view of weight sharing) and ``nn.Embedding`` here; ``nn.Conv1d`` / ``Conv2d``
/ ``Conv3d`` with zero padding (KFC, Grosse & Martens 2016: the locations are the output
positions, ``ā`` the input patch under the kernel; one block per group) in
:mod:`.convolutions`, the norm layers in :mod:`.scale_shift`.

An embedding table ``E`` (``[V, D]``) is the weight of a ``Linear`` on one-hot inputs,
transposed: ``E[x] = Eᵀ e_x``, ``∇E = Σ_t e_{x_t} δ_tᵀ``. Its rows index the inputs
(``rows_from_inputs``), so in the ``[d_out, d_in]`` orientation of the table the block's
``δ`` are the one-hot tokens and its ``ā`` the output gradients: ``G = E_{n,t}[e e ᵀ]`` is
the diagonal of the token frequencies, ``A = E_{n,t}[δδᵀ]`` (the Kronecker factors of the
embedding, rows and columns swapped), and a ``Linear`` head tied to the table has the same
orientation (its calls are more locations of the same block). The frequencies are kept as
their vector (:mod:`.tokens`) above :data:`EMBEDDING_MAX_ROWS` rows and for the smaller
untied tables of most optimizers, else as a dense ``V × V`` matrix here
(:mod:`.token_form`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .blocks import BlockStats

__all__ = [
    "EMBEDDING_MAX_ROWS",
    "FORWARD_METHODS",
    "LayerType",
    "channel_locations",
    "conv_patches",
    "covered_parameters",
    "embedding_reason",
    "fixed_rows",
    "is_token_table",
    "layer_type",
    "library_registered",
    "linear_features",
    "one_hot_rows",
    "overridden_forward",
    "override_reason",
    "patched_forward",
    "register_layer_type",
    "registered_types",
    "unregister_layer_type",
]

Features = Callable[[nn.Module, Tensor], Tensor]
Reason = Callable[[nn.Module], "str | None"]


def _no_reason(module: nn.Module) -> str | None:
    return None


@dataclass(frozen=True)
class LayerType:
    """How one module type gives its block's statistics.

    Attributes:
        module_type: the ``nn.Module`` subclass (its subclasses match too).
        features: ``(module, input) → ā`` without the homogeneous 1, ``[N, T, d_in]``.
        gradients: ``(module, ∂L/∂output) → δ``, ``[N, T, d_out]``, locations as ``ā``.
        reason: why an instance cannot be preconditioned (``None``: it can).
        rows_from_inputs: the weight's rows index the inputs (an embedding table ``[V,
            D]``): ``features`` then gives the block's ``δ`` and ``gradients`` its ``ā``.
        record: ``(module, input) → kept``: what the forward hook keeps of the input (on
            the whole batch, before the Fisher mini-batch's rows are taken; default: the
            input itself), which ``features`` then reads.
        statistics: a block type of its own instead of ``A ⊗ G`` (a
            :class:`~.blocks.BlockStats` subclass: :mod:`.scale_shift`, :mod:`.grouped`);
            its ``features`` and ``gradients`` are then used as they are (no homogeneous
            coordinate appended).
    """

    module_type: type[nn.Module]
    features: Features
    gradients: Features
    reason: Reason = _no_reason
    rows_from_inputs: bool = False
    record: Features | None = None
    statistics: type[BlockStats] | None = None


_REGISTRY: dict[type[nn.Module], LayerType] = {}
_LIBRARY: set[type[nn.Module]] = set()  # registered by this package's own modules


def register_layer_type(
    module_type: type[nn.Module],
    features: Features,
    gradients: Features,
    reason: Reason | None = None,
    rows_from_inputs: bool = False,
    record: Features | None = None,
    statistics: type[BlockStats] | None = None,
) -> None:
    """Give ``module_type`` (and its subclasses) a curvature block (module docstring;
    :class:`LayerType` for the arguments).

    Raises:
        TypeError: ``module_type`` is not an ``nn.Module`` subclass.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass; got {module_type!r}")
    reason = reason or _no_reason
    entry = LayerType(
        module_type, features, gradients, reason, rows_from_inputs, record, statistics
    )
    _REGISTRY[module_type] = entry
    caller = sys._getframe(1).f_globals.get("__name__", "")
    (_LIBRARY.add if caller.startswith("twolevel_kfac.") else _LIBRARY.discard)(module_type)


def library_registered(module_type: type[nn.Module]) -> bool:
    """Whether ``module_type``'s registration is this package's own (not a user's)."""
    return module_type in _LIBRARY


def unregister_layer_type(module_type: type[nn.Module]) -> None:
    """Remove a registration (:func:`register_layer_type`); unknown types are ignored."""
    _REGISTRY.pop(module_type, None)
    _LIBRARY.discard(module_type)


def registered_types() -> tuple[type[nn.Module], ...]:
    """The module types with a block (for ``isinstance``)."""
    return tuple(_REGISTRY)


def layer_type(module: nn.Module | type[nn.Module]) -> LayerType | None:
    """The entry of ``module``'s type, or of a module class (the nearest registered class
    in its MRO), if any: ``tk.layer_type(nn.Linear).features``."""
    for cls in (module if isinstance(module, type) else type(module)).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


# ------------------------------------------------------------------ built-in types
FORWARD_METHODS = ("forward", "_conv_forward")
"""The methods a layer type's forward runs through (torch's convolutions compute theirs in
``_conv_forward``: circular-in-width padding, a weight scale are written there)."""


def overridden_forward(kind: type, base: type) -> str | None:
    """The first of :data:`FORWARD_METHODS` that ``base`` defines and its subclass ``kind``
    overrides, or ``None``."""
    methods = (n for n in FORWARD_METHODS if hasattr(base, n))
    return next((n for n in methods if getattr(kind, n) is not getattr(base, n)), None)


def patched_forward(module: nn.Module) -> str | None:
    """The first of :data:`FORWARD_METHODS` set on the instance (``conv.forward = …``,
    accelerate's device hooks), or ``None``."""
    return next((name for name in FORWARD_METHODS if name in vars(module)), None)


def covered_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` its block steps: its own, but a pruned one's original
    (``torch.nn.utils.prune`` keeps ``bias_orig`` as the parameter and ``bias`` as a plain
    tensor: the block is then ``W``'s alone, and ``bias_orig`` takes the fallback step)."""
    own = module._parameters  # (registered: parameters(recurse=False), faster)
    return [
        p
        for name, p in own.items()
        if p is not None
        and not (name.endswith("_orig") and not isinstance(own.get(name[:-5]), nn.Parameter))
    ]


def linear_features(module: nn.Module, inputs: Tensor) -> Tensor:
    """A ``Linear``'s inputs (or output gradients) ``[N, T, d]``: the leading dimensions
    after the batch are locations."""
    return inputs.flatten(1, -2) if inputs.dim() > 2 else inputs.unsqueeze(1)


def channel_locations(x: Tensor) -> Tensor:
    """``[N, C, d₁, …] → [N, T, C]``: the channels last, the positions ``d₁ … `` flattened to
    locations (``[N, C]`` is one location)."""
    return (x if x.dim() > 2 else x.unsqueeze(-1)).flatten(start_dim=2).transpose(1, 2)


def conv_patches(module: nn.Module, inputs: Tensor) -> Tensor:
    """The input patches of an N-d convolution, ``[N, T, C_in·∏k]`` (im2col; locations
    row-major over the output grid, columns channel-major as the weight's)."""
    assert isinstance(module, nn.modules.conv._ConvNd)
    dims = inputs.dim() - 2
    padding, mode = module.padding, module.padding_mode
    if isinstance(padding, str) or mode != "zeros":  # (as torch's forward pads: explicitly)
        pad = module._reversed_padding_repeated_twice  # ('same' may pad unevenly)
        inputs = F.pad(inputs, pad) if mode == "zeros" else F.pad(inputs, pad, mode=mode)
        padding = (0,) * dims
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if dims == 2:
        patches = F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride)
        return patches.transpose(1, 2)
    if dims == 1:  # a 2-d unfold of height 1
        patches = F.unfold(
            inputs.unsqueeze(2),
            (1, kernel[0]),
            dilation=(1, dilation[0]),
            padding=(0, padding[0]),
            stride=(1, stride[0]),
        )
        return patches.transpose(1, 2)
    pads = [p for size in reversed(padding) for p in (size, size)]
    x = F.pad(inputs, pads)
    for axis, (k, s, d) in enumerate(zip(kernel, stride, dilation, strict=True)):
        x = x.unfold(2 + axis, d * (k - 1) + 1, s)  # window span, then every d-th entry
        x = x[..., ::d]
    # [N, C, o_1, …, o_D, k_1, …, k_D] → [N, o_1 … o_D, C, k_1 … k_D]
    n, channels = x.shape[:2]
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    x = x.permute(order)
    return x.reshape(n, math.prod(x.shape[1 : 1 + dims]), channels * math.prod(kernel))


def override_reason(kind: type[nn.Module], entry: LayerType, method: str) -> str:
    """Why a subclass ``kind`` of ``entry``'s type that overrides its ``method`` has no
    block, with the whole registration that gives it its base's (features and gradients;
    where the base has them, its ``rows_from_inputs``, ``record`` and ``statistics``:
    without them a norm's registration was refused at its first step, or took the raw
    input for the normalised one, before 2026-12-09)."""
    base = entry.module_type.__name__
    name = kind.__name__ if kind.__name__ != base else f"{kind.__module__}.{kind.__name__}"
    public = [c.__name__ for c in kind.__mro__[1:] if getattr(nn, c.__name__, None) is c]
    typed = f"nn.{public[0]}" if public else base  # (not torch's private _BatchNorm)
    extra = [
        f"{key}=tk.layer_type({typed}).{key}"
        for key in ("record", "statistics")
        if getattr(entry, key) is not None
    ]
    extra = (["rows_from_inputs=True"] if entry.rows_from_inputs else []) + extra
    own = " (a norm with an activation or any other op in its forward is not)" * bool(
        entry.statistics
    )
    return (
        f"{name} overrides {base}.{method}, which may change its weight, input or output "
        f"(weight standardisation, fake quantisation, a scale, an activation) where {base}'s "
        f"block would not see it; if it computes exactly what {base}.forward does{own}, "
        f"register it: tk.register_layer_type({name}, tk.layer_type({typed}).features, "
        f"tk.layer_type({typed}).gradients{''.join(', ' + e for e in extra)}); if not, "
        "register functions that give its input and its pre-activation gradient (checked "
        "against autograd at the first captured forward of the types you register)"
    )


EMBEDDING_MAX_ROWS = 4096
"""The largest ``num_embeddings`` whose block may keep its frequency factor as a dense
``V × V`` matrix (64 MiB in float32 at this size: tied to a ``Linear`` head, or under
options that read the dense block, :mod:`.token_form`); larger tables keep its diagonal
(:mod:`.tokens`)."""


def one_hot_rows(module: nn.Module, tokens: Tensor) -> Tensor:
    """An embedding's tokens as one-hot rows ``[N, T, V]`` in the table's dtype; a
    ``padding_idx`` token's row is zero (torch gives its table row no gradient)."""
    assert isinstance(module, nn.Embedding)
    rows = F.one_hot(
        tokens.reshape(tokens.shape[0], tokens.shape[1:].numel()), module.num_embeddings
    )
    if module.padding_idx is not None:
        rows[..., module.padding_idx] = 0
    return rows.to(module.weight.dtype)


def is_token_table(uses: list[nn.Module]) -> bool:
    """Whether a block's weight is used by embeddings alone (its ``G`` is diagonal: the
    frequencies of the tokens; a tied ``Linear`` head adds its logits' dense ``δδᵀ``).

    Args:
        uses: every module computing with the block's weight (``find_layer_uses``).
    """
    return bool(uses) and all(isinstance(m, nn.Embedding) for m in uses)


def fixed_rows(uses: list[nn.Module]) -> list[int]:
    """The rows of a block's ``W̄`` that never get a gradient: the ``padding_idx`` row of an
    ``nn.Embedding`` (the row every embedding sharing the table pads with; a tied ``Linear``
    head trains every row). The coarse spaces leave them out, so that no step moves them.

    Args:
        uses: every module computing with the block's weight (``find_layer_uses``).

    Returns:
        The row indices (empty: none).
    """
    if not is_token_table(uses):
        return []
    paddings = {getattr(m, "padding_idx", None) for m in uses}
    padding = paddings.pop() if len(paddings) == 1 else None
    return [] if padding is None else [int(padding)]


def embedding_reason(module: nn.Module) -> str | None:
    """Why an ``nn.Embedding`` has no block (``None``: it has one)."""
    assert isinstance(module, nn.Embedding)
    if module.sparse:
        return "Embedding with sparse=True (its gradient is a sparse tensor)"
    if module.max_norm is not None:
        return "Embedding with max_norm (it rescales its rows in the forward)"
    if module.scale_grad_by_freq:
        return "Embedding with scale_grad_by_freq=True (its gradient is not Σ_t e δᵀ)"
    return None


register_layer_type(nn.Linear, linear_features, linear_features)
register_layer_type(nn.Embedding, one_hot_rows, linear_features, embedding_reason, True)
# Registered again by their modules: nn.Embedding with the statistics of tables over
# EMBEDDING_MAX_ROWS rows (.tokens), the convolutions (KFC, one block per group,
# .convolutions), the norm layers (.scale_shift).
