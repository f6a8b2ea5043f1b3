"""Coarse vectors kept as outer products or split parts (:mod:`twolevel_kfac.twolevel.
layer_basis`): every product equals the one on the dense vectors, each space keeps its
basis in the form expected (no second copy of a basis, none as large as the parameters
for the outer-product spaces), and a two-level step with them equals the step with the
same basis formed densely."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import twolevel_kfac as tk
from test_kfac_exact import make_batch, one_step
from twolevel_kfac.curvature.blocks import LayerStats
from twolevel_kfac.curvature.sample_products import per_sample_dots
from twolevel_kfac.twolevel.coarse_spaces import normalize_inf
from twolevel_kfac.twolevel.layer_basis import (
    LayerBasis,
    OuterVectors,
    SplitVectors,
    dense_basis,
    dense_layer,
    gram_layer,
    layer_from_state,
    layer_state,
    normalized_outer,
    prolong_add_layer,
    restrict_layer,
    sample_dots_layer,
    split_vectors,
    zero_rows,
)
from twolevel_kfac.twolevel.parts import ConstantPart, OuterPart

COMBINATIONS = ["additive", "adef1", "adef2", "balanced"]


def _outer(k: int, d_out: int, d_in: int, seed: int) -> OuterVectors:
    gen = torch.Generator().manual_seed(seed)
    return OuterVectors(
        torch.randn(k, d_out, generator=gen, dtype=torch.float64),
        torch.randn(k, d_in, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize("form", ["outer", "split"])
@pytest.mark.parametrize("k", [1, 2])
def test_the_forms_equal_the_dense_vectors(k: int, form: str) -> None:
    b: LayerBasis = _outer(k, 5, 7, 0)
    dense = b.dense()
    assert dense.shape == (k, 5, 7)
    torch.testing.assert_close(dense[k - 1], torch.outer(b.left[k - 1], b.right[k - 1]))
    if form == "split":
        b = split_vectors(dense)
        assert b.weight.shape == (k, 5, 6) and b.bias.shape == (k, 5)
        assert b.weight.is_contiguous() and torch.equal(b.dense(), dense)
    assert torch.equal(dense_layer(layer_from_state(layer_state(b))), dense)
    rows = zero_rows(b, [1, 3])
    assert torch.equal(dense_layer(rows), dense.index_fill(1, torch.tensor([1, 3]), 0.0))
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(restrict_layer(b, v), restrict_layer(dense, v), rtol=1e-13, atol=0)
    y = torch.randn(k, generator=gen, dtype=torch.float64)
    got = prolong_add_layer(b, y, v.clone(), -0.3)
    want = prolong_add_layer(dense, y, v.clone(), -0.3)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(gram_layer(b), gram_layer(dense), rtol=1e-13, atol=0)
    # per-sample products over several locations (a convolution's rows)
    stats = LayerStats(
        a=torch.randn(4, 3, 7, generator=gen, dtype=torch.float64),
        g=torch.randn(4, 3, 5, generator=gen, dtype=torch.float64),
    )
    torch.testing.assert_close(
        sample_dots_layer(stats, b), per_sample_dots(stats, dense), rtol=1e-12, atol=1e-14
    )


def test_normalised_outer_products_are_the_normalised_dense_vectors() -> None:
    b = _outer(2, 4, 6, 2)
    left = b.left.clone()
    left[1] = 0.0  # a zero vector stays zero
    right = b.right.clone()
    right[0, 3] = float("nan")  # so does one with a non-finite entry
    got = normalized_outer(left, right)
    want = normalize_inf(OuterVectors(left, right).dense())
    torch.testing.assert_close(got.dense(), want, rtol=1e-14, atol=0)
    assert not bool(got.dense().isnan().any())
    assert torch.equal(got.dense()[0], torch.zeros(4, 6, dtype=torch.float64))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize(
    ("space", "settings", "form"),
    [
        ("nicolaides", {}, "outer"),  # 1·1ᵀ, split as its one value
        ("tselepidis", {}, "outer"),
        ("spectral", {}, "outer"),
        ("spectral", {"inverse_method": "eigen", "damping_mode": "eigen_sum"}, "outer"),
        ("krylov_nicolaides", {}, "outer"),
        ("krylov_nicolaides", {"damping_mode": "pi"}, "outer"),
        # (A ⊗ G + λI)⁻¹ is no Kronecker product: M⁻¹1 is a full matrix
        ("krylov_nicolaides", {"inverse_method": "eigen", "damping_mode": "eigen_sum"}, "dense"),
        ("residual", {}, "split"),
        ("krylov_residual", {}, "split"),
        # rebuilt at every step, on parts too
        ("residual", {"coarse_refresh": "faithful"}, "split"),
        ("krylov_residual", {"coarse_refresh": "faithful"}, "split"),
    ],
)
def test_each_space_keeps_its_basis_in_its_form(
    space: str, settings: dict[str, Any], form: str
) -> None:
    """The Nicolaides ``1·1ᵀ``, the spectral ``q_G q_Aᵀ`` and, under a factored damping,
    the Krylov-Nicolaides ``{1, (G⁻¹1)(A⁻¹1)ᵀ}`` are held as their factors, the residual
    spaces' vectors as split parts; the steps on parts read them in place (or the one
    value of ``1·1ᵀ``): no split copy of the basis."""
    model = _model()
    opt = tk.TwoLevelKFAC(
        model, lr=0.05, coarse_space=space, cov_interval=2, inv_interval=2, **settings
    )
    for step in range(2):  # a refresh, then a step on parts
        one_step(model, opt, *make_batch((6,), 3, 10, seed=step))
    level = opt.preconditioner.coarse_level
    assert level is not None and level.basis is not None
    kinds = {"outer": OuterVectors, "split": SplitVectors, "dense": torch.Tensor}
    assert all(type(b) is kinds[form] or isinstance(b, kinds[form]) for b in level.basis)
    operator = level.coarse_operator
    assert operator is not None
    if form == "split":
        (split,) = operator._split.values()
        for entry, b in zip(split, level.basis, strict=True):
            assert isinstance(b, SplitVectors) and isinstance(entry, tuple)
            assert entry[0].data_ptr() == b.weight.data_ptr() and entry[1] is b.bias
    if form == "outer":
        (split,) = operator._split.values()
        for entry, b in zip(split, level.basis, strict=True):
            if space in ("nicolaides", "tselepidis"):
                assert isinstance(entry, ConstantPart) and float(entry.value) == 1.0
                continue
            assert isinstance(entry, OuterPart) and isinstance(b, OuterVectors)
            assert entry.left is b.left
            assert entry.right_weight.untyped_storage().data_ptr() == (
                b.right.untyped_storage().data_ptr()
            )
    # the public attribute is the dense basis either way
    public = opt.preconditioner.basis
    assert public is not None
    for got, b in zip(public, level.basis, strict=True):
        assert torch.equal(got, dense_layer(b))


@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("space", ["spectral", "krylov_nicolaides", "residual", "krylov_residual"])
def test_steps_equal_those_of_the_same_basis_formed_densely(space: str, combination: str) -> None:
    """Against an independent reference: a twin whose level forms the same basis densely
    (so it takes the dense restriction, prolongation, ``F_c`` and ``W₀``), in float64, on
    refresh steps and on the steps between them."""
    settings = {
        "lr": 0.05,
        "coarse_space": space,
        "combination": combination,
        "cov_interval": 2,
        "inv_interval": 2,
        "damping": 0.05,
    }
    model = _model().double()
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    opt, dense = tk.TwoLevelKFAC(model, **settings), tk.TwoLevelKFAC(twin, **settings)
    level = dense.preconditioner.coarse_level
    assert level is not None
    build = level.build_basis
    level.build_basis = lambda minv_res: dense_basis(build(minv_res))  # type: ignore[method-assign]
    for step in range(5):
        x, y = make_batch((6,), 3, 10, seed=step)
        one_step(model, opt, x.double(), y)
        one_step(twin, dense, x.double(), y)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-13)
    params = zip(model.parameters(), initial.parameters(), strict=True)
    assert all(not torch.equal(p, q) for p, q in params)
