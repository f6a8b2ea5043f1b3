"""The checkpoint state of a two-level coarse level (:class:`~.coarse.CoarseLevel`): what
its ``state_dict`` saves and ``load_state_dict`` restores.

Saved: the layers it spans, ``F_c`` (and how many estimates the faithful schedule has
averaged), the basis unless the state rebuilds it bit for bit on load
(:attr:`~.coarse.CoarseLevel.basis_rebuilds`: Nicolaides vectors, which depend on the
layer shapes alone; a spectral or Krylov-Nicolaides basis built from the saved fine level
and ``λ``; a layer's outer products ``l r̃ᵀ`` are saved as ``{"left": l, "right": r̃}``,
its split vectors as ``{"weight", "bias"}``),
``N`` of the Fisher mini-batch, and what a step between refreshes reads
of that mini-batch (:attr:`~.coarse.CoarseLevel.reads_statistics`): either ``W₀ = FR₀ᵀ``
(the same on every rank) or its rows (under ``torch.distributed`` every rank's rows go
into the preconditioner's ``"ranks"``).
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..curvature.blocks import LayerStats, block_parameters, layer_stats, trains
from ..placement import autocast_off
from ..twolevel.coarse_matrix import CoarseOperator
from ..twolevel.fisher_columns import FisherColumns
from ..twolevel.fisher_products import check_stats
from ..twolevel.global_fisher import own_statistics
from ..twolevel.layer_basis import CoarseBasis, layer_from_state, layer_state
from ..warning_level import caller_level
from .frozen import trained_as

if TYPE_CHECKING:
    from .coarse import CoarseLevel

__all__ = ["check_coarse_state", "coarse_rank_state", "coarse_state", "load_coarse_state"]


def _stats_pairs(stats: list[LayerStats] | None) -> list[tuple[Tensor, Tensor]] | None:
    return None if stats is None else [(s.a, s.g) for s in stats]


def _on_names(level: CoarseLevel, trees: list[Any]) -> list[Any]:
    """Saved per-layer state of the level's layers, each on its layer's device and in the
    dtype of its statistics (a state saved by a run in another dtype, loaded with
    ``factor_dtype`` set to its factors': its floating tensors converted)."""
    dtypes = level.host.capture.dtypes
    return [level.host.placed(n, t, dtypes.get(n)) for n, t in zip(level.names, trees, strict=True)]


def coarse_state(level: CoarseLevel, distributed: bool) -> dict[str, Any]:
    """The ``"coarse"`` entry of the preconditioner's state (``distributed``: every rank's
    rows of the Fisher mini-batch are in its ``"ranks"`` instead)."""
    rebuilt = level.basis_rebuilds
    return {
        "fisher_stats": None if distributed else _stats_pairs(level.fisher_stats),
        "basis": None if rebuilt or level.basis is None else _saved_basis(level.basis),
        "basis_rebuilt": rebuilt and level.basis is not None,
        "basis_built_by": _built_by(level),
        "fisher_samples": level.fisher_samples,
        "fisher_undamped_columns": (
            None if level.fisher_columns is None else level.fisher_columns.columns
        ),
        "coarse_matrix": level.coarse_matrix,
        "coarse_damping": level.coarse_damping,
        "coarse_updates": level.coarse_updates,
        "names": level.names,
        "tselepidis_locations": True,  # F_c counts locations (since 2026-12-04)
    }


def _saved_basis(basis: CoarseBasis) -> list[Tensor | dict[str, Tensor]]:
    """The basis as plain tensors (:func:`~twolevel_kfac.twolevel.layer_basis.layer_state`:
    outer products as ``{"left", "right"}``, split vectors as ``{"weight", "bias"}``)."""
    return [layer_state(b) for b in basis]


def _loaded_basis(saved: list[Tensor | dict[str, Tensor]]) -> CoarseBasis:
    """:func:`_saved_basis` read back."""
    return [layer_from_state(b) for b in saved]


def _built_by(level: CoarseLevel) -> dict[str, str]:
    """What a rebuilt basis depends on besides the saved fine level and ``λ``: the options a
    resumed run must share to rebuild the same one (the space alone for Nicolaides vectors,
    which the layer shapes give)."""
    host = level.host
    if level.structural_basis:
        return {"coarse_space": level.options.coarse_space}
    return {
        "coarse_space": level.options.coarse_space,
        "spectral_which": level.options.spectral_which,
        "fine": type(host.fine).__name__,
        "damping_mode": host.options.damping_mode,
    }


def coarse_rank_state(level: CoarseLevel) -> dict[str, Any]:
    """This rank's part: its rows of the Fisher mini-batch."""
    return {"fisher_stats": _stats_pairs(level.fisher_stats)}


def check_coarse_state(level: CoarseLevel, state: dict[str, Any]) -> None:
    """Raise if :func:`load_coarse_state` cannot restore ``state`` into ``level``, before
    anything of the preconditioner changes (a caller who catches the error keeps a working
    optimizer).

    Raises:
        ValueError: if it has no ``"coarse"`` entry, comes from a development version, rebuilds
            its basis under other options or saved one of another coarse space (or
            ``spectral_which``), or holds no Fisher mini-batch where the level's options read
            one between refreshes.
    """
    if "coarse" not in state:
        raise ValueError("not a two-level preconditioner state: no 'coarse' entry")
    coarse = state["coarse"]
    if "fisher_columns" in coarse:  # W = F̂R₀ᵀ with the damping of its refresh in it
        raise ValueError(
            "this two-level state was saved by a development version that kept F̂R₀ᵀ under "
            "'fisher_columns' (now the undamped W₀ under 'fisher_undamped_columns'): "
            "resume from a state saved by this version, or with a fresh optimizer"
        )
    saved_by, built_by = coarse.get("basis_built_by"), _built_by(level)
    if saved_by is not None and not coarse.get("basis_rebuilt"):  # a saved basis: its space
        spectral = level.options.coarse_space == "spectral"  # the only space reading `which`
        read = ("coarse_space", "spectral_which") if spectral else ("coarse_space",)
        saved_by = {k: v for k, v in saved_by.items() if k in read}
        built_by = {k: v for k, v in built_by.items() if k in saved_by}
    if saved_by is not None and saved_by != built_by:
        rebuilds = "rebuilds its coarse basis on load, as" if coarse.get("basis_rebuilt") else "was"
        raise ValueError(
            f"this two-level state {rebuilds} built with {saved_by}, but this optimizer has "
            f"{built_by}: resume with the options it was saved with"
        )
    has_operator = (coarse["basis"] is not None or bool(coarse.get("basis_rebuilt"))) and (
        coarse["coarse_matrix"] is not None
    )
    has_rows = None not in [p["fisher_stats"] for p in state.get("ranks") or [coarse]]
    if not has_operator or not level.reads_statistics or has_rows:
        return
    if level.host.options.cov_interval == 1 and not level.options.diagnostics:
        return  # nothing outlives a step's refresh
    options = level.options
    wanted = (
        f"combination={options.combination!r}, coarse_refresh={options.coarse_refresh!r}, "
        f"diagnostics={options.diagnostics}"
    )
    if coarse.get("fisher_undamped_columns") is None:
        raise ValueError(
            "this two-level state holds no Fisher mini-batch (it was saved with "
            "combination='additive' and the consistent refresh, or with cov_interval=1, which "
            f"keep none), but {wanted} reads it at every step: resume with the options it was "
            "saved with"
        )
    if not level.columns_suffice:
        raise ValueError(
            "this two-level state holds only W₀ = FR₀ᵀ of its Fisher mini-batch, not the rows "
            f"that {wanted} reads at every step: resume with the options it was saved with"
        )


def load_coarse_state(level: CoarseLevel, state: dict[str, Any]) -> None:
    """Restore :func:`coarse_state` from the preconditioner's ``state``.

    Raises:
        ValueError: as :func:`check_coarse_state` (run first).
    """
    check_coarse_state(level, state)
    coarse = state["coarse"]
    level.names = list(coarse.get("names", level.host.layers))
    saved = [p["fisher_stats"] for p in state.get("ranks") or [coarse]]
    per_rank = None
    if None not in saved:
        layers = [level.host.layers[n] for n in level.names]
        per_rank = [
            [layer_stats(m, a, g) for m, (a, g) in zip(layers, _on_names(level, p), strict=True)]
            for p in saved
        ]
    level.fisher_stats = own_statistics(per_rank, level.host.comm.rank, level.host.comm.world_size)
    level.fisher_samples = coarse.get("fisher_samples")
    if level.fisher_samples is None and per_rank is not None:  # a state from before it
        level.fisher_samples = sum(check_stats(stats) for stats in per_rank)
    saved_basis = coarse["basis"]
    level.basis = None if saved_basis is None else _loaded_basis(_on_names(level, saved_basis))
    level.basis_source = None
    if coarse.get("basis_rebuilt"):
        param = block_parameters(level.host.layers[level.names[0]])[0]
        with torch.no_grad(), autocast_off(param), ExitStack() as blocks:  # as in step()
            for name in level.names:  # a layer frozen since: the block of its vectors
                shapes = level.host.factors[name].factor_shapes()
                if not trains(level.host.layers[name]) and shapes is not None:
                    blocks.enter_context(trained_as(level.host.layers[name], tuple(shapes)))
            level.basis = level.basis_of(None)
        level.basis_source = (level.host.fine_version, level.host.damping)
    columns = coarse.get("fisher_undamped_columns")
    level.fisher_columns = None if columns is None else FisherColumns(_on_names(level, columns))
    level.coarse_matrix = level.host.placed(level.names[0], coarse["coarse_matrix"])
    _warn_old_tselepidis(level, coarse)
    level.coarse_damping = coarse.get("coarse_damping")  # None: a state from before it
    level.coarse_updates = int(coarse["coarse_updates"])
    operator = None
    if level.basis is not None and level.coarse_matrix is not None:
        operator = CoarseOperator.from_matrix(level.basis, level.coarse_matrix)
    level.install_operator(operator)


def _warn_old_tselepidis(level: CoarseLevel, coarse: dict[str, Any]) -> None:
    """Warn of a Tselepidis coarse matrix saved before it counted the layers' locations:
    a convolution's or sequence layer's entries ``1/T`` of today's until the next refresh."""
    if level.options.coarse_space != "tselepidis" or coarse.get("tselepidis_locations"):
        return
    if coarse.get("coarse_matrix") is not None:
        warnings.warn(
            "this coarse_space='tselepidis' checkpoint predates 2026-12-04, when its coarse "
            "matrix began counting each layer's locations T: its saved F_c (1/T of today's "
            "on convolutions and sequence layers) is used until the next refresh rebuilds it",
            RuntimeWarning,
            stacklevel=caller_level(),
        )
