"""Tests of the dense oracles (``tests/oracles.py``) and of ``curvature/blocks.py`` against them.

All in float64 on tiny networks; every comparison is exact up to float error.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oracles import (
    COARSE_SPACES,
    COMBINATIONS,
    assert_close_report,
    build_dense_problem,
    capture_layer_stats,
    coarse_basis,
    coarse_matrix,
    coarse_operator,
    deep_linear,
    dense_fisher,
    dense_kfac_block,
    dense_kfac_update,
    dense_twolevel_update,
    diagonal_blocks,
    energy_decrease,
    energy_error,
    exact_fisher,
    exact_kfac_factors,
    kfac_factors,
    krylov_nicolaides_basis,
    layer_matrices,
    layer_param_vector,
    layer_shape,
    layer_sizes,
    layer_slices,
    layer_vector_to_params,
    loss_gradient,
    nicolaides_basis,
    per_sample_grads,
    per_sample_vectors,
    pi_factor,
    preconditioned_layers,
    residual_basis,
    spectral_basis,
    tiny_convnet,
    tiny_mlp,
    tselepidis_coarse_matrix,
    twolevel_direction,
)
from twolevel_kfac.curvature import blocks, discovery, sample_products

pytestmark = pytest.mark.usefixtures("float64")

TIGHT = {"rtol": 1e-10, "atol": 1e-12}

# ------------------------------------------------------------------------------------------
# Problems: (model builder, input builder, target builder, loss)
# ------------------------------------------------------------------------------------------


def _dilated_convnet() -> nn.Sequential:
    """No-bias conv with a non-square kernel, stride (2,1) and dilation (1,2) → unfold order."""
    return nn.Sequential(
        nn.Conv2d(2, 2, kernel_size=(2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        nn.ReLU(),
        nn.Conv2d(2, 3, kernel_size=2, bias=False),
        nn.Flatten(),
        nn.LazyLinear(2),
    )


ModelFn = Callable[[], nn.Module]
PROBLEMS: dict[str, tuple[ModelFn, tuple[int, ...], str]] = {
    "mlp_bias": (lambda: tiny_mlp(bias=True), (4,), "ce"),
    "mlp_nobias": (lambda: tiny_mlp(bias=False), (4,), "ce"),
    "mlp_mse": (lambda: tiny_mlp(bias=True), (4,), "mse"),
    "conv_bias": (lambda: tiny_convnet(bias=True), (2, 5, 5), "ce"),
    "conv_nobias": (lambda: tiny_convnet(bias=False), (2, 5, 5), "ce"),
    "conv_dilated": (_dilated_convnet, (2, 5, 5), "ce"),
}


def make_problem(
    key: str, batch: int, seed: int = 0
) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor], Tensor, Tensor]:
    model_fn, in_shape, loss = PROBLEMS[key]
    torch.manual_seed(seed)
    model = model_fn()
    x = torch.randn(batch, *in_shape)
    model(x)  # materialise lazy layers
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, 2, (batch,))
    return model, nn.MSELoss(), x, torch.randn(batch, 2)


def _raw_io(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor):
    """Raw layer inputs and B·grad_output (as the library's hooks would see them)."""
    layers = preconditioned_layers(model)
    ins: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}

    def make_hook(n: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(_m: nn.Module, i: tuple[Tensor, ...], o: Tensor) -> None:
            ins[n], outs[n] = i[0].detach(), o

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers]
    loss = loss_fn(model(x), y)
    for h in handles:
        h.remove()
    gouts = torch.autograd.grad(loss, [outs[n] for n, _ in layers])
    return {n: (ins[n], go * x.shape[0]) for (n, _), go in zip(layers, gouts, strict=True)}


# ------------------------------------------------------------------------------------------
# (a) captured a, δ vs torch.func per-sample gradients; layer-vector helpers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("key", list(PROBLEMS))
def test_captured_stats_reproduce_per_sample_grads(key: str, batch: int) -> None:
    model, loss_fn, x, y = make_problem(key, batch)
    stats = capture_layer_stats(model, loss_fn, x, y)
    psg = per_sample_grads(model, loss_fn, x, y)
    mats = layer_matrices(model, layer_param_vector(model, psg))
    for (name, _), mat in zip(preconditioned_layers(model), mats, strict=True):
        a, g = stats[name]
        assert a.shape[:2] == g.shape[:2] and a.shape[0] == batch
        assert_close_report(torch.einsum("nto,nti->noi", g, a), mat, **TIGHT, name=name)
    # the batch gradient is the mean of the per-sample gradients
    grads = loss_gradient(model, loss_fn, x, y)
    for k, v in grads.items():
        assert_close_report(psg[k].mean(0), v, **TIGHT, name=k)


@pytest.mark.parametrize("key", list(PROBLEMS))
def test_layer_vector_round_trip(key: str) -> None:
    model, _, _, _ = make_problem(key, 1)
    vec = layer_param_vector(model)
    assert vec.shape == (sum(layer_sizes(model)),)
    back = layer_vector_to_params(model, vec)
    params = dict(model.named_parameters())
    assert set(back) == set(params)
    for k, v in back.items():
        assert torch.equal(v, params[k].detach())
    # row-major convention: the first layer block is [W, b].reshape(-1)
    _, module = preconditioned_layers(model)[0]
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        w = torch.cat([w, module.bias.detach()[:, None]], 1)
    assert torch.equal(vec[: w.numel()], w.reshape(-1))
    # leading (batch) dimensions are carried through
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    assert torch.equal(layer_param_vector(model, stacked), torch.stack([vec, 2 * vec]))


# ------------------------------------------------------------------------------------------
# (b) Kronecker exactness of the empirical Fisher for B = 1, T = 1
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["mlp_bias", "mlp_nobias", "mlp_mse"])
def test_kron_equals_empirical_fisher_block_batch_one(key: str) -> None:
    model, loss_fn, x, y = make_problem(key, 1)
    fisher = dense_fisher(per_sample_vectors(model, loss_fn, x, y))
    stats = capture_layer_stats(model, loss_fn, x, y)
    blocks_ = diagonal_blocks(fisher, layer_sizes(model))
    for (name, _), block in zip(preconditioned_layers(model), blocks_, strict=True):
        A, G = kfac_factors(*stats[name])
        assert_close_report(torch.kron(G, A), block, **TIGHT, name=name)


def test_kron_differs_from_fisher_block_for_larger_batch() -> None:
    """Sanity: the B = 1 identity above is not vacuous (it fails for B = 5)."""
    model, loss_fn, x, y = make_problem("mlp_bias", 5)
    fisher = dense_fisher(per_sample_vectors(model, loss_fn, x, y))
    A, G = kfac_factors(*capture_layer_stats(model, loss_fn, x, y)["0"])
    block = diagonal_blocks(fisher, layer_sizes(model))[0]
    assert (torch.kron(G, A) - block).abs().max() > 1e-3 * block.abs().max()


def test_conv_location_scaling_regression() -> None:
    """Regression check (not a theorem): on the tiny conv net the KFC block scaled by T is
    closer to the exact empirical Fisher block than the unscaled one."""
    model, loss_fn, x, y = make_problem("conv_bias", 5)
    fisher = dense_fisher(per_sample_vectors(model, loss_fn, x, y))
    a, g = capture_layer_stats(model, loss_fn, x, y)["0"]
    block = diagonal_blocks(fisher, layer_sizes(model))[0]
    kron = dense_kfac_block(a, g, 0.0, "eigen_sum")
    scaled = torch.linalg.norm(a.shape[1] * kron - block) / torch.linalg.norm(block)
    unscaled = torch.linalg.norm(kron - block) / torch.linalg.norm(block)
    assert scaled < unscaled
    # the trace of the exact block is ≈ T times that of kron(G, A) (here 10.2 vs T = 9)
    ratio = float(block.trace() / kron.trace())
    assert a.shape[1] / 2 < ratio < 2 * a.shape[1]


# ------------------------------------------------------------------------------------------
# (c) the library's blocks.py against the oracles
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("key", list(PROBLEMS))
def test_blocks_formats_and_factors(key: str, batch: int) -> None:
    model, loss_fn, x, y = make_problem(key, batch)
    stats = capture_layer_stats(model, loss_fn, x, y)
    raw = _raw_io(model, loss_fn, x, y)
    for name, module in preconditioned_layers(model):
        a, g = stats[name]
        inp, gout = raw[name]
        a_got, g_got = blocks.block_statistics(module, inp, gout)
        assert g_got is not None
        assert_close_report(a_got, a, **TIGHT, name=f"{name} a")
        assert_close_report(g_got, g, **TIGHT, name=f"{name} g")
        # factors against an explicit sum of outer products
        count = a.shape[0] * a.shape[1]
        A_ref = sum(torch.outer(v, v) for v in a.reshape(count, -1)) / count
        G_ref = sum(torch.outer(v, v) for v in g.reshape(count, -1)) / count
        A, G = blocks.kronecker_factors(blocks.LayerStats(a, g))
        assert_close_report(A, A_ref, **TIGHT, name=f"{name} A")
        assert_close_report(G, G_ref, **TIGHT, name=f"{name} G")
        assert blocks.layer_shape(module) == layer_shape(module)
        assert discovery.is_supported(module)


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("key", list(PROBLEMS))
def test_blocks_per_sample_contractions(key: str, batch: int) -> None:
    model, loss_fn, x, y = make_problem(key, batch)
    stats = capture_layer_stats(model, loss_fn, x, y)
    mats = layer_matrices(model, per_sample_vectors(model, loss_fn, x, y))
    gen = torch.Generator().manual_seed(1)
    for (name, module), psg in zip(preconditioned_layers(model), mats, strict=True):
        ls = blocks.LayerStats(*stats[name])
        assert_close_report(sample_products.per_sample_gradients(ls), psg, **TIGHT, name=name)
        r = torch.randn(3, *layer_shape(module), generator=gen)
        dots = torch.einsum("noi,koi->nk", psg, r)
        assert_close_report(
            sample_products.per_sample_dots(ls, r), dots, **TIGHT, name=f"{name} dots"
        )
        w1 = torch.randn(batch, generator=gen)
        assert_close_report(
            sample_products.weighted_gradient_sum(ls, w1),
            torch.einsum("n,noi->oi", w1, psg),
            **TIGHT,
            name=f"{name} wsum",
        )
        wk = torch.randn(batch, 4, generator=gen)
        assert_close_report(
            sample_products.weighted_gradient_sum(ls, wk),
            torch.einsum("nk,noi->koi", wk, psg),
            **TIGHT,
            name=f"{name} wsum K",
        )


@pytest.mark.parametrize("key", ["mlp_bias", "mlp_nobias", "conv_bias", "conv_dilated"])
def test_blocks_matrix_helpers(key: str) -> None:
    model, loss_fn, x, y = make_problem(key, 3)
    expected = layer_matrices(model, layer_param_vector(model, loss_gradient(model, loss_fn, x, y)))
    params = layer_matrices(model, layer_param_vector(model))
    model.zero_grad()
    loss_fn(model(x), y).backward()
    for (name, module), gmat, pmat in zip(
        preconditioned_layers(model), expected, params, strict=True
    ):
        assert_close_report(blocks.gradient_matrix(module), gmat, **TIGHT, name=name)
        assert torch.equal(blocks.parameter_matrix(module), pmat)
        w, b = blocks.matrix_to_parameter_shapes(module, pmat)
        assert torch.equal(w, module.weight.detach())
        assert (b is None) == (module.bias is None)
        if b is not None:
            assert torch.equal(b, module.bias.detach())


# ------------------------------------------------------------------------------------------
# (d) exact true Fisher
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_deep_linear_gaussian_kronecker_exact(batch: int, bias: bool) -> None:
    """Deep linear net, N(f, I): every diagonal Fisher block is exactly kron(G, A)."""
    torch.manual_seed(batch)
    model = deep_linear((6, 4, 3, 2), bias=bias)
    x = torch.randn(batch, 6)
    fisher = exact_fisher(model, x, "gaussian")
    for (name, _), block in zip(
        preconditioned_layers(model), diagonal_blocks(fisher, layer_sizes(model)), strict=True
    ):
        A, G = exact_kfac_factors(model, x, name, "gaussian")
        assert_close_report(torch.kron(G, A), block, rtol=1e-10, atol=1e-12, name=name)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_nonlinear_kronecker_exact_for_batch_one(likelihood: str) -> None:
    torch.manual_seed(3)
    model = tiny_mlp(bias=True)
    x = torch.randn(1, 4)
    fisher = exact_fisher(model, x, likelihood)
    for (name, _), block in zip(
        preconditioned_layers(model), diagonal_blocks(fisher, layer_sizes(model)), strict=True
    ):
        A, G = exact_kfac_factors(model, x, name, likelihood)
        assert_close_report(torch.kron(G, A), block, **TIGHT, name=name)


def _enumerated_targets(likelihood: str, out: Tensor):
    """All targets y with their probabilities p(y | f_n), shape [B] each."""
    if likelihood == "categorical":
        probs = torch.softmax(out, -1)
        for c in range(out.shape[1]):
            yield torch.full((out.shape[0],), c), probs[:, c]
    else:
        p = torch.sigmoid(out)
        for bits in itertools.product([0.0, 1.0], repeat=out.shape[1]):
            y = torch.tensor(bits).expand_as(out)
            yield y, torch.prod(torch.where(y > 0, p, 1 - p), dim=1)


def _nll(likelihood: str) -> Callable[[Tensor, Tensor], Tensor]:
    if likelihood == "categorical":
        return nn.CrossEntropyLoss()
    return lambda f, y: F.binary_cross_entropy_with_logits(f, y, reduction="sum") / f.shape[0]


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_exact_fisher_matches_enumeration(likelihood: str) -> None:
    """F = (1/B) Σ_n Σ_y p(y|f_n) ∇ℓ_n(y) ∇ℓ_n(y)ᵀ and G = Σ_y p δδᵀ, by enumerating y."""
    torch.manual_seed(4)
    model = tiny_mlp(bias=True)
    x = torch.randn(3, 4)
    with torch.no_grad():
        out = model(x)
    loss_fn = _nll(likelihood)
    fisher = torch.zeros(sum(layer_sizes(model)), sum(layer_sizes(model)))
    G_ref = {n: 0.0 for n, _ in preconditioned_layers(model)}
    for y, prob in _enumerated_targets(likelihood, out):
        v = per_sample_vectors(model, loss_fn, x, y)
        fisher += torch.einsum("n,np,nq->pq", prob, v, v) / x.shape[0]
        stats = capture_layer_stats(model, loss_fn, x, y)
        for n in G_ref:
            g = stats[n][1][:, 0]
            G_ref[n] = G_ref[n] + torch.einsum("n,ni,nj->ij", prob, g, g) / x.shape[0]
    assert_close_report(exact_fisher(model, x, likelihood), fisher, **TIGHT, name="F")
    for n, G in G_ref.items():
        assert_close_report(exact_kfac_factors(model, x, n, likelihood)[1], G, **TIGHT, name=n)


# ------------------------------------------------------------------------------------------
# dense KFAC update: independent matrix forms of the three damping modes
# ------------------------------------------------------------------------------------------


def _matrix_form_update(
    module: nn.Module, a: Tensor, g: Tensor, grad: Tensor, lam: float, mode: str
) -> Tensor:
    """−(precondition ∇W̄) with factor matrices, not Kronecker products (/T for conv)."""
    A, G = kfac_factors(a, g)
    I_a, I_g = torch.eye(A.shape[0]), torch.eye(G.shape[0])
    if mode == "per_factor":
        out = torch.linalg.solve(G + lam * I_g, grad) @ torch.linalg.inv(A + lam * I_a)
    elif mode == "pi":
        pi = pi_factor(A, G)
        out = torch.linalg.solve(G + lam**0.5 / pi * I_g, grad) @ torch.linalg.inv(
            A + pi * lam**0.5 * I_a
        )
    else:
        ea, qa = torch.linalg.eigh(A)
        eg, qg = torch.linalg.eigh(G)
        out = qg @ ((qg.T @ grad @ qa) / (eg[:, None] * ea[None, :] + lam)) @ qa.T
    if isinstance(module, nn.Conv2d):
        out = out / a.shape[1]
    return -out


@pytest.mark.parametrize("mode", ["per_factor", "pi", "eigen_sum"])
@pytest.mark.parametrize("key", ["mlp_bias", "mlp_nobias", "conv_bias", "conv_dilated"])
def test_dense_kfac_update_matches_matrix_form(key: str, mode: str) -> None:
    model, loss_fn, x, y = make_problem(key, 4)
    lam = 0.05
    update = dense_kfac_update(model, loss_fn, x, y, lam, mode)
    assert set(update) == {k for k, _ in model.named_parameters()}
    stats = capture_layer_stats(model, loss_fn, x, y)
    grads = layer_matrices(model, layer_param_vector(model, loss_gradient(model, loss_fn, x, y)))
    got = layer_matrices(model, layer_param_vector(model, update))
    for (name, module), gmat, dmat in zip(preconditioned_layers(model), grads, got, strict=True):
        expected = _matrix_form_update(module, *stats[name], gmat, lam, mode)
        assert_close_report(dmat, expected, rtol=1e-9, atol=1e-12, name=f"{name} {mode}")


def test_dense_kfac_update_plain_sgd_for_other_params() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    loss_fn = nn.CrossEntropyLoss()
    update = dense_kfac_update(model, loss_fn, x, y, 0.1)
    grads = loss_gradient(model, loss_fn, x, y)
    for k in ("1.weight", "1.bias"):
        assert torch.equal(update[k], -grads[k])
    assert not torch.allclose(update["0.weight"], -grads["0.weight"])


# ------------------------------------------------------------------------------------------
# (e) two-level dense formulas
# ------------------------------------------------------------------------------------------


@pytest.fixture
def problem():
    model, loss_fn, x, y = make_problem("mlp_bias", 8, seed=7)
    return build_dense_problem(model, loss_fn, x, y, damping=0.1)


def test_problem_matrices_consistent(problem) -> None:
    P = problem.grad.shape[0]
    assert problem.fisher.shape == problem.kfac.shape == (P, P)
    assert_close_report(problem.kfac @ problem.kfac_inv, torch.eye(P), **TIGHT)
    # M's diagonal blocks are kron(G+λI, A+λI); F's off-diagonal blocks are non-zero
    A, G = problem.factors[0]
    lam = problem.damping
    expected = torch.kron(G + lam * torch.eye(G.shape[0]), A + lam * torch.eye(A.shape[0]))
    assert_close_report(diagonal_blocks(problem.kfac, problem.sizes)[0], expected, **TIGHT)
    s0, s1 = layer_slices(problem.sizes)
    assert problem.fisher[s0, s1].abs().max() > 1e-6


@pytest.mark.parametrize("combination", ["adef1", "adef2", "balanced"])
def test_full_coarse_space_gives_exact_natural_gradient(problem, combination: str) -> None:
    P = problem.grad.shape[0]
    exact = torch.linalg.solve(problem.fisher_damped, problem.grad)
    d = twolevel_direction(
        problem.grad, problem.kfac_inv, problem.fisher_damped, torch.eye(P), combination
    )
    assert_close_report(d, exact, rtol=1e-9, atol=1e-12, name=combination)


def test_additive_is_kfac_plus_coarse(problem) -> None:
    R0 = nicolaides_basis(problem.sizes)
    fine = problem.kfac_inv @ problem.grad
    d0 = twolevel_direction(
        problem.grad, problem.kfac_inv, problem.fisher_damped, R0, "additive", 0.0
    )
    assert torch.equal(d0, fine)
    d = twolevel_direction(
        problem.grad, problem.kfac_inv, problem.fisher_damped, R0, "additive", 0.5
    )
    Q = coarse_operator(R0, problem.fisher_damped)
    assert_close_report(d, fine + 0.5 * Q @ problem.grad, **TIGHT)


def test_coarse_operator_invariant_to_row_scaling_and_projects(problem) -> None:
    R0 = krylov_nicolaides_basis(problem.kfac_inv, problem.sizes)
    scales = torch.tensor([2.0, -0.5, 3.0, 0.25])
    Fh = problem.fisher_damped
    Q = coarse_operator(R0, Fh)
    assert_close_report(coarse_operator(scales[:, None] * R0, Fh), Q, rtol=1e-9, atol=1e-12)
    assert_close_report(Q @ Fh @ Q, Q, rtol=1e-9, atol=1e-12, name="QFQ")
    assert_close_report(Q @ Fh @ R0.T, R0.T, rtol=1e-9, atol=1e-12, name="QFR0ᵀ")


@pytest.mark.parametrize("coarse_space", [s for s in COARSE_SPACES if s != "tselepidis"])
def test_adef2_energy_optimal(problem, coarse_space: str) -> None:
    g, Mi, Fh = problem.grad, problem.kfac_inv, problem.fisher_damped
    R0 = coarse_basis(problem, coarse_space)
    d = twolevel_direction(g, Mi, Fh, R0, "adef2")
    e_fine, e_two = energy_error(Mi @ g, g, Fh), energy_error(d, g, Fh)
    assert e_two <= e_fine
    assert_close_report(energy_decrease(g, Mi, Fh, R0), e_two - e_fine, rtol=1e-8, atol=1e-12)
    # adef2 beats any other correction in span(R0ᵀ)
    beta = torch.randn(R0.shape[0], generator=torch.Generator().manual_seed(2))
    assert e_two <= energy_error(d + 1e-2 * R0.T @ beta, g, Fh)


def test_balanced_operator_symmetric(problem) -> None:
    R0 = nicolaides_basis(problem.sizes)
    P = problem.grad.shape[0]
    cols = [
        twolevel_direction(e, problem.kfac_inv, problem.fisher_damped, R0, "balanced")
        for e in torch.eye(P)
    ]
    op = torch.stack(cols, dim=1)
    assert_close_report(op, op.T, rtol=1e-8, atol=1e-10)


def test_coarse_bases_shapes_support_and_scaling(problem) -> None:
    sizes = problem.sizes
    slices = layer_slices(sizes)
    for space, rows_per_layer in [
        ("nicolaides", 1),
        ("spectral", 1),
        ("residual", 1),
        ("krylov_nicolaides", 2),
        ("krylov_residual", 2),
    ]:
        R0 = coarse_basis(problem, space)
        assert R0.shape == (rows_per_layer * len(sizes), sum(sizes)), space
        for k, row in enumerate(R0):
            i = k // rows_per_layer
            outside = torch.cat([row[sl] for j, sl in enumerate(slices) if j != i])
            assert torch.all(outside == 0), space
            assert row[slices[i]].abs().max() == pytest.approx(1.0), space
    nico = nicolaides_basis(sizes)
    assert torch.all(nico[0, slices[0]] == 1)
    res = residual_basis(problem.grad, problem.kfac_inv, problem.fisher_damped, sizes)
    z = problem.kfac_inv @ (problem.grad - problem.fisher_damped @ problem.kfac_inv @ problem.grad)
    for i, sl in enumerate(slices):
        assert_close_report(res[i, sl], z[sl] / z[sl].abs().max(), **TIGHT)


@pytest.mark.parametrize("which", ["smallest", "largest"])
def test_spectral_basis_is_kronecker_eigenvector(problem, which: str) -> None:
    R0 = spectral_basis(problem.factors, which)
    for (A, G), row, sl in zip(problem.factors, R0, layer_slices(problem.sizes), strict=True):
        ea, eg = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(G)
        lam = (ea[0] * eg[0]) if which == "smallest" else (ea[-1] * eg[-1])
        v = row[sl]
        assert_close_report(torch.kron(G, A) @ v, lam * v, rtol=1e-8, atol=1e-12, name=which)
        # vec_row(q_G q_Aᵀ): the reshaped matrix is rank one with q_A rows
        assert torch.linalg.matrix_rank(v.reshape(G.shape[0], A.shape[0])) == 1


def test_spectral_smallest_is_inert_when_batch_below_input_dim() -> None:
    """Documented degenerate case: with B < d_in' the smallest eigenvector of A is
    orthogonal to every ā, so the SPECTRAL vector is F-orthogonal to everything and the
    coarse correction vanishes (rᵀg = 0 and F R₀ᵀ = 0)."""
    model, loss_fn, x, y = make_problem("mlp_bias", 3, seed=9)
    prob = build_dense_problem(model, loss_fn, x, y, damping=0.1)
    R0 = spectral_basis(prob.factors, "smallest")
    sl = layer_slices(prob.sizes)[0]  # d_in' = 5 > B = 3
    assert prob.fisher[:, sl] @ R0[0, sl] == pytest.approx(torch.zeros(R0.shape[1]), abs=1e-12)
    assert float(R0[0] @ prob.grad) == pytest.approx(0.0, abs=1e-12)


def test_tselepidis_matrix_equals_galerkin_for_batch_one() -> None:
    model, loss_fn, x, y = make_problem("mlp_bias", 1, seed=8)
    prob = build_dense_problem(model, loss_fn, x, y, damping=0.1)
    R0 = nicolaides_basis(prob.sizes)
    expected = coarse_matrix(R0, prob.fisher_damped)
    assert_close_report(tselepidis_coarse_matrix(prob.stats, 0.1), expected, **TIGHT)
    model, loss_fn, x, y = make_problem("mlp_bias", 5, seed=8)
    prob = build_dense_problem(model, loss_fn, x, y, damping=0.1)
    approx = tselepidis_coarse_matrix(prob.stats, 0.1)
    exact = coarse_matrix(nicolaides_basis(prob.sizes), prob.fisher_damped)
    assert not torch.allclose(approx, exact)  # only a Kronecker approximation for B > 1


@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("coarse_space", COARSE_SPACES)
def test_dense_twolevel_update_consistent(coarse_space: str, combination: str) -> None:
    model, loss_fn, x, y = make_problem("mlp_bias", 8, seed=9)
    update = dense_twolevel_update(
        model, loss_fn, x, y, 0.1, coarse_space=coarse_space, combination=combination
    )
    prob = build_dense_problem(model, loss_fn, x, y, 0.1)
    R0 = coarse_basis(prob, coarse_space)
    coarse = tselepidis_coarse_matrix(prob.stats, 0.1) if coarse_space == "tselepidis" else None
    d = twolevel_direction(
        prob.grad, prob.kfac_inv, prob.fisher_damped, R0, combination, coarse=coarse
    )
    assert_close_report(layer_param_vector(model, update), -d, **TIGHT)
    kfac = layer_param_vector(model, dense_kfac_update(model, loss_fn, x, y, 0.1))
    assert not torch.allclose(-d, kfac)  # the coarse term does something


# ------------------------------------------------------------------------------------------
# (f) the comparison helper
# ------------------------------------------------------------------------------------------


def test_assert_close_report_passes_and_fails() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert_close_report(a, a + 1e-12, rtol=1e-10, atol=1e-10)
    b = a.clone()
    b[1, 0] = 3.5
    with pytest.raises(AssertionError, match=r"max abs error 5\.000e-01 at \(1, 0\)"):
        assert_close_report(a, b, rtol=1e-6, atol=1e-8, name="M")
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close_report(a, a[0])
    with pytest.raises(AssertionError, match="not close"):
        assert_close_report(a, torch.full_like(a, float("nan")))
