"""Convolutions: KFC (Grosse & Martens 2016), one Kronecker block per group.

A convolution with ``groups = 1`` is a ``Linear`` on the input patches (:func:`~.layer_types.
conv_patches`): its locations are the output positions. With ``G > 1`` groups, the output
channels of group ``g`` see only the input channels of group ``g``: its weight rows
``W_g`` (``C_out/G`` of them, ``[W.reshape(C_out, -1), b]`` stacked group after group) get
a block of their own, ``A_g ⊗ G_g`` from group ``g``'s patches ``ā_g`` and output gradients
``δ_g`` (a depthwise convolution has ``C_in`` blocks with ``G_g`` of size 1). The blocks
are exact KFC blocks of each group, damped and inverted as every ``A ⊗ G``
(:class:`GroupedFactors` holds one :class:`~.kronecker.KroneckerFactors` per group, and
gives EKFAC their eigenbases stacked).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .blocks import BlockStats, has_bias
from .extreme_eigen import frozen_eigenpairs
from .factor_inverse import batched_eigh
from .kronecker import KroneckerFactors, eigen_denominator
from .kronecker_apply import InverseOnMatrices
from .layer_types import channel_locations, conv_patches, register_layer_type

__all__ = ["GroupedFactors", "GroupedStats"]


class GroupedFactors(InverseOnMatrices):
    """One :class:`KroneckerFactors` per group of a grouped convolution; the damped inverse
    of each acts on its group's rows of ``W̄`` (the interface the plain fine level and the
    coarse level use)."""

    def __init__(self) -> None:
        self.groups: list[KroneckerFactors] = []
        # every group's prepared inverse, stacked for batched products (per damping)
        self._stack_key: tuple[float, str, str] | None = None
        self._stack: tuple[Tensor, ...] = ()

    def update(self, new_a: Tensor, new_g: Tensor, ema_decay: float, num_locations: int) -> None:
        """Fold each group's ``(A_g, G_g)`` (``[G, ·, ·]``) into its running factors."""
        if not self.groups:
            self.groups = [KroneckerFactors() for _ in range(new_a.shape[0])]
        for factors, a, g in zip(self.groups, new_a, new_g, strict=True):
            factors.update(a, g, ema_decay, num_locations)

    @property
    def ready(self) -> bool:
        """Whether every group holds an estimate."""
        return bool(self.groups) and all(f.ready for f in self.groups)

    def factor_shapes(self) -> tuple[tuple[int, ...], ...] | None:
        """``[G, ·, ·]`` of the groups' ``A`` and ``G`` (``None`` before an estimate)."""
        first = self.groups[0].factor_shapes() if self.groups else None
        return None if first is None else tuple((len(self.groups), *shape) for shape in first)

    @property
    def decomposed(self) -> bool:
        """Whether every group's decomposition is cached."""
        return bool(self.groups) and all(f.decomposed for f in self.groups)

    def decompose(self, method: str) -> None:
        """Decompose every group's factors: for ``eigen`` one batched ``eigh`` per side
        (:func:`~.factor_inverse.batched_eigh`; a depthwise layer of 256 channels took
        46 ms one group at a time, 9 ms batched), group by group where that fails."""
        self._stack_key = None
        if method == "eigen" and self.groups:
            side_a = batched_eigh(torch.stack([f.A for f in self.groups]))  # type: ignore[misc]
            side_g = batched_eigh(torch.stack([f.G for f in self.groups]))  # type: ignore[misc]
            if side_a is not None and side_g is not None:
                (vals_a, vecs_a), (vals_g, vecs_g) = side_a, side_g
                for i, factors in enumerate(self.groups):
                    factors.install_decomposition((vals_a[i], vecs_a[i]), (vals_g[i], vecs_g[i]))
                return
        for factors in self.groups:
            factors.decompose(method)

    def convert_decomposition(self, method: str) -> bool:
        """Convert every group's decompositions to ``method``; whether any changed."""
        self._stack_key = None
        return any([f.convert_decomposition(method) for f in self.groups])

    def apply_inverse(self, grad: Tensor, damping: float, mode: str, method: str) -> Tensor:
        """Each group's damped ``(A_g ⊗ G_g)⁻¹`` (divided by ``T``) on its rows, as one
        batched product over the groups: ``G_g⁻¹ V_g A_g⁻¹`` for a factored damping,
        ``Q_G [(Q_Gᵀ V_g Q_A) ⊙ D⁻¹] Q_Aᵀ`` for ``eigen_sum``."""
        stack = self._stacked(damping, mode, method)
        v = grad.to(stack[0].dtype).reshape(len(self.groups), -1, grad.shape[1])
        if len(stack) == 2:
            inv_g, inv_a = stack
            out = inv_g @ v @ inv_a
        else:
            vectors_g, inverse_grid, vectors_a = stack
            rotated = vectors_g.transpose(1, 2) @ v @ vectors_a
            out = vectors_g @ (rotated * inverse_grid) @ vectors_a.transpose(1, 2)
        return out.reshape(grad.shape).to(grad.dtype)

    @property
    def num_locations(self) -> float:
        """``T`` of the last statistics (the same for every group)."""
        return self.groups[0].num_locations if self.groups else 1

    def stacked_eigenbasis(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """Every group's ``(d_A, Q_A, d_G, Q_G)`` stacked (``[G, ·]``, ``[G, ·, ·]``), or
        ``None`` without eigendecompositions (EKFAC's basis, :mod:`twolevel_kfac.optim.
        ekfac`)."""
        if not self.groups or any(f.decomp_a is None or f.decomp_g is None for f in self.groups):
            return None
        pairs = [(*f.decomp_a, *f.decomp_g) for f in self.groups]  # type: ignore[misc]
        vals_a, vecs_a, vals_g, vecs_g = (torch.stack(parts) for parts in zip(*pairs, strict=True))
        return vals_a, vecs_a, vals_g, vecs_g

    def stacked_denominator(self, damping: float, mode: str) -> Tensor:
        """Every group's damped eigenvalue grid (:func:`~.kronecker.eigen_denominator`, its
        own ``π``), ``[G, C_out/G, d_in']``."""
        grids = []
        for f in self.groups:
            assert f.decomp_a is not None and f.decomp_g is not None
            values_a, values_g = f.decomp_a[0], f.decomp_g[0]
            grids.append(eigen_denominator(values_g, values_a, damping, mode, f.decomp_pi))
        return torch.stack(grids)

    def spectral_vector(self, which: str) -> Tensor:
        """The eigenvector of the smallest (largest) eigenvalue of the block-diagonal
        ``diag(A_g ⊗ G_g)``: ``q_G q_Aᵀ`` of the group whose product of extreme factor
        eigenvalues is the smallest (largest), in its rows, zeros elsewhere (from the
        groups' eigenpairs, or each factor's one extreme pair under Cholesky:
        :func:`~.extreme_eigen.frozen_eigenpairs`)."""
        pick = torch.argmin if which == "smallest" else torch.argmax
        extremes, vectors = [], []
        for factors in self.groups:
            assert factors.decomp_a is not None and factors.decomp_g is not None
            vals_a, vecs_a = frozen_eigenpairs(factors.decomp_a, which)
            vals_g, vecs_g = frozen_eigenpairs(factors.decomp_g, which)
            i, j = int(pick(vals_a)), int(pick(vals_g))
            extremes.append(float(vals_a[i] * vals_g[j]))
            vectors.append(torch.outer(vecs_g[:, j], vecs_a[:, i]))
        best = int(pick(torch.tensor(extremes)))
        out = torch.zeros(len(self.groups), *vectors[0].shape, dtype=vectors[0].dtype,
                          device=vectors[0].device)  # fmt: skip
        out[best] = vectors[best]
        return out.reshape(-1, vectors[0].shape[1])

    def _stacked(self, damping: float, mode: str, method: str) -> tuple[Tensor, ...]:
        """Every group's prepared inverse (:class:`KroneckerFactors`), stacked; rebuilt
        after a refresh or for another damping."""
        key = (damping, mode, method)
        if self._stack_key != key:
            prepared = [f.prepared_inverse(damping, mode, method) for f in self.groups]
            self._stack = tuple(torch.stack(parts) for parts in zip(*prepared, strict=True))
            self._stack_key = key
        return self._stack

    def state_dict(self) -> dict[str, Any]:
        """Every group's state."""
        return {"groups": [f.state_dict() for f in self.groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        if "groups" not in state:
            raise KeyError("grouped convolution state is missing 'groups'")
        self.groups, self._stack_key = [], None
        for saved in state["groups"]:
            factors = KroneckerFactors()
            factors.load_state_dict(saved)
            self.groups.append(factors)


@dataclass
class GroupedStats(BlockStats):
    """``ā_g`` ``[N, T, G, d_in']`` (each group's patches, with the bias' 1) and ``δ_g``
    ``[N, T, G, C_out/G]`` of a grouped convolution."""

    factors_type: ClassVar[Callable[[], Any]] = GroupedFactors

    @classmethod
    def of(cls, module: nn.Module, a: Tensor, g: Tensor) -> GroupedStats:
        """The statistics of a grouped convolution."""
        return cls(a, g)

    @classmethod
    def applies(cls, module: nn.Module) -> bool:
        """Only convolutions with ``groups > 1`` (the others are one ``A ⊗ G``)."""
        return getattr(module, "groups", 1) > 1

    @classmethod
    def shapes(cls, module: nn.Module) -> tuple[tuple[int, ...], ...]:
        """``ā_g`` ``[G, d_in']``, ``δ_g`` ``[G, C_out/G]``, ``A`` ``[G, d_in', d_in']``,
        ``G`` ``[G, C_out/G, C_out/G]``."""
        assert isinstance(module, nn.modules.conv._ConvNd)
        groups = module.groups
        d_in = module.weight[0].numel() + int(has_bias(module))
        d_out = module.out_channels // groups
        return (groups, d_in), (groups, d_out), (groups, d_in, d_in), (groups, d_out, d_out)

    def nicolaides_sums(self) -> tuple[Tensor, Tensor]:
        """``1ᵀā_g``, ``1ᵀδ_g``: one Kronecker sub-block per group, ``[N, T, G]`` each."""
        return self.a.sum(-1), self.g.sum(-1)

    def numel(self) -> int:
        """``G · d_in' · C_out/G``."""
        return int(self.a.shape[-2] * self.a.shape[-1] * self.g.shape[-1])

    def sample_gradients(self) -> Tensor:
        """``∇_W̄ ℓ_n``: group ``g``'s rows are ``Σ_t δ_{n,t,g} ā_{n,t,g}ᵀ``."""
        grads = torch.einsum("ntgo,ntgi->ngoi", self.g, self.a)
        return grads.flatten(1, 2)  # [N, G·C_out/G, d_in'] (also for N = 0)

    def rotated_second_moments(self, vectors_a: Tensor, vectors_g: Tensor | None) -> Tensor:
        """``Σ_n (Q_Gᵀ ψ_{n,g} Q_A)²`` per group (``[G, C_out/G, d_in']``; ``Q`` stacked
        ``[G, ·, ·]``): EKFAC's scalings of each group's block, summed over these samples
        (:func:`~.persample.rotated_second_moments` of every group at once)."""
        assert vectors_g is not None
        rotated_a = torch.einsum("ntgi,gij->ntgj", self.a, vectors_a)
        rotated_g = torch.einsum("ntgo,gop->ntgp", self.g, vectors_g)
        total = rotated_a.new_zeros(vectors_g.shape[0], vectors_g.shape[1], vectors_a.shape[1])
        step = max(1, (1 << 22) // max(1, total.numel()))  # samples per chunk of ψ
        for start in range(0, rotated_a.shape[0], step):
            chunk = slice(start, start + step)
            psi = torch.einsum("ntgp,ntgj->ngpj", rotated_g[chunk], rotated_a[chunk])
            total += psi.square().sum(0)
        return total

    def block_factors(self) -> tuple[Tensor, Tensor]:
        """``A_g``, ``G_g`` (``[G, ·, ·]``) averaged over samples and locations."""
        count = self.a.shape[0] * self.a.shape[1]
        return group_moments(self.a, count), group_moments(self.g, count)

    def reduced(self) -> GroupedStats:
        """``weight_sharing="reduce"``: mean patch and summed output gradient per sample."""
        return GroupedStats(self.a.mean(1, keepdim=True), self.g.sum(1, keepdim=True))


def group_moments(x: Tensor, count: int) -> Tensor:
    """``Σ_{n,t} x_{n,t,g} x_{n,t,g}ᵀ / count`` per group ``g`` of ``x`` ``[N, T, G, d]``.

    Where ``x`` lies in im2col's order (``[N, G, d, T]`` in memory, as :func:`_features`
    and :func:`_gradients` leave it for ``d ≤ T``), one batched product per ``(n, g)``
    reads it in place (``N·G·d²`` numbers of partial sums, at most ``x``'s size);
    otherwise ``einsum`` contracts ``(n, t)`` at once.
    """
    n, locations, groups, d = x.shape
    native = x.permute(0, 2, 3, 1)
    if d <= locations and native.is_contiguous():
        flat = native.reshape(n * groups, d, locations)
        return (flat @ flat.transpose(1, 2)).view(n, groups, d, d).sum(0) / count
    return torch.einsum("ntgi,ntgj->gij", x, x) / count


def _features(module: nn.Module, inputs: Tensor) -> Tensor:
    """The patches (``groups = 1``); per group, each with the bias' 1 (``groups > 1``),
    ``[N, T, G, d_in']``: for ``d_in' ≤ T`` (a depthwise convolution) a view of one copy
    in im2col's order ``[N, G, d_in', T]``, which :func:`group_moments` reads in place."""
    patches = conv_patches(module, inputs)
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return patches
    n, locations, width = patches.shape
    grouped = patches.unflatten(2, (groups, width // groups))
    if not has_bias(module):
        return grouped
    if width // groups + 1 > locations:
        return torch.cat([grouped, grouped.new_ones((*grouped.shape[:-1], 1))], dim=-1)
    out = patches.new_empty(n, groups, width // groups + 1, locations)
    out[:, :, :-1].copy_(grouped.permute(0, 2, 3, 1))
    out[:, :, -1] = 1.0
    return out.permute(0, 3, 1, 2)


def _gradients(module: nn.Module, grad_output: Tensor) -> Tensor:
    """``δ`` at the output positions (``[N, T, C_out]``; per group ``[N, T, G, C_out/G]``)."""
    grads = channel_locations(grad_output)
    groups = getattr(module, "groups", 1)
    return grads if groups == 1 else grads.reshape(*grads.shape[:2], groups, -1)


for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):  # (any padding_mode: conv_patches pads so)
    register_layer_type(_conv, _features, _gradients, statistics=GroupedStats)
# ConvTranspose*d subclass _ConvNd, not Conv*d: they stay unregistered.
