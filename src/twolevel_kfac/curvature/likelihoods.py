"""Likelihoods of the model's predictive distribution, for the Monte-Carlo ("true") Fisher.

The true Fisher is ``F = E_x E_{y ~ p(y|x,θ)} [∇ log p ∇ log pᵀ]`` (Martens & Grosse 2015 §5):
the targets are *sampled from the model*, not the data's. Each likelihood defines the
per-sample negative log-likelihood ``ℓ_n(y) = −log p(y | f_n)`` of the network output
``f_n``; its gradient with respect to the layer pre-activations is KFAC's ``δ``.

* ``categorical``: ``f`` are logits ``[N, C]``; ``y ~ Cat(softmax(f))``; ``ℓ = CE(f, y)``.
  Logits with positions (``class_dim``): ``[N, T, C]`` (``class_dim=-1``, a language
  model) or ``[N, C, d₁, …]`` (``class_dim=1``, torch's ``CrossEntropyLoss`` layout); one
  independent draw per position ``t`` and ``ℓ = Σ_t m_t CE(f_t, y_t)``, ``m`` the mask of
  the positions the training loss counts (its targets not ``ignore_index``; all by default).
* ``bernoulli``: ``f`` are logits ``[N, ...]``; ``y ~ Bernoulli(σ(f))`` elementwise;
  ``ℓ = Σ_k BCE(σ(f_k), y_k)`` (summed over output features).
* ``gaussian``: ``f`` are means ``[N, ...]``; ``y ~ N(f, I)``; ``ℓ = ½‖y − f‖²`` (so
  ``0.5 * F.mse_loss(f, y, reduction="sum") / N`` is the matching training loss).

The matching training losses take the *mean over samples* of these per-sample losses
(sum over output features and positions): e.g. ``BCEWithLogits(reduction="sum") / N``;
with ``loss_reduction="mean"`` they are torch's defaults instead (:func:`mean_scale`: a
mean over features, and over the counted positions of the whole batch).

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
from torch.autograd.graph import GradientEdge

Likelihood = Literal["categorical", "bernoulli", "gaussian"]
LIKELIHOODS: tuple[str, ...] = get_args(Likelihood)


def sample_targets(
    output: Tensor,
    likelihood: str,
    generator: torch.Generator | None,
    class_dim: int | None = None,
) -> Tensor:
    """Draw one target per sample (per position, for categorical logits with ``class_dim``)
    from the model's predictive distribution (on the generator's device, returned on
    ``output``'s); categorical targets have the shape of :func:`positions_shape`."""
    output = output.detach()
    device = output.device if generator is None else generator.device
    return _draw(output.to(device), likelihood, generator, class_dim).to(output.device)


def classes_last(output: Tensor, class_dim: int | None) -> Tensor:
    """Categorical logits as ``[N, P, C]``: the class dimension last, the other non-batch
    dimensions flattened to ``P`` positions (in ``output``'s order; ``P = 1`` for
    ``[N, C]``)."""
    if output.dim() == 2:
        return output.unsqueeze(1)
    assert class_dim is not None
    moved = output.movedim(class_dim, -1)
    return moved.flatten(1, -2) if moved.dim() > 2 else moved.unsqueeze(1)


def positions_shape(output: Tensor, class_dim: int | None) -> tuple[int, ...]:
    """The shape of categorical targets (and of a loss mask) for ``output``: without its
    class dimension (``[N]`` for ``[N, C]``, ``[N, T]`` for ``[N, T, C]``)."""
    if output.dim() == 2:
        return (int(output.shape[0]),)
    assert class_dim is not None
    dim = class_dim % output.dim()
    return tuple(int(n) for i, n in enumerate(output.shape) if i != dim)


def check_output(
    output: Tensor, likelihood: str, class_dim: int | None = None, samples: int = 1
) -> None:
    """Refuse an output the likelihood cannot describe (its Fisher would be silently wrong).

    Raises:
        ValueError: a 0-dim output of a forward of ``samples > 1`` (a model that returns
            its loss: no prediction per sample to draw from);
        ValueError: ``categorical`` on logits with positions (more than 2 dimensions) and
            no ``class_dim`` (``[N, T, C]`` and torch's ``[N, C, T]`` are both common), with
            ``class_dim`` the batch dimension, or with fewer than 2 classes (one logit has
            ``softmax = 1``: every sampled gradient, so every ``G``, is 0); probabilities
            for logits (:func:`check_logits`).
    """
    if not output.dim() and samples > 1:
        raise ValueError(
            f"fisher='mc' draws each sample's targets from the model's prediction for it, but "
            f"the model returned a 0-dim tensor for a batch of {samples} samples (its loss?): "
            "return the predictions from forward and compute the loss outside it, or use "
            "fisher='empirical', which reads the loss's own gradients"
        )
    check_logits(output, likelihood)
    if likelihood != "categorical":
        return
    if output.dim() < 2:
        raise ValueError(
            f"likelihood='categorical' (fisher='mc''s default) expects logits of shape [N, "
            f"C], got {tuple(output.shape)}: one logit per sample (a click model's BCE) takes "
            "likelihood='bernoulli', one value per sample under MSE likelihood='gaussian'; "
            "for one unbatched sample, call the model on a batch (x[None])"
        )
    if output.dim() > 2 and class_dim is None:
        raise ValueError(
            f"likelihood='categorical' (fisher='mc''s default) on a model output of shape "
            f"{tuple(output.shape)}: which dimension holds the classes? Pass class_dim=-1 "
            "for [N, T, C] (a language model's logits) or class_dim=1 for torch's "
            "CrossEntropyLoss layout [N, C, d1, ...]. Each position is then a categorical "
            "of its own (set_loss_mask for ignore_index targets). An output that is not "
            "logits takes another likelihood: likelihood='gaussian' for a regression or a "
            "denoiser's MSE (an image, predicted noise), 'bernoulli' for BCE-with-logits"
        )
    if class_dim is not None and class_dim % output.dim() == 0:
        raise ValueError(f"class_dim={class_dim} is the batch dimension of {tuple(output.shape)}")
    classes = output.shape[1] if output.dim() == 2 else output.shape[class_dim]  # type: ignore[index]
    if classes < 2:
        raise ValueError(
            f"likelihood='categorical' on a model output of shape {tuple(output.shape)}: one "
            "logit per sample has softmax 1, so the Monte-Carlo Fisher (every G factor) would "
            "be 0. Use likelihood='gaussian' for a regression output (MSE loss) or "
            "likelihood='bernoulli' for a single binary logit (BCEWithLogits loss), or "
            "fisher='empirical' for another loss (Poisson, Huber, L1: neither is its Fisher)"
        )


_PROBABILITIES = {"categorical": "SoftmaxBackward0", "bernoulli": "SigmoidBackward0"}
# operations whose output is (some of) their inputs' values, moved, copied, clamped or
# picked: probabilities stay probabilities through them
_PASSING = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "AliasBackward0",
        "TransposeBackward0",
        "TBackward0",
        "PermuteBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
        "SliceBackward0",
        "SelectBackward0",
        "SplitBackward0",
        "SplitWithSizesBackward0",
        "UnbindBackward0",
        "ToCopyBackward0",
        "CloneBackward0",
        "ExpandBackward0",
        "ClampBackward0",
        "ClampBackward1",
        "ClampMinBackward0",
        "ClampMaxBackward0",
        "NanToNumBackward0",
        "FlipBackward0",
        "RollBackward0",
        "CatBackward0",
        "StackBackward0",
        "IndexBackward0",
        "IndexSelectBackward0",
        "GatherBackward0",
        "WhereBackward0",
        "MaskedFillBackward0",
        "MaskedFillBackward1",
        "MaskedSelectBackward0",
        "ConstantPadNdBackward0",
        "RepeatBackward0",
    }
)


def made_by(output: Tensor, *targets: str) -> bool:
    """Whether an autograd node named in ``targets`` (``"SoftmaxBackward0"``) reaches
    ``output`` through operations that keep values (:data:`_PASSING`: views, copies, casts,
    clamps, flips, concatenations, indexing, masked fills, padding, repeats; every input of
    a ``cat`` or ``where``)."""
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name in targets:
            return True
        if name in _PASSING:
            stack.extend(fn for fn, _ in node.next_functions)
    return False


def check_logits(output: Tensor, likelihood: str) -> None:
    """Refuse a model output made by a softmax (``categorical``) or a sigmoid
    (``bernoulli``): probabilities, which the likelihood would read as logits (a trial:
    ``G`` 0.94 off the exact Fisher's, its trace 0.06 of it), also where views, casts,
    clamps, flips, concatenations or indexing lie between (:func:`made_by`).
    ``log_softmax`` outputs are logits of the same distribution, and pass.

    Raises:
        ValueError: naming the output's last operation and the fix.
    """
    if likelihood in _PROBABILITIES and made_by(output, _PROBABILITIES[likelihood]):
        which, logits, loss = (
            ("softmax", "logits (or log_softmax)", "F.cross_entropy")
            if likelihood == "categorical"
            else ("sigmoid", "logits", "BCEWithLogitsLoss")
        )
        raise ValueError(
            f"the model output is a {which} (probabilities), but fisher='mc' with "
            f"likelihood={likelihood!r} samples from logits: return the {logits} from "
            f"forward and take the {which} in the loss ({loss}), or use fisher='empirical', "
            "which reads the loss's own gradients"
        )


def _draw(
    output: Tensor, likelihood: str, generator: torch.Generator | None, class_dim: int | None
) -> Tensor:
    check_output(output, likelihood, class_dim)
    if likelihood == "categorical":
        logits = classes_last(output, class_dim)
        # at least float32 (a half dtype's softmax), never narrower: float64 logits beyond
        # float32's range would become ±inf and the probabilities NaN
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = torch.softmax(wide.reshape(-1, logits.shape[-1]), dim=1)
        draws = torch.multinomial(probs, 1, generator=generator)
        return draws.reshape(positions_shape(output, class_dim))
    if likelihood == "bernoulli":
        probs = torch.sigmoid(output)
        return torch.bernoulli(probs, generator=generator)
    if likelihood == "gaussian":
        noise = torch.randn(
            output.shape, generator=generator, dtype=output.dtype, device=output.device
        )
        return output + noise
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def summed_nll(
    output: Tensor,
    target: Tensor,
    likelihood: str,
    class_dim: int | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``Σ_n ℓ_n(y_n)``: its gradient w.r.t. sample n's pre-activations is ``δ_n``
    (categorical: ``Σ_{n,t} m_{nt} CE(f_{nt}, y_{nt})``, ``mask`` ``m`` of the shape of
    :func:`positions_shape`, all ones by default)."""
    if likelihood == "categorical":
        logits = classes_last(output, class_dim)
        terms = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        )
        if mask is not None:
            terms = terms * mask.reshape(-1).to(terms.dtype)
        return terms.sum()
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(output, target, reduction="sum")
    if likelihood == "gaussian":
        return 0.5 * (output - target).square().sum()
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


LossReduction = Literal["sum", "mean"]
LOSS_REDUCTIONS: tuple[str, ...] = get_args(LossReduction)


def mean_scale(likelihood: str, features: float, positions: float = 1.0) -> float:
    """``s`` with ``ℓ_mean = s · ℓ_sum`` per sample, ``D = features`` output features:
    torch's default reductions against the summed negative log-likelihood.

    * ``bernoulli``: ``BCEWithLogitsLoss()`` averages ``Σ_k BCE_k`` over ``D``: ``s = 1/D``;
    * ``gaussian``: ``MSELoss()`` is ``(1/D) Σ_k (y_k − f_k)²``, against ``½‖y − f‖²``:
      ``s = 2/D``;
    * ``categorical``: ``CrossEntropyLoss()`` averages over the counted positions of the
      batch (``N_tok``, those whose target is not ``ignore_index``): with
      ``positions = N_tok / N`` per sample, ``s = N / N_tok`` (``1`` for ``[N, C]``).

    The Fisher of the ``mean`` loss is ``s²`` times the ``sum`` loss's.
    """
    if likelihood == "bernoulli":
        return 1.0 / features
    if likelihood == "gaussian":
        return 2.0 / features
    return 1.0 / positions


def sampled_nll(
    output: Tensor,
    likelihood: str,
    generator: torch.Generator | None,
    reduction: str = "sum",
    class_dim: int | None = None,
    mask: Tensor | None = None,
    positions: float = 1.0,
    samples: int | None = None,
) -> Tensor:
    """The per-sample loss of targets sampled from the model itself, summed over the
    samples: the negative log-likelihood (``reduction="sum"``), or torch's default loss of
    the likelihood per sample (``"mean"``: ``MSELoss()``, ``BCEWithLogitsLoss()``,
    ``CrossEntropyLoss()``; :func:`mean_scale` times the NLL, ``positions`` the counted
    positions per sample of the whole batch, of ``samples`` samples (default: the output's
    rows; an output of other rows, ``[M, D]`` of a batch of ``N``, has ``M·D/N`` features
    per sample). ``class_dim``, ``mask``: :func:`summed_nll`."""
    target = sample_targets(output, likelihood, generator, class_dim)
    loss = summed_nll(output, target, likelihood, class_dim, mask)
    if reduction == "mean":
        features = output.numel() / (len(output) if samples is None else samples)
        loss = loss * mean_scale(likelihood, features, positions)
    return loss


def output_hessian(output: Tensor, likelihood: str) -> Tensor:
    """Per-sample Hessian of ``ℓ_n`` w.r.t. the (flattened) output, ``[N, K, K]``.

    It equals ``E_y[∇_f ℓ ∇_f ℓᵀ]`` for these exponential-family likelihoods, so the
    exact true Fisher is ``(1/N) Σ_n J_nᵀ H_n J_n``.
    categorical: ``diag(p) − p pᵀ``; bernoulli: ``diag(p(1−p))``; gaussian: ``I``.
    """
    check_output(output, likelihood)
    flat = output.detach().reshape(output.shape[0], output.shape[1:].numel())
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


def per_sample_output(
    output: Tensor, samples: int, likelihood: str, class_dim: int | None
) -> tuple[Tensor, int | None]:
    """A model output of ``R = k·N`` rows (``k > 1``, ``N = samples`` the forward's
    samples; the caller proved them in the batch's order: :func:`~.calls.sample_major`)
    as ``[N, k, …]``, with the class dimension that view has: logits or predictions
    flattened batch-first inside ``forward`` (``[N·T, C]``) are ``T`` positions of each
    sample, as the layers' rows are (:func:`~.calls.per_sample`), so the sampled loss
    scales as the unflattened model's (``mean``: ``s`` per sample, not per row) and a loss
    mask applies to them. Categorical ``[N·T, C]`` logits get ``class_dim = −1``; a
    non-negative ``class_dim`` moves one dimension on. Other outputs: as they are."""
    rows = int(output.shape[0]) if output.dim() else 0
    if samples < 1 or rows == samples or rows % samples:
        return output, class_dim
    view = output.reshape(samples, rows // samples, *output.shape[1:])
    if likelihood == "categorical" and class_dim is None and output.dim() == 2:
        return view, -1
    if class_dim is not None and class_dim >= 0:
        return view, class_dim + 1
    return view, class_dim


def sampled_gradients(loss: Tensor, edges: list[GradientEdge]) -> tuple[Tensor | None, ...]:
    """The MC Fisher's ``δ``: the sampled loss's gradients at the layer outputs (``None``
    for one the loss does not reach), the graph kept for the user's backward.

    Raises:
        RuntimeError: a ``torch.compile``'d model's donated buffers forbid it, with the fix.
    """
    try:
        return torch.autograd.grad(loss, edges, retain_graph=True, allow_unused=True)
    except RuntimeError as error:
        if "donated buffer" not in str(error):
            raise
        raise RuntimeError(
            "fisher='mc' differentiates its sampled loss through the forward's graph "
            "before your backward does (retain_graph=True), which the donated buffers of "
            "a torch.compile'd model's backward forbid: use fisher='empirical', or set "
            "torch._functorch.config.donated_buffer = False before compiling"
        ) from error


def sampled_output(output: object) -> Tensor:
    """What ``fisher="mc"`` samples its targets from: the model output, or a dict's (an HF
    ``ModelOutput``'s) ``"logits"``.

    Raises:
        TypeError: another form (a tuple, a dict without ``"logits"``), with the ways out.
    """
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, Tensor):
        return output
    raise TypeError(
        "fisher='mc' samples its targets from the model's output, which must be one tensor or "
        f"a dict with a 'logits' tensor (an HF ModelOutput); got {type(output).__name__}. "
        "Return the tensor the loss reads from forward (the mean, for a model that also "
        "predicts a variance: likelihood='gaussian' has unit variance), or use "
        "fisher='empirical', which reads the loss's own gradients whatever the output"
    )
