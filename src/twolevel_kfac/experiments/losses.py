"""Per-problem losses: the mean over the batch of the per-sample negative log-likelihood.

Convention ("sum over output features, mean over the batch"), for a batch of B samples
with network outputs z_n and targets y_n:

    L = (1/B) Σ_n ℓ_n,   ℓ_n = −log p(y_n | z_n)  (up to an additive constant)

| function | likelihood | ℓ_n |
|---|---|---|
| ``bce_logits_loss`` | ``"bernoulli"`` | Σ_j [softplus(z_nj) − y_nj z_nj]  (BCE with logits) |
| ``mse_loss`` | ``"gaussian"`` | ½ ‖y_n − z_n‖²  (N(z_n, I), constant dropped) |
| ``cross_entropy`` | ``"categorical"`` | −log softmax(z_n)[y_n] |
| ``sequence_cross_entropy`` | ``"categorical"`` | −Σ_t log softmax(z_nt)[y_nt]  (z_n: ``[T, C]``) |

This is the scaling under which the KFAC Fisher F = (1/B) Σ_n ∇ℓ_n ∇ℓ_nᵀ matches the
``likelihood`` the optimizer samples from (design.md §2). Note that it differs from
``torch.nn.MSELoss()``/``BCEWithLogitsLoss()`` defaults, which also average over features.
For ``sequence_cross_entropy`` the positions t are the "features": KFAC-family methods get
``class_dim=-1`` for it (``CLASS_DIMS``), one categorical per position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CLASS_DIMS",
    "LIKELIHOODS",
    "LOSSES",
    "MEAN_LOSSES",
    "LossFn",
    "bce_logits_loss",
    "cross_entropy",
    "loss_function",
    "mse_loss",
    "sequence_cross_entropy",
    "sequence_token_mean",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def bce_logits_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Bernoulli NLL of targets in [0, 1] given logits, summed over features, batch mean.

    Args:
        logits: Network outputs ``[B, D]`` (pre-sigmoid).
        target: Targets ``[B, D]`` in [0, 1].

    Returns:
        Scalar loss.
    """
    per_feature = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return per_feature.flatten(1).sum(dim=1).mean()


def mse_loss(output: Tensor, target: Tensor) -> Tensor:
    """Gaussian N(output, I) NLL without constant: ½‖y − ŷ‖² summed over features, batch mean.

    Args:
        output: Network outputs ``[B, D]``.
        target: Targets ``[B, D]``.

    Returns:
        Scalar loss.
    """
    return 0.5 * (output - target).pow(2).flatten(1).sum(dim=1).mean()


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Categorical NLL of class labels given logits, batch mean.

    Args:
        logits: Network outputs ``[B, C]``.
        target: int64 class indices ``[B]``.

    Returns:
        Scalar loss.
    """
    return F.cross_entropy(logits, target)


def sequence_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Categorical NLL of every position, summed over the positions, batch mean:
    ``(1/B) Σ_n Σ_t −log softmax(z_nt)[y_nt]``.

    Args:
        logits: Network outputs ``[B, T, C]``.
        target: int64 class indices ``[B, T]``.

    Returns:
        Scalar loss.
    """
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum") / len(logits)


def sequence_token_mean(logits: Tensor, target: Tensor) -> Tensor:
    """The token mean of torch, ``(1/(B·T)) Σ_n Σ_t −log softmax(z_nt)[y_nt]``: ``1/T`` times
    :func:`sequence_cross_entropy` (``CrossEntropyLoss()`` on the flattened positions).

    Args:
        logits: Network outputs ``[B, T, C]``.
        target: int64 class indices ``[B, T]``.

    Returns:
        Scalar loss.
    """
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


LOSSES: dict[str, LossFn] = {
    "bce": bce_logits_loss,
    "mse": mse_loss,
    "cross_entropy": cross_entropy,
    "sequence_cross_entropy": sequence_cross_entropy,
}

MEAN_LOSSES: dict[str, LossFn] = {
    "bce": F.binary_cross_entropy_with_logits,
    "mse": F.mse_loss,
    "cross_entropy": cross_entropy,
    "sequence_cross_entropy": sequence_token_mean,
}
"""torch's default reductions (``problem.loss_reduction: mean``, the authors' convention):
a mean over the output features as well as the batch, ``s`` times :data:`LOSSES`' per
sample (``1/D`` for ``bce``, ``2/D`` for ``mse``: ``MSELoss`` has no ½; 1 for
``cross_entropy``; ``1/T`` for ``sequence_cross_entropy``, T positions;
:func:`twolevel_kfac.curvature.likelihoods.mean_scale`)."""


def loss_function(name: str, reduction: str = "sum") -> LossFn:
    """The loss ``name`` in the convention ``reduction`` (``sum`` | ``mean``).

    Raises:
        ValueError: An unknown loss or reduction.
    """
    table = {"sum": LOSSES, "mean": MEAN_LOSSES}.get(reduction)
    if table is None or name not in table:
        raise ValueError(
            f"unknown loss {name!r} / reduction {reduction!r}; allowed: {list(LOSSES)} "
            "with 'sum' or 'mean'"
        )
    return table[name]


# Loss name -> the likelihood whose NLL it is (what KFAC's "mc" Fisher samples from).
LIKELIHOODS: dict[str, str] = {
    "bce": "bernoulli",
    "mse": "gaussian",
    "cross_entropy": "categorical",
    "sequence_cross_entropy": "categorical",
}

# Loss name -> the ``class_dim`` of KFAC's MC Fisher (logits with positions): the
# KFAC-family methods of a problem with this loss get it (``ExperimentConfig.method_kwargs``).
CLASS_DIMS: dict[str, int] = {"sequence_cross_entropy": -1}
