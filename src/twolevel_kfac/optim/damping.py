"""Adaptive Levenberg–Marquardt damping and the quadratic-model step of Martens & Grosse
(2015, §6.5 and §7), for :class:`~twolevel_kfac.KFAC` and its subclasses.

The objective of one mini-batch is ``h(θ) = L(θ) + Σ_p (η_p/2)‖θ_p‖²`` (``L`` the closure's
mean loss, ``η_p`` the weight decay of ``θ_p``'s group) and its quadratic model at ``θ`` is

    M(δ) − M(0) = ∇hᵀδ + ½ δᵀ(F + η)δ,

``F`` the *exact* Fisher of the Fisher mini-batch over the preconditioned layers, from the
stored per-sample statistics (``δᵀFδ = (1/N) Σ_n c_n²``, ``c_n = Σ_i ⟨∇_iℓ_n, δ_i⟩``,
:func:`~twolevel_kfac.twolevel.fisher_products.sample_coefficients`); other parameters
(BatchNorm …) enter only through ``∇h`` and ``η``.

* **Adaptive damping** (``adaptive_damping=True``, §6.5): every ``damping_interval`` = T₁
  steps the loss is evaluated again at ``θ + δ`` (``δ`` the step just taken) by calling the
  ``step(closure)`` closure a second time (with curvature capture off; it recomputes
  ``.grad``, and a BatchNorm in train mode updates its running statistics), and
  ``ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0))``. Then ``λ ← ω₁λ`` if ``ρ > 3/4``, ``λ ← λ/ω₁`` if
  ``ρ < 1/4`` (also for a non-finite new loss), ``ω₁ = damping_decay^T₁`` (M&G:
  ``(19/20)^T₁``), clipped to ``[min_damping, max_damping]``; ``ρ`` is not used when
  ``M(δ) − M(0) ≥ 0``. ``λ`` is the preconditioner's one damping (KFAC's factor damping and
  the two-level ``F̂ = F + λI``); M&G's separate factored-Tikhonov γ (§6.6) is not
  implemented.
* **Quadratic-model step size and momentum** (``qmodel_lr_momentum=True``, §7): with
  ``Δ = −(d + ηθ)`` the preconditioned direction and ``δ₀`` the previous step, the step is
  ``δ = αΔ + μδ₀`` with ``(α, μ)`` minimising the damped model
  ``∇hᵀδ + ½δᵀ(F + (λ + η)I)δ``:

      [ΔᵀĈΔ   ΔᵀĈδ₀ ] [α]     [∇hᵀΔ ]
      [δ₀ᵀĈΔ  δ₀ᵀĈδ₀] [μ] = − [∇hᵀδ₀],      Ĉ = F + (λ + η)I,

  (``μ = 0``, ``α = −∇hᵀΔ/ΔᵀĈΔ`` on the first step or for a singular system); the groups'
  ``lr``, ``momentum`` and ``nesterov`` are then not used.

Both need the Fisher mini-batch's statistics, which the preconditioner then keeps (and
saves in its ``state_dict``); between factor refreshes (``cov_interval > 1``) ``F`` is that
of the last refresh step's Fisher mini-batch. Under ``torch.distributed`` they raise
``NotImplementedError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from ..curvature.blocks import block_parameters, trains, weight_rows
from ..twolevel.fisher_products import sample_coefficients
from .options import CurvatureOptions, check_real
from .preconditioner import KFACPreconditioner


@dataclass(frozen=True, kw_only=True)
class DampingOptions:
    """Martens & Grosse's damping adaptation and quadratic-model step (module docstring).

    Attributes:
        adaptive_damping: adapt λ from the reduction ratio ρ every ``damping_interval`` steps.
        damping_interval: T₁.
        damping_decay: ω₁ = ``damping_decay ** damping_interval`` (M&G: 19/20).
        min_damping, max_damping: the range λ is kept in.
        qmodel_lr_momentum: choose the step size α and momentum μ from the quadratic model.
    """

    adaptive_damping: bool = False
    damping_interval: int = 5
    damping_decay: float = 19 / 20
    min_damping: float = 1e-8
    max_damping: float = 1e4
    qmodel_lr_momentum: bool = False

    def __post_init__(self) -> None:
        for name in ("adaptive_damping", "qmodel_lr_momentum"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}")
        interval = self.damping_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"damping_interval must be an integer >= 1; got {interval!r}")
        check_real("damping_decay", self.damping_decay, low=0.0, high=1.0, low_open=True)
        check_real("min_damping", self.min_damping, low=0.0, low_open=True)
        check_real("max_damping", self.max_damping, low=self.min_damping)

    @property
    def omega(self) -> float:
        """ω₁ = ``damping_decay ** damping_interval``."""
        return float(self.damping_decay**self.damping_interval)

    @property
    def needs_statistics(self) -> bool:
        """Whether the options need the last Fisher mini-batch kept."""
        return self.adaptive_damping or self.qmodel_lr_momentum


DAMPING_ARGUMENTS = frozenset(f.name for f in fields(DampingOptions))


def check_damping_fields(
    owner: str, damping: DampingOptions, keywords: dict[str, Any], given: CurvatureOptions | None
) -> None:
    """Check the curvature options the damping options constrain (``keywords``: the
    curvature keywords; ``given``: a ``CurvatureOptions``, or ``None``).

    * Under ``adaptive_damping`` the first ``λ`` lies in ``[min_damping, max_damping]`` (one
      outside took its value until the first adaptation, then jumped to the bound).
    * Under ``qmodel_lr_momentum`` the quadratic model picks the step's scale (Martens &
      Grosse §7: ``δ = αΔ + μδ₀``, no KL clip): the clip would rescale the preconditioned
      layers' directions against the weight decay and the fallback parameters' gradients,
      and the model would pick its ``α, μ`` along another direction (a trial: a first step
      60 % off, a loss after 30 steps 0.99 against 0.82). The ``kl_clip`` keyword defaults
      to ``None`` there; a clip passed, or a ``CurvatureOptions`` with one (its default
      too: it cannot tell), is refused.

    Raises:
        ValueError: naming the option to change.
    """
    first = keywords.get("damping", CurvatureOptions.damping) if given is None else given.damping
    low, high = damping.min_damping, damping.max_damping
    if damping.adaptive_damping and isinstance(first, (int, float)) and not low <= first <= high:
        raise ValueError(
            f"{owner}: damping={first!r} is outside [min_damping, max_damping] = [{low!r}, "
            f"{high!r}], where adaptive_damping keeps λ"
        )
    if not damping.qmodel_lr_momentum:
        return
    asked = keywords.get("kl_clip") if given is None else given.kl_clip
    if asked is not None:
        where = "kl_clip=None" if given is None else "CurvatureOptions(..., kl_clip=None)"
        raise ValueError(
            f"{owner}: qmodel_lr_momentum picks the step's scale from the quadratic model; a "
            f"KL clip (kl_clip={asked!r}) would change the direction it scales (the mix of the "
            "preconditioned directions, the weight decay and the fallback parameters' "
            f"gradients): pass {where}"
        )
    if given is None:
        keywords["kl_clip"] = None


def adjust_damping(damping: float, rho: float, options: DampingOptions) -> float:
    """M&G §6.5: ``λω₁`` if ``ρ > 3/4``, ``λ/ω₁`` if ``ρ < 1/4`` (or ``ρ = −∞``), else ``λ``;
    ``ρ = nan`` (no usable model decrease) keeps ``λ``. Clipped to the allowed range."""
    if rho > 0.75:
        damping *= options.omega
    elif rho < 0.25:
        damping /= options.omega
    return min(max(damping, options.min_damping), options.max_damping)


def solve_step_and_momentum(
    curvature: tuple[float, float, float], slopes: tuple[float, float]
) -> tuple[float, float]:
    """``(α, μ)`` minimising ``α b₁ + μ b₂ + ½[α μ] C [α μ]ᵀ`` (M&G §7).

    Args:
        curvature: ``(c₁₁, c₁₂, c₂₂)`` of the symmetric ``C`` (``c₂₂ = 0``: no momentum).
        slopes: ``(b₁, b₂)``.

    Returns:
        ``(α, μ)``; ``μ = 0`` when ``C`` is singular or has no momentum direction.
    """
    c11, c12, c22 = curvature
    b1, b2 = slopes
    det = c11 * c22 - c12 * c12
    if c22 > 0 and det > 1e-12 * c11 * c22:
        return (-b1 * c22 + b2 * c12) / det, (b1 * c12 - b2 * c11) / det
    return (-b1 / c11 if c11 > 0 else 0.0), 0.0


@dataclass
class _Entry:
    param: Tensor
    decay: float
    theta: Tensor  # θ before the step
    grad_h: Tensor  # ∇h = ∇L + ηθ


class QuadraticModel:
    """The quadratic model of one step at ``θ`` (snapshot taken before preconditioning).

    Args:
        groups: the optimizer's parameter groups (``params``, ``weight_decay``).
        preconditioner: supplies the layers and the kept Fisher mini-batch statistics.
    """

    def __init__(
        self, groups: Iterable[dict[str, Any]], preconditioner: KFACPreconditioner
    ) -> None:
        self.preconditioner = preconditioner
        self.entries: list[_Entry] = []
        for group in groups:
            decay = float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is not None and p.requires_grad:  # (a frozen one's kept .grad: no)
                    theta = p.detach().clone()
                    self.entries.append(_Entry(p, decay, theta, p.grad + decay * theta))

    def _coefficients(self, values: list[Tensor]) -> Tensor:
        """``c_n = Σ_i ⟨∇_iℓ_n, v_i⟩`` of a parameter-aligned vector over the layers that
        train and that the kept mini-batch used (a layer frozen whole, or unused in that
        forward, has no part in the model's Fisher)."""
        pre = self.preconditioner
        by_id = {id(e.param): v for e, v in zip(self.entries, values, strict=True)}
        stats, matrices = [], []
        for name, module in pre.layers.items():
            if not trains(module) or name not in pre.retained_stats:
                continue
            weight, bias = block_parameters(module)
            mat = by_id.get(id(weight), torch.zeros_like(weight)).reshape(weight_rows(module), -1)
            if bias is not None:
                mat = torch.cat([mat, by_id.get(id(bias), torch.zeros_like(bias))[:, None]], 1)
            stats.append(pre.retained_stats[name])
            matrices.append(mat.to(stats[-1].g.dtype))
        if not stats:  # no layer of the kept batch trains now: no Fisher term
            return torch.zeros(max([1, *(s.num_samples for s in pre.retained_stats.values())]))
        return sample_coefficients(stats, matrices)

    def curvature(self, vectors: list[list[Tensor]], damping: float) -> list[list[float]]:
        """``uᵀ(F + (η + damping)I)v`` for every pair of the parameter-aligned ``vectors``."""
        coeffs = [self._coefficients(v) for v in vectors]
        count = coeffs[0].shape[0]
        out = []
        for u, cu in zip(vectors, coeffs, strict=True):
            row = []
            for v, cv in zip(vectors, coeffs, strict=True):
                shift = sum(
                    (e.decay + damping) * float((a * b).sum())
                    for e, a, b in zip(self.entries, u, v, strict=True)
                )
                row.append(float(cu @ cv) / count + shift)
            out.append(row)
        return out

    def slope(self, values: list[Tensor]) -> float:
        """``∇hᵀv``."""
        return sum(float((e.grad_h * v).sum()) for e, v in zip(self.entries, values, strict=True))

    def step_taken(self) -> list[Tensor]:
        """``δ = θ_now − θ``."""
        return [e.param.detach() - e.theta for e in self.entries]

    def decay_change(self) -> float:
        """``Σ_p (η_p/2)(‖θ_p + δ_p‖² − ‖θ_p‖²)``, the regulariser's part of ``h(θ+δ) − h(θ)``."""
        return sum(
            0.5 * e.decay * float(e.param.detach().square().sum() - e.theta.square().sum())
            for e in self.entries
            if e.decay
        )

    def reduction_ratio(self, loss: float, new_loss: float) -> tuple[float, float, float]:
        """``(ρ, h(θ+δ) − h(θ), M(δ) − M(0))`` of the step taken (module docstring)."""
        delta = self.step_taken()
        predicted = self.slope(delta) + 0.5 * self.curvature([delta], 0.0)[0][0]
        actual = new_loss - loss + self.decay_change()
        if not math.isfinite(actual):
            return -math.inf, actual, predicted
        return (actual / predicted if predicted < 0 else math.nan), actual, predicted

    @staticmethod
    def _grad(entry: _Entry) -> Tensor:
        grad = entry.param.grad
        assert grad is not None
        return grad

    def qmodel_step(self, state: dict[Any, Any], damping: float) -> tuple[float, float]:
        """Take ``δ = αΔ + μδ₀`` (M&G §7) in place; returns ``(α, μ)``."""
        direction = [-(self._grad(e) + e.decay * e.param.detach()) for e in self.entries]
        saved = [state[e.param].get("qmodel_delta") for e in self.entries]
        prev = [
            torch.zeros_like(e.theta) if v is None else v
            for e, v in zip(self.entries, saved, strict=True)
        ]
        if any(v is not None for v in saved):
            c = self.curvature([direction, prev], damping)
            matrix = (c[0][0], c[0][1], c[1][1])
        else:
            matrix = (self.curvature([direction], damping)[0][0], 0.0, 0.0)
        alpha, mu = solve_step_and_momentum(matrix, (self.slope(direction), self.slope(prev)))
        for e, d, p0 in zip(self.entries, direction, prev, strict=True):
            step = alpha * d + mu * p0
            e.param.add_(step)
            state[e.param]["qmodel_delta"] = step
        return alpha, mu


def evaluate_without_capture(
    preconditioner: KFACPreconditioner, closure: Callable[[], Tensor]
) -> float:
    """The closure's loss, with the curvature capture switched off for the call."""
    capture = preconditioner.capture
    active, capture.active = capture.active, False
    try:
        with torch.enable_grad():
            return float(closure().detach())
    finally:
        capture.active = active
