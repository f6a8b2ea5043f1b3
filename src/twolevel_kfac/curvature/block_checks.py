"""The checks, at every step, that each layer's curvature block is still the one it was
built as: which of its parameters train decides the block (``[W, b]``, ``W`` alone, or the
bias alone: :func:`~.blocks.block_parameters`), and the flags may change after the
optimizer was built (progressive unfreezing, BitFit stages); a block that changed shape,
a tie that no longer holds, or a layer with a gradient but no statistics is refused by
name instead of stepped wrongly. A layer that has no curvature yet takes the block it
trains with now.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import (
    bias_only,
    block_parameters,
    factor_shapes,
    has_bias,
    own_statistics,
    trains,
    zero_gradient,
)
from .kronecker import KroneckerFactors
from .token_form import keeps_frequencies

__all__ = [
    "BlockMemory",
    "block_key",
    "block_signature",
    "check_bias_only",
    "check_blocks",
    "check_statistics",
]


@dataclass
class BlockMemory:
    """:func:`check_blocks`' memory: each layer's weight dtype when the optimizer was built
    (its statistics', hence its factors' and coarse level's) and the ``id`` of its weight
    and bias then (the parameters the optimizer holds), and each untied layer's
    :func:`block_signature` and factor shapes at its last check."""

    dtypes: dict[str, torch.dtype]
    seen: dict[str, object] = field(default_factory=dict)
    built: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, layers: dict[str, nn.Module], dtypes: dict[str, torch.dtype]) -> BlockMemory:
        """The memory of an optimizer built on ``layers`` now."""
        return cls(dtypes, built={name: _registered(m) for name, m in layers.items()})


def _registered(module: nn.Module) -> tuple[int, int]:
    """The ``id`` of the module's registered weight and bias (of ``None`` where it has none)."""
    return id(module._parameters.get("weight")), id(module._parameters.get("bias"))


def block_key(module: nn.Module) -> int | None:
    """The ``id`` of the parameter a module's block is keyed by: its weight, or its bias
    when only the bias trains (:func:`~.blocks.block_parameters`; ``None``: no weight)."""
    if module._parameters.get("weight") is None:
        return None
    return id(block_parameters(module)[0])


def check_bias_only(name: str, module: nn.Module) -> None:
    """Refuse a layer whose bias trains beside a frozen weight when its block type has no
    block for the bias alone (:func:`~.blocks.bias_only`; a grouped convolution's).

    Raises:
        ValueError: naming the layer and the fix.
    """
    own = own_statistics(module)
    if bias_only(module) and own is not None and not own.bias_only:
        raise ValueError(
            f"layer {name!r}: its weight is frozen (requires_grad=False) but its bias "
            f"trains, and its block ({type(module).__name__}, {own.__name__}) has no "
            "bias-only form: freeze the bias too, or leave it out of the KFAC optimizer's "
            "params and step it with another optimizer"
        )


def block_signature(module: nn.Module) -> tuple[object, ...] | None:
    """What decides a layer's block: its registered weight and bias, their shapes and
    whether each trains (``None`` for a weight that is not a registered parameter)."""
    params = module._parameters
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None:
        return None
    trains = None if bias is None else bias.requires_grad
    frequencies = keeps_frequencies(module)  # (a later optimizer may choose the other form)
    return (
        id(weight),
        weight.requires_grad,
        weight.shape,
        weight.dtype,
        id(bias),
        trains,
        frequencies,
    )


def check_blocks(
    layers: dict[str, nn.Module],
    factors: dict[str, KroneckerFactors],
    names: list[str],
    uses: dict[str, list[nn.Module]] | None = None,
    checked: BlockMemory | None = None,
) -> None:
    """Refuse layers of ``names`` whose ``[W, b]`` block changed since it was built
    (``uses``: :func:`find_layer_uses`, whose tied modules must still share one block); a
    layer without curvature yet takes the ``[W, b]`` border of its block now (one frozen
    when the optimizer was built and unfrozen since: a bordered ``A⁻¹`` rounds otherwise).
    ``checked`` remembers each untied layer's :func:`block_signature` and factor shapes at
    its last check: a layer with neither changed is not checked again (the checks cost
    0.3 ms of a 12-layer step); and each layer's weight dtype when the optimizer was built,
    which it must keep.

    Raises:
        ValueError: a layer's bias trains alone where its block type has no bias-only form
            (:func:`check_bias_only`), or its bias or weight was frozen or unfrozen after
            its factors were first estimated (the block's shape changed), or modules tied
            through a frozen weight now train their own biases alone (separate blocks),
            or its weight changed dtype or was replaced; the message names the layer and the
            fix.
    """
    for name in dict.fromkeys(names):
        module = layers[name]
        tied = (uses or {}).get(name, [])
        got, key = factors[name].factor_shapes(), None
        if checked is not None and len(tied) <= 1:
            signature = block_signature(module)
            key = None if signature is None else (signature, got)
            if key is not None and checked.seen.get(name) == key:
                continue
        if not trains(module):  # frozen whole: its block is not used, its factors are kept
            continue
        if checked is not None:
            _check_same(name, module, checked.built.get(name))
            _check_dtype(name, module, checked.dtypes.get(name))
        if len(tied) > 1 and len({block_key(m) for m in tied}) > 1:
            raise ValueError(
                f"layer {name!r}: its modules were tied through their weight when the "
                "optimizer was built, but now train their biases alone (each bias its own "
                "block): build a new optimizer after changing which parameters train"
            )
        check_bias_only(name, module)
        _check_table_form(name, module, factors[name])
        if got is None and type(factors[name]) is KroneckerFactors:  # (frozen when built)
            factors[name].bordered = has_bias(module)  # as new_factors would build it now
        now = factor_shapes(module)
        if got is not None and tuple(got) != tuple(now):
            raise ValueError(
                f"layer {name!r}: its block [W, b] changed shape after its curvature was "
                f"first estimated (curvature {list(got)}, now {list(now)}): its bias or "
                "weight was frozen or unfrozen (requires_grad), or its weight resized in "
                "place (a widened layer): build a new optimizer after changing which "
                "parameters train or their shapes"
            )
        if key is not None and checked is not None:
            checked.seen[name] = key


def _check_table_form(name: str, module: nn.Module, factors: object) -> None:
    """Refuse an embedding table whose token factor has another form now than the one its
    curvature was built in (:mod:`.token_form`: an optimizer built on the model since, still
    alive, chose for it).

    Raises:
        ValueError: naming the layer, both forms and the fix.
    """
    if not isinstance(module, nn.Embedding):
        return
    dense = isinstance(factors, KroneckerFactors)
    if dense != keeps_frequencies(module):
        return
    forms = ("a dense V × V matrix", "the vector of token frequencies")
    raise ValueError(
        f"layer {name!r} (an embedding table of {module.num_embeddings} rows): this "
        f"optimizer keeps its token factor as {forms[not dense]}, and an optimizer built on "
        f"the model since keeps it as {forms[dense]} (KPSVD, KFAC-corrected, "
        "weight_sharing='reduce', a half factor_dtype and a table tied to a module of "
        "another type keep the dense one) and is still alive: drop that one (this one "
        "steps again then), or build this one again"
    )


def _check_same(name: str, module: nn.Module, built: tuple[int, int] | None) -> None:
    """Refuse a layer whose weight or bias is another parameter than when the optimizer was
    built (``model.to(…)`` under ``torch.__future__.set_overwrite_module_params_on_conversion
    (True)``, ``layer.weight = nn.Parameter(…)``, ``load_state_dict(…, assign=True)``): the
    optimizer holds the old ones, so the model would never move again (every step moved it
    by 0, silently, before 2026-12-06 (late)).

    Raises:
        ValueError: naming the layer and the fix.
    """
    if built is not None and _registered(module) != built:
        raise ValueError(
            f"layer {name!r}: its weight or bias is not the parameter it was when the "
            "optimizer was built (replaced: model.to() or .double() under torch.__future__."
            "set_overwrite_module_params_on_conversion(True), an assigned nn.Parameter, "
            "load_state_dict(..., assign=True); or parametrized or pruned since), and the "
            "optimizer holds the old one, which the model no longer uses: build the "
            "optimizer after changing the model's parameters"
        )


def _check_dtype(name: str, module: nn.Module, built: torch.dtype | None) -> None:
    """Refuse a layer whose weight changed dtype since the optimizer was built
    (``model.double()``, ``.half()``, ``.to(dtype)`` after it): its statistics are cast to
    the dtype of then, so its factors, EKFAC's scalings and the coarse level stay in it
    (float32 statistics of a float64 model: 1.5e-6 off on a step of 10; a two-level or
    EKFAC step raised a bare dtype mismatch).

    Raises:
        ValueError: naming the layer, both dtypes and the fix.
    """
    now = block_parameters(module)[0].dtype
    if built is not None and now != built:
        raise ValueError(
            f"layer {name!r}: its weight is {now} but was {built} when the optimizer was "
            "built, and its curvature is kept in that dtype: change the model's dtype "
            "(model.double(), .half(), .to(dtype)) before building the optimizer. To go on "
            "from a run in another dtype, build a new optimizer on the converted model with "
            f"factor_dtype={built} and load the old one's state_dict"
        )


def used_layers(
    layers: dict[str, nn.Module],
    factors: dict[str, KroneckerFactors],
    active: list[str],
    captured: Collection[str],
    capturing: bool,
) -> list[str]:
    """The layers of ``active`` (a ``.grad`` exists) that this step used: not one whose
    gradient is exactly zero (:func:`~.blocks.zero_gradient`: unused under
    ``zero_grad(set_to_none=False)``, which keeps a zeroed ``.grad``) where that matters,
    as if its ``.grad`` were ``None``: a layer without curvature yet, or one a capturing
    step did not capture (its capture is not chased then). A zero gradient has a zero
    direction whatever the curvature, so a layer with curvature keeps stepping otherwise
    (no pass over every gradient at every step)."""
    return [
        name
        for name in active
        if not (
            (not factors[name].ready or (capturing and name not in captured))
            and zero_gradient(layers[name])
        )
    ]


def check_statistics(
    factors: dict[str, KroneckerFactors],
    active: list[str],
    empty_batch: bool = False,
    outside: bool = False,
    nonfinite: bool = False,
) -> None:
    """Refuse a step on a layer that has a gradient but no statistics although this step
    captured them (a layer first used between two captures is deferred before this:
    :mod:`twolevel_kfac.optim.schedule`); ``outside``: layers ran outside a call of the
    module the optimizer was built on (a Lightning module's ``self.net(x)``);
    ``nonfinite``: some of this step's statistics were not finite, and not folded.

    Raises:
        RuntimeError: naming the layers, and why that happens.
    """
    missing = [name for name in active if not factors[name].ready]
    if missing and empty_batch:
        raise RuntimeError(
            f"no curvature statistics for layer(s) {missing}: this step's batch was empty "
            "(0 rows), and the first step needs a batch with rows"
        )
    if missing and outside:
        raise RuntimeError(
            f"no curvature statistics for layer(s) {missing}: they ran outside a call of the "
            "module the optimizer was built on, whose forward is what the optimizer captures "
            "(a wrapper's submodule called directly, self.net(x), or a method other than "
            "forward, model.logits(x)). Call the module itself, model(x), or build the "
            "optimizer on the module you call (tk.KFAC(self.net))"
        )
    if missing and nonfinite:
        raise RuntimeError(
            f"no curvature statistics for layer(s) {missing}: this step's, their first, were "
            "not finite although the gradients were (an input or activation whose square "
            "overflows the factors' dtype), so the step was not taken and the optimizer "
            "cannot go on from it: scale the inputs (or give factor_dtype=torch.float64) "
            "and build the optimizer again, or load a state_dict saved before this step"
        )
    if missing:
        raise RuntimeError(
            f"no curvature statistics for layer(s) {missing}, which have gradients: "
            "run the model's forward (in train mode, with gradients enabled) and "
            "loss.backward() before step(); layers that run under torch.no_grad() inside the "
            "forward (torch.utils.checkpoint with use_reentrant=True: use use_reentrant="
            "False), whose parameters are used outside their module, or that ran under "
            "torch.func.functional_call with other tensors swapped in for their parameters "
            "or under torch.func.vmap (Opacus's grad_sample_mode='ew': use 'hooks') (not "
            "captured) cannot be preconditioned"
        )
