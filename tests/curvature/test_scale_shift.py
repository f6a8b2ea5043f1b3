"""Scale-and-shift blocks (``norm_blocks=True``): the affine ``[γ, β]`` of LayerNorm,
RMSNorm, BatchNorm and GroupNorm preconditioned by the exact unit-wise Fisher
``F_i = (1/N) Σ_n u_{n,i} u_{n,i}ᵀ``, ``u_{n,i} = ∂ℓ_n/∂(γ_i, β_i)``, damped ``F_i + λI``.

The oracle takes ``u`` from torch.func per-sample gradients (independent of the library's
hooks); for a training-mode BatchNorm, whose batch statistics couple the samples, from
``δ_n = N ∂L/∂y_n`` and the batch-normalised input (the statistics taken as constants),
checked against autograd's gradient. Two-level KFAC over a norm block is checked against
the dense formula for every coarse space and every combination."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import (
    COMBINATIONS,
    DenseProblem,
    assert_resume_is_bit_identical,
    capture_layer_stats,
    coarse_basis,
    effective_kfac_block,
    kfac_factors,
    per_sample_grads,
    tselepidis_subblock_matrix,
    twolevel_direction,
)
from test_kfac_exact import CONTRACT as KFAC_CONTRACT

DAMPING = 0.1
CONTRACT = {**KFAC_CONTRACT, "norm_blocks": True}
N = 6


def _rms() -> list[str]:
    return ["rms"] if hasattr(nn, "RMSNorm") else []


def norm_net(kind: str) -> tuple[nn.Module, Tensor]:
    """A small net around one norm layer, and its input."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind in ("batch2d", "group"):
        norm = nn.BatchNorm2d(3) if kind == "batch2d" else nn.GroupNorm(1, 3)
        net = nn.Sequential(nn.Conv2d(2, 3, 3), norm, nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
        return net, torch.randn(N, 2, 4, 4, generator=gen)
    norms = {
        "layer": lambda: nn.LayerNorm(5),
        "layer_nobias": lambda: nn.LayerNorm(5, bias=False),
        "rms": lambda: nn.RMSNorm(5),
        "batch1d": lambda: nn.BatchNorm1d(5),
        "layer_seq": lambda: nn.LayerNorm(5),
    }
    net = nn.Sequential(nn.Linear(4, 5), norms[kind](), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():  # not the identity at initialisation
        net[1].weight.uniform_(0.5, 1.5)
        if getattr(net[1], "bias", None) is not None:
            net[1].bias.uniform_(-0.5, 0.5)
    shape = (N, 3, 4) if kind == "layer_seq" else (N, 4)
    return net, torch.randn(*shape, generator=gen)


def loss_fn(out: Tensor, y: Tensor) -> Tensor:
    if out.dim() == 3:
        return F.cross_entropy(out.flatten(0, 1), y.repeat_interleave(out.shape[1]))
    return F.cross_entropy(out, y)


def unit_gradients(net: nn.Module, x: Tensor, y: Tensor, norm: nn.Module) -> Tensor:
    """``u [N, D, k]`` of the norm layer (module doc)."""
    names = {m: n for n, m in net.named_modules()}
    prefix = names[norm]
    bias = getattr(norm, "bias", None) is not None
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.training:
        store: dict[str, Tensor] = {}
        handle = norm.register_forward_hook(lambda _m, i, o: store.update(x=i[0], y=o))
        loss = loss_fn(net(x), y)
        handle.remove()
        (grad,) = torch.autograd.grad(loss, store["y"])
        delta = (len(x) * grad).movedim(1, -1).reshape(len(x), -1, norm.num_features)
        xhat = F.batch_norm(store["x"].detach(), None, None, training=True, eps=norm.eps)
        xhat = xhat.movedim(1, -1).reshape(len(x), -1, norm.num_features)
        u = torch.stack([(delta * xhat).sum(1), delta.sum(1)], -1)
    else:
        grads = per_sample_grads(net, loss_fn, x, y)
        parts = [grads[f"{prefix}.weight"]] + ([grads[f"{prefix}.bias"]] if bias else [])
        u = torch.stack(parts, -1)
    return u if bias else u[..., :1]


KINDS = [
    "layer",
    "layer_nobias",
    "layer_seq",
    *_rms(),
    "batch1d",
    "batch1d_eval",
    "batch2d",
    "group",
]


@pytest.mark.parametrize("cls", [tk.KFAC, tk.EKFAC, tk.KPSVD, tk.KFACCorrected])
@pytest.mark.parametrize("kind", KINDS)
def test_norm_step_equals_the_unit_wise_formula(float64: None, kind: str, cls: type) -> None:
    """Under every fine level (the norm block keeps its own inverse)."""
    net, x = norm_net(kind.removesuffix("_eval"))
    if kind.endswith("_eval"):
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].eval()
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(2))
    norm = net[1]
    u = unit_gradients(net, x, y, norm)
    fisher = torch.einsum("ndi,ndj->dij", u, u) / N
    params = [norm.weight] + ([norm.bias] if getattr(norm, "bias", None) is not None else [])
    grad = torch.stack(torch.autograd.grad(loss_fn(net(x), y), params), -1)
    torch.testing.assert_close(u.mean(0), grad, rtol=1e-12, atol=1e-14)  # u is ∇ℓ_n
    eye = torch.eye(u.shape[-1])
    expected = -torch.linalg.solve(fisher + DAMPING * eye, grad.unsqueeze(-1)).squeeze(-1)
    before = [p.detach().clone() for p in params]
    opt = cls(net, damping=DAMPING, **CONTRACT)
    assert "1" in opt.preconditioner.layers
    opt.zero_grad()
    loss_fn(net(x), y).backward()
    opt.step()
    got = torch.stack([p.detach() - b for p, b in zip(params, before, strict=True)], -1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def dense_problem(net: nn.Sequential, x: Tensor, y: Tensor) -> DenseProblem:
    """The dense problem of ``Linear → LayerNorm → tanh → Linear``: the Linear blocks from
    the oracles' own hooks, the norm's unit-wise block, the exact empirical Fisher."""
    stats = capture_layer_stats(net, loss_fn, x, y)
    grads = per_sample_grads(net, loss_fn, x, y)
    norm = net[1]
    u = unit_gradients(net, x, y, norm)  # [N, D, 2], row-major W̄ = [γ, β]
    blocks, vectors, sizes, factors = [], [], [], []
    for name in ("0", "1", "3"):
        if name == "1":
            fisher_units = torch.einsum("ndi,ndj->dij", u, u) / N
            blocks.append(torch.block_diag(*(f + DAMPING * torch.eye(2) for f in fisher_units)))
            vectors.append(u.reshape(N, -1))
            factors.append((torch.eye(2), torch.eye(5)))  # unused (no spectral space)
        else:
            a, g = stats[name]
            blocks.append(effective_kfac_block(net.get_submodule(name), a, g, DAMPING))
            w, b = grads[f"{name}.weight"], grads[f"{name}.bias"]
            vectors.append(torch.cat([w, b.unsqueeze(-1)], -1).reshape(N, -1))
            factors.append(kfac_factors(a, g))
        sizes.append(blocks[-1].shape[0])
    per_sample = torch.cat(vectors, dim=1)
    fisher = per_sample.T @ per_sample / N
    kfac = torch.block_diag(*blocks)
    return DenseProblem(
        damping=DAMPING,
        names=["0", "1", "3"],
        sizes=sizes,
        stats=[stats["0"], (x, x), stats["3"]],
        factors=factors,
        grad=per_sample.mean(0),
        grads={k: v.mean(0) for k, v in grads.items()},
        per_sample=per_sample,
        fisher=fisher,
        fisher_damped=fisher + DAMPING * torch.eye(len(fisher)),
        kfac=kfac,
        kfac_inv=torch.linalg.inv(kfac),
    )


SPACES = ["nicolaides", "residual", "krylov_nicolaides", "krylov_residual", "spectral"]


def spectral_rows(problem: DenseProblem, fisher_units: Tensor) -> Tensor:
    """The spectral ``R₀`` of the dense problem: ``kron(q_G, q_A)`` of the smallest
    eigenvalues for the Kronecker blocks, the norm's smallest unit-wise eigenvector in its
    unit's row (each ``1/‖·‖_∞``-normalised)."""
    rows = []
    offsets = [0, *itertools.accumulate(problem.sizes)]
    for i, (A, G) in enumerate(problem.factors):
        if i == 1:
            values, vectors = torch.linalg.eigh(fisher_units)
            unit, column = divmod(int(values.argmin()), values.shape[1])
            block = torch.zeros_like(values)
            block[unit] = vectors[unit, :, column]
            v = block.reshape(-1)
        else:
            v = torch.kron(
                torch.linalg.eigh(G).eigenvectors[:, 0], torch.linalg.eigh(A).eigenvectors[:, 0]
            )
        row = torch.zeros(offsets[-1])
        row[offsets[i] : offsets[i + 1]] = v / v.abs().max()
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize(("space", "combination"), list(itertools.product(SPACES, COMBINATIONS)))
def test_two_level_over_a_norm_block_equals_the_dense_formula(
    float64: None, space: str, combination: str
) -> None:
    """The norm block's coarse vectors live on its ``[γ, β]`` (Nicolaides: ones over
    it; residual: ``M⁻¹res`` restricted to it)."""
    net, x = norm_net("layer")
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(2))
    problem = dense_problem(net, x, y)
    if space == "spectral":
        u = unit_gradients(net, x, y, net[1])
        R0 = spectral_rows(problem, torch.einsum("ndi,ndj->dij", u, u) / N)
    else:
        R0 = coarse_basis(problem, space)
    d = twolevel_direction(problem.grad, problem.kfac_inv, problem.fisher_damped, R0, combination)
    before = torch.cat([p.detach().reshape(-1) for p in _block_order(net)])
    opt = tk.TwoLevelKFAC(
        net, damping=DAMPING, coarse_space=space, combination=combination, **CONTRACT
    )
    loss_fn(net(x), y).backward()
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in _block_order(net)])
    error = float(((after - before) + d).norm() / d.norm())
    assert error <= (1e-8 if space == "krylov_residual" else 1e-9), f"{error:.2e}"


def _block_order(net: nn.Sequential) -> list[Tensor]:
    """The parameters in the dense problem's coordinates (row-major ``W̄`` per block)."""
    out = []
    for layer in (net[0], net[1], net[3]):
        out.append(torch.cat([layer.weight.reshape(len(layer.bias), -1), layer.bias[:, None]], 1))
    return out


def norm_subblocks(net: nn.Sequential, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The norm's units as Kronecker sub-blocks: ``ā = [x̂_i, 1]`` ``[N, T, 2]`` and
    ``δ_i = N ∂L/∂y_i`` ``[N, T, 1]`` (from a hook on the norm's output)."""
    norm, store = net[1], {}
    handle = norm.register_forward_hook(lambda _m, i, o: store.update(x=i[0], y=o))
    loss = loss_fn(net(x), y)
    handle.remove()
    (grad,) = torch.autograd.grad(loss, store["y"])
    features = norm.normalized_shape[0]
    delta = (len(x) * grad).reshape(len(x), -1, features)
    xhat = F.layer_norm(store["x"].detach(), norm.normalized_shape, eps=norm.eps)
    xhat = xhat.reshape(len(x), -1, features)
    u = unit_gradients(net, x, y, norm)  # the sub-blocks' gradients are the unit-wise ones
    torch.testing.assert_close(u[..., 0], (delta * xhat).sum(1), rtol=1e-10, atol=1e-12)
    return [
        (torch.stack([xhat[..., i], torch.ones_like(xhat[..., i])], -1), delta[..., i : i + 1])
        for i in range(features)
    ]


@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("kind", ["layer", "layer_seq"])
def test_tselepidis_over_a_norm_block_equals_the_dense_formula(
    float64: None, kind: str, combination: str
) -> None:
    """Tselepidis' coarse matrix takes a norm layer as the direct sum of its units, each a
    Kronecker sub-block ``[x̂_i, 1] ⊗ δ_i`` (oracle: the explicit cross factors)."""
    net, x = norm_net(kind)
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(2))
    problem = dense_problem(net, x, y)
    stats = capture_layer_stats(net, loss_fn, x, y)
    layers = [[stats["0"]], norm_subblocks(net, x, y), [stats["3"]]]
    coarse = tselepidis_subblock_matrix(layers, problem.sizes, DAMPING)
    R0 = coarse_basis(problem, "nicolaides")
    d = twolevel_direction(
        problem.grad, problem.kfac_inv, problem.fisher_damped, R0, combination, coarse=coarse
    )
    before = torch.cat([p.detach().reshape(-1) for p in _block_order(net)])
    opt = tk.TwoLevelKFAC(
        net, damping=DAMPING, coarse_space="tselepidis", combination=combination, **CONTRACT
    )
    loss_fn(net(x), y).backward()
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in _block_order(net)])
    error = float(((after - before) + d).norm() / d.norm())
    assert error <= 1e-9, f"{error:.2e}"


def test_norm_blocks_are_off_by_default() -> None:
    net, _ = norm_net("layer")
    opt = tk.KFAC(net)  # default: the fallback step
    assert "1" not in opt.preconditioner.layers


def test_resume_with_norm_blocks_is_bit_identical() -> None:
    """A checkpoint mid-run (refreshes every 2 steps) continues with the same steps."""
    settings = {"lr": 0.05, "norm_blocks": True, "cov_interval": 2, "inv_interval": 2}
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(4))
    assert_resume_is_bit_identical(
        lambda: norm_net("layer")[0],
        lambda net: tk.KFAC(net, **settings),
        lambda net: loss_fn(net(x), y),
    )


@pytest.mark.parametrize("refresh", ["consistent", "faithful"])
def test_two_level_resume_with_norm_and_grouped_blocks_is_bit_identical(refresh: str) -> None:
    """The kept Fisher mini-batch (faithful schedule) is restored with each block's own
    statistics type (a norm's per-sample gradients are not ``δ āᵀ``)."""
    settings = {
        "lr": 0.05,
        "norm_blocks": True,
        "cov_interval": 2,
        "inv_interval": 2,
        "coarse_space": "residual",
        "combination": "adef2",
        "coarse_refresh": refresh,
    }
    x = torch.randn(N, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(4))

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.GroupNorm(2, 4), nn.Tanh(),
                             nn.Flatten(), nn.Linear(16, 3))  # fmt: skip

    assert_resume_is_bit_identical(
        build,
        lambda net: tk.TwoLevelKFAC(net, **settings),
        lambda net: F.cross_entropy(net(x), y),
    )


def test_blocks_of_their_own_refresh_on_the_schedule() -> None:
    """With ``inv_interval=3`` the frozen curvature of a norm block, a grouped convolution
    and a Kronecker block changes on steps 0 and 3 only (a block of its own once made every
    step refresh every layer)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.GroupNorm(2, 4), nn.Tanh(),
                        nn.Flatten(), nn.Linear(16, 3))  # fmt: skip
    x, y = torch.randn(N, 2, 4, 4), torch.randint(0, 3, (N,))
    opt = tk.KFAC(net, norm_blocks=True, cov_interval=1, inv_interval=3)
    pre = opt.preconditioner

    def frozen() -> list[Tensor]:
        return [
            pre.factors["1"].frozen.clone(),  # type: ignore[attr-defined]
            pre.factors["0"].groups[0].decomp_a[0].clone(),  # type: ignore[attr-defined]
            pre.factors["4"].decomp_a[0].clone(),
        ]

    seen = []
    for _ in range(5):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
        seen.append(frozen())
    for step in (1, 2, 4):  # no refresh: the frozen curvature of the step before
        for now, before in zip(seen[step], seen[step - 1], strict=True):
            assert torch.equal(now, before), step
    assert not any(torch.equal(a, b) for a, b in zip(seen[3], seen[2], strict=True))


@pytest.mark.parametrize("norm_type", [nn.LayerNorm, *([nn.RMSNorm] if _rms() else [])])
def test_a_norm_over_several_dimensions(float64: None, norm_type: type) -> None:
    """``normalized_shape=(2, 3)``: ``γ``, ``β`` of shape ``[2, 3]`` are ``D = 6`` units."""
    torch.manual_seed(0)
    norm = norm_type([2, 3])
    net = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), norm, nn.Flatten(),
                        nn.Tanh(), nn.Linear(6, 3))  # fmt: skip
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(2))
    grads = per_sample_grads(net, loss_fn, x, y)
    parts = [grads["2.weight"].reshape(N, 6)]
    if getattr(norm, "bias", None) is not None:
        parts.append(grads["2.bias"].reshape(N, 6))
    u = torch.stack(parts, -1)
    fisher = torch.einsum("ndi,ndj->dij", u, u) / N
    expected = -torch.linalg.solve(fisher + DAMPING * torch.eye(u.shape[-1]), u.mean(0)[..., None])
    params = [p for p in (norm.weight, getattr(norm, "bias", None)) if p is not None]
    before = [p.detach().clone() for p in params]
    opt = tk.KFAC(net, damping=DAMPING, **CONTRACT)
    loss_fn(net(x), y).backward()
    opt.step()
    got = torch.stack(
        [(p.detach() - b).reshape(6) for p, b in zip(params, before, strict=True)], -1
    )
    torch.testing.assert_close(got, expected[..., 0], rtol=1e-10, atol=1e-12)
