"""One contract for every fine level (:class:`~twolevel_kfac.optim.fine.FineLevel` and its
extensions in ``optim/levels.FINE_LEVELS``): each test runs on KFAC, EKFAC, KPSVD and
KFAC-corrected alike, fitted to the same exact statistics of a small float64 network.

The contract: ``M⁻¹`` is a linear, symmetric, positive definite operator per layer; the
split, rank-one and joined applications agree; damping is a call-time argument (a cached
inverse never leaks across dampings); a checkpoint restores the same operator.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oracles import capture_layer_stats, outer_matrix
from twolevel_kfac.curvature.blocks import LayerStats, layer_shape
from twolevel_kfac.optim.levels import FINE_LEVELS
from twolevel_kfac.optim.preconditioner import KFACPreconditioner

NAMES = sorted(FINE_LEVELS)


def fitted(fine: str, damping: float = 0.05) -> KFACPreconditioner:
    """A preconditioner with fine level ``fine`` fitted to one batch's exact statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)
    ).double()
    x = torch.randn(7, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    stats = capture_layer_stats(model, lambda out, t: F.cross_entropy(out, t), x, y)
    pre = KFACPreconditioner(
        model, fine=fine, damping=damping, ema_decay=0.0, kl_clip=None, fisher="empirical"
    )
    pre.remove_hooks()
    pre.fit({name: LayerStats(a, g) for name, (a, g) in stats.items()})
    return pre


def dense_inverse(pre: KFACPreconditioner, name: str) -> torch.Tensor:
    """``M_i⁻¹`` as a dense matrix (its columns are the images of the unit matrices)."""
    d_out, d_in = layer_shape(pre.layers[name])
    eye = torch.eye(d_out * d_in, dtype=torch.float64)
    return torch.stack([pre.apply_fine(name, e.reshape(d_out, d_in)).reshape(-1) for e in eye])


@pytest.fixture(params=NAMES)
def pre(request: pytest.FixtureRequest, float64: None) -> KFACPreconditioner:
    return fitted(request.param)


def test_the_inverse_is_linear_symmetric_and_positive_definite(pre: KFACPreconditioner) -> None:
    for name in pre.layers:
        inverse = dense_inverse(pre, name)
        torch.testing.assert_close(inverse, inverse.T, rtol=1e-9, atol=1e-12)
        assert float(torch.linalg.eigvalsh(inverse).min()) > 0
        shape = layer_shape(pre.layers[name])
        u, v = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
        combined = pre.apply_fine(name, 2.0 * u - 3.0 * v)
        expected = 2.0 * pre.apply_fine(name, u) - 3.0 * pre.apply_fine(name, v)
        torch.testing.assert_close(combined, expected, rtol=1e-10, atol=1e-12)


def test_split_rank_one_and_joined_applications_agree(pre: KFACPreconditioner) -> None:
    for name in pre.layers:
        d_out, d_in = layer_shape(pre.layers[name])
        matrix = torch.randn(d_out, d_in, dtype=torch.float64)
        joined = pre.apply_fine(name, matrix)
        weight, bias = pre.fine.apply_split(name, matrix[:, :-1], matrix[:, -1], pre.damping)
        assert bias is not None
        torch.testing.assert_close(torch.cat([weight, bias[:, None]], 1), joined)
        out = (
            torch.empty(d_out, d_in - 1, dtype=torch.float64),
            torch.empty(d_out, dtype=torch.float64),
        )
        pre.fine.apply_split(name, matrix[:, :-1], matrix[:, -1], pre.damping, out)
        torch.testing.assert_close(torch.cat([out[0], out[1][:, None]], 1), joined)
        left, right = (
            torch.randn(d_out, dtype=torch.float64),
            torch.randn(d_in, dtype=torch.float64),
        )
        torch.testing.assert_close(
            outer_matrix(pre.apply_fine_outer(name, left, right)),
            pre.apply_fine(name, torch.outer(left, right)),
            rtol=1e-10,
            atol=1e-12,
        )


def test_the_dense_form_is_the_operator(pre: KFACPreconditioner) -> None:
    """``FineLevel.dense_inverse`` (the oracles' dense form) equals the operator applied to
    unit matrices here, and for KFAC the dense damped ``(T·kron(G + λI, A + λI))⁻¹``."""
    from oracles import dense_kfac_matrix

    for name in pre.layers:
        dense = pre.fine.dense_inverse(name, pre.damping)
        torch.testing.assert_close(dense, dense_inverse(pre, name).T, rtol=0, atol=0)
        if pre.fine.plain:
            f = pre.factors[name]
            block = dense_kfac_matrix(f.A, f.G, pre.damping) * f.num_locations
            torch.testing.assert_close(dense, torch.linalg.inv(block), rtol=1e-8, atol=1e-10)


def test_damping_is_a_call_time_argument(pre: KFACPreconditioner) -> None:
    """The same fitted level applied with λ₁, λ₂, λ₁ gives each damping's own operator:
    the one a level fitted with that damping gives (no cached inverse leaks across)."""
    name = next(iter(pre.layers))
    matrix = torch.randn(*layer_shape(pre.layers[name]), dtype=torch.float64)
    results = []
    for damping in (0.05, 0.5, 0.05):
        pre.damping = damping
        results.append(pre.apply_fine(name, matrix))
    assert torch.equal(results[0], results[2])
    other = fitted(pre.fine.name, damping=0.5)
    torch.testing.assert_close(results[1], other.apply_fine(name, matrix), rtol=1e-12, atol=0)
    assert not torch.allclose(results[0], results[1])


def test_a_checkpoint_restores_the_same_operator(pre: KFACPreconditioner) -> None:
    fresh = KFACPreconditioner(
        pre.model, fine=pre.fine.name, damping=0.05, ema_decay=0.0, kl_clip=None
    )
    fresh.remove_hooks()
    fresh.load_state_dict(pre.state_dict())
    for name in pre.layers:
        torch.testing.assert_close(
            dense_inverse(fresh, name), dense_inverse(pre, name), rtol=0, atol=0
        )
