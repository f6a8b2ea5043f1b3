"""Embedding indices shared by the whole batch: positions, a task code or a relative-position
table looked up once and broadcast over the samples, whose output rows hold gradients summed
over them (refused: :func:`check_unbatched_embedding`; warned of where they have as many
rows as the batch, which a batch may have too)."""

from __future__ import annotations

import warnings
import weakref

from torch import Tensor, nn

from ..warning_level import caller_level

__all__ = ["check_unbatched_embedding"]

_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the tables warned of
_FIX = (
    "Call it with the batch first: e.g. pos(torch.arange(T).expand(B, T)) for a position "
    "table (Hugging Face models that take position_ids: model(..., position_ids="
    "torch.arange(T).expand(B, T))), or leave the table out of this optimizer's params and "
    "give it a torch optimizer of its own (T5's relative_attention_bias: a parameter left "
    "out of params takes no step from this optimizer). A soft prompt looked up once for "
    "the batch (peft's prompt tuning) likewise, or write it as an nn.Embedding called on "
    "torch.arange(P).expand(B, P)"
)


def check_unbatched_embedding(name: str, module: nn.Module, inputs: Tensor, batch: int) -> None:
    """Refuse an embedding table called on positions shared by the whole batch (nanoGPT's
    ``pos(torch.arange(T))``, GPT-2's ``pos(torch.arange(T)[None])``, broadcast over a batch
    of ``B > 1``): each output row then gets the gradient summed over the samples, and KFAC's
    ``G`` would be formed from those sums as if they were samples, a silently wrong step.
    Recognised by the indices themselves: one index (a task's code looked up for the whole
    batch, ``task(torch.tensor([t]))``), a leading dimension of 1, a 1-D run ``a, a + 1,
    …, a + n − 1`` (flattened tokens are no such run but by a chance no real batch has), or
    an ``[n, m]`` Toeplitz matrix, not constant, with ``n, m > 2`` (T5's relative-position
    buckets ``[T, T]``, broadcast over the batch: a step 15× too large in a trial; a
    constant one is token types of zeros, flattened choices ``[B·k, T]`` of a
    multiple-choice model). A run or a Toeplitz matrix of ``n = B`` rows may be a batch
    (dataset indices in order; the position ids of a left-padded batch whose samples have
    0, 1, …, B − 1 pads): it is warned of once per layer, not refused (before 2026-12-08 it
    passed without a word, and T5 at a batch size equal to its lengths stepped 2.3–6.8 off
    on its relative-position tables). Other forms (a constant token type shared by the
    batch) are not recognised (README).

    Raises:
        RuntimeError: naming the layer and the batched call that fixes it.
    """
    if not isinstance(module, nn.Embedding) or batch <= 1:
        return
    count = inputs.shape[-1] if inputs.dim() else 1
    shared = inputs.dim() == 0 or inputs.numel() == 1 or (inputs.dim() > 1 and len(inputs) == 1)
    if inputs.dim() == 1 and count > 1:
        shared = bool((inputs[1:] - inputs[:-1] == 1).all())
    elif inputs.dim() == 2 and min(inputs.shape) > 2:
        toeplitz = bool((inputs[1:, 1:] == inputs[:-1, :-1]).all())  # (i, j) by j − i
        shared = toeplitz and bool((inputs != inputs[0, 0]).any())  # (not constant)
    if shared and inputs.dim() > 0 and len(inputs) == batch and inputs.numel() > 1:
        if module not in _WARNED:
            _WARNED.add(module)
            warnings.warn(
                f"layer {name!r} (an embedding) was called with indices of shape "
                f"{tuple(inputs.shape)} that look shared by the whole batch (a run a, a + 1, "
                "…, or a Toeplitz matrix such as T5's relative-position buckets) but have as "
                f"many rows as the batch ({batch}): if they are looked up once and broadcast "
                f"over it, the step is wrong. {_FIX}. If they are one row per sample (dataset "
                "indices in order, position ids of left padding), ignore this",
                RuntimeWarning,
                stacklevel=caller_level(),
            )
        return
    if shared:
        raise RuntimeError(
            f"layer {name!r} (an embedding) was called with indices of shape "
            f"{tuple(inputs.shape)} that are not one row per sample of the batch of {batch}: "
            "positions shared by the whole batch (broadcast over it) give rows with the "
            "gradients summed over the samples, and one call per sample (a loop in forward) "
            f"is not a batch either; KFAC needs one call with a row per sample. {_FIX}"
        )
