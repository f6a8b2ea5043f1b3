"""The optimizers the benchmarks time, by label, and the training step each one takes.

Labels:

| label | optimizer |
|---|---|
| ``sgd`` | ``torch.optim.SGD``, lr 1e-3, Nesterov momentum 0.9 |
| ``adam`` | ``torch.optim.Adam``, lr 1e-4 |
| ``kfac`` | ``tk.KFAC`` at its defaults (``per_factor``, ``inverse_method="auto"``) |
| ``kfac:MODE:INVERSE`` | ``tk.KFAC(damping_mode=MODE, inverse_method=INVERSE)`` |
| ``ekfac``, ``kpsvd`` | ``tk.EKFAC``, ``tk.KPSVD`` |
| ``SPACE+COMBINATION`` | ``tk.TwoLevelKFAC``, ``coarse_refresh="consistent"`` |
| ``residual+additive:faithful`` | the same with the authors' ``coarse_refresh="faithful"`` |
| ``asdl:kfac``, ``kfac_pytorch``, ``authors:*`` | the peers (:mod:`twolevel_kfac.bench.external`) |

with ``MODE`` one of ``per_factor``, ``pi``, ``eigen_sum`` and ``INVERSE`` one of
``eigen``, ``cholesky`` (``eigen_sum`` has no Cholesky form). The KFAC family shares
``KFAC_SETTINGS`` (the paper's MC Fisher on a quarter of the batch, damping 1e-3, KL clip
1e-2) and ``cov_interval = inv_interval = T``. A method bound to a model and a batch is a
:class:`Runner`: ``runner.run(n)`` takes ``n`` full training steps (``zero_grad``,
forward, loss, backward, ``step``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from twolevel_kfac.bench.problems import Problem
from twolevel_kfac.experiments.losses import LossFn
from twolevel_kfac.twolevel.coarse_spaces import COARSE_SPACES
from twolevel_kfac.twolevel.combinations import COMBINATIONS

__all__ = [
    "KFAC_SETTINGS",
    "MethodSpec",
    "Runner",
    "build_runner",
    "method_spec",
    "runner_for",
    "select_methods",
    "step_time_methods",
]

KFAC_SETTINGS: dict[str, Any] = {
    "lr": 1e-3,
    "damping": 1e-3,
    "fisher": "mc",
    "fisher_batch": 0.25,
    "kl_clip": 1e-2,
}
KFAC_VARIANTS = (
    ("per_factor", "eigen"),
    ("per_factor", "cholesky"),
    ("pi", "eigen"),
    ("pi", "cholesky"),
    ("eigen_sum", "eigen"),
)
KINDS = ("sgd", "adam", "kfac", "ekfac", "kpsvd", "twolevel", "asdl", "kfac_pytorch", "authors")


@dataclass(frozen=True)
class MethodSpec:
    """A method to time: a label, the kind of optimizer and its keyword arguments.

    Attributes:
        label: Row label of the reports.
        kind: One of ``KINDS``.
        options: Keyword arguments (a tuple of pairs, so the spec is hashable and picklable).
    """

    label: str
    kind: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        """``options`` as a dict."""
        return dict(self.options)

    @property
    def preconditioned(self) -> bool:
        """Whether it applies a curvature preconditioner (everything but SGD and Adam)."""
        return self.kind not in ("sgd", "adam")

    def with_options(self, label: str, **extra: Any) -> MethodSpec:
        """A copy with another label and some options replaced."""
        return replace(self, label=label, options=tuple({**self.kwargs, **extra}.items()))


@dataclass
class Runner:
    """A method bound to its own model and a batch: ``run(n)`` takes ``n`` training steps."""

    step: Callable[[], None]
    optimizer: Any = None
    model: nn.Module | None = None

    def run(self, steps: int) -> None:
        """Take ``steps`` training steps."""
        for _ in range(steps):
            self.step()

    def skipped(self) -> int:
        """Steps the KFAC family dropped as non-finite (they are cheaper: a warning sign)."""
        return int(getattr(self.optimizer, "nonfinite_steps", 0))


def _kfac(mode: str, inverse: str) -> MethodSpec:
    options = {**KFAC_SETTINGS, "damping_mode": mode, "inverse_method": inverse}
    return MethodSpec(f"kfac:{mode}:{inverse}", "kfac", tuple(options.items()))


def _two_level(space: str, combination: str, refresh: str = "consistent") -> MethodSpec:
    options = {
        **KFAC_SETTINGS,
        "coarse_space": space,
        "combination": combination,
        "coarse_refresh": refresh,
    }
    label = f"{space}+{combination}" + (":faithful" if refresh == "faithful" else "")
    return MethodSpec(label, "twolevel", tuple(options.items()))


def step_time_methods() -> list[MethodSpec]:
    """Every method of the step-time benchmark, in report order."""
    methods = [
        MethodSpec("sgd", "sgd", (("lr", 1e-3),)),
        MethodSpec("adam", "adam", (("lr", 1e-4),)),
    ]
    methods.append(MethodSpec("kfac", "kfac", tuple(KFAC_SETTINGS.items())))  # the defaults
    methods += [_kfac(mode, inverse) for mode, inverse in KFAC_VARIANTS]
    methods += [MethodSpec(k, k, tuple(KFAC_SETTINGS.items())) for k in ("ekfac", "kpsvd")]
    methods += [_two_level(s, c) for s, c in itertools.product(COARSE_SPACES, COMBINATIONS)]
    methods.append(_two_level("residual", "additive", "faithful"))
    return methods


def method_spec(label: str) -> MethodSpec:
    """The spec of a step-time label (``ValueError`` lists the labels when unknown)."""
    return select_methods([label])[0]


def select_methods(labels: Sequence[str] | None, default: Sequence[str] = ()) -> list[MethodSpec]:
    """The methods with these labels (all when ``labels`` and ``default`` are empty).

    Raises:
        ValueError: An unknown label.
    """
    known = {m.label: m for m in step_time_methods()}
    chosen = list(labels or default)
    if not chosen:
        return list(known.values())
    unknown = [label for label in chosen if label not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; allowed: {list(known)}")
    return [known[label] for label in chosen]


def _optimizer(spec: MethodSpec, model: nn.Module, likelihood: str, interval: int) -> Any:
    import twolevel_kfac as tk
    from twolevel_kfac.experiments.optimizers import make_optimizer

    kwargs = spec.kwargs
    if spec.kind in ("sgd", "adam"):
        return make_optimizer(spec.kind, model, **kwargs)
    kwargs = {
        "likelihood": likelihood,
        "cov_interval": interval,
        "inv_interval": interval,
        **kwargs,
    }
    if spec.kind == "twolevel":
        return tk.TwoLevelKFAC(model, **kwargs)
    return make_optimizer(spec.kind, model, **kwargs)


def build_runner(
    spec: MethodSpec,
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    likelihood: str,
    interval: int,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> Runner:
    """Bind ``spec`` to ``model`` and a fixed ``batch``.

    Args:
        spec: The method.
        model: Its own model (the optimizer hooks into it).
        batch: ``(x, y)``.
        loss_fn: Mean-over-batch loss.
        likelihood: What the MC Fisher samples from.
        interval: T: factors and decompositions are refreshed every T steps.
        forward: What the step calls on ``x`` (default: ``model``), e.g.
            ``torch.compile(model)`` after the optimizer hooked into ``model``.

    Returns:
        The runner.
    """
    if spec.kind in ("asdl", "kfac_pytorch", "authors"):
        from twolevel_kfac.bench import external

        return external.build_runner(spec, model, batch, loss_fn, interval, likelihood)
    x, y = batch
    opt = _optimizer(spec, model, likelihood, interval)
    call = model if forward is None else forward

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(call(x), y).backward()
        opt.step()

    return Runner(step, opt, model)


def runner_for(
    spec: MethodSpec, problem: Problem, interval: int, seed: int = 0, device: str = "cpu"
) -> Runner:
    """``build_runner`` on a fresh model and the fixed batch of ``problem``, on ``device``."""
    model = problem.build_model(seed).to(device)
    x, y = problem.batch_data(seed)
    batch = (x.to(device), y.to(device))
    return build_runner(spec, model, batch, problem.loss_fn, problem.likelihood, interval)


def inverse_method(spec: MethodSpec) -> str:
    """How the method inverts its factors (for the FLOP floor): ``eigen`` or ``cholesky``,
    as the optimizer resolves ``inverse_method="auto"``."""
    from twolevel_kfac.curvature.factor_inverse import HALF_DTYPES
    from twolevel_kfac.optim.coarse import CoarseLevel
    from twolevel_kfac.optim.levels import fine_level_type
    from twolevel_kfac.optim.options import CoarseOptions, resolve_inverse_method

    kwargs = spec.kwargs
    if spec.kind in ("asdl", "kfac_pytorch", "authors"):  # the peers: as configured, else eigen
        return str(kwargs.get("inverse_method", "eigen"))
    fine = spec.kind if spec.kind in ("ekfac", "kpsvd") else kwargs.get("fine", "kfac")
    space = kwargs.get("coarse_space")
    return resolve_inverse_method(
        kwargs.get("inverse_method", "auto"),
        damping_mode=kwargs.get("damping_mode", "per_factor"),
        damping_varies=bool(kwargs.get("adaptive_damping")) or callable(kwargs.get("damping")),
        fine_needs_eigenbasis=fine_level_type(fine).needs_eigenbasis,
        coarse_needs_eigenbasis=space is not None
        and CoarseLevel.needs_eigenbasis(CoarseOptions(coarse_space=space)),
        half_factors=kwargs.get("factor_dtype") in HALF_DTYPES,
    )


def fisher_batch(spec: MethodSpec) -> float:
    """The fraction of the batch its curvature statistics use."""
    return float(spec.kwargs.get("fisher_batch", 1.0))


def empirical(spec: MethodSpec) -> bool:
    """Whether the statistics come from the loss's own backward pass (no extra pass)."""
    return spec.kwargs.get("fisher", "empirical") == "empirical"
