"""Scale-and-shift blocks: the affine parameters of ``nn.LayerNorm``, ``nn.RMSNorm``,
``nn.BatchNorm1d/2d/3d`` and ``nn.GroupNorm`` (``norm_blocks=True``; every fine level
keeps this block: it is already exact per unit, so EKFAC's rescaling in its eigenbasis
would change nothing; KPSVD and KFAC-corrected apply theirs to the Kronecker blocks).

Such a layer computes ``y_{t,i} = γ_i x̂_{t,i} + β_i`` from its normalised input ``x̂`` at
every location ``t`` (a position, a pixel) and feature ``i``. Its ``W̄`` is ``[γ, β]`` seen
as a ``[D, k]`` matrix (``k = 2``; ``k = 1`` without a trained shift, or for ``β`` alone),
and sample ``n``'s gradient of unit ``i`` is ``u_{n,i} = Σ_t δ_{n,t,i} [x̂_{n,t,i}, 1]``.
The block is the exact Fisher of each unit, ``F_i = (1/N) Σ_n u_{n,i} u_{n,i}ᵀ`` (``k × k``;
the *unit-wise* Fisher of ASDL, Osawa et al. 2023; no Kronecker approximation and no ``T``
convention: it is exact per sample), damped as ``F_i + λI`` whatever ``damping_mode`` says,
and frozen at each refresh like the Kronecker decompositions. The statistics are
:class:`~.blocks.ScaleShiftStats` (``ā = x̂``, ``δ`` the output gradient, both ``[N, T,
D]``); ``x̂`` is computed when the layer runs, on the whole batch (a training-mode BatchNorm
normalises with the batch's statistics, which are then taken as constants, as every
per-sample view of it does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import BlockStats, bias_only, has_bias, layer_weight
from .kronecker_apply import InverseOnMatrices
from .layer_types import channel_locations, register_layer_type
from .running_average import ema_weight, running_average

__all__ = [
    "NORM_TYPES",
    "ScaleShiftStats",
    "UnitWiseFactors",
    "is_scale_shift",
]


class UnitWiseFactors(InverseOnMatrices):
    """The running unit-wise Fisher ``F [D, k, k]`` of one scale-and-shift layer, with the
    copy frozen at the last refresh that the damped inverse uses (the interface of
    :class:`~.kronecker.KroneckerFactors` that the fine level and the coarse level use)."""

    def __init__(self) -> None:
        self.fisher: Tensor | None = None
        self.frozen: Tensor | None = None
        self.num_updates = 0
        self.num_locations = 1

    def update(self, new: Tensor, _unused: Tensor, ema_decay: float, num_locations: int) -> None:
        """``F ← ρ F + (1 − ρ) F_new`` (:mod:`.running_average`)."""
        self.num_updates += 1
        self.num_locations = num_locations
        self.fisher = running_average(self.fisher, new, ema_weight(self.num_updates, ema_decay))

    @property
    def ready(self) -> bool:
        """Whether ``F`` holds an estimate."""
        return self.fisher is not None

    def factor_shapes(self) -> tuple[tuple[int, ...], ...] | None:
        """The shape of ``F`` and of the empty second tensor (:meth:`ScaleShiftStats.shapes`)."""
        return None if self.fisher is None else (tuple(self.fisher.shape), (0,))

    @property
    def decomposed(self) -> bool:
        """Whether a frozen ``F`` is cached."""
        return self.frozen is not None

    def decompose(self, method: str) -> None:
        """Freeze the current ``F`` for the inverses until the next refresh."""
        assert self.fisher is not None
        self.frozen = self.fisher.clone()

    def convert_decomposition(self, method: str) -> bool:
        """Nothing to convert (no decomposition is kept)."""
        return False

    def spectral_vector(self, which: str) -> Tensor:
        """The eigenvector of the smallest (largest) eigenvalue of the block-diagonal
        ``F = diag(F_1, …, F_D)`` (the frozen one): unit ``i*``'s ``k``-vector in its row
        of ``[D, k]``, zeros elsewhere (the spectral coarse space)."""
        assert self.frozen is not None, "scale-and-shift block used before its first refresh"
        values, vectors = torch.linalg.eigh(self.frozen)  # [D, k], [D, k, k]
        flat = int(values.argmin() if which == "smallest" else values.argmax())
        unit, column = divmod(flat, values.shape[1])
        out = torch.zeros_like(values)
        out[unit] = vectors[unit, :, column]
        return out

    def apply_inverse(self, grad: Tensor, damping: float, mode: str, method: str) -> Tensor:
        """``(F_i + λI)⁻¹ u_i`` for every unit ``i`` of a ``[D, k]`` matrix."""
        assert self.frozen is not None, "scale-and-shift block used before its first refresh"
        frozen = self.frozen
        eye = torch.eye(frozen.shape[-1], dtype=frozen.dtype, device=frozen.device)
        solved = torch.linalg.solve(frozen + damping * eye, grad.to(frozen.dtype).unsqueeze(-1))
        return solved.squeeze(-1).to(grad.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint."""
        return {
            "fisher": self.fisher,
            "frozen": self.frozen,
            "num_updates": self.num_updates,
            "num_locations": self.num_locations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        for key in ("fisher", "frozen", "num_updates", "num_locations"):
            if key not in state:
                raise KeyError(f"scale-and-shift block state is missing {key!r}")
        self.fisher, self.frozen = state["fisher"], state["frozen"]
        self.num_updates = int(state["num_updates"])
        self.num_locations = int(state["num_locations"])


@dataclass
class ScaleShiftStats(BlockStats):
    """``a = x̂``, ``g = δ`` (``[N, T, D]``) of a scale-and-shift layer; ``shift``: whether
    ``β`` trains (``W̄ = [γ, β]``, ``[D, 2]``; else ``[D, 1]``); ``scale``: whether ``γ``
    trains (``W̄ = β`` alone when it does not: BitFit)."""

    factors_type: ClassVar[Callable[[], Any]] = UnitWiseFactors
    bias_only: ClassVar[bool] = True
    shift: bool = True
    scale: bool = True

    @classmethod
    def of(cls, module: nn.Module, a: Tensor, g: Tensor) -> ScaleShiftStats:
        """The statistics of ``module`` (a trained shift: ``k = 2``; ``β`` alone: ``k = 1``)."""
        alone = bias_only(module)
        return cls(a, g, has_bias(module) or alone, not alone)

    def sample_gradients(self) -> Tensor:
        """``u_{n,i} = Σ_t δ_{n,t,i} [x̂_{n,t,i}, 1]`` (the entries that train), ``[N, D, k]``."""
        parts = [(self.g * self.a).sum(1)] if self.scale else []
        return torch.stack(parts + ([self.g.sum(1)] if self.shift else []), -1)

    def nicolaides_sums(self) -> tuple[Tensor, Tensor]:
        """Unit ``i`` as a sub-block with ``ā = [x̂_i, 1]`` and ``δ_i``: ``x̂ + 1`` (``x̂``
        without a trained shift, ``1`` for ``β`` alone) and ``δ``, ``[N, T, D]`` each."""
        if not self.scale:
            return torch.ones_like(self.a), self.g
        return (self.a + 1.0 if self.shift else self.a), self.g

    def numel(self) -> int:
        """``D·k``."""
        return int(self.a.shape[-1]) * (int(self.scale) + int(self.shift))

    @classmethod
    def rows(cls, module: nn.Module) -> int:
        """``D = γ.numel()``: one row per feature, whatever ``normalized_shape`` is."""
        return int(layer_weight(module).numel())

    @classmethod
    def shapes(cls, module: nn.Module) -> tuple[tuple[int, ...], ...]:
        """``x̂`` and ``δ`` ``[D]``; ``F`` ``[D, k, k]`` and the empty tensor."""
        features, k = int(layer_weight(module).numel()), 1 + int(has_bias(module))
        return (features,), (features,), (features, k, k), (0,)

    def factor_count(self) -> int:
        """``F`` averages over the samples."""
        return self.num_samples

    def block_factors(self) -> tuple[Tensor, Tensor]:
        """``F_i = (1/N) Σ_n u_{n,i} u_{n,i}ᵀ`` (``[D, k, k]``) and an empty tensor."""
        u = self.sample_gradients()
        return torch.einsum("ndi,ndj->dij", u, u) / u.shape[0], u.new_zeros(0)


# ------------------------------------------------------------------ layer types
def _layer_norm_input(module: nn.Module, x: Tensor) -> Tensor:
    assert isinstance(module, nn.LayerNorm)
    normalised = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return _locations(normalised, _normalized_size(module))


def _normalized_size(module: nn.Module) -> int:
    shape: tuple[int, ...] = getattr(module, "normalized_shape")  # noqa: B009
    return int(torch.Size(shape).numel())


def _layer_norm_gradients(module: nn.Module, grad: Tensor) -> Tensor:
    return _locations(grad, _normalized_size(module))


def _rms_norm_input(module: nn.Module, x: Tensor) -> Tensor:
    shape: list[int] = list(getattr(module, "normalized_shape"))  # noqa: B009
    normalised = F.rms_norm(x, shape, None, getattr(module, "eps"))  # noqa: B009
    return _locations(normalised, _normalized_size(module))


def _batch_norm_input(module: nn.Module, x: Tensor) -> Tensor:
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    batch_stats = module.training or module.running_mean is None
    running = (None, None) if batch_stats else (module.running_mean, module.running_var)
    normalised = F.batch_norm(x, *running, None, None, batch_stats, 0.0, module.eps)
    return channel_locations(normalised)


def _group_norm_input(module: nn.Module, x: Tensor) -> Tensor:
    assert isinstance(module, nn.GroupNorm)
    normalised = F.group_norm(x, module.num_groups, None, None, module.eps)
    return channel_locations(normalised)


def _channels_gradients(module: nn.Module, grad: Tensor) -> Tensor:
    return channel_locations(grad)


_RMS: tuple[type[nn.Module], ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    *_RMS,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
)
"""The module types with a scale-and-shift block (``nn.RMSNorm`` from torch 2.4)."""


def is_scale_shift(module: nn.Module) -> bool:
    """Whether ``module`` is a norm layer with a scale-and-shift block."""
    return isinstance(module, NORM_TYPES)


def _identity(module: nn.Module, recorded: Tensor) -> Tensor:
    return recorded


for _type, _record, _gradients in (
    (nn.LayerNorm, _layer_norm_input, _layer_norm_gradients),
    *((rms, _rms_norm_input, _layer_norm_gradients) for rms in _RMS),
    (nn.modules.batchnorm._BatchNorm, _batch_norm_input, _channels_gradients),
    (nn.GroupNorm, _group_norm_input, _channels_gradients),
):
    register_layer_type(_type, _identity, _gradients, record=_record, statistics=ScaleShiftStats)


def _locations(tensor: Tensor, size: int) -> Tensor:
    """``[N, T, size]``: the trailing ``size`` numbers of each location (also for ``N = 0``)."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1:].numel() // size, size)
