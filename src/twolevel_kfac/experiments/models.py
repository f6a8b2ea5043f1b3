"""The paper's models (Koroko et al. 2023, arXiv 2303.18083, experiments), without torchvision.

Layer sizes follow the authors' ``apps/mlp_cnn/models.py``:

| name | layers |
|---|---|
| ``curves_autoencoder`` | 784-400-200-100-50-25-6-25-50-100-200-400-784, ReLU |
| ``mnist_autoencoder`` | 784-1000-500-250-30-250-500-1000-784, ReLU |
| ``faces_autoencoder`` | 625-2000-1000-500-30-500-1000-2000-625, ReLU |
| ``d_mnist_mlp`` | 784-1000-900-…-100-50-20-10, BatchNorm1d after each hidden Linear |
| ``deep_linear`` | Linear(784,10)+BN, 62×[Linear(10,10)+BN], Linear(10,10) |
| ``cuda_convnet`` | [Conv3(32)-ReLU-MaxPool3-BN]×2, Conv2(64)-ReLU, Linear |
| ``resnet18`` / ``resnet34`` | He et al. 2016 basic-block ResNets, CIFAR stem |
| ``mlp`` | any widths ``sizes``, activation by name (small networks, e.g. for the Fisher |
| | analysis along a run: the same layers as ``tlkfac analyze``'s ``model: {kind: mlp}``) |
| ``tiny_gpt`` / ``vit`` | pre-norm Transformer encoders (``sequence_models``): a causal |
| | character-level GPT and a patch-embedding vision Transformer |

Choices (where the paper's text is silent, we follow the authors' code):

* Autoencoders output **logits** (CURVES, MNIST) or a linear reconstruction (FACES); the
  authors' final ``Sigmoid`` is folded into ``BCEWithLogits`` (``losses.bce_logits_loss``),
  which is the same model and numerically safer.
* The code layers (6 units for CURVES, 30 for MNIST/FACES) are followed by a ReLU as in
  the authors' code (Hinton & Salakhutdinov 2006 used linear code units);
  ``linear_code=True`` gives the linear bottleneck.
* ``d_mnist_mlp`` and ``deep_linear`` have no activation functions (only Linear and
  BatchNorm1d), exactly as in the authors' code; ``d_mnist_mlp(activation="relu")``
  inserts a ReLU after each BatchNorm.
* ResNets use the CIFAR stem (3×3 conv, stride 1, no max-pool), bias-free convolutions
  followed by BatchNorm2d, 1×1-conv+BN shortcuts when the shape changes.
* Init: Xavier-uniform weights and zero biases for every Linear and Conv2d; BatchNorm
  weight 1, bias 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from twolevel_kfac.experiments.initialization import init_weights
from twolevel_kfac.experiments.sequence_models import tiny_gpt, vit

__all__ = [
    "MODELS",
    "build_model",
    "cuda_convnet",
    "curves_autoencoder",
    "d_mnist_mlp",
    "deep_linear",
    "faces_autoencoder",
    "mlp",
    "mlp_model",
    "mnist_autoencoder",
    "resnet18",
    "resnet34",
    "tiny_gpt",
    "vit",
]

CURVES_SIZES = (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784)
MNIST_AE_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
FACES_SIZES = (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625)
D_MNIST_SIZES = (784, 1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 20, 10)


def mlp(
    sizes: Sequence[int],
    activation: Callable[[], nn.Module] | None = nn.ReLU,
    batch_norm: bool = False,
    linear_after: Sequence[int] = (),
    bias: bool = True,
) -> nn.Sequential:
    """Fully connected net ``Linear(sizes[i], sizes[i+1])`` with per-hidden-layer extras.

    After every Linear but the last: ``BatchNorm1d`` if ``batch_norm``, then
    ``activation()`` unless ``activation`` is ``None`` or the layer index is in
    ``linear_after``. The last Linear has nothing after it (it outputs logits).

    Args:
        sizes: Layer widths, input first.
        activation: Factory of the hidden activation, or ``None`` for none.
        batch_norm: Insert BatchNorm1d after each hidden Linear.
        linear_after: Indices of hidden Linear layers that get no activation.
        bias: Give every Linear a bias.

    Returns:
        The initialised ``nn.Sequential``.
    """
    layers: list[nn.Module] = []
    n_linear = len(sizes) - 1
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i == n_linear - 1:
            break
        if batch_norm:
            layers.append(nn.BatchNorm1d(d_out))
        if activation is not None and i not in linear_after:
            layers.append(activation())
    return init_weights(nn.Sequential(*layers))


ACTIVATIONS: dict[str, Callable[[], nn.Module] | None] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "none": None,
}


def mlp_model(sizes: Sequence[int], activation: str = "relu", bias: bool = True) -> nn.Sequential:
    """``mlp`` with the activation given by name, for configs (registry name ``mlp``).

    Args:
        sizes: Layer widths, input first (at least two).
        activation: ``relu`` | ``tanh`` | ``sigmoid`` | ``none``, between the Linear layers.
        bias: Give every Linear a bias.

    Returns:
        The initialised ``nn.Sequential`` (Linear, activation, …, Linear).

    Raises:
        ValueError: Fewer than two widths, or an unknown activation.
    """
    if len(sizes) < 2:
        raise ValueError(f"sizes={list(sizes)}: an mlp needs at least two widths")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; allowed: {list(ACTIVATIONS)}")
    return mlp(sizes, ACTIVATIONS[activation], bias=bias)


def _autoencoder(sizes: Sequence[int], linear_code: bool) -> nn.Sequential:
    """Symmetric ReLU autoencoder; the code layer is the narrowest one."""
    code = sizes.index(min(sizes)) - 1  # index of the Linear that outputs the code
    return mlp(sizes, nn.ReLU, linear_after=(code,) if linear_code else ())


def curves_autoencoder(linear_code: bool = False) -> nn.Sequential:
    """CURVES autoencoder 784-400-200-100-50-25-6-25-50-100-200-400-784 (outputs logits).

    Args:
        linear_code: No ReLU after the 6-unit code layer (Hinton & Salakhutdinov 2006).

    Returns:
        The model.
    """
    return _autoencoder(CURVES_SIZES, linear_code)


def mnist_autoencoder(linear_code: bool = False) -> nn.Sequential:
    """MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (outputs logits).

    Args:
        linear_code: No ReLU after the 30-unit code layer.

    Returns:
        The model.
    """
    return _autoencoder(MNIST_AE_SIZES, linear_code)


def faces_autoencoder(linear_code: bool = False) -> nn.Sequential:
    """FACES autoencoder 625-2000-1000-500-30-500-1000-2000-625 (linear output, MSE).

    Args:
        linear_code: No ReLU after the 30-unit code layer.

    Returns:
        The model.
    """
    return _autoencoder(FACES_SIZES, linear_code)


def d_mnist_mlp(num_classes: int = 10, activation: str | None = None) -> nn.Sequential:
    """D_MNIST classifier 784-1000-900-…-50-20-C with BatchNorm1d after each hidden Linear.

    Args:
        num_classes: Output width C.
        activation: ``None`` (authors' code: Linear+BN only) or ``"relu"``.

    Returns:
        The model.

    Raises:
        ValueError: Unknown activation.
    """
    if activation not in (None, "relu"):
        raise ValueError(f"activation={activation!r}; allowed: None, 'relu'")
    act = nn.ReLU if activation == "relu" else None
    return mlp((*D_MNIST_SIZES[:-1], num_classes), act, batch_norm=True)


def deep_linear(depth: int = 64, width: int = 10, in_features: int = 784) -> nn.Sequential:
    """F_MNIST "DeepLinear": Linear(784,10)+BN, (depth−2)×[Linear(10,10)+BN], Linear(10,10).

    Args:
        depth: Number of Linear layers (paper: 64).
        width: Width of every layer, also the number of classes.
        in_features: Input dimension.

    Returns:
        The model.
    """
    return mlp((in_features, *([width] * depth)), activation=None, batch_norm=True)


def cuda_convnet(
    in_channels: int = 3, height: int = 32, width: int = 32, num_classes: int = 10
) -> nn.Sequential:
    """cuda-convnet: Conv3×3(32)-ReLU-MaxPool3-BN, twice, Conv2×2(64)-ReLU, Linear.

    Convolutions are unpadded, max-pools have kernel = stride = 3; the final Linear takes
    64·H'·W' features (64 for 32×32 CIFAR and 28×28 MNIST inputs, where H' = W' = 1).

    Args:
        in_channels: Input channels.
        height: Input height.
        width: Input width.
        num_classes: Number of classes.

    Returns:
        The model.

    Raises:
        ValueError: Input too small for the three convolutions.
    """

    def out_size(n: int) -> int:
        return ((n - 2) // 3 - 2) // 3 - 1

    h, w = out_size(height), out_size(width)
    if h < 1 or w < 1:
        raise ValueError(f"input {height}×{width} is too small for cuda_convnet (min 26×26)")
    model = nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(3),
        nn.BatchNorm2d(32),
        nn.Conv2d(32, 32, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(3),
        nn.BatchNorm2d(32),
        nn.Conv2d(32, 64, kernel_size=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * h * w, num_classes),
    )
    return init_weights(model)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3-BN-ReLU-conv3-BN + shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        """Build the block.

        Args:
            c_in: Input channels.
            c_out: Output channels.
            stride: Stride of the first convolution (2 where the stage downsamples).
        """
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual forward pass."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem (stride 1, no max-pool), 4 stages, avg-pool, Linear."""

    def __init__(
        self, blocks: Sequence[int], num_classes: int, in_channels: int, width: int = 64
    ) -> None:
        """Build the network.

        Args:
            blocks: Basic blocks per stage (ResNet-18: 2,2,2,2; ResNet-34: 3,4,6,3).
            num_classes: Output classes.
            in_channels: Input channels.
            width: Channels of the stem and the first stage (doubled per stage; 64 in
                the ResNet papers).
        """
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                stages.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        return self.fc(self.pool(self.layers(self.stem(x))))


def resnet18(num_classes: int = 100, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-18 (CIFAR stem).

    Args:
        num_classes: Output classes (paper: CIFAR-100).
        in_channels: Input channels.
        width: First-stage channels (64: the paper's; smaller for CPU-sized runs).

    Returns:
        The model.
    """
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)


def resnet34(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-34 (CIFAR stem).

    Args:
        num_classes: Output classes (paper: SVHN).
        in_channels: Input channels.

    Returns:
        The model.
    """
    return ResNet((3, 4, 6, 3), num_classes, in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "curves_autoencoder": curves_autoencoder,
    "mnist_autoencoder": mnist_autoencoder,
    "faces_autoencoder": faces_autoencoder,
    "d_mnist_mlp": d_mnist_mlp,
    "deep_linear": deep_linear,
    "cuda_convnet": cuda_convnet,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "mlp": mlp_model,
    "tiny_gpt": tiny_gpt,
    "vit": vit,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model of ``MODELS`` by name.

    Args:
        name: Registry name.
        **kwargs: Passed to the constructor.

    Returns:
        The initialised model.

    Raises:
        ValueError: Unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
    return MODELS[name](**kwargs)
