"""The spectral vector of a repeated extreme eigenvalue is a function of the eigenspace, not
of the rounding that picked one of its vectors: the same factor summed in another order
(samples permuted, the ranks of ``torch.distributed``) gives the same coarse space."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from twolevel_kfac.curvature.eigen_cluster import (
    _capped_runs,
    canonical_vector,
    cluster_mean,
    cluster_tolerance,
)
from twolevel_kfac.curvature.extreme_eigen import extreme_eigenpair


def with_null_space(n: int, rank: int, dtype: torch.dtype) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, rank, generator=gen, dtype=torch.float64)
    return (x @ x.T / rank).to(dtype)


def test_any_basis_of_the_cluster_gives_the_same_vector() -> None:
    matrix = with_null_space(12, 7, torch.float64)
    values, vectors = torch.linalg.eigh(matrix)
    tau = cluster_tolerance(values, torch.float64)
    mix = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    rotated = vectors.clone()
    rotated[:, :5] = vectors[:, :5] @ mix  # another basis of the 5-dimensional null space
    first = canonical_vector(vectors, values, "smallest", tau)
    torch.testing.assert_close(canonical_vector(rotated, values, "smallest", tau), first)
    assert float((matrix @ first).norm()) < 1e-12  # still a null vector, of unit norm
    assert abs(float(first.norm()) - 1.0) < 1e-12
    largest = canonical_vector(vectors, values, "largest", tau)
    assert torch.equal(largest, vectors[:, -1])  # a single eigenvalue: its vector, bit for bit


@pytest.mark.parametrize("side", (40, 300))  # eigh, and the certified iteration
def test_the_extreme_pair_does_not_depend_on_the_summation_order(side: int) -> None:
    """A 200-dimensional null space: inverse iteration from the reference."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(side // 3, side, generator=gen)
    one = rows.T @ rows / len(rows)
    other = rows.flip(0).T @ rows.flip(0) / len(rows)  # the same factor, other rounding
    assert not torch.equal(one, other)
    q_one, q_other = extreme_eigenpair(one, "smallest")[1], extreme_eigenpair(other, "smallest")[1]
    cosine = float((q_one.double().T @ q_other.double()).abs())
    assert cosine > 1 - 1e-4  # float32 solves near the null space; any two vectors: ~0.1


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.hidden, self.head = nn.Embedding(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


@pytest.mark.parametrize("combination", ("additive", "balanced"))
def test_spectral_steps_do_not_depend_on_the_samples_order(float64: None, combination: str) -> None:
    """The hidden layer's ``A`` is rank-deficient (5 tokens for 7 features): its smallest
    eigenvector was whichever rounding gave, and two batches that differ only in their
    samples' order took steps 6.9e-3 apart after a few steps (2 ranks against one process:
    2.7e-3)."""
    gen = torch.Generator().manual_seed(2)
    batches = [
        (torch.randint(0, 5, (2, 5), generator=gen), torch.randint(0, 3, (2, 5), generator=gen))
        for _ in range(4)
    ]
    runs = []
    for order in (torch.tensor([0, 1]), torch.tensor([1, 0])):
        model = Tokens().double()
        opt = tk.TwoLevelKFAC(
            model, coarse_space="spectral", combination=combination, class_dim=-1,
            fisher="empirical", lr=0.1, damping=1e-2, cov_interval=2,
        )  # fmt: skip
        for tokens, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(tokens[order]).flatten(0, 1), y[order].flatten()).backward()
            opt.step()
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("side", (400, 785))
@pytest.mark.parametrize("which", ("smallest", "largest"))
@pytest.mark.parametrize("multiplicity", (2, 3, 6))
def test_a_repeated_eigenvalue_of_a_full_rank_factor_is_canonical(
    side: int, which: str, multiplicity: int
) -> None:
    """Not near-null: the iteration's block need not span the cluster, so ``eigh``'s
    eigenspace gives the vector (a reviewer's scan: |cos| 0.28 between two orders)."""
    gen = torch.Generator().manual_seed(side + multiplicity)
    basis = torch.linalg.qr(torch.randn(side, side, generator=gen, dtype=torch.float64))[0]
    values = torch.linspace(1.0, 2.0, side, dtype=torch.float64)
    if which == "smallest":
        values[:multiplicity] = 0.5
    else:
        values[-multiplicity:] = 3.0
    rows = values.sqrt()[:, None] * basis.T
    order = torch.randperm(side, generator=gen)
    one, other = rows.T @ rows, rows[order].T @ rows[order]
    q_one, q_other = extreme_eigenpair(one, which)[1], extreme_eigenpair(other, which)[1]
    assert float((q_one.T @ q_other).abs()) > 1 - 1e-9


def test_cluster_mean_makes_the_scaled_matrix_the_same_for_every_basis_of_a_cluster() -> None:
    """``Q diag(cluster_mean(s)) Qᵀ`` is the same for two eigenbases of one matrix with a
    repeated eigenvalue (rotated within its eigenspace), where ``Q diag(s) Qᵀ`` is not;
    stacked decompositions each by their own clusters; a standard basis (a diagonal
    factor) and distinct eigenvalues keep ``s`` as it is."""
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([0.0, 1e-17, 2e-17, 0.5, 2.0], dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    spin, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    other = basis.clone()
    other[:, :3] = basis[:, :3] @ spin  # another eigenbasis of the same matrix
    grads = torch.randn(7, 2, 5, generator=gen, dtype=torch.float64)  # per-sample [2, 5]

    def scaled(q: Tensor, average: bool) -> Tensor:
        s = (grads @ q).square().mean(0)  # [2, 5]: S in the basis q (the A side)
        s = cluster_mean(s, values, q, -1, torch.float64) if average else s
        return torch.stack([q @ torch.diag(row) @ q.T for row in s])

    assert (scaled(basis, False) - scaled(other, False)).abs().max() > 1e-3
    torch.testing.assert_close(scaled(basis, True), scaled(other, True), rtol=0, atol=1e-14)
    s = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    stacked = cluster_mean(
        torch.stack([s, s]), torch.stack([values, torch.arange(5.0, dtype=torch.float64)]),
        torch.stack([basis, basis]), -1, torch.float64,
    )  # fmt: skip
    assert torch.equal(stacked[1], s) and not torch.equal(stacked[0], s)
    torch.testing.assert_close(stacked[0, :, :3], s[:, :3].mean(-1, keepdim=True).expand(2, 3))
    torch.testing.assert_close(cluster_mean(s.T, values, basis, -2, torch.float64), stacked[0].T)
    assert (
        cluster_mean(s, values, torch.eye(5, dtype=torch.float64).flip(0), -1, torch.float64) is s
    )


def test_clusters_do_not_chain_past_the_tolerance() -> None:
    """Close neighbours do not chain into one wide cluster: each cluster spans at most τ
    from its smallest eigenvalue (chained, a float32 factor's decaying spectrum merged 951
    eigenvalues from 2e-7 to 4e-4, and EKFAC's step moved 0.11 from float64's); a float32
    spectrum that ``eigh`` resolves is left alone."""
    tau = 1.0  # a cluster of k spans at most τ·√k
    assert _capped_runs([0.0, 0.6, 1.2, 1.8, 2.4, 3.0, 5.0], tau) == [(0, 4), (4, 6)]
    assert _capped_runs([0.0, 2.0, 4.0], tau) == []
    # an eigenvalue repeated 299 times, spread by the rounding over 6ε·max|λ| (3 pairs'
    # widths): one cluster (split into pieces, each still the rounding's pick)
    eps = torch.finfo(torch.float64).eps
    repeated = [1 / 300 + 6 * eps * k / 298 for k in range(299)] + [1.0]
    assert _capped_runs(repeated, 2 * eps) == [(0, 299)]
    n = 50
    values = (0.8 ** torch.arange(n, dtype=torch.float64)).flip(0).float()  # 1.4e-5 … 1
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0)))
    s = torch.rand(4, n, generator=torch.Generator().manual_seed(1))
    assert cluster_mean(s, values, basis, -1, torch.float32) is s


def test_a_full_rank_float32_factor_keeps_its_scalings() -> None:
    """Eigenvalues of a full-rank float32 factor that ``eigh`` resolves are not averaged,
    however close in absolute terms (a spectrum down to 1e-3 of the largest: clusters of
    width ``8ε‖λ‖₂`` had merged 3.86e-5 with 3.96e-5, and the run moved 2× further from
    float64's); its null space is, where it has one."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 40, generator=gen) * torch.logspace(0, -3, 40).sqrt()
    values, vectors = torch.linalg.eigh(x.T @ x / 256)
    s = torch.rand(3, 40, generator=gen)
    assert cluster_mean(s, values, vectors, -1, torch.float32) is s
    close = torch.tensor([1e-2 + k * 5e-7 for k in range(39)] + [1.0])  # 4ε apart
    assert cluster_mean(s, close, vectors, -1, torch.float32) is s
    deficient = x[:20]  # rank 20 of 40
    values, vectors = torch.linalg.eigh(deficient.T @ deficient / 20)
    averaged = cluster_mean(s, values, vectors, -1, torch.float32)
    torch.testing.assert_close(averaged[:, :20], s[:, :20].mean(-1, keepdim=True).expand(3, 20))
    assert torch.equal(averaged[:, 20:], s[:, 20:])
