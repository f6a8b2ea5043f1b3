"""The Fisher analysis (``twolevel_kfac.analysis``): exact curvature against the dense
oracles, Kronecker exactness on deep linear networks, the methods' dense matrices against
the optimizer's own steps, Monte-Carlo convergence, hand-computed metrics, the CLI."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import (
    deep_linear,
    exact_fisher,
    exact_kfac_factors,
    layer_param_vector,
    per_sample_vectors,
    tiny_convnet,
    tiny_mlp,
    twolevel_direction,
)
from twolevel_kfac.analysis import metrics
from twolevel_kfac.analysis.config import AnalyzeConfig, load_config
from twolevel_kfac.analysis.coordinates import analysis_layers, flatten, to_layer_matrices
from twolevel_kfac.analysis.evaluate import evaluate_state
from twolevel_kfac.analysis.exact import compute_curvature, fisher_from_statistics
from twolevel_kfac.analysis.operators import ALL_METHODS, MethodSet, parse_method
from twolevel_kfac.analysis.problems import analysis_batch
from twolevel_kfac.analysis.training import train_run

ROOT = Path(__file__).resolve().parents[2]
LIKELIHOODS = ("categorical", "bernoulli", "gaussian")
GALERKIN = ("nicolaides", "spectral", "residual", "krylov_nicolaides", "krylov_residual")


def _batch(shape: tuple[int, ...], n: int, likelihood: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen)
    if likelihood == "categorical":
        return x, torch.randint(0, 2, (n,), generator=gen)
    return x, torch.rand(n, 2, generator=gen)


def _loss(likelihood: str):  # type: ignore[no-untyped-def]
    if likelihood == "categorical":
        return nn.functional.cross_entropy
    if likelihood == "bernoulli":
        return lambda o, t: (
            nn.functional.binary_cross_entropy_with_logits(o, t, reduction="sum") / len(o)
        )
    return lambda o, t: 0.5 * (o - t).square().sum() / len(o)


def _blocks(matrix: Tensor, sizes: list[int]) -> list[Tensor]:
    bounds = [0, *itertools.accumulate(sizes)]
    return [matrix[a:b, a:b] for a, b in itertools.pairwise(bounds)]


# ------------------------------------------------------------------- exact Fisher
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_dense_fisher_matches_oracle(float64: None, likelihood: str, net: str) -> None:
    """torch.func true/empirical Fisher == the oracle's; the optimizer-format statistics
    carry the same matrix."""
    torch.manual_seed(0)
    model, shape = (tiny_mlp(), (4,)) if net == "mlp" else (tiny_convnet(), (2, 5, 5))
    x, y = _batch(shape, 5, likelihood)
    true = compute_curvature(model, x, y, likelihood, "true")
    assert true.fisher is not None
    expected = exact_fisher(model, x, likelihood)
    torch.testing.assert_close(true.fisher, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fisher_from_statistics(true.stats), expected, rtol=1e-10, atol=1e-12)
    emp = compute_curvature(model, x, y, likelihood, "empirical")
    vectors = per_sample_vectors(model, _loss(likelihood), x, y)
    assert emp.fisher is not None
    torch.testing.assert_close(emp.fisher, vectors.T @ vectors / 5, rtol=1e-10, atol=1e-12)
    grad = layer_param_vector(model, {k: v.mean(0) for k, v in _named(model, vectors).items()})
    torch.testing.assert_close(emp.flat_grad, grad, rtol=1e-10, atol=1e-12)


def _named(model: nn.Module, vectors: Tensor) -> dict[str, Tensor]:
    from oracles import layer_vector_to_params

    return layer_vector_to_params(model, vectors)


def test_deep_linear_mse_fisher_blocks_are_kronecker_factors(float64: None) -> None:
    """Deep linear net + Gaussian likelihood: every diagonal block of the true Fisher is
    exactly kron(G, A) with the optimizer's factors, and G is the exact expected G."""
    torch.manual_seed(1)
    model = deep_linear((6, 4, 3, 2))
    x, y = _batch((6,), 5, "gaussian")
    curv = compute_curvature(model, x, y, "gaussian", "true")
    ms = MethodSet(model, curv, damping=1e-3)
    factors = ms.kfac("per_factor").factors
    assert curv.fisher is not None
    for name, block in zip(curv.names, _blocks(curv.fisher, curv.sizes), strict=True):
        f = factors[name]
        assert f.A is not None and f.G is not None
        torch.testing.assert_close(block, torch.kron(f.G, f.A), rtol=1e-10, atol=1e-13)
        a_exact, g_exact = exact_kfac_factors(model, x, name, "gaussian")
        torch.testing.assert_close(f.G, g_exact, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(f.A, a_exact, rtol=1e-10, atol=1e-13)
    # the off-diagonal blocks are not zero: the test compares a non-trivial structure
    assert metrics.off_diagonal_fraction(curv.fisher, curv.sizes) > 0.05


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_single_sample_kronecker_exactness(float64: None, likelihood: str) -> None:
    """B = 1 (non-linear net, any likelihood): F_ii = A ⊗ G exactly; with B = 4 it is not."""
    torch.manual_seed(2)
    model = tiny_mlp()
    for batch, exact in ((1, True), (4, False)):
        x, y = _batch((4,), batch, likelihood, seed=batch)
        curv = compute_curvature(model, x, y, likelihood, "true")
        factors = MethodSet(model, curv, 1e-3).kfac("per_factor").factors
        assert curv.fisher is not None
        errors = []
        for name, block in zip(curv.names, _blocks(curv.fisher, curv.sizes), strict=True):
            f = factors[name]
            assert f.A is not None and f.G is not None
            kron = torch.kron(f.G, f.A)
            errors.append(float((block - kron).abs().max() / block.abs().max()))
        assert (max(errors) < 1e-12) == exact, errors


def test_exact_method_scores_cosine_one_and_zero_energy(float64: None) -> None:
    torch.manual_seed(3)
    model = tiny_mlp()
    x, y = _batch((4,), 6, "categorical")
    curv = compute_curvature(model, x, y, "categorical", "true")
    result = evaluate_state(
        model,
        curv,
        (x, y),
        "categorical",
        ["exact", "kfac", "nicolaides+adef2"],
        damping=1e-2,
        spectra=["exact", "kfac"],
    )
    exact, kfac = result.methods["exact"], result.methods["kfac"]
    assert exact["cos_to_exact_ng"] == pytest.approx(1.0, abs=1e-12)
    assert exact["energy_error"] == pytest.approx(0.0, abs=1e-12)
    assert exact["condition_number"] == pytest.approx(1.0, abs=1e-8)
    assert kfac["cos_to_exact_ng"] < 0.999 and kfac["energy_error"] > 1e-6
    assert kfac["condition_number"] > 1.5


def test_block_diagonal_equals_kfac_where_kfac_is_exact(float64: None) -> None:
    """Deep linear + MSE: KFAC with A⊗G + λI (eigen_sum) is the exact block-diagonal NG;
    per-factor damping (A+λI)⊗(G+λI) is not."""
    torch.manual_seed(4)
    model = deep_linear((5, 4, 3, 2))
    x, y = _batch((5,), 7, "gaussian")
    curv = compute_curvature(model, x, y, "gaussian", "true")
    ms = MethodSet(model, curv, damping=0.05)
    torch.testing.assert_close(ms.direction("kfac_eigen_sum"), ms.direction("block_diagonal"))
    torch.testing.assert_close(ms.dense("kfac_eigen_sum"), ms.dense("block_diagonal"))
    gap = (ms.direction("kfac_per_factor") - ms.direction("block_diagonal")).norm()
    assert float(gap / ms.direction("block_diagonal").norm()) > 1e-3


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mc_fisher_converges_to_exact_expectation(float64: None, likelihood: str) -> None:
    """F_mc with M sampled targets per input → the exact expectation (curvlinops tolerances:
    both sides divided by max|F|), and M = 3000 is much closer than M = 10."""
    torch.manual_seed(5)
    model = tiny_mlp()
    x, y = _batch((4,), 4, likelihood)
    exact = compute_curvature(model, x, y, likelihood, "true").fisher
    assert exact is not None
    scale = exact.abs().max()
    errors = []
    for samples in (10, 3000):
        gen = torch.Generator().manual_seed(0)
        mc = compute_curvature(model, x, y, likelihood, "mc", mc_samples=samples, generator=gen)
        assert mc.fisher is not None
        errors.append(float((mc.fisher - exact).abs().max() / scale))
    torch.testing.assert_close(mc.fisher / scale, exact / scale, rtol=1e-1, atol=1.5e-2)
    assert errors[1] < errors[0] / 3


# ------------------------------------------------------------ methods vs optimizer
def test_dense_matrices_reproduce_directions_and_oracle_formulas(float64: None) -> None:
    """For every method P g equals the method's direction; two-level directions equal the
    oracle's dense formula with the same basis (independent combination code)."""
    torch.manual_seed(6)
    model = tiny_mlp()
    x, y = _batch((4,), 6, "categorical")
    curv = compute_curvature(model, x, y, "categorical", "true")
    ms = MethodSet(model, curv, damping=0.05)
    g = curv.flat_grad
    for name in ALL_METHODS:
        d = ms.direction(name)
        torch.testing.assert_close(ms.dense(name) @ g, d, rtol=1e-9, atol=1e-11)
        spec = parse_method(name)
        if spec.kind == "twolevel" and spec.space != "tselepidis":
            assert spec.combination is not None and spec.space is not None
            expected = twolevel_direction(
                g, ms.dense("kfac"), ms.fhat(), ms.dense_basis(spec.space), spec.combination
            )
            torch.testing.assert_close(d, expected, rtol=1e-9, atol=1e-11)


def test_adef1_and_adef2_share_their_spectrum(float64: None) -> None:
    """P_adef1 = P_adef2ᵀ, so P F̂ has the same eigenvalues (the analysis reuses A-DEF2's)."""
    torch.manual_seed(9)
    model = tiny_mlp()
    x, y = _batch((4,), 6, "categorical")
    ms = MethodSet(model, compute_curvature(model, x, y, "categorical", "true"), damping=0.05)
    for space in ("nicolaides", "residual"):
        p1, p2 = ms.dense(f"{space}+adef1"), ms.dense(f"{space}+adef2")
        torch.testing.assert_close(p1, p2.T, rtol=1e-9, atol=1e-11)
        e1, _ = metrics.preconditioned_spectrum(p1, ms.fhat())
        e2, _ = metrics.preconditioned_spectrum(p2, ms.fhat())
        torch.testing.assert_close(e1, e2, rtol=1e-7, atol=1e-9)
        assert not torch.allclose(p1, p2)  # the matrices themselves differ


@pytest.mark.parametrize(
    ("space", "combination"),
    [("nicolaides", "additive"), ("residual", "adef2"), ("krylov_nicolaides", "balanced")],
)
def test_direction_equals_a_real_optimizer_step(
    float64: None, space: str, combination: str
) -> None:
    """With the empirical Fisher the analysis direction is exactly the step TwoLevelKFAC
    takes under the contract settings (lr 1, no momentum / EMA / KL clipping)."""
    torch.manual_seed(7)
    model = tiny_mlp()
    x, y = _batch((4,), 6, "categorical")
    curv = compute_curvature(model, x, y, "categorical", "empirical")
    expected = MethodSet(model, curv, damping=0.05).direction(f"{space}+{combination}")
    trained = copy.deepcopy(model)
    opt = tk.TwoLevelKFAC(
        trained,
        lr=1.0,
        momentum=0.0,
        damping=0.05,
        fisher="empirical",
        ema_decay=0.0,
        kl_clip=None,
        coarse_space=space,
        combination=combination,
    )
    before = layer_param_vector(trained)
    nn.functional.cross_entropy(trained(x), y).backward()
    opt.step()
    torch.testing.assert_close(
        before - layer_param_vector(trained), expected, rtol=1e-9, atol=1e-11
    )


class _Reused(nn.Module):
    """``mid`` called twice, and ``tied`` sharing ``out``'s weight and bias."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 5)
        self.tied = nn.Linear(5, 5)
        self.tied.weight, self.tied.bias = self.out.weight, self.out.bias
        self.head = nn.Linear(5, 6)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.mid(torch.tanh(self.mid(torch.tanh(self.inp(x))))))
        return self.head(torch.tanh(self.tied(torch.tanh(self.out(h)))))


@pytest.mark.parametrize("method", ["kfac", "nicolaides+adef2", "residual+additive"])
def test_a_reused_or_tied_layer_is_analysed_as_the_optimizer_steps(
    float64: None, method: str
) -> None:
    """A layer called twice, or two modules sharing a weight: the statistics kept the last
    call of the first module alone, so every Kronecker-based number was wrong (a KFAC
    cosine of −0.045 for the optimizer's 0.264). Every call is now a location, as in the
    optimizer: the analysis direction is the step it takes."""
    torch.manual_seed(9)
    model = _Reused()
    x, y = _batch((4,), 6, "categorical")
    curv = compute_curvature(model, x, y, "categorical", "empirical")
    expected = MethodSet(model, curv, damping=0.05).direction(method)
    trained = copy.deepcopy(model)
    space, _, combination = method.partition("+")
    coarse = {"coarse_space": space, "combination": combination} if combination else {}
    opt = (tk.TwoLevelKFAC if coarse else tk.KFAC)(
        trained, lr=1.0, momentum=0.0, damping=0.05, fisher="empirical", ema_decay=0.0,
        kl_clip=None, **coarse,
    )  # fmt: skip
    before = {k: p.detach().clone() for k, p in trained.named_parameters()}
    nn.functional.cross_entropy(trained(x), y).backward()
    opt.step()
    moved = {k: before[k] - p.detach() for k, p in trained.named_parameters()}
    step = flatten(to_layer_matrices(analysis_layers(trained), moved))
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-11)


def test_coarse_gain_is_the_energy_change_of_adef2(float64: None) -> None:
    """E(β*) − E(0) (dense Galerkin metric) = E(A-DEF2) − E(KFAC) = the optimizer's
    diagnostic, for every Galerkin coarse space; and it is ≤ 0."""
    torch.manual_seed(8)
    model = tiny_convnet()
    x, y = _batch((2, 5, 5), 5, "categorical")
    curv = compute_curvature(model, x, y, "categorical", "true")
    ms = MethodSet(model, curv, damping=0.02)
    d_star, fhat = ms.exact_direction(), ms.fhat()
    kfac = metrics.energy_error(ms.direction("kfac"), d_star, fhat)
    for space in GALERKIN:
        residual = curv.flat_grad - fhat @ ms.direction("kfac")
        gain = metrics.coarse_gain(residual, ms.dense_basis(space), fhat)
        adef2 = metrics.energy_error(ms.direction(f"{space}+adef2"), d_star, fhat)
        assert gain <= 0
        assert gain == pytest.approx(adef2 - kfac, rel=1e-8, abs=1e-12)
        assert gain == pytest.approx(ms.energy_gain(space), rel=1e-8, abs=1e-12)


# ----------------------------------------------------------------- metric functions
def test_metrics_on_hand_computed_cases(float64: None) -> None:
    t = torch.tensor
    assert metrics.cosine(t([1.0, 0.0]), t([1.0, 1.0])) == pytest.approx(2**-0.5)
    assert metrics.cosine(t([0.0, 0.0]), t([1.0, 1.0])) == 0.0
    assert metrics.relative_error(t([1.0, 2.0]), t([1.0, 1.0])) == pytest.approx(2**-0.5)
    fhat2 = t([[2.0, 1.0], [1.0, 3.0]])
    # e = (1, −1): eᵀF̂e = 2 − 1 − 1 + 3 = 3
    assert metrics.energy_error(t([1.0, 0.0]), t([0.0, 1.0]), fhat2) == pytest.approx(3.0)
    # α gᵀd − ½α² dᵀCd = 0.5·3 − 0.5·0.25·6 = 0.75
    curv = t([[2.0, 0.0], [0.0, 4.0]])
    assert metrics.quadratic_decrease(t([1.0, 2.0]), t([1.0, 1.0]), curv, 0.5) == pytest.approx(
        0.75
    )
    fhat3 = t([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    # R r = 1, R F̂ Rᵀ = 2 + 2 + 2 = 6 → −1/6
    assert metrics.coarse_gain(t([1.0, 0.0, 2.0]), t([[1.0, 1.0, 0.0]]), fhat3) == pytest.approx(
        -1 / 6
    )
    eigs, imag = metrics.preconditioned_spectrum(t([[1.0, 0.0], [0.0, 0.5]]), curv)
    torch.testing.assert_close(eigs, t([2.0, 2.0]))
    assert imag == 0.0 and metrics.condition_number(eigs) == pytest.approx(1.0)
    eigs, imag = metrics.preconditioned_spectrum(t([[2.0, 1.0], [0.0, 1.0]]), torch.eye(2))
    torch.testing.assert_close(eigs, t([1.0, 2.0]))
    assert imag == pytest.approx(0.0, abs=1e-12) and metrics.condition_number(
        eigs
    ) == pytest.approx(2.0)
    assert metrics.condition_number(t([0.0, 1.0])) == float("inf")


def test_block_metrics_on_hand_computed_cases(float64: None) -> None:
    m = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sizes = [1, 2]
    norms = metrics.block_norms(m, sizes)
    torch.testing.assert_close(norms, torch.tensor([[1.0, 2.0], [2.0, 2**0.5]]))
    # ‖F‖² = 1 + 4 + 4 + 2 = 11, off-diagonal 8
    assert metrics.off_diagonal_fraction(m, sizes) == pytest.approx(8 / 11)
    t = torch.tensor
    assert metrics.captured_off_diagonal(m, sizes, t([[1.0, 0, 0], [0, 1.0, 0]])) == pytest.approx(
        1.0
    )
    assert metrics.captured_off_diagonal(m, sizes, t([[1.0, 0, 0], [0, 0, 1.0]])) == pytest.approx(
        0.0
    )
    # u₂ = (0, 1, 1)/√2: 2 · (u₁ᵀ O₁₂ u₂)² = 2 · 2 = 4 of 8
    assert metrics.captured_off_diagonal(
        m, sizes, t([[1.0, 0, 0], [0, 1.0, 1.0]])
    ) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="block sizes"):
        metrics.block_norms(m, [1, 1])


# -------------------------------------------------------------------- training
def test_training_exact_kfac_equals_block_diagonal_on_deep_linear_mse(float64: None) -> None:
    """Along a whole run on a deep linear MSE net, KFAC (eigen_sum) and the exact
    block-diagonal NG take identical steps; exact NG lowers the loss."""
    config = AnalyzeConfig.model_validate(
        {
            "model": {"kind": "mlp", "sizes": [5, 4, 3], "activation": "none"},
            "data": {"name": "synthetic", "n_train": 32},
            "likelihood": "gaussian",
            "batch_size": 8,
            "damping": 0.05,
            "damping_mode": "eigen_sum",
            "train": {
                "steps": 5,
                "lr": 0.5,
                "checkpoint_every": 5,
                "gain_spaces": ["nicolaides"],
                "metric_methods": ["kfac"],
            },
        }
    )
    from twolevel_kfac.analysis.problems import build_model, load_data

    data = load_data(config)
    model = build_model(config.model, 0)
    kfac = train_run(model, data, config, "kfac")
    block = train_run(model, data, config, "block_diagonal")
    exact = train_run(model, data, config, "exact")
    torch.testing.assert_close(torch.tensor(kfac.losses), torch.tensor(block.losses))
    assert exact.eval_losses[-1] < 0.7 * exact.eval_losses[0]
    assert len(kfac.gains["nicolaides"]) == 5 and all(g <= 0 for g in kfac.gains["nicolaides"])


# ------------------------------------------------------------------ config and CLI
def test_config_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: {kind: mlp, sizes: [3, 2]}\nbatch_sise: 4\n")
    with pytest.raises(ValueError, match="batch_sise"):
        load_config(path)
    path.write_text("model: {kind: mlp, sizes: [3, 2]}\nmethods: [kfac, nico+adef2]\n")
    with pytest.raises(ValueError, match="methods"):
        load_config(path)
    path.write_text("model: {kind: mlp, sizes: [3, 2]}\nfisher: true\n")
    assert load_config(path).fisher == "true"  # YAML's boolean `true` is the true Fisher


def test_a_batch_larger_than_the_pool_is_refused(tmp_path: Path) -> None:
    """batch_size over data.n_train (or over the samples a dataset has): the analysis ran
    on the whole pool and reported the batch_size asked for before 2026-12-06 (day)."""
    path = tmp_path / "big.yaml"
    path.write_text(
        "model: {kind: mlp, sizes: [6, 3]}\ndata: {name: synthetic, n_train: 64}\n"
        "batch_size: 1000\n"
    )
    with pytest.raises(ValueError, match="batch_size 1000 is more than the 64 samples"):
        load_config(path)
    path.write_text("model: {kind: mlp, sizes: [6, 3]}\ndata: {name: synthetic, n_train: 64}\n")
    config = load_config(path).model_copy(update={"batch_size": 100})  # (unvalidated)
    pool = (torch.zeros(64, 6), torch.zeros(64, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch_size 100 is more than the 64 samples"):
        analysis_batch(config, pool)


class _Segmenter(nn.Module):
    def __init__(self, groups: int = 1, head: str = "pool") -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1, groups=groups), head
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x))
        if self.head == "pixels":  # [N, C, H, W] logits
            return h[:, :3]
        return self.fc(self.drop(h.mean(dim=(2, 3))))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_Segmenter(), r"modules \['drop'\] draw at random .*call model.eval\(\)"),
        (_Segmenter(groups=2).eval(), r"grouped convolutions \['conv'\] are not supported"),
        (
            nn.Sequential(
                nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.Flatten()
            ).eval(),
            r"modules \['1'\] draw at random or use the batch's statistics",
        ),
        (_Segmenter(head="pixels").eval(), r"categorical logits \[N, C\]; the model's are"),
    ],
)
def test_models_the_analysis_cannot_take_are_named(model: nn.Module, message: str) -> None:
    """A dropout in train mode, a grouped convolution and per-pixel logits crashed inside
    (a vmap in-place error, a zip or einsum error, a bare AssertionError)."""
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=message):
        compute_curvature(model, x, y, "categorical", "empirical")


def test_an_empty_damping_sweep_is_refused(tmp_path: Path) -> None:
    """It ran the whole analysis, then failed in the sweep's plot without a report."""
    path = tmp_path / "sweep.yaml"
    path.write_text("model: {kind: mlp, sizes: [6, 3]}\ndamping_sweep: []\n")
    with pytest.raises(ValueError, match="damping_sweep: one damping or more"):
        load_config(path)


def test_analyze_command_writes_outputs(tmp_path: Path) -> None:
    from twolevel_kfac.analysis import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(
        [str(ROOT / "configs/smoke/analyze.yaml"), "--out", str(tmp_path), "--no-progress"]
    )
    command.run(args)
    methods = json.loads((tmp_path / "analysis.json").read_text())
    for name in ("exact", "block_diagonal", "kfac", "nicolaides+additive", "residual+adef2"):
        assert {"cos_to_exact_ng", "energy_error"} <= set(methods[name]), name
    assert methods["exact"]["cos_to_exact_ng"] == pytest.approx(1.0, abs=1e-9)
    assert methods["exact"]["energy_error"] == pytest.approx(0.0, abs=1e-9)
    for name in (
        "report.md",
        "methods.png",
        "fisher_blocks.png",
        "spectra.png",
        "damping_sweep.png",
        "training_loss.png",
        "coarse_gain.png",
        "details.json",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    details = json.loads((tmp_path / "details.json").read_text())
    assert details["fisher"]["statistics_vs_dense"] < 1e-12
    report = (tmp_path / "report.md").read_text()
    assert "| nicolaides+additive |" in report  # the tables' names; the legends' are short
    assert "`nico` is `nicolaides`" in report.split("## Figures")[1]
    assert set(details["damping_sweep"]) == {repr(v) for v in (1e-4, 1e-3, 1e-2, 0.1, 1.0)}


def test_an_analysis_config_with_a_typo_names_the_key_and_its_closest_match(
    tmp_path: Path,
) -> None:
    """A misspelt key is named with the closest allowed one (pydantic's raw text before),
    as the run configs' are."""
    path = tmp_path / "bad.yaml"
    raw = (ROOT / "configs" / "analysis" / "toy_cnn.yaml").read_text()
    path.write_text(raw.replace("batch_size:", "bacth_size:"))
    with pytest.raises(ValueError, match=r"unknown key 'bacth_size' \(did you mean 'batch_size'"):
        load_config(path)
    path.write_text(raw + "matrix_free: {cg_tl: 1.0e-6}\n")  # a pydantic dataclass below
    with pytest.raises(ValueError, match=r"unknown key 'matrix_free.cg_tl' \(did you mean"):
        load_config(path)
