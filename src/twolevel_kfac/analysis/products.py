"""Exact Fisher–vector products with ``torch.func``, without forming the Fisher.

With the per-sample output Jacobians ``J_n`` and output-space factors ``S_n`` of
:mod:`.exact` (``S_nS_nᵀ = H_n``, the exact expectation over the likelihood for the true
Fisher), the Fisher of the batch is ``F = (1/B) Σ_n J_nᵀ S_n S_nᵀ J_n`` and

    F v = Jᵀ w,   w_n = S_n S_nᵀ (J v)_n / B,

where ``J v`` (all samples at once, ``[B, D]``) is one forward-mode pass (``torch.func``'s
``linearize``: the jvp traced once) and ``Jᵀ w`` one reverse-mode pass through the batch's
saved graph (``torch.func.vjp``).
A product costs about three forward passes over the batch and ``O(B·D·K)`` in output space;
nothing of size ``P²`` or ``B·P`` is formed. Block products ``F_ii v_i`` (layer ``i``'s
diagonal block) are the same product with ``v`` zero outside layer ``i``, restricted to it.

These products are independent of the optimizer's statistics: the optimizer's own
``F̂``-products (:func:`twolevel_kfac.twolevel.fisher_products.damped_fvp` on the virtual-
sample statistics of :func:`.exact.fisher_statistics`) compute the same ``F``, which
:func:`statistics_mismatch` checks.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, linearize, vjp

from ..curvature.blocks import LayerStats, layer_shape
from ..twolevel.fisher_products import fisher_vector_product
from .coordinates import (
    exact_attention,
    flatten,
    from_layer_matrices,
    functional_parts,
    to_layer_matrices,
    unflatten,
)


class FisherProducts:
    """``v ↦ F v`` (flat analysis coordinates) for one batch, by ``jvp`` + ``vjp``.

    The parameters are copied at construction: later changes of the model do not affect
    the products.

    Args:
        model: the network.
        layers: the analysis layers.
        x: the batch inputs ``[B, ...]``.
        factor: ``S`` of :func:`.exact.output_factor`, ``[B, D, K]``.
    """

    def __init__(
        self, model: nn.Module, layers: dict[str, nn.Module], x: Tensor, factor: Tensor
    ) -> None:
        params, buffers, free = functional_parts(model, layers)
        self.layers = layers
        self.shapes = [layer_shape(m) for m in layers.values()]
        self.sizes = [o * i for o, i in self.shapes]
        self.factor = factor.detach()
        self.products = 0

        def outputs(sub: dict[str, Tensor]) -> Tensor:
            out = functional_call(model, ({**params, **sub}, buffers), (x,))
            return out.reshape(out.shape[0], -1)

        self._outputs = outputs
        self._free = free
        self._jvp: Callable[[dict[str, Tensor]], Tensor] | None = None
        with torch.enable_grad(), exact_attention():
            self._vjp = vjp(outputs, free)[1]

    def _jv(self, tangent: dict[str, Tensor]) -> Tensor:
        """``J v``; the jvp is traced once (``torch.func.linearize``, ~5× less overhead per
        product than ``torch.func.jvp``) on the first product."""
        if self._jvp is None:
            with warnings.catch_warnings(), exact_attention():
                warnings.simplefilter("ignore", UserWarning)  # constant folding of the graph
                _, self._jvp = linearize(self._outputs, self._free)
        return self._jvp(tangent)

    def __call__(self, v: Tensor) -> Tensor:
        """``F v`` for a flat vector ``v`` of length ``P``."""
        tangent = from_layer_matrices(self.layers, unflatten(v, self.shapes))
        jv = self._jv({k: tangent[k] for k in self._free})  # the primals' key order
        s = self.factor
        w = torch.einsum("bdk,bk->bd", s, torch.einsum("bdk,bd->bk", s, jv)) / jv.shape[0]
        (grads,) = self._vjp(w)
        self.products += 1
        return flatten(to_layer_matrices(self.layers, grads))

    def block(self, index: int, v: Tensor) -> Tensor:
        """``F_ii v_i``: the diagonal block of layer ``index`` times a vector of that layer."""
        bounds = [0, *itertools.accumulate(self.sizes)]
        lo, hi = bounds[index], bounds[index + 1]
        full = v.new_zeros(bounds[-1])
        full[lo:hi] = v
        return self(full)[lo:hi]


def statistics_mismatch(
    products: FisherProducts, stats: Sequence[LayerStats], generator: torch.Generator
) -> float:
    """``‖F_func z − F_stats z‖ / ‖F_func z‖`` for one Gaussian probe ``z``: the torch.func
    products against the optimizer's exact products on the virtual-sample statistics
    (≈ 1e-16 when both are the same Fisher)."""
    z = torch.randn(sum(products.sizes), generator=generator, dtype=products.factor.dtype)
    func = products(z)
    stats_product = flatten(fisher_vector_product(stats, unflatten(z, products.shapes)))
    norm = float(func.norm())
    return float((func - stats_product).norm()) / norm if norm else 0.0
