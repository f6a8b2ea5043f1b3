"""Which modules of a model get a KFAC curvature block, and through which calls.

:func:`find_layers` walks ``model.named_modules()`` and keeps the trainable layers of the
types :mod:`.layer_types` registers (``Linear``, ``Embedding``, ``Conv1d/2d/3d``, norms with
``norm_blocks``, ``MultiheadAttention``'s projections, a user's own) whose parameters the
optimizer owns. Four situations would make a block silently wrong; they are resolved here,
before any step (modules refused for one reason are named in one warning):

* **Tied weights** (``b.weight = a.weight``): one parameter, several modules. The layers
  form *one* block, registered under the first module's name, whose statistics sum over
  every call of every module that uses the weight (the weight-sharing view of KFAC: each
  call is one more location ``t``, as for a convolution; Eschenhagen et al. 2023's
  *expand* approximation). Modules that share the weight but not the bias, or share a bias
  but not the weight, have no ``A ⊗ G`` block: they are handled as ``unsupported`` says.
* **Modules that call their children functionally** (``nn.MultiheadAttention`` runs
  ``F.multi_head_attention_forward`` with ``in_proj_weight`` and ``out_proj.weight``): no
  hook ever sees those calls. Attention gets its two blocks ``<name>.in_proj`` and
  ``<name>.out_proj`` through :mod:`.attention` (the capture recomputes it with the
  projections as modules); a variant it cannot handle (``kdim``/``vdim``), and its
  children, are handled as ``unsupported`` says.
* **Sequence-first modules** (``batch_first=False``: ``nn.MultiheadAttention``, the
  ``Transformer*Layer`` around one, ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``) are refused: the
  first dimension of every layer input is the Fisher's sample dimension.
* **A subset of the model** (``params=``): a layer is preconditioned only when the
  optimizer owns its parameters. Owning the weight but not the bias (or the reverse) is
  refused: ``[W, b]`` is one block. A bias that trains beside a frozen weight (BitFit) is
  its layer's block alone (:func:`~.blocks.bias_only`), owned with or without the weight;
  such a block is keyed by its bias, so a frozen weight shared by two layers ties nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.nn.utils.parametrize import is_parametrized

from ..warning_level import caller_level
from .attention import attention_blocks, attention_reason
from .block_checks import block_key, check_bias_only
from .blocks import (
    bias_only,
    block_parameters,
    layer_bias,
    layer_shape,
    layer_weight,
    own_statistics,
)
from .layer_types import layer_type, overridden_forward, override_reason, registered_types
from .param_format import parameter_ids
from .scale_shift import is_scale_shift
from .token_form import is_small_table
from .unknown_layers import warn_unknown_layers


def supported_layers() -> tuple[type[nn.Module], ...]:
    """The module types with a curvature block (:mod:`.layer_types`, users may add)."""
    return registered_types()


FUNCTIONAL_CONTAINERS = (nn.MultiheadAttention,)
"""Module types whose forward uses their children's parameters without calling them."""
SEQUENCE_FIRST = (nn.MultiheadAttention, nn.RNNBase)
"""Module types with a ``batch_first`` flag (``TransformerEncoderLayer`` and friends hold a
``MultiheadAttention`` that carries theirs)."""

__all__ = [
    "added_layers",
    "find_layer_uses",
    "find_layers",
    "is_supported",
    "require_layers",
    "supported_layers",
    "takes_block",
    "unsupported_reason",
]


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` has parameters KFAC would precondition wrongly, or ``None`` if fine.

    Grouped convolutions and transposed convolutions have weights that do not factor as
    ``A ⊗ G`` with the unfolded input; preconditioning them as dense convs would be wrong.
    """
    entry = layer_type(module)
    if entry is not None and not isinstance(module._parameters.get("weight"), nn.Parameter):
        return (
            f"{type(module).__name__}'s weight is not a parameter of its own (a "
            "parametrization such as weight_norm, spectral_norm or orthogonal computes it): "
            "KFAC's block is for the weight parameter itself"
        )
    method = None if entry is None else overridden_forward(type(module), entry.module_type)
    if entry is not None and method is not None:
        return override_reason(type(module), entry, method)
    if entry is not None:
        return entry.reason(module)
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return (
            f"{type(module).__name__} is not supported (a transposed convolution has no block "
            "here: nn.Upsample then nn.Conv2d has one; its fallback step is outside the KL "
            "clip)"
        )
    if isinstance(module, nn.MultiheadAttention):
        return attention_reason(module)
    return None


def is_supported(module: nn.Module) -> bool:
    """True for the layer types KFAC preconditions (``Linear``, ``Conv2d`` with groups=1)."""
    return layer_type(module) is not None and unsupported_reason(module) is None


def takes_block(module: nn.Module, norm_blocks: bool = False) -> bool:
    """Whether :func:`find_layers` gives a trained module of this kind a block of its own:
    a supported layer type (:func:`is_supported`), a norm only under ``norm_blocks``."""
    return is_supported(module) and (norm_blocks or not is_scale_shift(module))


def added_layers(
    model: nn.Module, param_group: dict[str, Any], done: set[int], norm_blocks: bool = False
) -> list[str]:
    """The layers of ``model`` with a block (:func:`takes_block`) whose parameters (its bias
    alone, in BitFit) come with ``param_group`` (``add_param_group``) and are not among those
    preconditioned (``done``: their ``id``)."""
    ids = parameter_ids([param_group])
    return [
        name
        for name, module in model.named_modules()
        if takes_block(module, norm_blocks)
        and any(
            id(p) in ids and id(p) not in done for p in block_parameters(module) if p is not None
        )
    ]


def _check_usable(model: nn.Module, owned: set[int] | None) -> None:
    """Refuse sequence-first modules: KFAC takes the first dimension of every layer input
    as the batch, so ``[S, N, d]`` activations would make the sequence the samples; and
    lazy modules not yet run among the parameters ``owned`` (their ``id``; ``None``: all),
    whose blocks take their shapes (torch's own error named none).

    Raises:
        ValueError: naming the modules and the fix.
    """
    pending = nn.UninitializedParameter
    lazy = [n for n, p in model.named_parameters() if isinstance(p, pending)]
    lazy = [n for n in lazy if owned is None or id(model.get_parameter(n)) in owned]
    if lazy:
        raise ValueError(
            f"parameters {lazy[:4]}{' …' if len(lazy) > 4 else ''} are not initialized yet "
            "(lazy modules): run one forward with a dummy batch, then build the optimizer"
        )
    for name, module in model.named_modules():
        if isinstance(module, SEQUENCE_FIRST) and not getattr(module, "batch_first", True):
            raise ValueError(
                f"module {name or '<root>'!r} ({type(module).__name__}) has batch_first=False: "
                "its activations are [sequence, batch, ...], but KFAC takes the first "
                "dimension of every layer's input as the batch (the Fisher's samples); "
                "build it with batch_first=True"
            )


def _report(refused: dict[str, list[str]], unsupported: str) -> None:
    """Refuse the first module (``unsupported="error"``) or warn once per reason, naming
    every module refused for it (a U-Net's four transposed convolutions: one warning)."""
    for reason, names in refused.items():
        if unsupported == "error":
            raise ValueError(
                f"module {names[0] or '<root>'!r}: {reason}; unsupported='error' refuses it. "
                "Leave its parameters out of params= (another optimizer for them), or pass "
                "unsupported='warn' or 'ignore' to give them the un-preconditioned fallback step"
            )
        listed = ", ".join(repr(n or "<root>") for n in names[:6])
        listed += f" and {len(names) - 6} more" if len(names) > 6 else ""
        if unsupported == "warn":
            warnings.warn(
                f"module{'s' * (len(names) > 1)} {listed}: {reason}; "
                f"{'their' if len(names) > 1 else 'its'} parameters get the un-preconditioned "
                "fallback step (fallback='sgd': momentum SGD; 'adamw': AdamW)",
                stacklevel=caller_level(),
            )


def _check_ownership(name: str, module: nn.Module, owned: set[int]) -> bool:
    """Whether the optimizer owns the layer's parameters (all or none of them; or its
    trained bias, the weight frozen: BitFit).

    Raises:
        ValueError: if it owns the weight but not the trained bias, or the bias but not the
            weight while the weight trains, or a bias trained alone where the layer's block
            type has no bias-only form (:func:`check_bias_only`).
    """
    weight, bias = layer_weight(module), layer_bias(module)
    has_weight = id(weight) in owned
    frozen_bias = getattr(module, "bias", None)
    if not has_weight and bias is None and frozen_bias is not None and id(frozen_bias) in owned:
        warnings.warn(  # its block would be decided by flags that change later: say so
            f"layer {name!r}: its bias is in the optimizer's params but frozen, and its "
            "weight is not in them: the layer gets no curvature block (the bias, once "
            "unfrozen, takes the plain step); build the optimizer after unfreezing the bias "
            "to give it its bias-only block",
            stacklevel=caller_level(),
        )
    if not has_weight and not weight.requires_grad and bias is not None and id(bias) in owned:
        check_bias_only(name, module)  # bias-only training (BitFit)
        return True
    if bias is None or (id(bias) in owned) == has_weight:
        if has_weight:
            check_bias_only(name, module)
        return has_weight
    inside, outside = ("weight", "bias") if has_weight else ("bias", "weight")
    raise ValueError(
        f"layer {name!r}: its {inside} is in the optimizer's params but its {outside} is "
        "not; KFAC preconditions [weight, bias] as one block: pass both or neither"
    )


def find_layers(
    model: nn.Module,
    unsupported: str,
    params: Iterable[object] | None = None,
    norm_blocks: bool = False,
) -> dict[str, nn.Module]:
    """The layers of ``model`` that get a curvature block (module doc), by
    name (one entry per tied group, under its first module's name; see the module doc).

    Args:
        model: the model.
        unsupported: ``warn`` | ``error`` | ``ignore``: what to do with modules KFAC would
            precondition wrongly (their parameters get the fallback step).
        params: the optimizer's parameters (``torch.optim`` format); ``None``: every
            trainable parameter of ``model``.
        norm_blocks: give norm layers their scale-and-shift blocks (:mod:`.scale_shift`;
            else they are left to the fallback step).

    Raises:
        ValueError: with ``unsupported="error"`` for an unsupported module, when the
            optimizer owns a layer's weight but not its bias (or the bias but not the
            trained weight), or a bias trained alone has no block (:func:`check_bias_only`).
    """
    owned = None if params is None else parameter_ids(params)
    _check_usable(model, owned)
    layers: dict[str, nn.Module] = {}
    refused: set[int] = set()  # ids of parameters of refused modules
    reasons: dict[str, list[str]] = {}  # reason -> the modules refused for it
    skip: list[str] = []  # prefixes of the children of functional containers
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if not _trains(module, owned) and not isinstance(module, FUNCTIONAL_CONTAINERS):
            continue
        if is_scale_shift(module) and not norm_blocks:
            continue
        reason = unsupported_reason(module)
        if isinstance(module, FUNCTIONAL_CONTAINERS):
            skip.append(f"{name}." if name else "")
            if owned is not None and not any(id(p) in owned for p in module.parameters()):
                continue
        if reason is not None:
            reasons.setdefault(reason, []).append(name)
            refused |= {id(p) for p in module.parameters()}
            continue
        blocks = [(name, module)] if takes_block(module, norm_blocks) else []
        if isinstance(module, nn.MultiheadAttention):
            blocks = [(f"{name}.{suffix}", layer) for suffix, layer in attention_blocks(module)]
        for block_name, layer in blocks:
            # default: the trainable weights; given params: every weight in them (a frozen
            # one is left alone until it is unfrozen, its hooks already in place)
            if owned is None and bias_only(layer):
                check_bias_only(block_name, layer)
            trains = any(p is not None and p.requires_grad for p in block_parameters(layer))
            if (owned is None and trains) or (
                owned is not None and _check_ownership(block_name, layer, owned)
            ):
                layers[block_name] = layer
    _report(reasons, unsupported)
    warn_unknown_layers(
        model,
        lambda m: (
            _trains(m, owned)
            and (owned is None or any(id(p) in owned for p in m.parameters()))
            and unsupported_reason(m) is None
        ),
        unsupported,
        lambda p: p.requires_grad and (owned is None or id(p) in owned),
    )
    _warn_parametrized_biases(layers, unsupported)
    return _resolve_ties(layers, refused, unsupported)


def _warn_parametrized_biases(layers: dict[str, nn.Module], unsupported: str) -> None:
    """A layer whose bias is parametrized has its weight's block alone: its bias (whose
    original is a parameter of no block) takes the fallback step; say so."""
    for name, layer in layers.items():
        if is_parametrized(layer, "bias") and unsupported != "ignore":
            warnings.warn(
                f"layer {name!r}: its bias is parametrized: the layer's block is its "
                "weight's alone, and the bias takes the fallback step",
                stacklevel=caller_level(),
            )


def _trains(module: nn.Module, owned: set[int] | None) -> bool:
    """Whether a parameter of the module's own trains (given params: is in them, frozen
    or not: a frozen one is preconditioned once unfrozen)."""
    own = list(module.parameters(recurse=False))
    return any(p.requires_grad for p in own) or (
        owned is not None and any(id(p) in owned for p in own)
    )


def _resolve_ties(
    layers: dict[str, nn.Module], refused: set[int], unsupported: str
) -> dict[str, nn.Module]:
    """One entry per weight: later modules tied to an earlier one's weight (and bias) are
    dropped here (:func:`find_layer_uses` finds them again for the capture); modules tied
    in a way that has no ``A ⊗ G`` block are reported and dropped."""
    first: dict[int, str] = {}  # weight id -> name of the first layer using it
    owner: dict[int, str] = {}  # parameter id -> the weight group it belongs to
    bad: dict[str, str] = {}
    for name, module in layers.items():
        # a bias trained alone is its block's weight: a frozen weight ties nothing
        weight, bias = block_parameters(module)
        if id(weight) in first:
            lead = first[id(weight)]
            if _block_type(module) is not _block_type(layers[lead]):
                bad[name] = bad[lead] = (
                    f"modules {lead!r} and {name!r} share a weight, but their blocks differ "
                    f"({type(layers[lead]).__name__}, {type(module).__name__}: e.g. an "
                    "embedding table of more than 4096 rows keeps a diagonal token factor, "
                    "a Linear head on it a dense V × V one)"
                )
            elif (
                layer_shape(module) != layer_shape(layers[lead])
                or block_parameters(layers[lead])[1] is not bias
            ):
                bad[name] = bad[lead] = (
                    f"modules {lead!r} and {name!r} share a weight but not its bias (or not "
                    "its block's shape); KFAC has no [W, b] block for them: tie the biases "
                    "too, or use bias=False"
                )
            continue
        first[id(weight)] = name
        for param in (weight, bias):
            if param is None:
                continue
            if id(param) in owner and owner[id(param)] != name:
                bad[name] = bad[owner[id(param)]] = (
                    f"modules {owner[id(param)]!r} and {name!r} share a bias but not the "
                    "weight; KFAC has no [W, b] block for them"
                )
            owner[id(param)] = name
    _report(
        {reason: [n for n in layers if bad.get(n) == reason] for reason in bad.values()},
        unsupported,
    )
    kept = {}
    for name, module in layers.items():
        main = block_parameters(module)[0]
        if name not in bad and first[id(main)] == name and id(main) not in refused:
            kept[name] = module
    return kept


def require_layers(layers: dict[str, nn.Module], model: nn.Module, given: bool) -> None:
    """Refuse a model without a layer to precondition (``given``: among the ``params``)."""
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no trainable layer with a curvature block (Linear, "
            f"Conv1d/2d/3d, a registered type){' in params' if given else ''}: its parameters "
            "would take the plain fallback step; use a torch optimizer"
        )


def find_layer_uses(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[nn.Module]]:
    """Every module that computes with a block's weight, by block name (the block's own
    module first, then the modules tied to it, in ``named_modules()`` order)."""
    by_weight = {id(block_parameters(module)[0]): name for name, module in layers.items()}
    uses: dict[str, list[nn.Module]] = {name: [module] for name, module in layers.items()}
    for module in model.modules():
        if layer_type(module) is None:
            continue
        key = block_key(module)
        name = None if key is None else by_weight.get(key)
        if name is not None and module is not layers[name]:
            uses[name].append(module)
    return uses


def _block_type(module: nn.Module) -> type | None:
    """The block type of ``module``, a small table's as dense whatever form an optimizer
    chose for it (:mod:`.token_form`: chosen after the ties are resolved)."""
    return None if is_small_table(module) else own_statistics(module)
