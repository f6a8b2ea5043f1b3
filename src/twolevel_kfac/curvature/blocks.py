"""Layer curvature blocks: turn a layer's captured inputs and output-gradients into the
weight-sharing format ``[N, T, features]`` and into the Kronecker factors of KFAC / KFC.

Conventions (README: "Conventions"; Martens & Grosse 2015 eq. (1); Grosse & Martens
2016 for convolutions):

* A layer's parameters are viewed as one matrix ``W̄ = [W, b]`` of shape
  ``(d_out, d_in')`` with ``d_in' = d_in + 1`` when the layer has a bias (the bias is the
  last column). For ``Conv2d`` ``W`` is ``weight.reshape(C_out, C_in·k_h·k_w)``, whose
  column order matches :func:`torch.nn.functional.unfold`.
* ``a[n, t]`` is the homogeneous input ``ā = [a; 1]`` of sample ``n`` at output location
  ``t`` (``T = 1`` for a ``Linear`` layer on ``[N, d_in]`` inputs).
* ``g[n, t]`` is ``δ = ∂ℓ_n/∂s_{n,t}``, the per-sample gradient of the pre-activation.
* The per-sample gradient is ``∇_W̄ ℓ_n = Σ_t g[n,t] a[n,t]ᵀ`` and the Fisher of a batch of
  ``N`` samples is ``F = (1/N) Σ_n vec(∇ℓ_n) vec(∇ℓ_n)ᵀ``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from .kronecker import KroneckerFactors
from .layer_types import LayerType, layer_type
from .live_positions import kept_locations, live_grams


@dataclass
class LayerStats:
    """Per-sample statistics of one layer on the Fisher mini-batch.

    Attributes:
        a: homogeneous inputs ``ā``, shape ``[N, T, d_in']``.
        g: pre-activation gradients ``δ`` of the per-sample losses, shape ``[N, T, d_out]``.
        dead: ``[N, T]``, the positions the Kronecker factors leave out (no loss term
            depends on them: :mod:`.live_positions`), or ``None``.
    """

    a: Tensor
    g: Tensor
    dead: Tensor | None = field(default=None, kw_only=True)

    @property
    def num_samples(self) -> int:
        """``N``: the number of samples."""
        return int(self.a.shape[0])

    @property
    def num_locations(self) -> int:
        """``T``: the number of locations per sample."""
        return int(self.a.shape[1])

    def nicolaides_sums(self) -> tuple[Tensor, Tensor]:
        """``1ᵀā`` and ``1ᵀδ`` per sample, location and Kronecker sub-block, ``[N, T, S]``
        each, so that ``1ᵀ∇_W̄ ℓ_n = Σ_t Σ_s`` of their product: the sums Tselepidis' coarse
        matrix factorises (``S = 1``: the layer is one ``A ⊗ G``)."""
        return self.a.sum(-1, keepdim=True), self.g.sum(-1, keepdim=True)

    def numel(self) -> int:
        """The entries of the layer's ``W̄``."""
        return int(self.a.shape[-1] * self.g.shape[-1])

    def subset(self, index: Tensor) -> LayerStats:
        """The statistics of the samples ``index`` (a 1-D index tensor)."""
        dead = None if self.dead is None else self.dead[index]
        return replace(self, a=self.a[index], g=self.g[index], dead=dead)


class BlockStats(LayerStats):
    """Statistics of a block type of its own (not ``A ⊗ G``: a norm's unit-wise block, a
    grouped convolution's blocks per group), registered as the ``statistics`` of its
    layer type (:mod:`.layer_types`). It defines the per-sample gradients (``[N, d_out,
    d_in']`` in the layout of the layer's ``W̄``), its running curvature
    (:meth:`block_factors`, folded by ``factors_type``) and the view ``weight_sharing``
    takes; the exact Fisher products of the coarse level follow from the gradients."""

    factors_type: ClassVar[Callable[[], Any]]
    # ``a`` holds ids that a cast to the layer's (half) dtype would round: captured as given
    exact_inputs: ClassVar[bool] = False
    # it has a block for a trained bias (shift) beside a frozen weight (scale): ``W̄ = b``
    bias_only: ClassVar[bool] = False
    dead_rows: ClassVar[bool] = False  # its factors leave dead positions out (live_positions)

    @classmethod
    def of(cls, module: nn.Module, a: Tensor, g: Tensor) -> BlockStats:
        """The statistics of ``module`` from its ``ā`` and ``δ`` (:func:`block_statistics`)."""
        raise NotImplementedError

    @classmethod
    def applies(cls, module: nn.Module) -> bool:
        """Whether this instance of the layer type has this block (else ``A ⊗ G``)."""
        return True

    @classmethod
    def rows(cls, module: nn.Module) -> int:
        """The rows ``d_out`` of the layer's ``W̄`` (default: the weight's first dimension)."""
        return int(layer_weight(module).shape[0])

    def sample_gradients(self) -> Tensor:
        """``∇_W̄ ℓ_n`` of every sample, ``[N, d_out, d_in']``."""
        raise NotImplementedError

    def rotated_second_moments(self, vectors_a: Tensor, vectors_g: Tensor | None) -> Tensor:
        """EKFAC's ``Σ_n (Q_Gᵀ ψ_n Q_A)²`` in the block's own eigenbases (for blocks whose
        factors give them: a grouped convolution's groups; ``Q_G = None`` for the identity
        of a large embedding table's diagonal ``G``)."""
        raise NotImplementedError(f"{type(self).__name__} has no Kronecker eigenbasis")

    def block_factors(self) -> tuple[Tensor, Tensor]:
        """This Fisher mini-batch's curvature, as ``factors_type.update`` takes it."""
        raise NotImplementedError

    def sample_dots(self, vectors: Tensor) -> Tensor:
        """``⟨r_k, ∇_W̄ ℓ_n⟩`` for ``vectors`` ``[K, d_out, d_in']``, ``[N, K]``."""
        return torch.einsum("noi,koi->nk", self.sample_gradients(), vectors)

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """``Σ_n w_n ∇_W̄ ℓ_n`` (``[N]`` weights; ``[N, K]`` give ``[K, d_out, d_in']``)."""
        pattern = "n,noi->oi" if weights.dim() == 1 else "nk,noi->koi"
        return torch.einsum(pattern, weights, self.sample_gradients())

    def reduced(self) -> LayerStats:
        """The statistics ``weight_sharing="reduce"`` forms the curvature from."""
        return self

    @classmethod
    def shapes(cls, module: nn.Module) -> tuple[tuple[int, ...], ...]:
        """The trailing shapes (after ``[N, T]``) of ``a`` and ``g``, then those of the two
        tensors of :meth:`block_factors` (distributed runs build empty ones)."""
        raise NotImplementedError

    def factor_count(self) -> int:
        """What :meth:`block_factors` averages over (``N``, or ``N·T``): ranks combine
        their factors weighted by it."""
        return self.num_samples * self.num_locations


def own_statistics(module: nn.Module) -> type[BlockStats] | None:
    """The block type of its own of ``module`` (``None``: ``A ⊗ G``)."""
    entry = layer_type(module)
    statistics = None if entry is None else entry.statistics
    return statistics if statistics is not None and statistics.applies(module) else None


def layer_stats(module: nn.Module, a: Tensor, g: Tensor) -> LayerStats:
    """The statistics object of ``module``'s block type."""
    statistics = own_statistics(module)
    return LayerStats(a, g) if statistics is None else statistics.of(module, a, g)


def new_factors(module: nn.Module) -> KroneckerFactors:
    """The running curvature of ``module``'s block: its block type's ``factors_type``
    (:class:`~.scale_shift.UnitWiseFactors` for a norm layer: the part of :class:`KroneckerFactors`'
    interface that the plain fine level and the coarse level use), else
    :class:`KroneckerFactors`, ``bordered`` when the bias trains with the weight."""
    statistics = own_statistics(module)
    if statistics is not None:
        return cast(KroneckerFactors, statistics.factors_type())
    return KroneckerFactors(bordered=has_bias(module))


def recorded_input(module: nn.Module, inputs: Tensor) -> Tensor:
    """What a layer's forward hook keeps of its input (:class:`~.layer_types.LayerType`)."""
    record = _entry(module).record
    return inputs if record is None else record(module, inputs)


def has_bias(module: nn.Module) -> bool:
    """Whether the layer's block has a bias column beside its weight: a bias that trains
    with its weight (a bias alone is the block's only column: :func:`bias_only`)."""
    return block_parameters(module)[1] is not None


def bias_only(module: nn.Module) -> bool:
    """Whether only the layer's bias trains, its weight frozen (BitFit, Ben Zaken et al.
    2022). Its block is the bias column of the ``[W, b]`` block: ``W̄ = b`` as a
    ``[d_out, 1]`` matrix with ``ā = 1``, so ``A = E[1·1] = 1`` and the block is ``1 ⊗ G``
    (a norm layer's ``β`` alone: the unit-wise Fisher of ``β``)."""
    return not layer_weight(module).requires_grad and layer_bias(module) is not None


def block_parameters(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The parameters of the layer's ``W̄``: ``(weight, bias)`` (``bias``: ``None`` when it
    does not train), or ``(bias, None)`` when only the bias trains (:func:`bias_only`):
    the first one's gradient, reshaped to ``[d_out, -1]``, gives ``W̄``'s leading columns."""
    weight, bias = layer_weight(module), layer_bias(module)
    if bias is not None and not weight.requires_grad:
        return bias, None
    return weight, bias


def _attribute(module: nn.Module, name: str) -> object:
    """``module.<name>``, its registered parameters first (``__getattr__`` is a slow path)."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name, None)


def layer_weight(module: nn.Module) -> nn.Parameter:
    """The ``weight`` parameter of a layer with a curvature block."""
    weight = _attribute(module, "weight")
    if not isinstance(weight, nn.Parameter):
        why = "pruned or parametrized after the optimizer was built? Build it after that"
        raise TypeError(f"{type(module).__name__}'s weight is not a parameter of its own ({why})")
    return weight


def layer_bias(module: nn.Module) -> nn.Parameter | None:
    """The ``bias`` parameter of a layer, or ``None`` (no bias, or a frozen one: a layer
    whose bias does not train has the block of ``W`` alone, ``ā = a`` without its 1)."""
    bias = _attribute(module, "bias")
    return bias if isinstance(bias, nn.Parameter) and bias.requires_grad else None


def input_features(module: nn.Module, inputs: Tensor) -> Tensor:
    """The inputs of a layer's type in ``[N, T, d]`` format (:mod:`.layer_types`: a
    convolution's patches, a ``Linear``'s inputs with extra leading dimensions as locations
    ``T``, an embedding's one-hot tokens)."""
    return _entry(module).features(module, inputs)


def output_gradients(module: nn.Module, grad_output: Tensor) -> Tensor:
    """The output gradients of a layer's type in ``[N, T, d]`` format (same location
    order as :func:`input_features`)."""
    return _entry(module).gradients(module, grad_output)


def block_statistics(
    module: nn.Module, inputs: Tensor, grad_output: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The block's ``(ā, δ)`` of one call: ``ā`` homogeneous (the 1 of the bias appended),
    ``[N, T, d_in']`` and ``[N, T, d_out]`` (``δ``: ``None`` without an output gradient).
    For an embedding table (rows indexed by the inputs) ``ā`` are the output gradients
    (zeros without one) and ``δ`` the one-hot inputs (:mod:`.layer_types`). A bias trained
    alone has ``ā = 1``: the features (a convolution's patches) are formed only to count
    the locations of a call without an output gradient."""
    grads = None if grad_output is None else output_gradients(module, grad_output)
    own = own_statistics(module)
    if own is None and bias_only(module):  # W̄ = b: ā = 1 alone
        counted = grads if grads is not None else input_features(module, inputs)
        return inputs.new_ones((*counted.shape[:-1], 1)), grads
    features = input_features(module, inputs)
    if own is not None:  # a block type of its own: as its type gives
        return features, grads
    if _entry(module).rows_from_inputs:
        if grads is None:
            grads = features.new_zeros(*features.shape[:2], layer_shape(module)[1])
        features, grads = grads, features
    if has_bias(module):
        features = torch.cat([features, features.new_ones((*features.shape[:-1], 1))], dim=-1)
    return features, grads


def _entry(module: nn.Module) -> LayerType:
    entry = layer_type(module)
    if entry is None:
        raise TypeError(f"unsupported layer {type(module).__name__}")
    return entry


def trains(module: nn.Module) -> bool:
    """Whether a parameter of the layer's block trains (``requires_grad``): ``False`` for a
    layer frozen whole, which nothing captures, steps or checks; its factors stay as they
    were, and unfrozen it continues from them."""
    return block_parameters(module)[0].requires_grad


def has_gradient(module: nn.Module) -> bool:
    """Whether autograd left a gradient in the layer's weight or bias this step (a layer
    frozen whole has none: a ``.grad`` it kept through ``zero_grad(set_to_none=False)`` is
    no gradient of this step)."""
    main, bias = block_parameters(module)
    if not main.requires_grad:
        return False
    return main.grad is not None or (bias is not None and bias.grad is not None)


def zero_gradient(module: nn.Module) -> bool:
    """Whether every gradient the layer's block holds is exactly zero (or ``None``): a layer
    unused this step under ``zero_grad(set_to_none=False)`` keeps a zeroed ``.grad``, and its
    direction is zero whatever its curvature (a full pass over the gradient: for the few
    layers that have no curvature yet, not for every layer at every step)."""
    return all(
        p.grad is None or not bool(p.grad.any()) for p in block_parameters(module) if p is not None
    )


def gradient_parts(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The two parts of ``∇W̄ = [∇W, ∇b]``: ``∇W`` as a ``(d_out, d_in)`` matrix (a view of
    ``weight.grad``) and ``∇b`` (``None`` without a bias); zeros for a missing ``.grad``."""
    weight, bias = block_parameters(module)
    grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    rows = weight_rows(module)
    if grad.dim() != 2 or grad.shape[0] != rows:  # a convolution, a norm over several dims
        grad = grad.reshape(rows, -1)
    if bias is None:
        return grad, None
    bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
    return grad, bias_grad.reshape(-1)  # a norm's β over several dimensions: [D]


def gradient_matrix(module: nn.Module) -> Tensor:
    """The layer's gradient as the matrix ``∇W̄ = [∇W, ∇b]`` of shape ``(d_out, d_in')``."""
    weight, bias = gradient_parts(module)
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(1)], dim=1)


def parameter_matrix(module: nn.Module) -> Tensor:
    """The layer's parameters as the matrix ``W̄ = [W, b]`` (a copy)."""
    weight, bias = block_parameters(module)
    mat = weight.detach().reshape(weight_rows(module), -1)
    if bias is not None:
        mat = torch.cat([mat, bias.detach().unsqueeze(1)], dim=1)
    return mat.clone()


def matrix_to_parameter_shapes(module: nn.Module, mat: Tensor) -> tuple[Tensor, Tensor | None]:
    """Split a ``(d_out, d_in')`` matrix back into tensors shaped like the
    :func:`block_parameters` (``weight`` and ``bias``; the bias alone when only it trains)."""
    main, bias = block_parameters(module)
    if bias is not None:
        return mat[:, :-1].reshape(main.shape), mat[:, -1].contiguous()
    return mat.reshape(main.shape), None


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in')`` of the layer's ``W̄`` matrix."""
    weight = block_parameters(module)[0]  # read from the shape: indexing would make a view
    rows = weight_rows(module)
    return rows, weight.numel() // rows + (1 if has_bias(module) else 0)


def factor_shapes(module: nn.Module) -> tuple[tuple[int, ...], ...]:
    """The shapes of the layer's running curvature as its block is now (``A`` and ``G``;
    a block type of its own says): they change when its bias or weight is frozen or
    unfrozen."""
    own = own_statistics(module)
    if own is not None:
        return own.shapes(module)[2:]
    d_out, d_in = layer_shape(module)
    return (d_in, d_in), (d_out, d_out)


def weight_rows(module: nn.Module) -> int:
    """``d_out``: the rows of the layer's ``W̄`` (the weight's first dimension; a block type
    of its own says, e.g. a norm's ``γ`` of any shape is ``D = γ.numel()`` rows)."""
    own = own_statistics(module)
    return own.rows(module) if own is not None else int(layer_weight(module).shape[0])


def kronecker_factors(stats: LayerStats) -> tuple[Tensor, Tensor]:
    """KFAC / KFC factors ``A = Σ_{n,t} ā āᵀ/(N·T)`` and ``G = Σ_{n,t} δ δᵀ/(N·T)``.

    For ``T = 1`` these are Martens & Grosse (2015) eq. (1)'s ``E[ā āᵀ]`` and ``E[δ δᵀ]``;
    for convolutions they are KFC's factors averaged over samples and locations; a
    ``Linear``'s positions that do not reach the loss are left out (:mod:`.live_positions`).
    A block type of its own gives its :meth:`BlockStats.block_factors`.
    """
    return kronecker_factors_at(stats)[:2]


def kronecker_factors_at(stats: LayerStats) -> tuple[Tensor, Tensor, int | float]:
    """:func:`kronecker_factors` with the number of locations ``T`` per sample they stand
    for (``M/N`` when positions are left out: :func:`~.live_positions.live_rows`)."""
    if isinstance(stats, BlockStats):
        return (*stats.block_factors(), kept_locations(stats))
    a_mat, g_mat, _, locations = live_grams(stats, mean=True)
    return a_mat, g_mat, locations


def kronecker_factors_as(
    stats: LayerStats, dtype: torch.dtype
) -> tuple[Tensor, Tensor, int | float]:
    """:func:`kronecker_factors_at` computed in ``dtype``."""
    return kronecker_factors_at(replace(stats, a=stats.a.to(dtype), g=stats.g.to(dtype)))
