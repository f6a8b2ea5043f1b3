"""Exact tests of the two-level math (``twolevel_kfac.twolevel``) against dense oracles.

Float64 throughout. The dense reference is built here from ``sample_products.per_sample_gradients``:
per-sample gradients flattened row-major per layer and concatenated give ``J`` (``[N, D]``)
and ``F = JᵀJ/N``; ``R₀`` is the ``[K, D]`` matrix of the flattened basis vectors; ``M⁻¹`` is
a random block-diagonal SPD matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor

from twolevel_kfac.curvature.blocks import LayerStats, kronecker_factors
from twolevel_kfac.curvature.sample_products import per_sample_gradients
from twolevel_kfac.curvature.scale_shift import ScaleShiftStats
from twolevel_kfac.twolevel import coarse_spaces as cs
from twolevel_kfac.twolevel.coarse_matrix import (
    CoarseOperator,
    coarse_projections,
    ema_coarse_matrix,
    exact_coarse_matrix,
    prolong,
    prolong_add_into,
    restrict,
)
from twolevel_kfac.twolevel.combinations import COMBINATIONS, get_combination
from twolevel_kfac.twolevel.fisher_products import (
    damped_fvp,
    fisher_vector_product,
    sample_coefficients,
)
from twolevel_kfac.twolevel.tselepidis import (
    sub_block_products,
    tselepidis_coarse_matrix,
    tselepidis_from_sums,
    tselepidis_sums,
)
from twolevel_kfac.twolevel.vectors import LayerVector, axpy, dot

DT = torch.float64
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
FAST = settings(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------- oracles
def flat(v: LayerVector) -> Tensor:
    return torch.cat([m.reshape(-1) for m in v])


def unflat(x: Tensor, shapes: list[tuple[int, int]]) -> LayerVector:
    sizes = [o * i for o, i in shapes]
    return [p.reshape(s) for p, s in zip(torch.split(x, sizes), shapes, strict=True)]


def dense_r0(basis: list[Tensor]) -> Tensor:
    """``R₀`` as a ``[K, D]`` matrix (block-diagonal in the layers)."""
    return torch.block_diag(*[b.reshape(b.shape[0], b.shape[1] * b.shape[2]) for b in basis])


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@dataclass
class Problem:
    """Random statistics of a 2–3 layer net with its dense Fisher and a dense ``M⁻¹``."""

    stats: list[LayerStats]
    shapes: list[tuple[int, int]]
    fisher: Tensor
    minv_dense: Tensor
    damping: float
    gen: torch.Generator

    @property
    def fhat_dense(self) -> Tensor:
        return self.fisher + self.damping * torch.eye(self.fisher.shape[0], dtype=DT)

    def minv(self, v: LayerVector) -> LayerVector:
        return unflat(self.minv_dense @ flat(v), self.shapes)

    def fhat(self, v: LayerVector) -> LayerVector:
        return damped_fvp(self.stats, v, self.damping)

    def randn_vector(self) -> LayerVector:
        return [torch.randn(s, generator=self.gen, dtype=DT) for s in self.shapes]

    def random_basis(self, max_k: int = 2) -> list[Tensor]:
        """Up to ``max_k`` random vectors per layer, never more than the layer's size (two
        vectors of a 1×1 layer are dependent and make ``R₀F̂R₀ᵀ`` singular)."""
        ks = torch.randint(1, max_k + 1, (len(self.shapes),), generator=self.gen)
        return [
            torch.randn(min(int(k), s[0] * s[1]), *s, generator=self.gen, dtype=DT)
            for k, s in zip(ks, self.shapes, strict=True)
        ]


def make_problem(
    seed: int, n: int, t: int | list[int], num_layers: int, damping: float | None = None
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    ts = t if isinstance(t, list) else [t] * num_layers
    shapes = [
        (
            int(torch.randint(1, 5, (1,), generator=gen)),
            int(torch.randint(1, 6, (1,), generator=gen)),
        )
        for _ in range(num_layers)
    ]
    stats = [
        LayerStats(
            torch.randn(n, ti, d_in, generator=gen, dtype=DT),
            torch.randn(n, ti, d_out, generator=gen, dtype=DT),
        )
        for (d_out, d_in), ti in zip(shapes, ts, strict=True)
    ]
    jac = torch.cat([per_sample_gradients(s).reshape(n, -1) for s in stats], dim=1)
    blocks = []
    for d_out, d_in in shapes:
        x = torch.randn(d_out * d_in, d_out * d_in, generator=gen, dtype=DT)
        blocks.append(x @ x.T / (d_out * d_in) + 0.5 * torch.eye(d_out * d_in, dtype=DT))
    lam = float(10 ** (-3 * torch.rand(1, generator=gen))) if damping is None else damping
    return Problem(stats, shapes, jac.T @ jac / n, torch.block_diag(*blocks), lam, gen)


problems = st.builds(
    make_problem,
    seed=SEEDS,
    n=st.sampled_from([1, 3, 7]),
    t=st.sampled_from([1, 4]),
    num_layers=st.sampled_from([2, 3]),
)


def dense_q(p: Problem, basis: list[Tensor]) -> Tensor:
    r0 = dense_r0(basis)
    return r0.T @ torch.linalg.solve(r0 @ p.fhat_dense @ r0.T, r0)


def dense_direction(name: str, p: Problem, q: Tensor, g: Tensor, w: float) -> Tensor:
    """The combinations' formulas (Tang et al. 2009) with dense matrices, ``Q → wQ``."""
    m, fh, eye = p.minv_dense, p.fhat_dense, torch.eye(g.shape[0], dtype=DT)
    if name == "additive":
        return m @ g + w * q @ g
    if name == "adef2":
        return m @ g + w * q @ (g - fh @ m @ g)
    if name == "adef1":
        return w * q @ g + m @ (g - fh @ (w * q @ g))
    return (eye - w * q @ fh) @ m @ (eye - w * fh @ q) @ g + w * q @ g


def counting(fn: Callable[[LayerVector], LayerVector]) -> tuple[Callable, list[int]]:
    calls = [0]

    def wrapped(v: LayerVector) -> LayerVector:
        calls[0] += 1
        return fn(v)

    return wrapped, calls


# ------------------------------------------------------------------- Fisher products
@FAST
@given(p=problems)
def test_fisher_vector_product_matches_dense(p: Problem) -> None:
    v = p.randn_vector()
    jac = torch.cat([per_sample_gradients(s).reshape(s.num_samples, -1) for s in p.stats], 1)
    assert rel_err(sample_coefficients(p.stats, v), jac @ flat(v)) < 1e-12
    assert rel_err(flat(fisher_vector_product(p.stats, v)), p.fisher @ flat(v)) < 1e-12
    assert rel_err(flat(damped_fvp(p.stats, v, p.damping)), p.fhat_dense @ flat(v)) < 1e-12


def test_fisher_products_reject_inconsistent_batches() -> None:
    p = make_problem(0, 3, 1, 2)
    bad = [p.stats[0], p.stats[1].subset(torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="mini-batch size"):
        fisher_vector_product(bad, p.randn_vector())
    with pytest.raises(ValueError, match="layers"):
        sample_coefficients(p.stats, p.randn_vector()[:1])


# ------------------------------------------------------------------- coarse matrix
@FAST
@given(p=problems)
def test_exact_coarse_matrix_matches_dense(p: Problem) -> None:
    basis = p.random_basis()
    r0 = dense_r0(basis)
    jac = torch.cat([per_sample_gradients(s).reshape(s.num_samples, -1) for s in p.stats], 1)
    assert rel_err(coarse_projections(p.stats, basis), jac @ r0.T) < 1e-12
    fc = exact_coarse_matrix(p.stats, basis, p.damping)
    assert rel_err(fc, r0 @ p.fhat_dense @ r0.T) < 1e-12
    v = p.randn_vector()
    assert rel_err(restrict(basis, v), r0 @ flat(v)) < 1e-12
    y = torch.randn(r0.shape[0], generator=p.gen, dtype=DT)
    assert rel_err(flat(prolong(basis, y)), r0.T @ y) < 1e-12
    # the fused form, into contiguous targets and into non-contiguous ones (transposes)
    target = p.randn_vector()
    expected = flat(target) - 0.5 * (r0.T @ y)
    assert rel_err(flat(prolong_add_into(basis, y, target, -0.5)), expected) < 1e-12
    strided = [t.T.contiguous().T for t in p.randn_vector()]
    expected = flat(strided) + 2.0 * (r0.T @ y)
    assert rel_err(flat(prolong_add_into(basis, y, strided, 2.0)), expected) < 1e-12


@pytest.mark.parametrize("ts", [[1, 1, 1], [4, 4, 4], [1, 4, 2], [3, 4, 1]])
def test_tselepidis_diagonal_is_kfac_block_sum(ts: list[int]) -> None:
    """``F_c[i,i] = 1ᵀ(T_i·A_i ⊗ G_i)1 + λ·numel_i``: the KFC block the fine level
    preconditions a layer of ``T_i`` locations with (``T_i`` was left out before
    2026-12-04: ``1/T_i`` of it)."""
    p = make_problem(1, 5, ts, 3)
    fc = tselepidis_coarse_matrix(p.stats, p.damping)
    for i, s in enumerate(p.stats):
        a, g = kronecker_factors(s)
        block = s.num_locations * torch.kron(a, g)
        expected = block.sum() + p.damping * a.shape[0] * g.shape[0]
        assert float(fc[i, i]) == pytest.approx(float(expected), rel=1e-12)
    assert torch.equal(fc, fc.T)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_tselepidis_products_in_chunks_equal_the_reduced_sums(chunk: int) -> None:
    """One process forms ``F_c`` chunk by chunk of sub-blocks; a distributed run reduces
    the ``[S, S]`` sums first: the same matrix (norm units beside Kronecker layers, three
    location counts)."""
    p = make_problem(4, 5, [1, 4, 2], 3)
    gen = torch.Generator().manual_seed(9)
    norm = ScaleShiftStats(*(torch.randn(5, 4, 6, generator=gen, dtype=DT) for _ in range(2)))
    stats = [p.stats[0], norm, p.stats[1], p.stats[2]]
    reduced = tselepidis_from_sums(*tselepidis_sums(stats), 5, stats, 0.0)
    chunked = sub_block_products(stats, chunk=chunk) / 5**2
    assert rel_err(chunked, reduced) < 1e-12
    assert rel_err(tselepidis_coarse_matrix(stats, 0.0), reduced) < 1e-12


def test_tselepidis_takes_sub_block_sums_of_mixed_dtypes() -> None:
    """A large token table's sums are float64 beside float32 layers: both forms promote."""
    p = make_problem(5, 5, [1, 3], 2)
    first = replace(p.stats[0], a=p.stats[0].a.float(), g=p.stats[0].g.float())
    stats = [first, p.stats[1]]  # float32 and float64
    reduced = tselepidis_from_sums(*tselepidis_sums(stats), 5, stats, 0.0)
    assert reduced.dtype == torch.float64
    assert rel_err(sub_block_products(stats) / 5**2, reduced) < 1e-6


def test_tselepidis_off_diagonal_dense() -> None:
    p = make_problem(2, 7, [1, 1, 1], 3)
    fc = tselepidis_coarse_matrix(p.stats, p.damping)
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            ai, aj = p.stats[i].a[:, 0], p.stats[j].a[:, 0]
            gi, gj = p.stats[i].g[:, 0], p.stats[j].g[:, 0]
            expected = (ai.T @ aj / 7).sum() * (gi.T @ gj / 7).sum()
            assert float(fc[i, j]) == pytest.approx(float(expected), rel=1e-12)


def test_tselepidis_resamples_locations_by_nearest_index() -> None:
    p = make_problem(3, 2, [2, 4], 2)
    fc = tselepidis_coarse_matrix(p.stats, 0.0)
    (s0, s1), idx0 = p.stats, [0, 0, 1, 1]  # m_0(t) = floor(t·2/4)
    pairs = [(n, t) for n in range(2) for t in range(4)]
    a_01 = torch.stack([torch.outer(s0.a[n, idx0[t]], s1.a[n, t]) for n, t in pairs]).sum(0)
    g_01 = torch.stack([torch.outer(s0.g[n, idx0[t]], s1.g[n, t]) for n, t in pairs]).sum(0)
    expected = 4 * (a_01 / 8).sum() * (g_01 / 8).sum()  # T_01 = 4 matched locations
    assert float(fc[0, 1]) == pytest.approx(float(expected), rel=1e-12)


def test_tselepidis_equals_exact_for_one_sample_one_location() -> None:
    p = make_problem(4, 1, 1, 3)
    basis = cs.nicolaides(p.shapes, dtype=DT)
    exact = exact_coarse_matrix(p.stats, basis, p.damping)
    assert rel_err(tselepidis_coarse_matrix(p.stats, p.damping), exact) < 1e-12


def test_ema_coarse_matrix() -> None:
    old, new = torch.eye(2, dtype=DT), torch.full((2, 2), 3.0, dtype=DT)
    assert torch.equal(ema_coarse_matrix(None, new, 0.9), new)
    assert torch.allclose(ema_coarse_matrix(old, new, 0.75), 0.75 * old + 0.25 * new)
    with pytest.raises(ValueError, match="shape"):
        ema_coarse_matrix(torch.eye(3, dtype=DT), new, 0.5)
    with pytest.raises(ValueError, match="decay"):
        ema_coarse_matrix(old, new, 1.0)


# ------------------------------------------------------------------- coarse operator
def operator(p: Problem, basis: list[Tensor]) -> CoarseOperator:
    return CoarseOperator.from_matrix(basis, exact_coarse_matrix(p.stats, basis, p.damping))


def rounding_tolerance(op: CoarseOperator) -> float:
    """1e-9, widened by the conditioning of the Jacobi-scaled ``F̃`` that the operator
    factorises (its rounding error grows as ``κ(F̃)·ε``)."""
    if op.cholesky is not None:
        kappa = float(torch.linalg.cond(op.cholesky @ op.cholesky.T))
    elif op.inv_eigvals is not None and bool((op.inv_eigvals > 0).any()):
        kept = op.inv_eigvals[op.inv_eigvals > 0]
        kappa = float(kept.max() / kept.min())
    else:
        kappa = 1.0
    return 1e-9 + 8 * torch.finfo(DT).eps * kappa


@FAST
@given(p=problems, scales=st.lists(st.sampled_from([1e-6, 1e-3, 1.0, 7.0, 1e6]), min_size=6))
# κ(F̃) = 5.8e7 here: a 7e-9 rounding error (found by hypothesis on a fresh clone)
@example(p=make_problem(seed=536, n=7, t=1, num_layers=2), scales=[1.0, 1.0] + [1e-6] * 4)
def test_coarse_correction_invariant_to_basis_scaling(p: Problem, scales: list[float]) -> None:
    basis = p.random_basis()
    it = iter(scales)
    scaled = [b * torch.tensor([next(it) for _ in b], dtype=DT)[:, None, None] for b in basis]
    v = p.randn_vector()
    op = operator(p, basis)
    ref = flat(op.apply(v))
    tol = rounding_tolerance(op)
    assert rel_err(flat(operator(p, scaled).apply(v)), ref) < tol
    assert rel_err(ref, dense_q(p, basis) @ flat(v)) < tol


def test_degenerate_basis_uses_pseudo_inverse() -> None:
    p = make_problem(5, 3, 4, 3)
    r = p.random_basis(max_k=1)
    zeros = [torch.zeros_like(b) for b in r]
    degenerate = [torch.cat([r[0], r[0], 3.0 * r[0]]), torch.cat([zeros[1], r[1]]), zeros[2]]
    op = operator(p, degenerate)
    assert op.cholesky is None and op.rank == 2
    v = p.randn_vector()
    qv = flat(op.apply(v))
    assert bool(torch.isfinite(qv).all())
    span = [r[0], r[1], zeros[2][:0]]  # the span of the non-degenerate vectors
    dense = dense_q(p, span) @ flat(v)
    assert rel_err(qv, dense) < 1e-9
    assert bool(torch.isfinite(op.energy_gain(v)))


def test_float32_operator_keeps_dtype() -> None:
    p = make_problem(12, 7, 4, 3)
    stats32 = [LayerStats(s.a.float(), s.g.float()) for s in p.stats]
    basis = cs.nicolaides(p.shapes, dtype=torch.float32)
    op = CoarseOperator.from_matrix(basis, exact_coarse_matrix(stats32, basis, p.damping))
    v = p.randn_vector()
    qv = op.apply([x.float() for x in v])
    assert all(x.dtype == torch.float32 for x in qv)
    ref = dense_q(p, [b.double() for b in basis]) @ flat(v)
    assert rel_err(flat(qv).double(), ref) < 1e-4


def test_non_finite_coarse_matrix_gives_zero_correction() -> None:
    p = make_problem(6, 3, 1, 2)
    basis = cs.nicolaides(p.shapes, dtype=DT)
    fc = torch.full((2, 2), float("nan"), dtype=DT)
    op = CoarseOperator.from_matrix(basis, fc)
    assert op.rank == 0
    assert torch.equal(
        flat(op.apply(p.randn_vector())), torch.zeros(sum(o * i for o, i in p.shapes), dtype=DT)
    )
    with pytest.raises(ValueError, match="shape"):
        CoarseOperator.from_matrix(basis, torch.eye(3, dtype=DT))


# ------------------------------------------------------------------- combinations
@FAST
@given(p=problems, name=st.sampled_from(sorted(COMBINATIONS)), w=st.sampled_from([1.0, 0.3]))
@example(p=make_problem(seed=3534817, n=3, t=1, num_layers=2), name="additive", w=1.0)
@example(p=make_problem(seed=3534817, n=1, t=1, num_layers=3), name="additive", w=1.0)
def test_combinations_match_dense_formulas(p: Problem, name: str, w: float) -> None:
    basis = p.random_basis()
    g = p.randn_vector()
    fhat, fvps = counting(p.fhat)
    minv, minvs = counting(p.minv)
    out = get_combination(name)(g, minv, operator(p, basis).apply, fhat, coarse_scale=w)
    expected = dense_direction(name, p, dense_q(p, basis), flat(g), w)
    assert rel_err(flat(out.direction), expected) < 1e-9
    assert fvps[0] == {"additive": 0, "adef2": 1, "adef1": 1, "balanced": 2}[name]
    assert minvs[0] == 1
    if name == "adef2":
        assert out.residual is not None
        res = flat(g) - p.fhat_dense @ p.minv_dense @ flat(g)
        assert rel_err(flat(out.residual), res) < 1e-10


def test_additive_fine_weight_and_reuse_of_products() -> None:
    p = make_problem(7, 3, 4, 2)
    basis, g = p.random_basis(), p.randn_vector()
    q = operator(p, basis).apply
    out = COMBINATIONS["additive"](g, p.minv, q, p.fhat, fine_weight=0.5, coarse_scale=2.0)
    expected = 0.5 * p.minv_dense @ flat(g) + 2.0 * dense_q(p, basis) @ flat(g)
    assert rel_err(flat(out.direction), expected) < 1e-10
    fine = p.minv(g)
    res = [gi - fi for gi, fi in zip(g, p.fhat(fine), strict=True)]
    fhat, fvps = counting(p.fhat)
    minv, minvs = counting(p.minv)
    reused = COMBINATIONS["adef2"](g, minv, q, fhat, minv_g=fine, residual=res)
    assert fvps[0] == minvs[0] == 0
    assert (
        rel_err(flat(reused.direction), flat(COMBINATIONS["adef2"](g, p.minv, q, p.fhat)[0]))
        < 1e-12
    )
    with pytest.raises(ValueError, match="fine_weight"):
        COMBINATIONS["balanced"](g, p.minv, q, p.fhat, fine_weight=0.5)
    with pytest.raises(ValueError, match="combination"):
        get_combination("bnn")


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_zero_coarse_scale_is_exactly_kfac(name: str) -> None:
    p = make_problem(8, 3, 4, 3)
    g = p.randn_vector()
    coarse, coarse_calls = counting(operator(p, p.random_basis()).apply)
    fhat, fvps = counting(p.fhat)
    out = COMBINATIONS[name](g, p.minv, coarse, fhat, coarse_scale=0.0)
    kfac = p.minv(g)
    assert all(torch.equal(a, b) for a, b in zip(out.direction, kfac, strict=True))
    assert coarse_calls[0] == fvps[0] == 0


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_empty_coarse_space_is_exactly_kfac(name: str) -> None:
    p = make_problem(9, 3, 1, 2)
    empty = [torch.zeros(0, *s, dtype=DT) for s in p.shapes]
    g = p.randn_vector()
    out = COMBINATIONS[name](g, p.minv, operator(p, empty).apply, p.fhat)
    assert all(torch.equal(a, b) for a, b in zip(out.direction, p.minv(g), strict=True))


@FAST
@given(p=problems, name=st.sampled_from(["adef1", "adef2", "balanced"]))
def test_full_rank_coarse_space_gives_exact_natural_gradient(p: Problem, name: str) -> None:
    identity = [torch.eye(o * i, dtype=DT).reshape(o * i, o, i) for o, i in p.shapes]
    g = p.randn_vector()
    out = COMBINATIONS[name](g, p.minv, operator(p, identity).apply, p.fhat)
    assert rel_err(flat(out.direction), torch.linalg.solve(p.fhat_dense, flat(g))) < 1e-9


@FAST
@given(p=problems)
def test_adef2_error_not_larger_than_kfac(p: Problem) -> None:
    """Inequality check (holds by construction: A-DEF2's error is the F̂-orthogonal
    projection of KFAC's), plus the exact energy identity of ``energy_gain``."""
    basis, g = p.random_basis(), p.randn_vector()
    op = operator(p, basis)
    out = COMBINATIONS["adef2"](g, p.minv, op.apply, p.fhat)
    exact = torch.linalg.solve(p.fhat_dense, flat(g))

    def energy(d: Tensor) -> float:
        e = d - exact
        return float(e @ p.fhat_dense @ e)

    e_kfac, e_adef2 = energy(p.minv_dense @ flat(g)), energy(flat(out.direction))
    assert e_adef2 <= e_kfac * (1 + 1e-9) + 1e-12
    assert out.residual is not None
    gain = float(op.energy_gain(out.residual))
    assert gain == pytest.approx(e_adef2 - e_kfac, rel=1e-7, abs=1e-10 * e_kfac)


# ------------------------------------------------------------------- coarse spaces
def test_spectral_vectors_are_kronecker_eigenvectors() -> None:
    p = make_problem(10, 7, 4, 3)
    eig = [
        (*torch.linalg.eigh(a), *torch.linalg.eigh(g))
        for a, g in (kronecker_factors(s) for s in p.stats)
    ]
    qa, la, qg, lg = ([e[k] for e in eig] for k in (1, 0, 3, 2))
    for which, pick in (("smallest", torch.min), ("largest", torch.max)):
        basis = cs.build_basis("spectral", p.shapes, eigen=(qa, la, qg, lg), which=which)
        for b, s in zip(basis, p.stats, strict=True):
            a, g = kronecker_factors(s)
            mu = pick(torch.linalg.eigvalsh(torch.kron(a, g)))
            r = b[0]
            assert rel_err(g @ r @ a, mu * r) < 1e-10
            assert float(r.abs().max()) == pytest.approx(1.0)


def test_coarse_space_bases() -> None:
    p = make_problem(11, 3, 4, 3)
    minv_res = p.randn_vector()
    shapes = p.shapes
    bases = {
        name: cs.build_basis(name, shapes, minv=p.minv, minv_res=minv_res, dtype=DT)
        for name in cs.COARSE_SPACES
        if name != "spectral"
    }
    ones = [torch.ones(s, dtype=DT) for s in shapes]
    second = p.minv(ones)
    for i, s in enumerate(shapes):
        assert torch.equal(bases["nicolaides"][i], torch.ones(1, *s, dtype=DT))
        assert torch.equal(bases["tselepidis"][i], bases["nicolaides"][i])
        assert torch.allclose(bases["residual"][i][0], minv_res[i] / minv_res[i].abs().max())
        assert torch.allclose(bases["krylov_nicolaides"][i][1], second[i] / second[i].abs().max())
        kr = p.minv(minv_res)[i]
        assert torch.allclose(bases["krylov_residual"][i][1], kr / kr.abs().max())
        for basis in bases.values():
            assert float(basis[i].abs().amax(dim=(1, 2)).min()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="coarse_space"):
        cs.build_basis("previous", shapes)
    with pytest.raises(ValueError, match="minv_res"):
        cs.build_basis("residual", shapes)


def test_zero_and_non_finite_vectors_are_zeroed() -> None:
    v = torch.zeros(4, 2, 2, dtype=DT)
    v[1, 0, 1] = -4.0
    v[1, 1, 0] = 2.0
    v[2, 1, 1] = float("inf")
    v[3, 0, 0], v[3, 1, 0] = float("nan"), 5.0
    before = v.clone()
    out = cs.normalize_inf(v)
    assert torch.equal(v[:3], before[:3]) and bool(torch.isnan(v[3, 0, 0]))  # input kept
    for k in (0, 2, 3):
        assert torch.equal(out[k], torch.zeros(2, 2, dtype=DT))
    assert float(out[1, 0, 1]) == -1.0 and float(out[1, 1, 0]) == 0.5
    assert cs.normalize_inf_(v) is v and torch.equal(v, out)
    w = torch.zeros(1, 2, 3, dtype=DT)
    w[0, 1, 2], w[0, 0, 0] = -float("inf"), 1.0
    assert torch.equal(cs.normalize_inf(w), torch.zeros_like(w))


@pytest.mark.parametrize("seed", range(4))
def test_normalize_inf_divides_by_the_inf_norm_bit_for_bit(seed: int) -> None:
    """The peaks from ``amax``/``amin`` are ``vector_norm(ord=inf)``'s, the negative
    entries' included (the result is the division by them, not an approximation)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(3, 5, 7, generator=gen, dtype=DT)
    v[1] -= 10.0  # its peak is a negative entry
    peak = torch.linalg.vector_norm(v, ord=float("inf"), dim=(1, 2), keepdim=True)
    assert torch.equal(cs.normalize_inf(v), v * peak.reciprocal())


def test_vectors_helpers() -> None:
    u = [torch.ones(2, 2, dtype=DT), torch.full((1, 3), 2.0, dtype=DT)]
    assert float(dot(u, u)) == 4.0 + 12.0
    assert torch.equal(axpy(2.0, u, u)[1], torch.full((1, 3), 6.0, dtype=DT))
    with pytest.raises(ValueError):
        dot(u, u[:1])


@pytest.mark.parametrize("locations", [1, 3])
def test_sample_coefficients_on_parts_equal_the_joined_ones(locations: int) -> None:
    """``sample_coefficients_parts`` on ``(V, b)`` parts equals ``sample_coefficients`` on
    ``W̄ = [V, b]`` when ``ā`` carries its homogeneous 1 (layers with and without a bias)."""
    from twolevel_kfac.twolevel.fisher_products import sample_coefficients_parts

    gen = torch.Generator().manual_seed(3)
    n, layers = 6, [(4, 5, True), (3, 4, False), (2, 3, True)]
    stats, joined, parts = [], [], []
    for d_out, d_in, bias in layers:
        a = torch.randn(n, locations, d_in, generator=gen, dtype=DT)
        if bias:
            a = torch.cat([a, torch.ones(n, locations, 1, dtype=DT)], -1)
        stats.append(LayerStats(a, torch.randn(n, locations, d_out, generator=gen, dtype=DT)))
        v = torch.randn(d_out, d_in + bias, generator=gen, dtype=DT)
        joined.append(v)
        parts.append((v[:, :-1].contiguous(), v[:, -1].clone()) if bias else (v.clone(), None))
    expected = sample_coefficients(stats, joined)
    assert rel_err(sample_coefficients_parts(stats, parts), expected) < 1e-12


def test_tselepidis_sums_equal_the_pairwise_definition() -> None:
    """The Gram-per-location-count ``tselepidis_sums`` equals the pairwise definition
    ``Σ_n Σ_t s_i[n, m_i(t)] s_j[n, m_j(t)]`` at ``T_ij = max(T_i, T_j)``, for layers with
    mixed location counts (a convnet's conv and linear layers)."""
    from twolevel_kfac.curvature.blocks import LayerStats
    from twolevel_kfac.twolevel.tselepidis import tselepidis_sums

    gen = torch.Generator().manual_seed(5)
    shapes = [(9, 4, 3), (4, 5, 2), (1, 6, 3), (9, 2, 2), (1, 3, 4), (3, 2, 5)]  # (T, d_in', d_out)
    stats = [
        LayerStats(
            torch.randn(4, t, d_in, generator=gen, dtype=torch.float64),
            torch.randn(4, t, d_out, generator=gen, dtype=torch.float64),
        )
        for t, d_in, d_out in shapes
    ]

    def resampled(sums: torch.Tensor, t: int) -> torch.Tensor:
        return sums[:, [k * sums.shape[1] // t for k in range(t)]]

    sum_a, sum_g, locations, owner = tselepidis_sums(stats)
    assert owner.tolist() == list(range(len(stats)))
    for i, si in enumerate(stats):
        for j, sj in enumerate(stats):
            t = max(si.num_locations, sj.num_locations)
            assert locations[i, j] == t
            for total, x, y in ((sum_a, si.a, sj.a), (sum_g, si.g, sj.g)):
                expected = (resampled(x.sum(-1), t) * resampled(y.sum(-1), t)).sum()
                torch.testing.assert_close(total[i, j], expected, rtol=1e-12, atol=1e-12)
