"""Factor math: robust eigendecomposition, damping conversions, EMA weights."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from oracles import outer_matrix
from twolevel_kfac.curvature import kronecker
from twolevel_kfac.curvature.factor_inverse import (
    converted_decomposition,
    damped_inverse,
    decompose_factor,
    eigen_inverse,
    safe_eigh,
)
from twolevel_kfac.curvature.kronecker import (
    KroneckerFactors,
    ema_weight,
    factor_dampings,
    pi_ratio,
)


def test_ema_weight() -> None:
    assert ema_weight(1, 0.95) == 0.0
    assert ema_weight(2, 0.95) == 0.5
    assert ema_weight(100, 0.95) == 0.95
    assert ema_weight(100, 0.0) == 0.0


def test_pi_damping_values() -> None:
    assert pi_ratio(8.0, 2, 1.0, 1) == pytest.approx(2.0)
    assert pi_ratio(0.0, 2, 1.0, 1) == 1.0  # dead layer
    shift_a, shift_g = factor_dampings(0.04, "pi", 2.0)
    assert (shift_a, shift_g) == pytest.approx((0.4, 0.1))
    assert shift_a * shift_g == pytest.approx(0.04)
    with pytest.raises(ValueError, match="not factored"):
        factor_dampings(0.1, "eigen_sum", 1.0)


def test_safe_eigh_rank_deficient_factor() -> None:
    a = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    factor = a.T @ a / 8  # rank 8 of 50
    values, vectors = safe_eigh(factor)
    assert bool((values >= 0).all())
    torch.testing.assert_close(
        vectors @ torch.diag(values) @ vectors.T, factor, atol=1e-5, rtol=1e-4
    )


def test_safe_eigh_falls_back_when_eigh_returns_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """MKL's float32 syevd was seen to return NaN silently: retry in float64."""
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(matrix.dtype)
        values, vectors = real_eigh(matrix)
        if matrix.dtype == torch.float32:
            return values * math.nan, vectors
        return values, vectors

    monkeypatch.setattr(kronecker.torch.linalg, "eigh", flaky_eigh)
    factor = torch.eye(3) * 2.0
    values, _ = safe_eigh(factor)
    assert calls == [torch.float32, torch.float64]
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, torch.full((3,), 2.0))


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_wide_eigenpairs_give_the_damped_inverse_to_float32_accuracy(scale: float) -> None:
    """A float32 ``eigh`` is off by about ``ε₃₂‖A‖`` in every eigenvalue: the damped inverse
    ``Q diag(1/(d + s)) Qᵀ`` of pixel inputs' factor is 3.9e-6 (inputs in [0, 1]) and
    5.7e-2 (raw pixels) off the float64 one at ``s = 1e-3``, where Cholesky is 2.5e-6 and
    1.7e-7 off. ``wide`` pairs (the cached ones of the damped inverses) come from a float64
    ``eigh``, in the factor's dtype: 1.8e-7 and 6.4e-8."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(256, 64, generator=generator) ** 3 * scale  # dark, skewed images
    a = torch.cat([pixels, torch.ones(256, 1)], dim=1)
    factor = a.T @ a / 256
    exact = torch.linalg.inv(factor.double() + 1e-3 * torch.eye(65, dtype=torch.float64))

    def error(pairs: tuple[torch.Tensor, torch.Tensor]) -> float:
        got = eigen_inverse(*pairs, 1e-3).double()
        return float((got - exact).norm() / exact.norm())

    pairs = safe_eigh(factor, wide=True)
    assert pairs[0].dtype == pairs[1].dtype == torch.float32
    assert error(pairs) < 1e-6
    assert error(decompose_factor(factor, "eigen")) < 1e-6  # the cached pairs
    converted = converted_decomposition((factor, factor.new_empty(0)), "eigen")  # (a resume)
    assert converted is not None and error(converted) < 1e-6
    assert (error(safe_eigh(factor)) > 1e-2) == (scale > 1)  # float32's, as before


def test_safe_eigh_refuses_nonfinite_factor() -> None:
    with pytest.raises(RuntimeError, match="NaN/Inf"):
        safe_eigh(torch.tensor([[1.0, math.nan], [math.nan, 1.0]]))


# eigen_sum has no Cholesky form (CurvatureOptions rejects the pair).
@pytest.mark.parametrize(
    ("mode", "method"),
    [
        ("per_factor", "eigen"),
        ("pi", "eigen"),
        ("eigen_sum", "eigen"),
        ("per_factor", "cholesky"),
        ("pi", "cholesky"),
    ],
)
@pytest.mark.parametrize("bordered", [False, True])
def test_apply_inverse_matches_dense(float64: None, mode: str, method: str, bordered: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    a, g = torch.randn(6, 4, generator=gen), torch.randn(6, 3, generator=gen)
    factors = KroneckerFactors(bordered=bordered)
    factors.update(a.T @ a / 6, g.T @ g / 6, ema_decay=0.0, num_locations=2)
    factors.decompose(method)
    v = torch.randn(3, 4, generator=gen)
    A, G = factors.A, factors.G
    assert A is not None and G is not None
    lam = 0.07
    if mode == "eigen_sum":
        dense = torch.kron(G, A) + lam * torch.eye(12)
    else:
        pi = pi_ratio(float(A.trace()), 4, float(G.trace()), 3) if mode == "pi" else 1.0
        sa, sg = factor_dampings(lam, mode, pi)
        dense = torch.kron(G + sg * torch.eye(3), A + sa * torch.eye(4))
    expected = torch.linalg.solve(dense, v.reshape(-1)).reshape(3, 4) / 2
    torch.testing.assert_close(
        factors.apply_inverse(v, lam, mode, method), expected, rtol=1e-10, atol=1e-12
    )
    # the same as its weight and bias parts, into fresh tensors and over the input
    weight, bias = v[:, :-1].clone(), v[:, -1].clone()
    for out in (None, (weight, bias)):
        parts = factors.apply_inverse_split(weight, bias, lam, mode, method, out=out)
        assert parts[1] is not None
        joined = torch.cat([parts[0], parts[1][:, None]], 1)
        torch.testing.assert_close(joined, expected, rtol=1e-10, atol=1e-12)
    # a stack of matrices (the analysis applies M⁻¹ to every unit vector at once)
    stack = torch.randn(5, 3, 4, generator=gen)
    rows = torch.linalg.solve(dense, stack.reshape(5, -1).T).T.reshape(5, 3, 4) / 2
    torch.testing.assert_close(
        factors.apply_inverse(stack, lam, mode, method), rows, rtol=1e-10, atol=1e-12
    )
    # rank one: u vᵀ
    u, w = torch.randn(3, generator=gen), torch.randn(4, generator=gen)
    outer = torch.linalg.solve(dense, torch.outer(u, w).reshape(-1)).reshape(3, 4) / 2
    applied = factors.apply_inverse_outer(u, w, lam, mode, method)
    # a factored damping gives the pair (G⁻¹u/T, A⁻¹w) of the rank-one result
    assert isinstance(applied, tuple) == (mode != "eigen_sum" or method != "eigen")
    torch.testing.assert_close(outer_matrix(applied), outer, rtol=1e-10, atol=1e-12)


def _eigh_failing_below(threshold: float, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make ``torch.linalg.eigh`` raise unless the smallest diagonal entry is ≥ threshold
    (a stand-in for a LAPACK convergence failure that extra damping cures)."""
    real_eigh = torch.linalg.eigh
    seen: list[float] = []

    def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(float(matrix.diagonal().min()))
        if seen[-1] < threshold:
            raise torch.linalg.LinAlgError("did not converge")
        return real_eigh(matrix)

    monkeypatch.setattr(kronecker.torch.linalg, "eigh", eigh)
    return seen


def test_safe_eigh_retries_with_growing_damping(monkeypatch: pytest.MonkeyPatch) -> None:
    factor = torch.diag(torch.tensor([0.0, 1.0, 3.0]))  # mean diagonal 4/3 → scale 7/3
    scale = 7.0 / 3.0
    seen = _eigh_failing_below(1e-5 * scale, monkeypatch)
    with pytest.warns(RuntimeWarning, match="extra damping 0.000233"):
        values, vectors = safe_eigh(factor)
    # float32, float64, then the rungs 1e-10, 1e-7, 1e-4 (the first that passes)
    assert seen == pytest.approx([0.0, 0.0, 1e-10 * scale, 1e-7 * scale, 1e-4 * scale])
    torch.testing.assert_close(values, torch.tensor([0.0, 1.0, 3.0]) + 1e-4 * scale)
    torch.testing.assert_close(vectors.abs(), torch.eye(3))


def test_safe_eigh_first_rung_is_subtracted_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    factor = torch.diag(torch.tensor([0.0, 2.0], dtype=torch.float64))
    _eigh_failing_below(1e-12, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values, _ = safe_eigh(factor)
    torch.testing.assert_close(values, torch.tensor([0.0, 2.0], dtype=torch.float64))


def test_safe_eigh_gives_up_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _eigh_failing_below(math.inf, monkeypatch)
    with pytest.raises(RuntimeError, match=r"failed in its dtype, in float64 and with extra"):
        safe_eigh(torch.eye(4))


def test_damped_inverse_retries_with_growing_damping() -> None:
    """A negative-definite 'factor' (impossible for a true second moment, possible after
    float32 round-off in an EMA) cannot be Cholesky-factored at any small shift; the ladder
    ends at 1e-2·scale and otherwise raises."""
    indefinite = torch.diag(torch.tensor([-1e-3, 1.0], dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="Cholesky .* extra damping"):
        inverse = damped_inverse(indefinite, 0.0)
    scale = (1.0 - 1e-3) / 2 + 1.0
    expected = torch.diag(1.0 / (torch.tensor([-1e-3, 1.0], dtype=torch.float64) + 1e-2 * scale))
    torch.testing.assert_close(inverse, expected)
    with pytest.raises(RuntimeError, match="Cholesky"):
        damped_inverse(torch.diag(torch.tensor([-1.0, 1.0])), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 7, 200, 785])
def test_damped_inverse_is_exactly_symmetric(dtype: torch.dtype, size: int) -> None:
    """``damped_inverse`` relies on torch's CPU ``cholesky_inverse`` mirroring the triangle
    LAPACK writes (it no longer mirrors it itself on the CPU): the inverse must equal its
    transpose bit for bit, also after the float64 retry of a rank-deficient float32 factor
    (a distributed run shares it as a packed triangle; a resumed run recomputes it), and
    be row-major like the unpacked triangle (a column-major operand rounds differently in
    a GEMM: the distributed resume test caught it)."""
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(size, max(1, size // 3), generator=gen, dtype=dtype)
    factor = x @ x.T / size  # rank-deficient: float32 Cholesky may need the float64 retry
    for shift in (1e-1, 1e-7):
        with warnings.catch_warnings():  # 1e-7 may take the extra-damping rung: also checked
            warnings.simplefilter("ignore", RuntimeWarning)
            inverse = damped_inverse(factor, shift)
        assert inverse.dtype == dtype and torch.equal(inverse, inverse.T)
        assert inverse.is_contiguous()  # row-major, as every GEMM and unpacked copy
        dense = torch.linalg.inv((factor + shift * torch.eye(size, dtype=dtype)).double())
        if shift == 1e-1:
            torch.testing.assert_close(inverse.double(), dense, rtol=1e-4, atol=1e-4)


def _random_factors(
    d_out: int, d_in: int, locations: int, bordered: bool = False
) -> KroneckerFactors:
    gen = torch.Generator().manual_seed(d_out * 100 + d_in)
    a = torch.randn(3 * d_in, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(2 * d_out, d_out, generator=gen, dtype=torch.float64)
    factors = KroneckerFactors(bordered=bordered)
    factors.update(a.T @ a / len(a), g.T @ g / len(g), 0.95, locations)
    return factors


@pytest.mark.parametrize(
    ("mode", "method"),
    [
        ("per_factor", "eigen"),
        ("pi", "cholesky"),
        ("per_factor", "cholesky"),
        ("eigen_sum", "eigen"),
    ],
)
@pytest.mark.parametrize("locations", [1, 3])
@pytest.mark.parametrize("bordered", [False, True])
def test_split_and_rank_one_applies_equal_the_joined_one(
    mode: str, method: str, locations: int, bordered: bool
) -> None:
    """``apply_inverse_split`` on ``[W, b]`` given as parts and ``apply_inverse_outer`` on
    ``u vᵀ`` equal ``apply_inverse`` of the joined matrix (to rounding); a ``bordered``
    factor pair (``A⁻¹`` in blocks) equals the plain one."""
    factors = _random_factors(5, 7, locations, bordered)
    factors.decompose(method)
    gen = torch.Generator().manual_seed(1)
    joined = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    expected = factors.apply_inverse(joined, 0.1, mode, method)
    plain = _random_factors(5, 7, locations)
    plain.decompose(method)
    torch.testing.assert_close(
        expected, plain.apply_inverse(joined, 0.1, mode, method), rtol=1e-12, atol=1e-15
    )
    weight, bias = factors.apply_inverse_split(joined[:, :-1], joined[:, -1], 0.1, mode, method)
    assert bias is not None
    torch.testing.assert_close(torch.cat([weight, bias[:, None]], 1), expected, rtol=1e-12, atol=0)
    alone, none = factors.apply_inverse_split(joined, None, 0.1, mode, method)
    assert none is None and torch.equal(alone, expected)
    u, v = joined[:, 0], joined[0]
    torch.testing.assert_close(
        outer_matrix(factors.apply_inverse_outer(u, v, 0.1, mode, method)),
        factors.apply_inverse(torch.outer(u, v), 0.1, mode, method),
        rtol=1e-12,
        atol=1e-15,
    )
    # float32 parts against float64 factors: computed in the factors' dtype, returned in theirs
    w32, b32 = factors.apply_inverse_split(
        joined[:, :-1].float(), joined[:, -1].float(), 0.1, mode, method
    )
    assert w32.dtype == torch.float32 and b32 is not None and b32.dtype == torch.float32


@pytest.mark.parametrize(
    ("mode", "method"), [("pi", "cholesky"), ("per_factor", "eigen"), ("eigen_sum", "eigen")]
)
@pytest.mark.parametrize(("with_bias", "bordered"), [(True, False), (True, True), (False, False)])
def test_split_apply_written_over_its_own_input(
    mode: str, method: str, with_bias: bool, bordered: bool
) -> None:
    """``apply_inverse_split(..., out=(weight, bias))`` writes the direction over the
    gradient it reads (plain KFAC without a KL clip does this with ``.grad``): the same
    values as the fresh result, in the very tensors passed, also through the float32 cast
    against float64 factors."""
    factors = _random_factors(5, 7 if with_bias else 6, 2, bordered)
    factors.decompose(method)
    joined = torch.randn(5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        weight = joined[:, :6].to(dtype).clone()
        bias = joined[:, 6].to(dtype).clone() if with_bias else None
        fresh = factors.apply_inverse_split(weight, bias, 0.1, mode, method)
        out_w, out_b = factors.apply_inverse_split(
            weight, bias, 0.1, mode, method, out=(weight, bias)
        )
        assert out_w is weight and out_b is bias
        torch.testing.assert_close(weight, fresh[0], rtol=rtol, atol=0)
        if bias is not None:
            assert fresh[1] is not None
            torch.testing.assert_close(bias, fresh[1], rtol=rtol, atol=0)


@pytest.mark.parametrize("bordered", [False, True])
def test_apply_inverse_can_be_differentiated_and_vmapped(bordered: bool) -> None:
    """``apply_inverse`` of a whole ``W̄`` is a plain product for autograd and
    ``torch.func.vmap`` (the analysis differentiates through ``apply_fine``), also with
    ``A⁻¹`` in blocks: its gradient is ``M⁻¹`` applied to the upstream gradient (``M⁻¹`` is
    symmetric), and the vmapped result equals the loop."""
    factors = _random_factors(5, 7, 2, bordered)
    factors.decompose("cholesky")
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    (factors.apply_inverse(v, 0.1, "pi", "cholesky") * upstream).sum().backward()
    assert v.grad is not None
    expected = factors.apply_inverse(upstream, 0.1, "pi", "cholesky")
    torch.testing.assert_close(v.grad, expected, rtol=1e-12, atol=1e-14)
    stack = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    mapped = torch.func.vmap(lambda m: factors.apply_inverse(m, 0.1, "pi", "cholesky"))(stack)
    looped = torch.stack([factors.apply_inverse(m, 0.1, "pi", "cholesky") for m in stack])
    torch.testing.assert_close(mapped, looped, rtol=1e-12, atol=1e-14)
