"""Models: output shapes, parameter counts from the paper's layer sizes, layer placement."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from twolevel_kfac.experiments.models import (
    MODELS,
    build_model,
    cuda_convnet,
    curves_autoencoder,
    d_mnist_mlp,
    deep_linear,
    faces_autoencoder,
    mnist_autoencoder,
    resnet18,
    resnet34,
)


def _dense_params(sizes: Sequence[int]) -> int:
    """Σ (d_in + 1)·d_out over consecutive widths."""
    return sum((a + 1) * b for a, b in itertools.pairwise(sizes))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _kinds(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.children()]


AE_CASES = [
    (curves_autoencoder, (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784)),
    (mnist_autoencoder, (784, 1000, 500, 250, 30, 250, 500, 1000, 784)),
    (faces_autoencoder, (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625)),
]


@pytest.mark.parametrize(("factory", "sizes"), AE_CASES)
def test_autoencoders(factory, sizes: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    model = factory()
    assert _n_params(model) == _dense_params(sizes)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [m.in_features for m in linears] == list(sizes[:-1])
    assert [m.out_features for m in linears] == list(sizes[1:])
    kinds = _kinds(model)
    assert kinds[-1] == "Linear", "the last layer outputs logits / a linear reconstruction"
    assert kinds.count("ReLU") == len(linears) - 1, "authors' code: ReLU after every hidden layer"
    out = model(torch.rand(3, sizes[0]))
    assert out.shape == (3, sizes[-1])


@pytest.mark.parametrize(("factory", "sizes"), AE_CASES)
def test_linear_code_option(factory, sizes: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    kinds = _kinds(factory(linear_code=True))
    code = list(sizes).index(min(sizes))  # Linear number `code` outputs the code units
    linear_positions = [i for i, k in enumerate(kinds) if k == "Linear"]
    assert kinds[linear_positions[code - 1] + 1] == "Linear", "no ReLU after the code layer"
    assert kinds.count("ReLU") == len(sizes) - 3


def test_d_mnist_mlp_batchnorm_after_each_hidden_linear() -> None:
    sizes = (784, 1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 20, 10)
    model = d_mnist_mlp()
    kinds = _kinds(model)
    assert kinds == ["Linear", "BatchNorm1d"] * (len(sizes) - 2) + ["Linear"]
    bn_params = 2 * sum(sizes[1:-1])
    assert _n_params(model) == _dense_params(sizes) + bn_params
    for lin, bn in zip(list(model)[0:-1:2], list(model)[1::2], strict=True):
        assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == lin.out_features
    assert model(torch.randn(4, 784)).shape == (4, 10)
    relu_kinds = _kinds(d_mnist_mlp(activation="relu"))
    assert relu_kinds[:3] == ["Linear", "BatchNorm1d", "ReLU"] and relu_kinds[-1] == "Linear"
    with pytest.raises(ValueError, match="activation"):
        d_mnist_mlp(activation="tanh")


def test_deep_linear() -> None:
    model = deep_linear()
    kinds = _kinds(model)
    assert kinds.count("Linear") == 64 and kinds.count("BatchNorm1d") == 63
    assert kinds == ["Linear", "BatchNorm1d"] * 63 + ["Linear"]
    assert _n_params(model) == (784 + 1) * 10 + 63 * (10 + 1) * 10 + 63 * 2 * 10
    assert model(torch.randn(5, 784)).shape == (5, 10)


@pytest.mark.parametrize(("c", "h", "w"), [(3, 32, 32), (1, 28, 28), (3, 40, 36)])
def test_cuda_convnet(c: int, h: int, w: int) -> None:
    model = cuda_convnet(c, h, w, num_classes=7)
    kinds = _kinds(model)
    assert kinds[:4] == ["Conv2d", "ReLU", "MaxPool2d", "BatchNorm2d"]
    assert kinds[4:8] == ["Conv2d", "ReLU", "MaxPool2d", "BatchNorm2d"]
    assert kinds[8:] == ["Conv2d", "ReLU", "Flatten", "Linear"]
    assert model(torch.randn(2, c, h, w)).shape == (2, 7)
    if (h, w) in ((32, 32), (28, 28)):
        conv = (c * 9 + 1) * 32 + (32 * 9 + 1) * 32 + (32 * 4 + 1) * 64
        assert _n_params(model) == conv + 2 * 32 * 2 + (64 + 1) * 7
    with pytest.raises(ValueError, match="too small"):
        cuda_convnet(1, 20, 20)


def test_resnets() -> None:
    model = resnet18(num_classes=100)
    assert _n_params(model) == 11_220_132  # CIFAR ResNet-18 with a 100-way head
    assert isinstance(model.stem[0], nn.Conv2d) and model.stem[0].stride == (1, 1)
    assert model.stem[0].kernel_size == (3, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    r34 = resnet34(num_classes=10, in_channels=1)
    assert sum(isinstance(m, nn.Conv2d) for m in r34.modules()) == 1 + 2 * 16 + 3
    assert r34(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_xavier_init_and_zero_bias() -> None:
    torch.manual_seed(0)
    model = curves_autoencoder()
    for m in model:
        if isinstance(m, nn.Linear):
            bound = (6.0 / (m.in_features + m.out_features)) ** 0.5
            w_max = float(m.weight.detach().abs().max())
            assert 0.9 * bound < w_max <= bound
            assert torch.count_nonzero(m.bias) == 0


def test_build_model_registry() -> None:
    assert set(MODELS) >= {"curves_autoencoder", "cuda_convnet", "resnet18", "deep_linear"}
    model = build_model("cuda_convnet", in_channels=1, height=28, width=28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")
