"""The certified extreme eigenpair of a factor (:mod:`twolevel_kfac.curvature.extreme_eigen`)
against ``torch.linalg.eigh``, its certificate, its fallback, and the spectral step it
gives against the one built from the full eigendecompositions."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import twolevel_kfac as tk
from test_kfac_exact import CONTRACT, one_step
from twolevel_kfac.curvature import extreme_eigen, layer_types
from twolevel_kfac.curvature.eigen_cluster import canonical_vector, cluster_tolerance
from twolevel_kfac.curvature.extreme_eigen import (
    BLOCK,
    REFINE_MIN,
    SMALL,
    certified_pair,
    extreme_eigenpair,
    frozen_eigenpairs,
    tolerance,
)
from twolevel_kfac.curvature.factor_inverse import damped_inverse, safe_eigh

WHICH = ("smallest", "largest")


def spectrum_matrix(values: Tensor, first: Tensor | None = None, seed: int = 0) -> Tensor:
    """``Q diag(values) Qᵀ`` with a random orthogonal ``Q`` (its first column ``first``)."""
    n = values.shape[0]
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(n, n, generator=gen, dtype=torch.float64)
    if first is not None:
        start[:, 0] = first
    q = torch.linalg.qr(start)[0]
    return (q * values) @ q.T


def wishart(n: int, samples: int, dtype: torch.dtype, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, n, generator=gen, dtype=torch.float64)
    return (x.T @ x / samples).to(dtype)


def assert_certified_pair(matrix: Tensor, which: str) -> None:
    """Within ``τ`` of eigh's extreme eigenvalue, a residual below ``τ/√n``, unit norm."""
    values, vectors = extreme_eigenpair(matrix, which)
    assert values.shape == (1,) and vectors.shape == (matrix.shape[0], 1)
    assert values.dtype == vectors.dtype == matrix.dtype
    m64, q, theta = matrix.double(), vectors[:, 0].double(), float(values[0])
    tau = tolerance(m64, matrix.dtype)
    exact = torch.linalg.eigvalsh(m64)
    extreme = float(exact[0] if which == "smallest" else exact[-1])
    slack = 4 * torch.finfo(matrix.dtype).eps * float(exact.abs().max())  # the cast back
    assert abs(theta - extreme) <= tau + slack
    close = tau / m64.shape[0] ** 0.5
    assert float(torch.linalg.vector_norm(m64 @ q - theta * q)) <= close + slack
    assert float(q.norm()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [SMALL + 1, 200, 300, REFINE_MIN])
@pytest.mark.parametrize("kind", ["well-conditioned", "rank-deficient"])
def test_the_pair_is_certified_against_eigh(
    n: int, dtype: torch.dtype, which: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every path of the iteration (the near-null shortcut, the refinement, the power
    iteration) run at these sizes (``REFINE_MIN`` lowered), and the pair it certifies
    checked against ``eigvalsh``: all but two of these 32 factors certify."""
    monkeypatch.setattr(extreme_eigen, "REFINE_MIN", SMALL + 1)
    matrix = wishart(n, 4 * n if kind == "well-conditioned" else n // 2, dtype)
    hard = (dtype, which, kind) == (torch.float64, "largest", "well-conditioned")
    hard = hard and n in (SMALL + 1, 200)
    assert (certified_pair(matrix, which) is None) == hard  # those fall back to eigh
    assert_certified_pair(matrix, which)


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_refinement_certifies_a_well_conditioned_factor(dtype: torch.dtype, which: str) -> None:
    """A Wishart factor (λ_min a quarter of the mean, dense near both edges): the first
    phase leaves a residual above ``τ``; the shifted refinement certifies the pair."""
    matrix = wishart(REFINE_MIN, 4 * REFINE_MIN, dtype)
    assert certified_pair(matrix, which) is not None
    assert_certified_pair(matrix, which)


@pytest.mark.parametrize("which", WHICH)
def test_a_separated_extreme_gives_eighs_eigenvector(which: str) -> None:
    """With the extreme eigenvalue 0.1 apart from the rest, the vector is eigh's (up to
    its sign) to ``τ/gap``."""
    values = torch.linspace(1.0, 2.0, 120, dtype=torch.float64)
    values[0 if which == "smallest" else -1] = 0.5 if which == "smallest" else 2.5
    matrix = spectrum_matrix(values, seed=3)
    _, vector = extreme_eigenpair(matrix, which)
    column = 0 if which == "smallest" else -1
    reference = torch.linalg.eigh(matrix).eigenvectors[:, column]
    sign = torch.sign(reference @ vector[:, 0])
    assert torch.allclose(sign * vector[:, 0], reference, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_rank_deficient_factor_gives_a_null_vector(dtype: torch.dtype) -> None:
    """Fewer samples than features (the dead pixels of MNIST): the smallest eigenvalue 0 is
    repeated and any null vector is the pair; the one returned has ``‖Mq‖ ≤ τ``."""
    matrix = wishart(150, 90, dtype)
    values, vectors = extreme_eigenpair(matrix, "smallest")
    m64 = matrix.double()
    assert float(values[0]) <= tolerance(m64, dtype)
    assert float((m64 @ vectors[:, 0].double()).norm()) <= tolerance(m64, dtype)


@pytest.mark.parametrize("samples", [100, 800])
def test_the_result_is_a_deterministic_function_of_the_factor(samples: int) -> None:
    """A resumed run rebuilds the basis from the saved factors: bit for bit (a null vector
    of a rank-deficient factor, chosen by the start, and a refined one)."""
    matrix = wishart(REFINE_MIN, samples, torch.float32)
    assert certified_pair(matrix, "smallest") is not None
    first, second = (
        extreme_eigenpair(matrix, "smallest"),
        extreme_eigenpair(matrix.clone(), "smallest"),
    )
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_a_frozen_factor_is_decomposed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``frozen_eigenpairs`` computes a frozen factor's pair once per ``which`` (a basis
    rebuilt at every statistics step reads it again), again once the factor is written
    to, and forgets it with the factor."""
    calls: list[str] = []
    real = extreme_eigen.extreme_eigenpair

    def spy(matrix: Tensor, which: str) -> tuple[Tensor, Tensor]:
        calls.append(which)
        return real(matrix, which)

    monkeypatch.setattr(extreme_eigen, "extreme_eigenpair", spy)
    frozen = (wishart(SMALL + 10, 1000, torch.float32), torch.empty(0))
    first = frozen_eigenpairs(frozen, "smallest")
    assert frozen_eigenpairs(frozen, "smallest") is first
    frozen_eigenpairs(frozen, "largest")
    assert calls == ["smallest", "largest"]
    frozen[0].mul_(2.0)
    torch.testing.assert_close(frozen_eigenpairs(frozen, "smallest")[0], 2 * first[0])
    assert len(calls) == 3
    held = len(extreme_eigen._FROZEN_PAIRS)
    del frozen
    assert len(extreme_eigen._FROZEN_PAIRS) == held - 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_factor_is_decomposed_in_float32(dtype: torch.dtype) -> None:
    """``factor_dtype=torch.bfloat16``: no LAPACK kernel takes it, so the pair (and the
    Cholesky inverse) are those of the factor in float32, returned in its dtype."""
    matrix = wishart(SMALL + 20, 400, torch.float32).to(dtype)
    values, vectors = extreme_eigenpair(matrix, "smallest")
    wide_values, wide_vectors = extreme_eigenpair(matrix.float(), "smallest")
    assert values.dtype == vectors.dtype == dtype
    assert torch.equal(values, wide_values.to(dtype)) and torch.equal(
        vectors, wide_vectors.to(dtype)
    )
    inverse = damped_inverse(matrix, 0.1)
    assert inverse.dtype == dtype
    torch.testing.assert_close(inverse, damped_inverse(matrix.float(), 0.1).to(dtype))


def start_block(n: int) -> Tensor:
    gen = torch.Generator().manual_seed(extreme_eigen._SEED)
    return torch.randn(n, BLOCK, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("which", WHICH)
def test_a_start_blind_to_the_extreme_is_caught_by_the_certificate(
    which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixed start block spans an invariant subspace of distinct eigenvalues that
    misses the extreme: the iteration stays there with a zero residual, and only the
    certificate (a Cholesky factorisation past the extreme) sees that ``θ`` is not the
    extreme; the answer is then eigh's. Without the certificate it would be wrong. (With
    the block's eigenvalues equal, their cluster goes to eigh as well.)"""
    n = 200
    block = torch.linalg.qr(start_block(n))[0]
    rest = torch.randn(
        n, n - BLOCK, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    basis = torch.linalg.qr(torch.cat([block, rest], dim=1))[0]  # the block's span first
    inside = torch.tensor([1.0, 1.5, 2.0, 2.5], dtype=torch.float64)
    others = torch.full((n - BLOCK,), 5.0 if which == "smallest" else 0.2, dtype=torch.float64)
    if which == "largest":
        inside = inside.flip(0)  # the block's largest is 2.5, the extreme another's
    extreme = 0.5 if which == "smallest" else 7.0
    others[0] = extreme
    values = torch.cat([inside, others])
    matrix = (basis * values) @ basis.T
    found, _ = extreme_eigenpair(matrix, which)
    assert float(found[0]) == pytest.approx(extreme, abs=1e-12)
    monkeypatch.setattr(extreme_eigen, "_certified", lambda *args: True)
    uncertified, _ = extreme_eigenpair(matrix, which)
    assert float(uncertified[0]) == pytest.approx(1.0 if which == "smallest" else 2.5, abs=1e-9)


def test_an_unconverged_iteration_falls_back_to_eigh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eight largest eigenvalues 1e-11 apart (``τ`` is 4e-14), more than the block
    holds: neither phase separates them in its iterations (the refinement is let run at
    this size), and the pair is eigh's, bit for bit."""
    monkeypatch.setattr(extreme_eigen, "REFINE_MIN", SMALL)
    values = torch.linspace(0.0, 0.5, 90, dtype=torch.float64)
    values[-8:] = 1.0 - 1e-11 * torch.arange(7, -1, -1, dtype=torch.float64)
    matrix = spectrum_matrix(values, seed=4)
    assert certified_pair(matrix, "largest") is None
    eig_values, eig_vectors = safe_eigh(matrix)
    found_values, found_vectors = extreme_eigenpair(matrix, "largest")
    top = int(eig_values.argmax())
    assert torch.equal(found_values, eig_values[top : top + 1])
    assert torch.equal(found_vectors, eig_vectors[:, top : top + 1])


def test_an_unconverged_refinement_is_not_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """One refinement step leaves the residual of a well-conditioned factor above ``τ``:
    the iteration gives up and the pair is eigh's (an unconverged pair returned anyway is
    caught by the float64 ``largest`` case of the check against eigh above)."""
    matrix = wishart(REFINE_MIN, 4 * REFINE_MIN, torch.float64)
    assert certified_pair(matrix, "smallest") is not None
    monkeypatch.setattr(extreme_eigen, "SECOND_ITERATIONS", 1)
    assert certified_pair(matrix, "smallest") is None
    assert_certified_pair(matrix, "smallest")


def test_the_near_null_shortcut_needs_a_small_residual() -> None:
    """The null vector and one of eigenvalue ``3τ`` seen by the start block along one
    direction only: after the first phase's two iterations the Ritz value is below ``τ``
    but its vector still mixes the two (residual ``~12τ``); it is not taken until the
    residual is below ``τ/√n`` too."""
    n = 100
    block, gen = start_block(n), torch.Generator().manual_seed(5)
    seen = block @ torch.randn(BLOCK, generator=gen, dtype=torch.float64)
    unseen = torch.randn(n, generator=gen, dtype=torch.float64)
    unseen -= block @ torch.linalg.lstsq(block, unseen).solution
    null = seen + unseen
    near = seen - (seen @ seen) / (unseen @ unseen) * unseen  # ⊥ null, the same view
    start = torch.randn(n, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    start[:, 0], start[:, 1] = null, near
    q = torch.linalg.qr(start)[0]
    values = torch.ones(n, dtype=torch.float64)
    values[0] = 0.0
    values[1] = 3 * tolerance(torch.diag(values), torch.float64)
    matrix = (q * values) @ q.T
    matrix = 0.5 * (matrix + matrix.T)
    tau = tolerance(matrix, torch.float64)
    solve = extreme_eigen._shifted_solver(extreme_eigen._shifted(matrix, tau), matrix, tau)
    assert solve is not None
    first = block
    for _ in range(extreme_eigen.CHECK_EVERY):
        first = torch.linalg.qr(solve(first))[0]
    ritz = extreme_eigen._ritz(matrix, first)
    assert ritz.theta <= tau < ritz.residual  # the trap
    pair = certified_pair(matrix, "smallest")  # (side 100 ≤ SMALL: called directly)
    assert pair is not None
    vector = pair[1][:, 0]
    assert float((matrix @ vector - pair[0] * vector).norm()) <= tau / n**0.5


def test_small_factors_and_eigen_decompositions_are_read_as_they_are() -> None:
    small = wishart(SMALL, 200, torch.float64)
    values, vectors = safe_eigh(small)
    assert torch.equal(extreme_eigenpair(small, "smallest")[1], vectors[:, :1])
    assert frozen_eigenpairs((values, vectors), "smallest") == (values, vectors)
    with pytest.raises(ValueError, match="which must be 'smallest' or 'largest'"):
        extreme_eigenpair(small, "middle")


class WideNet(nn.Module):
    """Factors of sides 71, 80, 81 and 66 (above a ``SMALL`` of 64): the iteration runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(70, 80), nn.Linear(80, 66)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("combination", ["additive", "adef2"])
@pytest.mark.parametrize("which", WHICH)
def test_a_spectral_step_under_cholesky_equals_the_step_from_eigh(
    float64: None, which: str, combination: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` now inverts by Cholesky for the spectral space and reads one certified pair
    per factor; its step equals the one under ``inverse_method="eigen"`` (full eigenpairs,
    oracle-tested in ``test_twolevel_exact``) to 1e-9, with every pair from the iteration."""
    accepted = []
    iterate = extreme_eigen.certified_pair

    def spy(matrix: Tensor, side: str) -> tuple[Tensor, Tensor] | None:
        pair = iterate(matrix, side)
        accepted.append(pair is not None)
        return pair

    monkeypatch.setattr(extreme_eigen, "certified_pair", spy)
    monkeypatch.setattr(extreme_eigen, "SMALL", 64)  # iterate at these sizes
    monkeypatch.setattr(extreme_eigen, "REFINE_MIN", 64)  # and refine
    model = WideNet()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 70, generator=gen), torch.randint(66, (256,), generator=gen)
    steps = {}
    for method in ("auto", "eigen"):
        net = copy.deepcopy(model)
        opt = tk.TwoLevelKFAC(
            net, damping=0.05, coarse_space="spectral", spectral_which=which,
            combination=combination, inverse_method=method, **CONTRACT,
        )  # fmt: skip
        steps[method] = one_step(net, opt, x, y)
        expected = "cholesky" if method == "auto" else "eigen"
        assert opt.preconditioner.options.inverse_method == expected
    assert accepted == [True] * 4  # A and G of both layers, under auto only
    for name, step in steps["auto"].items():
        reference = steps["eigen"][name]
        assert float((step - reference).norm()) <= 1e-9 * float(reference.norm()), name


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("module", ["grouped convolution", "token table"])
def test_grouped_and_token_blocks_read_the_asked_extreme(
    float64: None, module: str, which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocks that build their own spectral vector (a grouped convolution's groups, a
    token table's seen rows) read each factor's ``which`` pair under Cholesky as under the
    full eigendecompositions: the steps agree (``SMALL`` lowered so that every factor past
    three rows iterates)."""
    from test_grouped_conv import data as image_data
    from test_grouped_conv import grouped_net
    from test_token_table import trained

    monkeypatch.setattr(extreme_eigen, "SMALL", 3)
    monkeypatch.setattr(extreme_eigen, "REFINE_MIN", 3)
    settings = {"coarse_space": "spectral", "spectral_which": which, "combination": "adef2"}
    steps = {}
    for method in ("auto", "eigen"):
        if module == "token table":
            monkeypatch.setattr(layer_types, "EMBEDDING_MAX_ROWS", 8)
            steps[method] = trained(tk.TwoLevelKFAC, inverse_method=method, **settings)[0]
            continue
        net, size = grouped_net(2)
        x, y = image_data(2, size)
        net(x)
        opt = tk.TwoLevelKFAC(net, lr=0.1, damping=0.05, inverse_method=method, **settings)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        steps[method] = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(steps["auto"], steps["eigen"], rtol=1e-9, atol=1e-12)


def test_a_kept_pair_holds_no_eigenbasis() -> None:
    """``eigh``'s pair is a copy of one column: the pair ``frozen_eigenpairs`` keeps between
    refreshes holds ``n + 1`` numbers, not the ``n × n`` eigenvectors."""
    frozen = (wishart(SMALL, 400, torch.float32), torch.empty(0))
    values, vectors = frozen_eigenpairs(frozen, "largest")
    assert vectors.untyped_storage().nbytes() == 4 * SMALL
    assert values.untyped_storage().nbytes() == 4


def test_an_inference_factor_is_not_kept() -> None:
    """A factor made under ``torch.inference_mode`` (a state loaded there) has no version
    counter: its pair is computed, not kept."""
    with torch.inference_mode():
        frozen = (wishart(SMALL + 10, 60, torch.float32), torch.empty(0))
    held = len(extreme_eigen._FROZEN_PAIRS)
    values, _ = frozen_eigenpairs(frozen, "smallest")
    assert len(extreme_eigen._FROZEN_PAIRS) == held and values.shape == (1,)


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("gap", [1e-3, 1e-4])
def test_a_simple_extreme_gives_its_eigenvector(gap: float, which: str) -> None:
    """A simple extreme eigenvalue ``gap`` from the rest of a float32 factor (spectrum in
    ``[0.2, 0.9]``, side 512): the vector's residual is below ``τ/√n = 8ε‖M‖_F``, so its
    angle to the float64 eigenvector is at most that over the gap (measured 1.3e-3 at a
    gap of 1e-3; it was 3e-2 with ``τ`` itself, and float32 ``eigh`` reaches 1e-5). The
    largest pair of this spectrum takes ``eigh`` (its refinement's factor fails)."""
    n = 512
    values = torch.linspace(0.2, 0.9, n, dtype=torch.float64)
    values[0 if which == "smallest" else -1] += -gap if which == "smallest" else gap
    matrix = spectrum_matrix(values, seed=7).float()
    m64 = matrix.double()
    exact = torch.linalg.eigh(m64).eigenvectors[:, 0 if which == "smallest" else -1]
    assert (certified_pair(matrix, which) is not None) == (which == "smallest")  # else eigh
    _, vector = extreme_eigenpair(matrix, which)
    q = vector[:, 0].double()
    angle = float((1 - (q @ exact) ** 2 / (q @ q)).clamp_min(0).sqrt())
    true_gap = float(torch.linalg.eigvalsh(m64).diff().abs()[0 if which == "smallest" else -1])
    assert angle <= tolerance(m64, torch.float32) / n**0.5 / true_gap


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("power", [-50, -12, 12, 50])
def test_the_pair_scales_with_the_factor_by_powers_of_four(which: str, power: int) -> None:
    """The iteration works on the factor scaled to a norm near 1 by a power of two with an
    even exponent: a factor times ``4^k`` gives the same vector and ``4^k`` times the value,
    bit for bit, down to a float32 factor near 1e-30 (before, ``(M + τI)⁻¹X`` overflowed
    there: a saturated softmax's factor, entries near 1e-37, raised in ``eigh``)."""
    for kind, matrix in (("near-null", wishart(400, 150, torch.float32)),
                         ("full-rank", wishart(400, 1200, torch.float32, seed=1))):  # fmt: skip
        pair = certified_pair(matrix, which)
        assert pair is not None, kind
        factor = 4.0**power
        scaled = certified_pair(matrix * factor, which)
        assert scaled is not None, kind
        assert torch.equal(scaled[1], pair[1]), kind
        assert torch.equal(scaled[0], pair[0] * factor), kind
        assert_certified_pair(matrix * factor, which)


def test_a_linalg_error_of_the_iteration_falls_back_to_eigh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``LinAlgError`` inside the iteration (its small Rayleigh–Ritz ``eigh`` failed on a
    pathological factor) gives eigh's pair of the factor, not the error (its null space
    has 120 dimensions: the vector of it closest to the reference)."""

    def failing(signed: Tensor, block: Tensor) -> None:
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(extreme_eigen, "_ritz", failing)
    matrix = wishart(200, 80, torch.float32)
    eig_values, eig_vectors = safe_eigh(matrix)
    found_values, found_vectors = extreme_eigenpair(matrix, "smallest")
    low = int(eig_values.argmin())
    assert torch.equal(found_values, eig_values[low : low + 1])
    tau = cluster_tolerance(eig_values, torch.float32)
    expected = canonical_vector(eig_vectors, eig_values, "smallest", tau)
    assert torch.equal(found_vectors, expected.unsqueeze(1))


@pytest.mark.parametrize("scale", [1e-36, 1e-37])
def test_a_vanishing_float32_factor_gets_its_pair(scale: float) -> None:
    """A float32 factor near 1e-36 (a saturated softmax's output gradients; its square
    norm underflows float32): the pair is found and certified, where the iteration on the
    unscaled factor raised ``LinAlgError`` in its Rayleigh–Ritz ``eigh``."""
    matrix = (wishart(512, 1200, torch.float64) * scale).float()  # full rank: one pair
    for which in WHICH:
        assert certified_pair(matrix, which) is not None
        assert_certified_pair(matrix, which)


def test_a_factor_whose_norm_is_below_float32s_range_is_scaled_in_float64() -> None:
    """Entries near 1e-40 (norm below 2^-127): the scale, 2^128 or more, overflows float32,
    so it is applied in float64 before the cast; both pairs are certified."""
    matrix = (wishart(512, 1200, torch.float64) * 1e-40).float()  # full rank: one pair
    for which in WHICH:
        assert certified_pair(matrix, which) is not None
        assert_certified_pair(matrix, which)


class LargestOutputs(TorchDispatchMode):
    """The largest float64 and float32 outputs of the ops run under it, in elements."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.is_floating_point():
                self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


def test_a_near_null_float32_factor_is_never_copied_to_float64() -> None:
    """The spectral refresh's peak: the iteration holds the factor once in float32 (its
    scaled copy, the shifted one and its Cholesky factor), its float64 norms and products
    taken a slice of rows at a time."""
    n = 600  # a factor of 600 inputs from 200 samples: near-null, the shortcut path
    matrix = wishart(n, 200, torch.float32)
    with LargestOutputs() as seen:
        pair = certified_pair(matrix, "smallest")
    assert pair is not None
    assert seen.largest[torch.float64] <= extreme_eigen.ROWS64 * n < n * n
    assert seen.largest[torch.float32] == n * n
