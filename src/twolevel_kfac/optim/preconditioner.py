"""The KFAC preconditioner: rewrites ``.grad`` of a model's layers with a curvature block.

It is independent of the optimizer that then takes the step (the kfac-pytorch pattern):
``loss.backward(); precond.step(); sgd.step()`` preconditions any torch optimizer.
:class:`~twolevel_kfac.optim.kfac.KFAC` wraps it with momentum-SGD for the paper's recipe.

One ``step()`` runs (Martens & Grosse 2015, Algorithm 1, the paper's schedule):
``_update_factors`` (on the capture schedule, :mod:`.schedule`), the fine level's refresh
(every ``inv_interval`` steps), ``_precondition_grads``: the fine level's inverse
(:mod:`.fine`: ``fine="kfac" | "ekfac" | "kpsvd" | "kfac_corrected"``), the coarse level's
correction when one is held (:mod:`.coarse`), the KL clip and the write into ``.grad``
(over autograd's gradient, or fresh): read ``p.grad`` after ``step()``, not before.
:mod:`twolevel_kfac.distributed` reduces and shares the factors under ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..curvature.block_checks import BlockMemory, check_blocks, check_statistics, used_layers
from ..curvature.blocks import (
    LayerStats,
    block_parameters,
    gradient_matrix,
    gradient_parts,
    has_gradient,
    layer_weight,
    matrix_to_parameter_shapes,
    new_factors,
)
from ..curvature.capture import CurvatureCapture
from ..curvature.discovery import find_layer_uses, find_layers, require_layers
from ..curvature.factor_inverse import solver_dtype
from ..curvature.kronecker_apply import LayerParts
from ..curvature.layer_types import covered_parameters, fixed_rows, is_token_table
from ..distributed import make_communicator, step_seed, unwrap_model
from ..placement import autocast_off, move_tensors
from .amp import drops_overflow
from .coarse import CoarseLevel
from .coarse_absorb import absorber
from .construction import choose_table_forms, resolve_options
from .directions import assign_layers, clip_scale, part_pairs, writable_in_place, write_layer
from .fallback import warn_unpreconditioned
from .fine import FineLevel, OuterApplied
from .folding import fold_statistics, keeps_statistics
from .frozen import coarse_term, fine_alone, fine_weight
from .interrupted import partial_step, step_guard
from .not_copyable import NotCopyable
from .options import CoarseOptions, CurvatureOptions, Rate, damping_at, damping_value
from .schedule import CaptureSchedule
from .stale_gradients import named_weight
from .state import kfac_state, load_kfac_state

T = TypeVar("T")


class KFACPreconditioner(NotCopyable):
    """Block-diagonal KFAC preconditioner (see :class:`CurvatureOptions` for arguments)."""

    # The fine level of this class (presets such as EKFACPreconditioner name another), the
    # coarse level's class (given coarse=) and the keywords of its options the constructor
    # takes (TwoLevelPreconditioner's; :func:`.construction.accepted_arguments`).
    fine_level: ClassVar[type[FineLevel]] = FineLevel
    coarse_level_type: ClassVar[type[CoarseLevel]] = CoarseLevel
    coarse_arguments: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        model: nn.Module,
        options: CurvatureOptions | None = None,
        *,
        params: Iterable[Any] | None = None,
        fine: str | None = None,
        coarse: CoarseOptions | None = None,
        damping_varies: bool = False,
        **kwargs: Any,
    ) -> None:
        """``options`` or its fields as keywords; ``params``: the parameters whose layers to
        precondition (``torch.optim`` format; default: all, ``discovery.find_layers``);
        ``fine``: the fine level by name (default: this class's), with its arguments;
        ``coarse``: a coarse level's options (two-level KFAC), or ``None``;
        ``damping_varies``: the caller changes :attr:`damping` between refreshes (adaptive
        damping; a schedule is seen in ``options``), read by ``inverse_method="auto"``.

        :attr:`options` holds the resolved ``inverse_method`` (never ``auto``)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self.options, fine_type, fine_arguments = resolve_options(
            type(self), options, fine, coarse, damping_varies, kwargs
        )
        opts = self.options
        self.damping_varies = damping_varies  # λ is state (adaptive), not an option
        self.model = model = unwrap_model(model)
        self.comm = make_communicator(self.options.process_group)
        self.layers = find_layers(model, opts.unsupported, params, opts.norm_blocks)
        require_layers(self.layers, model, given=params is not None)
        self.uses = uses = find_layer_uses(model, self.layers)
        choose_table_forms(self, fine_type)  # (before the factors, which take that form)
        # default params: the layers that train now (those frozen: warned of once unfrozen)
        self._watched = [p for p in model.parameters() if params is None and not p.requires_grad]
        self.damping, self.steps, self.fine_version = damping_at(self.options.damping, 0), 0, 0
        self.generator = torch.Generator().manual_seed(step_seed(opts.seed, self.comm.rank, 0))
        self.sample_counts: dict[str, int] = {}  # distributed: global Fisher batches
        self.factors = {name: new_factors(m) for name, m in self.layers.items()}
        self.fine = fine_type(self, **fine_arguments)
        self.coarse_level = None if coarse is None else self.coarse_level_type(self, coarse)
        # rows no step may move (an untied embedding's padding row), by layer
        self.fixed_rows = {name: rows for name in self.layers if (rows := fixed_rows(uses[name]))}
        self.token_tables = {name for name in self.layers if is_token_table(uses[name])}
        self.capture = CurvatureCapture(
            model,
            self.layers,
            self.options.fisher,
            self.options.likelihood,
            self.options.fisher_batch,
            self.generator,
            self.options.accumulation_steps,
            uses=uses,
            dtypes={name: block_parameters(m)[0].dtype for name, m in self.layers.items()},
            loss_reduction=self.options.loss_reduction,
            class_dim=self.options.class_dim,
        )
        self.capture.active = True
        self.capture.aligned = coarse is not None  # it pairs the layers' rows as samples
        self.last_stats: dict[str, float] = {}
        self.directions_finite: bool | None = None  # last step's, when the KL clip proved it
        # The last Fisher mini-batch, kept for exact Fisher products (adaptive damping).
        self.retain_statistics = False
        self.retained_stats: dict[str, LayerStats] = {}
        self.active: list[str] = list(self.layers)  # with a gradient this step (others: left)
        self.schedule = CaptureSchedule(self.options.cov_interval)
        self._checked_blocks = BlockMemory.of(self.layers, self.capture.dtypes)  # check_blocks'
        self.frozen_warned: set[str] = set()  # layers frozen whole under a coarse level
        self.interrupted: str | None = None  # a step interrupted part-way (optim/interrupted.py)

    @property
    def damping(self) -> float:
        """λ of the coming step: the option's, a schedule's, adaptive damping's, or one set
        here between steps (:func:`.options.damping_value`)."""
        return self._damping

    @damping.setter
    def damping(self, value: float) -> None:
        self._damping = damping_value(value)

    def step(
        self, lr: float | Mapping[str, Rate] = 1.0, loss_scale: float = 1.0, checked: bool = False
    ) -> None:
        """Precondition the layers' gradients (``p.grad``), outside any autocast region; a
        layer without a gradient (unused this step) is left alone, its factors kept. ``lr``:
        the learning rate, or each layer's (read by ``kl_clip_form="lr_squared"``);
        ``loss_scale``: a ``GradScaler``'s scale, which the captured empirical ``δ`` carry
        (``≠ 1``: a step whose gradients overflowed is dropped, :func:`.amp.drops_overflow`,
        unless the caller ``checked`` them finite). Raises ``RuntimeError`` if a layer has a
        gradient but never had curvature statistics."""
        weight = named_weight(*next(iter(self.layers.items())))
        with step_guard(self), torch.no_grad(), autocast_off(weight):
            if checked or not drops_overflow(self, loss_scale):  # beside a GradScaler
                self._step(lr, loss_scale)

    def _step(self, lr: float | Mapping[str, Rate], loss_scale: float) -> None:
        opts = self.options
        self.comm.check_world()  # (a group initialised after the optimizer was built)
        if callable(opts.damping):
            self.damping = damping_at(opts.damping, self.steps)
        active = self.capture.active
        if self.coarse_level is not None:  # a raised step's products (this fold sets its own)
            self.coarse_level.absorbed = None
        batch = self.capture.take(loss_scale) if active else None
        self.last_stats = {"damping": self.damping}
        self.active = [name for name, m in self.layers.items() if has_gradient(m)]
        if self._watched:
            watched, norms = self._watched, opts.norm_blocks
            self._watched = warn_unpreconditioned(watched, self.model, self.layers, norms)
        if skipped := self.schedule.skipped(self, batch):
            self.last_stats[skipped] = 1.0
            return
        captured = [] if batch is None else batch.names
        if captured and self.coarse_level is not None:  # before the factors' peak, not beside
            self.coarse_level.release_replaced()
        sent = self.comm.payload_bytes
        # the coarse level's layers too: it gives one without a gradient a zero one
        spanned = [] if self.coarse_level is None else self.coarse_level.names
        names = [*captured, *self.active, *spanned]
        check_blocks(self.layers, self.factors, names, self.uses, self._checked_blocks)
        stats: dict[str, LayerStats] = {}
        if batch is not None and (captured or self.comm.distributed):  # every rank joins
            stats = self._update_factors(batch, captured)
        folded = list(stats) if self.comm.distributed else captured  # every rank's alike
        if not (active and self.capture.empty_batch):  # an empty first batch: refused below
            self.active = used_layers(self.layers, self.factors, self.active, captured, active)
        self.active = self.schedule.defer_unseen(
            self.factors, self.active, captured=active, folded=folded, steps=self.steps
        )
        empty, outside = self.capture.empty_batch and active, self.capture.alone.before_root
        nonfinite = bool(self.last_stats.get("nonfinite_factor_updates"))
        check_statistics(self.factors, self.active, empty, outside, nonfinite)
        if self.steps % opts.inv_interval == 0 or any(
            f.ready and not f.decomposed for f in self.factors.values()
        ):
            self.fine_version += 1  # first: an interrupted refresh changed some already
            self.interrupted = self.interrupted or partial_step(self, folds=False)  # until done
            self.fine.refresh(self.damping)
        if stats or captured:
            self.fine.after_refresh(stats)
            self.fine_version += 1
            if self.retain_statistics:
                self.retained_stats = stats
        lrs = lr if isinstance(lr, Mapping) else dict.fromkeys(self.layers, lr)
        self._precondition_grads(stats, {n: lrs[n] for n in self.layers})
        if self.comm.distributed:
            self.last_stats["comm_bytes"] = float(self.comm.payload_bytes - sent)
        self.steps, self.interrupted = self.steps + 1, None
        self._schedule_capture()

    def defers_gradient_check(self) -> bool:
        """Whether a caller may check this step's gradients only after :meth:`step`, through
        its directions, and :meth:`undo_step` if they are not finite: on a step that folds
        no statistics and keeps no state (:meth:`_stateless_directions`). A NaN/Inf gradient
        entry reaches its layer's direction (``NaN·x``, ``Inf·0`` are NaN; the damped
        inverses are finite), and the KL clip's sum checks the directions for free."""
        return not self.capture.active and self._stateless_directions()

    def _stateless_directions(self) -> bool:
        """Whether a step without statistics leaves no state behind
        (:meth:`FineLevel.stateless`; coarse levels that rebuild their basis say no)."""
        coarse = self.coarse_level
        return self.fine.stateless(self.steps) and (coarse is None or coarse.stateless())

    def undo_step(self) -> None:
        """Rewind a :meth:`step` whose directions were dropped (:meth:`defers_gradient_check`)."""
        self.steps -= 1
        self.capture.discard()
        self._schedule_capture()

    def _schedule_capture(self) -> None:
        """Capture statistics in the coming forward pass iff the next step folds them
        (:class:`~.schedule.CaptureSchedule`); under ``torch.distributed`` seed the sampler
        for the coming step (:func:`~..distributed.step_seed`: no state to save)."""
        self.capture.active = self.schedule.due(self.steps)
        if self.comm.distributed:
            self.generator.manual_seed(step_seed(self.options.seed, self.comm.rank, self.steps))

    def _update_factors(
        self, stats: Iterable[tuple[str, LayerStats]], captured: Collection[str] = ()
    ) -> dict[str, LayerStats]:
        """Fold this step's statistics (of the layers ``captured``) into the running factors
        (:func:`.folding.fold_statistics`; each layer's dropped once folded where nothing
        reads them after: :func:`.folding.keeps_statistics`, a coarse level's products
        taken first: :mod:`.coarse_absorb`). Returns the statistics kept."""
        keep, coarse = keeps_statistics(self), self.coarse_level
        # a coarse level that keeps none takes its products as they are folded
        consume = None if keep or coarse is None else absorber(coarse, captured)
        return fold_statistics(self, stats, keep=keep, consume=consume)

    def sample_count(self, name: str, stats: LayerStats) -> int:
        """``N`` of this step's Fisher mini-batch for layer ``name`` (all ranks together)."""
        return self.sample_counts[name] if self.comm.distributed else stats.num_samples

    def fit(self, stats: dict[str, LayerStats]) -> None:
        """Fold ``stats`` and refresh, as a refreshing ``step()`` does (for the analysis)."""
        stats = fold_statistics(self, stats.items())
        self.fine.refresh(self.damping)
        self.fine.after_refresh(stats)
        self.fine_version, self.interrupted = self.fine_version + 2, None

    def factor_dtype(self, name: str) -> torch.dtype:
        """The dtype of layer ``name``'s factors: ``factor_dtype``, else its weight's, float32
        for a half-precision weight (no decomposition runs in bf16 / fp16)."""
        dtype = block_parameters(self.layers[name])[0].dtype  # the bias's alone in BitFit
        return self.options.factor_dtype or solver_dtype(dtype)

    def apply_fine(self, name: str, matrix: Tensor) -> Tensor:
        """``M_i⁻¹``: the fine level's damped inverse of layer ``name`` on a ``W̄`` matrix."""
        return self.fine.apply(name, matrix, self.damping)

    def direction(
        self, grads: dict[str, Tensor], stats: dict[str, LayerStats]
    ) -> dict[str, Tensor]:
        """The direction of each layer's ``∇W̄`` before the KL clip, as ``step()`` forms it
        (``stats``: this step's Fisher mini-batch, for levels that use it)."""
        coarse = coarse_term(self, stats)
        if coarse is not None:
            return coarse.precondition(grads, stats)
        return fine_alone(self, grads)  # (a coarse level paused: frozen.py)

    def _precondition_grads(self, stats: dict[str, LayerStats], lrs: dict[str, Rate]) -> None:
        """Overwrite the layers' ``.grad`` with their KL-clipped directions.

        Plain KFAC (its own damped inverse, no coarse term) works on ``∇W`` and ``∇b`` where
        autograd left them (:meth:`KroneckerFactors.apply_inverse_split`: no concatenated
        ``∇W̄``, no split copy) and writes the directions over them, or, when the KL clip
        still needs the gradients, hands its fresh directions to ``.grad``. Everything
        else (coarse corrections, other fine levels) works on the ``W̄`` matrices
        (timings: ``docs/benchmarks/implementation_choices.md``).
        """
        coarse = coarse_term(self, stats)
        if coarse is not None:
            on_parts = coarse.precondition_parts(stats)
            if on_parts is not None:
                self._write_parts(*on_parts, lrs)
                return
        if self.fine.plain and coarse is None and fine_weight(self) == 1.0:
            parts = {name: gradient_parts(self.layers[name]) for name in self.active}
            # without a KL clip nothing reads the gradient once its direction exists
            over = self.options.kl_clip is None
            directions = {
                name: self._apply_fine_split(
                    name, *part, out=part if over and writable_in_place(part) else None
                )
                for name, part in parts.items()
            }
            self._write_parts(directions, parts, lrs)
            return
        grads = {name: gradient_matrix(self.layers[name]) for name in self.active}
        matrices = self.direction(grads, stats)
        scale = self._kl_scale([[(matrices[n], grads[n])] for n in matrices], lrs, list(matrices))
        for name, direction in matrices.items():
            weight, bias = matrix_to_parameter_shapes(self.layers[name], direction)
            write_layer(self.layers[name], weight, bias, scale, assign=False)

    def _write_parts(
        self,
        directions: dict[str, LayerParts],
        grads: dict[str, LayerParts],
        lrs: dict[str, Rate],
    ) -> None:
        """KL-clip fresh contiguous directions given as (weight, bias) parts against the
        gradients' parts and hand them to ``.grad``."""
        scale = self._kl_scale(part_pairs(directions, grads), lrs, list(grads))
        assign_layers([self.layers[n] for n in directions], list(directions.values()), scale)

    def apply_fine_outer(self, name: str, left: Tensor, right: Tensor) -> OuterApplied:
        """:meth:`apply_fine` of ``left rightᵀ`` (:meth:`.fine.FineLevel.apply_outer`)."""
        return self.fine.apply_outer(name, left, right, self.damping)

    def _apply_fine_split(
        self, name: str, weight: Tensor, bias: Tensor | None, out: LayerParts | None = None
    ) -> LayerParts:
        """:meth:`apply_fine` on ``W̄ = [weight, bias]`` given as its parts, into fresh
        tensors or ``out`` (which may be the parts themselves)."""
        return self.fine.apply_split(name, weight, bias, self.damping, out)

    def _kl_scale(
        self, layers: list[list[tuple[Tensor, Tensor]]], lrs: dict[str, Rate], names: list[str]
    ) -> float:
        """The KL clip's scale (:func:`clip_scale`) of the layers ``names``' (direction,
        gradient) pairs; it decides :attr:`directions_finite` (``None``: not known)."""
        opts = self.options
        scale, self.directions_finite = clip_scale(
            opts.kl_clip, opts.kl_clip_form, layers, names, lrs
        )
        if self.directions_finite is not None:
            self.last_stats["kl_scale"] = scale
        return scale

    def preconditioned_parameters(self) -> set[int]:
        """The ``id`` of every preconditioned parameter."""
        return {id(p) for m in self.layers.values() for p in covered_parameters(m)}

    def state_dict(self) -> dict[str, Any]:
        """Factors, cached decompositions, step counter and the sampler's RNG state
        (:func:`~.state.kfac_state`; a collective under ``torch.distributed``)."""
        return kfac_state(self)

    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks (gathered by :meth:`state_dict`)."""
        coarse = {} if self.coarse_level is None else self.coarse_level.rank_state()
        return {"generator": self.generator.get_state(), **coarse}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, its tensors on the devices of the layers."""
        load_kfac_state(self, state)

    def placed(self, name: str, tree: T, dtype: torch.dtype | None = None) -> T:
        """Saved state of layer ``name`` on that layer's device (floating tensors in ``dtype``)."""
        return move_tensors(tree, layer_weight(self.layers[name]).device, dtype)

    def set_loss_mask(self, mask: Tensor | None) -> None:
        """The logits' positions the next forward's loss counts (``targets != ignore_index``;
        :meth:`~twolevel_kfac.curvature.capture.CurvatureCapture.set_loss_mask`)."""
        self.capture.set_loss_mask(mask)

    def set_padding_mask(self, mask: Tensor | None) -> None:
        """The real positions ``[N, T]`` of the next forward's inputs (``attention_mask``;
        :meth:`~twolevel_kfac.curvature.capture.CurvatureCapture.set_padding_mask`)."""
        self.capture.set_padding_mask(mask)

    def remove_hooks(self) -> None:
        """Remove the capture's hooks from the model."""
        self.capture.remove()

    def __repr__(self) -> str:
        fields = [f"  {k}={v!r}," for k, v in vars(self.options).items()]
        lines = [f"{type(self).__name__}(", *fields, f"  preconditioned=[{', '.join(self.layers)}]"]
        return "\n".join(lines) + "\n)"
