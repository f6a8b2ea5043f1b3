"""Padding the user declares: ``opt.set_padding_mask(real)`` before ``model(x)``.

Where the model's output has positions (a sequence model's logits) the positions no loss
term depends on are found and left out of the position-wise layers' factors
(:mod:`.live_positions`). A classifier's ``[N, C]`` output has none: its pooled or
max-over-points zeros cannot be told from padding, so a padded text classifier counted its
padding in ``A`` and in ``T``, and its steps changed with the padding's length. Given the
real positions ``[N, T]`` of the next forward (``True`` where a token is real: a
tokenizer's ``attention_mask``), the position-wise layers whose inputs have that
``[N, T]`` layout leave the others out, as a sequence model's dead positions: ``A`` and
``G`` average over the real positions, ``T = M/N``. Layers with another layout (a class
token prepended inside the model, a pooled head) keep every row.

A position marked as padding must reach no loss term: ``δ = 0`` there in every such layer
(the attention's ``key_padding_mask`` and a pooling that leaves the padding out make it
so). One that does is refused (leaving it out would drop a real term of the Fisher): the
attention or the pooling reads the padding, or the mask is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .layer_types import layer_type

if TYPE_CHECKING:
    from .forward_pass import Record

__all__ = ["check_padding_matched", "check_padding_unreached", "padding_rows", "real_positions"]


def real_positions(mask: Tensor | None) -> Tensor | None:
    """A ``set_padding_mask`` argument checked: ``None``, or a boolean ``[N, T]`` tensor.

    Raises:
        ValueError: another dtype or number of dimensions.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        got = f"{mask.dtype} of shape {list(mask.shape)}" if isinstance(mask, Tensor) else mask
        raise ValueError(
            "set_padding_mask expects a boolean [N, T] tensor, True at the real positions "
            f"(e.g. attention_mask.bool()); got {got}"
        )
    return mask.detach()


def padding_rows(mask: Tensor | None, batch: int, index: Tensor | None) -> Tensor | None:
    """The Fisher mini-batch's rows (``index``; all for ``None``) of the mask given for a
    forward of ``batch`` samples.

    Raises:
        ValueError: the mask's rows are not the batch's.
    """
    if mask is None:
        return None
    if int(mask.shape[0]) != batch:
        raise ValueError(
            f"set_padding_mask: the mask has {int(mask.shape[0])} rows, the model's batch "
            f"{batch} samples (the mask is for the next forward's batch)"
        )
    return mask if index is None else mask.index_select(0, index.to(mask.device))


def check_padding_matched(padding: Tensor | None, records: Iterable[Record]) -> None:
    """Refuse a mask whose ``[N, T]`` is the layout of no position-wise layer's input in
    the forward (nothing would be left out: a mask of the wrong length, or a model that
    changes its positions before its first layer).

    Raises:
        ValueError: no layer input ``[N, T, …]`` (or ``[N·T, …]`` in the batch's order).
    """
    if padding is None:
        return
    from .live_positions import position_wise  # (it imports this module)

    n, t = padding.shape
    for record in records:
        shape, entry = record.inputs.shape, layer_type(record.module)
        features = 2 if entry is not None and entry.rows_from_inputs else 3  # token ids: [N, T]
        if position_wise(record.module) and (
            (tuple(shape[:2]) == (n, t) and len(shape) >= features)
            or (record.reshaped and int(shape[0]) == n * t)
        ):
            return
    raise ValueError(
        f"set_padding_mask: no Linear or Embedding layer of this forward has inputs of the "
        f"mask's layout [N, T] = [{n}, {t}], so it leaves nothing out; pass the mask of the "
        "positions the layers see (after any token the model prepends)"
    )


def check_padding_unreached(
    layer: str, reached: Tensor, padding: Tensor, output: Tensor | None = None
) -> Tensor:
    """``padding`` (the real positions) where no position it marks as padding has a
    non-zero ``δ`` in ``layer`` (``reached``, ``[N, T]``). ``output``: the model output's
    positions with a loss term, where known: a loss term at a padded position of the same
    layout is named as the cause (under ``fisher="mc"`` without ``set_loss_mask`` the
    sampled loss has one at every position).

    Raises:
        ValueError: a padding position reaches the loss through ``layer``.
    """
    padding = padding.to(reached.device)
    stray = reached & ~padding
    if not bool(stray.any()):
        return padding
    n, t = (int(i) for i in stray.nonzero()[0])
    where = (
        f"set_padding_mask: layer {layer!r} reaches the loss at {int(stray.sum())} "
        f"position(s) marked as padding (the first: sample {n}, position {t}); leaving "
        "them out would drop real terms of the Fisher. "
    )
    if output is not None and output.shape == padding.shape:
        counted = output.to(padding.device) & ~padding
        if bool(counted.any()):
            raise ValueError(
                where + f"The loss has terms at {int(counted.sum())} of them: under "
                "fisher='mc' the sampled loss has one at every output position unless "
                "opt.set_loss_mask(real) marks those the loss counts, before the forward "
                "(categorical logits; a gaussian or bernoulli output needs "
                "fisher='empirical'); with fisher='empirical', leave the padding out of the "
                "loss (ignore_index)"
            )
    raise ValueError(
        where + "Mask the padding out of the attention (key_padding_mask / attention_mask) "
        "and of the pooling, or fix the mask"
    )
