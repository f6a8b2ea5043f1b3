"""Embedding indices shared by the whole batch: positions, a task code or a relative-position
table looked up once and broadcast over the samples, whose output rows hold gradients summed
over them (refused: :func:`check_unbatched_embedding`)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["check_unbatched_embedding"]


def check_unbatched_embedding(name: str, module: nn.Module, inputs: Tensor, batch: int) -> None:
    """Refuse an embedding table called on positions shared by the whole batch (nanoGPT's
    ``pos(torch.arange(T))``, GPT-2's ``pos(torch.arange(T)[None])``, broadcast over a batch
    of ``B > 1``): each output row then gets the gradient summed over the samples, and KFAC's
    ``G`` would be formed from those sums as if they were samples, a silently wrong step.
    Recognised by the indices themselves: one index (a task's code looked up for the whole
    batch, ``task(torch.tensor([t]))``), a leading dimension of 1, a 1-D run ``a, a + 1,
    …, a + n − 1`` with ``n ≠ B`` (flattened tokens are no such run but by a chance no real
    batch has), or an ``[n, m]`` Toeplitz matrix, not constant, with ``n ≠ B`` and
    ``n, m > 2`` (T5's relative-position buckets ``[T, T]``, broadcast over the batch: a
    step 15× too large in a trial; a constant one is token types of zeros, flattened
    choices ``[B·k, T]`` of a multiple-choice model). Other forms (a constant token type
    shared by the batch, ``n = B``) are not recognised (README).

    Raises:
        RuntimeError: naming the layer and the batched call that fixes it.
    """
    if not isinstance(module, nn.Embedding) or batch <= 1:
        return
    count = inputs.shape[-1] if inputs.dim() else 1
    shared = inputs.dim() == 0 or inputs.numel() == 1 or (inputs.dim() > 1 and len(inputs) == 1)
    if inputs.dim() == 1 and count != batch and count > 1:
        shared = bool((inputs[1:] - inputs[:-1] == 1).all())
    elif inputs.dim() == 2 and len(inputs) != batch and min(inputs.shape) > 2:
        toeplitz = bool((inputs[1:, 1:] == inputs[:-1, :-1]).all())  # (i, j) by j − i
        shared = toeplitz and bool((inputs != inputs[0, 0]).any())  # (not constant)
    if shared:
        raise RuntimeError(
            f"layer {name!r} (an embedding) was called with indices of shape "
            f"{tuple(inputs.shape)} that are not one row per sample of the batch of {batch}: "
            "positions shared by the whole batch (broadcast over it) give rows with the "
            "gradients summed over the samples, and one call per sample (a loop in forward) "
            "is not a batch either; KFAC needs one call with a row per sample. Call it with "
            "the batch first: e.g. pos(torch.arange(T).expand(B, T)) for a position table "
            "(Hugging Face models that take position_ids: model(..., position_ids="
            "torch.arange(T).expand(B, T))), or leave the table out of the optimizer's params "
            "(T5's relative_attention_bias: it then takes the fallback step). A soft "
            "prompt looked up once for the batch (peft's prompt tuning) has no block here: "
            "leave it out of params and give it a torch optimizer, or write it as an "
            "nn.Embedding called on torch.arange(P).expand(B, P)"
        )
