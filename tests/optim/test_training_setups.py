"""The optimizers in the training set-ups practitioners write, each step checked against an
independent reference computation (private hooks, dense float64 KFAC blocks, torch's own
optimizers) or refused with a clear error.

The matrix: DDP bucket views, tied weights, param subsets and groups, one-output
regression, sequence logits with a Fisher subset, autocast with every optimizer class,
unused layers, attention modules.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import (
    _homogeneous_inputs,
    _locations_last,
    dense_kfac_matrix,
    kfac_factors,
    step_change,
)
from test_kfac_exact import CONTRACT
from twolevel_kfac.curvature.tokens import TokenFactors

# one KFAC step is exactly -(damped A⊗G)⁻¹ vec(∇W̄) under these settings
EXACT = CONTRACT
EVERY_STEP = {"cov_interval": 1, "inv_interval": 1}  # statistics on every step
DAMPING = 0.1


# ------------------------------------------------------------------ references
def use_statistics(
    model: nn.Module, modules: Sequence[nn.Module], loss_fn: Callable[[Tensor], Tensor], x: Tensor
) -> tuple[Tensor, Tensor]:
    """``ā`` and ``δ = B·∂L/∂s`` of every call of ``modules`` in one forward, the calls side
    by side as locations (``[N, T_total, d]``), recorded with private hooks."""
    calls: list[tuple[nn.Module, Tensor, Tensor]] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        calls.append((module, args[0].detach(), out))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        loss = loss_fn(model(x))
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(loss, [out for _, _, out in calls])
    a = torch.cat([_homogeneous_inputs(m, inp) for m, inp, _ in calls], dim=1)
    g = torch.cat(
        [_locations_last(m, gr * x.shape[0]) for (m, _, _), gr in zip(calls, grads, strict=True)],
        dim=1,
    )
    return a, g


def kfac_direction(a: Tensor, g: Tensor, grad: Tensor, damping: float = DAMPING) -> Tensor:
    """``(T · kron(G + λI, A + λI))⁻¹ vec_row(∇W̄)`` (the library's convention: factors
    averaged over samples and locations, the direction divided by ``T``), as a matrix."""
    A, G = kfac_factors(a, g)
    block = dense_kfac_matrix(A, G, damping) * a.shape[1]
    return torch.linalg.solve(block, grad.reshape(-1)).reshape(grad.shape)


def joined_grad(module: nn.Module) -> Tensor:
    weight = module.weight.grad.reshape(module.weight.shape[0], -1)
    if module.bias is None:
        return weight
    return torch.cat([weight, module.bias.grad[:, None]], dim=1)


def joined_params(module: nn.Module) -> Tensor:
    weight = module.weight.detach().reshape(module.weight.shape[0], -1)
    if module.bias is None:
        return weight.clone()
    return torch.cat([weight, module.bias.detach()[:, None]], dim=1)


def batch(n: int = 8, d: int = 4, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randint(0, classes, (n,), generator=gen)


# ------------------------------------------------------------------ DDP bucket views
def bucket_gradients(model: nn.Module, pad: int) -> Tensor:
    """Every ``.grad`` a view of one flat bucket (DDP's ``gradient_as_bucket_view``), each
    starting ``pad`` floats after the previous one ends (0: packed, misaligned views)."""
    params = [p for p in model.parameters() if p.grad is not None]
    sizes = [p.numel() + (-p.numel() % pad if pad else 0) for p in params]
    bucket = torch.zeros(sum(sizes), dtype=params[0].dtype)
    offset = 0
    for p, size in zip(params, sizes, strict=True):
        view = bucket[offset : offset + p.numel()].view_as(p)
        view.copy_(p.grad)
        p.grad = view
        offset += size
    return bucket


def test_bucket_views_give_the_step_of_ordinary_gradients_bit_for_bit() -> None:
    """One step with every ``.grad`` a view into a bucket (packed: misaligned views; padded
    to 64 bytes: aligned) equals, bit for bit, the step with ordinary ``.grad`` tensors,
    and the bucket holds the directions; a float32 GEMM writing into a misaligned view
    rounds differently, which the next steps amplified to 5e-2 (the failing fresh clone)."""
    from oracles import tiny_convnet

    torch.manual_seed(4)
    base = tiny_convnet(bias=True)
    x = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (6,), generator=torch.Generator().manual_seed(1))
    for kl_clip in (None, 1e30):
        results = {}
        for pad in (None, 0, 1, 16):
            model = copy.deepcopy(base)
            opt = tk.KFAC(model, **{**EXACT, "kl_clip": kl_clip}, damping=1e-3)
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                bucket = None if pad is None else bucket_gradients(model, pad)
                opt.step()
                if bucket is not None:
                    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                    assert torch.equal(bucket[bucket != 0], flat[flat != 0])
            results[pad] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        for pad in (0, 1, 16):
            assert torch.equal(results[pad], results[None]), (kl_clip, pad)


# ------------------------------------------------------------------ tied weights
class TiedMLP(nn.Module):
    """``head(tanh(b(tanh(a(x)))))`` with ``b`` tied to ``a`` (weight and bias)."""

    def __init__(self, bias: bool = True, tie_bias: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=bias)
        self.b = nn.Linear(4, 4, bias=bias)
        self.b.weight = self.a.weight
        if bias and tie_bias:
            self.b.bias = self.a.bias
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TiedConv(nn.Module):
    """Two ``Conv2d`` modules with one weight and bias, then a ``Linear`` head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1, stride=2)
        self.c2.weight, self.c2.bias = self.c1.weight, self.c1.bias
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


class Recurrent(nn.Module):
    """One ``Linear`` applied twice in one forward (a shared block)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.cell(torch.tanh(self.cell(x)))))


@pytest.mark.parametrize("kind", ["linear", "conv", "recurrent"])
def test_tied_weights_get_one_block_summed_over_their_uses(float64: None, kind: str) -> None:
    """Modules sharing a weight form one block whose statistics sum over every call (the
    calls are locations): the step equals ``(T·kron(G+λI, A+λI))⁻¹`` of the total gradient,
    with ``A, G`` from every call's inputs and output gradients (private hooks). An
    ``Embedding`` tied to a ``Linear`` head shares one block with it
    (:func:`check_embedding_tied_to_the_head`)."""
    check_embedding_tied_to_the_head()
    torch.manual_seed(0)
    if kind == "conv":
        model: nn.Module = TiedConv()
        x = torch.randn(5, 2, 5, 5)
        tied: list[nn.Module] = [model.c1, model.c2]
    elif kind == "linear":
        model = TiedMLP()
        x = batch(5)[0]
        tied = [model.a, model.b]
    else:
        model = Recurrent()
        x = batch(5)[0]
        tied = [model.cell]
    y = torch.randint(0, 3, (5,))

    def loss_fn(out: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    a, g = use_statistics(model, tied, loss_fn, x)
    assert a.shape[1] == (25 + 9 if kind == "conv" else 2)
    opt = tk.KFAC(model, damping=DAMPING, **EXACT)
    first = {"conv": "c1", "linear": "a", "recurrent": "cell"}[kind]
    assert list(opt.preconditioner.layers) == [first, "head"]
    before = joined_params(tied[0])
    opt.zero_grad()
    loss_fn(model(x)).backward()
    expected = before - kfac_direction(a, g, joined_grad(tied[0]))
    opt.step()
    torch.testing.assert_close(joined_params(tied[0]), expected, rtol=1e-10, atol=1e-12)


def test_tied_weights_with_separate_biases_are_refused_or_left_to_sgd() -> None:
    """A weight shared without its bias has no ``[W, b]`` block: ``unsupported='error'``
    raises naming both modules; the default warns and leaves both to the plain step."""
    model = TiedMLP(tie_bias=False)
    with pytest.raises(ValueError, match=r"modules 'a' and 'b' share a weight but not its bias"):
        tk.KFAC(model, unsupported="error")
    with pytest.warns(UserWarning, match="not its bias"):
        opt = tk.KFAC(model)
    assert list(opt.preconditioner.layers) == ["head"]


def check_embedding_tied_to_the_head() -> None:
    """An ``Embedding`` tied to the ``Linear`` head (a language model's usual tying): one
    block for the table ``[V, D]``, its two calls as locations. The head's call has
    ``ā = h``, ``δ = B ∂L/∂logits``; the embedding's, rows indexed by the tokens, has
    ``ā = B ∂L/∂E[x]`` and ``δ = e_x`` (one-hot): ``∇E = Σ_t δ_t ā_tᵀ`` over both."""
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4)
    head = nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Tanh(), head)
    tokens = torch.randint(0, 6, (7,))
    y = torch.randint(0, 6, (7,))
    store: dict[str, Tensor] = {}
    handles = [
        emb.register_forward_hook(lambda _m, _i, out: store.update(emb=out)),
        head.register_forward_hook(lambda _m, inp, out: store.update(h=inp[0], logits=out)),
    ]
    loss = F.cross_entropy(model(tokens), y)
    for handle in handles:
        handle.remove()
    d_emb, d_logits = torch.autograd.grad(loss, [store["emb"], store["logits"]])
    n = len(tokens)
    a = torch.stack([n * d_emb, store["h"].detach()], dim=1)  # [N, 2, D]
    g = torch.stack([F.one_hot(tokens, 6).double(), n * d_logits], dim=1)  # [N, 2, V]
    opt = tk.KFAC(model, damping=DAMPING, **EXACT)
    assert list(opt.preconditioner.layers) == ["0"]
    before = emb.weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(tokens), y).backward()
    expected = before - kfac_direction(a, g, emb.weight.grad)
    opt.step()
    torch.testing.assert_close(emb.weight.detach(), expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ subsets and groups
def body_and_head() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))


def test_kfac_for_the_body_adam_for_the_head(float64: None) -> None:
    """``KFAC(model, params=body)`` beside ``Adam(head)``: KFAC preconditions, KL-clips and
    steps the body alone (each body layer's dense KFAC step, ν from the body's dots only);
    the head's ``.grad`` is left as autograd wrote it and Adam's step is torch's."""
    model = body_and_head()
    twin = copy.deepcopy(model)
    body = [p for layer in (model[0], model[2]) for p in layer.parameters()]
    x, y = batch(8)
    clip = 1e-3
    settings = {**EXACT, "kl_clip": clip, "lr": 0.5}
    kfac = tk.KFAC(model, params=body, damping=DAMPING, **settings)
    adam = torch.optim.Adam(model[4].parameters(), lr=0.1)
    twin_adam = torch.optim.Adam(twin[4].parameters(), lr=0.1)
    assert list(kfac.preconditioner.layers) == ["0", "2"]

    def loss_fn(out: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    for net in (model, twin):
        net.zero_grad()
        loss_fn(net(x)).backward()
    stats = [use_statistics(twin, [twin[i]], loss_fn, x) for i in (0, 2)]
    grads = [joined_grad(twin[i]) for i in (0, 2)]
    directions = [kfac_direction(a, g, gr) for (a, g), gr in zip(stats, grads, strict=True)]
    total = sum(abs(float((d * gr).sum())) for d, gr in zip(directions, grads, strict=True))
    nu = min(1.0, math.sqrt(clip / total))
    assert nu < 1.0  # the clip binds, on the body's dots alone
    head_grad = model[4].weight.grad.clone()
    kfac.step()
    adam.step()
    twin_adam.step()
    assert torch.equal(model[4].weight.grad, head_grad)
    for i, d in zip((0, 2), directions, strict=True):
        expected = joined_params(twin[i]) - 0.5 * nu * d
        torch.testing.assert_close(joined_params(model[i]), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(model[4].weight, twin[4].weight)


def test_owning_a_weight_but_not_its_bias_is_refused() -> None:
    model = body_and_head()
    with pytest.raises(ValueError, match=r"layer '0': its weight is in the optimizer's params"):
        tk.KFAC(model, params=[model[0].weight, *model[2].parameters()])
    with pytest.raises(ValueError, match=r"layer '2': its bias is in"):
        tk.TwoLevelKFAC(model, params=[model[2].bias])


def twin_directions(
    twin: nn.Module, layers: tuple[int, ...], loss_fn: Callable[[Tensor], Tensor], x: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Each layer's ``∇W̄`` on ``x`` and its KFAC direction (the references below)."""
    twin.zero_grad()
    loss_fn(twin(x)).backward()
    stats = [use_statistics(twin, [twin[i]], loss_fn, x) for i in layers]
    grads = [joined_grad(twin[i]) for i in layers]
    return grads, [kfac_direction(a, g, gr) for (a, g), gr in zip(stats, grads, strict=True)]


def assert_lr_squared_steps(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    twin: nn.Module,
    layers: tuple[int, ...],
    rates: list[Tensor],
    clip: float,
    loss_fn: Callable[[Tensor], Tensor],
    x: Tensor,
) -> float:
    """One step of ``opt`` moves each layer's ``W̄`` by ``−η ν d`` (``rates``: each entry's
    ``η``), ``ν = min(1, √(c / Σ_i |Σ η² d ∇|))``, the directions of :func:`twin_directions`;
    returns ``ν`` (binding)."""
    grads, directions = twin_directions(twin, layers, loss_fn, x)
    total = sum(
        abs(float((r**2 * d * gr).sum())) for r, d, gr in zip(rates, directions, grads, strict=True)
    )
    nu = min(1.0, math.sqrt(clip / total))
    assert nu < 1.0
    opt.zero_grad()
    loss_fn(model(x)).backward()
    opt.step()
    for i, r, d in zip(layers, rates, directions, strict=True):
        expected = joined_params(twin[i]) - r * nu * d
        torch.testing.assert_close(joined_params(model[i]), expected, rtol=1e-10, atol=1e-12)
    return nu


@pytest.mark.parametrize("swap", [False, True])
def test_lr_squared_kl_clip_reads_each_layers_own_group_lr(float64: None, swap: bool) -> None:
    """``kl_clip_form='lr_squared'`` with two param groups: ``ν = min(1, √(c / Σ_i η_i²
    |⟨d_i, ∇_i⟩|))`` with each layer's own group lr ``η_i``, whichever group comes first."""
    model = body_and_head()
    twin = copy.deepcopy(model)
    lrs = {0: 0.5, 2: 0.05, 4: 0.05}
    groups = [
        {"params": list(model[0].parameters()), "lr": lrs[0]},
        {"params": [*model[2].parameters(), *model[4].parameters()], "lr": lrs[2]},
    ]
    clip = 1e-4
    settings = {**EXACT, "kl_clip": clip, "kl_clip_form": "lr_squared"}
    opt = tk.KFAC(model, params=groups[::-1] if swap else groups, damping=DAMPING, **settings)
    x, y = batch(8)

    def loss_fn(out: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    layers = (0, 2, 4)
    rates = [torch.full_like(joined_params(model[i]), lrs[i]) for i in layers]
    assert_lr_squared_steps(opt, model, twin, layers, rates, clip, loss_fn, x)


def test_lr_squared_kl_clip_reads_a_bias_group_of_another_rate(float64: None) -> None:
    """Biases in a group of their own rate (a no-decay group at 10× the rate): each part's
    term is ``η_p² ⟨d_p, ∇_p⟩``, summed per layer (``ν`` 0.91 where 0.45 was due in a trial
    before 2026-12-06 (evening), which read the weight's rate for the bias too); the ``W̄``
    path (other fine levels) sums the same terms from the matrix's columns."""
    from twolevel_kfac.optim.directions import clip_scale

    model = body_and_head()
    twin = copy.deepcopy(model)
    layers = (0, 2, 4)
    weights = [model[i].weight for i in layers]
    biases = [model[i].bias for i in layers]
    groups = [{"params": weights, "lr": 0.05}, {"params": biases, "lr": 0.5}]
    clip = 1e-4
    settings = {**EXACT, "kl_clip": clip, "kl_clip_form": "lr_squared"}
    opt = tk.KFAC(model, params=groups, damping=DAMPING, **settings)
    x, y = batch(8)

    def loss_fn(out: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    rates = []
    for i in layers:
        rate = torch.full_like(joined_params(model[i]), 0.05)
        rate[:, -1] = 0.5
        rates.append(rate)
    nu = assert_lr_squared_steps(opt, model, twin, layers, rates, clip, loss_fn, x)
    grads, directions = twin_directions(twin, layers, loss_fn, x)
    names, rated = [str(i) for i in layers], dict.fromkeys((str(i) for i in layers), (0.05, 0.5))
    matrices = [[(d, gr)] for d, gr in zip(directions, grads, strict=True)]
    parts = [[(d[:, :-1], gr[:, :-1]), (d[:, -1], gr[:, -1])] for ((d, gr),) in matrices]
    on_matrices = clip_scale(clip, "lr_squared", matrices, names, rated)[0]
    assert on_matrices == pytest.approx(clip_scale(clip, "lr_squared", parts, names, rated)[0])
    assert on_matrices == pytest.approx(nu, rel=1e-12)


# ------------------------------------------------------------------ likelihoods and rows
@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC])
def test_one_output_with_the_categorical_likelihood_is_refused(cls: type) -> None:
    """A regression (or single-logit) net under the default ``likelihood='categorical'``
    would get ``G = 0`` (softmax of one logit is 1): refused, naming the fix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    opt = cls(model)
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="likelihood='gaussian' for a regression"):
        model(x)
    # the likelihood that describes the output: the last layer's G = E[δ²], δ ~ N(0, 1)
    opt.preconditioner.remove_hooks()
    opt = cls(model, likelihood="gaussian", ema_decay=0.0)
    x = torch.randn(4000, 4)
    opt.zero_grad()
    (0.5 * model(x).square().sum(1).mean()).backward()
    opt.step()
    assert abs(float(opt.preconditioner.factors["2"].G) - 1.0) < 0.1


class TokenModel(nn.Module):
    """A sequence model that flattens its logits to ``[N·T, C]`` inside ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(tokens)))
        return self.head(h).reshape(-1, 7)


def test_token_logits_with_a_fisher_subset_take_the_steps_of_the_batched_model() -> None:
    """``fisher_batch < 1`` picks samples on the input's batch dimension: logits flattened
    batch-first to ``[N·T, C]`` inside ``forward`` (proved ``T`` rows per sample) sample
    the positions of the subset's samples, as the model returning ``[N, T, C]`` does
    (refused since ``G ≡ 0`` was found, and until 2026-12-06 (evening)); flattened
    time-major they are not the samples' and are refused. A layer input flattened
    batch-first takes the ``k`` rows of each sample, a copy of the argument flattened too."""
    tokens = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(0))
    moved = []
    for flat in (True, False):
        torch.manual_seed(0)
        model = TokenModel()
        if not flat:
            flat_forward = model.forward
            model.forward = lambda t, f=flat_forward: f(t).reshape(4, 6, 7)  # type: ignore[method-assign]
        opt = tk.KFAC(model, fisher_batch=0.5, class_dim=-1, lr=0.1, cov_interval=1)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(tokens).reshape(24, 7), tokens.reshape(-1)).backward()
            opt.step()
        factors = opt.preconditioner.factors.values()
        second = [f.frequencies if isinstance(f, TokenFactors) else f.G for f in factors]
        assert all(float(g.abs().sum()) > 0 for g in second)  # (a table's G: f)
        moved.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(moved[0], moved[1], rtol=1e-5, atol=1e-6)
    model = TokenModel()
    time_major = model.forward
    model.forward = lambda t: time_major(t).reshape(4, 6, 7).transpose(0, 1).reshape(24, 7)  # type: ignore[method-assign]
    kept = tk.KFAC(model, fisher_batch=0.5)  # noqa: F841 (kept: its hooks)
    with pytest.raises(RuntimeError, match=r"model output has shape \(24, 7\).*4 rows"):
        model(tokens)
    x, targets = torch.randn(4, 3, 4), torch.randint(0, 3, (12,))
    moved = []
    for flatten in (True, False):
        torch.manual_seed(1)
        head = nn.Linear(4, 3)
        net = nn.Sequential(nn.Flatten(0, 1), head) if flatten else head
        sub = tk.KFAC(net, fisher_batch=0.5, fisher="empirical", lr=0.1)
        F.cross_entropy(net(x).reshape(12, 3), targets).backward()
        sub.step()
        moved.append(head.weight.detach().clone())
    torch.testing.assert_close(moved[0], moved[1], rtol=1e-6, atol=1e-7)
    moved = []  # (the argument a transposed view, flattened by a copy: refused before
    for flatten in (True, False):  # 2026-12-11, its rows told by its values now)
        torch.manual_seed(1)
        head = nn.Linear(4, 3)
        net = nn.Sequential(nn.Flatten(0, 1), head) if flatten else head
        sub = tk.KFAC(net, fisher_batch=0.5, fisher="empirical", lr=0.1)
        out = net(x[:, :2].transpose(0, 1))
        F.cross_entropy(out.reshape(8, 3), targets[:8]).backward()
        sub.step()
        moved.append(head.weight.detach().clone())
    torch.testing.assert_close(moved[0], moved[1], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ autocast
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "kfac": lambda m: tk.KFAC(m, damping=0.3),
    "ekfac": lambda m: tk.EKFAC(m, damping=0.3),
    "kpsvd": lambda m: tk.KPSVD(m, damping=0.3),
    "kfac_corrected": lambda m: tk.KFACCorrected(m, damping=0.3),
    "twolevel_nicolaides": lambda m: tk.TwoLevelKFAC(m, damping=0.3),
    "twolevel_residual_adef2": lambda m: tk.TwoLevelKFAC(
        m, damping=0.3, coarse_space="residual", combination="adef2"
    ),
    "twolevel_ekfac_balanced": lambda m: tk.TwoLevelKFAC(
        m, damping=0.3, fine="ekfac", combination="balanced"
    ),
}


def autocast_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, autocast: str) -> None:
    """``steps`` steps; ``autocast``: ``off`` | ``forward`` (the forward and loss under
    bf16 autocast) | ``all`` (``step()`` too inside the autocast region)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 2, 5, 5, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast != "off"):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if autocast == "all":
                opt.step()
        if autocast != "all":
            opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_trains_under_bf16_autocast(name: str) -> None:
    """Under ``torch.autocast(device_type='cpu', dtype=torch.bfloat16)``: the statistics
    are kept in float32, ``step()`` inside the autocast region equals ``step()`` after it
    (bit for bit: the curvature never runs in bf16), and three steps stay within bf16's
    precision of the same steps in float32 (relative change < 5 %)."""
    runs = {}
    for mode in ("off", "forward", "all"):
        model = autocast_net()
        opt = OPTIMIZERS[name](model)
        train(model, opt, 3, mode)
        pre = opt.preconditioner  # type: ignore[attr-defined]
        assert all(f.A.dtype == torch.float32 for f in pre.factors.values())
        runs[mode] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(runs["forward"], runs["all"])
    start = torch.cat([p.detach().reshape(-1) for p in autocast_net().parameters()])
    moved = runs["off"] - start
    assert float((runs["forward"] - runs["off"]).norm() / moved.norm()) < 0.05


# ------------------------------------------------------------------ unused layers
class AuxNet(nn.Module):
    """A trunk, a main head and an auxiliary head used only when asked."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 5)
        self.main = nn.Linear(5, 3)
        self.aux = nn.Linear(5, 3)
        self.use_aux = False

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.trunk(x))
        out = self.main(h)
        return out + self.aux(h) if self.use_aux else out


class MainNet(nn.Module):
    """:class:`AuxNet` without its auxiliary head (the same initial trunk and main head)."""

    def __init__(self, aux: AuxNet) -> None:
        super().__init__()
        self.trunk, self.main = copy.deepcopy(aux.trunk), copy.deepcopy(aux.main)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(torch.tanh(self.trunk(x)))


@pytest.mark.parametrize(
    "make",
    [
        lambda m: tk.KFAC(m, momentum=0.9, damping=DAMPING, **EVERY_STEP),
        lambda m: tk.EKFAC(m, momentum=0.9, damping=DAMPING, **EVERY_STEP),
        lambda m: tk.TwoLevelKFAC(m, momentum=0.9, damping=DAMPING, **EVERY_STEP),
        lambda m: tk.TwoLevelKFAC(
            m,
            momentum=0.9,
            damping=DAMPING,
            coarse_space="residual",
            combination="adef2",
            **EVERY_STEP,
        ),
    ],
    ids=["kfac", "ekfac", "twolevel", "twolevel_adef2"],
)
def test_a_layer_unused_in_a_step_is_left_alone(
    float64: None, make: Callable[[nn.Module], torch.optim.Optimizer]
) -> None:
    """An auxiliary head unused in some steps: no error, its parameters, ``.grad`` and
    momentum are untouched in those steps, and the other layers take exactly the steps of
    the same net without the head while the head has never been used; a later use gives
    it statistics and steps."""
    model = AuxNet()
    twin = MainNet(model)
    opt, twin_opt = make(model), make(twin)
    x, y = batch(8, classes=3)
    for net, o in ((model, opt), (twin, twin_opt)):
        for _ in range(3):
            o.zero_grad()
            F.cross_entropy(net(x), y).backward()
            o.step()
    assert model.aux.weight.grad is None
    for name in ("trunk", "main"):
        assert torch.equal(getattr(model, name).weight, getattr(twin, name).weight)
    aux_before = model.aux.weight.detach().clone()
    model.use_aux = True  # one step with the head: it gets statistics and a step
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(model.aux.weight, aux_before)
    model.use_aux = False
    aux_before = model.aux.weight.detach().clone()
    buffer = opt.state[model.aux.weight]["momentum_buffer"].clone()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert model.aux.weight.grad is None
    assert torch.equal(model.aux.weight, aux_before)
    assert torch.equal(opt.state[model.aux.weight]["momentum_buffer"], buffer)
    check_gradient_without_statistics_is_an_error()


def check_gradient_without_statistics_is_an_error() -> None:
    """A weight used outside its module's forward (``F.linear(x, layer.weight)``) has a
    gradient but no statistics: refused at the forward (its graph reads the weight once,
    its module ran 0 times), or at the step when the capture is off (a clear error)."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(x, self.layer.weight, self.layer.bias)

    model = Functional()
    opt = tk.KFAC(model)
    with pytest.raises(ValueError, match=r"layer 'layer': its weight is read 1 times"):
        model(torch.randn(5, 4))
    opt.preconditioner.capture.active = False  # a step between two captures
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(5, 4)), torch.zeros(5, dtype=torch.long)).backward()
    with pytest.warns(RuntimeWarning, match=r"\['layer'\] have gradients but no curvature"):
        opt.step()  # the plain step, and the next step captures ...
    assert opt.preconditioner.capture.active
    with pytest.raises(ValueError, match=r"layer 'layer': its weight is read 1 times"):
        model(torch.randn(5, 4))  # ... where the forward refuses the functional use


# ------------------------------------------------------------------ attention
def encoder(batch_first: bool = True) -> nn.Module:
    torch.manual_seed(0)

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3, 8)
            self.block = nn.TransformerEncoderLayer(
                8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first
            )
            self.head = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.block(self.embed(x)).mean(1))

    return Classifier()


def test_attention_modules_get_their_two_blocks() -> None:
    """``nn.MultiheadAttention`` (here inside ``TransformerEncoderLayer``) calls its
    projections functionally: it gets the blocks ``in_proj`` and ``out_proj`` (exact
    steps: ``tests/curvature/test_attention.py``), without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = tk.KFAC(encoder(), unsupported="error")
    assert list(opt.preconditioner.layers) == [
        "embed",
        "block.self_attn.in_proj",
        "block.self_attn.out_proj",
        "block.linear1",
        "block.linear2",
        "head",
    ]


@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC])
def test_a_transformer_preconditions_attention(cls: type) -> None:
    """Both attention blocks' gradients are preconditioned (changed by ``step``); the
    LayerNorms take torch's SGD step on their raw gradient (checked against
    ``torch.optim.SGD`` on a copy)."""
    model = encoder()
    opt = cls(model, momentum=0.0, lr=0.1)
    norms = {n: p for n, p in model.named_parameters() if ".norm" in n}
    x = torch.randn(4, 5, 3)
    y = torch.randint(0, 2, (4,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    reference = {n: p.detach().clone().requires_grad_() for n, p in norms.items()}
    for n, p in reference.items():
        p.grad = norms[n].grad.clone()
    torch.optim.SGD(list(reference.values()), lr=0.1).step()
    attention = model.block.self_attn
    raw = [attention.in_proj_weight.grad.clone(), attention.out_proj.weight.grad.clone()]
    opt.step()
    for n, p in norms.items():
        assert torch.equal(p, reference[n]), n
    assert not torch.allclose(attention.in_proj_weight.grad, raw[0])
    assert not torch.allclose(attention.out_proj.weight.grad, raw[1])


# ------------------------------------------------------------------ GradScaler
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC])
def test_grad_scaler_steps_equal_unscaled_steps_and_drop_overflowed_batches(
    cls: type, fisher: str
) -> None:
    """``scaler.step(opt)`` under ``torch.amp.GradScaler``: the optimizer unscales the
    gradients and the empirical Fisher's output gradients (``G`` was ``S²`` too large), so
    every step equals, bit for bit, the same step without a scaler (power-of-two scales are
    exact); a step the scaler finds infinite is dropped with the statistics its forward
    captured, so the next step's factors are those of its own batch alone."""
    torch.manual_seed(0)
    base = body_and_head()
    x, y = batch(8)
    runs = []
    for scaled in (False, True):
        model = copy.deepcopy(base)
        opt = cls(model, fisher=fisher, damping=0.1, kl_clip=None)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
        for poison in (False, True, False) if scaled else (False, False):
            opt.zero_grad()
            inputs = x * float("inf") if poison else x
            scaler.scale(F.cross_entropy(model(inputs), y)).backward()
            scaler.step(opt)
            scaler.update()
        assert opt.amp_skipped_steps == int(scaled)
        factors = [(f.A, f.G) for f in opt.preconditioner.factors.values()]
        runs.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]), factors))
    assert torch.equal(runs[0][0], runs[1][0])
    for (a0, g0), (a1, g1) in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a0, a1) and torch.equal(g0, g1)


def test_grad_scaler_unscaled_before_the_step_is_refused_for_the_empirical_fisher() -> None:
    """After ``scaler.unscale_(opt)`` the scale of the captured output gradients is unknown
    to the optimizer: the empirical Fisher refuses, naming the fix; the MC Fisher (whose
    sampled gradients carry no scale) steps as without a scaler."""
    x, y = batch(8)
    for fisher in ("empirical", "mc"):
        model = body_and_head()
        opt = tk.KFAC(model, fisher=fisher)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        if fisher == "empirical":
            with pytest.raises(RuntimeError, match="without unscale_"):
                scaler.step(opt)
        else:
            scaler.step(opt)
            assert opt.preconditioner.steps == 1


# ------------------------------------------------------------------ param groups, again
def test_param_groups_given_as_generators_and_named_parameters_are_stepped() -> None:
    """Groups whose ``"params"`` are generators (``layer.parameters()``), and
    ``model.named_parameters()``, give the same steps as lists (generators were read empty
    once and the layers were never stepped)."""
    x, y = batch(8)
    runs = []
    for form in ("list", "generator", "named"):
        model = body_and_head()
        if form == "named":
            params: object = model.named_parameters()
        else:
            make = list if form == "list" else iter
            params = [
                {"params": make(model[0].parameters()), "lr": 0.2},
                {"params": make([*model[2].parameters(), *model[4].parameters()])},
            ]
        opt = tk.KFAC(model, params=params, lr=0.2)  # type: ignore[arg-type]
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert not torch.equal(
        runs[0], torch.cat([p.reshape(-1) for p in body_and_head().parameters()])
    )
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_add_param_group_with_a_layer_warns_that_it_is_not_preconditioned() -> None:
    model = body_and_head()
    opt = tk.KFAC(model, params=[*model[0].parameters(), *model[2].parameters()])
    with pytest.warns(UserWarning, match=r"layer\(s\) \['4'\] added with add_param_group"):
        opt.add_param_group({"params": list(model[4].parameters())})


# ------------------------------------------------------------------ frozen parameters
def test_a_frozen_bias_gives_the_block_of_the_weight_alone(float64: None) -> None:
    """A bias with ``requires_grad=False``: the layer's block is ``W``'s alone (``A`` of
    ``a`` without the homogeneous 1), the bias never moves; freezing or unfreezing a bias
    (or freezing the weight alone) after the block was built is refused, naming the layer."""
    model = body_and_head()
    model[2].bias.requires_grad_(False)
    twin = copy.deepcopy(model)
    x, y = batch(8)
    opt = tk.KFAC(model, damping=DAMPING, **EXACT)

    def loss_fn(out: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    twin.zero_grad()
    loss_fn(twin(x)).backward()
    a, g = use_statistics(twin, [twin[2]], loss_fn, x)
    expected = twin[2].weight.detach() - kfac_direction(a[..., :-1], g, twin[2].weight.grad)
    bias = model[2].bias.detach().clone()
    opt.zero_grad()
    loss_fn(model(x)).backward()
    opt.step()
    torch.testing.assert_close(model[2].weight.detach(), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(model[2].bias, bias) and model[2].bias.grad is None
    for change, match in (
        (
            lambda: model[0].bias.requires_grad_(False),
            r"layer '0': its block \[W, b\] changed shape.*bias or weight was",
        ),
        (
            lambda: model[4].weight.requires_grad_(False),
            r"layer '4': its block \[W, b\] changed shape.*bias or weight was",
        ),
    ):
        change()
        opt.zero_grad()
        loss_fn(model(x)).backward()
        with pytest.raises(ValueError, match=match):
            opt.step()
        model.requires_grad_(True)
        model[2].bias.requires_grad_(False)


def test_bias_only_training_steps_the_biases_alone() -> None:
    """BitFit (weights frozen, biases trained), built with the model or with only the
    trained parameters: each layer's block is its bias column (oracles:
    ``tests/optim/test_bias_only.py``), and the frozen weights never move."""
    for params in ("model", "trained"):
        model = body_and_head()
        for layer in (model[0], model[2]):
            layer.weight.requires_grad_(False)
        held = [p for p in model.parameters() if p.requires_grad] if params == "trained" else None
        opt = tk.KFAC(model, params=held, **EVERY_STEP)
        assert set(opt.preconditioner.layers) == {"0", "2", "4"}
        frozen = model[0].weight.detach().clone()
        x, y = batch(8)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert torch.equal(model[0].weight, frozen) and model[0].weight.grad is None
        assert opt.preconditioner.factors["0"].factor_shapes() == ((1, 1), (5, 5))


def test_a_layer_frozen_at_construction_is_preconditioned_once_unfrozen() -> None:
    """Progressive unfreezing: a layer frozen when the optimizer is built with every
    parameter is left alone, then preconditioned once unfrozen (its hooks in place)."""
    model = body_and_head()
    model[0].requires_grad_(False)
    opt = tk.KFAC(model, params=model.parameters(), **EVERY_STEP)
    assert "0" in opt.preconditioner.layers
    x, y = batch(8)
    before = model[0].weight.detach().clone()
    for unfreeze in (False, True):
        if unfreeze:
            model[0].requires_grad_(True)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert torch.equal(model[0].weight, before) != unfreeze
    assert opt.preconditioner.factors["0"].ready


# ------------------------------------------------------------------ forwards that are not samples
class Checkpointed(nn.Module):
    """A block run under activation checkpointing (recomputed inside the backward)."""

    def __init__(self, checkpoint: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)
        self.checkpoint = checkpoint

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpoint:
            from torch.utils.checkpoint import checkpoint

            return self.head(checkpoint(self.block, x, use_reentrant=False))
        return self.head(self.block(x))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_activation_checkpointing_gives_the_steps_of_the_plain_model(fisher: str) -> None:
    """The recomputation of a checkpointed block inside the backward is not a second call
    of its layers (it counted as more locations with δ = 0): the steps are bit-identical to
    the same model without checkpointing."""
    x, y = batch(8)
    runs = []
    for checkpoint in (False, True):
        model = Checkpointed(checkpoint)
        opt = tk.KFAC(model, fisher=fisher)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert all(f.num_locations == 1 for f in opt.preconditioner.factors.values())
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_forwards_without_a_backward_and_eval_submodules() -> None:
    """A train-mode forward with gradients on but no backward (a validation loss computed
    without ``no_grad``) adds no samples to the MC Fisher (``A`` is that of the training
    batch alone), and a submodule put in ``eval()`` (the frozen-BatchNorm recipe) still has
    its layers' statistics: its run equals the plain one bit for bit."""
    x, y = batch(8)
    x_val = batch(8, seed=5)[0]
    runs, first_a = [], []
    for variant in ("plain", "validation", "eval_submodule"):
        model = body_and_head()
        opt = tk.KFAC(model, **EVERY_STEP)
        if variant == "eval_submodule":
            model[0].eval()  # a Linear: eval() changes nothing in its forward
        for step in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if variant == "validation":
                F.cross_entropy(model(x_val), y)  # no backward: not a sample
            opt.step()
            if step == 0:
                first_a.append(opt.preconditioner.factors["0"].A.clone())
        assert opt.preconditioner.factors["0"].num_updates == 3
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(first_a[0], first_a[1])
    assert torch.equal(runs[0], runs[2])


# ------------------------------------------------------------------ layouts and lifetimes
@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=False),
        lambda: nn.Sequential(nn.LSTM(4, 8), nn.Linear(8, 3)),
    ],
    ids=["transformer", "lstm"],
)
def test_sequence_first_modules_are_refused(make: Callable[[], nn.Module]) -> None:
    """``batch_first=False`` makes every layer input ``[S, N, d]``: the sequence would be
    taken as the samples. Refused when the optimizer is built, naming the module."""
    with pytest.raises(ValueError, match=r"batch_first=False.*build it with batch_first=True"):
        tk.KFAC(make())


def test_a_dropped_optimizer_leaves_no_hooks_on_the_model() -> None:
    """An optimizer built again on the same model (a notebook cell run twice): the dropped
    one's hooks go with it, so it captures nothing and holds no memory."""
    import gc

    model = body_and_head()
    opt = tk.KFAC(model)
    opt = tk.KFAC(model)
    gc.collect()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 2 + 3  # the root's two and one per layer, of the live optimizer only
    opt.preconditioner.remove_hooks()
    del opt
    gc.collect()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_a_layer_first_used_between_refreshes_names_the_schedule() -> None:
    model = AuxNet()
    opt = tk.KFAC(model, cov_interval=3)
    x, y = batch(8, classes=3)
    for step in range(2):
        model.use_aux = step == 1
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 1:
            with pytest.warns(RuntimeWarning, match=r"\['aux'\].*cov_interval=3\)"):
                opt.step()
        else:
            opt.step()


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_model_that_is_one_layer(float64: None, fisher: str) -> None:
    """The root module is itself the layer (``nn.Linear`` as the model): its call is
    recorded before the forward closes (with the MC Fisher the root's hook ran first and
    the layer had no statistics); the empirical step equals the dense formula."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = batch(8)
    opt = tk.KFAC(model, damping=DAMPING, **{**EXACT, "fisher": fisher})

    def loss_fn(out: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    a, g = use_statistics(model, [model], loss_fn, x)
    opt.zero_grad()
    loss_fn(model(x)).backward()
    expected = joined_params(model) - kfac_direction(a, g, joined_grad(model))
    opt.step()
    assert float(opt.preconditioner.factors[""].G.abs().sum()) > 0
    if fisher == "empirical":
        torch.testing.assert_close(joined_params(model), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_weight_also_used_functionally_is_refused(fisher: str) -> None:
    """A tied autoencoder whose decoder is ``F.linear(h, encoder.weight.t())``: the
    encoder's block would precondition a gradient with a contribution it never sees.
    Refused at the first captured forward, naming the layer; a weight shared by modules
    (``b.weight = a.weight``) or an embedding lookup is not (tests above)."""

    class TiedAutoencoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(torch.tanh(self.encoder(x)), self.encoder.weight.t())

    model = TiedAutoencoder()
    opt = tk.KFAC(model, fisher=fisher, likelihood="gaussian")  # noqa: F841
    with pytest.raises(ValueError, match=r"layer 'encoder': its weight is read 2 times.*ran 1"):
        model(torch.randn(5, 6))


@pytest.mark.parametrize("head", ["linear", "matmul", "embedding"])
def test_an_embedding_read_outside_its_call_is_refused(head: str) -> None:
    """A language model's head tied to its embedding as GPT-2 writes it,
    ``F.linear(h, wte.weight)`` (or ``h @ wte.weight.T``), and the reverse, a ``Linear``
    head's weight read by ``F.embedding``: the table's block never sees the other use.
    They were taken (the embedding's own read was not counted: 2.66 of a step of 1.8 away
    from the supported tied ``nn.Linear`` head); refused now."""

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.fc = nn.Embedding(7, 4), nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)

        def forward(self, tokens: Tensor) -> Tensor:
            if head == "embedding":  # the head's weight also looked up as a table
                return self.head(torch.tanh(self.fc(F.embedding(tokens, self.head.weight))))
            h = torch.tanh(self.fc(self.wte(tokens)))
            return F.linear(h, self.wte.weight) if head == "linear" else h @ self.wte.weight.T

    model = TiedLM()
    opt = tk.KFAC(model, fisher="empirical", class_dim=-1)  # noqa: F841 (kept: its hooks)
    layer = "head" if head == "embedding" else "wte"
    with pytest.raises(ValueError, match=rf"layer '{layer}': its weight is read 2 times.*ran 1"):
        model(torch.randint(0, 7, (3, 5)))


def test_a_cache_carrying_an_earlier_forwards_graph_names_the_fix() -> None:
    """A decode step that reuses a cache built with gradients on (generation under grad
    mode) reads the weights again through the earlier forward's graph: the refusal says
    to run such forwards under ``torch.no_grad()`` or detach the cache."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = tk.KFAC(model, fisher="empirical")  # noqa: F841 (kept: its hooks)
    cache = model[0](torch.randn(4, 3))  # an earlier forward's activations, graph attached
    with pytest.raises(ValueError, match=r"under torch\.no_grad\(\) or detach the cache"):
        model(torch.randn(4, 3) + cache)


def test_a_sampler_chaining_forwards_with_gradients_on_is_told_first() -> None:
    """A diffusion sampler run on the training model with gradients on (``x = x − 0.1·
    model(x)``): the second forward reads the weights through the first's graph. The
    refusal led with tied decoders, the cause a trial's user did not have (2026-12-11); it
    names a graph carried from an earlier forward first now, with both fixes (the loop
    into ``forward``, or the sampling under ``torch.no_grad()``)."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    opt = tk.KFAC(model, fisher="empirical")  # noqa: F841 (kept: its hooks)
    x = torch.randn(4, 3)
    x = x - 0.1 * model(x)
    with pytest.raises(ValueError, match=r"times\. The forward reuses .*iterative sampling"):
        model(x)


class _Adjoint(torch.autograd.Function):
    """``x + f(x)`` with ``f``'s weights as inputs and their gradient made in ``backward``
    by running ``f`` again (an adjoint ODE solver's pattern, as torchdiffeq's)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, f: nn.Module, *params: Tensor) -> Tensor:
        ctx.f = f
        ctx.save_for_backward(x)
        with torch.no_grad():
            return x + f(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            grads = torch.autograd.grad(x + ctx.f(x), (x, *ctx.f.parameters()), grad)
        return (grads[0], None, *grads[1:])


def test_a_weight_read_by_a_custom_function_is_named_so() -> None:
    """An adjoint solver's ``autograd.Function`` takes the weights as inputs and makes their
    gradient in its backward, beside the module's calls. Refused as before, and since
    2026-12-12 the refusal names the Function and the fix (it spoke of a graph carried
    from an earlier forward, which a trial's user did not have)."""

    class Solved(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(_Adjoint.apply(x, self.f, *self.f.parameters()))

    model = Solved()
    opt = tk.KFAC(model, fisher="empirical")  # noqa: F841 (kept: its hooks)
    with pytest.raises(ValueError, match=r"'f'.*custom autograd.Function \(_Adjoint\)"):
        model(torch.randn(4, 3))


class _Queries(nn.Module):
    """DETR's learned queries: a table read whole (``lookup=False``) or looked up."""

    def __init__(self, lookup: bool) -> None:
        super().__init__()
        self.lookup, self.query, self.head = lookup, nn.Embedding(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.lookup:
            queries = self.query(torch.arange(3).expand(len(x), 3))
        else:
            queries = self.query.weight.unsqueeze(0).repeat(len(x), 1, 1)
        return self.head(queries + x[:, None]).mean(1)


def test_a_table_read_whole_is_told_to_be_looked_up() -> None:
    """DETR's ``query_embed.weight.unsqueeze(0).repeat(B, 1, 1)``: refused as before, and
    since 2026-12-12 the refusal says what it is and gives the lookup that works (it led
    with a graph carried from an earlier forward, which a trial's user did not have)."""
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    whole = _Queries(lookup=False)
    refusing = tk.KFAC(whole, fisher="empirical")  # noqa: F841 (kept: its hooks)
    with pytest.raises(ValueError, match=r"'query'.*never ran.*arange\(Q\)\.expand\(B, Q\)"):
        whole(x)
    looked_up = _Queries(lookup=True)
    with torch.no_grad():
        looked_up.load_state_dict(whole.state_dict())
    opt = tk.KFAC(looked_up, fisher="empirical")
    moved = step_change(opt, looked_up.query.weight, F.cross_entropy(looked_up(x), y))
    assert bool(moved.abs().sum() > 0)


def test_preconditioner_with_your_own_optimizer_under_grad_scaler() -> None:
    """``KFACPreconditioner`` + ``torch.optim.SGD`` under ``GradScaler``, as the README
    says: ``scaler.unscale_(sgd)``, ``precond.step(loss_scale=scaler.get_scale())``,
    ``scaler.step(sgd)``: the same steps as without a scaler, bit for bit."""
    x, y = batch(8)
    runs = []
    for scaled in (False, True):
        model = body_and_head()
        precond = tk.KFACPreconditioner(model, fisher="empirical", damping=0.1, kl_clip=None)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=scaled)
        for _ in range(2):
            sgd.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.unscale_(sgd)
            precond.step(loss_scale=scaler.get_scale() if scaled else 1.0)
            scaler.step(sgd)
            scaler.update()
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


# ------------------------------------------------------------------ second user trial
def test_copies_and_pickles_of_the_model_do_not_feed_the_optimizer() -> None:
    """``copy.deepcopy(model)`` after the optimizer was built: the copy's forwards add no
    statistics to it (its hooks are inert), so training the original beside the copy equals
    training it alone; ``torch.save(model)`` pickles; a dropped optimizer is freed at once
    (no cycle between the preconditioner and its levels)."""
    import io
    import weakref

    x, y = batch(8)
    runs = []
    for with_copy in (False, True):
        model = body_and_head()
        opt = tk.TwoLevelKFAC(model)
        copy_ = copy.deepcopy(model) if with_copy else None
        for _ in range(2):
            opt.zero_grad()
            if copy_ is not None:
                F.cross_entropy(copy_(batch(8, seed=9)[0]), y).backward()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        torch.save(model, io.BytesIO())
    assert torch.equal(runs[0], runs[1])
    model = body_and_head()
    dropped = tk.KFAC(model)
    alive = weakref.ref(dropped.preconditioner.capture)
    del dropped
    assert alive() is None
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_functional_uses_are_refused_whatever_the_output_and_whenever_they_appear() -> None:
    """The functional-use check walks every tensor of a tuple or dict output, on every
    captured forward (a use that appears later is refused then)."""

    class Tied(nn.Module):
        def __init__(self, output: str) -> None:
            super().__init__()
            self.encoder = nn.Linear(6, 3)
            self.output, self.tied = output, output != "late"

        def forward(self, x: Tensor) -> Any:
            code = torch.tanh(self.encoder(x))
            out = F.linear(code, self.encoder.weight.t()) if self.tied else code.repeat(1, 2)
            return (
                {"out": out}
                if self.output == "dict"
                else (out, code)
                if self.output == "tuple"
                else out
            )

    for output in ("tuple", "dict", "late"):
        model = Tied(output)
        opt = tk.KFAC(model, fisher="empirical")  # noqa: F841
        if output == "late":
            model(torch.randn(5, 6))  # untied: fine
            model.tied = True
        with pytest.raises(ValueError, match=r"layer 'encoder': its weight is read 2 times"):
            model(torch.randn(5, 6))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_first_argument_that_is_not_the_batch_is_refused(fisher: str) -> None:
    """``model(t, x)`` with ``t`` of one row: the empirical Fisher would scale ``δ`` by 1
    instead of the batch size, and a layer on ``t`` would not be refused as shared (under
    MC too: the MC step was 0.91 off the batch-first one before 2026-12-05). Refused,
    naming the rows; keyword inputs in either order with the batch first work."""

    class TimeConditioned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(5, 3)

        def forward(self, t: Tensor, x: Tensor) -> Tensor:
            return self.layer(x + t)

    model = TimeConditioned()
    opt = tk.KFAC(model, fisher=fisher, likelihood="gaussian")  # noqa: F841
    with pytest.raises(RuntimeError, match=r"first tensor argument has one row, but another has 8"):
        model(torch.zeros(1), torch.randn(8, 5))
    model(torch.randn(8, 5).new_zeros(8, 1), torch.randn(8, 5))  # batch first: fine


def test_two_forwards_per_step_under_the_empirical_fisher_warn() -> None:
    """Two views of a batch, loss averaged over both, ``fisher='empirical'``: each ``δ`` is
    half a per-sample gradient unless ``accumulation_steps=2``: a warning says so, and
    with the setting the factors equal those of one forward on the concatenation."""
    x, y = batch(8)
    x2 = batch(8, seed=3)[0]
    factors = []
    for mode in ("one", "two", "two_declared"):
        model = body_and_head()
        opt = tk.KFAC(
            model, fisher="empirical", accumulation_steps=2 if mode == "two_declared" else 1
        )
        opt.zero_grad()
        if mode == "one":
            F.cross_entropy(model(torch.cat([x, x2])), torch.cat([y, y])).backward()
            opt.step()
        else:
            loss = (F.cross_entropy(model(x), y) + F.cross_entropy(model(x2), y)) / 2
            loss.backward()
            if mode == "two":
                with pytest.warns(RuntimeWarning, match="accumulation_steps=k"):
                    opt.step()
            else:
                opt.step()
        factors.append(opt.preconditioner.factors["4"].G)
    torch.testing.assert_close(factors[2], factors[0], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(factors[1], factors[0])


def test_parametrized_weights_follow_unsupported() -> None:
    """A ``weight_norm`` / ``spectral_norm`` / ``orthogonal`` parametrization computes the
    weight: that layer has no KFAC block and follows ``unsupported`` (the optimizer builds;
    'error' names it) instead of crashing."""
    from torch.nn.utils.parametrizations import weight_norm

    model = body_and_head()
    weight_norm(model[2])
    with pytest.warns(UserWarning, match=r"module '2'.*parametrization"):
        opt = tk.KFAC(model)
    assert list(opt.preconditioner.layers) == ["0", "4"]
    x, y = batch(8)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(ValueError, match=r"module '2'.*parametrization"):
        tk.KFAC(model, unsupported="error")


def test_a_layer_first_used_between_captures_takes_the_plain_step_then_kfacs() -> None:
    """At the default intervals (10), a layer unfrozen on a step that captures no statistics
    takes the optimizer's plain momentum step (with one warning), the next step captures
    its statistics, and from then on it is preconditioned; a checkpoint taken between the
    two keeps the pending capture."""
    model = body_and_head()
    model[0].requires_grad_(False)
    opt = tk.KFAC(model, params=model.parameters(), lr=0.1)
    x, y = batch(8)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # step 0 captures, but layer 0 is frozen
    model[0].requires_grad_(True)
    before = model[0].weight.detach().clone()
    grad = None
    with pytest.warns(RuntimeWarning, match=r"layer\(s\) \['0'\] have gradients but no curvature"):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grad = model[0].weight.grad.detach().clone()
        opt.step()
    # the plain step: lr times the raw gradient (the momentum buffer starts with it)
    torch.testing.assert_close(model[0].weight, before - 0.1 * grad)
    assert not opt.preconditioner.factors["0"].ready and opt.preconditioner.capture.active
    saved = copy.deepcopy(opt.state_dict())
    other = tk.KFAC(model, params=model.parameters(), lr=0.1)
    other.load_state_dict(saved)
    assert other.preconditioner.capture.active  # the pending capture survives a resume
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        step()
    assert opt.preconditioner.factors["0"].ready and "0" in opt.preconditioner.active


class WithAuxiliary(nn.Module):
    """A main path and an auxiliary layer whose output is logged (detached) or feeds a
    loss of its own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.aux = nn.Linear(5, 2)
        self.aux_out: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        self.aux_out = self.aux(h)
        return self.head(h)


def test_mc_leaves_a_detached_branch_alone_and_refuses_a_loss_of_its_own() -> None:
    """``fisher="mc"`` differentiates the sampled loss of the model output: a layer whose
    output is only logged gets no gradient and is left alone; one feeding an auxiliary
    loss has a gradient but would get a zero Fisher: refused at the step, named."""
    model = WithAuxiliary()
    opt = tk.KFAC(model, cov_interval=1)
    x, y = batch(8)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert model.aux_out is not None and model.aux.weight.grad is None
        opt.step()
    assert not opt.preconditioner.factors["aux"].ready
    opt.zero_grad()
    out = model(x)
    assert model.aux_out is not None
    (F.cross_entropy(out, y) + model.aux_out.square().mean()).backward()
    with pytest.raises(RuntimeError, match=r"layer\(s\) \['aux'\], which have gradients"):
        opt.step()


def test_functional_calls_beside_the_optimizer_feed_it_nothing() -> None:
    """``torch.func.functional_call`` (per-sample gradients with ``vmap(grad(...))``, an
    evaluation with other weights) runs the model with swapped-in parameters: no crash, no
    statistics, no warning (their gradients do not reach ``.grad``: the swapped-forward
    warning of a review's DP-SGD recipe); the optimizer's steps are those of a run
    without it."""
    from torch.func import functional_call, grad, vmap

    x, y = batch(6)
    results = []
    warnings.simplefilter("error")  # (pytest restores the filters after the test)
    for with_calls in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        opt = tk.KFAC(model, cov_interval=1)
        for _ in range(2):
            if with_calls:
                params = {k: v.detach() for k, v in model.named_parameters()}

                def loss(
                    p: dict[str, Tensor], xn: Tensor, yn: Tensor, net: nn.Module = model
                ) -> Tensor:
                    return F.cross_entropy(functional_call(net, p, (xn[None],)), yn[None])

                per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
                assert per_sample["0.weight"].shape == (6, 5, 4)
                assert functional_call(model, params, (x,)).shape == (6, 3)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_a_swapped_forward_whose_gradient_is_stepped_is_warned_of() -> None:
    """First-order MAML: the query loss runs under ``functional_call`` at the fast weights
    (not captured) and its gradient reaches ``.grad``, while the support forward was
    captured: the step preconditions the query gradient with the support set's curvature
    (1.4 off in a trial), now said once. The model's own parameters passed to
    ``functional_call`` are captured as a plain forward, without a warning."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = tk.KFAC(model, cov_interval=1)
    (xs, ys), (xq, yq) = batch(6), batch(6)
    with pytest.warns(RuntimeWarning, match="functional_call with other tensors") as caught:
        for _ in range(2):
            opt.zero_grad()
            params = dict(model.named_parameters())
            inner = torch.autograd.grad(F.cross_entropy(model(xs), ys), list(params.values()))
            fast = {k: v - 0.1 * g for (k, v), g in zip(params.items(), inner, strict=True)}
            F.cross_entropy(functional_call(model, fast, (xq,)), yq).backward()
            opt.step()
    assert sum("functional_call" in str(w.message) for w in caught) == 1
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    plain = tk.KFAC(other, cov_interval=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.cross_entropy(
            functional_call(other, dict(other.named_parameters()), (xq,)), yq
        ).backward()
        plain.step()
    assert plain.preconditioner.factors["0"].A is not None


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_module_backward_hooks_under_mc_are_warned_of(fisher: str) -> None:
    """Under ``mc`` the sampled targets' gradients are taken inside ``model(x)``, and torch
    runs a layer's module backward hooks there (Opacus's per-sample hooks then fail with a
    bare ``IndexError`` in ``loss.backward()``): said once, naming the layer and
    ``fisher='empirical'``. The empirical Fisher runs them once, in the user's backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = tk.KFAC(model, fisher=fisher, cov_interval=1)
    seen: list[float] = []
    model[2].register_full_backward_hook(lambda m, gi, go: seen.append(float(go[0].norm())))
    x, y = batch(6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    said = [w for w in caught if "module backward hooks" in str(w.message)]
    assert len(said) == (1 if fisher == "mc" else 0)
    assert len(seen) == (4 if fisher == "mc" else 2)  # (the sampled gradient's calls too)
    if said:
        assert "['2']" in str(said[0].message) and "fisher='empirical'" in str(said[0].message)
    if fisher == "mc":  # a hook on a block holding layers runs in the MC pass too; the
        # root's own, which torch sets up after the forward's hooks, does not: no warning
        other = nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Linear(5, 3))
        other.register_full_backward_hook(lambda m, gi, go: None)
        kept = tk.KFAC(other, cov_interval=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            other(x)
        other[0].register_full_backward_hook(lambda m, gi, go: None)
        kept = tk.KFAC(other, cov_interval=1)  # noqa: F841
        with pytest.warns(RuntimeWarning, match=r"\['0'\] have module backward hooks"):
            other(x)


def test_half_precision_parameters_keep_float32_curvature() -> None:
    """A model in bfloat16 (no autocast): its factors and decompositions are float32 by
    default (CPU has no bf16 Cholesky), for Kronecker and norm blocks; the parameters
    stay bf16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    model = model.to(torch.bfloat16)
    opt = tk.KFAC(model, norm_blocks=True, cov_interval=1)
    x, y = batch(8)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
        opt.step()
    factors = opt.preconditioner.factors
    assert factors["0"].A is not None and factors["0"].A.dtype == torch.float32
    assert factors["1"].fisher.dtype == torch.float32  # type: ignore[attr-defined]
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


def test_a_checkpoint_of_other_layers_names_them_and_the_likely_causes() -> None:
    """A model with one more block (here: a norm given its block) refuses the state of one
    without, naming the layer and what commonly causes it, before anything changes."""
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    trained = tk.KFAC(model, lr=0.01)
    model(torch.randn(8, 4)).sum().backward()
    trained.step()
    state = trained.state_dict()
    other = tk.KFAC(model, norm_blocks=True)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"new here: \['1'\]; gone: \[\]\).*norm_blocks"):
        other.load_state_dict(state)
    assert str(other.state_dict()) == str(before)  # nothing loaded


@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC, tk.EKFAC])
def test_parameters_in_the_models_place_are_refused_by_name(cls: type) -> None:
    """torch's way (``Optimizer(params)``, what HF's ``optimizer_cls_and_kwargs`` calls)
    raised a bare ``AttributeError`` inside the constructor."""
    model = nn.Linear(2, 2)
    for given in (model.parameters(), [{"params": list(model.parameters())}]):
        with pytest.raises(TypeError, match=r"takes the model first.*params=\.\.\."):
            cls(given)


@pytest.mark.parametrize("cls", [tk.KFAC, tk.EKFAC, tk.TwoLevelKFAC])
def test_a_first_step_on_zeroed_gradients_changes_nothing(cls: type) -> None:
    """``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` creates a fresh
    optimizer's state by a step on zeroed ``.grad`` (with ``lr = 0``). That step was
    counted, the captures fell out of step (0.59 off a move of 0.62 after 6 steps), and
    two-level KFAC raised an internal error, leaving torch's ``lr = 0`` behind. Now it is
    a step before any backward: the run is a twin's, bit for bit."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        return model, cls(model, lr=0.05, fisher="empirical", cov_interval=3, inv_interval=3)

    (model, opt), (twin, twin_opt) = build(), build()
    saved = get_optimizer_state_dict(model, opt)
    assert "preconditioner" not in saved  # (torch's part only: the README says so)
    with pytest.raises(ValueError, match=r"no 'preconditioner' entry.*opt\.state_dict\(\)"):
        opt.load_state_dict(saved)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, y = torch.randn(8, 4, generator=gen).double(), torch.randint(0, 3, (8,), generator=gen)
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_training_forwards_left_in_eval_mode_are_reported() -> None:
    """A validation pass that leaves the model in ``eval()``: every later capture took
    nothing and the factors froze without a word (29 steps: 1.31 off a twin kept in train
    mode on a move of 1.0). Reported at the first capture step that took nothing; a
    validation forward beside a training one, or under ``no_grad``, is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = tk.KFAC(model, lr=0.05, fisher="empirical", cov_interval=2, inv_interval=2)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def train_step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            train_step()
            model.eval()
            with torch.no_grad():
                model(x)
            F.cross_entropy(model(x), y)  # (a validation loss with gradients, no backward)
            model.train()
    model.eval()  # (step 4 captures)
    with pytest.warns(RuntimeWarning, match=r"eval\(\) mode .* nothing was captured"):
        train_step()


def test_an_optimizer_no_longer_stepped_that_keeps_capturing_is_reported() -> None:
    """A first phase's optimizer, still referenced (by its LR scheduler), stopped at a step
    due to capture: it recorded every training forward of the second phase without a word
    (913 MiB after 300 steps of an MLP in a trial). Warned of once past ``HELD + 4·k``
    forwards; the second optimizer's accumulation of ``k = 16`` micro-batches, under its
    limit, is not."""
    from twolevel_kfac.curvature.forward_misuse import HELD

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    first = tk.KFAC(model, cov_interval=1, inv_interval=1)
    F.cross_entropy(model(x), y).backward()
    first.step()
    second = tk.KFAC(model, cov_interval=1, inv_interval=1, accumulation_steps=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(HELD // 16 + 1):
            second.zero_grad()
            for _ in range(16):
                F.cross_entropy(model(x), y).div(16).backward()
            second.step()
    said = [str(w.message) for w in caught if "captured forwards wait" in str(w.message)]
    assert len(said) == 1 and "remove_hooks()" in said[0] and "accumulation_steps=1)" in said[0]


def test_pruning_or_quantization_after_building_is_refused_by_name() -> None:
    """``prune.l1_unstructured`` mid-run raised a bare "Linear has no weight parameter";
    ``prepare_qat`` (which swaps modules and copies their hooks without ``with_kwargs``)
    raised a ``TypeError`` about ``layer_hook``'s arguments. Both now say what happened
    and the way out; after ``prune.remove`` the run goes on."""
    import torch.ao.quantization as quantization
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = tk.KFAC(model, lr=0.05, cov_interval=1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def train_step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    train_step()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(TypeError, match=r"not a parameter of its own \(pruned or parametrized"):
        train_step()
    prune.remove(model[0], "weight")
    train_step()
    model.qconfig = quantization.get_default_qat_qconfig("fbgemm")
    quantization.prepare_qat(model, inplace=True)
    with pytest.raises(RuntimeError, match=r"layer '0' was replaced by a torch\.ao\..*Build the"):
        model(x)


@pytest.mark.parametrize("cls", [tk.KFAC, tk.EKFAC, tk.TwoLevelKFAC])
def test_a_learning_rate_of_zero_is_accepted_and_moves_nothing(cls: Any) -> None:
    """``lr=0`` (a warm-up from zero; ``torch.optim.SGD`` takes it) was refused at
    construction, though a param group or a scheduler at ``lr=0`` worked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    before = [p.detach().clone() for p in model.parameters()]
    opt = cls(model, lr=0.0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_a_checkpoint_of_the_same_layers_in_another_order_says_so() -> None:
    """The same layer names registered in another order: the message listed "new here: [];
    gone: []", which told nothing; it says the order differs."""
    first = nn.Sequential()
    first.add_module("a", nn.Linear(4, 4))
    first.add_module("b", nn.Linear(4, 4))
    second = nn.Module()
    second.add_module("b", first.b)
    second.add_module("a", first.a)
    trained = tk.KFAC(first, lr=0.01)
    first(torch.randn(8, 4)).sum().backward()
    trained.step()
    other = tk.KFAC(second, lr=0.01)
    with pytest.raises(
        ValueError, match=r"\(the same layers in another order: this model registers"
    ):
        other.load_state_dict(trained.state_dict())
