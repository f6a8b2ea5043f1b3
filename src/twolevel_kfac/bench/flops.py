"""The FLOP floor of a KFAC step, from the model's layer shapes.

For each Linear / Conv2d layer ``ℓ`` let ``d_in`` be its input features (``c_in·k_h·k_w``
for a convolution), ``d̄_in = d_in + 1`` with a bias, ``d_out`` its outputs and ``L`` the
output locations per example (1 for Linear). With batch ``B``, Fisher batch ``n_F`` and
refresh interval ``T`` (factors and decompositions every T steps), a step costs at least

* forward + backward: ``6 B Σ L d_in d_out`` (2 forward, 4 backward per multiply-add);
* applying the preconditioner: ``2 Σ d_out d̄_in (d_out + d̄_in)`` (``G⁻¹ V A⁻¹``, two
  matrix products);
* factor refresh, every T steps: ``6 n_F Σ L d_in d_out`` (MC Fisher: a forward and
  backward pass of the Fisher batch) ``+ 2 n_F Σ L (d̄_in² + d_out²)`` (``A`` and ``G``);
* decompositions, every T steps: ``c Σ (d̄_in³ + d_out³)`` with ``c = 9`` for a symmetric
  eigendecomposition with eigenvectors (Golub & Van Loan) and ``c = 1`` for a Cholesky
  factorisation and inverse (``n³/3 + 2n³/3``).

With the empirical Fisher the statistics come from the loss's own backward pass and the
extra ``6 n_F Σ L d_in d_out`` is dropped. For the MNIST autoencoder at B = 512,
n_F = 128 this gives 8.7, 9.0, 3.8/T and 50/T GFLOP(-equivalents). The floor of SGD and
Adam is the forward + backward (their element-wise updates are not counted), so the
*floor ratio* of a KFAC-family method is ``(fwd+bwd + apply + (refresh + decomp)/T) /
fwd+bwd``. A two-level method adds its coarse level's work (:func:`coarse_floor`); EKFAC's
and KPSVD's work beyond KFAC's is not counted (their floor is KFAC's, a lower bound).
``9 n³`` is the symmetric QR count; LAPACK's divide-and-conquer ``syevd`` behind
``torch.linalg.eigh`` needs fewer, so where decompositions dominate a measured ratio can
fall below this floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..curvature.extreme_eigen import SMALL

__all__ = ["FlopFloor", "LayerShape", "coarse_floor", "flop_floor", "layer_shapes"]

DECOMPOSITION_COST = {"eigen": 9.0, "cholesky": 1.0}  # FLOPs per n³


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one preconditioned layer that its FLOPs depend on."""

    name: str
    d_in: int
    d_out: int
    locations: int = 1
    bias: bool = True

    @property
    def d_in_bias(self) -> int:
        """``d̄_in``: the side of the A factor."""
        return self.d_in + int(self.bias)

    @property
    def macs(self) -> int:
        """Multiply-adds of one example's forward pass through the layer."""
        return self.locations * self.d_in * self.d_out


def layer_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerShape]:
    """The Linear / Conv1d-3d / Embedding layers of ``model``, read off one forward pass of
    one example (attention's projections run functionally there and are not counted).

    The pass runs in eval mode without gradients (BatchNorm uses its running statistics);
    the model's mode is restored.

    Args:
        model: The network.
        input_shape: Shape of one input (without the batch dimension).

    Returns:
        One entry per layer, in forward order.
    """
    shapes: list[LayerShape] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        bias = getattr(module, "bias", None) is not None
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            d_in = module.in_channels // module.groups * math.prod(module.kernel_size)
            locations = math.prod(output.shape[2:])
            shapes.append(LayerShape(names[module], d_in, module.out_channels, locations, bias))
        elif isinstance(module, nn.Embedding):  # the table [V, D]: d_out = V, d_in = D
            locations = math.prod(output.shape[1:-1])
            shapes.append(
                LayerShape(
                    names[module], module.embedding_dim, module.num_embeddings, locations, False
                )
            )
        elif isinstance(module, nn.Linear):
            locations = math.prod(output.shape[1:-1])
            shapes.append(
                LayerShape(names[module], module.in_features, module.out_features, locations, bias)
            )

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


@dataclass(frozen=True)
class FlopFloor:
    """The parts of the floor (FLOPs); ``refresh`` and ``decomposition`` are per refresh."""

    forward_backward: float
    precondition: float
    refresh: float
    decomposition: float
    coarse_step: float = 0.0  # a two-level method's coarse work at every step
    coarse_refresh: float = 0.0  # and at every refresh (:func:`coarse_floor`)

    def step(self, interval: int, preconditioned: bool = True) -> float:
        """FLOPs of an average step with refresh interval ``interval``."""
        if not preconditioned:
            return self.forward_backward
        amortised = (self.refresh + self.decomposition + self.coarse_refresh) / interval
        return self.forward_backward + self.precondition + self.coarse_step + amortised

    def ratio(self, interval: int, preconditioned: bool = True) -> float:
        """``step / forward_backward``: the floor of the step-time ratio to SGD."""
        return self.step(interval, preconditioned) / self.forward_backward

    def as_gflop(self) -> dict[str, float]:
        """The parts in GFLOP (for JSON)."""
        return {
            "forward_backward": self.forward_backward / 1e9,
            "precondition": self.precondition / 1e9,
            "refresh_per_T": self.refresh / 1e9,
            "decomposition_per_T": self.decomposition / 1e9,
            "coarse_step": self.coarse_step / 1e9,
            "coarse_per_T": self.coarse_refresh / 1e9,
        }


def apply_flops(shapes: list[LayerShape]) -> int:
    """One application of ``M⁻¹``: ``2 Σ d_out d̄_in (d_out + d̄_in)`` (``G⁻¹ V A⁻¹``)."""
    return sum(2 * s.d_out * s.d_in_bias * (s.d_out + s.d_in_bias) for s in shapes)


def flop_floor(
    shapes: list[LayerShape],
    batch: int,
    fisher_batch: int,
    inverse_method: str = "eigen",
    extra_pass: bool = True,
) -> FlopFloor:
    """The FLOP floor of a KFAC step (module docstring).

    Args:
        shapes: ``layer_shapes`` of the model.
        batch: B.
        fisher_batch: n_F, examples of the curvature statistics.
        inverse_method: ``eigen`` or ``cholesky``.
        extra_pass: Whether the statistics need their own forward and backward pass
            (MC Fisher) rather than the loss's (empirical Fisher).

    Returns:
        The floor.

    Raises:
        ValueError: Unknown ``inverse_method``.
    """
    if inverse_method not in DECOMPOSITION_COST:
        raise ValueError(
            f"inverse_method must be one of {list(DECOMPOSITION_COST)}; got {inverse_method!r}"
        )
    macs = sum(s.macs for s in shapes)
    apply = apply_flops(shapes)
    factors = sum(2 * fisher_batch * s.locations * (s.d_in_bias**2 + s.d_out**2) for s in shapes)
    cubes = sum(s.d_in_bias**3 + s.d_out**3 for s in shapes)
    return FlopFloor(
        forward_backward=6.0 * batch * macs,
        precondition=float(apply),
        refresh=float(factors) + (6.0 * fisher_batch * macs if extra_pass else 0.0),
        decomposition=DECOMPOSITION_COST[inverse_method] * cubes,
    )


# per step on parts (optim/coarse_parts.py): (restrictions R₀v, prolongations R₀ᵀy, F̂
# products) of each combination
_COARSE_STEP = {
    "additive": (1, 1, 0),
    "adef2": (2, 1, 1),
    "adef1": (1, 2, 1),
    "balanced": (2, 2, 2),
}
_BASIS_VECTORS = {"krylov_nicolaides": 2, "krylov_residual": 2}  # K per layer; else 1
_BASIS_APPLIES = {"residual": 1, "krylov_residual": 2}  # M⁻¹ applies to build the basis
_CONSTANT_BASIS = ("nicolaides", "tselepidis")  # restricted by a sum, prolonged by a shift


def coarse_floor(
    shapes: list[LayerShape],
    fisher_batch: int,
    space: str,
    combination: str,
    refresh: str = "consistent",
    inverse_method: str = "eigen",
) -> tuple[float, float]:
    """The FLOPs a two-level method adds to KFAC's, ``(per step, per refresh)``, a lower
    bound of what :mod:`twolevel_kfac.optim.coarse_parts` and the refresh do.

    With ``P = Σ d_out d̄_in`` (parameters), ``k`` basis vectors per layer (``K = kL`` in
    all), ``A`` one application of ``M⁻¹`` (``2 Σ d_out d̄_in (d_out + d̄_in)``) and
    ``S = 2 n_F Σ L d_out d̄_in`` one pass over the Fisher mini-batch's per-sample gradients
    (``⟨∇ℓ_n, v⟩`` for all ``n``, or ``Σ_n c_n ∇ℓ_n``):

    * every step: a restriction or prolongation costs ``2kP`` (``P`` for the Nicolaides
      vector: a sum or a shift), an ``F̂`` product ``min(S, 2KP)`` (the kept rows, or
      ``W₀``: ``K`` columns of ``P``): additive 1 + 1 + 0, A-DEF2 2 + 1 + 1, A-DEF1
      1 + 2 + 1, balanced 2 + 2 + 2 (restrictions + prolongations + products);
    * every refresh: ``F_c = R₀F̂R₀ᵀ``, ``k·S`` (Tselepidis' from per-sample sums,
      ``2 n_F Σ L (d̄_in + d_out)``); a residual basis ``M⁻¹(g − F̂M⁻¹g)`` adds ``2S`` and
      its ``M⁻¹`` applies (1, Krylov-residual 2; one more for ``M⁻¹g`` under A-DEF1 and
      balanced, which apply ``M⁻¹`` to another vector); the spectral basis reads the
      eigendecompositions under ``inverse_method="eigen"`` (counted in :func:`flop_floor`)
      and else one extreme pair per factor (:mod:`twolevel_kfac.curvature.extreme_eigen`):
      a Cholesky factorisation, ``n³/3``, of a factor of side ``n`` > ``SMALL``, and a full
      ``eigh``, ``9n³``, of a smaller one (its ``O(n²)`` iterations not counted);
    * ``refresh="faithful"``: the residual basis at every step (``F_c`` at refreshes).

    Not counted: ``W₀``'s build when it is kept (the floor takes each product at its
    cheaper form), the solves with the ``K × K`` ``F_c``.

    Args:
        shapes: ``layer_shapes`` of the model.
        fisher_batch: n_F.
        space: The coarse space.
        combination: The combination.
        refresh: ``consistent`` or ``faithful``.
        inverse_method: the fine level's (``eigen`` or ``cholesky``).
    """
    params = sum(s.d_out * s.d_in_bias for s in shapes)
    apply = apply_flops(shapes)
    sweep = sum(2 * fisher_batch * s.locations * s.d_out * s.d_in_bias for s in shapes)
    k = _BASIS_VECTORS.get(space, 1)
    restrictions, prolongations, products = _COARSE_STEP[combination]
    transfer = params if space in _CONSTANT_BASIS else 2 * k * params
    product = min(sweep, 2 * k * len(shapes) * params)
    step = float((restrictions + prolongations) * transfer + products * product)
    if space == "tselepidis":
        coarse_matrix = sum(
            2 * fisher_batch * s.locations * (s.d_in_bias + s.d_out) for s in shapes
        )
    else:
        coarse_matrix = k * sweep
    coarse_refresh = float(coarse_matrix)
    if space == "spectral" and inverse_method != "eigen":
        sides = [side for s in shapes for side in (s.d_in_bias, s.d_out)]
        coarse_refresh += sum(side**3 / 3 if side > SMALL else 9.0 * side**3 for side in sides)
    applies = _BASIS_APPLIES.get(space, 0)
    if not applies:
        return step, coarse_refresh
    applies += combination in ("adef1", "balanced")
    basis = 2 * sweep + applies * apply
    if refresh == "faithful":
        return step + basis, coarse_refresh
    return step, basis + coarse_refresh
