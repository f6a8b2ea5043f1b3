"""``nn.Embedding``: the Kronecker block of a table ``E [V, D]`` whose rows are indexed by the
tokens: ``δ = e_x`` (one-hot), ``ā = B ∂L/∂E[x]``, so ``G`` is the diagonal of the token
frequencies and ``A`` the second moment of the embedding's output gradients. One contract
step equals the damped dense formula ``Δ = −(T · kron(G + λI, A + λI))⁻¹ vec(∇E)``."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import (
    build_dense_problem,
    coarse_basis,
    dense_kfac_matrix,
    position_factors,
    tselepidis_subblock_matrix,
    twolevel_direction,
)
from test_kfac_exact import CONTRACT as KFAC_CONTRACT
from twolevel_kfac.curvature import layer_types
from twolevel_kfac.curvature.kronecker import KroneckerFactors
from twolevel_kfac.optim.construction import dense_tables

N, T, V, D, C = 4, 5, 7, 3, 4
DAMPING = 0.1
EXACT = KFAC_CONTRACT


class TokenNet(nn.Module):
    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


def tokens_and_targets(pad: int | None = None) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (N, T), generator=gen)
    if pad is not None:
        tokens[0, 3:] = pad
    return tokens, torch.randint(0, C, (N, T), generator=gen)


def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / len(y)


def embedding_statistics(net: TokenNet, tokens: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``ā = B ∂L/∂E[x]`` and ``δ = e_x``, ``[N, T, ·]``, from a private hook; ``δ = 0`` at
    a ``padding_idx`` token (torch gives its row no gradient)."""
    store: dict[str, Tensor] = {}
    handle = net.emb.register_forward_hook(lambda _m, _i, out: store.update(out=out))
    loss = loss_fn(net(tokens), y)
    handle.remove()
    (grad,) = torch.autograd.grad(loss, store["out"])
    delta = F.one_hot(tokens, V).to(grad.dtype)
    if net.emb.padding_idx is not None:
        delta[..., net.emb.padding_idx] = 0.0
    return len(tokens) * grad, delta


@pytest.mark.parametrize("dense", [False, True], ids=["frequencies", "dense"])
@pytest.mark.parametrize("pad", [None, 2])
def test_embedding_step_equals_the_dense_formula(
    float64: None, pad: int | None, dense: bool
) -> None:
    """With ``padding_idx`` the padding row has no gradient and takes no step, and the
    padding positions are left out of ``A``, ``G`` and ``T`` (since 2026-12-09: they give
    the table no gradient). The token factor kept as the vector of frequencies (the
    default of an untied table) or as the dense ``G``
    (:func:`~twolevel_kfac.optim.construction.dense_tables`)."""
    net = TokenNet(padding_idx=pad)
    tokens, y = tokens_and_targets(pad)
    a, g = embedding_statistics(net, tokens, y)
    with dense_tables() if dense else contextlib.nullcontext():
        opt = tk.KFAC(net, damping=DAMPING, **EXACT)
    assert list(opt.preconditioner.layers) == ["emb", "mix", "head"]
    before = net.emb.weight.detach().clone()
    loss_fn(net(tokens), y).backward()
    grad = net.emb.weight.grad.clone()
    opt.step()
    A, G, locations = position_factors(a, g)  # (the padding positions, δ = 0: left out)
    counts = torch.bincount(tokens.flatten(), minlength=V)
    if pad is not None:
        counts[pad] = 0
    torch.testing.assert_close(G, torch.diag(counts / counts.sum()).double())
    block = dense_kfac_matrix(A, G, DAMPING) * locations
    expected = before - torch.linalg.solve(block, grad.reshape(-1)).view_as(grad)
    torch.testing.assert_close(net.emb.weight.detach(), expected, rtol=1e-10, atol=1e-12)
    factors = opt.preconditioner.factors["emb"]
    kept_g = factors.G if dense else torch.diag(factors.frequencies)
    torch.testing.assert_close(kept_g, G, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(factors.A if dense else factors.a_factor, A, rtol=1e-12, atol=1e-15)
    if pad is not None:
        assert torch.equal(net.emb.weight[pad], before[pad])


PADDED = [
    ("nicolaides", "additive"),
    ("nicolaides", "adef1"),
    ("residual", "adef2"),
    ("krylov_nicolaides", "balanced"),
    ("krylov_residual", "adef1"),
    ("tselepidis", "balanced"),
    ("spectral", "additive"),
    ("spectral", "adef2"),
]


@pytest.mark.parametrize("form", ["dense", "frequencies", "large"])
@pytest.mark.parametrize(("space", "combination"), PADDED)
def test_two_level_leaves_the_padding_row_and_equals_the_reduced_formula(
    float64: None, space: str, combination: str, form: str
) -> None:
    """The padding row of an untied table never gets a gradient: it is outside the
    parameter space, and the coarse vectors leave it out. One step equals the dense
    two-level formula on the other coordinates (dense and diagonal frequency factor)."""
    pad = 2
    net = TokenNet(padding_idx=pad)
    tokens, y = tokens_and_targets(pad)
    prob = build_dense_problem(net, loss_fn, tokens, y, DAMPING)
    assert prob.names[0] == "emb"
    A, G, locations = position_factors(*prob.stats[0])  # (the table's padding left out)
    full = prob.kfac_inv.clone()
    full[: V * D, : V * D] = torch.linalg.inv(dense_kfac_matrix(A, G, DAMPING) * locations)
    prob = dataclasses.replace(prob, kfac_inv=full)  # (the residual bases apply it too)
    keep = torch.tensor([i for i in range(len(prob.grad)) if not pad * D <= i < (pad + 1) * D])
    sizes = [prob.sizes[0] - D, *prob.sizes[1:]]
    g, fisher = prob.grad[keep], prob.fisher_damped[keep][:, keep]
    kfac_inv = prob.kfac_inv[keep][:, keep]  # the table's block is row-wise (G diagonal)
    R0 = coarse_basis(prob, space)
    if space == "spectral":  # the table's vector: among the seen tokens (not the padding)
        frequencies, (values, vectors) = torch.diagonal(G), torch.linalg.eigh(A)
        seen = torch.nonzero(frequencies > 0).flatten()
        block = torch.zeros(V, D, dtype=R0.dtype)
        block[seen[frequencies[seen].argmin()]] = vectors[:, values.argmin()]
        R0[0, : V * D] = block.reshape(-1)
    R0 = R0[:, keep]
    coarse = None
    if space == "tselepidis":
        layers = [[stats] for stats in prob.stats]
        coarse = tselepidis_subblock_matrix(layers, sizes, DAMPING)
    d = twolevel_direction(g, kfac_inv, fisher, R0, combination, coarse=coarse)

    def flat() -> Tensor:
        parts = [net.emb.weight.reshape(-1)]
        for layer in (net.mix, net.head):
            parts.append(torch.cat([layer.weight, layer.bias[:, None]], 1).reshape(-1))
        return torch.cat(parts).detach().clone()

    saved = layer_types.EMBEDDING_MAX_ROWS
    layer_types.EMBEDDING_MAX_ROWS = 4 if form == "large" else saved  # (the table: V rows)
    try:
        before = flat()
        with dense_tables() if form == "dense" else contextlib.nullcontext():
            opt = tk.TwoLevelKFAC(
                net, damping=DAMPING, coarse_space=space, combination=combination, **EXACT
            )
        assert isinstance(opt.preconditioner.factors["emb"], KroneckerFactors) == (form == "dense")
        loss_fn(net(tokens), y).backward()
        opt.step()
    finally:
        layer_types.EMBEDDING_MAX_ROWS = saved
    after = flat()
    assert torch.equal(net.emb.weight[pad].detach(), before[pad * D : (pad + 1) * D])
    error = float(((after - before)[keep] + d).norm() / d.norm())
    assert error <= (1e-8 if space == "krylov_residual" else 1e-9), f"{error:.2e}"


class SharedTables(nn.Module):
    """A source and a target embedding sharing one table (seq2seq), both padding with 2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.source = nn.Embedding(V, D, padding_idx=2)
        self.target = nn.Embedding(V, D, padding_idx=2)
        self.target.weight = self.source.weight
        self.head = nn.Linear(D, C)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.source(tokens) + self.target(tokens.flip(1))))


def test_a_tied_head_trains_the_padding_row_shared_tables_do_not() -> None:
    """Tied to a head, the padding row gets the head's gradient: a coordinate of the coarse
    space like every other row, and it moves. Two embeddings sharing a table and its
    padding row leave it fixed."""
    tokens, y = tokens_and_targets(2)
    net = nn.Sequential(nn.Embedding(V, D, padding_idx=2), nn.Tanh(), nn.Linear(D, V, bias=False))
    net[2].weight = net[0].weight
    opt = tk.TwoLevelKFAC(net, lr=0.1, class_dim=-1, cov_interval=1, inv_interval=1)
    assert opt.preconditioner.fixed_rows == {}
    before = net[0].weight[2].detach().clone()
    F.cross_entropy(net(tokens).flatten(0, 1), tokens.flatten()).backward()
    opt.step()
    assert not torch.equal(net[0].weight[2], before)
    assert tk.TwoLevelKFAC(TokenNet(padding_idx=2)).preconditioner.fixed_rows == {"emb": [2]}
    shared = SharedTables()
    opt = tk.TwoLevelKFAC(shared, lr=0.1, class_dim=-1, cov_interval=1, inv_interval=1)
    assert opt.preconditioner.fixed_rows == {"source": [2]}
    before = shared.source.weight[2].detach().clone()
    loss_fn(shared(tokens), y).backward()
    opt.step()
    assert torch.equal(shared.source.weight[2], before)


def test_the_loss_scale_of_a_grad_scaler_leaves_the_embedding_block(float64: None) -> None:
    """The empirical statistics of a scaled loss, unscaled: an embedding's ``ā`` (its
    output gradients) carry the scale, not its one-hot ``δ``."""
    factors = []
    for scale in (1.0, 1024.0):
        net = TokenNet()
        tokens, y = tokens_and_targets()
        pre = tk.KFACPreconditioner(net, fisher="empirical", cov_interval=1)
        (scale * loss_fn(net(tokens), y)).backward()
        pre.step(loss_scale=scale)
        factors.append(pre.factors["emb"])
    torch.testing.assert_close(factors[1].A, factors[0].A, rtol=1e-12, atol=0)
    torch.testing.assert_close(factors[1].G, factors[0].G, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"sparse": True}, "sparse"),
        ({"max_norm": 1.0}, "max_norm"),
        ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
    ],
)
def test_embeddings_without_a_block(kwargs: dict, reason: str) -> None:
    """Variants whose gradient is not ``Σ_t e δᵀ`` get the fallback step, with a warning
    naming why (tables over 4096 rows have a block: ``test_token_table``)."""
    net = TokenNet()
    net.emb = nn.Embedding(**{"num_embeddings": V, "embedding_dim": D, **kwargs})
    fallback = "sgd" if kwargs.get("sparse") else "adamw"  # AdamW takes no sparse gradients
    with pytest.warns(UserWarning, match=reason):
        opt = tk.KFAC(net, fallback=fallback)
    assert "emb" not in opt.preconditioner.layers
    step = "momentum SGD" if fallback == "sgd" else "AdamW"
    assert f"emb.weight   {step} (no block)" in opt.describe_blocks()


def test_a_language_model_with_an_embedding_block_trains() -> None:
    """MC Fisher over ``[N, T, C]`` logits and two-level KFAC over the embedding block."""
    tokens, y = tokens_and_targets()
    for cls in (tk.KFAC, tk.TwoLevelKFAC):
        model = TokenNet()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = cls(model, lr=0.1, class_dim=-1, cov_interval=2)
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss = loss_fn(model(tokens), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0], cls.__name__


class TiedLM(nn.Module):
    """A table tied to its ``Linear`` head: one block, the table's positions beside the
    head's (``ā = N ∂L/∂E[x]``, ``δ = e_x``; ``ā = h``, ``δ = N ∂L/∂logits``)."""

    def __init__(self, padding_idx: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


def test_a_table_tied_to_its_head_leaves_its_padding_positions_out(float64: None) -> None:
    """The table's padding positions give it no gradient, but their ``ā`` (the output
    gradient of the padding token's embedding, not zero where the loss covers the
    position) counted in the tied block's ``A`` and ``T`` before 2026-12-10 (8 % of a
    step in a review), where an untied table's were left out: left out now, the table's
    positions alone (a head position keeps its place, whatever its ``δ``)."""
    pad = 2
    tokens, _ = tokens_and_targets(pad)
    net = TiedLM(pad)
    store: dict[str, Tensor] = {}
    handles = [
        net.emb.register_forward_hook(lambda _m, _i, out: store.update(emb=out)),
        net.head.register_forward_hook(lambda _m, inp, out: store.update(h=inp[0], logits=out)),
    ]

    def lm_loss(logits: Tensor) -> Tensor:  # (every position counted, the padding's too)
        return F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="sum") / N

    d_emb, d_logits = torch.autograd.grad(lm_loss(net(tokens)), [store["emb"], store["logits"]])
    for handle in handles:
        handle.remove()
    a = torch.cat([N * d_emb, store["h"].detach()], dim=1)  # [N, 2T, D]
    one_hot = F.one_hot(tokens, V).double() * (tokens != pad)[..., None]
    g = torch.cat([one_hot, N * d_logits], dim=1)  # [N, 2T, V]
    assert bool((d_emb[tokens == pad] != 0).all())  # (their ā are not zero)
    A, G, locations = position_factors(a, g)  # (the table's padding positions left out)
    assert locations == 2 * T - int((tokens == pad).sum()) / N
    opt = tk.KFAC(net, damping=DAMPING, **EXACT)
    before = net.emb.weight.detach().clone()
    lm_loss(net(tokens)).backward()
    grad = net.emb.weight.grad.clone()
    opt.step()
    block = dense_kfac_matrix(A, G, DAMPING) * locations
    expected = before - torch.linalg.solve(block, grad.reshape(-1)).view_as(grad)
    torch.testing.assert_close(net.emb.weight.detach(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.preconditioner.factors["emb"].A, A, rtol=1e-12, atol=1e-15)
