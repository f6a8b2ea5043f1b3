"""Checks of :class:`~.kfac.KFAC`'s param groups against its model at a step: a curvature
option set in a group (not read: warned of once), and parameters of the model with a
gradient that no group holds and that the model did not have when the optimizer was built
(replaced or added since: refused, as no step would move them)."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from torch import nn

from ..curvature.param_format import parameter_ids
from ..warning_level import caller_level
from .options import CURVATURE_ARGUMENTS

__all__ = ["refuse_new_parameters", "warn_unread_keys"]


def warn_unread_keys(groups: Iterable[dict[str, Any]], warned: set[str]) -> None:
    """Warn, once per key (``warned``: those warned of), of a param group key naming a
    curvature option (``group["damping"] = 1e-2``): the curvature options are the
    optimizer's, fixed when it was built, and no group's is read (it was set, silently)."""
    keys = sorted({k for g in groups for k in g.keys() & CURVATURE_ARGUMENTS} - warned)
    if keys:
        warned.update(keys)
        fix = "pass them to the optimizer when building it"
        if "damping" in keys:
            fix += "; set optimizer.preconditioner.damping = λ in a run, or give a schedule"
        warnings.warn(
            f"param group key(s) {keys} are curvature options, which are the optimizer's and "
            f"not read from a group: {fix}",
            RuntimeWarning,
            stacklevel=caller_level(),
        )


def refuse_new_parameters(
    model: nn.Module,
    known: Collection[int],
    groups: Iterable[dict[str, Any]],
    layers: Mapping[str, nn.Module],
) -> None:
    """Refuse parameters of ``model`` with a gradient that are in no param group and were
    not parameters of it when ``KFAC(model)`` took its default ``params`` (``known``: their
    ``id``): a parameter or module replaced or added since (``ln.weight = nn.Parameter(…)``,
    ``model.ln = nn.LayerNorm(…)``, an adapter ``nn.Linear``, a parametrization with two
    originals removed), which no step would move (silently before 2026-12-07). The weight
    and bias of the preconditioned ``layers`` are left to the preconditioner's checks,
    whose messages say more (a parameter assigned to a layer).

    Raises:
        ValueError: naming the parameters and the fixes.
    """
    held = parameter_ids(list(groups))
    own = {id(m) for m in layers.values()}
    new = [
        f"{prefix}{'.' if prefix else ''}{name}"
        for prefix, module in model.named_modules()
        for name, p in module.named_parameters(recurse=False)
        if p.grad is not None and id(p) not in held and id(p) not in known
        and not (id(module) in own and name in ("weight", "bias"))
    ]  # fmt: skip
    if new:
        raise ValueError(
            f"parameter(s) {new} have gradients but are not parameters the optimizer was "
            "built with (replaced or added since: an assigned nn.Parameter, a new module), "
            "so no step would move them: build the optimizer after changing the model, add "
            "them with add_param_group, or give params= (then parameters outside it are "
            "left to another optimizer)"
        )
