"""Likelihoods of the model's predictive distribution, for the Monte-Carlo ("true") Fisher.

The true Fisher is ``F = E_x E_{y ~ p(y|x,θ)} [∇ log p ∇ log pᵀ]`` (Martens & Grosse 2015 §5):
the targets are *sampled from the model*, not the data's. Each likelihood defines the
per-sample negative log-likelihood ``ℓ_n(y) = −log p(y | f_n)`` of the network output
``f_n``; its gradient with respect to the layer pre-activations is KFAC's ``δ``.

* ``categorical``: ``f`` are logits ``[N, C]``; ``y ~ Cat(softmax(f))``; ``ℓ = CE(f, y)``.
* ``bernoulli``: ``f`` are logits ``[N, ...]``; ``y ~ Bernoulli(σ(f))`` elementwise;
  ``ℓ = Σ_k BCE(σ(f_k), y_k)`` (summed over output features).
* ``gaussian``: ``f`` are means ``[N, ...]``; ``y ~ N(f, I)``; ``ℓ = ½‖y − f‖²`` (so
  ``0.5 * F.mse_loss(f, y, reduction="sum") / N`` is the matching training loss).

The matching training losses take the *mean over samples* of these per-sample losses
(sum over output features): e.g. ``BCEWithLogits(reduction="sum") / N``; with
``loss_reduction="mean"`` they are torch's defaults instead (:func:`mean_scale`).

Targets are drawn on the generator's device (the optimizers' sampler is a CPU generator,
whose state a checkpoint restores on any machine) and then moved to the output's: for a
model on a GPU the Fisher mini-batch's probabilities make a round trip through host memory,
and the samples are those a CPU run draws from the same probabilities.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Likelihood = Literal["categorical", "bernoulli", "gaussian"]
LIKELIHOODS: tuple[str, ...] = get_args(Likelihood)


def sample_targets(output: Tensor, likelihood: str, generator: torch.Generator | None) -> Tensor:
    """Draw one target per sample from the model's predictive distribution (on the
    generator's device, returned on ``output``'s)."""
    output = output.detach()
    device = output.device if generator is None else generator.device
    return _draw(output.to(device), likelihood, generator).to(output.device)


def check_output(output: Tensor, likelihood: str) -> None:
    """Refuse an output the likelihood cannot describe (its Fisher would be silently wrong).

    Raises:
        ValueError: ``categorical`` on anything but ``[N, C]`` logits with ``C ≥ 2`` (one
            logit has ``softmax = 1``: every sampled gradient, so every ``G``, is 0).
    """
    if likelihood != "categorical":
        return
    if output.dim() != 2:
        raise ValueError(
            f"likelihood='categorical' expects logits of shape [N, C], got {tuple(output.shape)}"
        )
    if output.shape[1] < 2:
        raise ValueError(
            f"likelihood='categorical' on a model output of shape {tuple(output.shape)}: one "
            "logit per sample has softmax 1, so the Monte-Carlo Fisher (every G factor) would "
            "be 0. Use likelihood='gaussian' for a regression output (MSE loss) or "
            "likelihood='bernoulli' for a single binary logit (BCEWithLogits loss)"
        )


def _draw(output: Tensor, likelihood: str, generator: torch.Generator | None) -> Tensor:
    check_output(output, likelihood)
    if likelihood == "categorical":
        probs = torch.softmax(output.float(), dim=1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if likelihood == "bernoulli":
        probs = torch.sigmoid(output)
        return torch.bernoulli(probs, generator=generator)
    if likelihood == "gaussian":
        noise = torch.randn(
            output.shape, generator=generator, dtype=output.dtype, device=output.device
        )
        return output + noise
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def summed_nll(output: Tensor, target: Tensor, likelihood: str) -> Tensor:
    """``Σ_n ℓ_n(y_n)``: its gradient w.r.t. sample n's pre-activations is ``δ_n``."""
    if likelihood == "categorical":
        return F.cross_entropy(output, target, reduction="sum")
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(output, target, reduction="sum")
    if likelihood == "gaussian":
        return 0.5 * (output - target).square().sum()
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


LossReduction = Literal["sum", "mean"]
LOSS_REDUCTIONS: tuple[str, ...] = get_args(LossReduction)


def mean_scale(likelihood: str, features: int) -> float:
    """``s`` with ``ℓ_mean = s · ℓ_sum`` per sample, ``D = features`` output features:
    torch's default reductions against the summed negative log-likelihood.

    * ``bernoulli``: ``BCEWithLogitsLoss()`` averages ``Σ_k BCE_k`` over ``D``: ``s = 1/D``;
    * ``gaussian``: ``MSELoss()`` is ``(1/D) Σ_k (y_k − f_k)²``, against ``½‖y − f‖²``:
      ``s = 2/D``;
    * ``categorical``: ``CrossEntropyLoss()`` has one term per sample: ``s = 1``.

    The Fisher of the ``mean`` loss is ``s²`` times the ``sum`` loss's.
    """
    if likelihood == "bernoulli":
        return 1.0 / features
    if likelihood == "gaussian":
        return 2.0 / features
    return 1.0


def sampled_nll(
    output: Tensor,
    likelihood: str,
    generator: torch.Generator | None,
    reduction: str = "sum",
) -> Tensor:
    """The per-sample loss of targets sampled from the model itself, summed over the
    samples: the negative log-likelihood (``reduction="sum"``), or torch's default loss of
    the likelihood per sample (``"mean"``: ``MSELoss()``, ``BCEWithLogitsLoss()``,
    ``CrossEntropyLoss()``; :func:`mean_scale` times the NLL)."""
    loss = summed_nll(output, sample_targets(output, likelihood, generator), likelihood)
    if reduction == "mean":
        loss = loss * mean_scale(likelihood, output[0].numel())
    return loss


def output_hessian(output: Tensor, likelihood: str) -> Tensor:
    """Per-sample Hessian of ``ℓ_n`` w.r.t. the (flattened) output, ``[N, K, K]``.

    It equals ``E_y[∇_f ℓ ∇_f ℓᵀ]`` for these exponential-family likelihoods, so the
    exact true Fisher is ``(1/N) Σ_n J_nᵀ H_n J_n``.
    categorical: ``diag(p) − p pᵀ``; bernoulli: ``diag(p(1−p))``; gaussian: ``I``.
    """
    check_output(output, likelihood)
    flat = output.detach().reshape(output.shape[0], -1)
    if likelihood == "categorical":
        p = torch.softmax(flat, dim=1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    if likelihood == "bernoulli":
        p = torch.sigmoid(flat)
        return torch.diag_embed(p * (1 - p))
    if likelihood == "gaussian":
        eye = torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
        return eye.expand(flat.shape[0], -1, -1).clone()
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
