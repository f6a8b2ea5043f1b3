"""The keywords the optimizers take: unknown constructor keywords refused naming the
nearest known one (:func:`check_known`), and ``torch.optim.SGD``'s options that they do not
take, whether given as constructor keywords (refused as unknown, with what to do instead of
a "did you mean" that points at another option: ``dampening`` is not ``damping``) or as
param group keys (copied from an SGD set-up: ``maximize=True`` in a group stepped
downhill, silently, before 2026-12-09: refused now where it would change the step)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from typing import Any

__all__ = ["SGD_ONLY", "check_known", "refuse_sgd_keys", "sgd_only_note"]

SGD_ONLY: dict[str, str] = {
    "maximize": "minimize the negated objective instead",
    "dampening": "the momentum buffer is torch's without dampening (scale lr instead)",
    "differentiable": "the step is taken under torch.no_grad",
    "foreach": "the momentum step always runs torch's foreach path",
    "fused": "the momentum step always runs torch's foreach path",
}
"""Each option and what to do instead."""


def sgd_only_note(names: Iterable[str]) -> str:
    """What to say of ``torch.optim.SGD``'s options among ``names`` ('' for none)."""
    found = [n for n in names if n in SGD_ONLY]
    return "; ".join(f"{n!r} is torch.optim.SGD's, not taken here: {SGD_ONLY[n]}" for n in found)


def refuse_sgd_keys(groups: Iterable[dict[str, Any]], added: bool = False) -> None:
    """Refuse a param group holding an SGD option that would change its step
    (``maximize=True``, a nonzero ``dampening``, ``differentiable=True``); ``foreach`` and
    ``fused`` change no number and pass. A group being ``added`` (with the optimizer's
    defaults) is also refused for ``nesterov=True`` without momentum, as torch's SGD does
    (a scheduler may cycle the momentum of a group already added through 0).

    Raises:
        ValueError: naming the key and what to do instead.
    """
    for index, group in enumerate(groups):
        if added and group.get("nesterov") and not group.get("momentum"):
            raise ValueError(
                "nesterov=True needs a momentum: the step would be the plain one "
                "(torch.optim.SGD refuses it too)"
            )
        for key in ("maximize", "dampening", "differentiable"):
            if group.get(key):
                where = "the param group" if added else f"param group {index}"
                raise ValueError(
                    f"{where} sets {key}={group[key]!r}: {sgd_only_note([key])} "
                    "(the step would be taken as if it were not set)"
                )


def check_known(
    owner: type, given: Iterable[str], allowed: Iterable[str], taken: Iterable[str] = ()
) -> None:
    """Refuse keyword arguments of ``owner(...)`` outside ``allowed`` (the options it passes
    on), naming the nearest of those, of ``taken`` (the options it took before) and of its
    own parameters (``lr``, ``momentum``, …); or what to do instead of one of SGD's."""
    unknown = sorted(set(given) - set(allowed))
    if not unknown:
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    own = [n for n, p in inspect.signature(owner).parameters.items() if p.kind in named]
    names = sorted({*allowed, *taken, *own} - {"options", "model"})
    near = {u: difflib.get_close_matches(u, names, n=1) for u in unknown if u not in SGD_ONLY}
    notes = [f"did you mean {m[0]!r} for {u!r}?" for u, m in near.items() if m]
    hints = "; ".join(filter(None, [*notes, sgd_only_note(unknown)]))
    raise TypeError(
        f"{owner.__name__} got unknown argument(s) {unknown}"
        f"{'; ' + hints if hints else ''}; it takes: {', '.join(names)}"
    )
