"""The analysis vector: coordinates, loss and gradient.

The analysis vector ``θ ∈ R^P`` holds the parameters of the layers the optimizer
preconditions (:func:`~twolevel_kfac.curvature.discovery.find_layers`, in
``named_modules()`` order), each layer as the row-major flattening of
``W̄ = [W.reshape(d_out, -1), b]``: the layout of the optimizer's layer vectors. An
``nn.MultiheadAttention`` ``<name>`` has two such layers, ``<name>.in_proj`` (its parameters
``<name>.in_proj_weight`` and ``<name>.in_proj_bias``: ``W̄ = [W_q; W_k; W_v | b]``) and
``<name>.out_proj``. Other trainable parameters — those the optimizer gives its fallback
step: BatchNorm / LayerNorm affine parameters, a ViT's positional table, unsupported
layers — are held fixed and are not part of it.

The forwards of the analysis (:func:`loss_and_gradient`, :func:`loss_at`, and those of
:mod:`.exact` and :mod:`.products`) run inside :func:`exact_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..curvature.attention import AttentionInProjection
from ..curvature.blocks import bias_only, layer_bias, layer_weight
from ..curvature.discovery import find_layers
from ..curvature.likelihoods import summed_nll
from ..twolevel.vectors import LayerVector


def _stochastic(module: nn.Module) -> bool:
    """A dropout of ``p > 0`` or a batch norm in train mode, or a batch norm without running
    statistics: no per-sample function."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or not module.track_running_stats
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and module.training


# ----------------------------------------------------------------- coordinates
def analysis_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of the analysis vector: those the optimizer preconditions, by name.

    Raises:
        ValueError: a layer trains its bias alone (its weight frozen): the analysis vector
            holds every layer's ``[W, b]``; a grouped convolution (its block is not one
            ``A ⊗ G``, which the analysis' operators take); a dropout or batch norm in
            train mode (the per-sample Jacobians need a forward without randomness or
            batch statistics).
    """
    coupled = [n for n, m in model.named_modules() if _stochastic(m)]
    if coupled:
        raise ValueError(
            f"modules {coupled[:4]} draw at random or use the batch's statistics (dropout or "
            "batch norm in train mode, a batch norm without running statistics): the analysis "
            "differentiates a deterministic per-sample forward; call model.eval() first"
        )
    layers = find_layers(model, "ignore")
    grouped = [n for n, m in layers.items() if getattr(m, "groups", 1) > 1]
    if grouped:
        raise ValueError(f"grouped convolutions {grouped} are not supported by the analysis")
    alone = [name for name, module in layers.items() if bias_only(module)]
    if alone:
        raise ValueError(
            f"layers {alone} train their bias alone (weight frozen); the analysis covers "
            "layers whose weight trains: unfreeze their weights, or freeze their biases too"
        )
    return layers


def exact_attention() -> AbstractContextManager[None]:
    """Attention by the composite ("math") kernel of ``scaled_dot_product_attention``.

    torch's fused CPU kernel has no forward-mode derivative (``torch.func.linearize`` /
    ``jvp`` refuse it) and no vmap batching rule (a slow per-sample loop); the math kernel
    is plain matrix products and a softmax, which every torch.func transform differentiates
    and batches. Every forward of the analysis runs under it, so the hooks' statistics, the
    dense Fisher and the Fisher–vector products evaluate attention with the same kernel.
    Without attention in the model it changes nothing.
    """
    return sdpa_kernel(SDPBackend.MATH)


def flatten(v: Sequence[Tensor]) -> Tensor:
    """Concatenate the row-major flattened layer matrices of a layer vector, ``[*lead, P]``.

    Args:
        v: one ``[*lead, d_out_i, d_in'_i]`` tensor per layer.

    Returns:
        The flat vector(s).
    """
    return torch.cat([m.reshape(*m.shape[:-2], -1) for m in v], dim=-1)


def unflatten(flat: Tensor, shapes: Sequence[tuple[int, int]]) -> LayerVector:
    """Split ``[*lead, P]`` into the layer matrices ``[*lead, d_out_i, d_in'_i]``.

    Args:
        flat: flat vector(s) in analysis coordinates.
        shapes: ``(d_out_i, d_in'_i)`` per layer.

    Returns:
        The layer vector.

    Raises:
        ValueError: if the length does not match the shapes.
    """
    sizes = [o * i for o, i in shapes]
    if flat.shape[-1] != sum(sizes):
        raise ValueError(f"vector has length {flat.shape[-1]}, the layers need {sum(sizes)}")
    parts = torch.split(flat, sizes, dim=-1)
    return [p.reshape(*p.shape[:-1], *s) for p, s in zip(parts, shapes, strict=True)]


def _prefix(name: str, module: nn.Module) -> str:
    """What precedes ``weight`` / ``bias`` in the names of a layer's parameters: ``<name>.``,
    or ``<attention>.in_proj_`` for an attention's packed input projection (not a submodule:
    its parameters are the attention's ``in_proj_weight`` and ``in_proj_bias``)."""
    if isinstance(module, AttentionInProjection):
        return f"{name}_"
    return f"{name}." if name else ""


def layer_param_names(layers: dict[str, nn.Module]) -> list[str]:
    """Names (as in ``named_parameters()``) of the parameters of the analysis vector."""
    names = []
    for name, module in layers.items():
        prefix = _prefix(name, module)
        names.append(prefix + "weight")
        if layer_bias(module) is not None:
            names.append(prefix + "bias")
    return names


def to_layer_matrices(layers: dict[str, nn.Module], tensors: dict[str, Tensor]) -> LayerVector:
    """``{param name: [*lead, *param.shape]}`` → per layer ``[*lead, d_out, d_in']`` (``W̄``).

    Args:
        layers: the analysis layers.
        tensors: one tensor per parameter of :func:`layer_param_names`.

    Returns:
        The layer vector (with the leading dimensions kept).
    """
    out = []
    for name, module in layers.items():
        prefix = _prefix(name, module)
        w = tensors[prefix + "weight"]
        lead = w.shape[: w.dim() - layer_weight(module).dim()]
        mat = w.reshape(*lead, int(layer_weight(module).shape[0]), -1)
        if layer_bias(module) is not None:
            mat = torch.cat([mat, tensors[prefix + "bias"].unsqueeze(-1)], dim=-1)
        out.append(mat)
    return out


def from_layer_matrices(layers: dict[str, nn.Module], v: Sequence[Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`to_layer_matrices` for one layer vector (no leading dimensions)."""
    out: dict[str, Tensor] = {}
    for (name, module), mat in zip(layers.items(), v, strict=True):
        prefix = _prefix(name, module)
        weight = layer_weight(module)
        if layer_bias(module) is not None:
            out[prefix + "bias"] = mat[:, -1].contiguous()
            mat = mat[:, :-1]
        out[prefix + "weight"] = mat.reshape(weight.shape).contiguous()
    return out


def num_parameters(layers: dict[str, nn.Module]) -> int:
    """``P``: the length of the analysis vector."""
    return sum(p.numel() for m in layers.values() for p in m.parameters(recurse=False))


def functional_parts(
    model: nn.Module, layers: dict[str, nn.Module]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Detached copies of the model's parameters and buffers, and the analysis parameters
    among them, for ``functional_call(model, ({**params, **free}, buffers), ...)``.

    Returns:
        ``(params, buffers, free)`` with ``free`` keyed by :func:`layer_param_names`.
    """
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    return params, buffers, {k: params[k] for k in layer_param_names(layers)}


# ------------------------------------------------------------- loss and gradient
def mean_loss(output: Tensor, target: Tensor, likelihood: str) -> Tensor:
    """``L = (1/B) Σ_n ℓ_n`` with ``ℓ_n = −log p(y_n | f_n)`` summed over output features."""
    return summed_nll(output, target, likelihood) / output.shape[0]


def loss_and_gradient(
    model: nn.Module, layers: dict[str, nn.Module], x: Tensor, y: Tensor, likelihood: str
) -> tuple[float, LayerVector]:
    """The mean batch loss and its gradient ``g = ∇_θ L`` as a layer vector."""
    names = layer_param_names(layers)
    by_name = dict(model.named_parameters())
    params = [by_name[n] for n in names]
    with torch.enable_grad(), exact_attention():
        loss = mean_loss(model(x), y, likelihood)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    named = {
        n: torch.zeros_like(p) if gr is None else gr.detach()
        for n, p, gr in zip(names, params, grads, strict=True)
    }
    return float(loss.detach()), to_layer_matrices(layers, named)


@torch.no_grad()
def loss_at(
    model: nn.Module,
    layers: dict[str, nn.Module],
    x: Tensor,
    y: Tensor,
    likelihood: str,
    displacement: Sequence[Tensor] | None = None,
) -> float:
    """``L(θ + Δ)`` on a batch without modifying the model (``Δ`` a layer vector)."""
    with exact_attention():
        if displacement is None:
            return float(mean_loss(model(x), y, likelihood))
        params = dict(model.named_parameters())
        moved = {k: params[k] + v for k, v in from_layer_matrices(layers, displacement).items()}
        output = functional_call(model, moved, (x,), strict=False)
        return float(mean_loss(output, y, likelihood))
