"""A check of a module type registered with :func:`~.layer_types.register_layer_type`:
that its ``features`` and ``gradients`` reproduce its weight's gradient.

A ``Linear``-like block assumes ``∇_W̄ ℓ = Σ_t δ_t ā_tᵀ`` with ``W̄ = [W.reshape(d_out, -1), b]``,
``ā`` what ``features`` gives and ``δ`` the pre-activation gradient ``gradients`` gives.
A registration that breaks it preconditions with a block of something else, silently: a
weight stored ``[in, out]`` (transformers' ``Conv1D``) with ``Linear``'s functions is wrong
without an error when square and fails with a bare shape error otherwise; a module that
scales its output registered with ``Linear``'s ``δ`` is off by the scale. At the first
captured forward of each such type, one probe checks it: for a fixed pseudo-random
``u`` shaped like the output, ``∇_W̄ ⟨u, f(x)⟩`` from autograd against ``Σ_t δ(u)_t ā_tᵀ``.
Types of torch and of this package are not probed (their blocks are tested), unless a
module of theirs had its forward replaced on the instance (``conv._conv_forward = …`` with
circular padding in width, ``lin.forward = lambda x: orig(x) * s``: their steps were 0.13–0.92
off, silently, before 2026-12-06 (night)): each such module is probed once."""

from __future__ import annotations

import warnings
import weakref
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ..warning_level import caller_level
from .blocks import input_features, layer_bias, layer_weight, output_gradients
from .hooks import WeakHook
from .layer_types import (
    FORWARD_METHODS,
    LayerType,
    layer_type,
    library_registered,
    patched_forward,
)
from .scale_shift import ScaleShiftStats

__all__ = ["check_registration"]

_CHECKED: set[LayerType] = set()  # registrations probed (a new one of a type is probed again)
# modules patched, probed: their patches then (a forward patched again is probed again)
_PATCHED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, ...]] = weakref.WeakKeyDictionary()
_OWN = ("torch.", "twolevel_kfac.")


def check_registration(
    name: str,
    module: nn.Module,
    call: tuple[tuple[Any, ...], dict[str, Any]],
    output: Tensor,
    model: nn.Module | None = None,
) -> None:
    """Probe ``module``'s registered type once, or ``module`` once where its forward was
    replaced on the instance (module docstring), rerunning it on its call's ``(args,
    kwargs)`` without the captures' hooks in ``model`` (a patched forward may call other
    layers, whose hooks would record a call without a gradient) (:func:`_own_use`).

    Raises:
        ValueError: naming the layer, the type, the error and the contract.
    """
    entry, kind, patched = layer_type(module), type(module), patched_forward(module)
    if entry is None or (patched is None and entry in _CHECKED) or _probed(module):
        return
    # the library's own registrations are tested (a torch type a user registers is probed)
    own = kind.__module__.startswith(_OWN) and library_registered(entry.module_type)
    if (own and patched is None) or torch.compiler.is_compiling():
        return  # (under compile a probe is no graph to trace: an eager capture's)
    if patched is None:
        _CHECKED.add(entry)
    else:
        _PATCHED[module] = tuple(map(_reference, _patches(module)))
    stats = entry.statistics
    own_block = stats is not None and (patched is None or stats.applies(module))
    # a norm registered by the user: γ ⊙ x̂ + β, probed unit-wise (unprobed before 2026-12-09:
    # timm's BatchNormAct2d registered as a BatchNorm stepped 7–191 % off, silently)
    unitwise = own_block and patched is None and stats is ScaleShiftStats
    what = f"the registration of {kind.__name__}" if patched is None else f"its {patched}"
    if (own_block and not unitwise) or entry.rows_from_inputs or not output.requires_grad:
        if patched is not None and output.requires_grad:  # (the others: their own contract)
            _unchecked(name, what, f"a {_unprobed(entry, module)} has no probe", kind)
        return
    weight, bias = layer_weight(module), layer_bias(module)
    rerun, copies = _own_use(module, call, output.device, module if model is None else model)
    if not isinstance(rerun, Tensor):
        _unchecked(name, what, "its forward, run again on copies of its parameters, failed")
        return
    generator = torch.Generator().manual_seed(20261204)  # not torch's stream nor seed 0's
    probe = torch.randn(rerun.shape, generator=generator).to(rerun)
    wanted = [copies.get(id(p)) if p is not None else None for p in (weight, bias)]
    trained = [c for c in wanted if c is not None and c.requires_grad]
    grads = list(torch.autograd.grad(rerun, trained, probe, allow_unused=True))
    if any(g is None for g in grads):  # (a closure holds them, or the forward drops one)
        why = "its forward does not read its parameters from the module, or leaves one out"
        _unchecked(name, what, why)
        return
    expected = tuple(grads.pop(0) if c is not None and c.requires_grad else None for c in wanted)
    inputs = (call[0][0] if call[0] else next(iter(call[1].values()))).detach()
    with torch.no_grad():
        try:
            kept = inputs if entry.record is None else entry.record(module, inputs)  # as kept
            a = input_features(module, kept).double()
            g = output_gradients(module, probe).double()
            problem = _mismatch(weight, bias, a, g, expected, rerun.dtype, unitwise)
        except (RuntimeError, ValueError, IndexError) as error:  # (a norm of other layout)
            problem = f"its functions raised {type(error).__name__}: {error}"
    if problem is not None and patched is not None:
        del _PATCHED[module]  # (probed again: the error again, if caught)
        raise ValueError(
            f"layer {name!r}: its {patched} was replaced on the instance and does not compute "
            f"what {entry.module_type.__name__}'s block assumes ({problem}): restore the "
            f"class's {patched}, or write the layer as a subclass overriding {patched} (it "
            "then takes the fallback step, or the block of a type you register)"
        )
    if problem is not None and unitwise:
        _CHECKED.discard(entry)
        raise ValueError(
            f"layer {name!r}: the functions registered for {kind.__name__} do not reproduce "
            f"its scale's and shift's gradients ({problem}). A norm's must give x̂, the "
            "normalised input, and δ = ∂L/∂y of its output y = γ ⊙ x̂ + β, [N, T, D] each; a "
            "forward that does more after the affine map (an activation: timm's "
            "BatchNormAct2d) or normalises another dimension (timm's LayerNorm2d over NCHW "
            "channels) is not such a norm: leave it to the fallback step (do not register "
            "it, or pass norm_blocks=False)"
        )
    if problem is not None:
        _CHECKED.discard(entry)
        raise ValueError(
            f"layer {name!r}: the features and gradients registered for {kind.__name__} do "
            f"not reproduce its weight's gradient ({problem}). They must give the input "
            "ā [N, T, d_in] and the pre-activation gradient δ = ∂L/∂(W ā + b) [N, T, d_out] "
            "of a weight stored as [d_out, …] (Σ_t δ_t ā_tᵀ is its gradient). A weight "
            "stored [in, out] (transformers' Conv1D) is not supported: convert such modules "
            "to nn.Linear (weight.T); a module that rescales its output must scale δ too"
        )


def _patches(module: nn.Module) -> tuple[Any, ...]:
    """What replaces each of :data:`~.layer_types.FORWARD_METHODS` on ``module`` (``None``:
    the class's)."""
    return tuple(vars(module).get(name) for name in FORWARD_METHODS)


def _reference(patch: Any) -> Any:
    """A weak reference to ``patch`` (the patch's closure may hold the module), else the
    object where it takes none."""
    try:
        return weakref.ref(patch)
    except TypeError:
        return patch


def _probed(module: nn.Module) -> bool:
    """Whether ``module`` was probed with the patches it has now."""
    held = _PATCHED.get(module)
    if held is None:
        return False
    then = (r() if isinstance(r, weakref.ref) else r for r in held)
    return all(a is b for a, b in zip(then, _patches(module), strict=True))


def _unprobed(entry: LayerType, module: nn.Module) -> str:
    """What kind of block ``module`` has that the probe does not check."""
    if entry.rows_from_inputs:
        return "table's block (rows indexed by its inputs)"
    return "grouped convolution's block" if getattr(module, "groups", 1) > 1 else "norm block"


_WARNED: set[tuple[type, str]] = set()  # (module type, reason): warned once each


def _unchecked(name: str, what: str, why: str, kind: type | None = None) -> None:
    """Warn that layer ``name``'s ``what`` could not be probed, and ``why`` (once per module
    type and reason: accelerate's device hooks patch every module)."""
    if kind is not None and (kind, why) in _WARNED:
        return
    if kind is not None:
        _WARNED.add((kind, why))
    patch = what.startswith("its ")
    advice = "computes what the class does" if patch else "gives Σ_t δ_t ā_tᵀ = ∇W"
    warnings.warn(
        f"layer {name!r}{' (and those of its type)' if kind else ''}: {what} could not be "
        f"checked ({why}): make sure it {advice}",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def _own_use(
    module: nn.Module,
    call: tuple[tuple[Any, ...], dict[str, Any]],
    device: torch.device,
    model: nn.Module,
) -> tuple[Any, dict[int, Tensor]]:
    """``module.forward`` run again on its call's detached arguments with detached copies of
    its (and its submodules') floating parameters (by the originals' ids) and copies of
    their buffers, without its (and its submodules') forward hooks and the captures' hooks
    anywhere in ``model`` (a patched forward that calls other layers would record calls
    there; a user's hook on another module stays: it may be part of what the patch
    computes), the other train-mode norms of ``model`` not tracking running statistics
    (a norm the patch calls normalises by its batch's as before, and updates nothing), and
    torch's random state restored afterwards: autograd's gradient of its own use, which
    neither a tied use, nor the user's graph (whose saved buffers no update reaches: a
    batch norm's running statistics), nor the run's random stream see (``None`` where
    that forward fails)."""
    copies: dict[int, Tensor] = {}
    swapped: list[tuple[dict[str, Any], str, Any]] = []  # (parameters or buffers, key, original)
    tables: list[tuple[Any, dict[int, Any]]] = []  # hook tables, as they were
    modules = list(model.modules())  # (walked once: a wrapped model probes every layer)
    norms = [m for m in modules if _updates_running_statistics(m)]
    # copies: an in-place op of the rerun on an alias would bump the user's version counter
    args = tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in call[0])
    kwargs = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in call[1].items()}
    devices = [device] if device.type == "cuda" else []
    try:
        inside = set(module.modules())
        tables = _without_hooks(modules, inside)
        for owner in inside:
            for key, param in list(owner._parameters.items()):
                if param is not None and param.is_floating_point():
                    copy = copies.setdefault(id(param), param.detach().requires_grad_(True))
                    swapped.append((owner._parameters, key, param))
                    owner._parameters[key] = copy  # type: ignore[assignment]
            for key, buffer in list(owner._buffers.items()):
                if buffer is not None:  # (the original untouched: no version bumped)
                    swapped.append((owner._buffers, key, buffer))
                    owner._buffers[key] = buffer.detach().clone()
        for norm in norms:
            norm.track_running_stats = False
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            return module.forward(*args, **kwargs), copies
    except Exception:  # any failure: the probe is skipped (with a warning), not the step
        return None, copies
    finally:
        for table_of, key, original in swapped:
            table_of[key] = original
        for norm in norms:
            norm.track_running_stats = True
        for table, entries in tables:  # (in their order: the capture's hooks run first)
            table.clear()
            table.update(entries)


def _updates_running_statistics(module: nn.Module) -> TypeGuard[_NormBase]:
    """Whether ``module``'s forward updates running statistics in place (a batch or
    instance norm in train mode that tracks them)."""
    return isinstance(module, _NormBase) and module.training and module.track_running_stats


def _without_hooks(
    modules: list[nn.Module], inside: set[nn.Module]
) -> list[tuple[Any, dict[int, Any]]]:
    """Take out the forward hooks of the modules ``inside``, and the captures' own
    (:class:`~.hooks.WeakHook`) of the model's other ``modules``; the tables they were in,
    with their entries as they were (put back in their order: a capture's hook runs
    first)."""
    tables = []
    for owner in {*modules, *inside}:
        for table in (owner._forward_hooks, owner._forward_pre_hooks):
            gone = [k for k, h in table.items() if owner in inside or isinstance(h, WeakHook)]
            if gone:
                tables.append((table, dict(table)))
                for key in gone:
                    del table[key]
    return tables


def _mismatch(
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    g: Tensor,
    expected: tuple[Tensor | None, ...],
    dtype: torch.dtype,
    unitwise: bool = False,
) -> str | None:
    """Why ``Σ δ āᵀ`` (``Σ δ ⊙ x̂`` where ``unitwise``: a norm's ``γ``; ``Σ δ`` for the
    bias) is not the autograd gradient, or ``None``."""
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        return f"ā has shape {tuple(a.shape)} and δ {tuple(g.shape)}, not [N, T, d] alike"
    rows = int(g.shape[-1])
    if unitwise and (a.shape != g.shape or rows != weight.numel()):
        return f"x̂ has shape {tuple(a.shape)} and δ {tuple(g.shape)}, for {weight.numel()} units"
    if not unitwise and (weight.numel() % rows or a.shape[-1] * rows != weight.numel()):
        return (
            f"ā has {a.shape[-1]} and δ {rows} columns, but the weight has shape "
            f"{tuple(weight.shape)}"
        )
    half = torch.float16, torch.bfloat16  # a half-precision weight or autocast output
    # float32 may be TF32 (cuDNN convolutions' default on a GPU; float32_matmul_precision
    # "high"; oneDNN's fp32_precision): 3e-4 off float64. A wrong registration or patch was
    # 0.13 off or more in every trial
    single = (1e-2 if weight.is_cuda else 1e-3) if torch.float32 in (dtype, weight.dtype) else 1e-5
    tolerance = 5e-2 if dtype in half or weight.dtype in half else single
    pairs = []
    if weight.requires_grad:
        product = (g * a).sum(dim=(0, 1)) if unitwise else torch.einsum("nto,nti->oi", g, a)
        pairs.append((product, expected[0], "weight"))
    if bias is not None and bias.requires_grad:
        pairs.append((g.sum(dim=(0, 1)), expected[1], "bias"))
    for got, want, what in pairs:
        want_t = torch.zeros_like(got) if want is None else want.double().reshape(got.shape)
        error = float((got - want_t).norm() / want_t.norm().clamp_min(1e-30))
        if error > tolerance:
            return f"Σ δ āᵀ is {error:.2g} off its {what}'s gradient, relative"
    return None
