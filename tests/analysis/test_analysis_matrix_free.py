"""The matrix-free Fisher analysis: Krylov solvers against dense linear algebra, torch.func
Fisher–vector products against the dense Fisher, and every matrix-free metric against the
dense backend on a small network."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from oracles import tiny_convnet, tiny_mlp
from twolevel_kfac.analysis import metrics
from twolevel_kfac.analysis.backends import MatrixFreeOptions
from twolevel_kfac.analysis.config import AnalyzeConfig
from twolevel_kfac.analysis.evaluate import evaluate_state
from twolevel_kfac.analysis.exact import compute_curvature
from twolevel_kfac.analysis.krylov import conjugate_gradient, lanczos
from twolevel_kfac.analysis.operators import ALL_METHODS
from twolevel_kfac.analysis.problems import build_model, load_data
from twolevel_kfac.analysis.products import statistics_mismatch
from twolevel_kfac.analysis.structure import (
    fisher_structure,
    gram_block_norms,
    hutchinson_block_norms,
)
from twolevel_kfac.analysis.training import train_run
from vit_oracle import tiny_vit_spec

ROOT = Path(__file__).resolve().parents[2]


def _spd(n: int, condition: float, seed: int) -> tuple[Tensor, Tensor]:
    """An SPD matrix with eigenvalues log-spaced in ``[1, condition]`` and its eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigs = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), n, dtype=torch.float64)
    return (q * eigs) @ q.T, eigs


def _batch(shape: tuple[int, ...], n: int, likelihood: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen)
    if likelihood == "categorical":
        return x, torch.randint(0, 2, (n,), generator=gen)
    return x, torch.rand(n, 2, generator=gen)


# ------------------------------------------------------------------------- Krylov
def test_lanczos_extremes_match_eigvalsh(float64: None) -> None:
    """Standard Lanczos (B = I) on a known SPD matrix, and Lanczos in the B-inner product
    for P B: the extreme Ritz values are the extreme eigenvalues; with fewer steps they lie
    inside the spectrum, within their residual bounds of an eigenvalue."""
    a, eigs = _spd(60, 1e4, seed=0)
    start = torch.randn(60, generator=torch.Generator().manual_seed(1))
    full = lanczos(lambda v: a @ v, start, 60)
    torch.testing.assert_close(full.ritz_values[[0, -1]], eigs[[0, -1]], rtol=1e-10, atol=0.0)
    partial = lanczos(lambda v: a @ v, start, 15)
    lo, hi = float(partial.ritz_values[0]), float(partial.ritz_values[-1])
    assert partial.steps == 15 and eigs[0] <= lo and hi <= eigs[-1]
    assert float(eigs[-1]) - hi <= float(partial.residual_bounds[-1]) + 1e-9
    # P B with P symmetric (indefinite) and B SPD: eigenvalues of Lᵀ P L, B = L Lᵀ
    b, _ = _spd(40, 1e3, seed=2)
    p = torch.randn(40, 40, generator=torch.Generator().manual_seed(3))
    p = p + p.T
    chol = torch.linalg.cholesky(b)
    expected = torch.linalg.eigvalsh(chol.T @ p @ chol)
    result = lanczos(lambda v: p @ v, start[:40], 40, apply_b=lambda v: b @ v)
    scale = float(expected.abs().max())
    assert abs(float(result.ritz_values[0] - expected[0])) <= 1e-10 * scale
    assert abs(float(result.ritz_values[-1] - expected[-1])) <= 1e-10 * scale


def test_conjugate_gradient_reaches_its_tolerance(float64: None) -> None:
    a, _ = _spd(200, 1e4, seed=4)
    b = torch.randn(200, generator=torch.Generator().manual_seed(5))
    result = conjugate_gradient(lambda v: a @ v, b, tol=1e-10)
    assert result.converged and 0 < result.iterations <= 1000
    assert result.relative_residual <= 1e-10  # the true residual, recomputed
    torch.testing.assert_close(result.solution, torch.linalg.solve(a, b), rtol=1e-5, atol=0.0)
    capped = conjugate_gradient(lambda v: a @ v, b, tol=1e-10, max_iter=5)
    assert not capped.converged and capped.iterations == 5 and capped.relative_residual > 1e-10


# ------------------------------------------------------------------ Fisher products
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
@pytest.mark.parametrize("net", ["mlp", "conv", "vit"])
def test_fisher_products_match_the_dense_fisher(float64: None, likelihood: str, net: str) -> None:
    """torch.func F v and F_ii v_i equal the dense Fisher's; the optimizer's statistics
    give the same products (the ViT: through nn.MultiheadAttention, :mod:`vit_oracle`)."""
    torch.manual_seed(0)
    nets = {
        "mlp": lambda: (tiny_mlp(), (4,)),
        "conv": lambda: (tiny_convnet(), (2, 5, 5)),
        "vit": lambda: (build_model(tiny_vit_spec(outputs=2), seed=0), (1, 4, 4)),
    }
    model, shape = nets[net]()
    x, y = _batch(shape, 5, likelihood)
    curvature = compute_curvature(model, x, y, likelihood, "true")
    assert curvature.fisher is not None and curvature.products is not None
    v = torch.randn(curvature.num_params, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(curvature.products(v), curvature.fisher @ v, rtol=1e-10, atol=1e-13)
    lo, hi = 0, curvature.sizes[0]
    block = curvature.products.block(0, v[lo:hi])
    torch.testing.assert_close(
        block, curvature.fisher[lo:hi, lo:hi] @ v[lo:hi], rtol=1e-10, atol=1e-13
    )
    gen = torch.Generator().manual_seed(2)
    assert statistics_mismatch(curvature.products, curvature.stats, gen) < 1e-12


# --------------------------------------------------------- matrix-free == dense
SPECTRA = [
    "exact",
    "block_diagonal",
    "kfac",
    "kfac_pi",
    "ekfac",
    "kpsvd",
    "nicolaides+additive",
    "spectral+balanced",
    "residual+adef2",
    "krylov_nicolaides+adef1",
    "tselepidis+adef2",
]


@pytest.fixture(scope="module")
def small_problem() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model = model.to(torch.float64)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    return model, (x, torch.randint(0, 3, (8,), generator=gen))


def test_matrix_free_metrics_equal_dense(
    float64: None, small_problem: tuple[nn.Module, tuple[Tensor, Tensor]]
) -> None:
    """On a 74-parameter MLP every method's cosine, energy error and decreases, every
    coarse space's gains and captured mass, and the spectrum extremes of P F̂ (Lanczos vs
    all eigenvalues) agree between the matrix-free and the dense backends."""
    model, batch = small_problem
    curvature = compute_curvature(model, *batch, "categorical", "true")
    options = MatrixFreeOptions(cg_tol=1e-13, lanczos_steps=80)
    common = {"damping": 1e-2, "spectra": SPECTRA, "step_size": 0.5, "options": options}
    dense = evaluate_state(model, curvature, batch, "categorical", ALL_METHODS, **common)
    free = evaluate_state(
        model, curvature, batch, "categorical", ALL_METHODS, backend="matrix_free", **common
    )
    assert free.solver["backend"] == "matrix_free" and free.solver["exact"]["cg_converged"]
    assert free.solver["exact"]["cg_relative_residual"] <= 1e-13
    keys = ["cos_to_exact_ng", "energy_error", "predicted_decrease", "actual_decrease"]
    for name in ALL_METHODS:
        for key in keys:
            assert free.methods[name][key] == pytest.approx(
                dense.methods[name][key], rel=1e-8, abs=1e-12
            ), (name, key)
    for space, row in dense.spaces.items():
        for key in ("coarse_gain", "optimizer_energy_gain", "off_diagonal_captured"):
            assert free.spaces[space][key] == pytest.approx(row[key], rel=1e-8, abs=1e-12)
    for name in SPECTRA:
        row, expected = free.methods[name], dense.methods[name]
        if name == "tselepidis+adef2":
            assert row["spectrum_method"] == "skipped"
            continue
        assert row["eig_max"] == pytest.approx(expected["eig_max"], rel=1e-6), name
        assert row["eig_min"] == pytest.approx(expected["eig_min"], rel=1e-6), name
        assert row["operator_matches_step"] < 1e-9, name
    assert free.methods["residual+adef2"]["spectrum_of"] == "residual+balanced"


def test_block_norms_without_the_dense_fisher(
    float64: None, small_problem: tuple[nn.Module, tuple[Tensor, Tensor]]
) -> None:
    """Gram block norms are the dense ones; Hutchinson's estimate is within a few
    standard errors; the structure summary reports its method."""
    model, batch = small_problem
    curvature = compute_curvature(model, *batch, "categorical", "true")
    assert curvature.fisher is not None and curvature.products is not None
    dense = metrics.block_norms(curvature.fisher, curvature.sizes)
    norms, trace = gram_block_norms(curvature.stats)
    torch.testing.assert_close(norms, dense, rtol=1e-10, atol=1e-14)
    assert trace == pytest.approx(float(curvature.fisher.trace()), rel=1e-10)
    gen = torch.Generator().manual_seed(0)
    estimate = hutchinson_block_norms(curvature.products, curvature.sizes, 200, gen)
    assert estimate.stderr is not None
    assert bool(((estimate.norms**2 - dense**2).abs() <= 5 * estimate.stderr + 1e-12).all())
    free = compute_curvature(model, *batch, "categorical", "true", dense=None)
    summary = fisher_structure(free, max_numbers=1)  # too small for Gram: Hutchinson
    assert summary["block_norms_method"] == "hutchinson" and summary["fvp_func_vs_stats"] < 1e-12
    exact = fisher_structure(compute_curvature(model, *batch, "categorical", "true", dense=None))
    assert exact["block_norms_method"] == "gram"
    torch.testing.assert_close(torch.tensor(exact["block_norms"]), dense, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------- selection and CLI
def test_a_forced_dense_backend_that_does_not_fit_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """48k parameters: 17.2 GiB per matrix on a 23 GiB machine (the process was killed by
    the system before, nothing printed)."""
    from twolevel_kfac.analysis import config as config_module

    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 23 * 2**30 // 4096}
    monkeypatch.setattr(config_module.os, "sysconf", pages.__getitem__)
    dense = AnalyzeConfig.model_validate(
        {"model": {"kind": "mlp", "sizes": [3, 2]}, "backend": "dense"}
    )
    with pytest.raises(
        ValueError, match=r"48050 .*17\.2 GiB each.*23\.0 GiB: use backend: matrix_free"
    ):
        dense.resolve_backend(48050)
    assert dense.resolve_backend(20_000) == "dense"


def test_backend_selection_by_parameter_count() -> None:
    base = {"model": {"kind": "mlp", "sizes": [3, 2]}}
    config = AnalyzeConfig.model_validate(base)
    assert config.resolve_backend(12000) == "dense"
    assert config.resolve_backend(12001) == "matrix_free"
    forced = AnalyzeConfig.model_validate({**base, "backend": "matrix_free"})
    assert forced.resolve_backend(10) == "matrix_free"
    dense = AnalyzeConfig.model_validate({**base, "backend": "dense"})
    assert dense.resolve_backend(20_000) == "dense"  # 3 × 3.0 GiB, forced past 12000
    with pytest.raises(ValueError, match="max_params"):
        config.resolve_backend(100_001)
    with pytest.raises(ValueError, match="cg_tol"):
        AnalyzeConfig.model_validate({**base, "matrix_free": {"cg_tol": 0}})


def test_training_is_backend_independent(float64: None) -> None:
    """Exact NG and block-diagonal NG runs take the same steps with CG as with Cholesky."""
    raw = {
        "model": {"kind": "mlp", "sizes": [5, 4, 3], "activation": "tanh"},
        "data": {"name": "synthetic", "n_train": 32},
        "batch_size": 8,
        "damping": 0.05,
        "matrix_free": {"cg_tol": 1e-12},
        "train": {"steps": 3, "lr": 0.5, "checkpoint_every": 3, "gain_spaces": ["nicolaides"],
                  "metric_methods": ["kfac"]},
    }  # fmt: skip
    dense = AnalyzeConfig.model_validate({**raw, "backend": "dense"})
    free = AnalyzeConfig.model_validate({**raw, "backend": "matrix_free"})
    data, model = load_data(dense), build_model(dense.model, 0)
    for method in ("exact", "block_diagonal"):
        a = train_run(model, data, dense, method).losses
        b = train_run(model, data, free, method).losses
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-9, atol=0.0)


def test_analyze_command_matrix_free(tmp_path: Path) -> None:
    """`tlkfac analyze` with the matrix-free backend writes the same method names and keys."""
    from twolevel_kfac.analysis import command

    raw = yaml.safe_load((ROOT / "configs/smoke/analyze.yaml").read_text())
    raw.update(backend="matrix_free", damping_sweep=[1e-2, 1.0], train={"steps": 0})
    raw["matrix_free"] = {"lanczos_steps": 20, "cg_tol": 1e-8}
    config = tmp_path / "free.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    command.run(parser.parse_args([str(config), "--out", str(out), "--no-progress"]))
    methods = json.loads((out / "analysis.json").read_text())
    assert list(methods) == raw["methods"]
    for name, row in methods.items():
        assert {"cos_to_exact_ng", "energy_error", "condition_number"} <= set(row), name
    assert methods["exact"]["cos_to_exact_ng"] == pytest.approx(1.0, abs=1e-9)
    details = json.loads((out / "details.json").read_text())
    assert details["solver"]["backend"] == "matrix_free"
    assert details["fisher"]["block_norms_method"] == "gram"
    assert "matrix-free" in (out / "report.md").read_text()
    assert (out / "fisher_blocks.png").stat().st_size > 0 and not (out / "spectra.png").exists()
