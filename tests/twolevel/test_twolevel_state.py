"""The two-level state: resume is bit-identical for every coarse space and combination,
and ``state_dict`` keeps of the Fisher mini-batch only what a step between refreshes reads
(additive with the consistent refresh: nothing, its state is KFAC's plus the basis and
``F_c``; A-DEF1, A-DEF2, balanced: its rows or ``W₀ = FR₀ᵀ``, whichever is smaller)."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from test_kfac_exact import make_batch, one_step


def rising_damping(step: int) -> float:
    return 1e-3 * (1 + step)


ROUND_TRIPS: dict[str, dict[str, Any]] = {
    # F_c follows λ between refreshes (its shift is state: coarse_damping)
    "nicolaides+adef2:schedule": {"combination": "adef2", "damping": rising_damping},
    "krylov_residual+balanced:faithful": {
        "coarse_space": "krylov_residual",
        "combination": "balanced",
        "coarse_refresh": "faithful",
    },
    "residual+adef2": {"coarse_space": "residual", "combination": "adef2"},
    "nicolaides+additive": {},
    "residual+additive": {"coarse_space": "residual"},
    "krylov_nicolaides+additive": {"coarse_space": "krylov_nicolaides"},
    "spectral+additive": {"coarse_space": "spectral"},
    "tselepidis+additive": {"coarse_space": "tselepidis"},
    "nicolaides+adef1": {"combination": "adef1"},
    "ekfac+nicolaides+additive": {"fine": "ekfac"},
    "nicolaides+adef2:columns": {"combination": "adef2", "kept_fisher": "columns"},
    "residual+balanced:columns": {
        "coarse_space": "residual",
        "combination": "balanced",
        "kept_fisher": "columns",
    },
    "spectral+adef1:columns": {
        "coarse_space": "spectral",
        "combination": "adef1",
        "kept_fisher": "columns",
    },
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_resume_is_bit_identical(case: str) -> None:
    settings = {
        "lr": 0.05,
        "fisher_batch": 0.5,
        "cov_interval": 2,
        "inv_interval": 3,
        **ROUND_TRIPS[case],
    }

    def run(split: int | None) -> Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        opt = tk.TwoLevelKFAC(model, **settings)
        for step in range(6):
            if step == split:
                state = copy.deepcopy((model.state_dict(), opt.state_dict()))
                torch.manual_seed(1)
                model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
                opt = tk.TwoLevelKFAC(model, **settings)
                model.load_state_dict(state[0])
                opt.load_state_dict(state[1])
            one_step(model, opt, *make_batch((6,), 3, 10, seed=step))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    reference = run(None)
    assert torch.equal(run(3), reference)  # between refreshes
    assert torch.equal(run(4), reference)  # on a refresh step


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )


def saved_bytes(cls: type[tk.KFAC], **kwargs: Any) -> int:
    """Bytes of ``torch.save(opt.state_dict())`` after 3 steps at batch 128."""
    model = small_cnn()
    opt = cls(model, lr=0.01, **kwargs)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return buffer.tell()


@pytest.fixture(scope="module")
def kfac_bytes() -> int:
    return saved_bytes(tk.KFAC)


@pytest.mark.parametrize(
    "space", ["nicolaides", "spectral", "residual", "krylov_nicolaides", "tselepidis"]
)
def test_additive_state_is_within_1_2x_of_kfac(kfac_bytes: int, space: str) -> None:
    """Small CNN, batch 128: the per-location Fisher rows (7.7× KFAC's state) are not kept."""
    assert saved_bytes(tk.TwoLevelKFAC, coarse_space=space) <= 1.2 * kfac_bytes


@pytest.mark.parametrize("combination", ["adef1", "adef2", "balanced"])
def test_combinations_reading_the_fisher_batch_keep_w_within_1_2x_of_kfac(
    kfac_bytes: int, combination: str
) -> None:
    """A-DEF1, A-DEF2 and balanced read ``F̂`` at every step. On a CNN ``W = F̂R₀ᵀ`` (``K``
    numbers per parameter) is far smaller than the per-location rows, and is what the
    state keeps by default; with ``kept_fisher="rows"`` it holds the rows."""
    assert saved_bytes(tk.TwoLevelKFAC, combination=combination) <= 1.2 * kfac_bytes
    rows = saved_bytes(tk.TwoLevelKFAC, combination=combination, kept_fisher="rows")
    assert rows > 2 * kfac_bytes


def test_a_cnn_keeps_w_even_where_building_it_costs_more_passes_than_the_rows(
    kfac_bytes: int,
) -> None:
    """With ``cov_interval=3`` two ``F̂`` products run between refreshes while ``W``
    takes ``K = 3`` passes over the rows to build, but the per-location rows are more than
    four times ``W``: memory decides, and ``W`` is kept."""
    assert saved_bytes(tk.TwoLevelKFAC, combination="adef2", cov_interval=3) <= 1.2 * kfac_bytes


def test_the_fisher_batch_is_dropped_after_the_refresh_only_when_unread() -> None:
    x, y = make_batch((6,), 3, 10, seed=0)
    for kwargs, kept, columns in [
        ({}, False, False),
        ({"combination": "adef2", "kept_fisher": "rows"}, True, False),
        # K·P = 106 < the rows' 10·21 numbers, and building W (K = 2 passes over the rows)
        # costs no more than the rows' products until the next refresh (2 with T_cov = 3) …
        ({"combination": "adef2", "cov_interval": 3}, False, True),
        # … but not with T_cov = 2 (one product), and W is more than a quarter of the rows
        ({"combination": "adef2"}, True, False),
        ({"combination": "adef2", "cov_interval": 1}, False, False),  # every step refreshes
        ({"diagnostics": True}, True, False),
        ({"diagnostics": True, "cov_interval": 1}, True, False),  # kept for fhat
    ]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        opt = tk.TwoLevelKFAC(model, lr=0.05, **{"cov_interval": 2, **kwargs})
        one_step(model, opt, x, y)
        pre = opt.preconditioner
        assert isinstance(pre, tk.TwoLevelPreconditioner)
        reads = pre.level.reads_statistics and kwargs.get("cov_interval") != 1
        assert (pre.fisher_stats is not None) is (reads or "diagnostics" in kwargs), kwargs
        one_step(model, opt, x, y)  # between refreshes (with cov_interval=2)
        pre = opt.preconditioner
        assert isinstance(pre, tk.TwoLevelPreconditioner)
        assert (pre.fisher_stats is not None) is kept, kwargs
        assert (pre.fisher_columns is not None) is columns, kwargs
        assert pre.coarse_operator is not None and pre.fisher_samples == 10


@pytest.mark.parametrize(
    ("other", "match"),
    [
        # additive keeps no Fisher mini-batch; A-DEF2 reads it at every step
        ({"combination": "adef2"}, r"holds no Fisher mini-batch.*combination='adef2'"),
        # the Nicolaides basis is rebuilt from the shapes: F_c belongs to it, not to another
        ({"coarse_space": "spectral"}, r"rebuilds its coarse basis on load.*'spectral'"),
    ],
)
def test_a_state_is_refused_under_options_it_cannot_serve(
    other: dict[str, Any], match: str
) -> None:
    x, y = make_batch((6,), 3, 10, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = tk.TwoLevelKFAC(model, lr=0.05)
    one_step(model, opt, x, y)
    with pytest.raises(ValueError, match=match):
        tk.TwoLevelKFAC(model, lr=0.05, **other).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("space", ["nicolaides", "tselepidis"])
def test_a_shape_only_basis_is_rebuilt_not_saved(space: str) -> None:
    x, y = make_batch((6,), 3, 10, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = tk.TwoLevelKFAC(model, lr=0.05, coarse_space=space)
    one_step(model, opt, x, y)
    coarse = opt.state_dict()["preconditioner"]["coarse"]
    assert coarse["basis"] is None and coarse["basis_rebuilt"] is True
    other = tk.TwoLevelKFAC(model, lr=0.05, coarse_space=space)
    other.load_state_dict(opt.state_dict())
    pre, loaded = opt.preconditioner, other.preconditioner
    assert isinstance(pre, tk.TwoLevelPreconditioner)
    assert isinstance(loaded, tk.TwoLevelPreconditioner)
    assert pre.basis is not None and loaded.basis is not None
    for a, b in zip(pre.basis, loaded.basis, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("space", "settings", "saved"),
    [
        ("spectral", {}, None),  # built at the refresh the state holds
        ("krylov_nicolaides", {}, None),
        ("krylov_nicolaides", {"damping": rising_damping}, ["left", "right"]),  # λ moved since
        ("spectral", {"damping": rising_damping}, None),  # eigenvectors only
        # step 3 folds statistics without a refresh; step 4's refresh decomposes them
        ("spectral", {"inv_interval": 2}, ["left", "right"]),
        ("residual", {}, ["bias", "weight"]),  # from the refresh step's gradient
        ("residual", {"coarse_refresh": "faithful"}, ["bias", "weight"]),  # rebuilt every step
    ],
)
def test_a_basis_the_state_rebuilds_is_not_saved(
    space: str, settings: dict[str, Any], saved: list[str] | None
) -> None:
    """A spectral or Krylov-Nicolaides basis is rebuilt on load, bit for bit, from the saved
    fine level (and ``λ``) it was built from; one that the state no longer rebuilds is
    saved, in its form's plain tensors (``saved``: the keys per layer, none for a dense
    tensor), through ``torch.save`` and ``torch.load(weights_only=True)``. Either way the
    next steps equal an uninterrupted run's."""
    kwargs = {"lr": 0.05, "cov_interval": 3, "inv_interval": 3, "coarse_space": space, **settings}

    def build() -> tuple[nn.Module, tk.TwoLevelKFAC]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        return model, tk.TwoLevelKFAC(model, **kwargs)

    model, opt = build()
    for step in range(5):  # statistics at steps 0 and 3; step 5 is between refreshes
        one_step(model, opt, *make_batch((6,), 3, 10, seed=step))
    buffer = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    coarse = state[1]["preconditioner"]["coarse"]
    assert coarse["basis_rebuilt"] is (saved is None)
    if saved is None:
        assert coarse["basis"] is None
    else:
        assert [[] if isinstance(b, Tensor) else sorted(b) for b in coarse["basis"]] == [saved] * 2
    other_model, other = build()
    other_model.load_state_dict(state[0])
    other.load_state_dict(state[1])
    for step in range(5, 8):
        batch = make_batch((6,), 3, 10, seed=step)
        one_step(model, opt, *batch)
        one_step(other_model, other, *batch)
    for p, q in zip(model.parameters(), other_model.parameters(), strict=True):
        assert torch.equal(p, q)
