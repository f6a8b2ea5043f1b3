"""The coarse level on weight and bias parts (:mod:`twolevel_kfac.twolevel.parts`) equals
the one on the joined ``W̄ = [V, b]`` matrices, for every kind of basis."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from twolevel_kfac.twolevel.coarse_matrix import prolong_add_into, restrict
from twolevel_kfac.twolevel.coarse_spaces import krylov_nicolaides, nicolaides
from twolevel_kfac.twolevel.layer_basis import (
    LayerBasis,
    OuterVectors,
    dense_basis,
    dense_layer,
    layer_dtype,
    layer_from_state,
)
from twolevel_kfac.twolevel.parts import (
    ConstantPart,
    OuterPart,
    prolong_add_into_parts,
    restrict_parts,
    split_basis,
)

SHAPES = [(4, 6), (3, 5), (2, 3)]  # (d_out, d_in') per layer
HAS_BIAS = [True, False, True]  # the second layer's W̄ is its weight alone


def _bases() -> dict[str, list[LayerBasis]]:
    gen = torch.Generator().manual_seed(0)
    ones = nicolaides(SHAPES, dtype=torch.float64)
    padded = [b.clone() for b in ones]
    padded[0][:, 1] = 0.0  # a zeroed row (an embedding's padding_idx): no longer constant
    ones_outer = [  # 1·1ᵀ as outer products (the optimizer's Nicolaides basis)
        OuterVectors(
            torch.ones(1, d_out, dtype=torch.float64), torch.ones(1, d_in, dtype=torch.float64)
        )
        for d_out, d_in in SHAPES
    ]
    left = ones_outer[0].left.clone()
    left[:, 1] = 0.0
    padded_outer = OuterVectors(left, ones_outer[0].right)
    return {
        "nicolaides": ones,
        "nicolaides_padded": padded,
        "krylov": krylov_nicolaides(
            SHAPES, lambda v: [x * x.sum() for x in v], dtype=torch.float64
        ),
        "random": [torch.randn(2, *s, generator=gen, dtype=torch.float64) for s in SHAPES],
        "ones": ones_outer,
        "ones_padded": [padded_outer, *ones_outer[1:]],
        "outer": [  # two outer products per layer, the spectral space's form
            OuterVectors(
                torch.randn(2, d_out, generator=gen, dtype=torch.float64),
                torch.randn(2, d_in, generator=gen, dtype=torch.float64),
            )
            for d_out, d_in in SHAPES
        ],
    }


def _parts(joined: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [
        (m[:, :-1].contiguous(), m[:, -1].contiguous()) if bias else (m.clone(), None)
        for m, bias in zip(joined, HAS_BIAS, strict=True)
    ]


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
    return [w if b is None else torch.cat([w, b[:, None]], 1) for w, b in parts]


@pytest.mark.parametrize(
    "kind", ["nicolaides", "nicolaides_padded", "krylov", "random", "outer", "ones", "ones_padded"]
)
@pytest.mark.parametrize("dense", [False, True])
def test_parts_equal_the_joined_matrices(kind: str, dense: bool) -> None:
    """On parts and on ``W̄`` matrices, and with outer products kept as their factors or
    formed (``dense``), restriction and prolongation agree."""
    basis = _bases()[kind]
    joined_basis: list[LayerBasis] = list(dense_basis(basis)) if dense else basis
    split = split_basis(basis, HAS_BIAS)
    outer = {"outer": [True] * 3, "ones_padded": [True, False, False]}.get(kind, [False] * 3)
    assert [isinstance(e, OuterPart) for e in split] == outer
    constant = [isinstance(entry, ConstantPart) for entry in split]
    # only the Nicolaides layers whose vector kept all its entries equal skip the basis
    expected_constant = {
        "nicolaides": [True, True, True],
        "nicolaides_padded": [False, True, True],
        "ones": [True, True, True],
        "ones_padded": [False, True, True],
    }.get(kind, [False, False, False])
    assert constant == expected_constant
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in SHAPES]
    restricted = restrict_parts(split, _parts(v))
    torch.testing.assert_close(restricted, restrict(joined_basis, v), rtol=1e-13, atol=1e-13)
    target = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in SHAPES]
    parts = _parts(target)
    expected = prolong_add_into(joined_basis, restricted, [t.clone() for t in target], -0.7)
    assert prolong_add_into_parts(split, restricted, parts, -0.7) is parts
    for got, want in zip(_joined(parts), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def _tensors(b: LayerBasis) -> tuple[torch.Tensor, ...]:
    """The tensors a layer's basis holds."""
    return (b,) if isinstance(b, torch.Tensor) else tuple(b)


def _strided_mlp() -> torch.nn.Module:
    """An MLP whose last weight (hence its ``.grad``) has transposed strides."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    last = model[2]
    last.weight = torch.nn.Parameter(last.weight.detach().t().contiguous().t())
    assert not last.weight.is_contiguous()
    return model


@pytest.mark.parametrize("space", ["residual", "krylov_nicolaides"])
@pytest.mark.parametrize("combination", ["adef1", "balanced"])
def test_a_non_contiguous_gradient_steps_on_parts(space: str, combination: str) -> None:
    """A-DEF1 and balanced copy the gradient before subtracting ``F̂R₀ᵀu``: the copy is
    contiguous (the prolongation views it flat), so a transposed weight's gradient trains,
    with the steps of the ``W̄`` path."""

    import twolevel_kfac as tk

    model = _strided_mlp()
    twin = copy.deepcopy(model)
    settings = {"lr": 0.1, "damping": 0.05, "coarse_space": space, "combination": combination}
    settings |= {"cov_interval": 3, "inv_interval": 3}
    fast, joined = tk.TwoLevelKFAC(model, **settings), tk.TwoLevelKFAC(twin, **settings)
    level = joined.preconditioner.coarse_level
    assert level is not None
    level._steps_on_parts = lambda: False  # type: ignore[method-assign]
    level._refreshes_on_parts = lambda stats: False  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        for net, opt in ((model, fast), (twin, joined)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_spectral_basis_in_the_parameters_dtype() -> None:
    """The spectral basis comes from the factors' eigenvectors: with float64 factors and
    float32 parameters it is cast to the parameters' dtype (the per-sample products with
    the float32 statistics raised a dtype error at the first refresh)."""
    import twolevel_kfac as tk

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = tk.TwoLevelKFAC(
        model, lr=0.1, coarse_space="spectral", combination="adef2", factor_dtype=torch.float64
    )
    for _ in range(3):
        opt.zero_grad()
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    level = opt.preconditioner.coarse_level
    assert level is not None and level.basis is not None
    assert all(layer_dtype(b) == torch.float32 for b in level.basis)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("space", ["krylov_nicolaides", "residual", "spectral"])
def test_a_refresh_builds_its_basis_without_the_old_basis(space: str) -> None:
    """The coarse level drops its old basis (and ``Q`` and ``P`` built on it) before it
    builds the new one, so no tensor of the old basis is alive during the build: the
    refresh's peak holds one basis, not two (``bench memory``, T + 2 steps). The list is
    rebound, not cleared: a state dict taken before keeps the basis it saved."""
    import weakref

    import twolevel_kfac as tk

    for hold in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        settings = {"lr": 0.1, "damping": 0.05, "coarse_space": space, "combination": "adef2"}
        opt = tk.TwoLevelKFAC(model, cov_interval=2, inv_interval=2, **settings)
        level = opt.preconditioner.coarse_level
        assert level is not None
        old: list[weakref.ref[torch.Tensor]] = []
        alive_at_builds: list[bool] = []
        build = level.build_basis

        def watched(minv_res: list[torch.Tensor] | None) -> list[torch.Tensor]:
            alive_at_builds.append(any(ref() is not None for ref in old))  # noqa: B023
            return build(minv_res)  # noqa: B023

        level.build_basis = watched  # type: ignore[method-assign]
        gen = torch.Generator().manual_seed(1)
        saved, copies = None, None
        for step in range(5):  # refreshes (basis builds) at steps 0, 2 and 4
            x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            assert level.basis is not None
            old[:] = [weakref.ref(t) for b in level.basis for t in _tensors(b)]
            if hold and step == 1:
                saved = opt.state_dict()["preconditioner"]["coarse"]["basis"]
                copies = None if saved is None else copy.deepcopy(saved)
        if not hold:
            assert alive_at_builds == [False, False, False]
        elif saved is not None:  # a saved basis (residual) is the one of step 1, intact
            assert copies is not None
            for t, c in zip(saved, copies, strict=True):  # tensors, or {"weight", "bias"}
                assert torch.equal(
                    dense_layer(layer_from_state(t)), dense_layer(layer_from_state(c))
                )


@pytest.mark.parametrize("fine", ["kfac", "ekfac"])
def test_minv_into_writes_over_its_input(fine: str) -> None:
    """``M⁻¹v`` over ``v`` (the residual spaces' ``M⁻¹res``, which the new basis then takes
    over): the same values as ``M⁻¹v`` into fresh tensors, in ``v``'s storage."""
    import twolevel_kfac as tk

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    opt = tk.TwoLevelKFAC(model, lr=0.1, coarse_space="residual", fine=fine)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    level = opt.preconditioner.coarse_level
    assert level is not None
    v = [torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)]
    want = level.minv([t.clone() for t in v])
    pointers = [t.data_ptr() for t in v]
    got = level.minv_into(v)
    assert [t.data_ptr() for t in got] == pointers
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert not torch.equal(want[0], torch.zeros_like(want[0]))


def _one_at_a_time(
    split: list[ConstantPart], v: list[tuple[torch.Tensor, torch.Tensor | None]]
) -> torch.Tensor:
    """``R₀v`` of a Nicolaides basis, one layer at a time: ``value·(Σv_W + Σv_b)``."""
    totals = [w.sum() if b is None else w.sum() + b.sum() for w, b in v]
    return torch.cat(
        [(t.to(e.value.dtype) * e.value).reshape(1) for t, e in zip(totals, split, strict=True)]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("has_bias", [[True, False, True], [True] * 3, [False] * 3])
def test_constant_parts_at_once_equal_one_at_a_time(
    dtype: torch.dtype, has_bias: list[bool]
) -> None:
    """Every layer's Nicolaides value at once (one stack of sums, one ``_foreach_add_``)
    gives the coefficients and the prolongation of one layer at a time bit for bit; with
    parts of two dtypes it takes the loop, with the same numbers."""
    gen = torch.Generator().manual_seed(2)
    values = [torch.rand((), generator=gen, dtype=torch.float64) + 0.1 for _ in SHAPES]
    split = [ConstantPart(x) for x in values]
    for mixed in (False, True):
        v = [
            (
                torch.randn(d_out, d_in - 1 if b else d_in, generator=gen).to(dtype),
                torch.randn(d_out, generator=gen).to(dtype) if b else None,
            )
            for (d_out, d_in), b in zip(SHAPES, has_bias, strict=True)
        ]
        if mixed:  # the first layer in float64: not one dtype, the loop
            v[0] = (v[0][0].double(), None if v[0][1] is None else v[0][1].double())
        restricted = restrict_parts(split, v)
        assert torch.equal(restricted, _one_at_a_time(split, v))
        y, alpha = restricted * 3.0 - 1.0, -0.7
        target = [(w.clone(), None if b is None else b.clone()) for w, b in v]
        assert prolong_add_into_parts(split, y, target, alpha) is target
        for (w, b), (tw, tb), yi, x in zip(v, target, y, values, strict=True):
            shift = (yi * (alpha * x)).to(w.dtype)
            assert torch.equal(tw, w + shift)
            assert (tb is None) == (b is None)
            if b is not None:
                assert torch.equal(tb, b + shift)


@pytest.mark.parametrize("space", ["spectral", "residual", "krylov_residual"])
@pytest.mark.parametrize("fine_weight", [1.0, 0.5])
def test_additive_one_layer_at_a_time_equals_the_whole_fine_step_first(
    space: str, fine_weight: float
) -> None:
    """Between refreshes the additive direction is formed one layer at a time (``M⁻¹g``
    of a layer, then at once its coarse term): bit for bit the whole ``M⁻¹g`` followed by
    :meth:`~twolevel_kfac.twolevel.coarse_matrix.CoarseOperator.add_into_parts`."""
    import twolevel_kfac as tk
    from twolevel_kfac.curvature.blocks import gradient_parts
    from twolevel_kfac.optim.coarse_parts import combine_on_parts

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5, bias=False),
        torch.nn.Tanh(), torch.nn.Linear(5, 3),
    )  # fmt: skip
    settings = {"coarse_space": space, "combination": "additive", "fine_weight": fine_weight}
    opt = tk.TwoLevelKFAC(model, lr=0.1, cov_interval=3, inv_interval=3, **settings)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):  # two refreshes, then a plain step's gradients
        opt.zero_grad()
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if _ < 4:
            opt.step()
    pre, level = opt.preconditioner, opt.preconditioner.coarse_level
    assert level is not None and level.coarse_operator is not None
    names = level.names
    g = [gradient_parts(pre.layers[n]) for n in names]

    def minv_layer(i: int, part: tuple[torch.Tensor, torch.Tensor | None]) -> Any:
        return pre._apply_fine_split(names[i], *part)

    by_layer = combine_on_parts(level, g, minv_layer)
    whole = [minv_layer(i, part) for i, part in enumerate(g)]
    for w, b in whole:
        w.mul_(fine_weight)
        if b is not None:
            b.mul_(fine_weight)
    whole = level.coarse_operator.add_into_parts(level.options.coarse_scale, g, whole)
    for (w1, b1), (w2, b2) in zip(by_layer, whole, strict=True):
        assert torch.equal(w1, w2) and (b1 is None) == (b2 is None)
        assert b1 is None or torch.equal(b1, b2)
