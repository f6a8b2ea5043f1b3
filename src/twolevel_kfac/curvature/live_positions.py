"""The positions of a position-wise layer that reach the loss.

A ``Linear`` applied at every position of a sequence (``[N, T, D]`` inputs) sees the
padding too. A position ``(n, t)`` that no loss term depends on (padding that the loss and
the attention's ``key_padding_mask`` leave out, or that comes after the last real token
under a causal mask) has output gradient ``δ_nt = 0`` in every layer, so it adds nothing to
the per-sample gradients ``∇ℓ_n = Σ_t δ_nt ā_ntᵀ`` nor to the Fisher. KFAC's expand view
over the positions (``F ≈ T·A ⊗ G``, ``A = Σ āāᵀ/(N·T)``) would still count its ``ā`` in
``A`` and in ``T``, so the step changed with the padding's length and content. Here such
positions are left out: ``A`` and ``G`` average over the ``M`` positions that remain, and
``T = M/N`` is their mean count per sample (not an integer): the factors of the same
samples without the padding.

A position is left out only where it is *dead*: ``δ = 0`` at it (in float64 to rounding:
below 16 eps of the call's largest ``|δ|``) in every position-wise layer of the forward with
the same ``[N, T]`` layout, at least two layers seeing it (:func:`dead_positions`). A single
layer's zero is not enough: a causal query at position 0 has a structural zero gradient
(its softmax is over one key) that one attention implementation computes as 0 and another
as 1e-18, while the keys, values and the layers after it do reach the loss there. Only a
forward whose output has positions (a sequence model's logits: :func:`output_positions`)
has dead positions: a classifier's pooled or max-over-points zeros are not padding. A
capture where every position is dead folds nothing.

Only for layers whose locations are positions (``Linear``-type features and embedding
tables, a large table's diagonal block too; ``T > 1``): a convolution's location whose
channels all have zero gradient is still one of KFC's locations, and for ``T = 1`` a row is
a sample (KFAC's). Forwards of one step padded to different lengths are padded to the
longest with dead positions (:func:`~.captured_batch.forward_statistics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from .gram import position_gram, scaled_gram
from .hooks import on_gradient
from .layer_types import layer_type, linear_features
from .padding_mask import check_padding_unreached

if TYPE_CHECKING:
    from .blocks import LayerStats
    from .forward_pass import ForwardPass

__all__ = [
    "PositionGrads",
    "dead_positions",
    "kept_locations",
    "live_count",
    "live_grams",
    "live_rows",
    "loop_calls",
    "output_positions",
    "position_wise",
    "watch_positions",
]


def position_wise(module: nn.Module) -> bool:
    """Whether the layer's locations are positions of its input (a ``Linear``'s leading
    dimensions, an embedding's tokens), whose dead ones its factors leave out."""
    entry = layer_type(module)
    return entry is not None and (entry.features is linear_features or entry.rows_from_inputs)


def output_positions(
    output: object, class_dim: int | None, batch: int, in_order: Callable[[Tensor], bool]
) -> int | None:
    """``T``: the positions per sample of a model output that is a tensor (or a dict's, an
    HF ``ModelOutput``'s, ``"logits"``) ``[N, T…, C]`` (``[N, C, T…]`` for ``class_dim=1``;
    ``[N·T, C]`` flattened, its rows proved ``T`` per sample in order by ``in_order``:
    :func:`~.calls.sample_major`; a head on gathered rows ``h[mask]`` has none, whatever
    their count). Only a forward whose output has positions (a sequence model's)
    may have dead positions: ``None`` for an output without (a classifier's or a regression's
    ``[N, C]``, whose pooled or max-over-points zeros are not padding), and for the forms
    that do not say which tensor is the logits (a tuple, a dict without ``"logits"``) or
    whether a 2-D output is ``[N, T]`` (one value per position)."""
    if isinstance(output, dict):
        output = output.get("logits")
    if not isinstance(output, Tensor) or output.dim() < 2 or batch < 1:
        return None
    if output.dim() == 2:  # logits flattened inside forward, k rows per sample
        rows = int(output.shape[0])
        flattened = rows > batch and rows % batch == 0 and in_order(output)
        return rows // batch if flattened else None
    classes = int(output.shape[class_dim if class_dim is not None else -1])
    count = output.numel() // max(int(output.shape[0]) * classes, 1)
    return count if count > 1 else None


def watch_positions(
    output: object,
    class_dim: int | None,
    forward: ForwardPass,
    in_order: Callable[[Tensor], bool],
    sampled: bool = False,
) -> None:
    """Set ``forward.positions`` (:func:`output_positions`) and, for an output with positions,
    hook its gradient: ``forward.reached`` (``[N, T]``, the Fisher mini-batch's samples at
    the output's positions, the classes or features last: ``[N, C, H, W]``'s pixels for
    ``class_dim=1``) marks where it is not zero in some backward through it, the positions
    with a loss term: the user's backwards', or (``sampled``: ``fisher="mc"``) the sampled
    loss's alone, the first (whose ``δ`` the statistics hold; one pass over the logits'
    gradient fewer)."""
    forward.positions = output_positions(output, class_dim, forward.batch_size, in_order)
    main = output.get("logits") if isinstance(output, dict) else output
    if not forward.positions or not isinstance(main, Tensor) or not main.requires_grad:
        return
    first = class_dim is not None and main.dim() > 2 and class_dim % main.dim() == 1
    batch, positions = forward.batch_size, forward.positions
    if len(main) not in (batch, batch * positions):  # (time-major logits: none marked)
        return

    def reached(grad: Tensor) -> None:
        if sampled and forward.reached is not None:
            return
        grad = grad.detach().movedim(1, -1) if first else grad.detach()
        at = grad.reshape(batch, positions, -1).any(dim=-1)  # (no temporary of its size)
        if forward.index is not None:
            at = at.index_select(0, forward.index.to(at.device))
        forward.reached = at if forward.reached is None else forward.reached | at

    on_gradient(main, reached)


class PositionGrads(NamedTuple):
    """A position-wise layer call's output gradients ``[N, T, d]`` in its forward."""

    forward: object  # the forward's key
    layer: str
    grad: Tensor
    automatic: bool = True  # the forward's output has positions: zeros mark dead ones
    padding: Tensor | None = None  # the forward's real positions (set_padding_mask)


def loop_calls(grads: Iterable[PositionGrads]) -> list[PositionGrads]:
    """``grads`` and, for a layer called ``k ≥ 2`` times in a forward on one position each
    (a decoder's loop over the target steps, ``[N, D]`` per call), its calls side by side
    as one ``[N, k, d]`` layout: the calls are its locations (:mod:`.calls`), so a step
    whose targets are padding is dead in the layers the loop calls (kept before
    2026-12-06 (evening): steps 0.39–0.58 apart with the targets padded to 5 or 9)."""
    items, calls = list(grads), dict[tuple[object, str], list[PositionGrads]]()
    for item in items:
        calls.setdefault((item.forward, item.layer), []).append(item)
    for looped in calls.values():
        one = all(
            c.grad.shape[1] == 1 and c.grad.shape[0] == looped[0].grad.shape[0] for c in looped
        )
        if len(looped) > 1 and one:
            grad = torch.cat([c.grad for c in looped], dim=1)
            items.append(looped[0]._replace(grad=grad))
    return items


def dead_positions(
    grads: Iterable[PositionGrads], reaching: Callable[[object], Tensor | None] = lambda _: None
) -> dict[tuple[object, int, int], Tensor]:
    """Per forward and layout ``(key, N, T)``: the positions ``[N, T]`` (bool) whose ``δ`` is
    zero in every one of the position-wise layers' output gradients (``T > 1`` only;
    :class:`PositionGrads`) of a forward whose output has positions. A layout that fewer
    than two layers see marks none: one layer's zeros may be structural (a causal query at
    position 0) where no other layer tells. Nor is a sample whose every position is zero
    in a layout but that has a loss term (``reaching(key)``: the output's positions
    ``[N, T']`` with one, :func:`watch_positions`): a residual branch that stochastic depth
    dropped for it, whose zeros are real locations, not padding (left out before 2026-12-06
    (late): steps 0.15–0.56 off). In a layout of the output's positions (``T = T'``) it keeps
    those where the output has its loss terms (a transposed layout would keep others);
    in another, all of them, and only where no other sample has a dead position there (a
    layout without padding): a sample whose side input is all padding, in a padded layout,
    stays padding. Zeros at some positions of a sample with loss terms elsewhere (the pixels
    a max-pool after these layers does not pick) are dead. Where the
    forward was given its padding (:mod:`.padding_mask`), the positions it marks are the
    dead ones in the layouts of its shape: those it marks real are kept whatever their
    ``δ`` (a NeRF point of zero density; they were left out before 2026-12-12, 0.76 off).

    Raises:
        ValueError: a layer's ``δ`` is not zero at a position marked as padding.
    """
    live: dict[tuple[object, int, int], Tensor] = {}
    seen: dict[tuple[object, int, int], set[str]] = {}
    declared: dict[tuple[object, int, int], Tensor] = {}
    for item in loop_calls(grads):
        if item.grad.shape[1] < 2:
            continue
        layout = (item.forward, int(item.grad.shape[0]), int(item.grad.shape[1]))
        reached = _reached(item.grad)
        if item.padding is not None and item.padding.shape == reached.shape:
            output = reaching(item.forward)
            declared[layout] = ~check_padding_unreached(item.layer, reached, item.padding, output)
        if item.automatic:
            live[layout] = reached if layout not in live else live[layout] | reached
            seen.setdefault(layout, set()).add(item.layer)
    dead = {layout: ~mask for layout, mask in live.items() if len(seen[layout]) > 1}
    for layout, mask in dead.items():
        at = reaching(layout[0])  # [N, T'] the output's positions with a loss term
        if at is None or len(at) != len(mask):
            continue
        at = at.to(mask.device)
        whole = mask.all(dim=1, keepdim=True) & at.any(dim=1, keepdim=True)
        if at.shape == mask.shape:  # (a dropped branch: its positions with a loss term)
            dead[layout] = torch.where(whole, ~at, mask)
        elif not bool((mask & ~whole).any()):  # (no padding here: none of another sample)
            dead[layout] = mask & ~whole
    dead.update(declared)  # (the positions declared real are kept, whatever their δ)
    return dead


_ROUNDING = 16  # float64 eps: SDPA's structural zeros were up to 5 eps of the largest


def _reached(grad: Tensor) -> Tensor:
    """The positions ``[N, T]`` whose ``δ`` is not zero: in float64, above ``_ROUNDING`` eps
    of the call's largest ``|δ|`` (a causal query's gradient at position 0 is 0 in torch's
    math attention and up to 5 eps of the largest in its fused CPU kernel: LoRA's two
    query layers behind one softmax kept position 0 for some samples and not others, a
    step 0.26 off, before 2026-12-06 (evening)); in float32 and 16-bit dtypes exactly 0,
    since a confidently predicted position's real gradient can be as small as such a
    residue there (a 16-eps bar left out half the positions of a sharp per-position
    model: its float32 step 0.39 off its float64 step)."""
    size = grad.abs().flatten(2).amax(dim=-1)
    if grad.dtype != torch.float64:
        return size > 0
    return size > _ROUNDING * torch.finfo(grad.dtype).eps * size.max()


def live_rows(stats: LayerStats) -> tuple[Tensor, Tensor, int | float]:
    """``(ā, δ, T)``: the rows ``[M, d_in']``, ``[M, d_out]`` the Kronecker factors average
    over and the number of locations per sample they stand for: every row and ``T`` (an
    ``int``), or where ``stats.dead`` marks positions, the others and ``T = M/N`` (no row
    and ``T = 0`` where every position is dead: no loss term, no curvature to fold)."""
    samples, locations = int(stats.a.shape[0]), int(stats.a.shape[1])
    a = stats.a.reshape(samples * locations, -1)
    g = stats.g.reshape(samples * locations, -1)
    if stats.dead is None or samples == 0:
        return a, g, locations
    keep = ~stats.dead.reshape(-1)
    count = int(keep.sum())
    if count == samples * locations:
        return a, g, locations
    return a[keep], g[keep], count / samples


def live_grams(stats: LayerStats, mean: bool) -> tuple[Tensor, Tensor, int, int | float]:
    """``(Σ āāᵀ, Σ δδᵀ, M, T)`` over the rows of :func:`live_rows` (their means where
    ``mean``: the Kronecker factors' batch estimates), each one GEMM. With no dead
    position every row is read in its memory order (:func:`~.gram.position_gram`: a
    convolution's im2col order, without the transposing row-major copy)."""
    if stats.dead is None:
        rows = stats.num_samples * stats.num_locations
        scale = 1.0 / max(rows, 1) if mean else 1.0
        a_mat, g_mat = (position_gram(x, scale) for x in (stats.a, stats.g))
        return a_mat, g_mat, rows, stats.num_locations
    a, g, locations = live_rows(stats)
    rows = int(a.shape[0])  # none (T = 0): zeros, which the fold does not take
    scale = 1.0 / max(rows, 1) if mean else 1.0
    return scaled_gram(a, scale), scaled_gram(g, scale), rows, locations


def live_count(stats: LayerStats) -> int:
    """``M``: the positions that are not dead (``N·T`` where none is)."""
    if stats.dead is None:
        return stats.num_samples * stats.num_locations
    return int((~stats.dead).sum())


def kept_locations(stats: LayerStats) -> int | float:
    """``T`` of the positions that are not dead, per sample (``M/N``; the statistics' ``T``
    without dead ones)."""
    if stats.dead is None or stats.num_samples == 0:
        return stats.num_locations
    return live_count(stats) / stats.num_samples
