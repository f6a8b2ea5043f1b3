"""Grouped and depthwise convolutions: one KFC block per group. One contract step equals
``Δ_g = −(T · kron(G_g + λI, A_g + λI))⁻¹ vec(∇W̄_g)`` for every group ``g`` (its rows of
``[W.reshape(C_out, -1), b]``), with ``A_g``, ``G_g`` from the group's patches and output
gradients taken by private hooks and an explicit im2col (``oracles.conv_patches``), and
two-level KFAC over them equals the dense formula for the coarse spaces they support."""

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
    coarse_basis,
    conv_patches,
    dense_kfac_matrix,
    kfac_factors,
    per_sample_grads,
    tselepidis_subblock_matrix,
    twolevel_direction,
)
from test_kfac_exact import CONTRACT as KFAC_CONTRACT

DAMPING = 0.1
CONTRACT = KFAC_CONTRACT
N = 5


def grouped_net(
    groups: int, channels: int = 4, dims: int = 2, bias: bool = True, size: int | None = None
) -> tuple[nn.Sequential, int]:
    """A grouped convolution and a Linear head, with the input size (``size=6`` in 2-d:
    ``d_in' ≤ T``, the features in im2col's order)."""
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    size = size or {1: 6, 2: 3, 3: 2}[dims]
    return nn.Sequential(
        conv(channels, channels, 2, groups=groups, bias=bias, padding=1 if dims == 3 else 0),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(3),
    ), size


def data(dims: int, size: int, channels: int = 4) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, channels, *([size] * dims), generator=gen)
    return x, torch.randint(0, 3, (N,), generator=gen)


def group_statistics(net: nn.Sequential, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``ā [N, T, G, d_in']`` and ``δ = N ∂L/∂s`` ``[N, T, G, C_out/G]`` of the conv."""
    conv = net[0]
    store: dict[str, Tensor] = {}
    handle = conv.register_forward_hook(lambda _m, i, o: store.update(x=i[0], s=o))
    loss = F.cross_entropy(net(x), y)
    handle.remove()
    (grad,) = torch.autograd.grad(loss, store["s"])
    groups = conv.groups
    patches = conv_patches(conv, store["x"].detach())  # [N, T, C_in·k]
    a = patches.reshape(*patches.shape[:2], groups, -1)
    if conv.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:-1], 1)], -1)
    g = (N * grad).flatten(2).transpose(1, 2)
    return a, g.reshape(*g.shape[:2], groups, -1)


def ekfac_block(a: Tensor, g: Tensor, mode: str) -> Tensor:
    """George et al.'s dense EKFAC block of one group: ``Q diag(S + T(K − d_G⊗d_A)) Qᵀ``
    with ``Q = kron(Q_G, Q_A)`` of the group's ``A_g``, ``G_g``, ``S = diag(QᵀF_gQ)`` of its
    exact Fisher block (per-sample gradients ``ψ_n = Σ_t δ_t ā_tᵀ``) and ``K`` KFAC's."""
    big_a, big_g = kfac_factors(a, g)
    (d_a, q_a), (d_g, q_g) = torch.linalg.eigh(big_a), torch.linalg.eigh(big_g)
    q = torch.kron(q_g, q_a)
    psi = torch.einsum("nto,nti->noi", g, a).reshape(a.shape[0], -1)
    fisher = psi.T @ psi / a.shape[0]
    s = torch.diagonal(q.T @ fisher @ q)
    k = torch.diagonal(q.T @ dense_kfac_matrix(big_a, big_g, DAMPING, mode) @ q)
    return q @ torch.diag(s + a.shape[1] * (k - torch.kron(d_g, d_a))) @ q.T


@pytest.mark.parametrize(
    ("groups", "dims", "bias", "size"),
    [(2, 2, True, None), (4, 2, True, None), (4, 2, False, None), (2, 1, True, None),
     (4, 3, True, None), (4, 2, True, 6), (2, 2, True, 6)],
)  # fmt: skip
@pytest.mark.parametrize(("cls", "mode"), [
    (tk.KFAC, "per_factor"), (tk.EKFAC, "per_factor"), (tk.EKFAC, "pi"), (tk.EKFAC, "eigen_sum")
])  # fmt: skip
def test_grouped_step_equals_the_per_group_formula(
    float64: None, groups: int, dims: int, bias: bool, size: int | None, cls: type, mode: str
) -> None:
    """``groups=4`` with 4 channels is depthwise (``G_g`` of size 1). KFAC: each group's
    damped KFC block; EKFAC: each group's EKFAC block in its own eigenbasis."""
    net, size = grouped_net(groups, dims=dims, bias=bias, size=size)
    x, y = data(dims, size)
    net(x)  # materialise the lazy head
    a, g = group_statistics(net, x, y)
    conv = net[0]
    before = [p.detach().clone() for p in conv.parameters()]
    opt = cls(net, damping=DAMPING, damping_mode=mode, **CONTRACT)
    F.cross_entropy(net(x), y).backward()
    grad_w = conv.weight.grad.reshape(conv.out_channels, -1).clone()  # step writes .grad
    grad = torch.cat([grad_w, conv.bias.grad[:, None]], 1) if bias else grad_w
    opt.step()
    rows = conv.out_channels // groups
    expected = []
    for i in range(groups):
        if cls is tk.EKFAC:
            block = ekfac_block(a[:, :, i], g[:, :, i], mode)
        else:
            big_a, big_g = kfac_factors(a[:, :, i], g[:, :, i])
            block = dense_kfac_matrix(big_a, big_g, DAMPING) * a.shape[1]
        part = grad[i * rows : (i + 1) * rows]
        expected.append(-torch.linalg.solve(block, part.reshape(-1)).view_as(part))
    want = torch.cat(expected)
    got_w = conv.weight.detach() - before[0]
    torch.testing.assert_close(got_w.reshape(conv.out_channels, -1), want[:, : grad_w.shape[1]],
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    if bias:
        torch.testing.assert_close(
            conv.bias.detach() - before[1], want[:, -1], rtol=1e-10, atol=1e-12
        )


def test_ekfac_scalings_of_a_grouped_block_follow_a_new_basis(float64: None) -> None:
    """At the second refresh every group's running ``S`` is carried into the group's new
    eigenbasis, ``(P_G∘P_G) S (P_A∘P_A)ᵀ`` with ``P = Q_newᵀQ_old``, and averaged with the
    new mini-batch's second moments there (ρ = 1/2 at the second update)."""
    net, size = grouped_net(2, size=6)  # d_in' = 5 ≤ T = 25: im2col's order
    x, y = data(2, size)
    batches = [(x, y), (1.7 * x.flip(0), y.flip(0))]
    net(x)
    opt = tk.EKFAC(net, damping=DAMPING, **{**CONTRACT, "ema_decay": 0.5})
    fine = opt.preconditioner.fine
    kept = []
    for step, (xb, yb) in enumerate(batches):
        if step == 1:  # at the parameters of this step, on a twin without the hooks
            twin, _ = grouped_net(2, size=6)
            twin(xb)
            twin.load_state_dict(net.state_dict())
            a, g = group_statistics(twin, xb, yb)
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        opt.step()
        kept.append((fine._bases()["0"][1::2], fine.scalings["0"].clone()))  # (Q_A, Q_G)
    ((q_a0, q_g0), s0), ((q_a1, q_g1), s1) = kept
    assert s1.shape == (2, 2, q_a1.shape[-1])  # [G, C_out/G, d_in']
    expected = []
    for i in range(2):
        p_a, p_g = (q_a1[i].T @ q_a0[i]).square(), (q_g1[i].T @ q_g0[i]).square()
        carried = p_g @ s0[i] @ p_a.T
        psi = torch.einsum("nto,nti->noi", g[:, :, i], a[:, :, i])
        new = (q_g1[i].T @ psi @ q_a1[i]).square().mean(0)
        expected.append(0.5 * carried + 0.5 * new)
    torch.testing.assert_close(s1, torch.stack(expected), rtol=1e-10, atol=1e-14)
    assert not torch.allclose(q_a0, q_a1)  # the basis did move


SPACES = ["nicolaides", "residual", "krylov_nicolaides", "krylov_residual", "spectral"]


def smallest_kron(A: Tensor, G: Tensor) -> tuple[float, Tensor]:
    """The smallest eigenvalue of ``A ⊗ G`` and its eigenvector ``kron(q_G, q_A)``."""
    (la, qa), (lg, qg) = torch.linalg.eigh(A), torch.linalg.eigh(G)
    return float(la[0] * lg[0]), torch.kron(qg[:, 0], qa[:, 0])


def grouped_spectral_rows(factors: list[tuple[Tensor, Tensor]], head: tuple[Tensor, Tensor],
                          sizes: list[int]) -> Tensor:  # fmt: skip
    """Spectral ``R₀``: the conv's row from the group with the smallest ``λ_min(A_g ⊗ G_g)``
    (in its group's rows, zeros elsewhere), the head's ``kron(q_G, q_A)``."""
    candidates = [smallest_kron(A, G) for A, G in factors]
    best = min(range(len(candidates)), key=lambda i: candidates[i][0])
    rows_per_group = factors[0][1].shape[0]
    conv = torch.zeros(len(factors), rows_per_group, factors[0][0].shape[0])
    conv[best] = candidates[best][1].view(rows_per_group, -1)
    conv_row = conv.reshape(-1)
    head_row = smallest_kron(*head)[1]
    r0 = torch.zeros(2, sum(sizes))
    r0[0, : sizes[0]] = conv_row / conv_row.abs().max()
    r0[1, sizes[0] :] = head_row / head_row.abs().max()
    return r0


@pytest.mark.parametrize(
    ("space", "combination"), list(itertools.product([*SPACES, "tselepidis"], COMBINATIONS))
)
def test_two_level_over_grouped_blocks_equals_the_dense_formula(
    float64: None, space: str, combination: str
) -> None:
    net, size = grouped_net(2)
    x, y = data(2, size)
    net(x)
    conv, head = net[0], net[3]
    a, g = group_statistics(net, x, y)
    grads = per_sample_grads(net, F.cross_entropy, x, y)
    conv_vec = torch.cat([grads["0.weight"].reshape(N, 4, -1), grads["0.bias"][..., None]], -1)
    head_vec = torch.cat([grads["3.weight"], grads["3.bias"][..., None]], -1)
    per_sample = torch.cat([conv_vec.reshape(N, -1), head_vec.reshape(N, -1)], 1)
    groups = [dense_kfac_matrix(*kfac_factors(a[:, :, i], g[:, :, i]), DAMPING) * a.shape[1]
              for i in range(2)]  # fmt: skip
    store: dict[str, Tensor] = {}
    handle = head.register_forward_hook(lambda _m, i, o: store.update(x=i[0], s=o))
    loss = F.cross_entropy(net(x), y)
    handle.remove()
    (gh,) = torch.autograd.grad(loss, store["s"])
    ah = torch.cat([store["x"].detach(), torch.ones(N, 1)], 1)[:, None]
    head_block = dense_kfac_matrix(*kfac_factors(ah, (N * gh)[:, None]), DAMPING)
    kfac = torch.block_diag(*groups, head_block)
    fisher = per_sample.T @ per_sample / N
    problem = DenseProblem(
        damping=DAMPING, names=["0", "3"], sizes=[conv_vec[0].numel(), head_vec[0].numel()],
        stats=[], factors=[], grad=per_sample.mean(0), grads={}, per_sample=per_sample,
        fisher=fisher, fisher_damped=fisher + DAMPING * torch.eye(len(fisher)), kfac=kfac,
        kfac_inv=torch.linalg.inv(kfac),
    )  # fmt: skip
    if space == "spectral":
        group_factors = [kfac_factors(a[:, :, i], g[:, :, i]) for i in range(2)]
        head_factors = kfac_factors(ah, (N * gh)[:, None])
        R0 = grouped_spectral_rows(group_factors, head_factors, problem.sizes)
    else:
        R0 = coarse_basis(problem, space)
    coarse = None
    if space == "tselepidis":  # the groups as Kronecker sub-blocks of the conv's layer
        layers = [[(a[:, :, i], g[:, :, i]) for i in range(2)], [(ah, (N * gh)[:, None])]]
        coarse = tselepidis_subblock_matrix(layers, problem.sizes, DAMPING)
    d = twolevel_direction(
        problem.grad, problem.kfac_inv, problem.fisher_damped, R0, combination, coarse=coarse
    )

    def flat() -> Tensor:
        w = torch.cat([conv.weight.reshape(4, -1), conv.bias[:, None]], 1).reshape(-1)
        return torch.cat([w, torch.cat([head.weight, head.bias[:, None]], 1).reshape(-1)]).detach()

    before = flat()
    opt = tk.TwoLevelKFAC(net, damping=DAMPING, coarse_space=space, combination=combination,
                          **CONTRACT)  # fmt: skip
    F.cross_entropy(net(x), y).backward()
    opt.step()
    error = float(((flat() - before) + d).norm() / d.norm())
    assert error <= (1e-8 if space == "krylov_residual" else 1e-9), f"{error:.2e}"


@pytest.mark.parametrize(("cls", "groups"), [(tk.KFAC, 4), (tk.EKFAC, 4), (tk.EKFAC, 2)])
def test_grouped_resume_is_bit_identical(cls: type[tk.KFAC], groups: int) -> None:
    x, y = data(2, 6)  # d_in' ≤ T: the features in im2col's order

    def build() -> nn.Module:
        net, _size = grouped_net(groups, size=6)
        net(x)  # materialise the lazy head
        return net

    assert_resume_is_bit_identical(
        build,
        lambda net: cls(net, lr=0.05, cov_interval=2, inv_interval=2),
        lambda net: F.cross_entropy(net(x), y),
    )


def test_every_fine_level_and_coarse_space_keeps_the_grouped_blocks() -> None:
    net, size = grouped_net(2)
    net(data(2, size)[0])
    for space in (*SPACES, "tselepidis"):
        assert "0" in tk.TwoLevelKFAC(net, coarse_space=space).preconditioner.layers
    for cls in (tk.EKFAC, tk.KPSVD, tk.KFACCorrected):
        assert "0" in cls(net).preconditioner.layers


def trained_once(groups: int) -> tuple[nn.Module, tk.KFAC]:
    """A grouped net (its lazy head materialised) after one KFAC step on ``data``."""
    x, y = data(2, 3)
    net, _size = grouped_net(groups)
    net(x)
    opt = tk.KFAC(net, cov_interval=1)
    F.cross_entropy(net(x), y).backward()
    opt.step()
    return net, opt


@pytest.mark.parametrize("groups", [1, 2])
def test_a_checkpoint_of_another_grouping_is_refused_clearly(groups: int) -> None:
    """Saved with ``groups=4``, loaded where the convolution has another grouping: a
    ValueError naming the layer, and the optimizer it was loaded into is left as it was."""
    saved = trained_once(4)[1].state_dict()
    other, _size = grouped_net(groups)
    other(data(2, 3)[0])
    target = tk.KFAC(other, cov_interval=1)
    with pytest.raises(ValueError, match=r"layer '0': the checkpoint's curvature"):
        target.load_state_dict(saved)
    assert target.preconditioner.steps == 0 and not target.preconditioner.factors["0"].ready


def test_a_checkpoint_of_another_width_is_refused_clearly() -> None:
    net, opt = trained_once(2)
    saved = opt.preconditioner.state_dict()
    wider = nn.Sequential(net[0], net[1], net[2], nn.Linear(net[3].in_features, 4))
    pre = tk.KFACPreconditioner(wider)
    with pytest.raises(ValueError, match=r"layer '3': the checkpoint's curvature has shapes"):
        pre.load_state_dict(saved)


def test_batched_eigendecompositions_equal_each_groups(float64: None) -> None:
    """``decompose("eigen")`` takes one batched ``eigh`` per side: every group's pairs
    rebuild its factor, with the eigenvalues of that factor alone, and π per group."""
    from twolevel_kfac.curvature.convolutions import GroupedFactors
    from twolevel_kfac.curvature.factor_inverse import safe_eigh
    from twolevel_kfac.curvature.kronecker import pi_ratio

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 3, generator=gen)
    a = x @ x.mT / 3  # rank 3 of 5: zero eigenvalues, clipped at 0
    g = torch.rand(6, 2, 2, generator=gen) + 2 * torch.eye(2)
    factors = GroupedFactors()
    factors.update(a, g @ g.mT, 0.9, 4)
    factors.decompose("eigen")
    for i, group in enumerate(factors.groups):
        assert group.decomp_a is not None and group.decomp_g is not None
        for (values, vectors), matrix in ((group.decomp_a, a[i]), (group.decomp_g, g[i] @ g[i].T)):
            torch.testing.assert_close((vectors * values) @ vectors.T, matrix, atol=1e-12, rtol=0)
            torch.testing.assert_close(values, safe_eigh(matrix)[0], atol=1e-12, rtol=0)
            assert bool((values >= 0).all())
        want = pi_ratio(float(a[i].trace()), 5, float((g[i] @ g[i].T).trace()), 2)
        assert group.decomp_pi == pytest.approx(want, rel=1e-12)
