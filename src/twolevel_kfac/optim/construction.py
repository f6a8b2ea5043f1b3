"""How a preconditioner reads its constructor's arguments.

``KFACPreconditioner(model, options=None, *, fine=None, coarse=None, **kwargs)`` and its
presets (``EKFACPreconditioner``, ``KPSVDPreconditioner``, …, ``TwoLevelPreconditioner``)
resolve them here, once: the fine level by name (:func:`fine_type_of`), the keyword
arguments the class takes (:func:`accepted_arguments`: the :class:`.options.CurvatureOptions`
fields, the fine level's own, a coarse level's), and the options with their
``inverse_method`` resolved (:func:`resolve_options`); and the form of the small embedding
tables' token factors (:func:`choose_table_forms`). The optimizers (``KFAC``,
``TwoLevelKFAC``, …) check their keywords against the same sets.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torch import nn

from ..curvature.factor_inverse import HALF_DTYPES
from ..curvature.layer_types import is_token_table
from ..curvature.token_form import choose_token_factors
from .fine import FineLevel
from .options import CURVATURE_ARGUMENTS, CoarseOptions, CurvatureOptions, resolve_inverse_method

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

# KFACPreconditioner's keyword parameters (a subclass's signature may hide them in **kwargs)
OWN_PARAMETERS = frozenset({"params", "fine", "coarse", "damping_varies"})


def fine_type_of(cls: type[KFACPreconditioner], fine: str | None) -> type[FineLevel]:
    """The fine level of ``cls(..., fine=fine)``: ``cls.fine_level`` where ``fine`` is
    ``None``, else the one called ``fine``.

    Raises:
        ValueError: an unknown name (the message lists them), or a preset with a fine level
            of its own (``EKFACPreconditioner``) given another's name: it would run that
            level under the preset's name.
    """
    from .levels import fine_level_type  # the registry imports the fine levels, and they this

    if fine is None:
        return cls.fine_level
    chosen = fine_level_type(fine)
    own = cls.fine_level
    if own is not FineLevel and chosen is not own:
        raise ValueError(
            f"{cls.__name__} is the {own.name!r} fine level; fine={fine!r} names another: "
            f"give fine={fine!r} to KFACPreconditioner (or KFAC, TwoLevelKFAC) instead"
        )
    return chosen


def accepted_arguments(cls: type[KFACPreconditioner], fine: str | None) -> frozenset[str]:
    """The keyword arguments ``cls(model, fine=fine, ...)`` takes besides its own
    parameters: every :class:`CurvatureOptions` field, the fine level's
    (``power_iterations``, …) and the coarse level's (``cls.coarse_arguments``)."""
    return _accepted(cls, fine_type_of(cls, fine))


def _accepted(cls: type[KFACPreconditioner], fine_type: type[FineLevel]) -> frozenset[str]:
    """:func:`accepted_arguments` with the fine level resolved."""
    return CURVATURE_ARGUMENTS | fine_type.extra_arguments | cls.coarse_arguments


def resolve_options(
    cls: type[KFACPreconditioner],
    options: CurvatureOptions | None,
    fine: str | None,
    coarse: CoarseOptions | None,
    damping_varies: bool,
    kwargs: dict[str, Any],
) -> tuple[CurvatureOptions, type[FineLevel], dict[str, Any]]:
    """``(options, fine level, its arguments)`` of ``cls(model, options, fine=fine,
    coarse=coarse, damping_varies=damping_varies, **kwargs)``: ``options`` or the
    :class:`CurvatureOptions` of ``kwargs`` (an unknown keyword refused with the nearest
    accepted one named), ``inverse_method="auto"`` resolved
    (:func:`.options.resolve_inverse_method`); the fine level's own arguments are taken
    out of ``kwargs``.

    Raises:
        TypeError: an unknown keyword, or both ``options`` and keywords.
        ValueError: an unknown fine level (:func:`fine_type_of`).
    """
    fine_type = fine_type_of(cls, fine)
    fine_arguments = {k: kwargs.pop(k) for k in list(kwargs) if k in fine_type.extra_arguments}
    if options is not None and kwargs:
        raise TypeError("pass either options=... or keyword arguments, not both")
    hints = _accepted(cls, fine_type) | OWN_PARAMETERS
    options = options or CurvatureOptions.of(cls, kwargs, hints)
    method = resolve_inverse_method(
        options.inverse_method,
        damping_mode=options.damping_mode,
        damping_varies=damping_varies or callable(options.damping),
        fine_needs_eigenbasis=fine_type.needs_eigenbasis,
        coarse_needs_eigenbasis=coarse is not None
        and cls.coarse_level_type.needs_eigenbasis(coarse),
        half_factors=options.factor_dtype in HALF_DTYPES,
    )
    return replace(options, inverse_method=method), fine_type, fine_arguments


def choose_table_forms(pre: KFACPreconditioner, fine: type[FineLevel]) -> None:
    """Choose the form of the token factor of each small embedding table ``pre``
    preconditions (:mod:`~twolevel_kfac.curvature.token_form`): the vector of frequencies
    where the options read nothing but ``G`` of its block (the expand view, a fine level
    with :attr:`~.fine.FineLevel.diagonal_tables`, factors not in a half dtype, which holds
    few token ids exactly) and no module of another type computes with its weight (a tied
    ``Linear`` head adds a dense ``δδᵀ``); else the dense one-hot ``G``."""
    options, tables = pre.options, dict[nn.Module, bool]()
    for name, modules in pre.uses.items():
        vector = (
            is_token_table(modules) and options.weight_sharing == "expand" and fine.diagonal_tables
        )
        vector = vector and not _DENSE and pre.factor_dtype(name) not in HALF_DTYPES
        tables.update({m: vector for m in modules if isinstance(m, nn.Embedding)})
    choose_token_factors(pre, tables)


_DENSE: list[None] = []  # one entry per dense_tables() block in force


@contextmanager
def dense_tables() -> Iterator[None]:
    """Optimizers built inside keep the dense one-hot ``G`` of every small table (the form
    of all of them before 2026-12-09): for benchmarks and tests that compare the forms."""
    _DENSE.append(None)
    try:
        yield
    finally:
        _DENSE.pop()
