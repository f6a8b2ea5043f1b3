"""Exact curvature of a small network on one batch: the dense Fisher (torch.func) and the
optimizer's per-sample statistics of the *same* Fisher.

Coordinates: :mod:`.coordinates` (the optimizer's layer-vector layout over its
preconditioned layers; BatchNorm and other non-preconditioned parameters are held fixed and
excluded). Layers that couple the samples of a batch (BatchNorm in train mode) make
per-sample gradients ill-defined: analyse such a model in ``eval()`` mode.

Fisher. For the mean loss ``L = (1/B) Σ_n ℓ_n``, ``ℓ_n = −log p(y_n | f_n)`` and the
per-sample output Jacobians ``J_n = ∂f_n/∂θ`` (``D × P``), every Fisher of the analysis has
the form

    F = (1/B) Σ_n J_nᵀ S_n S_nᵀ J_n,        S_n ∈ R^{D×K} (an output-space factor):

* ``true`` (the default): ``S_n S_nᵀ = H_n = E_{y~p(·|f_n)}[∇_fℓ ∇_fℓᵀ]``, the *exact*
  expectation over the likelihood (categorical ``S = (I − p1ᵀ) diag(√p)``, i.e. column ``k``
  is ``√p_k ∇_fℓ(y = k)``; Bernoulli ``diag(√(p(1−p)))``; Gaussian ``I``);
* ``empirical``: ``S_n = ∇_fℓ_n(y_n)`` (``K = 1``), the batch's own targets;
* ``mc``: ``S_n = [∇_fℓ(y_n1), …, ∇_fℓ(y_nM)]/√M`` with ``y_nm ~ p(·|f_n)`` (the optimizer's
  ``fisher="mc"`` has ``M = 1``).

The dense ``F`` comes from ``torch.func`` per-sample Jacobians (:func:`dense_fisher`). For
the optimizer the same ``F`` is written as the Fisher of ``N' = B·K`` *virtual samples*
``(n, k)`` with inputs ``ā_n`` and pre-activation gradients ``δ_{n,k} = √K · J_{s,n}ᵀ S_n[:, k]``
(:func:`fisher_statistics`): then ``(1/N') Σ_{n,k} ∇ℓ_{nk}∇ℓ_{nk}ᵀ = F`` exactly, the optimizer's
factors are ``A = E_n[ā āᵀ]`` and ``G = (1/B) Σ_n J_{s,n}ᵀ H_n J_{s,n}`` (the exact expected
``G``, not a one-sample Monte-Carlo estimate), and its exact Fisher–vector products and
coarse matrices are those of ``F``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from ..curvature.attention import attention_modules, recompute_attention
from ..curvature.blocks import LayerStats, block_statistics, layer_shape
from ..curvature.discovery import find_layer_uses
from ..curvature.likelihoods import LIKELIHOODS, sample_targets, summed_nll
from ..curvature.sample_products import per_sample_gradients
from ..twolevel.vectors import LayerVector
from .coordinates import (
    analysis_layers,
    exact_attention,
    flatten,
    functional_parts,
    loss_and_gradient,
    to_layer_matrices,
)
from .products import FisherProducts
from .structure import BlockNorms

FISHER_KINDS = ("true", "empirical", "mc")


# --------------------------------------------------------- output-space factors
def output_factor(
    output: Tensor,
    likelihood: str,
    fisher: str = "true",
    target: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``S_n`` with ``F = (1/B) Σ_n J_nᵀ S_n S_nᵀ J_n`` (module docstring), ``[B, D, K]``.

    Args:
        output: the network outputs ``f`` (logits or means), ``[B, ...]``.
        likelihood: ``categorical`` | ``bernoulli`` | ``gaussian``.
        fisher: ``true`` (exact expectation) | ``empirical`` | ``mc``.
        target: the batch targets (``empirical`` only).
        mc_samples: ``M`` of the ``mc`` estimate.
        generator: sampler of the ``mc`` targets.

    Returns:
        ``S`` of shape ``[B, D, K]`` (``D`` = flattened output size).

    Raises:
        ValueError: for an unknown ``likelihood`` / ``fisher`` or a missing ``target``.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    f = output.detach()
    flat = f.reshape(f.shape[0], -1)
    if fisher == "true":
        if likelihood == "categorical":
            p = torch.softmax(flat, dim=1)
            eye = torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
            return (eye - p.unsqueeze(2)) * p.sqrt().unsqueeze(1)
        if likelihood == "bernoulli":
            p = torch.sigmoid(flat)
            return torch.diag_embed((p * (1 - p)).sqrt())
        eye = torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
        return eye.expand(flat.shape[0], -1, -1).clone()
    if fisher == "empirical":
        if target is None:
            raise ValueError("fisher='empirical' needs the batch targets")
        return output_gradient(f, target, likelihood).unsqueeze(2)
    if fisher == "mc":
        columns = [
            output_gradient(f, sample_targets(f, likelihood, generator), likelihood)
            for _ in range(mc_samples)
        ]
        return torch.stack(columns, dim=2) / math.sqrt(mc_samples)
    raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")


def output_gradient(output: Tensor, target: Tensor, likelihood: str) -> Tensor:
    """``∇_{f_n} ℓ_n(y_n)`` for every sample, flattened, ``[B, D]``."""
    with torch.enable_grad():
        f = output.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(summed_nll(f, target, likelihood), f)
    return grad.reshape(grad.shape[0], -1)


# ---------------------------------------------------- the optimizer's statistics
def fisher_statistics(
    model: nn.Module, layers: dict[str, nn.Module], x: Tensor, factor: Tensor
) -> list[LayerStats]:
    """Virtual-sample :class:`LayerStats` whose Fisher is ``(1/B) Σ_n J_nᵀ S_n S_nᵀ J_n``.

    Sample ``(n, k)`` (``n``-major) has ``ā_n`` and ``δ_{n,k} = √K · J_{s,n}ᵀ S_n[:, k]``,
    the pre-activation gradient of the output cotangent ``S_n[:, k]`` (one backward pass
    per column ``k``), formatted by the optimizer's own ``block_statistics``; every call of a
    layer and every module sharing its weight adds locations, as in the optimizer. An attention
    with blocks is recomputed with its projections called as modules, as the optimizer's
    capture does (:func:`~twolevel_kfac.curvature.attention.recompute_attention`), so that
    the hooks of ``<name>.in_proj`` and ``<name>.out_proj`` see their inputs and outputs.

    Args:
        model: the network (outputs ``[B, ...]``).
        layers: the analysis layers.
        x: the batch inputs.
        factor: ``S`` of :func:`output_factor`, ``[B, D, K]``.

    Returns:
        One :class:`LayerStats` per layer with ``N' = B·K`` samples.

    Raises:
        ValueError: a layer the forward does not call.
    """
    calls: dict[str, list[tuple[nn.Module, Tensor, Tensor]]] = {n: [] for n in layers}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            calls[name].append((module, args[0].detach(), out))

        return record

    def recompute(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _: Any) -> Any:
        return recompute_attention(module, args, kwargs)  # type: ignore[arg-type]

    uses = find_layer_uses(model, layers)  # a tied weight's every module
    handles = [m.register_forward_hook(hook(n)) for n, used in uses.items() for m in used]
    handles += [
        a.register_forward_hook(recompute, with_kwargs=True)
        for a in attention_modules(model, layers)
    ]
    try:
        with torch.enable_grad(), exact_attention():
            output = model(x)
    finally:
        for h in handles:
            h.remove()
    unused = [n for n, c in calls.items() if not c]
    if unused:
        raise ValueError(f"layers {unused} are not called by the model's forward on the batch")
    num = factor.shape[2]
    flat = [(n, call) for n, c in calls.items() for call in c]
    pairs: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in layers}
    outs = [out for _, (_, _, out) in flat]
    for k in range(num):
        cotangent = factor[:, :, k].reshape(output.shape)
        grads = torch.autograd.grad(output, outs, cotangent, retain_graph=True, allow_unused=True)
        per_call: dict[str, list[tuple[Tensor, Tensor | None]]] = {n: [] for n in layers}
        for (n, (module, inputs, out)), gr in zip(flat, grads, strict=True):
            gr = torch.zeros_like(out) if gr is None else gr
            per_call[n].append(block_statistics(module, inputs, gr.detach()))
        for n, parts in per_call.items():  # a layer's calls: more locations (the optimizer's)
            a = torch.cat([a for a, _ in parts], dim=1)
            g = torch.cat([g for _, g in parts if g is not None], dim=1)
            pairs[n].append((a, g))
    stats = []
    for n in layers:
        a = torch.stack([a for a, _ in pairs[n]], dim=1)  # [B, K, T, d_in']
        g = torch.stack([g for _, g in pairs[n]], dim=1) * math.sqrt(num)
        stats.append(LayerStats(a.flatten(0, 1), g.flatten(0, 1)))
    return stats


def fisher_from_statistics(stats: Sequence[LayerStats]) -> Tensor:
    """``F = (1/N') Σ_j ψ_j ψ_jᵀ`` from the per-sample gradients of the statistics, ``[P, P]``."""
    psi = torch.cat([per_sample_gradients(s).flatten(1) for s in stats], dim=1)
    return psi.T @ psi / psi.shape[0]


# ------------------------------------------------------ dense Fisher (torch.func)
def output_jacobians(model: nn.Module, layers: dict[str, nn.Module], x: Tensor) -> Tensor:
    """Per-sample ``J_n = ∂f_n/∂θ`` in analysis coordinates, ``[B, D, P]`` (vmap ∘ jacrev).

    The parameters outside the analysis vector and the buffers are held fixed.
    """
    params, buffers, free = functional_parts(model, layers)

    def one(sub: dict[str, Tensor], xn: Tensor) -> Tensor:
        out = functional_call(model, ({**params, **sub}, buffers), (xn.unsqueeze(0),))
        return out.reshape(-1)

    with exact_attention():
        jac = vmap(jacrev(one), in_dims=(None, 0))(free, x)
    return flatten(to_layer_matrices(layers, jac))


def dense_fisher(
    model: nn.Module, layers: dict[str, nn.Module], x: Tensor, factor: Tensor, chunk: int = 16
) -> Tensor:
    """``F = (1/B) Σ_n (S_nᵀJ_n)ᵀ(S_nᵀJ_n)`` from torch.func Jacobians, ``[P, P]``.

    Args:
        model: the network.
        layers: the analysis layers.
        x: the batch inputs ``[B, ...]``.
        factor: ``S`` of :func:`output_factor`, ``[B, D, K]``.
        chunk: samples per Jacobian evaluation (bounds memory at ``chunk·D·P`` numbers).

    Returns:
        The dense Fisher.
    """
    total: Tensor | None = None
    for start in range(0, x.shape[0], chunk):
        jac = output_jacobians(model, layers, x[start : start + chunk])
        psi = torch.einsum("bdk,bdp->bkp", factor[start : start + chunk], jac).flatten(0, 1)
        part = psi.T @ psi
        total = part if total is None else total + part
    assert total is not None
    return total / x.shape[0]


# ---------------------------------------------------------------- the bundle
@dataclass
class Curvature:
    """The exact curvature of the analysis vector on one batch.

    Attributes:
        names: analysis layer names; ``shapes``: their ``(d_out, d_in')``.
        stats: the optimizer-format statistics of the Fisher (:func:`fisher_statistics`).
        grad: ``g = ∇L`` as a layer vector.
        loss: the batch loss ``L(θ)``.
        fisher: the dense Fisher ``F`` (undamped), when computed.
        products: matrix-free ``v ↦ F v`` (torch.func, :mod:`.products`).
        block_norms: the layer × layer ``‖F_ij‖_F`` once computed
            (:func:`.structure.fisher_block_norms` caches them here).
    """

    names: list[str]
    shapes: list[tuple[int, int]]
    stats: list[LayerStats]
    grad: LayerVector
    loss: float
    fisher: Tensor | None = None
    products: FisherProducts | None = None
    block_norms: BlockNorms | None = field(default=None, repr=False)

    @property
    def sizes(self) -> list[int]:
        """The number of parameters of each layer, in layer order."""
        return [o * i for o, i in self.shapes]

    @property
    def num_params(self) -> int:
        """The number of analysed parameters."""
        return sum(self.sizes)

    @property
    def flat_grad(self) -> Tensor:
        """The batch gradient in analysis coordinates."""
        return flatten(self.grad)

    def dense(self) -> Tensor:
        """The dense Fisher, computed from the statistics when it is not stored yet."""
        if self.fisher is None:
            self.fisher = fisher_from_statistics(self.stats)
        return self.fisher


def compute_curvature(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    likelihood: str,
    fisher: str = "true",
    *,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    dense: str | None = "func",
) -> Curvature:
    """The loss, gradient, optimizer statistics, matrix-free Fisher products and
    (optionally) the dense Fisher of a batch.

    Args:
        model: the network (float64 recommended).
        x: the batch's inputs.
        y: the batch's targets.
        likelihood: the likelihood of the loss.
        fisher: ``true`` | ``empirical`` | ``mc`` (module docstring).
        mc_samples: ``M`` for ``mc``.
        generator: sampler of ``mc`` targets.
        dense: ``"func"`` (torch.func Jacobians), ``"stats"`` (Gram of the statistics'
            per-sample gradients, the same matrix) or ``None`` (not computed).

    Returns:
        The :class:`Curvature`.

    Raises:
        ValueError: categorical logits other than ``[N, C]``; a model the analysis cannot
            take (:func:`~.coordinates.analysis_layers`).
    """
    layers = analysis_layers(model)
    with torch.no_grad(), exact_attention():
        output = model(x)
    if likelihood == "categorical" and output.dim() != 2:  # (a bare AssertionError before)
        raise ValueError(
            f"the analysis takes categorical logits [N, C]; the model's are "
            f"{tuple(output.shape)}: flatten positions into the batch in forward"
        )
    loss, grad = loss_and_gradient(model, layers, x, y, likelihood)
    factor = output_factor(output, likelihood, fisher, y, mc_samples, generator)
    stats = fisher_statistics(model, layers, x, factor)
    curvature = Curvature(
        names=list(layers),
        shapes=[layer_shape(m) for m in layers.values()],
        stats=stats,
        grad=grad,
        loss=loss,
        products=FisherProducts(model, layers, x, factor),
    )
    if dense == "func":
        curvature.fisher = dense_fisher(model, layers, x, factor)
    elif dense == "stats":
        curvature.dense()
    return curvature
