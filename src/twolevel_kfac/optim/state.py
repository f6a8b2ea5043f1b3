"""The checkpoint state of a KFAC preconditioner: what :meth:`state_dict` saves and
:meth:`load_state_dict` restores (factors, decompositions, schedule, sampler).

Under ``torch.distributed`` each rank's sampler is seeded per step
(:func:`~..distributed.step_seed`), so the state of any rank restores all of them and saving
is no collective (``if rank == 0: torch.save(opt.state_dict(), …)`` works), unless a
two-level level's steps read the Fisher mini-batch between refreshes (its rows, each rank
its own, or ``W₀`` built from them at the step after a refresh: ``reads_statistics``):
then every rank must call it, and the rank-local parts (``pre._rank_state()``) are
gathered into ``"ranks"``. Loading puts every tensor on the device of its layer, so a state
saved on the CPU or another GPU resumes where the model now is.
"""

from __future__ import annotations

import copy
import functools
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..curvature.blocks import factor_shapes, layer_stats, new_factors, trains
from ..distributed import rank_seed
from ..placement import CPU, move_tensors
from ..warning_level import caller_level
from .frozen import trained_as
from .interrupted import check_not_interrupted

if TYPE_CHECKING:
    from torch import Tensor, nn

    from .preconditioner import KFACPreconditioner

__all__ = ["all_or_nothing", "kfac_state", "load_kfac_state"]

_Loader = TypeVar("_Loader", bound=Callable[[Any, dict[str, Any]], None])


def all_or_nothing(load: _Loader) -> _Loader:
    """A ``load_state_dict`` that leaves its object as it was when it raises: a refused
    checkpoint (another model, class, fine level, fallback or param groups) found after
    part of the state was restored would leave a mix of the two, which a caller who catches
    the error keeps training (0.04–1.96 off the untouched optimizer six steps on). The
    state before is copied and loaded back, once for nested guarded loads (the optimizer's
    and its preconditioner's). Not under ``torch.distributed``, where ``state_dict()`` may be
    a collective that a rank recovering from an interrupted step must not wait on. What was
    captured for the coming step (a load between ``backward()`` and ``step()``) stays."""

    @functools.wraps(load)
    def guarded(self: Any, state_dict: dict[str, Any]) -> None:
        pre = getattr(self, "preconditioner", self)
        stack = _GUARDED.__dict__.setdefault("loads", [])  # this thread's guarded loads
        covered = any(self is g or getattr(g, "preconditioner", None) is self for g in stack)
        if covered or pre.comm.distributed:
            load(self, state_dict)
            return
        try:
            with warnings.catch_warnings():  # (a copy to fall back to, not a checkpoint)
                warnings.filterwarnings("ignore", message=re.escape(_MID_STEP))
                before = copy.deepcopy(self.state_dict())
        except RuntimeError:  # an interrupted step's state, which a load may replace
            before = None
        capture = pre.capture
        pending = capture.pending()  # this step's statistics, which a load discards
        stack.append(self)
        try:
            load(self, state_dict)
        except Exception as error:
            if before is not None:
                load(self, before)
                capture.restore(pending)
            if isinstance(error, KeyError):  # (torch's own optimizers raise it bare)
                raise ValueError(
                    f"the {type(self).__name__} state dict lacks an entry {error} (edited, or "
                    "saved by another class or version)"
                    + ("; nothing was loaded" if before is not None else "")
                ) from error
            raise
        finally:
            stack.pop()

    return guarded  # type: ignore[return-value]


# per thread, the guarded loads in progress (a nested load of the same optimizer or of its
# preconditioner is not copied again)
_GUARDED = threading.local()


def kfac_state(pre: KFACPreconditioner) -> dict[str, Any]:
    """Factors, cached decompositions, step counter and the sampler's RNG state (refused
    after a step interrupted part-way: :mod:`.interrupted`)."""
    check_not_interrupted(pre, "saving this state")
    coarse = pre.coarse_level
    # (by the options alone, the same at every step: rows held or W₀ built from them)
    gathered = pre.comm.distributed and coarse is not None and coarse.reads_statistics
    if gathered:
        pre.comm.rendezvous(
            "optimizer.state_dict() of a two-level optimizer whose steps read the Fisher "
            "mini-batch (a combination other than 'additive', the faithful schedule or "
            "diagnostics: each rank's rows are gathered)"
        )
    state = {
        "steps": pre.steps,
        "damping": pre.damping,
        "damping_option": None if callable(pre.options.damping) else pre.options.damping,
        "generator": _sampler_state(pre),
        "factors": {name: f.state_dict() for name, f in pre.factors.items()},
        "layers": list(pre.layers),
        "saved_by": _method(pre),
        **pre.fine.state_dict(),
    }
    state["capture_next"] = pre.capture.active  # the coming step captures statistics
    state["schedule"] = pre.schedule.state_dict()
    if coarse is not None:
        state["coarse"] = coarse.state_dict(pre.comm.distributed)
    if pre.retain_statistics:
        state["retained"] = {n: (s.a, s.g) for n, s in pre.retained_stats.items()}
    if gathered:  # on the CPU: rank 0 must not unpickle other GPUs' tensors
        state["ranks"] = pre.comm.all_gather_object(move_tensors(pre._rank_state(), CPU))
    if pre.comm.distributed:  # (each rank's sampler is seeded per step: no state of its own)
        state["world_size"] = pre.comm.world_size
    return state


_MID_STEP = "state_dict() between a captured backward and step()"


def _sampler_state(pre: KFACPreconditioner) -> Tensor:
    """The sampler's state to save: between a captured backward and its ``step()`` (a
    SIGTERM handler's save, a callback after ``backward()``), the state before that step's
    draws, so that a resume redoing the step's forward and backward draws the same targets
    and rows (it drew others: a step 0.06–0.07 off under ``mc``, before 2026-12-06
    (night)), with a warning: the captured statistics are not saved, so a resume that
    calls ``step()`` on saved gradients folds none at this step."""
    capture = pre.capture
    drawn_from = capture.drawn_from
    if drawn_from is None or not capture.pending()["_done"]:
        return pre.generator.get_state()
    warnings.warn(
        f"{_MID_STEP}: the statistics captured for this step are not in the state, and "
        "its sampler is saved as it was before this step's first capturing forward. Resume "
        "by redoing the step's forward and backward (then it draws what this step drew); "
        "a resumed step() on saved gradients takes the factors from before this step",
        RuntimeWarning,
        stacklevel=caller_level(),
    )
    return drawn_from


def _load_kfac_state(pre: KFACPreconditioner, state: dict[str, Any]) -> None:
    """Restore :func:`kfac_state` into ``pre`` (:func:`load_kfac_state`: all or nothing).

    Raises:
        ValueError: if the state is for other layers.
    """
    saved = list(state.get("layers", []))
    if saved != list(pre.layers):
        extra = [n for n in pre.layers if n not in saved]
        missing = [n for n in saved if n not in pre.layers]
        what = f"new here: {extra}; gone: {missing}"
        if not (extra or missing):  # (their order is that of the model's modules)
            what = (
                "the same layers in another order: this model registers its modules in "
                "another order than the saved one's; build it in the saved order"
            )
        raise ValueError(
            f"preconditioner state is for layers {saved}, but this model has {list(pre.layers)}"
            f" ({what}). Another model, other params= or "
            "norm_blocks, an optimizer built on the torch.compile'd model on one side only "
            "(its layers are named '_orig_mod.…'), or a checkpoint from a version that gave "
            "fewer module types a block "
            "(embedding tables over 4096 rows, grouped convolutions under "
            "coarse_space='tselepidis' have one since 2026-12-02)"
        )
    restored = {
        name: _restored_factors(pre, name, saved) for name, saved in state["factors"].items()
    }
    _check_method(pre, state)
    coarse = pre.coarse_level
    if coarse is not None:  # its option checks too, before anything here changes
        coarse.check_state(state)
    saved_by = state.get("saved_by")  # (absent before 2026-12-04)
    if saved_by is not None and saved_by != _method(pre):
        warnings.warn(
            f"the checkpoint was saved by {saved_by} and is loaded by {_method(pre)}: what "
            "the other method keeps beyond the Kronecker factors (a coarse level, EKFAC's "
            "scalings, a Kronecker correction) is not used",
            RuntimeWarning,
            stacklevel=caller_level(),
        )
    pre.capture.discard()  # before the generator is restored: a discard may rewind it
    pre.steps = int(state["steps"])
    pre.damping = resumed_damping(pre, float(state["damping"]), state.get("damping_option"))
    parts = state.get("ranks") or [{"generator": state["generator"]}] * state.get("world_size", 1)
    part = select_rank_state(parts, pre.comm.rank, pre.comm.world_size)
    if part is None:
        pre.generator.manual_seed(rank_seed(pre.options.seed, pre.comm.rank))
    else:
        pre.generator.set_state(part["generator"])
    pre.factors.update(restored)
    early = coarse is not None and coarse.basis_reads_decompositions
    if coarse is not None and early:  # its basis from the decompositions as saved
        coarse.load_state_dict(state)
    method = pre.options.inverse_method
    converted = [n for n, f in restored.items() if f.convert_decomposition(method)]
    if converted:
        pre.fine_version += 1  # a basis built before this no longer rebuilds: it is saved
        warnings.warn(
            f"the checkpoint's decompositions of {len(converted)} layer(s) were made under "
            f"another inverse_method; converted to {pre.options.inverse_method!r} (the same "
            "inverses up to rounding: the run continues, but not bit-identically to one that "
            "kept the old method; pass that inverse_method to resume exactly)",
            RuntimeWarning,
            stacklevel=caller_level(),
        )
    retained = state.get("retained") or {}
    pre.retained_stats = {
        n: layer_stats(pre.layers[n], *pre.placed(n, ag)) for n, ag in retained.items()
    }
    pre.fine.load_state_dict(state)
    if coarse is not None and not early:
        coarse.load_state_dict(state)
    pre.active, pre.interrupted = list(pre.layers), None
    pre.schedule.load_state_dict(state.get("schedule"))
    pre._schedule_capture()
    pre.capture.active = bool(state.get("capture_next", pre.capture.active))


def resumed_damping(pre: KFACPreconditioner, saved: float, saved_option: Any) -> float:
    """The ``λ`` a loaded preconditioner continues with. A constant ``damping`` is an option
    like ``inverse_method``: this optimizer's own, with a warning when the checkpoint ran
    another (raising it after a divergence takes effect; the saved inverses are rebuilt
    from the frozen factors at the new ``λ``). Under adaptive damping ``λ`` is state: the
    checkpoint's, with a warning when it was started from another value than this
    optimizer's ``damping`` (which is then not used). A schedule sets ``λ`` at every step."""
    option = pre.options.damping
    if callable(option):
        return saved
    if pre.damping_varies:
        if saved_option is not None and float(saved_option) != float(option):
            warnings.warn(
                f"adaptive damping continues from the checkpoint's λ = {saved:g} (its run "
                f"started from damping={saved_option:g}); this optimizer's damping={option:g} "
                "is not used. To restart the adaptation from it, set "
                "optimizer.preconditioner.damping after loading",
                RuntimeWarning,
                stacklevel=caller_level(),
            )
        return saved
    if saved != float(option):
        warnings.warn(
            f"the checkpoint ran damping={saved:g}; this optimizer continues with its own "
            f"damping={option:g} (the run is not bit-identical to one that kept the old value; "
            "pass the checkpoint's damping to resume exactly)",
            RuntimeWarning,
            stacklevel=caller_level(),
        )
    return float(option)


def select_rank_state(parts: Sequence[Any], rank: int, world_size: int) -> Any | None:
    """This rank's part of a gathered ``state["ranks"]``; on another world size, with a
    warning, rank ``r``'s old part if there was one, else ``None`` (start from the seed)."""
    if len(parts) == world_size:
        return parts[rank]
    warnings.warn(
        f"the state was saved by {len(parts)} process(es) and is loaded by {world_size}: "
        "the batch is split otherwise and the samplers draw otherwise (a rank new to the "
        "run starts from its seed), so the resumed run is not bit-identical to an "
        "uninterrupted one",
        stacklevel=caller_level(),
    )
    return parts[rank] if rank < len(parts) else None


def _method(pre: KFACPreconditioner) -> str:
    """The method a state belongs to: its fine level and coarse space."""
    coarse = pre.coarse_level
    space = "no coarse level" if coarse is None else f"coarse space {coarse.options.coarse_space}"
    return f"fine level {pre.fine.name!r} with {space}"


def _check_method(pre: KFACPreconditioner, state: dict[str, Any]) -> None:
    """Raise, before anything changes, if ``state`` lacks what this method needs beyond the
    Kronecker factors: EKFAC's scalings, KFAC-corrected's corrections, a coarse level's
    state (a KFAC checkpoint loaded into EKFAC or ``TwoLevelKFAC``).

    Raises:
        ValueError: naming the method that saved the state and the missing entry.
    """
    entry = pre.fine.state_entry
    if entry is None or entry in state:
        entry = "coarse" if pre.coarse_level is not None and "coarse" not in state else None
    if entry is not None:
        saved_by = state.get("saved_by", "another method")
        raise ValueError(
            f"the checkpoint was saved by {saved_by} and has no {entry!r} entry, which "
            f"{_method(pre)} needs: load it into an optimizer of the method that saved it, or "
            "start this one afresh"
        )


def _restored_factors(pre: KFACPreconditioner, name: str, saved: dict[str, Any]) -> Any:
    """Layer ``name``'s saved curvature in a fresh object of its block type, checked against
    the layer before anything of the preconditioner changes.

    Raises:
        ValueError: the state is of another block type, its shapes are not the layer's
            (the model changed since the checkpoint: another width, ``groups``, bias, or a
            norm that now has a block), or its factors are in another dtype.
    """
    module = pre.layers[name]
    factors = new_factors(module)
    try:
        factors.load_state_dict(pre.placed(name, saved))
    except (KeyError, TypeError, AttributeError):
        table = hasattr(module, "num_embeddings")  # an embedding table (token_form)
        raise ValueError(
            f"layer {name!r}: the checkpoint's curvature is not of this layer's block "
            f"({type(module).__name__}): the model changed since it was saved"
            + ", or an optimizer of other options saved it (its dense token factor: KPSVD, "
            "KFAC-corrected, weight_sharing='reduce')" * table
        ) from None
    got = factors.factor_shapes()
    if got is None:
        return factors
    saved_dtype, dtype = getattr(factors.A, "dtype", None), pre.factor_dtype(name)
    if saved_dtype is not None and saved_dtype != dtype:
        raise ValueError(
            f"layer {name!r}: the checkpoint's factors are {saved_dtype}, this optimizer's "
            f"are {dtype} (factor_dtype, else the weights' dtype): load the model in the "
            "dtype it was saved in, or pass the checkpoint's dtype as factor_dtype"
        )
    if not trains(module):  # frozen whole: the block it had when it trained
        frozen = _frozen_block_factors(module, tuple(got))
        if frozen is not None:
            frozen.load_state_dict(pre.placed(name, saved))
            return frozen
    expected = factor_shapes(module)
    if tuple(got) != tuple(expected):
        raise ValueError(
            f"layer {name!r}: the checkpoint's curvature has shapes {list(got)}, this "
            f"layer's block needs {list(expected)}: the model changed since it was saved, "
            "or which of its weight and bias train (requires_grad): set them as they were "
            "when it was saved before loading"
        )
    return factors


def _frozen_block_factors(module: nn.Module, shapes: tuple[Any, ...]) -> Any:
    """A fresh curvature object for a layer frozen whole, of the block it had when its
    saved ``shapes`` were estimated (:func:`.frozen.trained_as`), or ``None`` when none of
    its blocks has those shapes."""
    with trained_as(module, shapes) as found:
        return new_factors(module) if found else None


load_kfac_state = all_or_nothing(_load_kfac_state)
"""Restore :func:`kfac_state` into a preconditioner; one refused leaves it as it was."""
