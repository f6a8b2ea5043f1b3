"""``nn.MultiheadAttention`` and the ``Transformer*Layer`` modules around it: two blocks per
attention (the packed ``in_proj`` and ``out_proj``), exact against a hand-written attention.

The oracle writes attention out by hand (projections, heads, scaled scores, masks, softmax)
with a shift added to every block's pre-activation, so that each sample's ``δ`` is the
gradient with respect to its shift; one step of the optimizer under the contract settings
must equal the damped block-diagonal formula ``Δ = −(T·K)⁻¹ vec(∇W̄)`` per block
(``K = (G + λI) ⊗ (A + λI)``, ``T`` the block's locations: the *expand* convention)."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import (
    COARSE_SPACES,
    COMBINATIONS,
    DenseProblem,
    coarse_basis,
    position_factors,
    twolevel_direction,
)
from test_kfac_exact import CONTRACT as KFAC_CONTRACT
from twolevel_kfac.curvature.attention import recompute_attention

CONTRACT = {**KFAC_CONTRACT, "class_dim": -1}
N, T, S, V, E, H, C = 3, 4, 5, 3, 6, 2, 4  # batch, positions, memory, inputs, width, heads, classes
DAMPING = 0.1


def position_sum_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / logits.shape[0]


def data() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, T, V, generator=gen, dtype=torch.float64)
    memory = torch.randn(N, S, V, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N, T), generator=gen)
    return x, memory, y


class AttentionNet(nn.Module):
    """``embed → attention (+ residual) → head``; cross-attention reads an embedded memory."""

    def __init__(self, cross: bool, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.cross = cross
        self.embed = nn.Linear(V, E)
        self.memory = nn.Linear(V, E)
        self.attention = nn.MultiheadAttention(E, H, bias=bias, batch_first=True)
        self.head = nn.Linear(E, C)

    def forward(self, x: Tensor, memory: Tensor, key_padding: Tensor | None = None) -> Tensor:
        h = self.embed(x)
        if self.cross:
            m = self.memory(memory)
            a, _ = self.attention(h, m, m, key_padding_mask=key_padding)
        else:
            causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
            a, _ = self.attention(h, h, h, attn_mask=causal, need_weights=False)
        return self.head(a + h)


def hand_attention(
    net: AttentionNet, h: Tensor, m: Tensor, shifts: dict[str, Tensor], key_padding: Tensor | None
) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """Attention written out; returns its output and each block's inputs per call."""
    att = net.attention
    w, b = att.in_proj_weight, att.in_proj_bias
    bias = b if b is not None else torch.zeros(3 * E, dtype=h.dtype)
    if net.cross:
        pq = h @ w.T + bias + shifts["in_q"]
        pm = m @ w.T + bias + shifts["in_m"]
        q, k, v = pq[..., :E], pm[..., E : 2 * E], pm[..., 2 * E :]
        inputs = [h, m]
        mask = torch.zeros(N, 1, 1, m.shape[1], dtype=h.dtype)
        if key_padding is not None:
            mask = mask.masked_fill(key_padding.view(N, 1, 1, -1), float("-inf"))
    else:
        p = h @ w.T + bias + shifts["in_q"]
        q, k, v = p.split(E, dim=-1)
        inputs = [h]
        mask = torch.zeros(T, T, dtype=h.dtype).masked_fill(
            torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1), float("-inf")
        )

    def heads(t: Tensor) -> Tensor:
        return t.reshape(N, -1, H, E // H).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(E // H) + mask
    context = (torch.softmax(scores, dim=-1) @ heads(v)).transpose(1, 2).reshape(N, T, E)
    out_proj = att.out_proj
    bias_o = out_proj.bias if out_proj.bias is not None else 0.0
    out = context @ out_proj.weight.T + bias_o + shifts["out"]
    return out, {"attention.in_proj": inputs, "attention.out_proj": [context]}


Block = tuple[Tensor, Tensor, str, str | None]  # ā [N, T, d_in'], δ [N, T, d_out], parameter names


def hand_blocks(
    net: AttentionNet, x: Tensor, memory: Tensor, y: Tensor, key_padding: Tensor | None = None
) -> tuple[dict[str, Block], dict[str, Tensor]]:
    """Every block's statistics (in the library's layer order) from the hand-written
    forward, and the loss gradient of every parameter."""
    zeros = {
        "embed": torch.zeros(N, T, E),
        "memory": torch.zeros(N, S, E),
        "in_q": torch.zeros(N, T, 3 * E),
        "in_m": torch.zeros(N, S, 3 * E),
        "out": torch.zeros(N, T, E),
        "head": torch.zeros(N, T, C),
    }
    shifts = {k: v.double().requires_grad_() for k, v in zeros.items()}
    h = x @ net.embed.weight.T + net.embed.bias + shifts["embed"]
    m = memory @ net.memory.weight.T + net.memory.bias + shifts["memory"]
    a, inputs = hand_attention(net, h, m, shifts, key_padding)
    z = a + h
    logits = z @ net.head.weight.T + net.head.bias + shifts["head"]
    torch.testing.assert_close(logits, net(x, memory, key_padding), rtol=1e-12, atol=1e-12)
    loss = position_sum_loss(logits, y)
    params = dict(net.named_parameters())
    names = list(shifts) + list(params)
    grads = dict(zip(names, torch.autograd.grad(loss, [*shifts.values(), *params.values()],
                                                allow_unused=True), strict=True))  # fmt: skip
    delta = {k: N * g for k in shifts if (g := grads[k]) is not None}  # samples independent
    has_bias = net.attention.in_proj_bias is not None
    in_bias = "attention.in_proj_bias" if has_bias else None
    in_deltas = [delta["in_q"], delta["in_m"]] if net.cross else [delta["in_q"]]
    out_bias = "attention.out_proj.bias" if has_bias else None
    blocks: dict[str, Block] = {
        "embed": (_homogeneous(x, True), delta["embed"], "embed.weight", "embed.bias")
    }
    if net.cross:
        blocks["memory"] = (
            _homogeneous(memory, True),
            delta["memory"],
            "memory.weight",
            "memory.bias",
        )
    blocks["attention.in_proj"] = (
        torch.cat([_homogeneous(t, has_bias) for t in inputs["attention.in_proj"]], dim=1),
        torch.cat(in_deltas, dim=1),
        "attention.in_proj_weight",
        in_bias,
    )
    blocks["attention.out_proj"] = (
        _homogeneous(inputs["attention.out_proj"][0], has_bias),
        delta["out"],
        "attention.out_proj.weight",
        out_bias,
    )
    blocks["head"] = (_homogeneous(z, True), delta["head"], "head.weight", "head.bias")
    return blocks, {k: g for k, g in grads.items() if k in params and g is not None}


def block_matrix(tensors: dict[str, Tensor], weight: str, bias: str | None) -> Tensor:
    """``W̄ = [W, b]`` of a block from parameter-shaped tensors (leading dims kept)."""
    w = tensors[weight]
    return torch.cat([w, tensors[bias].unsqueeze(-1)], -1) if bias is not None else w


def kfac_block(a: Tensor, g: Tensor) -> Tensor:
    """``T · kron(G + λI, A + λI)`` (expand: factors over the locations that reach the loss,
    :func:`oracles.position_factors`: key padding's memory positions do not)."""
    big_a, big_g, locations = position_factors(a, g)
    eye_a, eye_g = torch.eye(big_a.shape[0]), torch.eye(big_g.shape[0])
    return locations * torch.kron(big_g + DAMPING * eye_g, big_a + DAMPING * eye_a)


def oracle_update(
    net: AttentionNet, x: Tensor, memory: Tensor, y: Tensor, key_padding: Tensor | None = None
) -> dict[str, Tensor]:
    """The expected parameter change of one contract step (module doc)."""
    blocks, grads = hand_blocks(net, x, memory, y, key_padding)
    update: dict[str, Tensor] = {}
    for a, g, weight_name, bias_name in blocks.values():
        grad_bar = block_matrix(grads, weight_name, bias_name)
        direction = torch.linalg.solve(kfac_block(a, g), grad_bar.reshape(-1)).view_as(grad_bar)
        update[weight_name] = -direction[:, : grads[weight_name].shape[1]]
        if bias_name is not None:
            update[bias_name] = -direction[:, -1]
    for name, grad in grads.items():  # parameters without a block: the plain step
        update.setdefault(name, -grad)
    return update


def _homogeneous(t: Tensor, bias: bool) -> Tensor:
    return torch.cat([t, torch.ones(*t.shape[:-1], 1, dtype=t.dtype)], -1) if bias else t


def optimizer_update(
    net: AttentionNet, x: Tensor, memory: Tensor, y: Tensor, key_padding: Tensor | None = None
) -> dict[str, Tensor]:
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    opt = tk.KFAC(net, damping=DAMPING, **CONTRACT)
    opt.zero_grad()
    position_sum_loss(net(x, memory, key_padding), y).backward()
    opt.step()
    return {k: p.detach() - before[k] for k, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_step_equals_the_dense_formula(float64: None, cross: bool, bias: bool) -> None:
    """Self-attention (causal mask): ``in_proj`` is a ``Linear`` block on ``x``.
    Cross-attention (key padding): ``in_proj`` sums the query's and the memory's locations,
    each call's unused rows with ``δ = 0``."""
    x, memory, y = data()
    key_padding = None
    if cross:
        key_padding = torch.zeros(N, S, dtype=torch.bool)
        key_padding[0, 3:] = True
    net = AttentionNet(cross, bias)
    expected = oracle_update(net, x, memory, y, key_padding)
    got = optimizer_update(net, x, memory, y, key_padding)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-12, msg=name)


MASKS = {
    "none": {},
    "causal": {"is_causal": True, "need_weights": False},
    "weights per head": {"average_attn_weights": False},
}


@pytest.mark.parametrize("variant", [{}, {"add_bias_kv": True}, {"add_zero_attn": True}])
@pytest.mark.parametrize("mask", list(MASKS))
def test_recomputed_attention_is_torchs(float64: None, variant: dict, mask: str) -> None:
    """The recomputation (projections as modules, identity projections in torch's own
    attention) gives torch's output and weights."""
    torch.manual_seed(0)
    att = nn.MultiheadAttention(E, H, batch_first=True, **variant)
    x = torch.randn(N, T, E)
    kwargs = dict(MASKS[mask])
    if mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(T)
    out, weights = att(x, x, x, **kwargs)
    out2, weights2 = recompute_attention(att, (x, x, x), kwargs)
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-14)
    if weights is None:
        assert weights2 is None
    else:
        torch.testing.assert_close(weights2, weights, rtol=1e-12, atol=1e-14)


def encoder_net(norm_first: bool) -> nn.Sequential:
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(
        E, H, 8, dropout=0.0, batch_first=True, norm_first=norm_first
    )
    return nn.Sequential(nn.Linear(V, E), layer, nn.Linear(E, C))


def hand_encoder(net: nn.Sequential, x: Tensor, shifts: dict[str, Tensor]) -> tuple[Tensor, dict]:
    """``TransformerEncoderLayer`` written out (post- or pre-norm, ReLU feed-forward)."""
    embed, layer, head = net
    att = layer.self_attn
    ins: dict[str, Tensor] = {}

    def linear(name: str, module: nn.Module, t: Tensor) -> Tensor:
        ins[name] = t
        return t @ module.weight.T + module.bias + shifts[name]

    def sa(t: Tensor) -> Tensor:
        ins["1.self_attn.in_proj"] = t
        q, k, v = (
            t @ att.in_proj_weight.T + att.in_proj_bias + shifts["1.self_attn.in_proj"]
        ).split(E, -1)

        def heads(u: Tensor) -> Tensor:
            return u.reshape(N, T, H, E // H).transpose(1, 2)

        scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(E // H)
        ctx = (torch.softmax(scores, -1) @ heads(v)).transpose(1, 2).reshape(N, T, E)
        return linear("1.self_attn.out_proj", att.out_proj, ctx)

    def ff(t: Tensor) -> Tensor:
        return linear("1.linear2", layer.linear2, torch.relu(linear("1.linear1", layer.linear1, t)))

    def norm(module: nn.LayerNorm, t: Tensor) -> Tensor:
        return F.layer_norm(t, (E,), module.weight, module.bias, module.eps)

    h = linear("0", embed, x)
    if layer.norm_first:
        h = h + sa(norm(layer.norm1, h))
        h = h + ff(norm(layer.norm2, h))
    else:
        h = norm(layer.norm1, h + sa(h))
        h = norm(layer.norm2, h + ff(h))
    return linear("2", head, h), ins


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_step_equals_the_dense_formula(
    float64: None, norm_first: bool
) -> None:
    """Every ``Linear`` of the layer and both attention blocks take the damped KFAC step,
    the ``LayerNorm`` parameters the plain one (fallback ``sgd``, momentum 0)."""
    net = encoder_net(norm_first)
    x, _, y = data()
    widths = {"0": E, "1.self_attn.in_proj": 3 * E, "1.self_attn.out_proj": E,
              "1.linear1": 8, "1.linear2": E, "2": C}  # fmt: skip
    shifts = {k: torch.zeros(N, T, w).requires_grad_() for k, w in widths.items()}
    logits, ins = hand_encoder(net, x, shifts)
    torch.testing.assert_close(logits, net(x), rtol=1e-12, atol=1e-12)
    loss = position_sum_loss(logits, y)
    params = dict(net.named_parameters())
    grads_all = torch.autograd.grad(loss, [*shifts.values(), *params.values()])
    deltas = {k: N * g for k, g in zip(shifts, grads_all[: len(shifts)], strict=True)}
    grads = dict(zip(params, grads_all[len(shifts) :], strict=True))
    expected: dict[str, Tensor] = {}
    for name in widths:
        stem = "1.self_attn.in_proj_" if name == "1.self_attn.in_proj" else f"{name}."
        a = _homogeneous(ins[name], True)
        g = deltas[name]
        big_a = torch.einsum("nti,ntj->ij", a, a) / (N * T)
        big_g = torch.einsum("nti,ntj->ij", g, g) / (N * T)
        kron = torch.kron(
            big_g + DAMPING * torch.eye(len(big_g)), big_a + DAMPING * torch.eye(len(big_a))
        )
        grad_bar = torch.cat([grads[f"{stem}weight"], grads[f"{stem}bias"][:, None]], 1)
        direction = torch.linalg.solve(T * kron, grad_bar.reshape(-1)).view_as(grad_bar)
        expected[f"{stem}weight"], expected[f"{stem}bias"] = -direction[:, :-1], -direction[:, -1]
    for name, grad in grads.items():
        expected.setdefault(name, -grad)  # the LayerNorms
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    opt = tk.KFAC(net, damping=DAMPING, **CONTRACT)
    position_sum_loss(net(x), y).backward()
    opt.step()
    for name, value in expected.items():
        got = params[name].detach() - before[name]
        torch.testing.assert_close(got, value, rtol=1e-9, atol=1e-12, msg=name)


def test_decoder_layer_has_both_attentions_blocks() -> None:
    """``TransformerDecoderLayer``: self-attention and cross-attention get two blocks each;
    its training loop runs with the MC Fisher over sequence logits."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    head = nn.Linear(8, 5)
    model = nn.ModuleDict({"layer": layer, "head": head})

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
            mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
            return self.inner["head"](
                self.inner["layer"](tgt, memory, tgt_mask=mask, tgt_is_causal=True)
            )

    net = Decoder()
    opt = tk.KFAC(net, lr=0.05, class_dim=-1, cov_interval=2, fallback="adamw")
    names = set(opt.preconditioner.layers)
    for attention in ("self_attn", "multihead_attn"):
        assert {f"inner.layer.{attention}.in_proj", f"inner.layer.{attention}.out_proj"} <= names
    tgt, memory = torch.randn(4, 6, 8), torch.randn(4, 7, 8)
    y = torch.randint(0, 5, (4, 6))
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(net(tgt, memory).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    in_proj = opt.preconditioner.factors["inner.layer.multihead_attn.in_proj"]
    assert in_proj.A is not None and in_proj.A.shape == (9, 9)


def test_only_capturing_forwards_recompute_attention() -> None:
    """Between captures the attention module runs untouched (no second computation)."""
    net = AttentionNet(cross=False).float()
    x, memory, y = (t.float() if t.is_floating_point() else t for t in data())
    opt = tk.KFAC(net, class_dim=-1, cov_interval=3)
    projection = opt.preconditioner.layers["attention.in_proj"]
    calls = []
    projection.register_forward_hook(lambda *_: calls.append(opt.preconditioner.steps))
    for _ in range(6):
        opt.zero_grad()
        position_sum_loss(net(x, memory), y).backward()
        opt.step()
    assert calls == [0, 3]


def test_unsupported_attention_variants() -> None:
    """``kdim``/``vdim`` attention has no block (a warning; the plain step); an unbatched
    query in a capturing forward is refused."""
    net = nn.Sequential(nn.Linear(4, 6))
    net.attention = nn.MultiheadAttention(6, 2, kdim=3, vdim=3, batch_first=True)
    with pytest.warns(UserWarning, match="kdim/vdim"):
        opt = tk.KFAC(net)
    assert not any("attention" in name for name in opt.preconditioner.layers)
    att = nn.MultiheadAttention(6, 2, batch_first=True)
    opt = tk.KFAC(att, unsupported="error")
    with pytest.raises(ValueError, match="unbatched"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.randn(5, 6)
        att(x, x, x)


def dense_twolevel_problem(
    net: AttentionNet, x: Tensor, memory: Tensor, y: Tensor, key_padding: Tensor | None
) -> tuple[DenseProblem, dict[str, Block]]:
    """The dense problem of the attention net: KFAC blocks from the hand-written forward,
    the exact empirical Fisher from per-sample gradients (one backward per sample)."""
    blocks, grads = hand_blocks(net, x, memory, y, key_padding)
    params = dict(net.named_parameters())
    per_sample = []
    for n in range(N):
        rows = slice(n, n + 1)
        kp = None if key_padding is None else key_padding[rows]
        loss = position_sum_loss(net(x[rows], memory[rows], kp), y[rows])
        sample = dict(zip(params, torch.autograd.grad(loss, list(params.values()),
                                                      allow_unused=True), strict=True))  # fmt: skip
        per_sample.append(
            torch.cat([block_matrix(sample, w, b).reshape(-1) for _, _, w, b in blocks.values()])
        )
    vectors = torch.stack(per_sample)
    fisher = vectors.T @ vectors / N
    kfac = torch.block_diag(*[kfac_block(a, g) for a, g, _, _ in blocks.values()])
    grad = torch.cat([block_matrix(grads, w, b).reshape(-1) for _, _, w, b in blocks.values()])
    problem = DenseProblem(
        damping=DAMPING,
        names=list(blocks),
        sizes=[a.shape[-1] * g.shape[-1] for a, g, _, _ in blocks.values()],
        stats=[(a, g) for a, g, _, _ in blocks.values()],
        factors=[position_factors(a, g)[:2] for a, g, _, _ in blocks.values()],
        grad=grad,
        grads=grads,
        per_sample=vectors,
        fisher=fisher,
        fisher_damped=fisher + DAMPING * torch.eye(len(fisher)),
        kfac=kfac,
        kfac_inv=torch.linalg.inv(kfac),
    )
    return problem, blocks


@pytest.mark.parametrize(
    ("space", "combination"),
    [(s, c) for s, c in itertools.product(COARSE_SPACES, COMBINATIONS) if s != "tselepidis"],
)
def test_two_level_step_over_attention_equals_the_dense_formula(
    float64: None, space: str, combination: str
) -> None:
    """Cross-attention (the in_proj block over two inputs) under every coarse space and
    combination: ``Δ = −P g`` with ``P`` built from the exact Fisher of the batch."""
    x, memory, y = data()
    key_padding = torch.zeros(N, S, dtype=torch.bool)
    key_padding[1, 4:] = True
    net = AttentionNet(cross=True)
    problem, blocks = dense_twolevel_problem(net, x, memory, y, key_padding)
    R0 = coarse_basis(problem, space)
    d = twolevel_direction(problem.grad, problem.kfac_inv, problem.fisher_damped, R0, combination)
    offsets = [0, *itertools.accumulate(problem.sizes)]
    expected: dict[str, Tensor] = {}
    for (a, g, w, b), lo, hi in zip(blocks.values(), offsets[:-1], offsets[1:], strict=True):
        mat = -d[lo:hi].view(g.shape[-1], a.shape[-1])
        expected[w] = mat[:, : dict(net.named_parameters())[w].shape[1]]
        if b is not None:
            expected[b] = mat[:, -1]
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    opt = tk.TwoLevelKFAC(
        net, damping=DAMPING, coarse_space=space, combination=combination, **CONTRACT
    )
    position_sum_loss(net(x, memory, key_padding), y).backward()
    opt.step()
    got = torch.cat([(p.detach() - before[k]).reshape(-1) for k, p in net.named_parameters()])
    want = torch.cat([expected[k].detach().reshape(-1) for k, _ in net.named_parameters()])
    error = float((got - want).norm() / want.norm())
    assert error <= (1e-8 if space == "krylov_residual" else 1e-9), f"{error:.2e}"


class CheckpointedEncoder(nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(V, E)
        self.layer = nn.TransformerEncoderLayer(E, H, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, C)
        self.checkpointed = checkpointed

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(self.layer, h, use_reentrant=False)
        else:
            h = self.layer(h)
        return self.head(h)


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_activation_checkpointing_around_attention_takes_the_same_steps(fisher: str) -> None:
    """The recomputation inside the backward runs attention as the capturing forward did."""
    x, _, y = (t.float() if t.is_floating_point() else t for t in data())
    params = []
    for checkpointed in (False, True):
        net = CheckpointedEncoder(checkpointed)
        opt = tk.KFAC(net, fisher=fisher, class_dim=-1, cov_interval=2, inv_interval=2)
        for _ in range(4):
            opt.zero_grad()
            position_sum_loss(net(x), y).backward()
            opt.step()
        params.append([p.detach().clone() for p in net.parameters()])
    for p, q in zip(*params, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
