"""Bias-only training (BitFit: weights frozen, biases trained). A layer whose weight is
frozen while its bias trains has the bias column of its ``[W, b]`` block: ``W̄ = b`` with
``ā = 1``, so ``A = 1`` and the block is ``1 ⊗ G``; a norm layer's ``β`` alone has its
unit-wise Fisher. Each step equals the dense formula (the oracles' own ``W̄ = b``), under
KFAC and under every coarse space and combination of TwoLevelKFAC."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from oracles import (
    COARSE_SPACES,
    COMBINATIONS,
    assert_close_report,
    assert_resume_is_bit_identical,
    dense_kfac_update,
    dense_twolevel_update,
    tiny_convnet,
    tiny_mlp,
)
from test_kfac_exact import CONTRACT, MODES, conv1d_net, make_batch, one_step

LOSS = nn.CrossEntropyLoss()


def bitfit(model: nn.Module, keep: tuple[str, ...] = ()) -> nn.Module:
    """Freeze every weight but those of the layers named in ``keep``."""
    for name, param in model.named_parameters():
        if name.endswith("weight") and name.rsplit(".", 1)[0] not in keep:
            param.requires_grad_(False)
    return model


class Sequence(nn.Module):
    """``Linear`` on ``[N, T, D]`` (its locations: the expand view) → tanh → mean → head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.mix = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(x)).mean(1))


NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": (lambda: bitfit(tiny_mlp()), (4,), 2),
    "mlp_mixed": (lambda: bitfit(tiny_mlp(), keep=("2",)), (4,), 2),  # one full block
    "conv": (lambda: bitfit(tiny_convnet()), (2, 5, 5), 2),
    "conv_head": (lambda: bitfit(tiny_convnet(), keep=("3",)), (2, 5, 5), 2),  # BitFit's
    "conv1d": (lambda: bitfit(conv1d_net(), keep=("2",)), (2, 8), 3),  # a weight-only beside
    "sequence": (lambda: bitfit(Sequence()), (5, 3), 2),
}


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("mode", MODES)
def test_kfac_step_on_biases_alone_equals_the_dense_formula(
    float64: None, net: str, mode: str
) -> None:
    build, shape, classes = NETS[net]
    model = build()
    x, y = make_batch(shape, classes, 6)
    expected = dense_kfac_update(model, LOSS, x, y, damping=0.05, mode=mode)
    opt = tk.KFAC(model, damping=0.05, damping_mode=mode, **CONTRACT)
    actual = one_step(model, opt, x, y)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(actual[name], torch.zeros_like(param)), name
            assert param.grad is None, name
    assert expected.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, delta in expected.items():
        assert_close_report(actual[name], delta, rtol=1e-9, atol=1e-12, name=name)


CASES = [
    (net, space, comb)
    for net, space, comb in itertools.product(
        ("mlp_mixed", "conv_head"), COARSE_SPACES, COMBINATIONS
    )
    if space != "tselepidis" or net == "mlp_mixed"  # its dense oracle covers T = 1 only
]


@pytest.mark.parametrize(("net", "space", "combination"), CASES)
def test_two_level_step_on_biases_alone_equals_the_dense_formula(
    float64: None, net: str, space: str, combination: str
) -> None:
    """The coarse vectors live on ``b`` (Nicolaides: ones over it). The head trains whole,
    as in BitFit: a bias alone on softmax outputs has its Nicolaides vector in the null
    space of ``G`` (the outputs' gradients sum to zero), so Krylov vectors repeat it and
    ``F_c`` is singular (the library's pseudo-inverse takes it; the dense oracle's solve
    does not)."""
    build, shape, classes = NETS[net]
    model = build()
    x, y = make_batch(shape, classes, 8)
    expected = dense_twolevel_update(
        model, LOSS, x, y, damping=0.05, coarse_space=space, combination=combination
    )
    opt = tk.TwoLevelKFAC(
        model, damping=0.05, coarse_space=space, combination=combination, **CONTRACT
    )
    actual = one_step(model, opt, x, y)
    num = sum(float((actual[k] - v).norm() ** 2) for k, v in expected.items()) ** 0.5
    den = sum(float(v.norm() ** 2) for v in expected.values()) ** 0.5
    assert num / den <= (1e-8 if space == "krylov_residual" else 1e-9), f"{num / den:.2e}"


@pytest.mark.parametrize("norm_type", [nn.LayerNorm, nn.BatchNorm1d])
def test_a_norm_shift_alone_has_its_unit_wise_fisher(float64: None, norm_type: type) -> None:
    """``γ`` frozen, ``β`` trains: ``F_i = (1/N) Σ_n u_{n,i}²`` with ``u_{n,i} = Σ_t δ``
    (the ``β`` entry of the unit-wise block), damped by ``λ``: ``Δβ_i = −∇β_i/(F_i + λ)``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), norm_type(5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
    net[1].weight.requires_grad_(False)
    x, y = make_batch((4,), 3, 6)
    if norm_type is nn.BatchNorm1d:
        net[1].eval()  # per-sample gradients need the running statistics
        net[1].running_mean.uniform_(-0.3, 0.3)
    from oracles import per_sample_grads

    u = per_sample_grads(net, F.cross_entropy, x, y)["1.bias"]  # [N, D]
    grad = u.mean(0)
    expected = -grad / ((u**2).mean(0) + 0.1)
    opt = tk.KFAC(net, damping=0.1, norm_blocks=True, **CONTRACT)
    assert opt.preconditioner.factors["1"] is not None
    actual = one_step(net, opt, x, y)
    torch.testing.assert_close(actual["1.bias"], expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(actual["1.weight"], torch.zeros(5))


def test_bias_only_layers_are_listed_and_every_optimizer_steps() -> None:
    """Built with the model (the frozen weights skipped) or with only the trained biases
    (the usual BitFit call); every fine level and the two-level class take finite steps
    that leave the frozen weights alone."""
    torch.manual_seed(0)
    x, y = make_batch((2, 5, 5), 2, 8)
    for cls, params in itertools.product(
        (tk.KFAC, tk.EKFAC, tk.KPSVD, tk.KFACCorrected, tk.TwoLevelKFAC), ("model", "biases")
    ):
        model = bitfit(tiny_convnet())
        held = [p for p in model.parameters() if p.requires_grad] if params == "biases" else None
        opt = cls(model, params=held, lr=0.1, cov_interval=1, inv_interval=1)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "weight" in n}
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        assert losses[-1] < losses[0], (cls.__name__, params, losses)


def test_describe_blocks_names_the_bias_alone() -> None:
    model = bitfit(tiny_mlp(), keep=("2",))
    text = tk.KFAC(model).describe_blocks()
    assert "(bias alone)" in text.splitlines()[0] and "0.bias" in text.splitlines()[0]
    assert "bias alone" not in "".join(line for line in text.splitlines() if "2." in line)


def test_a_grouped_convolution_bias_alone_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(36, 2))
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"layer '0': its weight is frozen .* no bias-only form"):
        tk.KFAC(model)
    rest = [p for n, p in model.named_parameters() if not n.startswith("0.")]
    tk.KFAC(model, params=rest)  # the way out the message names


@pytest.mark.parametrize("change", ["freeze_weight", "unfreeze_weight"])
def test_changing_which_part_trains_after_the_first_estimate_is_refused(change: str) -> None:
    """The block's shape changes (``[W, b]`` ↔ ``b``): a new optimizer is needed."""
    model = tiny_mlp() if change == "freeze_weight" else bitfit(tiny_mlp())
    opt = tk.KFAC(model, params=model.parameters(), cov_interval=1, inv_interval=1)
    x, y = make_batch((4,), 2, 4)
    one_step(model, opt, x, y)
    model[0].weight.requires_grad_(change == "unfreeze_weight")
    with pytest.raises(
        ValueError,
        match=r"layer '0': its block \[W, b\] changed shape.*bias or weight was frozen or unfrozen",
    ):
        one_step(model, opt, x, y)


def test_a_layer_frozen_between_refreshes_leaves_the_coarse_term_until_the_refresh() -> None:
    """A layer the coarse level spans, frozen whole between two refreshes: its block is no
    longer the one the coarse vectors were built for, so the steps until the next refresh
    take the fine level's direction (a warning names the layer), not a shape error in a
    product (``tests/optim/test_frozen_whole.py`` checks those steps)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = tk.TwoLevelKFAC(model, cov_interval=3, inv_interval=3)
    x, y = make_batch((4,), 2, 8)
    one_step(model, opt, x, y)
    model[2].requires_grad_(False)
    with pytest.warns(RuntimeWarning, match=r"layer\(s\) \['2'\] were frozen whole"):
        one_step(model, opt, x, y)


@pytest.mark.parametrize("cls", [tk.KFAC, tk.TwoLevelKFAC])
def test_resume_on_biases_alone_is_bit_identical(cls: type) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return bitfit(tiny_convnet())

    x, y = make_batch((2, 5, 5), 2, 8)
    assert_resume_is_bit_identical(
        build,
        lambda m: cls(m, lr=0.1, cov_interval=2, inv_interval=2),
        lambda m: F.cross_entropy(m(x), y),
    )


def test_the_analysis_refuses_a_bias_alone() -> None:
    from twolevel_kfac.analysis.coordinates import analysis_layers

    with pytest.raises(ValueError, match=r"layers \['0'\] train their bias alone"):
        analysis_layers(bitfit(tiny_mlp(), keep=("2",)))


# ------------------------------------------------------------------ the setups around BitFit
def test_lr_squared_kl_clip_reads_the_bias_group() -> None:
    """``kl_clip_form="lr_squared"`` takes each layer's lr from the group of its block's
    parameter: the bias, when only it trains (the weights' group does not count)."""
    x, y = make_batch((4,), 2, 8)
    scales = []
    for weight_lr in (None, 1.0, 100.0):
        torch.manual_seed(0)
        model = bitfit(tiny_mlp())
        biases = [p for p in model.parameters() if p.requires_grad]
        weights = [p for p in model.parameters() if not p.requires_grad]
        params: list = (
            biases
            if weight_lr is None
            else [{"params": weights, "lr": weight_lr}, {"params": biases, "lr": 0.1}]
        )
        opt = tk.KFAC(model, params=params, lr=0.1, kl_clip=1e-4, kl_clip_form="lr_squared")
        one_step(model, opt, x, y)
        scales.append(opt.last_stats["kl_scale"])
    assert scales[0] < 1.0 and scales[0] == scales[1] == scales[2]


def test_a_functional_use_of_a_trained_bias_alone_is_refused() -> None:
    """A second, functional use of the bias (its block would not see it) is refused, as it
    is for a weight."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.a(x))
            return self.head(F.linear(h, self.a.weight, self.a.bias))

    model = bitfit(Twice(), keep=("head",))
    opt = tk.KFAC(model)
    x, y = make_batch((3,), 2, 4)
    with pytest.raises(ValueError, match=r"layer 'a': its bias is read 2 times .* ran 1"):
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_functional_calls_with_swapped_biases_feed_the_optimizer_nothing() -> None:
    """``functional_call`` with other biases (a SAM-style probe) is no training forward:
    the steps equal those of a run without it, with no warning."""
    from torch.func import functional_call

    x, y = make_batch((4,), 2, 6)
    results = []
    for probe in (False, True):
        torch.manual_seed(0)
        model = bitfit(tiny_mlp())
        opt = tk.KFAC(model, cov_interval=1)
        for _ in range(2):
            if probe:
                swapped = {k: v.detach() + 0.1 for k, v in model.named_parameters() if "bias" in k}
                functional_call(model, swapped, (x,))
            one_step(model, opt, x, y)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


class SharedWeight(nn.Module):
    """Two Linears sharing one frozen weight, then a head."""

    def __init__(self, second_bias_trains: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.b.weight = self.a.weight
        self.a.weight.requires_grad_(False)
        self.b.bias.requires_grad_(second_bias_trains)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("second_bias_trains", [False, True])
def test_a_frozen_shared_weight_ties_nothing(float64: None, second_bias_trains: bool) -> None:
    """Each trained bias is its own block, with the statistics of its own module's calls:
    the step equals the dense formula, built with the model or with the trained params."""
    x, y = make_batch((3,), 2, 6)
    for params in ("model", "trained"):
        model = SharedWeight(second_bias_trains)
        expected = dense_kfac_update(model, LOSS, x, y, damping=0.05)
        held = [p for p in model.parameters() if p.requires_grad] if params == "trained" else None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = tk.KFAC(model, params=held, damping=0.05, **CONTRACT)
            actual = one_step(model, opt, x, y)
        trained = {"a", "head"} | ({"b"} if second_bias_trains else set())
        assert set(opt.preconditioner.layers) == trained, opt.preconditioner.layers
        for name, delta in expected.items():
            assert_close_report(actual[name], delta, rtol=1e-9, atol=1e-12, name=name)


def test_a_head_tied_to_a_frozen_embedding_trains_its_bias() -> None:
    """A language model's head tied to its frozen token table, its bias trained: the bias's
    own block, whichever way the params are passed, with no warning."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 7)
            self.head.weight = self.emb.weight
            self.emb.weight.requires_grad_(False)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.head(torch.tanh(self.emb(tokens)).mean(1))

    tokens, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 7, (6,))
    results = []
    for params in ("model", "trained"):
        model = Tied()
        held = list(model.parameters()) if params == "model" else [model.head.bias]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = tk.KFAC(model, params=held, cov_interval=1)
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(model(tokens), y).backward()
                opt.step()
        assert "head" in opt.preconditioner.layers
        assert opt.preconditioner.factors["head"].factor_shapes() == ((1, 1), (7, 7))
        results.append(model.head.bias.detach().clone())
    assert torch.equal(results[0], results[1])


def test_add_param_group_with_a_bias_alone_warns() -> None:
    model = bitfit(tiny_mlp(), keep=("2",))
    opt = tk.KFAC(model, params=[*model[2].parameters()])
    with pytest.warns(UserWarning, match=r"layer\(s\) \['0'\] added with add_param_group"):
        opt.add_param_group({"params": [model[0].bias]})


def test_a_grouped_bias_alone_is_refused_at_construction_with_every_parameter() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(36, 2))
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"layer '0': its weight is frozen .* no bias-only form"):
        tk.KFAC(model, params=model.parameters())


def test_modules_tied_through_a_frozen_weight_whose_biases_unfreeze_are_refused() -> None:
    """Tied (one block) when everything was frozen at construction; once their separate
    biases train alone they are two blocks, which the capture's tie cannot give."""
    model = SharedWeight(second_bias_trains=False)
    model.a.bias.requires_grad_(False)
    opt = tk.KFAC(model, params=model.parameters(), cov_interval=1)
    model.a.bias.requires_grad_(True)
    model.b.bias.requires_grad_(True)
    x, y = make_batch((3,), 2, 6)
    with pytest.raises(ValueError, match=r"layer 'a': its modules were tied through their"):
        one_step(model, opt, x, y)


def test_the_lr_squared_clip_names_a_block_outside_the_groups() -> None:
    """BitFit built with the trained biases, then a weight unfrozen: its block is ``[W,
    b]`` again, whose weight no group holds: refused by name, not a ``KeyError``."""
    model = bitfit(tiny_mlp(), keep=("2",))
    held = [p for p in model.parameters() if p.requires_grad]
    opt = tk.KFAC(model, params=held, cov_interval=1, kl_clip_form="lr_squared")
    x, y = make_batch((4,), 2, 4)
    one_step(model, opt, x, y)
    model[0].weight.requires_grad_(True)
    with pytest.raises(
        ValueError, match=r"layer '0': (no parameter|its block \[W, b\] changed shape)"
    ):
        one_step(model, opt, x, y)


def test_a_frozen_bias_passed_without_its_weight_is_warned_about() -> None:
    model = tiny_mlp()
    model[0].requires_grad_(False)
    with pytest.warns(UserWarning, match=r"layer '0': its bias is in the optimizer's params"):
        tk.KFAC(model, params=[model[0].bias, *model[2].parameters()])


def test_a_rebuilt_basis_refuses_other_options_on_load() -> None:
    """A Krylov-Nicolaides basis is rebuilt from the saved fine level: under another
    damping mode it would not be the one ``F_c`` was formed with."""
    x, y = make_batch((4,), 2, 8)
    model = tiny_mlp()
    opt = tk.TwoLevelKFAC(model, coarse_space="krylov_nicolaides", cov_interval=3)
    one_step(model, opt, x, y)
    state = opt.state_dict()
    assert state["preconditioner"]["coarse"]["basis_rebuilt"] is True
    other = tk.TwoLevelKFAC(
        model, coarse_space="krylov_nicolaides", cov_interval=3, damping_mode="eigen_sum"
    )
    with pytest.raises(ValueError, match=r"rebuilds its coarse basis on load.*'eigen_sum'"):
        other.load_state_dict(state)


def test_unchanged_blocks_are_not_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-step block checks run for a layer only when its weight, bias, their
    ``requires_grad`` or its factors' shapes changed since its last check; freezing a bias
    afterwards is still refused (checked again, not remembered as fine)."""
    from twolevel_kfac.curvature import block_checks

    seen: list[str] = []
    original = block_checks.check_bias_only

    def counted(name: str, module: nn.Module) -> None:
        seen.append(name)
        original(name, module)

    monkeypatch.setattr(block_checks, "check_bias_only", counted)
    model = tiny_mlp()
    opt = tk.KFAC(model, params=model.parameters(), cov_interval=2, inv_interval=2)
    x, y = make_batch((4,), 2, 4)
    for _ in range(2):  # the second step sees the factors estimated by the first
        one_step(model, opt, x, y)
    first = len(seen)
    assert first > 0
    for _ in range(3):
        one_step(model, opt, x, y)
    assert len(seen) == first  # nothing changed: no check ran
    model[0].bias.requires_grad_(False)
    with pytest.raises(
        ValueError,
        match=r"layer '0': its block \[W, b\] changed shape.*bias or weight was frozen or unfrozen",
    ):
        one_step(model, opt, x, y)
    assert seen[first:] == ["0"]
