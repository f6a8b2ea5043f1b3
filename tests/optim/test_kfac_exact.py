"""The design contract (``../shared/design.md`` §2) for ``KFAC``: under the contract settings
one ``step()`` changes every preconditioned layer's ``[W, b]`` by exactly
``−(damped A⊗G)⁻¹ vec(∇W̄)`` (÷T for Conv2d), checked against dense torch.func oracles."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import twolevel_kfac as tk
from oracles import assert_close_report, dense_kfac_update, tiny_convnet, tiny_mlp

CONTRACT = {
    "fisher": "empirical",
    "ema_decay": 0.0,
    "cov_interval": 1,
    "inv_interval": 1,
    "kl_clip": None,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "lr": 1.0,
}
MODES = ("per_factor", "pi", "eigen_sum")


def mixed_net() -> nn.Module:
    """Conv (stride, padding, dilation) → BatchNorm (eval) → Linear without bias → Linear."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=2, dilation=2),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(27, 4, bias=False),
        nn.Tanh(),
        nn.Linear(4, 3),
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    return model


def conv1d_net() -> nn.Module:
    """``Conv1d(2,3,k=3,stride=2,padding=1,dilation=1) → tanh → Conv1d(3,2,k=2,dilation=2)``
    → flatten → Linear: two 1-d convolutions (with a dilation) before a dense head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv1d(3, 2, kernel_size=2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 2, 3),
    )


def conv3d_net() -> nn.Module:
    """``Conv3d(1,2,k=(2,3,2),stride=(1,2,1),padding=(0,1,1)) → tanh → flatten → Linear``."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 2, kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=(0, 1, 1)),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2 * 4, 2),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": (lambda: tiny_mlp(bias=True), (4,), 2),
    "mlp_nobias": (lambda: tiny_mlp(bias=False), (4,), 2),
    "conv": (lambda: tiny_convnet(bias=True), (2, 5, 5), 2),
    "conv_nobias": (lambda: tiny_convnet(bias=False), (2, 5, 5), 2),
    "mixed_bn": (mixed_net, (2, 6, 6), 3),
    "conv1d": (conv1d_net, (2, 8), 3),
    "conv3d": (conv3d_net, (1, 3, 4, 3), 2),
}


def make_batch(shape: tuple[int, ...], classes: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def prepare(model: nn.Module) -> nn.Module:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()  # per-sample gradients are only defined without batch statistics
    return model


def one_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return {k: p.detach() - before[k] for k, p in model.named_parameters()}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 5])
def test_one_step_equals_dense_kfac(float64: None, model_name: str, mode: str, n: int) -> None:
    build, shape, classes = MODELS[model_name]
    model = prepare(build())
    x, y = make_batch(shape, classes, n)
    expected = dense_kfac_update(model, nn.CrossEntropyLoss(), x, y, damping=0.05, mode=mode)
    opt = tk.KFAC(model, damping=0.05, damping_mode=mode, **CONTRACT)
    actual = one_step(model, opt, x, y)
    for name, delta in expected.items():
        assert_close_report(actual[name], delta, rtol=1e-9, atol=1e-12, name=name)


@pytest.mark.parametrize("mode", ("per_factor", "pi"))
def test_cholesky_inverse_equals_dense(float64: None, mode: str) -> None:
    model = prepare(tiny_convnet())
    x, y = make_batch((2, 5, 5), 2, 4)
    expected = dense_kfac_update(model, nn.CrossEntropyLoss(), x, y, damping=0.02, mode=mode)
    opt = tk.KFAC(model, damping=0.02, damping_mode=mode, inverse_method="cholesky", **CONTRACT)
    actual = one_step(model, opt, x, y)
    for name, delta in expected.items():
        assert_close_report(actual[name], delta, rtol=1e-9, atol=1e-12, name=name)


def test_factors_equal_per_sample_definitions(float64: None) -> None:
    """A = Σ āāᵀ/(NT), G = Σ δδᵀ/(NT) from the captured statistics of a conv net."""
    from oracles import capture_layer_stats, kfac_factors

    model = prepare(tiny_convnet())
    x, y = make_batch((2, 5, 5), 2, 3)
    expected = capture_layer_stats(model, nn.CrossEntropyLoss(), x, y)
    opt = tk.KFAC(model, **CONTRACT)
    one_step(model, opt, x, y)
    for name, (a, g) in expected.items():
        ref_a, ref_g = kfac_factors(a, g)
        factors = opt.preconditioner.factors[name]
        assert_close_report(factors.A, ref_a, rtol=1e-12, atol=1e-14, name=f"{name}.A")
        assert_close_report(factors.G, ref_g, rtol=1e-12, atol=1e-14, name=f"{name}.G")


def test_fisher_batch_uses_a_subset(float64: None) -> None:
    """With fisher_batch=0.5 the factors are those of a random half of the batch (δ still
    scaled by the full batch size, since the loss is a mean over all rows)."""
    from oracles import capture_layer_stats, kfac_factors

    model = prepare(tiny_mlp())
    x, y = make_batch((4,), 2, 8)
    stats = capture_layer_stats(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y)
    opt = tk.KFAC(model, **{**CONTRACT, "fisher_batch": 0.5, "seed": 7})
    index = torch.randperm(8, generator=torch.Generator().manual_seed(7))[:4].sort().values
    one_step(model, opt, x, y)
    for name, (a, g) in stats.items():
        ref_a, ref_g = kfac_factors(a[index], g[index])
        factors = opt.preconditioner.factors[name]
        assert_close_report(factors.A, ref_a, rtol=1e-12, atol=1e-14, name=f"{name}.A")
        assert_close_report(factors.G, ref_g, rtol=1e-12, atol=1e-14, name=f"{name}.G")
