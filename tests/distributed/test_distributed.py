"""Data-parallel KFAC and two-level KFAC: two gloo processes on localhost, each with half of
the batch and the model in ``DistributedDataParallel``, against one process on the whole
batch (float64, relative error ≤ 1e-9), plus distributed resume and unequal local batches.

The model mixes Conv2d, Linear and BatchNorm. The BatchNorm layer is in eval mode: in train
mode its batch statistics couple the samples, so per-sample gradients (and with them the
exact Fisher and the single-process oracle) are not defined, and the two halves would
normalise with different statistics than the whole batch. ``SyncBatchNorm`` would make the
forward equal the whole batch's, but it needs CUDA, and these tests run on CPU with gloo.

All distributed runs happen in one pair of worker processes per module (``fork``ed after
the parent imported ``torch._dynamo``, which DDP needs and which takes seconds to import);
the tests compare their saved results.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import twolevel_kfac as tk
from test_kfac_exact import CONTRACT, make_batch, mixed_net, prepare
from twolevel_kfac.distributed import (
    Communicator,
    assign_owners,
    make_communicator,
    pack_symmetric,
    rank_seed,
    unpack_symmetric,
)
from worker_pair import run_ranks

WORLD = 2
BATCH = 8
SHAPE, CLASSES = (2, 6, 6), 3
# name: (optimizer class, extra arguments on top of CONTRACT and damping=0.05)
CASES: dict[str, tuple[type[tk.KFAC], dict[str, Any]]] = {
    "kfac_per_factor": (tk.KFAC, {"damping_mode": "per_factor"}),
    "kfac_pi": (tk.KFAC, {"damping_mode": "pi"}),
    "kfac_eigen_sum": (tk.KFAC, {"damping_mode": "eigen_sum"}),
    "kfac_cholesky_pi": (tk.KFAC, {"damping_mode": "pi", "inverse_method": "cholesky"}),
    "kfac_replicate": (tk.KFAC, {"distributed_inverses": "replicate"}),
    "kfac_subgroup": (tk.KFAC, {"process_group": "new_group"}),
    "nicolaides_additive": (tk.TwoLevelKFAC, {"coarse_space": "nicolaides"}),
    "nicolaides_adef2": (tk.TwoLevelKFAC, {"combination": "adef2"}),
    "residual_additive": (tk.TwoLevelKFAC, {"coarse_space": "residual"}),
    "residual_adef2": (tk.TwoLevelKFAC, {"coarse_space": "residual", "combination": "adef2"}),
    "tselepidis_additive": (tk.TwoLevelKFAC, {"coarse_space": "tselepidis"}),
    "spectral_balanced": (
        tk.TwoLevelKFAC,
        {"coarse_space": "spectral", "combination": "balanced", "damping_mode": "eigen_sum"},
    ),
    "krylov_residual_adef1": (
        tk.TwoLevelKFAC,
        {"coarse_space": "krylov_residual", "combination": "adef1", "damping_mode": "pi"},
    ),
    # MultiheadAttention and a TransformerEncoderLayer (its LayerNorms take the fallback)
    "transformer_kfac": (tk.KFAC, {"net": "transformer"}),
    "transformer_nicolaides_adef2": (
        tk.TwoLevelKFAC,
        {"net": "transformer", "combination": "adef2"},
    ),
    "transformer_adamw_fallback": (tk.KFAC, {"net": "transformer", "fallback": "adamw"}),
    # blocks of their own: the encoder's LayerNorms, a grouped convolution and GroupNorm
    "transformer_norm_blocks": (tk.KFAC, {"net": "transformer", "norm_blocks": True}),
    "grouped_norm_blocks": (tk.KFAC, {"net": "grouped", "norm_blocks": True}),
    "grouped_residual_adef2": (
        tk.TwoLevelKFAC,
        {"net": "grouped", "norm_blocks": True, "coarse_space": "residual", "combination": "adef2"},
    ),
    "grouped_ekfac": (tk.EKFAC, {"net": "grouped", "norm_blocks": True}),
    "grouped_tselepidis": (
        tk.TwoLevelKFAC,
        {"net": "grouped", "norm_blocks": True, "coarse_space": "tselepidis"},
    ),
    # an embedding table over 4096 rows: its diagonal token-frequency factor
    "big_table_kfac": (tk.KFAC, {"net": "big_table"}),
    # an embedding's padding row: outside the coarse space on every rank
    "padded_nicolaides_adef1": (
        tk.TwoLevelKFAC,
        {"net": "padded", "combination": "adef1"},
    ),
    "big_table_residual_adef2": (
        tk.TwoLevelKFAC,
        {"net": "big_table", "coarse_space": "residual", "combination": "adef2"},
    ),
    # BitFit: every weight frozen but the head's; biases and the norms' shifts alone
    "bitfit_adef2": (
        tk.TwoLevelKFAC,
        {"net": "bitfit", "norm_blocks": True, "combination": "adef2"},
    ),
}
# Training settings of the resume runs: every moving part (MC sampling of a Fisher subset,
# running averages, refreshes every 2 steps, momentum, KL clipping).
RESUME = {
    "lr": 0.1,
    "damping": 0.05,
    "fisher": "mc",
    "fisher_batch": 0.5,
    "ema_decay": 0.9,
    "cov_interval": 2,
    "inv_interval": 2,
    "momentum": 0.9,
    "kl_clip": 1e-2,
}
# Two steps, the second between refreshes: A-DEF1/A-DEF2/balanced read W = F̂R₀ᵀ there,
# the same on every rank (no collective), or the rows (one collective per product).
BETWEEN = {"cov_interval": 2, "inv_interval": 2, "lr": 0.5}
BETWEEN_CASES: dict[str, dict[str, Any]] = {
    "columns_adef2": {"combination": "adef2", "kept_fisher": "columns"},
    "columns_balanced": {"coarse_space": "residual", "combination": "balanced",
                         "kept_fisher": "columns"},
    "rows_adef1": {"combination": "adef1", "kept_fisher": "rows"},
    "transformer_columns_adef1": {"net": "transformer", "combination": "adef1",
                                  "kept_fisher": "columns"},
    # "auto" decides on the ranks' summed row counts (a collective: every rank alike)
    "auto_adef2": {"combination": "adef2", "kept_fisher": "auto"},
    "auto_balanced_long": {"combination": "balanced", "kept_fisher": "auto", "cov_interval": 5},
    # a residual basis rebuilt at every step on parts, its F̂ product summed over the ranks
    "faithful_additive": {"coarse_space": "residual", "coarse_refresh": "faithful",
                          "kept_fisher": "auto"},
    "faithful_krylov_additive": {"coarse_space": "krylov_residual", "coarse_refresh": "faithful",
                                 "kept_fisher": "auto"},
}  # fmt: skip
KEEPS_BATCH = {"diagnostics": True}  # F̂v below needs the Fisher mini-batch kept
# a rank with an empty local batch: MC targets; grouped convolution and GroupNorm blocks;
# attention and LayerNorm blocks
EMPTY_CASES: dict[str, dict[str, Any]] = {
    "mixed": {},
    "mixed_mc": {"fisher": "mc"},
    "grouped": {"net": "grouped", "norm_blocks": True},
    "transformer": {"net": "transformer", "norm_blocks": True, "combination": "adef2"},
}
RESUME_CASES: dict[str, tuple[type[tk.KFAC], dict[str, Any]]] = {
    "kfac": (tk.KFAC, {}),
    "residual_adef2_faithful": (
        tk.TwoLevelKFAC,
        {"coarse_space": "residual", "combination": "adef2", "coarse_refresh": "faithful"},
    ),
    "residual_additive_faithful": (
        tk.TwoLevelKFAC,
        {"coarse_space": "residual", "coarse_refresh": "faithful"},
    ),
    "columns_balanced": (tk.TwoLevelKFAC, {"combination": "balanced", "kept_fisher": "columns"}),
}


# ------------------------------------------------------------------ shared helpers
class TransformerNet(nn.Module):
    """``[B, 2, 6, 6]`` read as 12 tokens of width 6 (plus an ``Embedding`` of a token id
    derived from each): ``Linear → MultiheadAttention (+ residual) →
    TransformerEncoderLayer → mean over tokens → Linear``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Linear(6, 8)
        self.tokens = nn.Embedding(10, 8)  # a token id per position, from the input
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.flatten(1, 2)
        ids = (2 * seq[..., 0]).floor().clamp(-5, 4).long() + 5
        h = self.embed(seq) + self.tokens(ids)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head(self.encoder(h).mean(dim=1))


class BigTableNet(TransformerNet):
    """:class:`TransformerNet` with a 5,000-row token table (ids 0 … 9 of it are used)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(5000, 8)


class PaddedNet(TransformerNet):
    """:class:`TransformerNet` whose token table pads with id 5 (the inputs' middle id)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(10, 8, padding_idx=5)


def bitfit_net() -> nn.Module:
    """:class:`TransformerNet` with every weight frozen but the head's (BitFit)."""
    model = TransformerNet()
    for name, param in model.named_parameters():
        if "weight" in name and not name.startswith("head."):
            param.requires_grad_(False)
    return model


def grouped_net() -> nn.Module:
    """A grouped convolution (2 groups) and a GroupNorm before a Linear head."""
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
        nn.Linear(64, CLASSES),
    )  # fmt: skip


def build(cls: type[tk.KFAC], kwargs: dict[str, Any], wrap: bool) -> tuple[nn.Module, tk.KFAC]:
    kwargs = dict(kwargs)
    nets = {
        "transformer": TransformerNet,
        "grouped": grouped_net,
        "big_table": BigTableNet,
        "padded": PaddedNet,
        "bitfit": bitfit_net,
    }
    model: nn.Module = nets.get(kwargs.pop("net", None), lambda: prepare(mixed_net()))()
    if wrap:
        model = nn.parallel.DistributedDataParallel(model)
    if kwargs.get("process_group") == "new_group":
        kwargs = {**kwargs, "process_group": dist.new_group(list(range(WORLD)))}
    return model, cls(model, **kwargs)


def step(model: nn.Module, opt: tk.KFAC, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def params(model: nn.Module) -> dict[str, Tensor]:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {k: p.detach().clone() for k, p in inner.named_parameters()}


def rows(rank: int, sizes: tuple[int, ...]) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def one_step(
    cls: type[tk.KFAC], kwargs: dict[str, Any], sizes: tuple[int, ...] | None, rank: int = 0
) -> tuple[dict[str, Tensor], tk.KFAC]:
    """The parameter change of one contract step (``sizes``: this rank's share, or the
    whole batch in one process when ``None``)."""
    x, y = make_batch(SHAPE, CLASSES, BATCH)
    if sizes is not None:
        x, y = x[rows(rank, sizes)], y[rows(rank, sizes)]
    model, opt = build(cls, {**CONTRACT, "damping": 0.05, **kwargs}, wrap=sizes is not None)
    before = params(model)
    step(model, opt, x, y)
    return {k: v - before[k] for k, v in params(model).items()}, opt


def two_steps(
    kwargs: dict[str, Any], sizes: tuple[int, ...] | None, rank: int = 0
) -> tuple[dict[str, Tensor], bool]:
    """The parameter change of a refresh step and a step between refreshes (:data:`BETWEEN`)
    and whether ``W`` was kept."""
    model, opt = build(
        tk.TwoLevelKFAC, {**CONTRACT, "damping": 0.05, **BETWEEN, **kwargs}, sizes is not None
    )
    before = params(model)
    for seed in range(2):
        x, y = make_batch(SHAPE, CLASSES, BATCH, seed=seed)
        if sizes is not None:
            x, y = x[rows(rank, sizes)], y[rows(rank, sizes)]
        step(model, opt, x, y)
    pre = opt.preconditioner
    assert isinstance(pre, tk.TwoLevelPreconditioner)
    return {k: v - before[k] for k, v in params(model).items()}, pre.fisher_columns is not None


def train(model_opt: tuple[nn.Module, tk.KFAC], steps: range, rank: int) -> None:
    model, opt = model_opt
    for k in steps:
        x, y = make_batch(SHAPE, CLASSES, BATCH, seed=100 + k)
        half = rows(rank, (BATCH // 2,) * WORLD)
        step(model, opt, x[half], y[half])


def curvature(opt: tk.KFAC) -> dict[str, Any]:
    """Factors, coarse matrix and ``F̂v`` for a fixed ``v`` (collective under DDP): with
    unequal local batches DDP's gradient is not the global mean, but these are exact."""
    pre = opt.preconditioner
    assert isinstance(pre, tk.TwoLevelPreconditioner) and pre.basis is not None
    return {
        "factors": {n: (f.A, f.G) for n, f in pre.factors.items()},
        "coarse_matrix": pre.coarse_matrix,
        "fvp": pre.fhat([torch.cos(torch.arange(b[0].numel()).view_as(b[0])) for b in pre.basis]),
    }


def assert_same_curvature(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """:func:`curvature`'s results agree (factors to 1e-12, ``F_c`` and ``F̂v`` to 1e-10)."""
    for name, (a, g) in expected["factors"].items():
        torch.testing.assert_close(got["factors"][name][0], a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["factors"][name][1], g, rtol=1e-12, atol=1e-14)
    fc = expected["coarse_matrix"]
    scale = float(fc.abs().max())
    torch.testing.assert_close(got["coarse_matrix"], fc, rtol=1e-10, atol=1e-12 * scale)
    for fv, ref in zip(got["fvp"], expected["fvp"], strict=True):
        torch.testing.assert_close(fv, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


# ------------------------------------------------------------------ worker processes
def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # this child's environment only
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    joined = _count_joined_steps()
    try:
        results: dict[str, Any] = {}
        half = (BATCH // 2,) * WORLD
        for name, (cls, kwargs) in CASES.items():
            joined.clear()
            delta, opt = one_step(cls, kwargs, half, rank)
            results[name] = {"delta": delta, "bytes": opt.last_stats["comm_bytes"]}
            results[name]["joined"] = len(joined)
        for name, kwargs in BETWEEN_CASES.items():
            results[f"between_{name}"] = two_steps(kwargs, half, rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, opt = one_step(tk.TwoLevelKFAC, KEEPS_BATCH, (5, 3), rank)
        results["unequal"] = {
            **curvature(opt),
            "warnings": [str(w.message) for w in caught],
        }
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # (5 · 0.5 and 3 · 0.5 both round to 2 rows)
            one_step(tk.KFAC, {"fisher_batch": 0.5}, (5, 3), rank)
        results["unequal_subsets"] = [str(w.message) for w in caught]
        for name, kwargs in EMPTY_CASES.items():
            _, opt = one_step(tk.TwoLevelKFAC, {**KEEPS_BATCH, **kwargs}, (BATCH, 0), rank)
            results[f"empty_{name}"] = curvature(opt)
        for name, (cls, kwargs) in RESUME_CASES.items():
            results[f"resume_{name}"] = _resume(cls, {**RESUME, **kwargs}, rank, out / name)
        results["checkpoints"] = out
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _count_joined_steps() -> list[None]:
    """In this worker process: a list that grows by one at each two-level step on the
    ``W̄`` matrices (``CoarseLevel.precondition``; the steps on parts do not call it)."""
    from twolevel_kfac.optim.coarse import CoarseLevel

    calls: list[None] = []
    original = CoarseLevel.precondition

    def counted(self: CoarseLevel, *args: Any) -> Any:
        calls.append(None)
        return original(self, *args)

    CoarseLevel.precondition = counted  # type: ignore[method-assign]
    return calls


def _resume(cls: type[tk.KFAC], kwargs: dict[str, Any], rank: int, path: Path) -> Any:
    """Final parameters of 5 uninterrupted steps and of 3 steps + save + reload + 2 steps."""
    straight = build(cls, kwargs, wrap=True)
    train(straight, range(5), rank)
    first = build(cls, kwargs, wrap=True)
    train(first, range(3), rank)
    model, opt = first
    state = {"model": model.module.state_dict(), "opt": opt.state_dict()}  # collective
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    resumed = build(cls, kwargs, wrap=True)
    saved = torch.load(path, weights_only=False)
    resumed[0].module.load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    train(resumed, range(3, 5), rank)
    return {"straight": params(straight[0]), "resumed": params(resumed[0])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every rank's results of all distributed runs (one pair of processes)."""
    return run_ranks(_worker, tmp_path_factory.mktemp("distributed"), "fork", WORLD)


def relative_error(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    names = sorted(expected)
    got = torch.cat([actual[n].reshape(-1) for n in names])
    want = torch.cat([expected[n].reshape(-1) for n in names])
    return float((got - want).norm() / want.norm())


# ------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("case", list(CASES))
def test_step_equals_single_process_on_whole_batch(
    runs: list[dict[str, Any]], float64: None, case: str
) -> None:
    cls, kwargs = CASES[case]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("process_group", "distributed_inverses")}
    expected, _ = one_step(cls, kwargs, None)
    for rank in range(WORLD):
        error = relative_error(runs[rank][case]["delta"], expected)
        assert error <= 1e-9, f"rank {rank}: relative error {error:.3e}"
    for name, delta in runs[0][case]["delta"].items():  # the replicas stay identical
        assert torch.equal(delta, runs[1][case]["delta"][name]), name


@pytest.mark.parametrize("case", list(BETWEEN_CASES))
def test_steps_between_refreshes_equal_single_process(
    runs: list[dict[str, Any]], float64: None, case: str
) -> None:
    kwargs = BETWEEN_CASES[case]
    expected, columns = two_steps(kwargs, None)
    if kwargs["kept_fisher"] != "auto":
        assert columns is (kwargs["kept_fisher"] == "columns")
    for rank in range(WORLD):
        delta, kept = runs[rank][f"between_{case}"]
        if kwargs["kept_fisher"] != "auto":
            assert kept is columns
        assert kept is runs[0][f"between_{case}"][1]
        error = relative_error(delta, expected)
        assert error <= 1e-9, f"rank {rank}: relative error {error:.3e}"
        for name, value in runs[0][f"between_{case}"][0].items():  # replicas stay identical
            assert torch.equal(delta[name], value), name


def _factor_dims() -> list[tuple[int, int]]:
    return [(19, 3), (27, 4), (5, 3)]  # mixed_net: (d_in', d_out) of conv, linear, linear


def test_bytes_per_step_match_the_formula(runs: list[dict[str, Any]]) -> None:
    dims = _factor_dims()
    # packed factors, then per layer 4 counts (samples, rows, rows kept, samples of the
    # forwards that ran it), 3 step counts (samples, batch rows and their square) and the
    # gradient checksum and its square
    factors = 8 * sum(a * (a + 1) // 2 + g * (g + 1) // 2 for a, g in dims) + 8 * (4 * 3 + 5)
    sizes = [d for pair in dims for d in pair]
    owners = assign_owners([float(d) ** 3 for d in sizes], WORLD)
    # inverse_method="auto" is Cholesky here: each owner shares a packed damped inverse
    split = 8 * max(sum(d * (d + 1) // 2 for d, o in zip(sizes, owners, strict=True) if o == r)
                    for r in range(WORLD))  # fmt: skip
    coarse, fvp = 8 * 3 * 4 // 2, 8 * sum(a * g for a, g in dims)  # K = 3; P numbers
    for rank in range(WORLD):
        got = {name: runs[rank][name]["bytes"] for name in CASES}
        assert got["kfac_replicate"] == factors
        assert got["kfac_per_factor"] == factors + split
        assert got["nicolaides_additive"] == factors + split + coarse
        # the residual's F̂ product (no W₀ = FR₀ᵀ with cov_interval=1: no step reads it)
        assert got["residual_adef2"] == factors + split + coarse + fvp
        assert got["residual_additive"] == factors + split + coarse + fvp


def test_distributed_steps_join_only_where_parts_cannot(runs: list[dict[str, Any]]) -> None:
    """Under ``torch.distributed`` the ``additive`` refresh of a residual space runs on
    parts (its ``F̂`` product all-reduced); A-DEF2 reads the rows of every rank, so its
    refresh takes the ``W̄`` path."""
    for rank in range(WORLD):
        assert runs[rank]["residual_additive"]["joined"] == 0
        assert runs[rank]["nicolaides_additive"]["joined"] == 0
        assert runs[rank]["residual_adef2"]["joined"] == 1


def test_unequal_local_batches_weight_the_curvature_by_counts(
    runs: list[dict[str, Any]], float64: None
) -> None:
    _, opt = one_step(tk.TwoLevelKFAC, KEEPS_BATCH, None)
    expected = curvature(opt)
    for rank in range(WORLD):
        got = runs[rank]["unequal"]
        assert_same_curvature(got, expected)
        told = [w for w in got["warnings"] if "different local batch sizes" in w]
        # a loss weighted per rank (the other common fix) scales the curvature: said so,
        # where the warning blamed the gradient alone (a trial's loop was 29-95 % off)
        assert told and "scales each rank's empirical Fisher rows" in told[0]
        said = [w for w in runs[rank]["unequal_subsets"] if "different local batch sizes" in w]
        assert said, "Fisher subsets of one size hid local batches of 5 and 3"


@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_a_rank_with_an_empty_local_batch_adds_no_samples(
    runs: list[dict[str, Any]], float64: None, case: str
) -> None:
    """Rank 1 holds none of the batch's rows (a refresh step over an empty local batch):
    factors, coarse matrix and ``F̂v`` are those of rank 0's rows alone, on both ranks."""
    _, opt = one_step(tk.TwoLevelKFAC, {**KEEPS_BATCH, **EMPTY_CASES[case]}, None)
    expected = curvature(opt)
    for rank in range(WORLD):
        got = runs[rank][f"empty_{case}"]
        assert_same_curvature(got, expected)


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_distributed_resume_equals_uninterrupted_run(runs: list[dict[str, Any]], case: str) -> None:
    for rank in range(WORLD):
        result = runs[rank][f"resume_{case}"]
        for name, value in result["straight"].items():
            assert torch.equal(result["resumed"][name], value), f"rank {rank}: {name}"
            assert torch.equal(runs[0][f"resume_{case}"]["straight"][name], value), name


def test_distributed_state_loads_in_one_process(runs: list[dict[str, Any]], float64: None) -> None:
    """One process resuming a 2-process two-level run holds both ranks' Fisher rows (in the
    workers' float64: a checkpoint in another dtype is refused)."""
    saved = torch.load(runs[0]["checkpoints"] / "residual_adef2_faithful", weights_only=False)
    cls, kwargs = RESUME_CASES["residual_adef2_faithful"]
    model, opt = build(cls, {**RESUME, **kwargs}, wrap=False)
    model.load_state_dict(saved["model"])
    with pytest.warns(UserWarning, match="saved by 2 process"):
        opt.load_state_dict(saved["opt"])
    pre = opt.preconditioner
    assert isinstance(pre, tk.TwoLevelPreconditioner) and pre.fisher_stats is not None
    assert pre.fisher_samples == pre.fisher_stats[0].num_samples == 4  # 2 rows per rank
    assert torch.equal(pre.generator.get_state(), saved["opt"]["preconditioner"]["generator"])


# --------------------------------------------------------- single-process pieces
def test_pack_symmetric_round_trip() -> None:
    m = torch.randn(5, 5, dtype=torch.float64)
    m = m + m.T
    packed = pack_symmetric(m)
    assert packed.shape == (15,)
    assert torch.equal(unpack_symmetric(packed, 5), m)


def test_assign_owners_balances_cost_deterministically() -> None:
    costs = [1000.0, 8.0, 729.0, 27.0, 512.0, 1.0]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    # Largest first, each to the least-loaded rank: 1000 | 729, 512 | 27, 8, 1 → 1036 | 1241.
    assert owners == [0, 0, 1, 0, 1, 0]
    assert assign_owners(costs, 1) == [0] * len(costs)


def test_rank_seeds_keep_rank_zero_and_differ() -> None:
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, r) for r in range(64)}
    assert len(seeds) == 64 and all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(rank_seed(-3, 5))  # a valid torch seed


def test_options_validate_the_distributed_arguments() -> None:
    with pytest.raises(ValueError, match="distributed_inverses must be one of"):
        tk.CurvatureOptions(distributed_inverses="scatter")
    with pytest.raises(TypeError, match=r"process_group must be a torch\.distributed"):
        tk.CurvatureOptions(process_group="world")
    if not dist.is_initialized():
        assert make_communicator(None).world_size == 1
        with pytest.raises(ValueError, match="not initialised"):
            make_communicator(object())


def test_single_process_is_unchanged_by_the_communicator() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    opt = tk.KFAC(model, kl_clip=None)
    comm: Communicator = opt.preconditioner.comm
    assert not comm.distributed
    x = torch.randn(4, 3)
    step(model, opt, x, torch.tensor([0, 1, 1, 0]))
    assert comm.payload_bytes == 0 and "comm_bytes" not in opt.last_stats
    state = opt.state_dict()
    assert "ranks" not in state["preconditioner"]


def test_the_gradient_checksum_reads_any_dtype_and_offset() -> None:
    """A bf16 gradient at an odd offset of a bucket (DDP's ``gradient_as_bucket_view``)
    failed ("storage_offset() must be divisible by 4"); equal gradients give equal sums,
    another gradient almost surely another."""
    from twolevel_kfac.distributed import gradient_checksum

    layers = {"a": nn.Linear(3, 1).bfloat16(), "b": nn.Linear(2, 2).double()}
    bucket = torch.randn(20, generator=torch.Generator().manual_seed(0)).bfloat16()
    layers["a"].weight.grad = bucket[1:4].view(1, 3)  # offset 1, 2-byte elements
    layers["a"].bias.grad = bucket[5:6]
    layers["b"].weight.grad = torch.randn(2, 2, dtype=torch.float64)
    first = gradient_checksum(layers)
    assert first == gradient_checksum(layers) and 0 <= first < 1_048_573
    layers["b"].weight.grad[0, 0] += 1e-12
    assert gradient_checksum(layers) != first
