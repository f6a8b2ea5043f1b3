"""The positions of categorical logits with positions (``[N, T, C]``, a language model) that
the training loss counts: those whose target is not ``ignore_index``.

The MC Fisher samples its targets while the model's forward runs, before the loss and its
targets exist, so the mask comes first: ``opt.set_loss_mask(y != ignore_index)`` before
``model(x)`` (:meth:`~.capture.CurvatureCapture.set_loss_mask`). The sampled loss then
counts the same positions as the training loss, ``ℓ_n = s Σ_t m_{nt} CE(f_{nt}, ŷ_{nt})``
(:func:`~.likelihoods.sampled_nll`), and ``loss_reduction="mean"``'s ``s = N / N_tok``
uses the whole batch's count ``N_tok = Σ m``, as ``F.cross_entropy(..., ignore_index=…)``.

The user's loss gradient tells afterwards which positions it counted (an ignored position's
logits get exactly zero gradient): :func:`mask_disagreement` compares, so a forgotten or
wrong mask is reported instead of silently sampling the padding's Fisher; and a gradient
that does not sum to zero over the classes tells that the output is not the logits of a
softmax loss (:func:`off_simplex_share`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..warning_level import caller_level
from .forward_pass import ForwardPass, check_first_order, inputs_of
from .hooks import on_gradient
from .likelihoods import made_by, positions_shape
from .token_mean import TokenMean

__all__ = [
    "check_loss_mask",
    "counted_mask",
    "counted_positions",
    "drawable",
    "mask_disagreement",
    "off_simplex_share",
    "warn_ignored_features",
    "warn_loss_gradient",
    "watch_loss_gradient",
]


def drawable(output: Tensor, likelihood: str, class_dim: int | None = None) -> bool:
    """Whether ``fisher="mc"`` can draw targets from ``output``: finite, or categorical
    logits masked with ``-inf`` (invalid actions, masked classes: probability 0, never
    drawn), with no NaN, no ``+inf`` and a finite logit in every row (along ``class_dim``,
    default the last). Before 2026-12-08 any ``-inf`` skipped the step's statistics: the
    step took the previous batch's factors without a word, or, at the first capture,
    failed with a message about ``torch.no_grad``."""
    output = output.detach()
    if likelihood != "categorical":
        return bool(torch.isfinite(output).all())
    if bool((torch.isnan(output) | torch.isposinf(output)).any()):
        return False
    return bool(torch.isfinite(output).any(dim=-1 if class_dim is None else class_dim).all())


def check_mask_likelihood(mask: Tensor | None, fisher: str, likelihood: str) -> None:
    """Refuse a loss mask under ``fisher="mc"`` with a likelihood other than
    ``categorical``, which samples every output element at the scale of the mean over all."""
    if mask is not None and fisher == "mc" and likelihood != "categorical":
        raise ValueError(
            f"set_loss_mask marks categorical logits' positions; fisher='mc' with likelihood"
            f"={likelihood!r} samples every output element at the scale of the mean over all: "
            "a loss over some positions (masked regression) needs 'empirical'"
        )


def check_loss_mask(mask: Tensor, output: Tensor, class_dim: int | None) -> None:
    """Refuse a mask that does not mark ``output``'s positions.

    Raises:
        ValueError: ``mask`` is not boolean or its shape is not ``output``'s without the
            class dimension.
    """
    expected = positions_shape(output, class_dim)
    if mask.dtype != torch.bool:
        raise ValueError(
            f"set_loss_mask expects a boolean mask (e.g. targets != ignore_index); got dtype "
            f"{mask.dtype}"
        )
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"set_loss_mask got a mask of shape {tuple(mask.shape)}, but the model output "
            f"{tuple(output.shape)} (class_dim={class_dim}) has positions of shape {expected}: "
            "the mask marks each target position of the next forward's whole batch"
        )


def counted_positions(
    mask: Tensor | None, output: Tensor, class_dim: int | None, samples: int
) -> float:
    """``N_tok / N``: the counted positions per sample of the whole batch of ``N = samples``
    (at least one position in all, so that a batch without any counted target gives zero
    statistics). An output whose rows are not the samples (a
    masked-LM head on the masked positions ``[M, C]``, a time-major ``[T, N, C]``) counts
    its positions all the same: ``M / N`` (``CrossEntropyLoss()``'s mean is over ``M``)."""
    shape = positions_shape(output, class_dim)
    counted = math.prod(shape) if mask is None else max(int(mask.sum()), 1)
    return counted / samples


def counted_mask(
    mask: Tensor | None, output: Tensor, class_dim: int | None, likelihood: str, samples: int
) -> tuple[Tensor | None, float]:
    """The loss mask checked and on ``output``'s device, with :func:`counted_positions` of
    the batch of ``samples``, for the sampled loss of categorical logits (``(None, 1.0)``
    for the other likelihoods)."""
    if likelihood != "categorical":
        return None, 1.0
    if mask is not None:
        check_loss_mask(mask, output, class_dim)
        mask = mask.to(output.device)
    return mask, counted_positions(mask, output, class_dim, samples)


_SHIFTED = (
    " (labels that the model shifts inside forward, as a Hugging Face *ForCausalLM does: "
    "mask = torch.zeros_like(labels, dtype=torch.bool); mask[:, :-1] = labels[:, 1:] != -100)"
)


def mask_disagreement(
    grad: Tensor, mask: Tensor | None, class_dim: int | None
) -> tuple[str, str] | None:
    """What is wrong, if anything, between the positions the user's loss counted (a
    nonzero gradient at the logits ``grad``: a counted position's cross-entropy gradient
    ``p − e_y`` is never exactly zero) and the mask the Fisher was sampled with: none given
    while the loss ignores positions, or a mask that leaves out counted positions, or one
    that counts ignored positions: ``(kind, message)``, or ``None``."""
    logits = grad.movedim(class_dim, -1) if class_dim is not None else grad
    counted = (logits != 0).any(dim=-1)
    shifted = _SHIFTED if counted.dim() == 2 else ""  # (a sequence's [N, T] positions)
    if mask is None:
        if bool(counted.all()):
            return None
        ignored = int((~counted).sum())
        return "forgotten", (
            f"the training loss ignores {ignored} of {counted.numel()} positions of the logits "
            "(their gradient is exactly zero: ignore_index or padding, or a saturated "
            "softmax that is exactly one-hot), but no loss mask was given, so fisher='mc' "
            "sampled their Fisher too. If the loss ignores targets, call "
            "opt.set_loss_mask(targets != ignore_index) before the forward" + shifted
        )
    mask = mask.to(counted.device)
    if bool((counted & ~mask).any()):
        return "too few", (
            "the training loss has a gradient at positions the loss mask leaves out: the mask "
            "given to set_loss_mask does not match the loss's targets"
        )
    if bool((mask & ~counted).any()):
        extra = int((mask & ~counted).sum())
        return "too many", (
            f"the loss mask counts {extra} position(s) where the training loss has no "
            "gradient (ignored targets, padding): fisher='mc' sampled their Fisher. Build "
            "the mask from the positions the loss reads (targets != ignore_index; for CTC, "
            "each sample's input frames), not from the padded inputs" + shifted
        )
    return None


def off_simplex_share(grad: Tensor, class_dim: int | None) -> float:
    """The share of the training loss's gradient at the logits that lies along the all-ones
    direction of the classes, ``‖Σ_c g_{·c}‖₂ / (√C ‖g‖₂)`` (0 when ``g = 0``).

    Every loss of ``log_softmax(f)`` (cross-entropy, label smoothing, class weights, focal,
    KL distillation) is unchanged by ``f + s·1``, so its gradient sums to zero over the
    classes: the share is rounding. The categorical Fisher has no curvature along ``1``
    either (each sampled ``δ = softmax(f) − e_ŷ`` sums to zero), so a gradient with a share
    there (an embedding under a contrastive or triplet loss, an MSE or multi-label BCE
    output) is multiplied by about ``1/λ`` along it."""
    logits = grad.movedim(class_dim, -1) if class_dim is not None else grad
    total = float(torch.linalg.vector_norm(logits))
    if total == 0.0 or not math.isfinite(total):
        return 0.0
    along = float(torch.linalg.vector_norm(logits.sum(dim=-1)))
    return along / (math.sqrt(logits.shape[-1]) * total)


def normalized(output: Tensor, class_dim: int) -> bool:
    """Whether ``output`` holds log-probabilities: ``logsumexp`` over the classes within
    ``max(10⁻³, 16ε)`` of zero everywhere (``log_softmax`` written out, ``z −
    z.logsumexp(-1)``; a mixture of softmaxes; a compiled ``log_softmax``)."""
    tolerance = max(1e-3, 16 * torch.finfo(output.dtype).eps)
    return bool((output.float().logsumexp(class_dim).abs() <= tolerance).all())


def warn_loss_gradient(
    grad: Tensor,
    mask: Tensor | None,
    class_dim: int | None,
    positions: bool,
    warned: set[str],
    log_probabilities: Callable[[], bool] = lambda: False,
) -> None:
    """Warn, once per kind of problem (``warned``: the kinds already said), of
    :func:`mask_disagreement` (logits with positions) and of a gradient at the categorical
    logits with more than ``max(1 %, 4ε)`` of it along the all-ones direction
    (:func:`off_simplex_share`: the output is not the logits of a softmax loss). An output
    of log-probabilities (``log_probabilities()``, asked only then: ``NLLLoss``'s gradient
    ``−e_y/N`` there does not sum to zero, its logits' does, and the parameters' gradient
    is the same) is not judged."""
    problem = mask_disagreement(grad, mask, class_dim) if positions else None
    classes = grad.shape[-1 if class_dim is None else class_dim]
    if "not logits" not in warned and classes > 1:
        share = off_simplex_share(grad, class_dim)
        if share > max(0.01, 4 * torch.finfo(grad.dtype).eps) and not log_probabilities():
            problem = (
                "not logits",
                (
                    f"the training loss's gradient at the model output does not sum to zero over "
                    f"the classes ({share:.2g} of it lies along the all-ones direction), as a "
                    "loss of log_softmax(logits) does (cross-entropy, label smoothing, KL "
                    "distillation, focal): fisher='mc' with likelihood='categorical' samples a "
                    "softmax over the output, whose Fisher has no curvature along that direction, "
                    "so the step goes about 1/damping times too far along it. For an embedding "
                    "(a contrastive or triplet loss) use fisher='empirical'; for an MSE or "
                    "multi-label BCE output, likelihood='gaussian' or 'bernoulli' (for another "
                    "loss, Poisson, Huber, L1, fisher='empirical': neither is its Fisher); for "
                    "a module whose output is not the model's logits (an optimizer built on a "
                    "backbone whose head runs outside it), build it on the whole model with "
                    f"params= the layers it preconditions; and check class_dim (now {class_dim}) "
                    "names the dimension the loss's softmax runs over"
                ),
            )
    if problem is not None and problem[0] not in warned:
        warned.add(problem[0])
        warnings.warn(problem[1], RuntimeWarning, stacklevel=caller_level())


def warn_ignored_features(grad: Tensor, values: Tensor, warned: set[str]) -> None:
    """Warn, once, where the loss's gradient at a ``gaussian`` output ``[N, …]`` is exactly 0
    at some of its elements for every sample while the output there is not 0 for some
    (``values``: a prediction equal to its target, a ReLU output's 0 on a zero border, is
    read): the Monte-Carlo Fisher samples every element at unit variance, so its ``G``
    counts outputs the loss never reads (a diffusion model's learned-variance channels
    beside the predicted noise: ``G`` 0.25 on every channel where the loss's Fisher is 1
    on the three it reads, 0 on the others, in a trial)."""
    if "ignored_features" in warned or grad.dim() < 2 or len(grad) < 2:
        return
    flat = values.reshape(len(grad), -1) if values.numel() == grad.numel() else None
    ignored = (grad.reshape(len(grad), -1) == 0).all(dim=0)
    if flat is not None:
        ignored &= (flat != 0).any(dim=0)
    count, total = int(ignored.sum()), ignored.numel()
    if count == 0 or count == total:
        return
    warned.add("ignored_features")
    warnings.warn(
        f"the loss's gradient is exactly 0 at {count} of the {total} output elements of "
        "each sample, for every sample of the batch, while likelihood='gaussian' draws a "
        "target for each: the Monte-Carlo Fisher counts outputs the loss does not read (a "
        "learned-variance half, an output left out of the loss). Return only the outputs "
        "the loss reads, or use fisher='empirical'",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def watch_loss_gradient(
    output: Tensor,
    view: torch.Size,
    forward: ForwardPass,
    class_dim: int | None,
    likelihood: str,
    warned: set[str],
    token_mean: TokenMean | None = None,
) -> None:
    """Hook the gradient the user's backward hands the model ``output`` (or the tensor it
    was cast from: :func:`~.hooks.on_gradient`): it marks the forward's backward done,
    refuses a second-order backward through it, and (``categorical``, as ``view``: the
    per-sample logits' shape) warns of :func:`warn_loss_gradient`'s problems and, with
    positions, gives it to ``token_mean`` (``loss_reduction="sum"``: :mod:`.token_mean`);
    (``gaussian``) of :func:`warn_ignored_features`'."""
    categorical, nodes, positions = likelihood == "categorical", inputs_of(output), len(view) > 2
    made = categorical and made_by(output, "LogSoftmaxBackward0", "LogBackward0")
    values = output.detach()  # (no copy, no graph)

    def log_probabilities() -> bool:
        return made or normalized(values.reshape(view), -1 if class_dim is None else class_dim)

    def backward_hook(grad: Tensor) -> None:  # the user's backward reached the output
        check_first_order("the model output", nodes)
        forward.mark_backward()
        if categorical:
            grad, mask = grad.reshape(view), forward.mask
            warn_loss_gradient(grad, mask, class_dim, positions, warned, log_probabilities)
            if positions and token_mean is not None:
                token_mean.note(grad, values.reshape(view), -1 if class_dim is None else class_dim)
        elif likelihood == "gaussian":
            warn_ignored_features(grad.reshape(view), values, warned)

    on_gradient(output, backward_hook)
