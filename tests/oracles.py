"""Dense reference math ("oracles") for exactness tests of KFAC and two-level KFAC.

Everything here is written independently of ``twolevel_kfac`` (no library import): per-sample
gradients come from :mod:`torch.func`, layer inputs/output-gradients from private forward
hooks and an explicit loop-based im2col, and every preconditioner is a dense matrix solved
with :func:`torch.linalg.solve`. Meant for tiny networks in float64 (a few hundred
parameters at most) without batch-coupling layers (no BatchNorm in train mode).

Conventions (``/work/shared/design.md`` §2):

* *Preconditioned layers* are the ``nn.Linear`` / ``nn.Conv2d`` modules of a model in
  ``named_modules()`` order. Layer ``i`` has the matrix ``W̄_i = [W_i.reshape(d_out, -1), b_i]``
  of shape ``(d_out, d_in')`` (bias = last column, ``d_in' = d_in + 1`` with a bias).
* A *layer vector* is the concatenation over preconditioned layers of the ROW-MAJOR
  flattening ``W̄_i.reshape(-1)``; its length is ``P = Σ_i d_out_i · d_in'_i``. In this
  convention ``vec(δ āᵀ) = kron(δ, ā)``, so the Kronecker block ``A ⊗ G`` of the papers
  (column-major vec) is the matrix ``kron(G, A)`` here.
* ``loss_fn(output, target)`` is a *mean-reduced* loss over the batch (e.g.
  ``nn.CrossEntropyLoss()``); the per-sample loss ``ℓ_n`` is ``loss_fn`` on the batch of one
  ``(output[n:n+1], target[n:n+1])``, so the batch loss is ``(1/B) Σ_n ℓ_n``.
* Per-sample statistics: ``a [N, T, d_in']`` (homogeneous inputs ``ā``), ``g [N, T, d_out]``
  (``δ = ∂ℓ_n/∂s_{n,t} = B · ∂L/∂s_{n,t}``), with ``T`` output locations (``T = 1`` for a
  Linear layer on ``[N, d_in]`` inputs).
* Empirical Fisher ``F = (1/B) Σ_n v_n v_nᵀ`` with ``v_n`` the layer vector of ``∇ℓ_n``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]

DAMPING_MODES = ("per_factor", "pi", "eigen_sum")
COMBINATIONS = ("additive", "adef1", "adef2", "balanced")
COARSE_SPACES = (
    "nicolaides",
    "spectral",
    "residual",
    "krylov_nicolaides",
    "krylov_residual",
    "tselepidis",
)
LIKELIHOODS = ("categorical", "bernoulli", "gaussian")


# --------------------------------------------------------------------------------------
# Tiny models used across the exactness tests
# --------------------------------------------------------------------------------------


def tiny_mlp(bias: bool = True, activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """``Linear(4,3) → activation → Linear(3,2)``."""
    return nn.Sequential(nn.Linear(4, 3, bias=bias), activation(), nn.Linear(3, 2, bias=bias))


def tiny_convnet(bias: bool = True) -> nn.Sequential:
    """``Conv2d(2,3,k=3,stride=2,padding=1) → tanh → flatten → Linear(27,2)`` on
    ``[B, 2, 5, 5]`` inputs (the conv has ``T = 9`` output locations)."""
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, bias=bias),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(27, 2, bias=bias),
    )


def deep_linear(widths: Sequence[int] = (6, 4, 3, 2), bias: bool = True) -> nn.Sequential:
    """A deep linear network ``Linear(w0,w1) → Linear(w1,w2) → …`` (no activations)."""
    return nn.Sequential(*[nn.Linear(i, o, bias=bias) for i, o in itertools.pairwise(widths)])


# --------------------------------------------------------------------------------------
# Layer-vector coordinates
# --------------------------------------------------------------------------------------


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def preconditioned_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` / ``nn.Embedding`` in
    ``named_modules()`` order with a parameter that trains."""
    layers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue  # frozen whole: no block
        if isinstance(module, CONVS):
            if module.groups != 1 or module.padding_mode != "zeros":
                raise ValueError(f"oracle supports only plain convolutions, got {module}")
            layers.append((name, module))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            layers.append((name, module))
    return layers


def bias_alone(module: nn.Module) -> bool:
    """Whether only the layer's bias trains (BitFit): its ``W̄`` is ``b`` as a ``[d_out,
    1]`` column with ``ā = 1`` (the bias column of the ``[W, b]`` block)."""
    bias = getattr(module, "bias", None)
    weight = module.weight
    assert isinstance(weight, Tensor)
    return bias is not None and bias.requires_grad and not weight.requires_grad


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in')`` of ``W̄ = [W.reshape(d_out, -1), b]`` (``b`` alone: ``(d_out, 1)``)."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    if bias_alone(module):
        return int(weight.shape[0]), 1
    bias = getattr(module, "bias", None)
    return int(weight.shape[0]), int(weight[0].numel()) + (0 if bias is None else 1)


def layer_sizes(model: nn.Module) -> list[int]:
    """``d_out · d_in'`` of every preconditioned layer (the block sizes of a layer vector)."""
    return [math.prod(layer_shape(m)) for _, m in preconditioned_layers(model)]


def layer_slices(sizes: Sequence[int]) -> list[slice]:
    """The slice of each layer's block in a layer vector of blocks of ``sizes``."""
    offsets = [0, *itertools.accumulate(sizes)]
    return [slice(lo, hi) for lo, hi in itertools.pairwise(offsets)]


def layer_param_vector(model: nn.Module, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
    """Concatenate ``vec_row(W̄_i)`` over the preconditioned layers.

    ``tensors`` maps parameter names (``"0.weight"``, ``"0.bias"``) to tensors shaped
    ``[*lead, *param.shape]`` (e.g. per-sample gradients with ``lead = (B,)``); the result
    has shape ``[*lead, P]``. Without ``tensors`` the model's parameters are used.
    """
    if tensors is None:
        tensors = {k: v.detach() for k, v in model.named_parameters()}
    blocks = []
    for name, module in preconditioned_layers(model):
        if bias_alone(module):
            blocks.append(tensors[_prefix(name) + "bias"])
            continue
        w = tensors[_prefix(name) + "weight"]
        lead = w.shape[: w.dim() - module.weight.dim()]
        d_out, _ = layer_shape(module)
        mat = w.reshape(*lead, d_out, -1)
        if getattr(module, "bias", None) is not None:
            b = tensors[_prefix(name) + "bias"]
            mat = torch.cat([mat, b.unsqueeze(-1)], dim=-1)
        blocks.append(mat.reshape(*lead, -1))
    return torch.cat(blocks, dim=-1)


def layer_vector_to_params(model: nn.Module, vec: Tensor) -> dict[str, Tensor]:
    """Inverse of :func:`layer_param_vector`: ``[*lead, P]`` → ``{param name: [*lead, *shape]}``
    (only the preconditioned layers' parameters)."""
    layers = preconditioned_layers(model)
    slices = layer_slices([math.prod(layer_shape(m)) for _, m in layers])
    lead = vec.shape[:-1]
    out: dict[str, Tensor] = {}
    for (name, module), sl in zip(layers, slices, strict=True):
        mat = vec[..., sl].reshape(*lead, *layer_shape(module))
        if bias_alone(module):
            out[_prefix(name) + "bias"] = mat[..., 0].contiguous()
            continue
        if getattr(module, "bias", None) is not None:
            out[_prefix(name) + "bias"] = mat[..., -1].contiguous()
            mat = mat[..., :-1]
        out[_prefix(name) + "weight"] = mat.reshape(*lead, *module.weight.shape).contiguous()
    return out


def layer_matrices(model: nn.Module, vec: Tensor) -> list[Tensor]:
    """Split a layer vector ``[*lead, P]`` into the per-layer matrices ``[*lead, d_out, d_in']``."""
    layers = preconditioned_layers(model)
    slices = layer_slices([math.prod(layer_shape(m)) for _, m in layers])
    return [
        vec[..., sl].reshape(*vec.shape[:-1], *layer_shape(m))
        for (_, m), sl in zip(layers, slices, strict=True)
    ]


# --------------------------------------------------------------------------------------
# Gradients, per-sample gradients, captured a / δ
# --------------------------------------------------------------------------------------


def loss_gradient(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``∇L`` of the mean-reduced batch loss for every trainable parameter (``.grad`` untouched)."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {
        k: (torch.zeros_like(p) if gr is None else gr.detach())
        for (k, p), gr in zip(named, grads, strict=True)
    }


def per_sample_grads(
    model: nn.Module, loss_per_sample_fn: LossFn, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """``∇ℓ_n`` for every sample via ``vmap(grad(functional_call))``: ``{name: [B, *shape]}``.

    ``ℓ_n = loss_per_sample_fn(model(x[n:n+1]), y[n:n+1])`` (the loss is called on a batch of
    one, so any mean-reduced loss gives the per-sample loss whose batch mean is the loss).
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xn.unsqueeze(0),))
        return loss_per_sample_fn(out, yn.unsqueeze(0))

    result: dict[str, Tensor] = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    return result


def per_sample_vectors(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
    """Layer vectors ``v_n`` of the per-sample gradients, shape ``[B, P]``."""
    return layer_param_vector(model, per_sample_grads(model, loss_fn, x, y))


def conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """im2col of an N-d convolution by explicit slicing: ``[N, T, C_in·∏k]``, locations
    row-major over the output grid, columns ordered like ``weight.reshape(C_out, -1)``
    (channel, then kernel offsets)."""
    assert isinstance(module, CONVS)
    if isinstance(module.padding, str):
        raise ValueError("oracle supports only numeric convolution padding")
    dims = x.dim() - 2
    kernel, stride, pad, dil = module.kernel_size, module.stride, module.padding, module.dilation
    xp = F.pad(x, [p for size in reversed(pad) for p in (size, size)])
    grid = [
        (x.shape[2 + i] + 2 * pad[i] - dil[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        for i in range(dims)
    ]
    rows = []
    for position in itertools.product(*(range(g) for g in grid)):
        window = tuple(
            slice(o * s, o * s + d * (k - 1) + 1, d)
            for o, s, d, k in zip(position, stride, dil, kernel, strict=True)
        )
        rows.append(xp[(slice(None), slice(None), *window)].reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


def _homogeneous_inputs(module: nn.Module, inputs: Tensor) -> Tensor:
    if bias_alone(module):  # ā = 1 at every location
        locations = conv_patches(module, inputs).shape[1] if isinstance(module, CONVS) else None
        shape = (inputs.shape[0], locations or inputs[0].numel() // inputs.shape[-1], 1)
        return torch.ones(shape, dtype=inputs.dtype)
    if isinstance(module, CONVS):
        a = conv_patches(module, inputs)
    else:
        a = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    if getattr(module, "bias", None) is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a


def _locations_last(module: nn.Module, out: Tensor) -> Tensor:
    if isinstance(module, CONVS):
        return out.reshape(out.shape[0], out.shape[1], -1).permute(0, 2, 1)
    return out.reshape(out.shape[0], -1, out.shape[-1])


def capture_layer_stats(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer name: (a [N,T,d_in'], g [N,T,d_out])}`` with ``δ = B · ∂L/∂s`` of the
    mean-reduced loss ``L = loss_fn(model(x), y)`` (private hooks, not the library's)."""
    layers = preconditioned_layers(model)
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(_m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            if name in outputs:
                raise RuntimeError(f"layer {name!r} called twice; oracle needs single use")
            inputs[name] = inp[0].detach()
            outputs[name] = out

        return hook

    for name, module in layers:
        handles.append(module.register_forward_hook(make_hook(name)))
    try:
        loss = loss_fn(model(x), y)
    finally:
        for h in handles:
            h.remove()
    names = [name for name, _ in layers]
    grads = torch.autograd.grad(loss, [outputs[k] for k in names], allow_unused=True)
    batch = x.shape[0]
    stats: dict[str, tuple[Tensor, Tensor]] = {}
    for (name, module), gr in zip(layers, grads, strict=True):
        gout = torch.zeros_like(outputs[name]) if gr is None else gr
        g = _locations_last(module, gout.detach() * batch)
        if isinstance(module, nn.Embedding):  # W̄ = E [V, D]: δ = one-hot token, ā = B ∂L/∂E[x]
            tokens = inputs[name].reshape(batch, -1)
            delta = F.one_hot(tokens, module.num_embeddings).to(g.dtype)
            if module.padding_idx is not None:  # torch gives the padding row no gradient
                delta[..., module.padding_idx] = 0.0
            stats[name] = (g, delta)
        else:
            stats[name] = (_homogeneous_inputs(module, inputs[name]), g)
    return stats


# --------------------------------------------------------------------------------------
# Dense Fisher and KFAC blocks
# --------------------------------------------------------------------------------------


def outer_matrix(applied: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """``M⁻¹(u vᵀ)`` as a matrix, from either form the library returns (the matrix, or the
    pair of vectors whose outer product it is)."""
    return torch.outer(*applied) if isinstance(applied, tuple) else applied


def dense_fisher(vectors: Tensor) -> Tensor:
    """``F = (1/B) Σ_n v_n v_nᵀ`` for per-sample vectors ``[B, P]``."""
    return vectors.T @ vectors / vectors.shape[0]


def diagonal_blocks(matrix: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """The per-layer diagonal blocks of a ``[P, P]`` matrix."""
    return [matrix[sl, sl] for sl in layer_slices(sizes)]


def kfac_factors(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``A = Σ_{n,t} ā āᵀ/(N T)``, ``G = Σ_{n,t} δ δᵀ/(N T)``."""
    count = a.shape[0] * a.shape[1]
    return (
        torch.einsum("nti,ntj->ij", a, a) / count,
        torch.einsum("nti,ntj->ij", g, g) / count,
    )


def position_factors(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, float]:
    """``(A, G, T)`` of a layer whose locations are positions (a ``Linear`` on ``[N, T, D]``),
    as the README states the rule: with ``T > 1``, dead positions are left out of ``A``, ``G``
    and ``T``, which is then ``M/N`` for the ``M`` positions kept (all of them when none or
    every one is dead). Dead is ``δ = 0`` in every position-wise layer of the layout; here,
    the layer's own zero rows, which is the same where its zeros are padding (as in the nets
    of the tests that use it: key padding, ignored positions under a causal mean)."""
    n, t = a.shape[0], a.shape[1]
    rows_a, rows_g = a.reshape(n * t, -1), g.reshape(n * t, -1)
    locations: float = t
    keep = (rows_g != 0).any(dim=1)
    if t > 1 and 0 < int(keep.sum()) < n * t:
        rows_a, rows_g, locations = rows_a[keep], rows_g[keep], int(keep.sum()) / n
    return rows_a.T @ rows_a / len(rows_a), rows_g.T @ rows_g / len(rows_g), locations


def pi_factor(A: Tensor, G: Tensor) -> float:
    """``π = sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse 2015 §6.3)."""
    return math.sqrt(float((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])))


def dense_kfac_matrix(A: Tensor, G: Tensor, damping: float, mode: str = "per_factor") -> Tensor:
    """Dense damped KFAC block in row-major coordinates:

    * ``per_factor``: ``kron(G + λI, A + λI)``
    * ``pi``: ``kron(G + (√λ/π) I, A + π√λ I)``, ``π² = (tr A/dim A)/(tr G/dim G)``
    * ``eigen_sum``: ``kron(G, A) + λI``
    """
    eye_a = torch.eye(A.shape[0], dtype=A.dtype)
    eye_g = torch.eye(G.shape[0], dtype=G.dtype)
    if mode == "per_factor":
        return torch.kron(G + damping * eye_g, A + damping * eye_a)
    if mode == "pi":
        pi = pi_factor(A, G)
        root = math.sqrt(damping)
        return torch.kron(G + (root / pi) * eye_g, A + (pi * root) * eye_a)
    if mode == "eigen_sum":
        return torch.kron(G, A) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
    raise ValueError(f"mode must be one of {DAMPING_MODES}, got {mode!r}")


def dense_kfac_block(a: Tensor, g: Tensor, damping: float, mode: str = "per_factor") -> Tensor:
    """``K`` of :func:`dense_kfac_matrix` with ``A, G`` from ``a [N,T,d_in']``, ``g [N,T,d_out]``.

    The KFAC direction of the layer is ``K⁻¹ vec_row(∇W̄)``; for Conv2d the library
    additionally divides by ``T`` (see :func:`effective_kfac_block`).
    """
    A, G = kfac_factors(a, g)
    return dense_kfac_matrix(A, G, damping, mode)


def effective_kfac_block(
    module: nn.Module, a: Tensor, g: Tensor, damping: float, mode: str = "per_factor"
) -> Tensor:
    """The layer's block ``M_i`` of the KFAC preconditioner: ``T · K`` (the preconditioned
    gradient ``K⁻¹∇`` divided by the ``T`` locations: a convolution's output positions,
    a sequence's; ``K`` for ``T = 1``)."""
    return dense_kfac_block(a, g, damping, mode) * a.shape[1]


def block_diag(blocks: Sequence[Tensor]) -> Tensor:
    return torch.block_diag(*blocks)


@dataclass
class DenseProblem:
    """Everything the dense oracles know about one batch.

    Attributes:
        names: preconditioned layer names (module order); ``sizes``: their block sizes.
        stats: per layer ``(a, g)``; ``factors``: per layer ``(A, G)``.
        grad: layer vector of ``∇L`` (mean loss), shape ``[P]``.
        grads: ``∇L`` of every trainable parameter (name → tensor).
        per_sample: ``[B, P]`` per-sample gradient vectors (torch.func).
        fisher: ``F = (1/B) Σ v_n v_nᵀ`` (empirical Fisher, off-diagonal blocks included).
        fisher_damped: ``F̂ = F + λI``.
        kfac: ``M`` = block-diag of :func:`effective_kfac_block`; ``kfac_inv = M⁻¹``.
    """

    damping: float
    names: list[str]
    sizes: list[int]
    stats: list[tuple[Tensor, Tensor]]
    factors: list[tuple[Tensor, Tensor]]
    grad: Tensor
    grads: dict[str, Tensor]
    per_sample: Tensor
    fisher: Tensor
    fisher_damped: Tensor
    kfac: Tensor
    kfac_inv: Tensor


def build_dense_problem(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    damping: float,
    mode: str = "per_factor",
) -> DenseProblem:
    """Dense statistics of one batch under the contract settings (empirical Fisher of the
    whole batch, no EMA)."""
    layers = preconditioned_layers(model)
    captured = capture_layer_stats(model, loss_fn, x, y)
    stats = [captured[name] for name, _ in layers]
    blocks = [
        effective_kfac_block(m, a, g, damping, mode)
        for (_, m), (a, g) in zip(layers, stats, strict=True)
    ]
    kfac = block_diag(blocks)
    per_sample = per_sample_vectors(model, loss_fn, x, y)
    fisher = dense_fisher(per_sample)
    grads = loss_gradient(model, loss_fn, x, y)
    return DenseProblem(
        damping=damping,
        names=[name for name, _ in layers],
        sizes=[b.shape[0] for b in blocks],
        stats=stats,
        factors=[kfac_factors(a, g) for a, g in stats],
        grad=layer_param_vector(model, grads),
        grads=grads,
        per_sample=per_sample,
        fisher=fisher,
        fisher_damped=fisher + damping * torch.eye(fisher.shape[0], dtype=fisher.dtype),
        kfac=kfac,
        kfac_inv=block_diag([torch.linalg.inv(b) for b in blocks]),
    )


def _update_from_direction(
    model: nn.Module, direction: Tensor, grads: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``Δ = −direction`` on preconditioned layers, ``Δ = −∇`` (plain SGD) elsewhere."""
    update = {k: -v for k, v in layer_vector_to_params(model, direction).items()}
    for k, gr in grads.items():
        update.setdefault(k, -gr)
    return update


def dense_kfac_update(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    damping: float,
    mode: str = "per_factor",
) -> dict[str, Tensor]:
    """Expected parameter change of one KFAC ``step()`` under the contract settings
    (``fisher="empirical", ema_decay=0, cov_interval=inv_interval=1, kl_clip=None,
    momentum=0, weight_decay=0, lr=1``): per preconditioned layer
    ``Δ = −M_i⁻¹ vec_row(∇W̄_i)`` by ``torch.linalg.solve`` (``M_i = T·K`` for Conv2d);
    other trainable parameters get ``Δ = −∇``. Keyed by parameter name."""
    layers = preconditioned_layers(model)
    captured = capture_layer_stats(model, loss_fn, x, y)
    grads = loss_gradient(model, loss_fn, x, y)
    g = layer_param_vector(model, grads)
    pieces = []
    for (name, module), sl in zip(layers, layer_slices(layer_sizes(model)), strict=True):
        a, gg = captured[name]
        M = effective_kfac_block(module, a, gg, damping, mode)
        pieces.append(torch.linalg.solve(M, g[sl]))
    return _update_from_direction(model, torch.cat(pieces), grads)


# --------------------------------------------------------------------------------------
# Two-level formulas (pure dense math)
# --------------------------------------------------------------------------------------


def coarse_matrix(R0: Tensor, fisher_damped: Tensor) -> Tensor:
    """Galerkin matrix ``F_c = R₀ F̂ R₀ᵀ``."""
    return R0 @ fisher_damped @ R0.T


def coarse_operator(R0: Tensor, fisher_damped: Tensor, coarse: Tensor | None = None) -> Tensor:
    """``Q = R₀ᵀ F_c⁻¹ R₀`` with ``F_c = R₀ F̂ R₀ᵀ`` unless ``coarse`` is given."""
    Fc = coarse_matrix(R0, fisher_damped) if coarse is None else coarse
    return R0.T @ torch.linalg.solve(Fc, R0)


def twolevel_direction(
    g: Tensor,
    kfac_inv: Tensor,
    fisher_damped: Tensor,
    R0: Tensor,
    combination: str,
    coarse_scale: float = 1.0,
    coarse: Tensor | None = None,
) -> Tensor:
    """Two-level direction ``d`` (the step is ``−lr·d``), ``M⁻¹ = kfac_inv``, ``F̂ = fisher_damped``:

    * additive: ``d = M⁻¹g + c·Qg`` (``c = coarse_scale``, used only here)
    * adef2:    ``d = M⁻¹g + Q(g − F̂M⁻¹g)``
    * adef1:    ``d = Qg + M⁻¹(g − F̂Qg)``
    * balanced: ``d = (I − QF̂) M⁻¹ (I − F̂Q) g + Qg``
    """
    Q = coarse_operator(R0, fisher_damped, coarse)
    if combination == "additive":
        return kfac_inv @ g + coarse_scale * (Q @ g)
    if combination == "adef2":
        fine = kfac_inv @ g
        return fine + Q @ (g - fisher_damped @ fine)
    if combination == "adef1":
        coarse_part = Q @ g
        return coarse_part + kfac_inv @ (g - fisher_damped @ coarse_part)
    if combination == "balanced":
        coarse_part = Q @ g
        inner = kfac_inv @ (g - fisher_damped @ coarse_part)
        return inner - Q @ (fisher_damped @ inner) + coarse_part
    raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")


def residual(g: Tensor, kfac_inv: Tensor, fisher_damped: Tensor) -> Tensor:
    """``res = g − F̂ M⁻¹ g``."""
    return g - fisher_damped @ (kfac_inv @ g)


def energy_decrease(g: Tensor, kfac_inv: Tensor, fisher_damped: Tensor, R0: Tensor) -> Tensor:
    """``E(β*) − E(0) = −(R₀ res)ᵀ F_c⁻¹ (R₀ res)`` with ``E(β) = ‖M⁻¹g + R₀ᵀβ − F̂⁻¹g‖²_F̂``."""
    r = R0 @ residual(g, kfac_inv, fisher_damped)
    return -(r @ torch.linalg.solve(coarse_matrix(R0, fisher_damped), r))


def energy_error(d: Tensor, g: Tensor, fisher_damped: Tensor) -> Tensor:
    """``‖d − F̂⁻¹g‖²_F̂``."""
    e = d - torch.linalg.solve(fisher_damped, g)
    return e @ fisher_damped @ e


def _embed(sizes: Sequence[int], i: int, v: Tensor) -> Tensor:
    out = v.new_zeros(sum(sizes))
    out[layer_slices(sizes)[i]] = v
    return out


def _inf_normalised(v: Tensor) -> Tensor:
    scale = v.abs().max()
    return v / scale if scale > 0 else v


def nicolaides_basis(sizes: Sequence[int], dtype: torch.dtype | None = None) -> Tensor:
    """``R₀`` with one row per layer: ones on that layer's ``W̄`` block. ``[L, P]``."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    return torch.stack([_embed(sizes, i, torch.ones(n, dtype=dtype)) for i, n in enumerate(sizes)])


def spectral_basis(factors: Sequence[tuple[Tensor, Tensor]], which: str = "smallest") -> Tensor:
    """Per layer ``vec_row(q_G q_Aᵀ) = kron(q_G, q_A)`` with ``q`` the eigenvector of the
    smallest (or largest) eigenvalue of ``G`` and ``A`` (damping by ``+cI`` keeps the
    eigenvectors), scaled by ``1/‖·‖_∞``. Ill-defined for repeated extreme eigenvalues."""
    if which not in ("smallest", "largest"):
        raise ValueError(f"which must be 'smallest' or 'largest', got {which!r}")
    col = 0 if which == "smallest" else -1
    sizes = [A.shape[0] * G.shape[0] for A, G in factors]
    rows = []
    for i, (A, G) in enumerate(factors):
        q_a = torch.linalg.eigh(A).eigenvectors[:, col]
        q_g = torch.linalg.eigh(G).eigenvectors[:, col]
        rows.append(_embed(sizes, i, _inf_normalised(torch.kron(q_g, q_a))))
    return torch.stack(rows)


def residual_basis(
    g: Tensor, kfac_inv: Tensor, fisher_damped: Tensor, sizes: Sequence[int]
) -> Tensor:
    """Per layer ``r_i = M_i⁻¹ res_i`` (``res = g − F̂M⁻¹g``), scaled by ``1/‖r_i‖_∞``."""
    z = kfac_inv @ residual(g, kfac_inv, fisher_damped)  # M block-diagonal: (M⁻¹res)_i
    return torch.stack(
        [_embed(sizes, i, _inf_normalised(z[sl])) for i, sl in enumerate(layer_slices(sizes))]
    )


def krylov_nicolaides_basis(kfac_inv: Tensor, sizes: Sequence[int]) -> Tensor:
    """Per layer the two rows ``{1_i, M_i⁻¹ 1_i}`` (layer-major order), ``1/‖·‖_∞`` scaled."""
    rows = []
    for i, sl in enumerate(layer_slices(sizes)):
        ones = torch.ones(sizes[i], dtype=kfac_inv.dtype)
        rows.append(_embed(sizes, i, ones))
        rows.append(_embed(sizes, i, _inf_normalised(kfac_inv[sl, sl] @ ones)))
    return torch.stack(rows)


def krylov_residual_basis(
    g: Tensor, kfac_inv: Tensor, fisher_damped: Tensor, sizes: Sequence[int]
) -> Tensor:
    """Per layer ``{r_i, M_i⁻¹ r_i}`` with ``r_i`` the RESIDU vector (layer-major order)."""
    base = residual_basis(g, kfac_inv, fisher_damped, sizes)
    rows = []
    for i, sl in enumerate(layer_slices(sizes)):
        r = base[i, sl]
        rows.append(base[i])
        rows.append(_embed(sizes, i, _inf_normalised(kfac_inv[sl, sl] @ r)))
    return torch.stack(rows)


def tselepidis_coarse_matrix(stats: Sequence[tuple[Tensor, Tensor]], damping: float) -> Tensor:
    """Tselepidis et al.'s coarse matrix for ``T = 1`` layers with ``r_i = 1``:
    ``F_c[i,j] = sum(A_ij)·sum(G_ij) + λ·numel_i·δ_ij``, ``A_ij = E[ā_i ā_jᵀ]``,
    ``G_ij = E[δ_i δ_jᵀ]``. Equals ``R₀ F̂ R₀ᵀ`` (nicolaides) exactly when ``B = 1``."""
    for a, _ in stats:
        if a.shape[1] != 1:
            raise ValueError("tselepidis_coarse_matrix needs T = 1 layers")
    # sum(E[ā_i ā_jᵀ]) = E[sum(ā_i) sum(ā_j)]
    sa = torch.stack([a[:, 0].sum(-1) for a, _ in stats], dim=1)  # [B, L]
    sg = torch.stack([g[:, 0].sum(-1) for _, g in stats], dim=1)
    batch = sa.shape[0]
    sum_a = sa.T @ sa / batch
    sum_g = sg.T @ sg / batch
    numel = torch.tensor([a.shape[-1] * g.shape[-1] for a, g in stats], dtype=sum_a.dtype)
    return sum_a * sum_g + damping * torch.diag(numel)


def tselepidis_subblock_matrix(
    layers: Sequence[Sequence[tuple[Tensor, Tensor]]], numels: Sequence[int], damping: float
) -> Tensor:
    """Tselepidis' coarse matrix over layers made of Kronecker sub-blocks (a grouped
    convolution's groups, a norm's units ``ā = [x̂_i, 1]``, ``δ_i``; one for a Linear):
    ``F_c[i,j] = Σ_{s∈i,s'∈j} T·1ᵀ(A_ss' ⊗ G_ss')1 + λ·numel_i·δ_ij`` with the explicit
    cross factors ``A_ss' = Σ_{n,t} ā_s[n, m_s(t)] ā_s'[n, m_s'(t)]ᵀ / (N T)`` at
    ``T = max(T_s, T_s')``, ``m_s(t) = ⌊t·T_s/T⌋`` (``G`` likewise): KFC's ``T·A ⊗ G`` on
    the diagonal. Sub-blocks ``(ā [N, T, d_in], δ [N, T, d_out])``."""

    def at(x: Tensor, t: int) -> Tensor:
        return x[:, [k * x.shape[1] // t for k in range(t)]]

    def cross(x: Tensor, y: Tensor) -> Tensor:
        t = max(x.shape[1], y.shape[1])
        return torch.einsum("nti,ntj->ij", at(x, t), at(y, t)) / (x.shape[0] * t)

    fc = torch.zeros(len(layers), len(layers), dtype=layers[0][0][0].dtype)
    for i, li in enumerate(layers):
        for j, lj in enumerate(layers):
            for a_s, g_s in li:
                for a_r, g_r in lj:
                    block = torch.kron(cross(a_s, a_r), cross(g_s, g_r))
                    fc[i, j] += max(a_s.shape[1], a_r.shape[1]) * block.sum()  # T·1ᵀ(A ⊗ G)1
    return fc + damping * torch.diag(torch.tensor(numels, dtype=fc.dtype))


def coarse_basis(problem: DenseProblem, coarse_space: str, which: str = "smallest") -> Tensor:
    """``R₀`` of a coarse space for a :class:`DenseProblem` (``tselepidis`` → nicolaides rows)."""
    sizes = problem.sizes
    if coarse_space in ("nicolaides", "tselepidis"):
        return nicolaides_basis(sizes, problem.grad.dtype)
    if coarse_space == "spectral":
        return spectral_basis(problem.factors, which)
    if coarse_space == "residual":
        return residual_basis(problem.grad, problem.kfac_inv, problem.fisher_damped, sizes)
    if coarse_space == "krylov_nicolaides":
        return krylov_nicolaides_basis(problem.kfac_inv, sizes)
    if coarse_space == "krylov_residual":
        return krylov_residual_basis(problem.grad, problem.kfac_inv, problem.fisher_damped, sizes)
    raise ValueError(f"coarse_space must be one of {COARSE_SPACES}, got {coarse_space!r}")


def dense_twolevel_update(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    damping: float,
    mode: str = "per_factor",
    coarse_space: str = "nicolaides",
    combination: str = "additive",
    coarse_scale: float = 1.0,
    which: str = "smallest",
) -> dict[str, Tensor]:
    """Expected parameter change of one TwoLevelKFAC ``step()`` under the contract settings
    (consistent coarse refresh): ``Δ = −d`` with ``d`` from :func:`twolevel_direction`,
    ``F̂ = F + λI`` the exact empirical Fisher of the batch; ``tselepidis`` uses
    :func:`tselepidis_coarse_matrix` instead of ``R₀F̂R₀ᵀ``. Non-layer params get ``−∇``."""
    prob = build_dense_problem(model, loss_fn, x, y, damping, mode)
    R0 = coarse_basis(prob, coarse_space, which)
    coarse = tselepidis_coarse_matrix(prob.stats, damping) if coarse_space == "tselepidis" else None
    d = twolevel_direction(
        prob.grad, prob.kfac_inv, prob.fisher_damped, R0, combination, coarse_scale, coarse
    )
    return _update_from_direction(model, d, prob.grads)


# --------------------------------------------------------------------------------------
# Exact true Fisher (generalised Gauss-Newton of the likelihood)
# --------------------------------------------------------------------------------------


def likelihood_hessian(output: Tensor, likelihood: str) -> Tensor:
    """Hessian ``H_n`` of ``−log p(y|f)`` w.r.t. the (flattened) output ``f_n``, ``[B, D, D]``:
    categorical ``diag(p) − ppᵀ`` (``p = softmax f``), bernoulli ``diag(p(1−p))``
    (``p = σ(f)``, outputs independent), gaussian ``I`` (``N(f, I)``)."""
    f = output.reshape(output.shape[0], -1)
    if likelihood == "categorical":
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    if likelihood == "bernoulli":
        p = torch.sigmoid(f)
        return torch.diag_embed(p * (1 - p))
    if likelihood == "gaussian":
        return torch.eye(f.shape[1], dtype=f.dtype).expand(f.shape[0], -1, -1).clone()
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def output_jacobians(model: nn.Module, x: Tensor) -> Tensor:
    """``J_n = ∂f_n/∂θ`` in layer-vector coordinates, ``[B, D, P]`` (torch.func jacrev)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def out_one(p: dict[str, Tensor], xn: Tensor) -> Tensor:
        return functional_call(model, (p, buffers), (xn.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(out_one), in_dims=(None, 0))(params, x)
    return layer_param_vector(model, jac)


def exact_fisher(model: nn.Module, x: Tensor, likelihood: str) -> Tensor:
    """True Fisher ``F = (1/B) Σ_n J_nᵀ H_n J_n`` over the preconditioned layers, ``[P, P]``."""
    J = output_jacobians(model, x)
    with torch.no_grad():
        H = likelihood_hessian(model(x), likelihood)
    return torch.einsum("bdp,bde,beq->pq", J, H, J) / x.shape[0]


def exact_kfac_factors(
    model: nn.Module, x: Tensor, layer_name: str, likelihood: str
) -> tuple[Tensor, Tensor]:
    """``(A, G_exact)`` of a ``T = 1`` layer: ``A = (1/B) Σ ā āᵀ`` and
    ``G_exact = E_y[δδᵀ] = (1/B) Σ_n J_{s,n}ᵀ H_n J_{s,n}``, ``J_{s,n} = ∂f_n/∂s_n``."""
    module = dict(model.named_modules())[layer_name]
    batch = x.shape[0]
    store: dict[str, Tensor] = {}

    def record(_m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        store["a"], store["s"] = inp[0].detach(), out.detach()

    handle = module.register_forward_hook(record)
    try:
        with torch.no_grad():
            output = model(x)
    finally:
        handle.remove()
    if store["s"].dim() != 2:
        raise ValueError("exact_kfac_factors needs a T = 1 layer ([B, d_out] outputs)")

    def forward_with_shift(eps: Tensor) -> Tensor:
        h = module.register_forward_hook(lambda _m, _i, out: out + eps)
        try:
            return model(x).reshape(batch, -1)
        finally:
            h.remove()

    jac = torch.autograd.functional.jacobian(forward_with_shift, torch.zeros_like(store["s"]))
    J_s = torch.diagonal(jac, dim1=0, dim2=2).permute(2, 0, 1)  # [B, D, d_out]
    H = likelihood_hessian(output, likelihood)
    G = torch.einsum("bdo,bde,bep->op", J_s, H, J_s) / batch
    a = _homogeneous_inputs(module, store["a"])[:, 0]
    return a.T @ a / batch, G


# --------------------------------------------------------------------------------------
# Comparison helper
# --------------------------------------------------------------------------------------


def assert_close_report(
    actual: Tensor,
    expected: Tensor,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    name: str = "tensor",
    max_entries: int = 5,
) -> None:
    """Assert ``|actual − expected| ≤ atol + rtol·|expected|`` elementwise; on failure raise
    an ``AssertionError`` listing the max abs / rel error with their locations and the first
    ``max_entries`` mismatching entries (actual, expected, ratio)."""
    actual = torch.as_tensor(actual).detach()
    expected = torch.as_tensor(expected).detach()
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: shape mismatch, actual {tuple(actual.shape)} vs expected "
            f"{tuple(expected.shape)}"
        )
    dtype = torch.promote_types(actual.dtype, expected.dtype)
    if not dtype.is_floating_point and not dtype.is_complex:
        dtype = torch.float64
    a, e = actual.to(dtype), expected.to(dtype)
    close = torch.isclose(a, e, rtol=rtol, atol=atol)
    if bool(close.all()):
        return
    diff = (a - e).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    rel = diff / e.abs().clamp_min(torch.finfo(diff.dtype).tiny)
    bad = (~close).nonzero()
    i_abs = tuple(int(v) for v in torch.unravel_index(diff.argmax(), diff.shape))
    i_rel = tuple(int(v) for v in torch.unravel_index(rel.argmax(), rel.shape))
    lines = [
        f"{name}: {bad.shape[0]} of {a.numel()} entries not close (rtol={rtol}, atol={atol})",
        f"  max abs error {float(diff[i_abs]):.3e} at {i_abs}: "
        f"actual {float(a[i_abs]):.6e}, expected {float(e[i_abs]):.6e}",
        f"  max rel error {float(rel[i_rel]):.3e} at {i_rel}: "
        f"actual {float(a[i_rel]):.6e}, expected {float(e[i_rel]):.6e}",
        f"  |actual| max {float(a.abs().max()):.3e}, |expected| max {float(e.abs().max()):.3e}",
    ]
    for idx in bad[:max_entries].tolist():
        ix = tuple(idx)
        ratio = float(a[ix]) / float(e[ix]) if float(e[ix]) != 0 else math.inf
        lines.append(
            f"  at {ix}: actual {float(a[ix]):.6e}, expected {float(e[ix]):.6e}, ratio {ratio:.6f}"
        )
    raise AssertionError("\n".join(lines))


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def assert_resume_is_bit_identical(
    build: Callable[[], nn.Module],
    optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss: Callable[[nn.Module], Tensor],
    before: int = 3,
    after: int = 2,
) -> None:
    """``before + after`` uninterrupted steps equal ``before`` steps, a ``state_dict``
    round trip of the model and the optimizer into fresh ones, and ``after`` steps, bit
    for bit (``build`` must give the same model each time; ``loss(model)`` its loss)."""

    def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            loss(model).backward()
            opt.step()

    straight = build()
    train(straight, optimizer(straight), before + after)
    first = build()
    opt = optimizer(first)
    train(first, opt, before)
    saved = {"model": first.state_dict(), "opt": opt.state_dict()}
    resumed = build()
    resumed.load_state_dict(saved["model"])
    opt = optimizer(resumed)
    opt.load_state_dict(saved["opt"])
    train(resumed, opt, after)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def step_change(opt: torch.optim.Optimizer, weight: Tensor, loss: Tensor) -> Tensor:
    """How far one ``opt.step()`` after ``loss.backward()`` moves ``weight`` (the forward
    that made ``loss`` leaves it as it was)."""
    before = weight.detach().clone()
    loss.backward()
    opt.step()
    return weight.detach() - before
