"""KPSVD and KFAC-corrected (Koroko et al. 2023) against dense oracles on tiny float64
networks: the rearranged products and the power iteration against the dense rearranged
SVD of each layer's exact Fisher block, an exactly Kronecker block returned unchanged, the
Frobenius inequalities against KFAC, and one optimizer step against the dense inverse of
the documented damped matrix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import (
    assert_close_report,
    capture_layer_stats,
    dense_fisher,
    dense_kfac_matrix,
    kfac_factors,
    layer_param_vector,
    layer_sizes,
    layer_slices,
    layer_vector_to_params,
    loss_gradient,
    per_sample_vectors,
    preconditioned_layers,
    tiny_convnet,
    tiny_mlp,
)
from test_kfac_exact import CONTRACT, make_batch, one_step, prepare
from twolevel_kfac.curvature.blocks import LayerStats
from twolevel_kfac.curvature.kpsvd import (
    PowerIteration,
    kronecker_correction,
    nearest_kronecker,
    pencil_eigh,
)
from twolevel_kfac.curvature.persample import rearranged_adjoint_product, rearranged_product

LOSS = nn.CrossEntropyLoss()
TIGHT = PowerIteration(iterations=1000, tol=1e-13)
NETS = {"mlp": (tiny_mlp, (4,)), "conv": (tiny_convnet, (2, 5, 5))}


# ----------------------------------------------------------------- dense oracles
def rearrange(block: Tensor, d_g: int, d_a: int) -> Tensor:
    """``R`` with ``R[(o,o'),(i,i')] = F[(o,i),(o',i')]`` (row-major layer vectors), so
    ``R(kron(G, A)) = vec(G) vec(A)ᵀ``."""
    return block.reshape(d_g, d_a, d_g, d_a).permute(0, 2, 1, 3).reshape(d_g * d_g, d_a * d_a)


def leading_kronecker(block: Tensor, d_g: int, d_a: int) -> Tensor:
    """``σ₁ kron(G₁, A₁)`` from the dense SVD of the rearranged block."""
    u, s, vh = torch.linalg.svd(rearrange(block, d_g, d_a))
    return s[0] * torch.kron(u[:, 0].reshape(d_g, d_g), vh[0].reshape(d_a, d_a))


def balanced_kpsvd(block: Tensor, A: Tensor, G: Tensor, locations: int) -> tuple[Tensor, Tensor]:
    """The documented split: ``T·kron(G_k, A_k)`` the leading term, ``‖A_k‖/‖G_k‖ = ‖A‖/‖G‖``,
    ``tr A_k ≥ 0``."""
    d_g, d_a = G.shape[0], A.shape[0]
    u, s, vh = torch.linalg.svd(rearrange(block, d_g, d_a))
    g1, a1 = u[:, 0].reshape(d_g, d_g), vh[0].reshape(d_a, d_a)
    if a1.trace() < 0:
        a1, g1 = -a1, -g1
    scale = float(s[0]) / locations
    split = math.sqrt(scale * float(A.norm() / G.norm()))
    return split * a1, scale / split * g1


def exact_blocks(
    model: nn.Module, x: Tensor, y: Tensor, reduce: bool = False
) -> list[dict[str, Tensor | int]]:
    """Per layer: the exact (empirical) Fisher block, KFAC's ``A, G``, ``T`` and ``∇``
    (``reduce``: KFAC-reduce's ``A``, ``G`` of ``ā_n = mean_t ā``, ``δ_n = Σ_t δ``, ``T = 1``)."""
    captured = capture_layer_stats(model, LOSS, x, y)
    fisher = dense_fisher(per_sample_vectors(model, LOSS, x, y))
    grad = layer_param_vector(model, loss_gradient(model, LOSS, x, y))
    out: list[dict[str, Tensor | int]] = []
    for (name, _), sl in zip(
        preconditioned_layers(model), layer_slices(layer_sizes(model)), strict=True
    ):
        a, g = captured[name]
        if reduce:
            a, g = a.mean(1, keepdim=True), g.sum(1, keepdim=True)
        A, G = kfac_factors(a, g)
        out.append(
            {"F": fisher[sl, sl], "A": A, "G": G, "T": a.shape[1], "grad": grad[sl], "name": name}
        )
    return out


def random_stats(n: int, locations: int, d_a: int, d_g: int, seed: int) -> LayerStats:
    gen = torch.Generator().manual_seed(seed)
    return LayerStats(
        torch.randn(n, locations, d_a, generator=gen, dtype=torch.float64),
        torch.randn(n, locations, d_g, generator=gen, dtype=torch.float64),
    )


def stats_fisher(stats: LayerStats) -> Tensor:
    psi = torch.einsum("nto,nti->noi", stats.g, stats.a).flatten(1)
    return psi.T @ psi / psi.shape[0]


# ----------------------------------------------------------------- pure functions
@pytest.mark.parametrize("locations", [1, 3])
def test_rearranged_products_equal_dense(locations: int) -> None:
    stats = random_stats(5, locations, 4, 3, seed=locations)
    R = rearrange(stats_fisher(stats), 3, 4)  # [(o,o'), (i,i')]
    gen = torch.Generator().manual_seed(9)
    y = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    got_x = rearranged_product(stats, y) / 5
    got_y = rearranged_adjoint_product(stats, x) / 5
    assert_close_report(got_x.reshape(-1), R.T @ y.reshape(-1), rtol=1e-12, atol=1e-13)
    assert_close_report(got_y.reshape(-1), R @ x.reshape(-1), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("locations", [1, 3])
def test_kpsvd_and_correction_equal_dense_rearranged_svd(locations: int) -> None:
    stats = random_stats(6, locations, 4, 3, seed=10 + locations)
    A, G = kfac_factors(stats.a, stats.g)
    F = stats_fisher(stats)
    a_k, g_k, term = nearest_kronecker(stats, (A, G), 6, TIGHT)
    assert term.sweeps < TIGHT.iterations
    assert_close_report(locations * torch.kron(g_k, a_k), leading_kronecker(F, 3, 4), 1e-9, 1e-12)
    ref_a, ref_g = balanced_kpsvd(F, A, G, locations)
    assert_close_report(a_k, ref_a, rtol=1e-9, atol=1e-12, name="A_k")
    assert_close_report(g_k, ref_g, rtol=1e-9, atol=1e-12, name="G_k")
    a_2, g_2, _ = kronecker_correction(stats, (A, G), 6, TIGHT)
    residual = F - locations * torch.kron(G, A)
    expected = leading_kronecker(residual, 3, 4)
    assert_close_report(locations * torch.kron(g_2, a_2), expected, rtol=1e-9, atol=1e-12)


def test_exactly_kronecker_block_is_returned_unchanged() -> None:
    """Per-sample gradients ψ_ij = m_j l_iᵀ (ā = c·√N·l_i, δ = m_j/c) give F = LLᵀ ⊗ MMᵀ
    exactly, while the random scalings c make KFAC's A ⊗ G wrong; KPSVD recovers F."""
    gen = torch.Generator().manual_seed(3)
    L = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    M = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    n = 12
    scale = torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.5
    a = (math.sqrt(n) * scale[:, :, None] * L.T[:, None, :]).reshape(n, 1, 4)
    g = (M.T[None, :, :] / scale[:, :, None]).reshape(n, 1, 3)
    stats = LayerStats(a, g)
    F = stats_fisher(stats)
    assert_close_report(F, torch.kron(M @ M.T, L @ L.T), rtol=1e-12, atol=1e-12)
    A, G = kfac_factors(a, g)
    a_k, g_k, _ = nearest_kronecker(stats, (A, G), n, TIGHT)
    assert_close_report(torch.kron(g_k, a_k), F, rtol=1e-10, atol=1e-11, name="KPSVD")
    assert float((torch.kron(G, A) - F).norm() / F.norm()) > 0.05  # KFAC is not exact here
    *_, term = kronecker_correction(stats, (a_k, g_k), n, TIGHT)
    assert term.sigma < 1e-9 * float(F.norm())  # nothing left to correct


def test_kronecker_pair_of_kfac_is_kept_with_kfac_scale() -> None:
    """One sample: F = A ⊗ G exactly, and the balanced KPSVD factors are KFAC's own."""
    stats = random_stats(1, 1, 4, 3, seed=5)
    A, G = kfac_factors(stats.a, stats.g)
    a_k, g_k, _ = nearest_kronecker(stats, (A, G), 1, TIGHT)
    assert_close_report(a_k, A, rtol=1e-10, atol=1e-12, name="A")
    assert_close_report(g_k, G, rtol=1e-10, atol=1e-12, name="G")


def test_pencil_eigh_diagonalises_both() -> None:
    gen = torch.Generator().manual_seed(4)
    B = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    M = B @ B.T
    C = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    C = C + C.T  # indefinite
    mu, V = pencil_eigh(torch.linalg.eigh(M), 0.1, C)
    eye = torch.eye(5, dtype=torch.float64)
    assert_close_report(V.T @ (M + 0.1 * eye) @ V, eye, rtol=1e-10, atol=1e-11)
    assert_close_report(V.T @ C @ V, torch.diag(mu), rtol=1e-10, atol=1e-11)


# ----------------------------------------------------------------- on tiny networks
def _fitted(cls: type[tk.KFAC], net: str, **kwargs: object) -> tuple[tk.KFAC, list]:  # type: ignore[type-arg]
    build, shape = NETS[net]
    torch.manual_seed(0)
    model = prepare(build())
    x, y = make_batch(shape, 2, 6)
    blocks = exact_blocks(model, x, y)
    opt = cls(model, damping=0.05, power_tol=1e-13, power_iterations=1000, **CONTRACT, **kwargs)
    one_step(model, opt, x, y)
    return opt, blocks


@pytest.mark.parametrize("net", list(NETS))
def test_frobenius_errors_never_exceed_kfac(float64: None, net: str) -> None:
    """Inequality checks (theorems for converged power iterations): per layer
    ‖F − T·A_k⊗G_k‖ = √(‖F‖² − σ₁²) ≤ ‖F − T·A⊗G‖ and ‖F − T(A⊗G + A₂⊗G₂)‖ ≤ ‖F − T·A⊗G‖."""
    kpsvd, blocks = _fitted(tk.KPSVD, net)
    corrected, _ = _fitted(tk.KFACCorrected, net)
    for block in blocks:
        F, T, name = block["F"], int(block["T"]), str(block["name"])
        kfac_error = float((F - T * torch.kron(block["G"], block["A"])).norm())
        factors = kpsvd.preconditioner.factors[name]
        kpsvd_error = float((F - T * torch.kron(factors.G, factors.A)).norm())
        d_g, d_a = block["G"].shape[0], block["A"].shape[0]
        sigma = float(torch.linalg.svdvals(rearrange(F, d_g, d_a))[0])
        norm = float(F.norm())
        assert kpsvd_error**2 == pytest.approx(norm**2 - sigma**2, abs=1e-12 * norm**2)
        assert kpsvd_error <= kfac_error + 1e-12
        a_2, g_2 = corrected.preconditioner.fine.corrections[name]
        kfac_part = corrected.preconditioner.factors[name]
        approx = T * (torch.kron(kfac_part.G, kfac_part.A) + torch.kron(g_2, a_2))
        assert float((F - approx).norm()) <= kfac_error + 1e-12
        if kfac_error > 1e-8:
            assert float((F - approx).norm()) < kfac_error


def dense_fine_update(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    damping: float,
    mode: str,
    corrected: bool,
    reduce: bool = False,
) -> dict[str, Tensor]:
    """Expected change of one contract step: per layer ``−K⁻¹∇`` with
    KPSVD ``K = T·damped(A_k, G_k)``, corrected ``K = T·damped(A, G) + leading(F − T·A⊗G)``."""
    grads = loss_gradient(model, LOSS, x, y)
    pieces = []
    for block in exact_blocks(model, x, y, reduce):
        F, A, G, T = block["F"], block["A"], block["G"], int(block["T"])
        if corrected:
            residual = F - T * torch.kron(G, A)
            K = T * dense_kfac_matrix(A, G, damping, mode)
            K = K + leading_kronecker(residual, G.shape[0], A.shape[0])
        else:
            a_k, g_k = balanced_kpsvd(F, A, G, T)
            K = T * dense_kfac_matrix(a_k, g_k, damping, mode)
        pieces.append(torch.linalg.solve(K, block["grad"]))
    update = {k: -v for k, v in layer_vector_to_params(model, torch.cat(pieces)).items()}
    for k, v in grads.items():
        update.setdefault(k, -v)
    return update


STEP_CASES = [
    (cls, net, mode)
    for cls in ("kpsvd", "kfac_corrected")
    for net in NETS
    for mode in ("per_factor", "pi", "eigen_sum")
    if not (cls == "kfac_corrected" and mode == "eigen_sum")
]


@pytest.mark.parametrize(("method", "net", "mode"), STEP_CASES)
def test_one_step_equals_dense_inverse(float64: None, method: str, net: str, mode: str) -> None:
    build, shape = NETS[net]
    torch.manual_seed(1)
    model = prepare(build())
    x, y = make_batch(shape, 2, 6, seed=2)
    corrected = method == "kfac_corrected"
    expected = dense_fine_update(model, x, y, 0.05, mode, corrected)
    cls = tk.KFACCorrected if corrected else tk.KPSVD
    opt = cls(
        model, damping=0.05, damping_mode=mode, power_tol=1e-13, power_iterations=1000, **CONTRACT
    )
    actual = one_step(model, opt, x, y)
    if corrected:
        assert opt.last_stats["corrected_floored"] == 0
    for name, delta in expected.items():
        assert_close_report(actual[name], delta, rtol=1e-8, atol=1e-11, name=name)


@pytest.mark.parametrize("method", ["kpsvd", "kfac_corrected"])
@pytest.mark.parametrize("mode", ["per_factor", "pi"])
def test_one_step_under_reduce_equals_dense_inverse(float64: None, method: str, mode: str) -> None:
    """``weight_sharing="reduce"`` on the conv (``T = 9``): the fit is to the exact block with
    the reduce view's ``T = 1``, the inverse not divided by ``T`` (it split ``σ₁`` by the
    statistics' ``T = 9`` and KFAC-corrected fitted ``F − 9·A⊗G``: 0.2 off)."""
    torch.manual_seed(1)
    model = prepare(tiny_convnet())
    x, y = make_batch((2, 5, 5), 2, 6, seed=2)
    corrected = method == "kfac_corrected"
    expected = dense_fine_update(model, x, y, 0.5, mode, corrected, reduce=True)
    cls = tk.KFACCorrected if corrected else tk.KPSVD
    opt = cls(
        model,
        damping=0.5,  # 0.05 makes the corrected matrix indefinite here (floored)
        damping_mode=mode,
        weight_sharing="reduce",
        power_tol=1e-13,
        power_iterations=1000,
        **CONTRACT,
    )
    actual = one_step(model, opt, x, y)
    if corrected:
        assert opt.last_stats["corrected_floored"] == 0
    for name, delta in expected.items():
        assert_close_report(actual[name], delta, rtol=1e-8, atol=1e-11, name=name)


def test_kpsvd_cholesky_equals_eigen(float64: None) -> None:
    build, shape = NETS["conv"]
    results = []
    for method in ("eigen", "cholesky"):
        torch.manual_seed(1)
        model = prepare(build())
        x, y = make_batch(shape, 2, 6, seed=2)
        opt = tk.KPSVD(model, damping=0.05, inverse_method=method, **CONTRACT)
        results.append(one_step(model, opt, x, y))
    for name in results[0]:
        assert_close_report(results[1][name], results[0][name], rtol=1e-10, atol=1e-13)


def test_arguments_are_checked() -> None:
    model = tiny_mlp()
    with pytest.raises(ValueError, match="damping_mode"):
        tk.KFACCorrected(model, damping_mode="eigen_sum")
    with pytest.raises(ValueError, match="power_iterations"):
        tk.KPSVD(model, power_iterations=0)
    with pytest.raises(TypeError, match="power_tol"):
        tk.KFAC(model, power_tol=1e-6)


def test_unconverged_power_iteration_keeps_the_inequalities() -> None:
    """One sweep only: still ‖F − T·A_k⊗G_k‖ ≤ ‖F − T·A⊗G‖ (the start is KFAC's G, and
    the term is Rayleigh-scaled) and the correction still lowers KFAC's error."""
    stats = random_stats(7, 3, 5, 4, seed=21)
    A, G = kfac_factors(stats.a, stats.g)
    F = stats_fisher(stats)
    one = PowerIteration(iterations=1, tol=0.0)
    kfac_error = float((F - 3 * torch.kron(G, A)).norm())
    a_k, g_k, term = nearest_kronecker(stats, (A, G), 7, one)
    assert term.sweeps == 1
    assert float((F - 3 * torch.kron(g_k, a_k)).norm()) <= kfac_error
    a_2, g_2, _ = kronecker_correction(stats, (A, G), 7, one)
    corrected = 3 * (torch.kron(G, A) + torch.kron(g_2, a_2))
    assert float((F - corrected).norm()) < kfac_error


def test_the_floored_count_is_said_at_every_step_that_uses_the_pencil(float64: None) -> None:
    """KFAC-corrected at its defaults, an indefinite corrected block: the floored inverse is
    used at every step, and ``last_stats["corrected_floored"]`` says so at every step
    (only at the step that prepared the pencil before 2026-12-06)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)
    )
    opt = tk.KFACCorrected(model, lr=1.0)
    counts = []
    for k in range(4):
        x, y = make_batch((4,), 3, 16, seed=100 + k)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        counts.append(opt.preconditioner.last_stats.get("corrected_floored"))
    assert counts[0] is not None and counts[0] > 0
    assert counts == [counts[0]] * 4


def test_a_layer_whose_first_g_is_zero_recovers(float64: None) -> None:
    """A layer behind a zero-initialised one (LoRA's ``lora_A`` behind ``lora_B = 0``) has
    ``G = 0`` at its first capture; its power iteration was warm-started from that running
    ``G_k = 0`` and stayed at 0 for good (a step of ``g/λ²``: 8.0 where 1.06 was due, the KL
    clip shrinking every other layer's step), before 2026-12-06 (evening). With
    ``ema_decay=0`` its factors at the next steps are those of a fresh KPSVD on the same
    model and batch."""
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    nn.init.zeros_(model[2].weight)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    options = {"lr": 0.1, "momentum": 0.0, "fisher": "empirical", "cov_interval": 1}
    opt = tk.KPSVD(model, inv_interval=1, ema_decay=0.0, **options)
    for step in range(3):
        before = copy.deepcopy(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        fresh = tk.KPSVD(before, inv_interval=1, ema_decay=0.0, **options)
        F.cross_entropy(before(x), y).backward()
        fresh.step()
        mine, theirs = opt.preconditioner.factors["0"], fresh.preconditioner.factors["0"]
        assert (float(mine.G.norm()) == 0.0) == (step == 0)
        torch.testing.assert_close(mine.G, theirs.G, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(mine.A, theirs.A, rtol=1e-6, atol=1e-12)
