"""Data-parallel KFAC and two-level KFAC over :mod:`torch.distributed` (all communication).

When ``torch.distributed`` is initialised, :class:`~twolevel_kfac.KFAC` and
:class:`~twolevel_kfac.TwoLevelKFAC` reduce their curvature over ``process_group`` (default:
the world group); the model is wrapped in ``DistributedDataParallel`` (DDP), so ``p.grad``
is already the average over the ranks when ``step()`` runs. One step on ``W`` ranks, rank
``r`` holding ``B_r`` rows of the global batch:

1. **Statistics.** Each rank captures ``ā`` and ``δ`` of its own Fisher mini-batch rows.
   ``δ_n = ∂ℓ_n/∂s_n`` is per sample (empirical: ``B_r·∂L_r/∂s_n`` with ``L_r`` the mean
   loss over the *local* batch, which DDP does not rescale; mc: the sampled per-sample NLL),
   so the global Fisher mini-batch is the union of the local ones (with ``fisher_batch < 1``
   each rank keeps ``round(fisher_batch·B_r)`` of its rows). A layer that some ranks'
   forwards skip, or whose rows are gathered from the batch's (an expert's tokens), has
   its ``δ`` scaled by ``√(M/N)`` (``M`` its rows, ``N`` the samples, both summed over the
   ranks by a first all-reduce of ``L + 1`` integers: :func:`step_totals`), so the ranks'
   statistics together are one process's of the whole batch.
2. **Factors.** Each rank packs the upper triangles of its sums ``Σ āāᵀ``, ``Σ δδᵀ`` of all
   layers into one buffer; one all-reduce of it and one of the counts give
   ``A = Σ_r Σ āāᵀ / Σ_r N_r T``: the whole batch's factors, exact for unequal local
   batches too (DDP's gradient is then not the global mean gradient: warned).
3. **Decompositions.** ``distributed_inverses="split"``: each factor (``A`` or ``G`` of a
   layer) is owned by one rank, assigned greedily by cost ``d³`` (largest first, to the
   least-loaded rank); the owner computes its eigendecomposition (``d + d²`` numbers) or,
   for ``inverse_method="cholesky"``, its damped inverse (a packed triangle), and one
   all-gather shares them. ``"replicate"``: every rank decomposes every factor (no traffic).
4. **Two-level.** The coarse level uses the exact Fisher of the global Fisher mini-batch,
   ``F = (1/N) Σ_n ∇ℓ_n∇ℓ_nᵀ`` with ``N = Σ_r N_r``; everything it needs is a sum over
   samples: the coarse matrix ``(1/N) PᵀP + λR₀R₀ᵀ`` (all-reduce the packed local ``PᵀP``),
   Tselepidis' matrix (its two ``L×L`` sum matrices) and each Fisher–vector product
   ``(1/N) Σ_n c_n∇ℓ_n`` (residual bases, A-DEF1/2, balanced: the local weighted gradient
   sums, one layer vector). The pure functions of :mod:`twolevel_kfac.twolevel` stay
   single-process; :mod:`twolevel_kfac.optim.twolevel` sums their per-sample terms with
   :func:`all_reduce_sum` (:mod:`twolevel_kfac.twolevel.global_fisher`).
5. The rest (KL clipping, combinations, momentum) has the same inputs on every rank.

Bytes per rank handed to collectives (``e`` = bytes per factor element; ``L`` layers;
``d_A, d_G`` factor sizes; ``K`` coarse vectors; ``P`` preconditioned parameters):
factor refresh ``e·Σ_l [d_A(d_A+1) + d_G(d_G+1)]/2 + 8·(4L+5)`` (the counts, the rows of
each layer's statistics and the gradients' checksum); split decomposition
``e·max_r Σ_{f owned by r} (d_f² + d_f)`` (cholesky: ``d_f(d_f+1)/2``); coarse matrix
``e·K(K+1)/2`` (Tselepidis ``e·L(L+1)``); ``e·P`` per Fisher–vector product. A ring
all-reduce puts ``2(W−1)/W`` times its payload on the wire, an all-gather ``W−1`` times.
:attr:`Communicator.payload_bytes` counts them (``last_stats["comm_bytes"]`` per step).

**Seeding**: rank ``r``'s sampler is seeded :func:`step_seed` ``(seed, r, k)`` before the
draws of step ``k`` (reproducible for a fixed world size and data split), so it holds no
state to save. **Checkpoints**: ``state_dict()`` is no collective (save on rank 0 alone: its
state restores every rank) unless a two-level level's steps read the Fisher mini-batch
between refreshes (A-DEF1/2, BALANCED, the faithful schedule, diagnostics): each rank holds
its own rows, so every rank must call it, and it gathers them into ``state["ranks"]``.
Another world size re-splits the rows (warned).
**Blocks of their own** (norms, grouped convolutions: :class:`~twolevel_kfac.
curvature.blocks.BlockStats`) reduce their factors weighted by their counts, and are
decomposed by every rank (they are small).
"""

from __future__ import annotations

from .communicator import (
    Communicator,
    all_reduce_sum,
    make_communicator,
    pack_symmetric,
    rank_seed,
    step_seed,
    unpack_symmetric,
    unwrap_model,
)
from .decompositions import (
    assign_owners,
    share_decompositions,
    share_owned,
)
from .factors import (
    LayerSpec,
    ReducedStatistics,
    gradient_checksum,
    layer_specs,
    reduce_statistics,
    step_totals,
)

__all__ = [
    "Communicator",
    "LayerSpec",
    "ReducedStatistics",
    "all_reduce_sum",
    "assign_owners",
    "gradient_checksum",
    "layer_specs",
    "make_communicator",
    "pack_symmetric",
    "rank_seed",
    "reduce_statistics",
    "share_decompositions",
    "share_owned",
    "step_seed",
    "step_totals",
    "unpack_symmetric",
    "unwrap_model",
]
