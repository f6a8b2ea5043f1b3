"""Validated option sets of the preconditioners (one frozen dataclass per concern).

Every check raises ``ValueError`` / ``TypeError`` naming the argument and what is allowed,
so a typo in a config or a constructor call fails at once and says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Literal, cast, get_args

import torch
import torch.distributed as dist
from torch import nn

from ..curvature.capture import FISHER_TYPES, FisherType
from ..curvature.kronecker import DAMPING_MODES, DampingMode, InverseMethod
from ..curvature.likelihoods import LIKELIHOODS, LOSS_REDUCTIONS, Likelihood, LossReduction
from ..twolevel.coarse_spaces import COARSE_SPACES, RESIDUAL_SPACES, CoarseSpace
from ..twolevel.combinations import COMBINATIONS, CombinationName
from .keywords import check_known

InversePlacement = Literal["split", "replicate"]
InverseChoice = Literal["auto", "eigen", "cholesky"]
WeightSharing = Literal["expand", "reduce"]
KlClipForm = Literal["paper", "lr_squared"]
Rate = float | tuple[float, float]
"""A layer's learning rate, or its weight's and its bias's where their groups differ
(read by ``kl_clip_form="lr_squared"``)."""
UnsupportedPolicy = Literal["warn", "error", "ignore"]
CoarseRefresh = Literal["consistent", "faithful"]
SpectralWhich = Literal["smallest", "largest"]
KeptFisher = Literal["auto", "rows", "columns"]
INVERSE_PLACEMENTS: tuple[str, ...] = get_args(InversePlacement)
INVERSE_CHOICES: tuple[str, ...] = get_args(InverseChoice)
WEIGHT_SHARING: tuple[str, ...] = get_args(WeightSharing)
KL_CLIP_FORMS: tuple[str, ...] = get_args(KlClipForm)
UNSUPPORTED_POLICIES: tuple[str, ...] = get_args(UnsupportedPolicy)


def check_choice(name: str, value: object, allowed: Iterable[str]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_model(owner: str, model: object) -> None:
    """Refuse parameters given in the model's place (torch's ``Optimizer(params)``, which
    HF's ``optimizer_cls_and_kwargs`` calls): the hooks need the model.

    Raises:
        TypeError: naming ``params=...`` for the parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{owner}(model, ...) takes the model first, not {type(model)}: params=... "
            "takes parameters or param groups"
        )


def check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check ``value`` is a finite real in the given (half-)open or closed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        hint = ""
        if isinstance(value, (list, tuple, dict)) or hasattr(value, "__next__"):
            hint = (  # (functools.partial(tk.KFAC, model)(param_groups) as a base optimizer)
                ": parameters or param groups go in params= (KFAC(model, params=groups)); "
                "the argument after the model is lr"
            )
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {shown}{hint}")
    number = float(value)
    lo_ok = low is None or (number > low if low_open else number >= low)
    hi_ok = high is None or (number < high if high_open else number <= high)
    if not math.isfinite(number) or not lo_ok or not hi_ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        raise ValueError(
            f"{name} must be a finite number in {lo or '(-inf'}, {hi or 'inf)'}; got {value!r}"
        )
    return number


def damping_at(damping: float | Callable[[int], float], step: int) -> float:
    """λ at ``step``: the constant, or the schedule's value (checked)."""
    value = damping(step) if callable(damping) else damping
    return check_real(f"damping schedule at step {step}", value, low=0.0, low_open=True)


def damping_value(value: object) -> float:
    """A λ set between steps (``opt.preconditioner.damping = λ``; a one-element array or
    tensor too): a finite number > 0 (NaN, 0, < 0 were taken before 2026-12-07)."""
    item, numel = getattr(value, "item", None), getattr(value, "numel", None)
    one = (numel() if callable(numel) else getattr(value, "size", None)) == 1
    value = item() if callable(item) and one else value
    return check_real("damping", value, low=0.0, low_open=True)


def resolve_inverse_method(
    requested: str,
    *,
    damping_mode: str,
    damping_varies: bool,
    fine_needs_eigenbasis: bool,
    coarse_needs_eigenbasis: bool,
    half_factors: bool = False,
) -> InverseMethod:
    """The inverse method a preconditioner uses: ``requested`` unless it is ``auto``.

    ``auto`` picks eigendecompositions exactly where something needs them, else Cholesky
    (factorising and inverting a damped factor takes a fifth of ``eigh`` and the inverse
    built from it: ``docs/benchmarks/implementation_choices.md``, "Cholesky or eigen"):

    * ``damping_mode="eigen_sum"``: ``(A ⊗ G + λI)⁻¹`` exists only in the eigenbasis;
    * a fine level that works in the eigenbasis (EKFAC, KFAC-corrected; KPSVD does not);
    * a coarse level whose space needs them (none of ours: the spectral space reads one
      extreme eigenpair per factor, :mod:`twolevel_kfac.curvature.extreme_eigen`);
    * a damping that changes between refreshes (a schedule, adaptive damping): not for
      speed (a new λ costs one GEMM per factor from the eigenpairs and about as much by a
      new Cholesky factorisation) but because λ may then become small enough (adaptive
      damping goes down to ``min_damping = 1e-8``) that a float32 Cholesky of a
      rank-deficient factor fails and is redone in float64, while the eigenpairs take any
      λ > 0;
    * factors kept in a half dtype (``factor_dtype=torch.bfloat16`` or ``float16``; a half
      model's factors are float32 without it): rounding a rank-deficient factor to
      bfloat16 leaves it indefinite by about ``ε·‖M‖`` (``ε = 2⁻⁸``), more than a damping
      shift of ``π√λ`` covers, so its Cholesky factorisation fails; the eigendecomposition
      clips those eigenvalues at 0.
    """
    if requested != "auto":
        return cast("InverseMethod", requested)
    needs_eigen = (
        damping_mode == "eigen_sum"
        or damping_varies
        or fine_needs_eigenbasis
        or coarse_needs_eigenbasis
        or half_factors
    )
    return "eigen" if needs_eigen else "cholesky"


def check_interval(name: str, value: object) -> int:
    """``value`` if it is an integer ≥ 1, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class CurvatureOptions:
    """How the curvature statistics are gathered and inverted (README: "Optimizers and options").

    Attributes:
        damping: λ, added as set by ``damping_mode``; or a schedule ``step → λ`` (called
            with the step count before every step, e.g. ``lambda k: 1e-2 * 0.99**k``;
            changing λ rebuilds the damped inverses; ``auto`` then keeps eigenpairs).
        damping_mode: ``per_factor`` | ``pi`` | ``eigen_sum`` (see :mod:`..curvature.kronecker`).
        fisher: ``mc`` (sampled targets, the true Fisher) | ``empirical`` (the batch targets).
        likelihood: what ``mc`` samples from: ``categorical`` | ``bernoulli`` | ``gaussian``.
        loss_reduction: the training loss per sample: ``sum``, the negative
            log-likelihood summed over the output features (``BCEWithLogitsLoss(
            reduction="sum") / N``, ``0.5 * F.mse_loss(out, y, reduction="sum") / N``) |
            ``mean``, torch's defaults (``nn.BCEWithLogitsLoss()``, ``nn.MSELoss()``,
            ``nn.CrossEntropyLoss()``): ``s`` times ``sum``'s, ``s = 1/D`` (Bernoulli),
            ``2/D`` (Gaussian), ``1`` (categorical), ``D`` the features per sample
            (:func:`~twolevel_kfac.curvature.likelihoods.mean_scale`). The MC Fisher is that
            of the loss as written (``mean``: ``G`` is ``s²`` times ``sum``'s); the
            empirical Fisher reads the loss's own gradients either way. ``mean`` with
            ``s²λ``, ``s·lr`` and weight decay ``η`` takes the steps of ``sum`` with ``λ``,
            ``lr`` and ``s·η`` (``pi`` and ``eigen_sum`` damping, the paper's KL clip;
            weight decay is added after preconditioning). For categorical logits with
            positions, ``mean`` is ``CrossEntropyLoss()``'s mean over the batch's counted
            positions, ``sum`` sums over positions (``reduction="sum"`` over the flattened
            positions, divided by ``N``).
        class_dim: for ``likelihood="categorical"`` logits with positions, the dimension
            holding the classes: ``-1`` for ``[N, T, C]`` (a language model), ``1`` for
            torch's ``CrossEntropyLoss`` layout ``[N, C, d₁, …]``; each position is then a
            categorical of its own (``set_loss_mask`` for ``ignore_index`` targets).
            ``None`` (default): logits must be ``[N, C]``; more dimensions are refused.
        fisher_batch: fraction of the batch used for curvature statistics (paper: 0.25).
        ema_decay: cap of the running-average weight ρ = min(1 − 1/k, ema_decay).
        cov_interval: T_cov, refresh the factors every this many steps (default 10: the
            lowest train loss per second of wall time on three problems,
            ``docs/benchmarks/intervals.md``; 1 takes better steps at a higher cost).
        inv_interval: T_inv, refresh the decompositions every this many steps (default 10).
        kl_clip: c of the KL clipping, ``None`` to disable.
        kl_clip_form: ``paper`` ν = min(1, √(c/Σ|⟨d,g⟩|)) | ``lr_squared`` (Ba et al. 2017)
            ν = min(1, √(c/(lr² Σ|⟨d,g⟩|))).
        inverse_method: ``auto`` (default: :func:`resolve_inverse_method`, Cholesky unless
            something needs the factors' eigenbasis) | ``eigen`` | ``cholesky`` (not with
            ``eigen_sum``).
        factor_dtype: dtype of factors and decompositions; ``None`` = the parameters'
            dtype (float32 for bfloat16 / float16 parameters).
        weight_sharing: how a block with ``T > 1`` locations (a ``Linear`` on ``[N, T, D]``
            inputs, a convolution, tied weights) forms its factors (Eschenhagen et al.
            2023): ``expand`` (default; every location a sample, ``A = E_{n,t}[āāᵀ]``,
            ``G = E_{n,t}[δδᵀ]``, the direction divided by ``T``: KFC's convention, the
            right one when the loss has a term per location, e.g. a language model) |
            ``reduce`` (``ā_n`` the mean, ``δ_n`` the sum over locations, no division: the
            one for a prediction per sample after pooling over locations).
        accumulation_steps: micro-batches per optimizer step when gradients are accumulated
            (each micro-batch loss divided by it): the empirical ``δ`` is then scaled by
            ``micro-batch size × accumulation_steps``, so the statistics equal those of the
            whole accumulated batch. ``fisher="mc"`` needs no scaling.
        norm_blocks: give the affine parameters of ``LayerNorm``, ``RMSNorm``,
            ``BatchNorm`` and ``GroupNorm`` their unit-wise scale-and-shift blocks
            (:mod:`~twolevel_kfac.curvature.scale_shift`; kept under every fine level and
            coarse space); default: the fallback step.
        unsupported: what to do with layers KFAC would get wrong: ``warn`` | ``error`` |
            ``ignore`` (they then get the plain momentum-SGD step).
        seed: seed of the sampler that picks the Fisher mini-batch and MC targets (rank
            ``r`` of a distributed run reseeds it at every step ``k`` with
            :func:`~twolevel_kfac.distributed.step_seed` ``(seed, r, k)``).
        process_group: the ``torch.distributed`` group the curvature is reduced over;
            ``None`` = the world group when ``torch.distributed`` is initialised, else one
            process (:mod:`twolevel_kfac.distributed`).
        distributed_inverses: ``split`` (each factor decomposed by one rank, results
            shared) | ``replicate`` (every rank decomposes every factor).
    """

    damping: float | Callable[[int], float] = 1e-3
    damping_mode: DampingMode = "per_factor"
    fisher: FisherType = "mc"
    likelihood: Likelihood = "categorical"
    loss_reduction: LossReduction = "sum"
    class_dim: int | None = None
    fisher_batch: float = 1.0
    ema_decay: float = 0.95
    cov_interval: int = 10
    inv_interval: int = 10
    kl_clip: float | None = 1e-2
    kl_clip_form: KlClipForm = "paper"
    inverse_method: InverseChoice = "auto"
    factor_dtype: torch.dtype | None = None
    weight_sharing: WeightSharing = "expand"
    norm_blocks: bool = False
    unsupported: UnsupportedPolicy = "warn"
    seed: int = 0
    accumulation_steps: int = 1
    process_group: Any = None
    distributed_inverses: InversePlacement = "split"

    def __post_init__(self) -> None:
        if not callable(self.damping):
            check_real("damping", self.damping, low=0.0, low_open=True)
        check_choice("damping_mode", self.damping_mode, DAMPING_MODES)
        check_choice("fisher", self.fisher, FISHER_TYPES)
        check_choice("likelihood", self.likelihood, LIKELIHOODS)
        check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        if self.class_dim is not None and (
            isinstance(self.class_dim, bool)
            or not isinstance(self.class_dim, int)
            or self.class_dim == 0
        ):
            raise ValueError(
                f"class_dim must be None or a nonzero integer (-1: [N, T, C] logits, 1: "
                f"[N, C, d1, ...]); got {self.class_dim!r}"
            )
        check_real("fisher_batch", self.fisher_batch, low=0.0, high=1.0, low_open=True)
        check_real("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        check_interval("cov_interval", self.cov_interval)
        check_interval("inv_interval", self.inv_interval)
        if self.kl_clip is not None:
            try:
                check_real("kl_clip", self.kl_clip, low=0.0, low_open=True)
            except (TypeError, ValueError) as error:  # (kl_clip=0 for "off", a newcomer)
                raise type(error)(
                    f"{error}; kl_clip=None turns the KL clip off (kl_clip: null in a YAML file)"
                ) from None
        check_choice("kl_clip_form", self.kl_clip_form, KL_CLIP_FORMS)
        check_choice("inverse_method", self.inverse_method, INVERSE_CHOICES)
        if self.inverse_method == "cholesky" and self.damping_mode == "eigen_sum":
            raise ValueError(
                "damping_mode='eigen_sum' needs inverse_method='eigen' "
                "(A⊗G + λI has no Kronecker-factored Cholesky inverse)"
            )
        if self.factor_dtype is not None and not isinstance(self.factor_dtype, torch.dtype):
            raise TypeError(
                f"factor_dtype must be a torch.dtype or None; got {self.factor_dtype!r}"
            )
        check_choice("weight_sharing", self.weight_sharing, WEIGHT_SHARING)
        if not isinstance(self.norm_blocks, bool):
            raise TypeError(f"norm_blocks must be True or False; got {self.norm_blocks!r}")
        check_choice("unsupported", self.unsupported, UNSUPPORTED_POLICIES)
        check_interval("accumulation_steps", self.accumulation_steps)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer; got {self.seed!r}")
        if self.process_group is not None and not (
            dist.is_available() and isinstance(self.process_group, dist.ProcessGroup)
        ):
            raise TypeError(
                "process_group must be a torch.distributed.ProcessGroup or None; got "
                f"{type(self.process_group).__name__}"
            )
        check_choice("distributed_inverses", self.distributed_inverses, INVERSE_PLACEMENTS)

    @classmethod
    def of(cls, owner: type, given: dict[str, Any], taken: Iterable[str]) -> CurvatureOptions:
        """``cls(**given)`` for ``owner(..., **given)``, an unknown field refused by
        :func:`check_known` (naming the nearest field, or of ``taken``: the arguments
        ``owner`` took before, a fine level's own)."""
        check_known(owner, given, CURVATURE_ARGUMENTS, taken=taken)
        return cls(**given)


COARSE_REFRESH: tuple[str, ...] = get_args(CoarseRefresh)
SPECTRAL_WHICH: tuple[str, ...] = get_args(SpectralWhich)
KEPT_FISHER: tuple[str, ...] = get_args(KeptFisher)


@dataclass(frozen=True, kw_only=True)
class CoarseOptions:
    """The coarse level of :class:`~twolevel_kfac.optim.twolevel.TwoLevelKFAC`.

    Attributes:
        coarse_space: ``nicolaides`` | ``spectral`` | ``residual`` | ``krylov_nicolaides`` |
            ``krylov_residual`` | ``tselepidis`` (:mod:`twolevel_kfac.twolevel.coarse_spaces`).
        combination: ``additive`` | ``adef1`` | ``adef2`` | ``balanced``.
        coarse_refresh: ``consistent`` | ``faithful`` (:mod:`twolevel_kfac.optim.twolevel`).
        coarse_scale: ω_c, the weight of the coarse term (the authors' tuned factor).
        fine_weight: ω_f, Tselepidis' weight of the fine term (additive only).
        spectral_which: ``smallest`` (the paper) or ``largest`` eigenpair for ``spectral``.
        diagnostics: put ``‖res‖`` and ``E(β*) − E(0)`` in ``last_stats`` every step (one
            extra exact Fisher-vector product when the combination does not need the
            residual; off by default: even with A-DEF2 they cost two passes over the
            parameters, ≈ 2 % of a step).
        kept_fisher: what A-DEF1, A-DEF2 and balanced keep of the Fisher mini-batch between
            refreshes: ``rows`` (its per-sample ``(ā, δ)``, ``N·T·(d_in' + d_out)`` numbers
            per layer), ``columns`` (``W₀ = FR₀ᵀ``, ``K`` numbers per parameter; not with
            the diagnostics or the faithful schedule of a residual space, whose steps need
            the rows), or ``auto`` (default): the smaller where ``columns`` is possible.
            Both give the same step in exact arithmetic
            (:mod:`twolevel_kfac.twolevel.fisher_columns`).
    """

    coarse_space: CoarseSpace = "nicolaides"
    combination: CombinationName = "additive"
    coarse_refresh: CoarseRefresh = "consistent"
    coarse_scale: float = 1.0
    fine_weight: float = 1.0
    spectral_which: SpectralWhich = "smallest"
    diagnostics: bool = False
    kept_fisher: KeptFisher = "auto"

    def __post_init__(self) -> None:
        check_choice("coarse_space", self.coarse_space, COARSE_SPACES)
        check_choice("combination", self.combination, COMBINATIONS)
        check_choice("coarse_refresh", self.coarse_refresh, COARSE_REFRESH)
        check_real("coarse_scale", self.coarse_scale, low=0.0)
        check_real("fine_weight", self.fine_weight, low=0.0)
        if self.fine_weight != 1.0 and self.combination != "additive":
            raise ValueError("fine_weight applies to combination='additive' only")
        check_choice("spectral_which", self.spectral_which, SPECTRAL_WHICH)
        check_choice("kept_fisher", self.kept_fisher, KEPT_FISHER)
        if self.kept_fisher == "columns":
            if self.diagnostics:
                raise ValueError(
                    "kept_fisher='columns' cannot serve diagnostics=True: ‖res‖ needs F̂ "
                    "itself, so keep the rows (kept_fisher='rows' or 'auto')"
                )
            if self.coarse_refresh == "faithful" and self.coarse_space in RESIDUAL_SPACES:
                raise ValueError(
                    f"kept_fisher='columns' cannot serve coarse_space={self.coarse_space!r} "
                    "with coarse_refresh='faithful': its basis changes at every step, and "
                    "W₀ = FR₀ᵀ belongs to one basis (kept_fisher='rows' or 'auto')"
                )


CURVATURE_ARGUMENTS = frozenset(f.name for f in fields(CurvatureOptions))
COARSE_ARGUMENTS = frozenset(f.name for f in fields(CoarseOptions))
