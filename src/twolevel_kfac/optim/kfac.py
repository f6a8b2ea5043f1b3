"""``KFAC``: a ``torch.optim.Optimizer`` = KFAC preconditioner + heavy-ball momentum SGD.

Per step (the recipe of Koroko et al. 2023): the preconditioner turns each layer's gradient
into the (KL-clipped) natural-gradient direction ``d``; weight decay is added *after*
preconditioning, ``d ← d + wd·θ``, and the momentum-SGD step follows, ``buf ← μ·buf + d``,
``θ ← θ − lr·buf`` (Nesterov: ``θ ← θ − lr·(d + μ·buf)``). Other parameters (BatchNorm,
embeddings, …) take the same step with their raw gradient, or AdamW's (``fallback``). Only
layers whose parameters are in the param groups are preconditioned, counted in the KL clip
and stepped (``params=``), each with its own group's learning rate.

Gradient clipping before :meth:`KFAC.step` has no effect on the preconditioned layers where
the KL clip still binds (it rescales the direction anyway), but the fallback parameters
take the clipped gradient: lower ``kl_clip``, or clip between ``precond.step()`` and
``opt.step()`` with ``KFACPreconditioner`` and your own optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.sgd import sgd as sgd_update

from ..curvature.blocks import block_parameters
from ..curvature.param_format import materialize_params
from .amp import amp_loss_scale, forget_amp_state, forgets_amp_state_on_error
from .construction import accepted_arguments
from .damping import (
    DAMPING_ARGUMENTS,
    DampingOptions,
    QuadraticModel,
    adjust_damping,
    check_damping_fields,
    evaluate_without_capture,
)
from .fallback import (
    block_table,
    fallback_groups,
    make_fallback,
    warn_added,
    warn_unfrozen,
)
from .group_checks import refuse_new_parameters, warn_unread_keys
from .keywords import check_known, refuse_sgd_keys
from .nonfinite import finite_after_step, finite_gradients, skip_nonfinite
from .not_copyable import NotCopyable
from .options import (
    CURVATURE_ARGUMENTS,
    CurvatureOptions,
    Rate,
    check_choice,
    check_model,
    check_real,
)
from .preconditioner import KFACPreconditioner
from .state import all_or_nothing

FINE_ARGUMENTS = frozenset({"options", "coarse", "fine"})  # the preconditioner's own
logger = logging.getLogger("twolevel_kfac")
NONFINITE_POLICIES = ("skip", "raise", "unchecked")


class KFAC(NotCopyable, torch.optim.Optimizer):
    """KFAC with momentum SGD (Martens & Grosse 2015; KFC for convolutions).

    Args:
        model: its layers with a curvature block are preconditioned (``Linear``,
            ``Conv1d/2d/3d``, registered types: :meth:`describe_blocks`); every other
            trainable parameter gets the ``fallback`` step.
        lr: learning rate (``param_groups[i]["lr"]``, so LR schedulers act on it).
        momentum: heavy-ball momentum μ.
        weight_decay: added to the preconditioned direction (not preconditioned).
        nesterov: Nesterov momentum.
        params: the parameters or parameter groups to optimize, as ``torch.optim`` takes
            them (default: all trainable parameters of ``model``). Only layers whose weight
            and bias are both in them are preconditioned (or whose trained bias is, beside a
            frozen weight: BitFit); the others are left to whatever else steps them.
        nonfinite_policy: ``skip`` (default: a step whose gradient or preconditioned
            direction has a NaN/Inf is dropped, counted in ``nonfinite_steps`` and
            ``consecutive_nonfinite``), ``raise`` (``FloatingPointError``) or
            ``unchecked`` (no check at all: the caller guarantees finite gradients, e.g.
            ``torch.amp.GradScaler``, which skips ``step()`` on an inf, and accepts that an
            overflowing direction reaches the parameters; saves one read of every gradient
            per step, what ASDL and kfac-pytorch do). The statistics behind the factors are
            checked under every policy.
        fallback: the step of the parameters no curvature block covers: ``sgd`` (this
            optimizer's momentum step on the raw gradient) | ``adamw`` (``torch.optim.AdamW``
            with ``fallback_options``, default lr 1e-3; :mod:`.fallback`).
            :meth:`describe_blocks` lists which parameter got which.
        fallback_options: ``torch.optim.AdamW`` arguments for ``fallback="adamw"``.
        curvature: the curvature options as one
            :class:`~twolevel_kfac.optim.options.CurvatureOptions` object (or its fields as
            keywords, below; not both).
        **options: ``fine`` (``kfac`` | ``ekfac`` | ``kpsvd`` | ``kfac_corrected``: the fine
            level, :mod:`.fine`), ``coarse`` (a :class:`~.options.CoarseOptions`: two-level
            KFAC, as :class:`~.twolevel.TwoLevelKFAC`), and the
            :class:`~twolevel_kfac.optim.options.CurvatureOptions` fields:
            ``damping``, ``damping_mode``, ``fisher``, ``likelihood``, ``loss_reduction``,
            ``class_dim`` (logits with positions), ``weight_sharing``, ``fisher_batch``,
            ``ema_decay``, ``cov_interval``, ``inv_interval``, ``kl_clip``, ``kl_clip_form``,
            ``inverse_method``, ``factor_dtype``, ``unsupported``, ``seed``; and the
            :class:`~twolevel_kfac.optim.damping.DampingOptions` fields (Martens & Grosse
            §6.5, §7): ``adaptive_damping`` (then ``step(closure)`` is required),
            ``damping_interval``, ``damping_decay``, ``min_damping``, ``max_damping``,
            ``qmodel_lr_momentum``.
    """

    preconditioner_class: type[KFACPreconditioner] = KFACPreconditioner
    # GradScaler.step hands the scale and found_inf to step() (:mod:`.amp`)
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        params: Iterable[Any] | None = None,
        nonfinite_policy: str = "skip",
        curvature: CurvatureOptions | None = None,
        fallback: str = "sgd",
        fallback_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        check_model(type(self).__name__, model)
        check_real("lr", lr, low=0.0)
        check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
        check_real("weight_decay", weight_decay, low=0.0)
        check_choice("nonfinite_policy", nonfinite_policy, NONFINITE_POLICIES)
        self.nonfinite_policy = nonfinite_policy
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self.amp_skipped_steps = 0  # steps a GradScaler found infinite
        self.damping_options = DampingOptions(
            **{k: options.pop(k) for k in list(options) if k in DAMPING_ARGUMENTS}
        )
        check_damping_fields(type(self).__name__, self.damping_options, options, curvature)
        if curvature is not None:
            given = sorted(set(options) & CURVATURE_ARGUMENTS)
            if given:
                raise TypeError(
                    f"{type(self).__name__}: pass either curvature=CurvatureOptions(...) or "
                    f"its fields as keywords, not both (got {given})"
                )
            options["options"] = curvature
        self._watched: list[nn.Parameter] = []  # frozen, when params are the default's
        self._known: frozenset[int] | None = None  # the model's, when params are the default
        self._unread: set[str] = set()  # curvature options seen in a group, warned of
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            self._watched = [p for p in model.parameters() if not p.requires_grad]
            self._known = frozenset(id(p) for p in model.parameters())
        params = materialize_params(params)
        self.preconditioner = self._make_preconditioner(model, options, params)
        if self.damping_options.adaptive_damping and callable(self.preconditioner.options.damping):
            raise ValueError(
                f"{type(self).__name__}: adaptive_damping=True sets λ itself; a damping "
                "schedule cannot be combined with it"
            )
        if self.damping_options.needs_statistics:
            if self.preconditioner.comm.distributed:
                raise NotImplementedError(
                    f"{type(self).__name__}: adaptive_damping / qmodel_lr_momentum are not "
                    "implemented under torch.distributed"
                )
            self.preconditioner.retain_statistics = self.preconditioner.capture.aligned = True
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, {**defaults, "nesterov": bool(nesterov)})
        covered = self.preconditioner.preconditioned_parameters()
        rest = fallback_groups(self.param_groups, covered, params, lr)
        watched = self.param_groups if self.preconditioner.options.unsupported != "ignore" else ()
        self.fallback = make_fallback(fallback, rest, fallback_options, model, watched)
        if self.fallback is not None and self.damping_options.needs_statistics:
            raise ValueError("adaptive damping and qmodel_lr_momentum model every parameter's "
                             "step: use fallback='sgd'")  # fmt: skip
        self.fallback_kind = fallback
        logger.info("%s blocks:\n%s", type(self).__name__, self.describe_blocks())
        self._built = True

    def _make_preconditioner(
        self, model: nn.Module, kwargs: dict[str, Any], params: list[Any]
    ) -> KFACPreconditioner:
        cls = self.preconditioner_class
        allowed = accepted_arguments(cls, kwargs.get("fine")) | FINE_ARGUMENTS
        check_known(type(self), kwargs, allowed, taken=DAMPING_ARGUMENTS)
        return self.preconditioner_class(
            model, params=params, damping_varies=self.damping_options.adaptive_damping, **kwargs
        )

    @property
    def last_stats(self) -> dict[str, float]:
        """Diagnostics of the last step (KL scale, damping, two-level residual/energy …)."""
        return self.preconditioner.last_stats

    @forgets_amp_state_on_error
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One step; ``closure`` (re-evaluates the mean loss, calling ``backward``) is
        required with ``adaptive_damping=True``, which calls it again at the new point."""
        damping = self.damping_options
        if damping.adaptive_damping and closure is None:
            raise ValueError(
                f"{type(self).__name__}(adaptive_damping=True) needs step(closure): the loss "
                "is re-evaluated after the step (Martens & Grosse 2015 §6.5)"
            )
        with torch.enable_grad():
            loss = None if closure is None else closure()
        pre = self.preconditioner
        warn_unread_keys(self.param_groups, self._unread)
        refuse_sgd_keys(self.param_groups)  # (set in a group since it was added)
        if self._watched:  # (parameters frozen when built: warned of once unfrozen)
            self._watched = warn_unfrozen(self._watched, pre.model, self.param_groups)
        if self._known is not None and pre.capture.active:  # (as replaced layers are found)
            refuse_new_parameters(pre.model, self._known, self.param_groups, pre.layers)
        loss_scale = amp_loss_scale(self, self.preconditioner.options.fisher)
        if loss_scale is None:  # GradScaler found an inf: its scale drops, nothing else moves
            pre.capture.discard()
            pre.last_stats = {"amp_skipped": 1.0}
            self.amp_skipped_steps += 1
            return loss
        adapt = damping.adaptive_damping and pre.steps % damping.damping_interval == 0
        needs_model = adapt or damping.qmodel_lr_momentum
        checked = self.nonfinite_policy != "unchecked"
        deferred = not needs_model and pre.defers_gradient_check()
        if checked and not deferred and not finite_gradients(self.param_groups):
            skip_nonfinite(self, "gradient")
            return loss
        model = QuadraticModel(self.param_groups, pre) if needs_model else None
        squared = pre.options.kl_clip_form == "lr_squared"  # the only reader of the lrs
        lr = self._layer_lrs() if squared else float(self.param_groups[0]["lr"])
        pre.step(lr=lr, loss_scale=loss_scale, checked=True)  # (the scaler found no inf)
        if checked and not finite_after_step(self, pre.directions_finite, deferred):
            if deferred:
                pre.undo_step()
            what = "preconditioned direction"
            skip_nonfinite(self, f"gradient or {what}" if deferred else what)
            return loss
        self.consecutive_nonfinite = 0
        if model is not None and damping.qmodel_lr_momentum:
            alpha, mu = model.qmodel_step(self.state, pre.damping)
            pre.last_stats.update(qmodel_alpha=alpha, qmodel_mu=mu)
        else:
            for group in self.param_groups:
                self._momentum_step(group)
        if self.fallback is not None:
            self.fallback.step(self.param_groups, self.defaults["lr"])
        if adapt and model is not None and closure is not None and loss is not None:
            self._adapt_damping(model, float(loss.detach()), closure)
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim``'s, warning that the group's parameters get the plain momentum
        step where they would have had a block or AdamW (:func:`.fallback.warn_added`)."""
        refuse_sgd_keys([{**getattr(self, "defaults", {}), **param_group}], added=True)
        super().add_param_group(param_group)
        pre = getattr(self, "preconditioner", None)
        if pre is not None and getattr(self, "_built", False):  # not the constructor's groups
            done, norms = pre.preconditioned_parameters(), pre.options.norm_blocks
            warn_added(pre.model, param_group, done, self.fallback is not None, norms)

    def _layer_lrs(self) -> dict[str, Rate]:
        """Each preconditioned layer's learning rate (its weight's group's, or its bias's when
        only the bias trains), or its weight's and its bias's where those groups differ."""
        group_lr = {id(p): float(g["lr"]) for g in self.param_groups for p in g["params"]}
        lrs: dict[str, Rate] = {}
        for name, module in self.preconditioner.layers.items():
            held = [id(p) for p in block_parameters(module) if p is not None and id(p) in group_lr]
            if not held:
                raise ValueError(
                    f"layer {name!r}: no parameter of its block is in the optimizer's groups "
                    "(its weight or bias was frozen or unfrozen since the optimizer was "
                    "built): build a new optimizer after changing which parameters train"
                )
            rates = [group_lr[i] for i in held]
            lrs[name] = (rates[0], rates[1]) if len(set(rates)) > 1 else rates[0]
        return lrs

    def _adapt_damping(
        self, model: QuadraticModel, loss: float, closure: Callable[[], Tensor]
    ) -> None:
        """Martens & Grosse §6.5: ρ of the step just taken, then λ ← ω₁λ or λ/ω₁."""
        pre = self.preconditioner
        new_loss = evaluate_without_capture(pre, closure)
        rho, actual, predicted = model.reduction_ratio(loss, new_loss)
        pre.damping = adjust_damping(pre.damping, rho, self.damping_options)
        pre.last_stats.update(rho=rho, actual_change=actual, predicted_change=predicted)
        pre.last_stats["next_damping"] = pre.damping

    def _momentum_step(self, group: dict[str, Any]) -> None:
        """``torch.optim.SGD``'s update on the preconditioned gradients: ``d = p.grad + wd·p``,
        ``b ← μb + d`` (``b = d`` at first), ``d ← d + μb`` (Nesterov) or ``b``, ``p ← p − lr·d``
        (torch's ``foreach`` kernels); a frozen parameter with a ``.grad`` kept by
        ``zero_grad(set_to_none=False)`` is not moved by its momentum (torch's SGD moves it)."""
        skip = self.fallback.ids if self.fallback is not None else ()
        stepped = (p for p in group["params"] if p.grad is not None and p.requires_grad)
        params = [p for p in stepped if id(p) not in skip]
        if not params:
            return
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd_update(
            params,
            [p.grad for p in params],
            buffers,
            foreach=True,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=0.0,
            nesterov=group["nesterov"],
            maximize=False,
        )
        if group["momentum"] != 0:
            for param, buffer in zip(params, buffers, strict=True):
                self.state[param]["momentum_buffer"] = buffer

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint (restored by :meth:`load_state_dict`)."""
        state = {**super().state_dict(), "preconditioner": self.preconditioner.state_dict()}
        counts = self.nonfinite_steps, self.consecutive_nonfinite, self.amp_skipped_steps
        state["nonfinite"] = list(counts)
        if self.fallback is not None:
            state["fallback"] = self.fallback.state_dict()
        return state

    @all_or_nothing
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (one refused leaves the optimizer as it was)."""
        if "preconditioner" not in state_dict:
            raise ValueError(  # (torch.distributed.checkpoint's helpers keep torch's alone)
                f"not a {type(self).__name__} state dict: no 'preconditioner' entry (save and "
                "load opt.state_dict(), not get_optimizer_state_dict's torch part)"
            )
        forget_amp_state(self)  # a raised step's, if any
        state = dict(state_dict)
        if (state.get("fallback") is None) != (self.fallback is None):
            raise ValueError(f"state saved with another fallback than '{self.fallback_kind}'")
        self.preconditioner.load_state_dict(state.pop("preconditioner"))
        counts = [*state.pop("nonfinite", []), 0, 0, 0]  # (the AMP count since 2026-12-06)
        self.nonfinite_steps, self.consecutive_nonfinite, self.amp_skipped_steps = counts[:3]
        if self.fallback is not None:
            self.fallback.load_state_dict(state.pop("fallback"))
        super().load_state_dict({k: v for k, v in state.items() if k != "fallback"})

    def set_loss_mask(self, mask: Tensor | None) -> None:
        """The positions of the logits that the next forward's loss counts, ``[N, T]`` for
        ``[N, T, C]`` logits (``targets != ignore_index``): ``fisher="mc"`` samples its
        targets there only (:mod:`~twolevel_kfac.curvature.loss_mask`). Call it before the
        forward of every step whose loss ignores positions; ``None``: all count."""
        self.preconditioner.set_loss_mask(mask)

    def set_padding_mask(self, mask: Tensor | None) -> None:
        """The real positions ``[N, T]`` of the next forward's inputs (``attention_mask``): a
        classifier's padding left out of the factors of the layers whose inputs have that
        layout (:mod:`~twolevel_kfac.curvature.padding_mask`). ``None``: nothing marked."""
        self.preconditioner.set_padding_mask(mask)

    def describe_blocks(self) -> str:
        """One line per parameter: the curvature block that preconditions it, or the
        fallback step it takes (also logged at construction, ``logging.INFO``)."""
        pre = self.preconditioner
        params = [p for g in self.param_groups for p in g["params"]]
        adamw = set() if self.fallback is None else self.fallback.ids
        rows = block_table(pre.model, pre.layers, params, adamw)
        width = max((len(name) for name, _ in rows), default=0)
        return "\n".join(f"  {name:<{width}}  {what}" for name, what in rows)

    def __repr__(self) -> str:
        groups = ", ".join(
            f"group{i}(lr={g['lr']}, momentum={g['momentum']}, weight_decay={g['weight_decay']})"
            for i, g in enumerate(self.param_groups)
        )
        return f"{type(self).__name__}[{groups}] with {self.preconditioner!r}"
