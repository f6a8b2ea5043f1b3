"""The small problems of the analysis: networks and data (float64 throughout).

Networks (:func:`build_model`): ``mlp`` = ``Linear(sizes[i], sizes[i+1])`` with the
activation between layers (none after the last, which outputs logits / means); ``cnn`` =
``Conv2d(c_i, c_{i+1}, kernel_size, stride, padding=kernel_size // 2)`` + activation per
entry of ``channels``, then ``Flatten`` and one ``Linear`` head; ``vit`` = the tiny Vision
Transformer of :mod:`.vit`. Xavier-uniform weights (the attention's packed ``in_proj``
included) and zero biases (the paper's initialisation); a ViT's LayerNorms start at ``γ = 1``,
``β = 0`` and its positional table at ``N(0, 0.02²)``, all drawn from the seed's generator.

Data (:func:`load_data`): image data sets come from
:func:`twolevel_kfac.experiments.data.load_dataset` (CURVES is generated and cached, MNIST /
Fashion-MNIST read from the data directory), average-pooled to ``image_size``² and scaled to
[0, 1]. ``synthetic`` needs no files: inputs ``x ~ N(0, I)`` and targets from a random
teacher network of the same architecture (categorical: ``argmax`` of its logits; Gaussian:
its output plus ``N(0, 0.1²)`` noise; Bernoulli: ``σ`` of its output as soft targets), or,
for an autoencoder, images ``x = σ(Z W)`` with a rank-4 ``Z W`` and ``y = x``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AnalyzeConfig, DataSpec, ModelSpec
from .vit import POSITION_STD, PatchTokens, tiny_vit

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def _activation(name: str) -> list[nn.Module]:
    return [] if name == "none" else [ACTIVATIONS[name]()]


def input_shape(spec: ModelSpec) -> tuple[int, ...]:
    """The shape of one input sample."""
    if spec.kind == "mlp":
        return (spec.sizes[0],)
    return (spec.in_channels, spec.image_size, spec.image_size)


def output_size(spec: ModelSpec) -> int:
    """The number of network outputs ``D``."""
    return spec.sizes[-1] if spec.kind == "mlp" else spec.num_outputs


def build_model(spec: ModelSpec, seed: int) -> nn.Sequential:
    """The float64 network of ``spec``, initialised from ``seed``.

    Args:
        spec: the model section of the config.
        seed: the initialisation seed.

    Returns:
        The network.
    """
    layers: list[nn.Module] = []
    if spec.kind == "vit":
        return _initialised(_vit(spec), seed)
    if spec.kind == "mlp":
        pairs = list(zip(spec.sizes[:-1], spec.sizes[1:], strict=True))
        for i, (d_in, d_out) in enumerate(pairs):
            layers.append(nn.Linear(d_in, d_out, bias=spec.bias))
            if i < len(pairs) - 1:
                layers += _activation(spec.activation)
    else:
        side, c_in = spec.image_size, spec.in_channels
        pad = spec.kernel_size // 2
        for c_out in spec.channels:
            layers.append(
                nn.Conv2d(c_in, c_out, spec.kernel_size, spec.stride, pad, bias=spec.bias)
            )
            layers += _activation(spec.activation)
            side = (side + 2 * pad - spec.kernel_size) // spec.stride + 1
            c_in = c_out
        layers += [nn.Flatten(), nn.Linear(c_in * side * side, spec.num_outputs, bias=spec.bias)]
    return _initialised(nn.Sequential(*layers), seed)


def _vit(spec: ModelSpec) -> nn.Sequential:
    return tiny_vit(
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        patch=spec.patch,
        width=spec.width,
        depth=spec.depth,
        heads=spec.heads,
        ffn_ratio=spec.ffn_ratio,
        activation=ACTIVATIONS.get(spec.activation, nn.Identity),
        num_outputs=spec.num_outputs,
        bias=spec.bias,
    )


@torch.no_grad()
def _initialised(model: nn.Sequential, seed: int) -> nn.Sequential:
    """``model`` in float64 with the analysis' initialisation (module docstring), drawn in
    ``modules()`` order from a generator seeded with ``seed``."""
    model = model.to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            _xavier_(module.weight, generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            _xavier_(module.in_proj_weight, generator)
            if module.in_proj_bias is not None:
                nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, PatchTokens):
            noise = torch.randn(module.position.shape, generator=generator, dtype=torch.float64)
            module.position.copy_(POSITION_STD * noise)
    return model


@torch.no_grad()
def _xavier_(weight: Tensor, generator: torch.Generator) -> None:
    """Xavier-uniform init ``U(±√(6/(fan_in + fan_out)))`` from an explicit generator."""
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    weight.copy_(
        torch.rand(weight.shape, generator=generator, dtype=weight.dtype) * 2 * bound - bound
    )


def load_data(config: AnalyzeConfig) -> tuple[Tensor, Tensor]:
    """The training pool ``(x, y)`` of the analysis (float64 inputs).

    Args:
        config: the analysis configuration.

    Returns:
        ``x`` of shape ``[n_train, *input_shape]`` and the targets ``y`` (int64 labels for
        ``categorical``, float64 otherwise).

    Raises:
        ValueError: if the data do not fit the model's input or output size.
    """
    spec, data = config.model, config.data
    if data.name == "synthetic":
        return _synthetic(config)
    x, y = _images(data, config.likelihood == "categorical")
    if data.image_size is not None:
        x = F.adaptive_avg_pool2d(x, data.image_size)
    if data.autoencoder or data.name == "curves":
        y = x.flatten(1).clone()
    x = x.flatten(1) if spec.kind == "mlp" else x
    if tuple(x.shape[1:]) != input_shape(spec):
        raise ValueError(
            f"data {data.name!r} gives inputs of shape {tuple(x.shape[1:])}, the model expects "
            f"{input_shape(spec)} (set data.image_size / model.sizes[0] / model.image_size)"
        )
    if y.dim() > 1 and y.shape[1] != output_size(spec):
        raise ValueError(
            f"targets have {y.shape[1]} features, the model outputs {output_size(spec)}"
        )
    return x, y


def analysis_batch(config: AnalyzeConfig, data: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The analysed batch: the first ``batch_size`` samples of a permutation of the pool
    seeded with ``config.seed`` (the same batch for every state analysed).

    Args:
        config: the analysis configuration.
        data: the pool ``(x, y)`` of :func:`load_data`.

    Returns:
        ``(x, y)`` of the batch.

    Raises:
        ValueError: if the pool has fewer samples than ``batch_size`` (the analysis ran on
            the pool and reported ``batch_size`` before 2026-12-06 (day)).
    """
    x_all, y_all = data
    if config.batch_size > len(x_all):  # (a dataset with fewer samples than data.n_train)
        raise ValueError(
            f"batch_size {config.batch_size} is more than the {len(x_all)} samples of the "
            f"data pool ({config.data.name!r}): lower batch_size"
        )
    perm = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(config.seed))
    index = perm[: config.batch_size]
    return x_all[index], y_all[index]


def _images(data: DataSpec, labels: bool) -> tuple[Tensor, Tensor]:
    from ..experiments.data import load_dataset  # the experiments' registry (lazy import)

    autoencoder = None if data.name == "curves" else not labels
    train_x, train_y, _, _ = load_dataset(
        data.name, data.data_dir, autoencoder=autoencoder, n_train=data.n_train, n_test=0
    )
    x = train_x.to(torch.float64).reshape(-1, 1, 28, 28)
    y = train_y.long() if labels else train_y.to(torch.float64)
    return x, y


def _synthetic(config: AnalyzeConfig) -> tuple[Tensor, Tensor]:
    spec, n = config.model, config.data.n_train
    generator = torch.Generator().manual_seed(config.seed + 1000)
    shape = input_shape(spec)
    if config.data.autoencoder:
        dim = math.prod(shape)
        if output_size(spec) != dim:
            raise ValueError(
                "data.autoencoder needs a model whose output size equals its input size"
            )
        z = torch.randn(n, 4, generator=generator, dtype=torch.float64)
        w = torch.randn(4, dim, generator=generator, dtype=torch.float64)
        x = torch.sigmoid(z @ w).reshape(n, *shape)
        return x, x.flatten(1).clone()
    x = torch.randn(n, *shape, generator=generator, dtype=torch.float64)
    teacher = build_model(spec, seed=config.seed + 2000)
    with torch.no_grad():
        out = teacher(x)
    if config.likelihood == "categorical":
        return x, out.argmax(dim=1)
    if config.likelihood == "gaussian":
        noise = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        return x, out + 0.1 * noise
    return x, torch.sigmoid(out)
