"""The default two-level configuration takes its refresh's Fisher products as the
statistics are folded (:mod:`twolevel_kfac.optim.coarse_absorb`): one layer's statistics
alive at a time, as for KFAC alone, and the same steps, bit for bit, as when every layer's
statistics are kept until ``F_c`` is formed."""

from __future__ import annotations

import copy
import io
from typing import Any
from unittest.mock import Mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from test_folding import alive_at_each_fold, batch, conv_net
from twolevel_kfac.curvature import forward_checks
from twolevel_kfac.optim import folding
from twolevel_kfac.optim.coarse import CoarseLevel
from twolevel_kfac.optim.coarse_absorb import absorbs_statistics
from twolevel_kfac.optim.folding import keeps_statistics
from twolevel_kfac.twolevel.coarse_matrix import exact_coarse_matrix


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"coarse_space": "spectral"},
        {"coarse_space": "spectral", "inverse_method": "eigen"},
    ],
)
def test_the_default_two_level_level_holds_one_layer_statistics_at_a_time(
    kwargs: dict[str, Any],
) -> None:
    alive, opt = alive_at_each_fold(tk.TwoLevelKFAC, **kwargs)
    assert alive == [0, 0, 0]
    pre = opt.preconditioner
    assert pre.coarse_level is not None and absorbs_statistics(pre.coarse_level)
    assert not keeps_statistics(pre)
    level = pre.coarse_level
    assert level.absorbed is None and level.fisher_stats is None  # consumed, nothing kept
    assert level.coarse_matrix is not None and level.fisher_samples == 8


class OwnBasis(CoarseLevel):
    """A subclass's own space: its basis may read what the fold changes, so it keeps."""

    def build_basis(self, minv_res: Any) -> Any:
        return super().build_basis(minv_res)


class OwnBasisKFAC(tk.TwoLevelKFAC):
    def _make_preconditioner(self, model: nn.Module, kwargs: dict, params: list) -> Any:
        pre = super()._make_preconditioner(model, kwargs, params)
        assert pre.coarse_level is not None
        pre.coarse_level.__class__ = OwnBasis
        return pre


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (tk.TwoLevelKFAC, {"coarse_space": "residual"}),
        (tk.TwoLevelKFAC, {"coarse_space": "tselepidis"}),
        (tk.TwoLevelKFAC, {"combination": "adef2"}),
        (tk.TwoLevelKFAC, {"diagnostics": True}),
        (tk.TwoLevelKFAC, {"coarse_scale": 0.0}),
        (tk.TwoLevelKFAC, {"fine": "ekfac"}),
        (OwnBasisKFAC, {}),
    ],
)
def test_the_other_coarse_levels_keep_the_statistics_through_the_fold(
    cls: type[tk.KFAC], kwargs: dict[str, Any]
) -> None:
    alive, opt = alive_at_each_fold(cls, **kwargs)
    assert alive == [0, 1, 2]
    level = opt.preconditioner.coarse_level
    assert level is not None and not absorbs_statistics(level)
    assert keeps_statistics(opt.preconditioner)


def padded_tokens() -> nn.Module:
    """An embedding with a ``padding_idx`` (a row no step moves: zero in the basis)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(12, 6, padding_idx=0), nn.Tanh(), nn.Linear(6, 12))


def token_batch(seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (5, 4), generator=gen), torch.randint(0, 12, (5, 4), generator=gen)


def run(model: nn.Module, opt: tk.KFAC, tokens: bool, steps: int) -> list[Tensor]:
    """``steps`` steps; the coarse matrix after each."""
    matrices = []
    for seed in range(steps):
        x, y = token_batch(seed) if tokens else batch(seed)
        opt.zero_grad()
        logits = model(x)
        loss = (
            F.cross_entropy(logits.flatten(0, -2), y.flatten())
            if tokens
            else F.cross_entropy(logits, y)
        )
        loss.backward()
        opt.step()
        level = opt.preconditioner.coarse_level
        assert level is not None and level.coarse_matrix is not None
        matrices.append(level.coarse_matrix.clone())
    return matrices


@pytest.mark.parametrize("space", ["nicolaides", "spectral", "spectral:eigen"])
@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize(
    "settings",
    [
        {"cov_interval": 1, "inv_interval": 1},
        {"cov_interval": 2, "inv_interval": 2, "fisher": "empirical"},
        {"cov_interval": 1, "inv_interval": 3, "coarse_scale": 0.5, "fine_weight": 0.7},
        {"cov_interval": 2, "inv_interval": 2, "coarse_refresh": "faithful", "fisher_batch": 0.5},
    ],
)
def test_absorbed_products_give_the_steps_of_the_kept_statistics(
    monkeypatch: pytest.MonkeyPatch, space: str, tokens: bool, settings: dict[str, Any]
) -> None:
    """Also the spectral space's, whose folds between refreshes keep the statistics
    (``inv_interval=3``)."""
    extra: dict[str, Any] = {"coarse_space": space.split(":")[0]}
    if space.endswith(":eigen"):
        extra["inverse_method"] = "eigen"
    if tokens:
        extra["class_dim"] = -1
    model = padded_tokens() if tokens else conv_net()
    twin = copy.deepcopy(model)
    absorbing = tk.TwoLevelKFAC(model, lr=0.05, **settings, **extra)
    kept = tk.TwoLevelKFAC(twin, lr=0.05, **settings, **extra)
    with monkeypatch.context() as patch:  # the twin keeps every layer's statistics
        patch.setattr(folding, "absorbs_statistics", lambda level: False)
        assert keeps_statistics(kept.preconditioner)
        kept_matrices = run(twin, kept, tokens, 5)
    assert not keeps_statistics(absorbing.preconditioner)
    matrices = run(model, absorbing, tokens, 5)
    for a, b in zip(matrices, kept_matrices, strict=True):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_absorbed_coarse_matrix_is_the_exact_one_of_the_batch(float64: None) -> None:
    """``F_c`` from the absorbed columns against :func:`exact_coarse_matrix` of the same
    statistics (retained by a KFAC twin) with the basis the level holds."""
    model = conv_net()
    twin = copy.deepcopy(model)
    opt = tk.TwoLevelKFAC(model, fisher="empirical", cov_interval=1, inv_interval=1)
    keeper = tk.KFAC(twin, fisher="empirical", cov_interval=1, inv_interval=1)
    keeper.preconditioner.retain_statistics = True  # what adaptive damping reads
    x, y = batch(0)
    for net, optimizer in ((model, opt), (twin, keeper)):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    retained = keeper.preconditioner.retained_stats
    level = opt.preconditioner.coarse_level
    assert level is not None and level.basis is not None and level.coarse_matrix is not None
    stats = [retained[n] for n in level.names]
    exact = exact_coarse_matrix(stats, level.basis, opt.preconditioner.damping)
    torch.testing.assert_close(level.coarse_matrix, exact, rtol=1e-13, atol=0.0)


class Branchy(nn.Module):
    """A layer used on some steps only, or on half of the batch (refused at the step)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.side = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)
        self.mode = "plain"

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.mode == "half":  # (the output keeps a row per sample)
            return self.b(h[: len(h) // 2]).repeat(2, 1)
        return self.b(h) + (self.side(h) if self.mode == "side" else 0)


def step(model: Branchy, opt: tk.KFAC, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    opt.zero_grad()
    logits = model(x)
    F.cross_entropy(logits, y[: len(logits)]).backward()
    opt.step()


@pytest.mark.parametrize("space", ["nicolaides", "spectral"])
@pytest.mark.parametrize("failure", ["disagree", "interrupted"])
@pytest.mark.parametrize("refresh", ["consistent", "faithful"])
def test_a_refresh_that_raises_leaves_nothing_behind(
    failure: str, refresh: str, space: str
) -> None:
    """A refresh step that raises after (or in) its fold: the level's layers and the faithful
    schedule's running ``F_c`` are as before it, and a run restored in place from the last
    checkpoint goes on as if the step had never been tried (the failed batch's products are
    not taken for a refresh by a later step)."""
    settings = {
        "lr": 0.1,
        "cov_interval": 2,
        "inv_interval": 2,
        "coarse_refresh": refresh,
        "coarse_space": space,
    }
    model = Branchy()
    opt = tk.TwoLevelKFAC(model, **settings)
    for seed in range(4):  # refreshes at 0 and 2
        step(model, opt, seed)
    saved = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), saved)
    twin = copy.deepcopy(model)
    twin_opt = tk.TwoLevelKFAC(twin, **settings)
    # a copy: like torch.optim's, a state dict holds the optimizer's own tensors, which
    # a step may write in place (the momentum, and a refresh's factors)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    level = opt.preconditioner.coarse_level
    assert level is not None and level.coarse_matrix is not None
    before = (list(level.names), level.coarse_updates, level.coarse_matrix.clone())
    if failure == "disagree":  # a layer saw half of the batch: refused after the fold
        model.mode = "half"  # (with the forward's refusal of such rows off)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(forward_checks, "check_row_order", lambda *args: None)
            with pytest.raises(ValueError, match="disagree"):
                step(model, opt, 4)
    else:  # another layer set, interrupted in the fine level's refresh
        model.mode = "side"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(opt.preconditioner.fine, "refresh", Mock(side_effect=KeyboardInterrupt))
            with pytest.raises(KeyboardInterrupt):
                step(model, opt, 4)
    assert (level.names, level.coarse_updates) == before[:2]
    if refresh == "faithful":  # its running average survives (a consistent refresh drops
        # what it replaces when the step begins: CoarseLevel.release_replaced)
        assert level.coarse_matrix is not None and torch.equal(level.coarse_matrix, before[2])
    model.mode = "plain"
    saved.seek(0)
    model_state, opt_state = torch.load(saved, weights_only=False)
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    for seed in range(4, 9):
        step(model, opt, seed)
        step(twin, twin_opt, seed)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_layers_that_disagree_on_the_batch_are_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the forward (``curvature/row_order.py``), and where that is passed, at the fold."""
    model = Branchy()
    opt = tk.TwoLevelKFAC(model, fisher="empirical")
    model.mode = "half"  # its second layer sees half of the batch
    with pytest.raises(RuntimeError, match=r"layer 'b': 4 rows for the batch of 8"):
        step(model, opt, 0)
    monkeypatch.setattr(forward_checks, "check_row_order", lambda *args: None)
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"Fisher mini-batch size: \{4: \['b'\], 8: \['a'\]\}"):
        step(model, opt, 0)


@pytest.mark.parametrize("space", ["nicolaides", "spectral"])
def test_a_layer_used_on_some_steps_gets_the_steps_of_the_kept_statistics(
    monkeypatch: pytest.MonkeyPatch, space: str
) -> None:
    """A side layer that joins and leaves (the refresh's layers change with it): the
    absorbed refreshes step as the kept statistics do, bit for bit."""
    settings = {"lr": 0.1, "cov_interval": 2, "inv_interval": 2, "coarse_space": space}
    model = Branchy()
    twin = copy.deepcopy(model)
    absorbing, kept = tk.TwoLevelKFAC(model, **settings), tk.TwoLevelKFAC(twin, **settings)
    modes = ["plain", "plain", "side", "side", "side", "plain", "plain", "side", "side"]
    for seed, mode in enumerate(modes):
        model.mode = twin.mode = mode
        step(model, absorbing, seed)
        with monkeypatch.context() as patch:
            patch.setattr(folding, "absorbs_statistics", lambda level: False)
            step(twin, kept, seed)
    level = absorbing.preconditioner.coarse_level
    assert level is not None and level.names == ["a", "b", "side"]
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
