"""The default two-level configuration takes its refresh's Fisher products as the
statistics are folded (:mod:`twolevel_kfac.optim.coarse_absorb`): one layer's statistics
alive at a time, as for KFAC alone, and the same steps, bit for bit, as when every layer's
statistics are kept until ``F_c`` is formed."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from test_folding import alive_at_each_fold, batch, conv_net
from twolevel_kfac.optim import folding
from twolevel_kfac.optim.coarse import CoarseLevel
from twolevel_kfac.optim.coarse_absorb import absorbs_statistics
from twolevel_kfac.optim.folding import keeps_statistics
from twolevel_kfac.twolevel.coarse_matrix import exact_coarse_matrix


def test_the_default_two_level_level_holds_one_layer_statistics_at_a_time() -> None:
    alive, opt = alive_at_each_fold(tk.TwoLevelKFAC)
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
        (tk.TwoLevelKFAC, {"coarse_space": "spectral"}),
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
    monkeypatch: pytest.MonkeyPatch, tokens: bool, settings: dict[str, Any]
) -> None:
    extra = {"class_dim": -1} if tokens else {}
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


class HalfRows(nn.Module):
    """A layer applied to half of the batch: the coarse level cannot couple the samples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h[: x.shape[0] // 2])


def test_layers_that_disagree_on_the_batch_are_refused_by_name() -> None:
    model = HalfRows()
    opt = tk.TwoLevelKFAC(model, fisher="empirical")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (4,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="disagree on the Fisher mini-batch size: \\[4, 8\\]"):
        opt.step()
