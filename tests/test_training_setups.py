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

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import _homogeneous_inputs, _locations_last, dense_kfac_matrix, kfac_factors
from test_kfac_exact import CONTRACT

# one KFAC step is exactly -(damped A⊗G)⁻¹ vec(∇W̄) under these settings
EXACT = CONTRACT
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
    ``Embedding`` tied to a ``Linear`` head keeps the head's own block
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
    """An ``Embedding`` tied to the ``Linear`` head (a language model's usual tying): the
    head's block is built from the head's own calls and preconditions the total gradient
    (embedding + head), and the shared weight takes one step."""
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4)
    head = nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Tanh(), head)
    tokens = torch.randint(0, 6, (7,))
    y = torch.randint(0, 6, (7,))

    def loss_fn(out: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    a, g = use_statistics(model, [head], loss_fn, tokens)
    opt = tk.KFAC(model, damping=DAMPING, **EXACT)
    assert list(opt.preconditioner.layers) == ["2"]
    before = emb.weight.detach().clone()
    opt.zero_grad()
    loss_fn(model(tokens)).backward()
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

    twin.zero_grad()
    loss_fn(twin(x)).backward()
    layers = (0, 2, 4)
    stats = [use_statistics(twin, [twin[i]], loss_fn, x) for i in layers]
    grads = [joined_grad(twin[i]) for i in layers]
    directions = [kfac_direction(a, g, gr) for (a, g), gr in zip(stats, grads, strict=True)]
    total = sum(
        lrs[i] ** 2 * abs(float((d * gr).sum()))
        for i, d, gr in zip(layers, directions, grads, strict=True)
    )
    nu = min(1.0, math.sqrt(clip / total))
    assert nu < 1.0
    opt.zero_grad()
    loss_fn(model(x)).backward()
    opt.step()
    for i, d in zip(layers, directions, strict=True):
        expected = joined_params(twin[i]) - lrs[i] * nu * d
        torch.testing.assert_close(joined_params(model[i]), expected, rtol=1e-10, atol=1e-12)


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


def test_token_logits_with_a_fisher_subset_are_refused() -> None:
    """``fisher_batch < 1`` picks rows on the input's batch dimension; logits flattened to
    ``[N·T, C]`` would take them from the token rows (``G ≡ 0`` before): refused."""
    torch.manual_seed(0)
    model = TokenModel()
    tk.KFAC(model, fisher_batch=0.5)
    tokens = torch.randint(0, 7, (4, 6))
    with pytest.raises(RuntimeError, match=r"model output has shape \(24, 7\).*4 rows"):
        model(tokens)
    flat = nn.Sequential(nn.Flatten(0, 1), nn.Linear(4, 3))
    tk.KFAC(flat, fisher_batch=0.5, fisher="empirical")
    with pytest.raises(RuntimeError, match=r"input of layer '1' has shape \(12, 4\)"):
        flat(torch.randn(4, 3, 4))
    model = TokenModel()  # the whole batch: consistent rows, no factor is 0
    opt = tk.KFAC(model)
    opt.zero_grad()
    F.cross_entropy(model(tokens), tokens.reshape(-1)).backward()
    opt.step()
    assert all(float(f.G.abs().sum()) > 0 for f in opt.preconditioner.factors.values())


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
        lambda m: tk.KFAC(m, momentum=0.9, damping=DAMPING),
        lambda m: tk.EKFAC(m, momentum=0.9, damping=DAMPING),
        lambda m: tk.TwoLevelKFAC(m, momentum=0.9, damping=DAMPING),
        lambda m: tk.TwoLevelKFAC(
            m, momentum=0.9, damping=DAMPING, coarse_space="residual", combination="adef2"
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
    gradient but no statistics: a clear error, as before."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(x, self.layer.weight, self.layer.bias)

    model = Functional()
    opt = tk.KFAC(model)
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(5, 4)), torch.zeros(5, dtype=torch.long)).backward()
    with pytest.raises(RuntimeError, match=r"no curvature statistics for layer\(s\) \['layer'\]"):
        opt.step()


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


def test_attention_modules_are_detected_at_construction() -> None:
    """``nn.MultiheadAttention`` (here inside ``TransformerEncoderLayer``) calls its
    projections functionally: detected when the optimizer is built, warned about (the
    default) naming the module, or refused with ``unsupported='error'``."""
    with pytest.raises(ValueError, match=r"module 'block.self_attn': MultiheadAttention"):
        tk.KFAC(encoder(), unsupported="error")
    with pytest.warns(UserWarning, match=r"'block.self_attn'.*un-preconditioned"):
        opt = tk.KFAC(encoder())
    assert list(opt.preconditioner.layers) == [
        "embed",
        "block.linear1",
        "block.linear2",
        "head",
    ]


@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC])
def test_a_transformer_trains_with_attention_on_the_plain_step(cls: type) -> None:
    """The attention parameters take torch's SGD step on their raw gradient (checked
    against ``torch.optim.SGD`` on a copy), the feed-forward layers are preconditioned."""
    model = encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(model, momentum=0.0, lr=0.1)
    attention = dict(model.block.self_attn.named_parameters())
    x = torch.randn(4, 5, 3)
    y = torch.randint(0, 2, (4,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    reference = {n: p.detach().clone().requires_grad_() for n, p in attention.items()}
    for n, p in reference.items():
        p.grad = attention[n].grad.clone()
    torch.optim.SGD(list(reference.values()), lr=0.1).step()
    ff_grad = model.block.linear1.weight.grad.clone()
    opt.step()
    for n, p in attention.items():
        assert torch.equal(p, reference[n]), n
    assert not torch.allclose(model.block.linear1.weight.grad, ff_grad)
