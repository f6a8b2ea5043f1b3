"""Damped Kronecker factor pairs: running averages, decompositions, and the damped inverse.

A layer's Fisher block is approximated by ``A ⊗ G`` (column-major ``vec`` of ``W̄``), so
``(A ⊗ G) vec(V) = vec(G V A)`` and every inverse acts on the gradient matrix from both
sides. The three damping conventions (Koroko et al. 2023; README: "Optimizers and options"):

* ``per_factor``: ``[(A + λI) ⊗ (G + λI)]⁻¹``  → ``(G + λI)⁻¹ V (A + λI)⁻¹``
* ``pi``: ``[(A + π√λ I) ⊗ (G + √λ/π I)]⁻¹`` with ``π² = (tr A / dim A) / (tr G / dim G)``
  (Martens & Grosse 2015 §6.3, factored Tikhonov damping)
* ``eigen_sum``: ``(A ⊗ G + λI)⁻¹`` → ``Q_G [(Q_Gᵀ V Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ``
  (George et al. 2018; Tselepidis et al. 2020)

Damping is a call-time argument (it may follow a schedule); the decompositions are not.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, TypeVar, get_args

import torch
from torch import Tensor

from ..warning_level import caller_level
from .factor_inverse import (
    converted_decomposition,
    damped_inverse,
    decompose_factor,
    eigen_inverse,
)
from .kronecker_apply import (
    BorderedInverse,
    LayerParts,
    apply_in_eigenbasis_split,
    multiply_joined,
    multiply_split,
)
from .running_average import ema_weight, running_average, shares_memory

DampingMode = Literal["per_factor", "pi", "eigen_sum"]
InverseMethod = Literal["eigen", "cholesky"]
DAMPING_MODES: tuple[str, ...] = get_args(DampingMode)
INVERSE_METHODS: tuple[str, ...] = get_args(InverseMethod)
_T = TypeVar("_T")


def pi_ratio(trace_a: float, dim_a: int, trace_g: float, dim_g: int) -> float:
    """``π = sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse 2015 eq. (19)).

    Falls back to 1 when either factor has zero trace (a dead layer).
    """
    mean_a, mean_g = trace_a / dim_a, trace_g / dim_g
    if not (mean_a > 0 and mean_g > 0 and math.isfinite(mean_a / mean_g)):
        return 1.0
    return math.sqrt(mean_a / mean_g)


def factor_dampings(damping: float, mode: str, pi: float) -> tuple[float, float]:
    """The multiples of the identity added to ``(A, G)`` by a factored damping mode."""
    if mode == "per_factor":
        return damping, damping
    if mode == "pi":
        root = math.sqrt(damping)
        return pi * root, root / pi
    raise ValueError(f"damping_mode {mode!r} is not factored; use one of {DAMPING_MODES}")


def eigen_denominator(
    values_g: Tensor, values_a: Tensor, damping: float, mode: str, pi: float
) -> Tensor:
    """The grid ``D`` with ``(damped A ⊗ G)⁻¹ V = Q_G [(Q_Gᵀ V Q_A) ⊘ D] Q_Aᵀ``."""
    if mode == "eigen_sum":
        return torch.outer(values_g, values_a) + damping
    shift_a, shift_g = factor_dampings(damping, mode, pi)
    return torch.outer(values_g + shift_g, values_a + shift_a)


def per_location(inverse: Tensor, num_locations: float) -> Tensor:
    """``inverse / T`` (KFC's division by the number of locations); no copy for ``T = 1``
    (every ``Linear`` layer)."""
    return inverse if num_locations == 1 else inverse / num_locations


def location_count(value: object) -> float:
    """A saved number of locations ``T``: an ``int``, or a float where positions were left
    out (:func:`~.live_positions.live_rows`)."""
    count = float(value)  # type: ignore[arg-type]
    return int(count) if count.is_integer() else count


@dataclass
class KroneckerFactors:
    """Running Kronecker factors ``A`` (``d_in' × d_in'``) and ``G`` (``d_out × d_out``) of one
    layer, with the cached decomposition used to apply the damped inverse.

    ``num_locations`` is ``T`` of the last statistics: the preconditioned gradient of a
    convolution is divided by ``T`` (KFC convention, so that without damping it equals
    ``(Ω ⊗ Γ)⁻¹ g`` with ``Ω = E_n Σ_t āāᵀ``, ``Γ = E_n (1/T) Σ_t δδᵀ``).
    """

    A: Tensor | None = None
    G: Tensor | None = None
    num_updates: int = 0
    num_locations: float = 1  # T, an int but where positions are left out (live_rows)
    # The decomposition the inverse uses, frozen at the last refresh (factors keep moving
    # between refreshes): eigen → (eigenvalues, eigenvectors); cholesky → (factor, empty).
    decomp_a: tuple[Tensor, Tensor] | None = None
    decomp_g: tuple[Tensor, Tensor] | None = None
    decomp_pi: float = 1.0
    bordered: bool = False
    # (λ, mode, method, T): a fold with another T between refreshes rescales the inverse
    _cache_key: tuple[float, str, str, float] | None = field(default=None, repr=False)
    _cache: tuple[Tensor | BorderedInverse, ...] = field(default=(), repr=False)

    def update(
        self,
        new_a: Tensor,
        new_g: Tensor,
        ema_decay: float,
        num_locations: float,
        replacing: bool = False,
    ) -> None:
        """``X ← ρ X + (1 − ρ) X_new`` with ``ρ = min(1 − 1/k, ema_decay)`` (out of place
        where the frozen decomposition is the factor itself, unless ``replacing``: the
        caller decomposes these factors right after, before anything reads the frozen one,
        so the update writes it in place and no second copy is formed)."""
        self.num_updates += 1
        self.num_locations = num_locations
        rho = ema_weight(self.num_updates, ema_decay)
        decomps = () if replacing else (self.decomp_a, self.decomp_g)
        frozen = [d[0] for d in decomps if d is not None]
        self.A = running_average(self.A, new_a, rho, not shares_memory(self.A, *frozen))
        self.G = running_average(self.G, new_g, rho, not shares_memory(self.G, *frozen))

    @property
    def ready(self) -> bool:
        """Whether both factors hold an estimate."""
        return self.A is not None and self.G is not None

    def factor_shapes(self) -> tuple[tuple[int, ...], ...] | None:
        """The shapes of ``A`` and ``G`` (``None`` before the first estimate)."""
        if self.A is None or self.G is None:
            return None
        return tuple(self.A.shape), tuple(self.G.shape)

    @property
    def decomposed(self) -> bool:
        """Whether a decomposition is cached (a refresh has run since the first estimate)."""
        return self.decomp_a is not None

    def decompose(self, method: str) -> None:
        """Refresh the cached decomposition (and π) from the current factors."""
        assert self.A is not None and self.G is not None
        self.install_decomposition(
            decompose_factor(self.A, method), decompose_factor(self.G, method)
        )

    def install_decomposition(
        self, decomp_a: tuple[Tensor, Tensor], decomp_g: tuple[Tensor, Tensor]
    ) -> None:
        """Use the given decompositions of the current factors (e.g. computed on another
        rank, :mod:`twolevel_kfac.distributed`); π is recomputed from the factors."""
        assert self.A is not None and self.G is not None
        self.decomp_pi = pi_ratio(
            float(self.A.trace()), self.A.shape[0], float(self.G.trace()), self.G.shape[0]
        )
        self.decomp_a, self.decomp_g = decomp_a, decomp_g
        self._forget_inverses()

    def convert_decomposition(self, method: str) -> bool:
        """Put the cached decompositions in ``method``'s form (a checkpoint saved under the
        other ``inverse_method``): eigenpairs → the factor ``Q diag(d) Qᵀ``; a factor →
        :func:`safe_eigh`. Returns whether anything was converted."""
        changed = False
        for side in ("decomp_a", "decomp_g"):
            converted = converted_decomposition(getattr(self, side), method)
            if converted is not None:
                setattr(self, side, converted)
                changed = True
        self._forget_inverses()
        return changed

    def _forget_inverses(self) -> None:
        """Drop the cached damped inverses (a refresh or another damping replaces them):
        freed at once, they are never held beside their successors, so a refresh's peak
        holds one set of inverses, not the old and the new of the layer being inverted."""
        self._cache, self._cache_key = (), None

    def factor_shifts(self, damping: float, mode: str) -> tuple[float, float]:
        """The multiples of ``I`` a factored ``mode`` adds to ``(A, G)`` (π of the refresh)."""
        return factor_dampings(damping, mode, self.decomp_pi)

    def install_inverses(
        self, inv_a: Tensor, inv_g: Tensor, damping: float, mode: str, method: str
    ) -> None:
        """Use the given damped factor inverses ``(A + s_A I)⁻¹, (G + s_G I)⁻¹`` (e.g.
        computed on another rank) for ``damping`` in the factored ``mode``.

        Raises:
            ValueError: for ``mode="eigen_sum"``, which has no factor inverses.
        """
        if mode == "eigen_sum":
            raise ValueError("damping_mode='eigen_sum' has no Kronecker-factored inverses")
        self._cache = (per_location(inv_g, self.num_locations), self._activation_inverse(inv_a))
        self._cache_key = (damping, mode, method, self.num_locations)

    def _activation_inverse(self, inv_a: Tensor) -> Tensor | BorderedInverse:
        """The damped ``A⁻¹`` as the apply keeps it: its blocks when ``bordered``."""
        return BorderedInverse.of(inv_a) if self.bordered else inv_a

    def prepared_inverse(
        self, damping: float, mode: str, method: str
    ) -> tuple[Tensor | BorderedInverse, ...]:
        """What the damped inverse applies, cached per damping: ``((G + s_G I)⁻¹/T,
        (A + s_A I)⁻¹)`` for a factored mode (``A``'s as :class:`BorderedInverse` when
        ``bordered``), ``(Q_G, D⁻¹/T, Q_A)`` for ``eigen_sum``."""
        key = (damping, mode, method, self.num_locations)
        if self._cache_key == key:
            return self._cache
        if self.decomp_a is None or self.decomp_g is None:
            raise RuntimeError("KroneckerFactors.decompose() must run before apply_inverse()")
        self._forget_inverses()  # not held beside the new ones
        num_locations = self.num_locations
        if method == "eigen" and mode == "eigen_sum":
            (values_a, vectors_a), (values_g, vectors_g) = self.decomp_a, self.decomp_g
            grid = eigen_denominator(values_g, values_a, damping, mode, self.decomp_pi)
            self._cache = (vectors_g, per_location(grid.reciprocal_(), num_locations), vectors_a)
        else:
            # A factored damping inverts each factor on its own: two GEMMs per apply
            # instead of the eigenbasis' four.
            shift_a, shift_g = self.factor_shifts(damping, mode)
            if method == "eigen":
                inv_g = eigen_inverse(*self.decomp_g, shift_g)
                inv_a = eigen_inverse(*self.decomp_a, shift_a)
            else:
                inv_g = damped_inverse(self.decomp_g[0], shift_g)
                inv_a = damped_inverse(self.decomp_a[0], shift_a)
            self._cache = (per_location(inv_g, num_locations), self._activation_inverse(inv_a))
        self._cache_key = key
        return self._cache

    def apply_inverse(self, grad: Tensor, damping: float, mode: str, method: str) -> Tensor:
        """The damped ``(A ⊗ G)⁻¹`` (divided by ``T``) applied to a ``(d_out, d_in')`` matrix."""
        return self.apply_inverse_split(grad, None, damping, mode, method)[0]

    def apply_inverse_outer(
        self, left: Tensor, right: Tensor, damping: float, mode: str, method: str
    ) -> Tensor | tuple[Tensor, Tensor]:
        """:meth:`apply_inverse` of the rank-one ``u vᵀ``: for a factored damping the pair
        ``(G⁻¹u/T, A⁻¹v)`` whose outer product it is (``A⁻¹`` is symmetric), two mat-vecs
        instead of two GEMMs, in ``left``'s dtype; for ``eigen_sum`` the matrix."""
        cache = self.prepared_inverse(damping, mode, method)
        if len(cache) == 3:
            return self.apply_inverse(torch.outer(left, right), damping, mode, method)
        inv_g, inv_a = cache
        assert isinstance(inv_g, Tensor)
        dtype = inv_g.dtype
        right = right.to(dtype)
        product = inv_a.matvec(right) if isinstance(inv_a, BorderedInverse) else inv_a @ right
        return (inv_g @ left.to(dtype)).to(left.dtype), product.to(left.dtype)

    def apply_inverse_split(
        self,
        weight: Tensor,
        bias: Tensor | None,
        damping: float,
        mode: str,
        method: str,
        out: LayerParts | None = None,
    ) -> LayerParts:
        """:meth:`apply_inverse` on ``W̄ = [weight, bias]`` given as its parts (``weight``
        ``(d_out, d_in)``, ``bias`` ``(d_out,)`` or ``None``), returning the parts of the
        result, computed in the factors' dtype and returned in ``weight``'s: the damped
        inverse without concatenating the gradient or splitting the direction.

        ``out``: tensors of the parts' shapes to write the result into, which may be
        ``(weight, bias)`` themselves (the gradient is read before the direction is
        written over it)."""
        cache = self.prepared_inverse(damping, mode, method)
        first = cache[0]
        assert isinstance(first, Tensor)
        dtype = first.dtype
        w = weight if weight.dtype == dtype else weight.to(dtype)  # `.to` costs a call
        b = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
        if len(cache) == 3:
            out_w, out_b = apply_in_eigenbasis_split(*cache, w, b, out)  # type: ignore[arg-type]
        else:
            inv_a = cache[1]
            if isinstance(inv_a, BorderedInverse):
                out_w, out_b = _right_bordered(first, inv_a, w, b, out)
            else:
                joined = multiply_joined(first, w, b)
                out_w, out_b = multiply_split(joined, inv_a, b is not None, out)
        if out_w.dtype == weight.dtype and (out_b is None or out_b.dtype == weight.dtype):
            return out_w, out_b
        return out_w.to(weight.dtype), None if out_b is None else out_b.to(weight.dtype)

    def state_dict(self) -> dict[str, object]:
        """The state to checkpoint (restored by :meth:`load_state_dict`)."""
        return {
            "A": self.A,
            "G": self.G,
            "num_updates": self.num_updates,
            "num_locations": self.num_locations,
            "decomp_a": self.decomp_a,
            "decomp_g": self.decomp_g,
            "decomp_pi": self.decomp_pi,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a :meth:`state_dict`."""
        for name in self.state_dict():
            if name not in state:
                raise KeyError(f"Kronecker factor state is missing {name!r}")
        self.A, self.G = state["A"], state["G"]  # type: ignore[assignment]
        self.num_updates = int(state["num_updates"])  # type: ignore[call-overload]
        self.num_locations = location_count(state["num_locations"])
        self.decomp_a = _as_pair(state["decomp_a"])
        self.decomp_g = _as_pair(state["decomp_g"])
        self.decomp_pi = float(state["decomp_pi"])  # type: ignore[arg-type]
        self._forget_inverses()


def _right_bordered(
    inv_g: Tensor, inv_a: BorderedInverse, w: Tensor, b: Tensor | None, out: LayerParts | None
) -> LayerParts:
    """``G⁻¹ [w, b] A⁻¹`` with ``A⁻¹`` in blocks: the left products to contiguous tensors,
    the right one by :meth:`BorderedInverse.right_parts`; ``b = None``: ``w`` is a whole
    ``W̄`` (its last column the bias')."""
    if b is not None:
        return inv_a.right_parts(inv_g @ w, inv_g @ b, out)
    result = inv_a.right(inv_g @ w)
    if out is None:
        return result, None
    out[0].copy_(result)
    return out


def _as_pair(value: object) -> tuple[Tensor, Tensor] | None:
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return (value[0], value[1])
    warnings.warn(
        "ignoring a malformed cached decomposition in the state dict", stacklevel=caller_level()
    )
    return None
