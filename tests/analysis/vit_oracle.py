"""An independent oracle for the analysis' tiny ViT (``model: {kind: vit}``): its forward
written out from the parameters (layer norms, the packed ``[q; k; v]`` projection split by
hand, softmax attention per head, GELU feed-forward, no torch ``MultiheadAttention``), and
the true categorical Fisher of its curvature blocks from per-sample ``torch.func.jacrev``
of that forward, sample by sample (no vmap), in the optimizer's block order and layout
(``W̄ = [W.reshape(d_out, −1), b]`` row-major per block).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev

from twolevel_kfac.analysis.config import ModelSpec

LN_EPS = 1e-5  # torch's default, the encoder layers' and the final LayerNorm's


def tiny_vit_spec(outputs: int = 3, depth: int = 2) -> ModelSpec:
    """A 4×4 image, 2×2 patches (4 tokens of width 4), two heads, GELU."""
    return ModelSpec(
        kind="vit",
        in_channels=1,
        image_size=4,
        patch=2,
        width=4,
        depth=depth,
        heads=2,
        ffn_ratio=2,
        activation="gelu",
        num_outputs=outputs,
    )


def block_parameters(spec: ModelSpec) -> list[tuple[str, str, str]]:
    """``(block name, weight name, bias name)`` of every curvature block, in order."""
    blocks = [("patches.conv", "patches.conv.weight", "patches.conv.bias")]
    for layer in range(spec.depth):
        pre = f"layer{layer}."
        attn = pre + "self_attn."
        blocks += [
            (attn + "in_proj", attn + "in_proj_weight", attn + "in_proj_bias"),
            (attn + "out_proj", attn + "out_proj.weight", attn + "out_proj.bias"),
            (pre + "linear1", pre + "linear1.weight", pre + "linear1.bias"),
            (pre + "linear2", pre + "linear2.weight", pre + "linear2.bias"),
        ]
    return [*blocks, ("head", "head.weight", "head.bias")]


def _norm(h: Tensor, p: dict[str, Tensor], name: str) -> Tensor:
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).square().mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + LN_EPS) * p[name + ".weight"] + p[name + ".bias"]


def _attention(z: Tensor, p: dict[str, Tensor], name: str, heads: int) -> Tensor:
    n, t, e = z.shape
    qkv = z @ p[name + ".in_proj_weight"].T + p[name + ".in_proj_bias"]
    q, k, v = (m.reshape(n, t, heads, e // heads).transpose(1, 2) for m in qkv.split(e, -1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // heads), dim=-1)
    context = (weights @ v).transpose(1, 2).reshape(n, t, e)
    return context @ p[name + ".out_proj.weight"].T + p[name + ".out_proj.bias"]


def vit_forward(p: dict[str, Tensor], x: Tensor, spec: ModelSpec) -> Tensor:
    """The logits ``[N, D]`` of images ``x`` with parameters ``p`` (``named_parameters``)."""
    conv = F.conv2d(x, p["patches.conv.weight"], p["patches.conv.bias"], stride=spec.patch)
    h = conv.flatten(2).transpose(1, 2) + p["patches.position"]
    for layer in range(spec.depth):
        pre = f"layer{layer}."
        h = h + _attention(_norm(h, p, pre + "norm1"), p, pre + "self_attn", spec.heads)
        z = _norm(h, p, pre + "norm2")
        hidden = F.gelu(z @ p[pre + "linear1.weight"].T + p[pre + "linear1.bias"])
        h = h + hidden @ p[pre + "linear2.weight"].T + p[pre + "linear2.bias"]
    pooled = _norm(h.mean(dim=1), p, "norm")
    return pooled @ p["head.weight"].T + p["head.bias"]


def vit_jacobian(model: nn.Module, spec: ModelSpec, x: Tensor) -> Tensor:
    """Per-sample ``J_n = ∂f_n/∂θ`` over the blocks' parameters, ``[N, D, P]``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = [n for _, w, b in block_parameters(spec) for n in (w, b)]

    def logits(free: dict[str, Tensor], xn: Tensor) -> Tensor:
        return vit_forward({**params, **free}, xn.unsqueeze(0), spec)[0]

    rows = []
    for xn in x:
        jac = jacrev(logits)({n: params[n] for n in names}, xn)
        parts = []
        for _, weight, bias in block_parameters(spec):
            d = jac[weight].shape[0]
            w = jac[weight].reshape(d, params[weight].shape[0], -1)
            parts.append(torch.cat([w, jac[bias].unsqueeze(-1)], dim=-1).flatten(1))
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows)


def vit_true_fisher(model: nn.Module, spec: ModelSpec, x: Tensor) -> Tensor:
    """``F = (1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n`` (categorical likelihood)."""
    jac = vit_jacobian(model, spec, x)
    probs = torch.softmax(vit_forward(dict(model.named_parameters()), x, spec), -1).detach()
    hess = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)
    return torch.einsum("ndp,nde,neq->pq", jac, hess, jac) / x.shape[0]
