"""The coarse level on weight and bias parts (:mod:`twolevel_kfac.twolevel.parts`) equals
the one on the joined ``W̄ = [V, b]`` matrices, for every kind of basis."""

from __future__ import annotations

import pytest
import torch

from twolevel_kfac.twolevel.coarse_matrix import prolong_add_into, restrict
from twolevel_kfac.twolevel.coarse_spaces import krylov_nicolaides, nicolaides
from twolevel_kfac.twolevel.parts import (
    ConstantPart,
    prolong_add_into_parts,
    restrict_parts,
    split_basis,
)

SHAPES = [(4, 6), (3, 5), (2, 3)]  # (d_out, d_in') per layer
HAS_BIAS = [True, False, True]  # the second layer's W̄ is its weight alone


def _bases() -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ones = nicolaides(SHAPES, dtype=torch.float64)
    padded = [b.clone() for b in ones]
    padded[0][:, 1] = 0.0  # a zeroed row (an embedding's padding_idx): no longer constant
    return {
        "nicolaides": ones,
        "nicolaides_padded": padded,
        "krylov": krylov_nicolaides(
            SHAPES, lambda v: [x * x.sum() for x in v], dtype=torch.float64
        ),
        "random": [torch.randn(2, *s, generator=gen, dtype=torch.float64) for s in SHAPES],
    }


def _parts(joined: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [
        (m[:, :-1].contiguous(), m[:, -1].contiguous()) if bias else (m.clone(), None)
        for m, bias in zip(joined, HAS_BIAS, strict=True)
    ]


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
    return [w if b is None else torch.cat([w, b[:, None]], 1) for w, b in parts]


@pytest.mark.parametrize("kind", ["nicolaides", "nicolaides_padded", "krylov", "random"])
def test_parts_equal_the_joined_matrices(kind: str) -> None:
    basis = _bases()[kind]
    split = split_basis(basis, HAS_BIAS)
    constant = [isinstance(entry, ConstantPart) for entry in split]
    # only the Nicolaides layers whose vector kept all its entries equal skip the basis
    expected_constant = {
        "nicolaides": [True, True, True],
        "nicolaides_padded": [False, True, True],
    }.get(kind, [False, False, False])
    assert constant == expected_constant
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in SHAPES]
    restricted = restrict_parts(split, _parts(v))
    torch.testing.assert_close(restricted, restrict(basis, v), rtol=1e-13, atol=1e-13)
    target = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in SHAPES]
    parts = _parts(target)
    expected = prolong_add_into(basis, restricted, [t.clone() for t in target], -0.7)
    assert prolong_add_into_parts(split, restricted, parts, -0.7) is parts
    for got, want in zip(_joined(parts), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
