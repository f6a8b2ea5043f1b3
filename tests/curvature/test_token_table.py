"""Embedding tables whose token-frequency factor is a vector
(:mod:`twolevel_kfac.curvature.tokens`): untied tables of any size, and every table over
``EMBEDDING_MAX_ROWS`` rows. The same block as the dense path of ``test_embedding`` (proven
against the dense formula there), with the factor kept as its diagonal and the statistics
as token ids: one table takes either path here (``construction.dense_tables``, or the
threshold lowered), and every fine level and coarse space steps as the dense path (EKFAC in
the table's eigenbasis ``I ⊗ Q_A``; KPSVD and KFAC-corrected keep KFAC's inverse on a large
table and the dense block on a small one)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import assert_resume_is_bit_identical
from twolevel_kfac.curvature import layer_types
from twolevel_kfac.curvature.tokens import TokenFactors, TokenStats
from twolevel_kfac.optim.construction import dense_tables

N, T, V, D, C = 6, 5, 20, 4, 3
SEQUENCE = {"class_dim": -1, "loss_reduction": "mean"}  # CrossEntropyLoss over [N, T, C]


class TokenNet(nn.Module):
    def __init__(self, vocabulary: int = V, tied: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocabulary, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, vocabulary if tied else C, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


def data(vocabulary: int = V) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocabulary - 3, (N, T), generator=gen)  # some rows unseen
    return tokens, torch.randint(0, C, (N, T), generator=gen)


def loss_fn(net: nn.Module, tokens: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(net(tokens).flatten(0, 1), y.flatten())


@pytest.fixture
def small_threshold() -> Iterator[None]:
    """Tables over 8 rows take the diagonal path while the fixture is active."""
    saved = layer_types.EMBEDDING_MAX_ROWS
    layer_types.EMBEDDING_MAX_ROWS = 8
    yield
    layer_types.EMBEDDING_MAX_ROWS = saved


def trained(optimizer: type, steps: int = 3, **kwargs: object) -> tuple[Tensor, object]:
    net = TokenNet()
    settings = {"lr": 0.1, "damping": 0.05, "cov_interval": 1, "inv_interval": 1, **SEQUENCE}
    settings |= kwargs
    opt = optimizer(net, **settings)
    tokens, y = data()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(net, tokens, y).backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return flat, opt.preconditioner.factors["emb"]


SETTINGS = [
    (tk.KFAC, {}),
    (tk.KFAC, {"damping_mode": "pi"}),
    (tk.KFAC, {"damping_mode": "eigen_sum"}),
    (tk.KFAC, {"inverse_method": "eigen", "fisher": "empirical"}),
    (tk.KFAC, {"fisher_batch": 0.5}),
    # EKFAC: S = diag(Q_Aᵀ ∇E_n² Q_A) with Q_G = I, as the dense path's eigh of diag(f)
    (tk.EKFAC, {}),
    (tk.EKFAC, {"damping_mode": "pi", "ema_decay": 0.5, "inv_interval": 2}),
    (tk.EKFAC, {"damping_mode": "eigen_sum", "fisher_batch": 0.5}),
    (tk.TwoLevelKFAC, {"fine": "ekfac", "combination": "adef2"}),
    *[
        (tk.TwoLevelKFAC, {"coarse_space": space, "combination": combination})
        for space, combination in itertools.product(
            ["nicolaides", "spectral", "residual", "krylov_residual", "tselepidis"],
            ["additive", "adef1", "adef2", "balanced"],
        )
    ],
]


@pytest.mark.parametrize(("optimizer", "kwargs"), SETTINGS)
def test_a_table_steps_as_the_dense_path(float64: None, optimizer: type, kwargs: dict) -> None:
    """Untied, a small table keeps the vector (the library's default); forced dense, the
    same table steps alike."""
    with dense_tables():
        dense, dense_factors = trained(optimizer, **kwargs)
    diagonal, factors = trained(optimizer, **kwargs)
    assert isinstance(factors, TokenFactors) and not isinstance(dense_factors, TokenFactors)
    start = torch.cat([p.detach().reshape(-1) for p in TokenNet().parameters()])
    error = float((diagonal - dense).norm() / (dense - start).norm())
    assert error < 1e-10, f"{error:.2e}"
    assert factors.frequencies is not None and factors.frequencies.shape == (V,)
    torch.testing.assert_close(torch.diag(factors.frequencies), dense_factors.G)


@pytest.mark.parametrize("optimizer", [tk.KFAC, tk.TwoLevelKFAC])
def test_a_large_table_steps_as_a_small_one(float64: None, optimizer: type) -> None:
    """Over ``EMBEDDING_MAX_ROWS`` rows the table takes the vector path whatever the
    optimizer chose for small ones (here: the dense, as KPSVD's would)."""
    small, _ = trained(optimizer)
    saved = layer_types.EMBEDDING_MAX_ROWS
    layer_types.EMBEDDING_MAX_ROWS = 8
    try:
        with dense_tables():
            large, factors = trained(optimizer)
    finally:
        layer_types.EMBEDDING_MAX_ROWS = saved
    assert isinstance(factors, TokenFactors)
    torch.testing.assert_close(large, small, rtol=1e-12, atol=1e-14)


def test_statistics_against_their_definitions(float64: None, small_threshold: None) -> None:
    """``f``, ``A``, per-sample gradients and their products against one-hot formulas."""
    tokens, _ = data()
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(N, T, D, generator=gen)
    stats = TokenStats(tokens[..., None].double(), grads, V)
    one_hot = F.one_hot(tokens, V).double()
    a, f = stats.block_factors()
    torch.testing.assert_close(a, torch.einsum("ntd,nte->de", grads, grads) / (N * T))
    torch.testing.assert_close(f, one_hot.sum((0, 1)) / (N * T))
    per_sample = torch.einsum("ntv,ntd->nvd", one_hot, grads)
    torch.testing.assert_close(stats.sample_gradients(), per_sample)
    vectors = torch.randn(3, V, D, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        stats.sample_dots(vectors), torch.einsum("nvd,kvd->nk", per_sample, vectors)
    )
    weights = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        stats.weighted_sum(weights), torch.einsum("nk,nvd->kvd", weights, per_sample)
    )
    torch.testing.assert_close(
        stats.weighted_sum(weights[:, 0]), torch.einsum("n,nvd->vd", weights[:, 0], per_sample)
    )


def test_kpsvd_and_corrected_keep_kfacs_inverse_on_a_large_table(
    float64: None, small_threshold: None
) -> None:
    """The first step's table update is KFAC's (the other layers' are their own)."""
    kfac, _ = trained(tk.KFAC, steps=1, inverse_method="eigen", kl_clip=None)
    for optimizer in (tk.KPSVD, tk.KFACCorrected):
        other, factors = trained(optimizer, steps=1, kl_clip=None)
        assert isinstance(factors, TokenFactors)
        torch.testing.assert_close(other[: V * D], kfac[: V * D], rtol=1e-12, atol=1e-14)


def test_ekfac_scalings_of_a_table_are_the_diagonal_of_its_fisher_block(
    float64: None, small_threshold: None
) -> None:
    """``S[v, j] = (1/N) Σ_n (∇E_n Q_A)²[v, j]`` from one-hot per-sample gradients."""
    _, factors = trained(tk.EKFAC, steps=1, kl_clip=None, ema_decay=0.0)
    assert isinstance(factors, TokenFactors)
    tokens, grads = data()[0], torch.randn(N, T, D, generator=torch.Generator().manual_seed(5))
    stats = TokenStats(tokens[..., None].double(), grads, V)
    basis = factors.table_eigenbasis()
    assert basis is not None
    per_sample = torch.einsum("ntv,ntd->nvd", F.one_hot(tokens, V).double(), grads)
    expected = (per_sample @ basis[2]).square().sum(0)
    torch.testing.assert_close(stats.rotated_second_moments(basis[2]), expected)


def test_a_large_table_tied_to_its_head_takes_the_fallback() -> None:
    net = TokenNet(vocabulary=5000, tied=True)
    with pytest.warns(UserWarning, match=r"share a weight, but their blocks differ"):
        opt = tk.KFAC(net, **SEQUENCE)
    assert set(opt.preconditioner.layers) == {"mix"}
    with pytest.raises(ValueError, match="blocks differ"):
        tk.KFAC(net, unsupported="error", **SEQUENCE)


def test_a_bfloat16_language_model_keeps_exact_token_ids() -> None:
    """The ids are not rounded to the model's dtype (bf16 holds integers up to 256
    exactly); a factor dtype that cannot hold them is refused, naming the fix."""
    torch.manual_seed(0)
    net = TokenNet(vocabulary=5000).to(torch.bfloat16)
    tokens = torch.arange(4900, 4900 + N * T).reshape(N, T)  # not representable in bf16
    y = torch.randint(0, C, (N, T))
    opt = tk.KFAC(net, lr=0.01, cov_interval=1, inv_interval=1, **SEQUENCE)
    loss_fn(net, tokens, y).backward()
    opt.step()
    factors = opt.preconditioner.factors["emb"]
    assert factors.frequencies is not None and factors.frequencies.dtype == torch.float32
    seen = torch.nonzero(factors.frequencies).flatten()
    assert torch.equal(seen, tokens.flatten().sort().values)
    table = nn.Embedding(5000, D)
    with pytest.raises(ValueError, match="cannot hold them exactly: pass factor_dtype"):
        TokenStats.of(table, tokens[..., None].to(torch.bfloat16), torch.zeros(N, T, D))
    huge = TokenStats(tokens[..., None].float(), torch.zeros(N, T, D), 2**24 + 1)
    with pytest.raises(ValueError, match=r"float32 cannot hold .*factor_dtype=torch.float64"):
        huge.block_factors()  # the factors' float32 would round ids above 2²⁴


def test_a_gpt2_sized_vocabulary() -> None:
    """50,257 rows: the factor is a vector, one step and a refresh take no ``V × V``."""
    net = TokenNet(vocabulary=50257)
    opt = tk.TwoLevelKFAC(net, lr=0.01, cov_interval=1, inv_interval=1, **SEQUENCE)
    tokens, y = data(50257)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(net, tokens, y).backward()
        opt.step()
    factors = opt.preconditioner.factors["emb"]
    assert isinstance(factors, TokenFactors)
    assert factors.factor_shapes() == ((D, D), (50257,))
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("optimizer", [tk.KFAC, tk.TwoLevelKFAC, tk.EKFAC])
def test_resume_is_bit_identical(small_threshold: None, optimizer: type) -> None:
    tokens, y = data()
    assert_resume_is_bit_identical(
        TokenNet,
        lambda net: optimizer(net, lr=0.05, cov_interval=2, inv_interval=2, **SEQUENCE),
        lambda net: loss_fn(net, tokens, y),
    )


def test_a_rank_without_rows_of_a_bf16_table_builds_empty_statistics() -> None:
    """Under ``torch.distributed`` a rank that saw no sample of a large table makes empty
    statistics for it (``reduce_statistics``): their token column must be float64, as
    captured ids are (a bf16 column cannot hold the ids of a 5,000-row table, and the
    rank would raise alone while the others wait in the next collective)."""
    from twolevel_kfac.distributed.factors import layer_specs

    net = TokenNet(vocabulary=5000).to(torch.bfloat16)
    pre = tk.KFAC(net, lr=0.1).preconditioner
    spec = layer_specs(pre.layers, pre.factor_dtype)["emb"]
    assert spec.exact_inputs and spec.own is not None and spec.stats_dtype == torch.bfloat16
    empty = torch.zeros(0, T, 1, dtype=torch.float64), torch.zeros(0, T, D, dtype=torch.bfloat16)
    stats = spec.own(*empty)
    assert isinstance(stats, TokenStats) and stats.table_rows == 5000
    with pytest.raises(ValueError, match="cannot hold them exactly"):
        spec.own(empty[0].to(torch.bfloat16), empty[1])
