"""EKFAC (George et al. 2018) against dense torch.func oracles on tiny float64 networks,
plus what every new fine level shares: two-level composition (``TwoLevelKFAC(fine=...)``),
bit-identical resume from ``state_dict`` and the sums reduced under ``torch.distributed``
(a simulated world of two ranks holding the same rows)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import (
    assert_close_report,
    build_dense_problem,
    capture_layer_stats,
    dense_fisher,
    dense_kfac_matrix,
    kfac_factors,
    layer_param_vector,
    layer_sizes,
    layer_slices,
    layer_vector_to_params,
    loss_gradient,
    nicolaides_basis,
    per_sample_vectors,
    preconditioned_layers,
    tiny_convnet,
    tiny_mlp,
    twolevel_direction,
)
from test_kfac_exact import CONTRACT, make_batch, mixed_net, one_step, prepare
from twolevel_kfac.distributed import Communicator

LOSS = nn.CrossEntropyLoss()
MODES = ("per_factor", "pi", "eigen_sum")
NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": (tiny_mlp, (4,), 2),
    "conv": (tiny_convnet, (2, 5, 5), 2),
    "mixed_bn": (mixed_net, (2, 6, 6), 3),
}


def ekfac_blocks(model: nn.Module, x: Tensor, y: Tensor, damping: float, mode: str) -> list[Tensor]:
    """Per layer the dense EKFAC block ``Q diag(S + T(K − d_G⊗d_A)) Qᵀ`` (row-major
    coordinates, ``Q = kron(Q_G, Q_A)``), ``S = diag(Qᵀ F_i Q)`` of the exact block ``F_i``."""
    captured = capture_layer_stats(model, LOSS, x, y)
    fisher = dense_fisher(per_sample_vectors(model, LOSS, x, y))
    blocks = []
    for (name, _), sl in zip(
        preconditioned_layers(model), layer_slices(layer_sizes(model)), strict=True
    ):
        a, g = captured[name]
        A, G = kfac_factors(a, g)
        d_a, q_a = torch.linalg.eigh(A)
        d_g, q_g = torch.linalg.eigh(G)
        Q = torch.kron(q_g, q_a)
        S = torch.diagonal(Q.T @ fisher[sl, sl] @ Q)
        K = torch.diagonal(Q.T @ dense_kfac_matrix(A, G, damping, mode) @ Q)
        D = S + a.shape[1] * (K - torch.kron(d_g, d_a))
        blocks.append(Q @ torch.diag(D) @ Q.T)
    return blocks


def dense_ekfac_update(
    model: nn.Module, x: Tensor, y: Tensor, damping: float, mode: str
) -> dict[str, Tensor]:
    grads = loss_gradient(model, LOSS, x, y)
    g = layer_param_vector(model, grads)
    blocks = ekfac_blocks(model, x, y, damping, mode)
    pieces = [
        torch.linalg.solve(b, g[sl])
        for b, sl in zip(blocks, layer_slices(layer_sizes(model)), strict=True)
    ]
    update = {k: -v for k, v in layer_vector_to_params(model, torch.cat(pieces)).items()}
    for k, v in grads.items():
        update.setdefault(k, -v)
    return update


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 6])
def test_one_step_equals_dense_ekfac(float64: None, net: str, mode: str, n: int) -> None:
    build, shape, classes = NETS[net]
    model = prepare(build())
    x, y = make_batch(shape, classes, n)
    expected = dense_ekfac_update(model, x, y, 0.05, mode)
    opt = tk.EKFAC(model, damping=0.05, damping_mode=mode, **CONTRACT)
    actual = one_step(model, opt, x, y)
    for name, delta in expected.items():
        assert_close_report(actual[name], delta, rtol=1e-9, atol=1e-12, name=name)


def test_scalings_are_the_exact_diagonal_and_follow_a_new_basis(float64: None) -> None:
    """Undamped EKFAC = diag of the exact conv block in KFAC's eigenbasis; after a second
    batch (ema 0.5) S = ½·diag_new(old EKFAC matrix) + ½·S_new."""
    model = prepare(tiny_convnet())
    batches = [make_batch((2, 5, 5), 2, 5, seed=s) for s in (0, 1)]
    opt = tk.EKFAC(model, **{**CONTRACT, "ema_decay": 0.5})
    pre = opt.preconditioner
    first = {}
    for step, (x, y) in enumerate(batches):
        pre.capture.active = False  # the oracle's forwards must not feed the optimizer
        fisher = dense_fisher(per_sample_vectors(model, LOSS, x, y))
        pre.capture.active = True
        one_step(model, opt, x, y)
        for (name, _), sl in zip(
            preconditioned_layers(model), layer_slices(layer_sizes(model)), strict=True
        ):
            factors = pre.factors[name]
            Q = torch.kron(factors.decomp_g[1], factors.decomp_a[1])
            new = torch.diagonal(Q.T @ fisher[sl, sl] @ Q).reshape(pre.fine.scalings[name].shape)
            if step == 0:
                first[name] = Q @ torch.diag(pre.fine.scalings[name].reshape(-1)) @ Q.T
                assert_close_report(pre.fine.scalings[name], new, rtol=1e-10, atol=1e-14)
            else:
                carried = torch.diagonal(Q.T @ first[name] @ Q).reshape(new.shape)
                expected = 0.5 * carried + 0.5 * new
                assert_close_report(pre.fine.scalings[name], expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("fine", ["ekfac", "kpsvd", "kfac_corrected"])
def test_two_level_uses_the_fine_level(float64: None, fine: str) -> None:
    """TwoLevelKFAC(fine=...): coarse_scale 0 is the fine optimizer's step; the additive
    Nicolaides step is M⁻¹g + R₀ᵀ(R₀F̂R₀ᵀ)⁻¹R₀g with that fine level's M⁻¹."""
    single = {"ekfac": tk.EKFAC, "kpsvd": tk.KPSVD, "kfac_corrected": tk.KFACCorrected}[fine]
    build, shape, classes = NETS["conv"]
    x, y = make_batch(shape, classes, 6)
    model = prepare(build())
    fine_opt = single(copy.deepcopy(model), damping=0.05, **CONTRACT)
    fine_step = one_step(fine_opt.preconditioner.model, fine_opt, x, y)
    off = tk.TwoLevelKFAC(
        copy.deepcopy(model), damping=0.05, fine=fine, coarse_scale=0.0, **CONTRACT
    )
    off_step = one_step(off.preconditioner.model, off, x, y)
    for name in fine_step:  # plain KFAC's own path never concatenates the bias: rounding
        assert_close_report(off_step[name], fine_step[name], rtol=1e-12, atol=1e-14, name=name)
    prob = build_dense_problem(model, LOSS, x, y, damping=0.05)
    fine_dir = -layer_param_vector(model, fine_step)  # M⁻¹g
    coarse = twolevel_direction(
        prob.grad, torch.zeros_like(prob.kfac_inv), prob.fisher_damped,
        nicolaides_basis(prob.sizes), "additive",
    )  # fmt: skip
    on = tk.TwoLevelKFAC(model, damping=0.05, fine=fine, **CONTRACT)
    actual = layer_param_vector(model, one_step(model, on, x, y))
    assert_close_report(actual, -(fine_dir + coarse), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------- resume and errors
RESUME = {
    "lr": 0.1,
    "damping": 0.05,
    "fisher": "mc",
    "fisher_batch": 0.5,
    "ema_decay": 0.9,
    "cov_interval": 1,
    "inv_interval": 2,
    "momentum": 0.9,
    "kl_clip": 1e-2,
}
OPTIMIZERS: dict[str, Callable[[nn.Module], tk.KFAC]] = {
    "ekfac": lambda m: tk.EKFAC(m, **RESUME),
    "kpsvd": lambda m: tk.KPSVD(m, **RESUME),
    "kfac_corrected": lambda m: tk.KFACCorrected(m, **RESUME),
    "twolevel_ekfac": lambda m: tk.TwoLevelKFAC(m, fine="ekfac", combination="adef2", **RESUME),
    "twolevel_corrected": lambda m: tk.TwoLevelKFAC(m, fine="kfac_corrected", **RESUME),
}


def _train(model: nn.Module, opt: tk.KFAC, seeds: range) -> None:
    for seed in seeds:
        x, y = make_batch((2, 5, 5), 2, 6, seed=seed)
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_continues_bit_identically(name: str) -> None:
    torch.manual_seed(0)
    model = tiny_convnet()
    opt = OPTIMIZERS[name](model)
    _train(model, opt, range(3))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, range(3, 6))
    resumed = tiny_convnet()
    resumed.load_state_dict(saved_model)
    resumed_opt = OPTIMIZERS[name](resumed)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, range(3, 6))
    for (key, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="inverse_method"):
        tk.EKFAC(tiny_mlp(), inverse_method="cholesky")
    with pytest.raises(ValueError, match="fine"):
        tk.TwoLevelKFAC(tiny_mlp(), fine="shampoo")
    with pytest.raises(TypeError, match="power_iterations"):
        tk.TwoLevelKFAC(tiny_mlp(), fine="ekfac", power_iterations=3)
    with pytest.raises(ValueError, match="has no 'scalings' entry"):
        tk.EKFAC(tiny_mlp()).preconditioner.load_state_dict(
            tk.KFAC(tiny_mlp()).preconditioner.state_dict()
        )


# ------------------------------------------------------------------ distributed sums
class _TwinRanks(Communicator):
    """Rank 0 of a simulated two-rank world whose other rank holds the same rows."""

    def __init__(self) -> None:
        super().__init__(None, rank=0, world_size=2)

    def all_reduce(self, tensor: Tensor) -> Tensor:
        self._count(tensor, 0.0)
        return tensor.mul_(2)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return [tensor.clone(), tensor.clone()]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj, copy.deepcopy(obj)]


@pytest.mark.parametrize("cls", [tk.EKFAC, tk.KPSVD, tk.KFACCorrected])
def test_duplicated_rows_on_two_ranks_equal_one_process(float64: None, cls: type) -> None:
    """Every per-sample sum (EKFAC's S, each power-iteration product) is all-reduced and
    divided by the global N: twice the same rows give the one-process step."""
    steps = []
    for twin in (False, True):
        torch.manual_seed(0)
        model = prepare(tiny_convnet())
        opt = cls(model, damping=0.05, distributed_inverses="replicate", **CONTRACT)
        if twin:
            opt.preconditioner.comm = _TwinRanks()
        steps.append(one_step(model, opt, *make_batch((2, 5, 5), 2, 5)))
        assert opt.preconditioner.comm.payload_bytes > 0 or not twin
    for name in steps[0]:
        assert_close_report(steps[1][name], steps[0][name], rtol=1e-12, atol=1e-15, name=name)


def test_ekfac_is_closer_to_the_exact_block_than_kfac(float64: None) -> None:
    """Undamped, EKFAC is the best matrix diagonal in KFAC's eigenbasis, which KFAC's own
    T·A⊗G also is: ‖F − Q diag(S) Qᵀ‖ ≤ ‖F − T·A⊗G‖ per layer (an inequality test)."""
    model = prepare(tiny_convnet())
    x, y = make_batch((2, 5, 5), 2, 6)
    fisher = dense_fisher(per_sample_vectors(model, LOSS, x, y))
    opt = tk.EKFAC(model, **CONTRACT)
    one_step(model, opt, x, y)
    pre = opt.preconditioner
    for name, sl in zip(pre.layers, layer_slices(layer_sizes(model)), strict=True):
        factors = pre.factors[name]
        Q = torch.kron(factors.decomp_g[1], factors.decomp_a[1])
        ekfac = Q @ torch.diag(pre.fine.scalings[name].reshape(-1)) @ Q.T
        kfac = factors.num_locations * torch.kron(factors.G, factors.A)
        assert (fisher[sl, sl] - ekfac).norm() <= (fisher[sl, sl] - kfac).norm() + 1e-12


@pytest.mark.parametrize("method", ["ekfac", "kpsvd", "kfac_corrected"])
def test_analysis_direction_equals_the_optimizer_step(float64: None, method: str) -> None:
    from twolevel_kfac.analysis.exact import compute_curvature
    from twolevel_kfac.analysis.operators import MethodSet

    torch.manual_seed(7)
    model = tiny_mlp()
    x, y = make_batch((4,), 2, 6)
    curvature = compute_curvature(model, x, y, "categorical", "empirical")
    methods = MethodSet(model, curvature, damping=0.05)
    expected = methods.direction(method)
    assert_close_report(methods.dense(method) @ curvature.flat_grad, expected, 1e-9, 1e-12)
    cls = {"ekfac": tk.EKFAC, "kpsvd": tk.KPSVD, "kfac_corrected": tk.KFACCorrected}[method]
    extra = {} if method == "ekfac" else {"power_tol": 1e-12, "power_iterations": 500}
    opt = cls(model, damping=0.05, **CONTRACT, **extra)
    step = one_step(model, opt, x, y)
    assert_close_report(-layer_param_vector(model, step), expected, rtol=1e-9, atol=1e-12)


def test_scalings_in_a_degenerate_eigenbasis_do_not_depend_on_the_rounding(
    float64: None,
) -> None:
    """A factor decomposed while rank-deficient (a batch of 8 for 21 input features) has a
    null eigenspace whose basis ``eigh`` picks by the rounding; scalings re-estimated in it
    between refreshes (``cov_interval < inv_interval``) took that pick into the steps: the
    same batches with their samples in another order ended 0.92 apart on a move of 2.2.
    ``S`` is averaged within each cluster of equal eigenvalues (the mean is every pick's)."""
    moved = [_degenerate_run(torch.float64, permute) for permute in (False, True)]
    assert float(moved[0].abs().max()) > 1.0
    torch.testing.assert_close(moved[0], moved[1], rtol=0, atol=1e-11)


def test_a_float32_ekfac_in_a_degenerate_eigenbasis_follows_the_float64_run() -> None:
    """The same in float32: the float32 factor's rounding spreads its null eigenvalues to
    about ``ε₃₂‖A‖`` (3e-9 to 2e-7 here), so they are grouped at float32's tolerance, also
    where the eigenpairs come from a float64 ``eigh`` (a review: grouped at float64's, they
    were no longer averaged and the run ended 0.27 off the float64 one, 0.36 between two
    sample orders)."""
    wide = _degenerate_run(torch.float64, False)
    for permute in (False, True):
        narrow = _degenerate_run(torch.float32, permute)
        assert float((narrow - wide).norm() / wide.norm()) < 1e-3


def _degenerate_run(dtype: torch.dtype, permute: bool) -> torch.Tensor:
    """The move of a 20-6-4 MLP in ``dtype`` over 25 EKFAC steps on batches of 8 (its first
    factor rank-deficient), ``cov_interval=2`` (scalings re-estimated between refreshes),
    each batch's samples in another order where ``permute``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 6), nn.Tanh(), nn.Linear(6, 4)).to(dtype)
    start = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    opt = tk.EKFAC(model, lr=0.1, damping=1e-2, fisher="empirical", cov_interval=2)
    gen = torch.Generator().manual_seed(0)
    for k in range(25):
        x = torch.randn(8, 20, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randint(0, 4, (8,), generator=gen)
        if permute:
            order = torch.randperm(8, generator=torch.Generator().manual_seed(k))
            x, y = x[order], y[order]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().double().flatten() for p in model.parameters()]) - start
