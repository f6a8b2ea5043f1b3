"""The analysis' tiny Vision Transformer (``model: {kind: vit}``).

    h⁰ = [W_p x_1, …, W_p x_T] + P            (patches x_t of side ``patch``, a Conv2d)
    hˡ ← hˡ + MHA(LN₁(hˡ)),   hˡ ← hˡ + W₂ σ(W₁ LN₂(hˡ) + b₁) + b₂      (l = 1 … depth)
    f  = W_o LN(mean_t h_t) + b_o

with ``T = (image_size / patch)²`` tokens of width ``E``, ``nn.TransformerEncoderLayer(E,
heads, ffn_ratio·E, dropout=0, batch_first=True, norm_first=True)`` as the encoder layers
(``MHA``: torch's ``nn.MultiheadAttention``). It is the application's ``vit``
(``experiments/sequence_models.py``) made small enough for dense float64 Fisher matrices,
with the analysis' seeded initialisation (:func:`.problems.build_model`).

**Curvature blocks** (the optimizer's, :func:`~twolevel_kfac.curvature.discovery.find_layers`):
the patch ``Conv2d`` (``patches.conv``), per encoder layer the attention's packed input
projection ``layer{l}.self_attn.in_proj`` (``[W_q; W_k; W_v | b]``, ``3E × (E + 1)``), its
output projection ``layer{l}.self_attn.out_proj``, the feed-forward ``linear1`` / ``linear2``,
and the ``head``. The LayerNorms and the positional table ``P`` have no block: like every
parameter the optimizer gives its fallback step (BatchNorm, unsupported layers), the analysis
holds them fixed at their initial values (LayerNorm ``γ = 1``, ``β = 0``; ``P ~ N(0, 0.02²)``)
and leaves them out of ``θ``, of ``F`` and of every training step (:mod:`.coordinates`).

**One function everywhere.** The model stays in training mode (dropout 0: the same function as
in evaluation mode), so torch's fused fast path of ``MultiheadAttention`` /
``TransformerEncoderLayer`` (evaluation mode only) never runs, and the analysis evaluates
attention with the composite ("math") kernel of ``scaled_dot_product_attention``
(:func:`.coordinates.exact_attention`): torch.func's vmap and forward mode run through it,
and the hooks' recomputation of attention (:func:`.exact.fisher_statistics`) computes the same
numbers as the functional calls.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

POSITION_STD = 0.02  # GPT-2's / the application's init of the positional table


class PatchTokens(nn.Module):
    """``[N, C, S, S]`` → ``[N, T, E]``: a ``Conv2d`` with kernel = stride = ``patch`` (one
    token per patch), plus the learned positional table ``P`` (``[1, T, E]``)."""

    def __init__(self, in_channels: int, width: int, patch: int, tokens: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, patch, stride=patch, bias=bias)
        self.position = nn.Parameter(torch.zeros(1, tokens, width))

    def forward(self, x: Tensor) -> Tensor:
        """The tokens of images ``x``, ``[N, T, E]``."""
        return self.conv(x).flatten(2).transpose(1, 2) + self.position


class TokenMean(nn.Module):
    """``[N, T, E]`` → ``[N, E]``: the mean over the tokens."""

    def forward(self, h: Tensor) -> Tensor:
        """``(1/T) Σ_t h_t``."""
        return h.mean(dim=1)


def tiny_vit(
    *,
    in_channels: int,
    image_size: int,
    patch: int,
    width: int,
    depth: int,
    heads: int,
    ffn_ratio: int,
    activation: type[nn.Module],
    num_outputs: int,
    bias: bool = True,
) -> nn.Sequential:
    """The ViT of the module docstring, with torch's default initialisation.

    Args:
        in_channels: image channels ``C``.
        image_size: image side ``S`` (a multiple of ``patch``).
        patch: patch side.
        width: token width ``E`` (a multiple of ``heads``).
        depth: encoder layers.
        heads: attention heads.
        ffn_ratio: feed-forward width / ``E``.
        activation: the feed-forward non-linearity ``σ`` (a module class, one instance per
            layer).
        num_outputs: logits.
        bias: biases in every layer (the LayerNorms' ``β`` included).

    Returns:
        ``Sequential(patches, layer0 … layer{depth−1}, mean, norm, head)``.

    Raises:
        ValueError: ``patch`` does not divide ``image_size`` or ``heads`` does not divide
            ``width``.
    """
    if image_size % patch or width % heads:
        raise ValueError(
            f"vit: patch {patch} must divide image_size {image_size} and heads {heads} must "
            f"divide width {width}"
        )
    tokens = (image_size // patch) ** 2
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    parts["patches"] = PatchTokens(in_channels, width, patch, tokens, bias)
    for layer in range(depth):
        parts[f"layer{layer}"] = nn.TransformerEncoderLayer(
            width,
            heads,
            ffn_ratio * width,
            dropout=0.0,
            activation=activation(),
            batch_first=True,
            norm_first=True,
            bias=bias,
        )
    parts["mean"] = TokenMean()
    parts["norm"] = nn.LayerNorm(width, bias=bias)
    parts["head"] = nn.Linear(width, num_outputs, bias=bias)
    return nn.Sequential(parts)
