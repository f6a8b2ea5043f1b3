"""The step of the parameters no curvature block covers (``KFAC(..., fallback=...)``), and
the table of which parameter got which block.

* ``fallback="sgd"`` (default): the KFAC optimizer's own momentum-SGD step on the raw
  gradient, with the parameter's group ``lr``, ``momentum``, ``weight_decay`` and
  ``nesterov`` (torch's SGD update).
* ``fallback="adamw"``: ``torch.optim.AdamW`` over those parameters, with its own
  arguments (``fallback_options``; default ``lr=1e-3`` and torch's defaults otherwise):
  the KFAC learning rate is an order of magnitude or more above what AdamW takes. One
  AdamW group per KFAC param group (:func:`fallback_groups`): its ``lr`` is AdamW's times
  the group's ``lr`` over the optimizer's (layer-wise rates), and a group that names
  ``weight_decay=0`` (a no-decay group of norms and biases) has no decay. Its step is exactly
  torch's (it *is* torch's), on the same ``.grad`` the model left (or the ``GradScaler``
  unscaled), and its state goes into the KFAC ``state_dict`` under ``"fallback"``. Its
  ``lr`` follows the group's at every step (an LR scheduler on the KFAC optimizer, Hugging
  Face's ``Trainer``'s, reaches it) until something else changes it (a scheduler on
  ``opt.fallback.optimizer``, as the README advised before 2026-12-06 (evening)): that
  group then keeps what it is given, with a warning.

Which layers get a block: :mod:`twolevel_kfac.curvature.discovery`; everything else with
``requires_grad`` falls back (biases of preconditioned layers are part of their block).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn

from ..curvature.blocks import bias_only, own_statistics
from ..curvature.discovery import added_layers, takes_block
from ..curvature.layer_types import covered_parameters
from ..curvature.param_format import parameter_ids
from ..warning_level import caller_level
from .options import check_choice

__all__ = [
    "FALLBACKS",
    "AdamWFallback",
    "FallbackKind",
    "block_table",
    "warn_added",
    "warn_unfrozen",
    "warn_unpreconditioned",
]

FallbackKind = Literal["sgd", "adamw"]
FALLBACKS: tuple[str, ...] = get_args(FallbackKind)


class AdamWFallback:
    """``torch.optim.AdamW`` over the parameters without a curvature block.

    Args:
        params: those parameters.
        options: ``torch.optim.AdamW`` keyword arguments (``lr`` defaults to 1e-3).

    Raises:
        TypeError: an argument AdamW does not take (named by torch).
    """

    def __init__(self, groups: list[dict[str, Any]], options: Mapping[str, Any]) -> None:
        self.ids = {id(p) for group in groups for p in group["params"]}
        self.lr = lr = options.get("lr", 1e-3)
        scaled = [
            {**{k: v for k, v in group.items() if k != "lr_factor"}, "lr": lr * group["lr_factor"]}
            for group in groups
        ]
        for group in scaled:
            group["lr_set"] = group["lr"]  # what this class set last (``follow``)
        self.optimizer = torch.optim.AdamW(scaled, **{"lr": lr, **options}) if groups else None

    def follow(self, groups: Sequence[dict[str, Any]], lr: float) -> None:
        """Each AdamW group's ``lr``: AdamW's times its KFAC group's current ``lr`` over the
        optimizer's ``lr`` (1 where that is 0 and the group's is not), so that an LR
        scheduler on the KFAC optimizer reaches the fallback. A group whose ``lr`` something
        else changed since (its own scheduler) keeps it from then on, with a warning."""
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            if "source" not in group or group.get("lr_set") is None:
                continue  # (left to its own scheduler; or saved before groups followed)
            if group["lr"] != group["lr_set"]:
                group["lr_set"] = None
                warnings.warn(
                    f"the fallback AdamW group {group['source']}'s lr was changed outside the "
                    "KFAC optimizer (a scheduler on opt.fallback.optimizer): it keeps what it "
                    "is given from now on, and no longer follows the KFAC group's lr",
                    RuntimeWarning,
                    stacklevel=caller_level(),
                )
                continue
            now = groups[group["source"]]["lr"]
            group["lr"] = group["lr_set"] = self.lr * (now / lr if lr > 0 else float(now > 0))

    def step(self, groups: Sequence[dict[str, Any]], lr: float) -> None:
        """AdamW's step on the current ``.grad`` of its parameters that train, at the rates
        :meth:`follow` sets from the KFAC optimizer's ``groups`` and ``lr``: a frozen one's
        ``.grad`` kept by ``zero_grad(set_to_none=False)`` is hidden from it for the step
        (torch's AdamW would move the parameter by its moments and weight decay)."""
        if self.optimizer is None:
            return
        self.follow(groups, lr)
        params = (p for group in self.optimizer.param_groups for p in group["params"])
        hidden = [(p, p.grad) for p in params if p.grad is not None and not p.requires_grad]
        for p, _ in hidden:
            p.grad = None
        try:
            self.optimizer.step()
        finally:
            for p, grad in hidden:
                p.grad = grad

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state (empty without parameters)."""
        return {} if self.optimizer is None else self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; one saved before the groups were mirrored (one AdamW
        group over every parameter, before 2026-12-06) has its moments put in this
        one's groups, parameter by parameter, with this one's hyperparameters."""
        if self.optimizer is None or not state:
            return
        ours = self.optimizer.state_dict()["param_groups"]
        saved = state["param_groups"]
        sizes = [len(group["params"]) for group in ours]
        if len(saved) == 1 < len(ours) and sum(sizes) == len(saved[0]["params"]):
            flat = iter([i for group in saved for i in group["params"]])
            regrouped = [{**g, "params": [next(flat) for _ in g["params"]]} for g in ours]
            state = {**state, "param_groups": regrouped}
        self.optimizer.load_state_dict(state)
        for group, built in zip(self.optimizer.param_groups, ours, strict=True):
            if "source" not in group:  # saved before the groups followed the KFAC lr: a
                group.update(source=built["source"], lr_set=None)  # run continues as it was


def fallback_groups(
    groups: Sequence[dict[str, Any]], covered: Collection[int], given: Sequence[Any], lr: float
) -> list[dict[str, Any]]:
    """The parameters of each param group that no block covers (``covered``: their ids),
    as AdamW groups: ``lr_factor``, the group's ``lr`` over the optimizer's ``lr`` (1 where
    that is 0 and the group's is not), and no weight decay where the group the user gave
    (``given``) names ``weight_decay=0`` (a no-decay group of norms and biases); the other
    groups take AdamW's (``fallback_options``)."""
    out = []
    for i, group in enumerate(groups):
        params = [p for p in group["params"] if id(p) not in covered]
        if not params:
            continue
        factor = group["lr"] / lr if lr > 0 else float(group["lr"] > 0)
        named = i < len(given) and isinstance(given[i], dict) and "weight_decay" in given[i]
        decay = {"weight_decay": 0.0} if named and group["weight_decay"] == 0 else {}
        out.append({"params": params, "lr_factor": factor, "source": i, **decay})
    return out


def make_fallback(
    kind: str,
    groups: list[dict[str, Any]],
    options: Mapping[str, Any] | None,
    model: nn.Module | None = None,
    trained: Sequence[dict[str, Any]] = (),
) -> AdamWFallback | None:
    """The fallback of ``kind`` over ``groups`` (:func:`fallback_groups`; ``None`` for
    ``sgd``: KFAC's own step), with a warning where they hold most of the parameters that
    train of the optimizer's groups (``trained``: :func:`warn_mostly_fallback`).

    Raises:
        ValueError: an unknown ``kind``, ``options`` with ``sgd``, or ``adamw`` for the
            sparse gradients of an ``Embedding(sparse=True)`` of ``model`` (AdamW refuses
            them at its first step; said here, when the optimizer is built).
    """
    check_choice("fallback", kind, FALLBACKS)
    held = {id(p) for group in groups for p in group["params"]}
    sparse = [
        name
        for name, m in (model.named_modules() if model is not None else ())
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and id(m.weight) in held
    ]
    if kind == "adamw" and sparse:
        raise ValueError(
            f"fallback='adamw' cannot step the sparse gradients of {sparse} (sparse=True): "
            "use fallback='sgd', or sparse=False"
        )
    if model is not None:
        warn_mostly_fallback(model, groups, trained, kind)
    if kind == "sgd":
        if options:
            raise ValueError(
                "fallback_options apply to fallback='adamw'; the 'sgd' fallback takes the "
                "parameter group's lr, momentum and weight_decay"
            )
        return None
    return AdamWFallback(groups, options or {})


def warn_mostly_fallback(
    model: nn.Module, rest: Sequence[dict[str, Any]], held: Sequence[dict[str, Any]], kind: str
) -> None:
    """Warn where recurrent layers (``LSTM``, ``GRU``, ``RNN`` and their cells: no block,
    and no other warning) hold more than half of the parameters that train of the
    optimizer's groups (``held``) and take the fallback step (``rest``): 99.5 % of a
    DeepSpeech-like model's parameters took plain SGD with no word of it, before
    2026-12-06 (evening)."""
    size = {id(p): p.numel() for g in held for p in g["params"] if p.requires_grad}
    falls = {id(p) for g in rest for p in g["params"] if id(p) in size}
    recurrent = {
        name or "<root>": sum(size[id(p)] for p in m.parameters(recurse=False) if id(p) in falls)
        for name, m in model.named_modules()
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase))
    }
    total, fallen = sum(size.values()), sum(recurrent.values())
    if not total or fallen * 2 <= total:
        return
    top = sorted(recurrent, key=recurrent.__getitem__, reverse=True)[:3]
    named = ", ".join(f"{o!r} ({recurrent[o] / total:.0%})" for o in top)
    step = "AdamW" if kind == "adamw" else "momentum SGD on the raw gradient"
    advice = "" if kind == "adamw" else "; fallback='adamw' gives them AdamW"
    warnings.warn(
        f"recurrent layers hold {fallen / total:.0%} of the parameters this optimizer trains "
        f"({named}): they have no curvature block and take the fallback step ({step}), "
        f"not KFAC's (describe_blocks() lists every parameter{advice})",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def block_table(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    params: Iterable[Any],
    adamw: Collection[int],
) -> list[tuple[str, str]]:
    """``(parameter name, what steps it)`` for every parameter the optimizer holds: the
    curvature block of its layer (``KFAC Linear 'fc'``), or the fallback step: AdamW for
    the parameters ``adamw`` holds (their ``id``), else KFAC's momentum SGD
    (``fallback="sgd"``, and parameters added with ``add_param_group`` after it was built)."""
    owner = {
        id(p): f"KFAC {type(module).__name__} {name!r}{_kind(module)}"
        for name, module in layers.items()
        for p in covered_parameters(module)
    }
    held = {id(p) for p in params}
    return [
        (
            name,
            owner.get(id(p), "AdamW (no block)" if id(p) in adamw else "momentum SGD (no block)"),
        )
        for name, p in model.named_parameters()
        if id(p) in held and p.requires_grad
    ]


def _kind(module: nn.Module) -> str:
    """What kind of block a layer has, when it is not one ``A ⊗ G`` of ``[W, b]``."""
    if bias_only(module):
        return " (bias alone)"
    if own_statistics(module) is None:
        return ""
    if hasattr(module, "num_embeddings"):  # (before 2026-12-09 described as unit-wise)
        return " (G diagonal: the token frequencies kept as a vector)"
    groups = getattr(module, "groups", None)
    return f" ({groups} groups: a block each)" if groups else " (unit-wise)"


def warn_added(
    model: nn.Module, group: dict[str, Any], preconditioned: set[int], adamw: bool, norms: bool
) -> None:
    """Warn of what ``add_param_group`` gave the optimizer after it was built: KFAC's plain
    momentum step for every parameter of ``group`` (blocks and the fallback's parameters
    are fixed when it is built), where a layer of a block type would have been
    preconditioned (``preconditioned``: the ``id`` of those that are; a norm only with
    ``norm_blocks``: ``norms``), and any parameter stepped by ``fallback="adamw"``
    (``adamw``)."""
    what, added = "layer(s)", added_layers(model, group, preconditioned, norms)
    if adamw:
        ids = parameter_ids([group]) - preconditioned
        what, added = "parameter(s)", [n for n, p in model.named_parameters() if id(p) in ids]
    if added:
        warnings.warn(
            f"{what} {added} added with add_param_group after the optimizer was built get "
            "KFAC's plain momentum step on their gradient (no block, no fallback step); pass "
            "their parameters when building it to have the step describe_blocks() lists for "
            "them then (frozen ones are left alone until unfrozen)",
            stacklevel=caller_level(),
        )


def _watch_unfrozen(
    watched: Sequence[nn.Parameter],
    named: Callable[[set[int]], list[str]],
    message: Callable[[list[str]], str],
) -> list[nn.Parameter]:
    """Warn with ``message`` of what ``named`` names among the parameters of ``watched``
    that train now (their ``id``); the ones still frozen, to watch at the next step."""
    if all(not p.requires_grad for p in watched):
        return list(watched)
    names = named({id(p) for p in watched if p.requires_grad})
    if names:
        warnings.warn(message(names), stacklevel=caller_level())
    return [p for p in watched if not p.requires_grad]


def warn_unfrozen(
    watched: Sequence[nn.Parameter], model: nn.Module, groups: Iterable[dict[str, Any]]
) -> list[nn.Parameter]:
    """Warn of the parameters of ``watched`` (frozen when ``KFAC(model)`` took its default
    ``params``: the parameters that trained then) that train now but are in no param
    group, which no step moves; the ones still frozen, to watch at the next step."""
    held = parameter_ids(list(groups))
    return _watch_unfrozen(
        watched,
        lambda ids: [n for n, p in model.named_parameters() if id(p) in ids - held],
        lambda names: (
            f"parameter(s) {names} were frozen when the optimizer was built with its default "
            "params (the parameters that trained then) and train now: it does not step them "
            "(another optimizer may). Build it with params=model.parameters() to precondition "
            "layers unfrozen later, or add them with add_param_group"
        ),
    )


def warn_unpreconditioned(
    watched: Sequence[nn.Parameter],
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    norm_blocks: bool = False,
) -> list[nn.Parameter]:
    """Warn of the layers of a block type with a parameter of ``watched`` (frozen when
    ``KFACPreconditioner(model)`` took its default ``params``: the layers that trained then)
    that trains now: their gradients are left as they are (another optimizer steps them
    raw; silently before 2026-12-06 (late)), norms only under ``norm_blocks``; the
    parameters still frozen, to watch."""

    def named(ids: set[int]) -> list[str]:
        modules = model.named_modules()
        return [
            name
            for name, module in modules
            if name not in layers
            and takes_block(module, norm_blocks)
            and any(id(p) in ids for p in module.parameters(recurse=False))
        ]

    return _watch_unfrozen(
        watched,
        named,
        lambda names: (
            f"layer(s) {names} were frozen when the preconditioner was built with its default "
            "params (the layers that trained then) and train now: their gradients are not "
            "preconditioned. Build it with params=model.parameters() to precondition layers "
            "unfrozen later"
        ),
    )
