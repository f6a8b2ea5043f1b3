"""The benchmark problems: a model of :mod:`twolevel_kfac.experiments.models`, a batch size,
a loss and one fixed synthetic batch.

| name | model | batch | loss |
|---|---|---|---|
| ``mnist_ae_512``, ``mnist_ae_1000`` | MNIST autoencoder 784-1000-…-30-…-784 | 512, 1000 | BCE |
| ``curves_ae_256`` | CURVES autoencoder 784-400-…-6-…-784 | 256 | BCE |
| ``deep_linear_512`` | DeepLinear, 64 Linear+BatchNorm layers of width 10 | 512 | CE |
| ``cuda_convnet_256`` | cuda-convnet on 3×32×32 (CIFAR-10 shape) | 256 | CE |
| ``resnet18_128`` | ResNet-18 on 3×32×32 (CIFAR-10 shape; BatchNorm left to SGD) | 128 | CE |

Step times do not depend on the data values, so each problem trains on one fixed batch
drawn from a seeded generator (uniform pixels for the autoencoders, Gaussian inputs and
uniform labels for the classifiers); no data set is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from twolevel_kfac.experiments.losses import LIKELIHOODS, LOSSES, LossFn
from twolevel_kfac.experiments.models import build_model, mlp

__all__ = ["PROBLEMS", "Problem", "mlp_problem", "select_problems"]


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    Attributes:
        name: Registry name (``mnist_ae_512``).
        model: A name of ``experiments.models.MODELS``, or ``"mlp"`` (``model_kwargs``
            then holds ``sizes``).
        batch: Mini-batch size B.
        input_shape: Shape of one input.
        loss: A key of ``experiments.losses.LOSSES``.
        classes: Number of classes of integer labels; 0 for an autoencoder (targets = inputs).
        model_kwargs: Constructor arguments of the model.
    """

    name: str
    model: str
    batch: int
    input_shape: tuple[int, ...]
    loss: str
    classes: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def likelihood(self) -> str:
        """What the MC Fisher samples from (the loss's likelihood)."""
        return LIKELIHOODS[self.loss]

    @property
    def loss_fn(self) -> LossFn:
        """Mean-over-batch loss of ``experiments.losses``."""
        return LOSSES[self.loss]

    def build_model(self, seed: int = 0) -> nn.Module:
        """The model, initialised after ``torch.manual_seed(seed)``."""
        torch.manual_seed(seed)
        if self.model == "mlp":
            return mlp(self.model_kwargs["sizes"])
        return build_model(self.model, **self.model_kwargs)

    def batch_data(self, seed: int = 0) -> tuple[Tensor, Tensor]:
        """The fixed batch ``(x, y)`` of the problem."""
        gen = torch.Generator().manual_seed(seed)
        shape = (self.batch, *self.input_shape)
        if self.classes == 0:
            x = torch.rand(shape, generator=gen)
            return x, x
        x = torch.randn(shape, generator=gen)
        return x, torch.randint(self.classes, (self.batch,), generator=gen)

    def describe(self) -> str:
        """One line for reports."""
        return f"{self.model} batch {self.batch}, loss {self.loss}"


def mlp_problem(batch: int, width: int, depth: int, in_features: int = 784) -> Problem:
    """A ReLU MLP classifier ``in → width × depth → 10`` (cross-entropy) for the scaling runs.

    Args:
        batch: Mini-batch size.
        width: Width of every hidden layer.
        depth: Number of hidden layers (``depth + 1`` Linear layers).
        in_features: Input dimension.

    Returns:
        The problem, named ``mlp_b{batch}_w{width}_d{depth}``.
    """
    sizes = (in_features, *([width] * depth), 10)
    return Problem(
        name=f"mlp_b{batch}_w{width}_d{depth}",
        model="mlp",
        batch=batch,
        input_shape=(in_features,),
        loss="cross_entropy",
        classes=10,
        model_kwargs={"sizes": sizes},
    )


_CONVNET = {"in_channels": 3, "height": 32, "width": 32, "num_classes": 10}
_RESNET = {"in_channels": 3, "num_classes": 10}
PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("mnist_ae_512", "mnist_autoencoder", 512, (784,), "bce"),
        Problem("mnist_ae_1000", "mnist_autoencoder", 1000, (784,), "bce"),
        Problem("curves_ae_256", "curves_autoencoder", 256, (784,), "bce"),
        Problem("deep_linear_512", "deep_linear", 512, (784,), "cross_entropy", classes=10),
        Problem(
            "cuda_convnet_256", "cuda_convnet", 256, (3, 32, 32), "cross_entropy", 10, _CONVNET
        ),
        Problem("resnet18_128", "resnet18", 128, (3, 32, 32), "cross_entropy", 10, _RESNET),
    )
}


def select_problems(names: Sequence[str] | None, default: Sequence[str]) -> list[Problem]:
    """The problems named (default: ``default``); unknown names raise ``ValueError``."""
    chosen = list(names) if names else list(default)
    unknown = [n for n in chosen if n not in PROBLEMS]
    if unknown:
        raise ValueError(f"unknown problem(s) {unknown}; allowed: {sorted(PROBLEMS)}")
    return [PROBLEMS[n] for n in chosen]
