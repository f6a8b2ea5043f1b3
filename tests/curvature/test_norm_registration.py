"""A norm subclass that overrides ``forward`` (timm's ``LayerNorm``, ``BatchNormAct2d``,
``LayerNorm2d``) registered by the user as the fallback warning says: the printed
registration runs as written, and the probe checks it unit-wise at the first captured
forward (norm registrations were not probed before 2026-12-09: a BatchNorm with an
activation inside registered as a BatchNorm stepped 7–191 % off, silently)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk


class FusedLayerNorm(nn.LayerNorm):
    """timm's ``LayerNorm``: the same map through ``F.layer_norm``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class NormAct(nn.BatchNorm1d):
    """timm's ``BatchNormAct``: a batch norm, then an activation inside ``forward``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x) + 0.1)


class ChannelsNorm(nn.LayerNorm):
    """timm's ``LayerNorm2d``: normalises the channels of ``[N, C, L]``."""

    def forward(self, x: Tensor) -> Tensor:
        moved = x.transpose(1, 2)
        out = F.layer_norm(moved, self.normalized_shape, self.weight, self.bias, self.eps)
        return out.transpose(1, 2)


@pytest.fixture
def registration() -> Iterator[list[type[nn.Module]]]:
    """Types registered by the test, removed afterwards (the registry is global)."""
    kinds: list[type[nn.Module]] = []
    yield kinds
    for kind in kinds:
        tk.unregister_layer_type(kind)


def register_as_printed(kind: type[nn.Module], model: nn.Module) -> None:
    """Run the ``tk.register_layer_type(...)`` call the construction warning prints."""
    with pytest.warns(UserWarning) as caught:
        tk.KFAC(model, norm_blocks=True)
    text = " ".join(str(w.message) for w in caught)
    call = re.search(r"tk\.register_layer_type\(.*?\)\.statistics\)", text)
    assert call is not None, text
    assert "record=" in call.group(0) and "statistics=" in call.group(0)
    eval(call.group(0), {"tk": tk, "nn": nn, kind.__name__: kind})


def model_of(norm: nn.Module, width: int = 5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), norm, nn.Tanh(), nn.Linear(width, 3))


def steps(model: nn.Module, count: int = 2) -> Tensor:
    opt = tk.KFAC(model, norm_blocks=True, fisher="empirical", cov_interval=1, kl_clip=None)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    for _ in range(count):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_norm_registered_as_printed_steps_as_its_base(
    float64: None, registration: list[type[nn.Module]]
) -> None:
    register_as_printed(FusedLayerNorm, model_of(FusedLayerNorm(5)))
    registration.append(FusedLayerNorm)
    torch.testing.assert_close(
        steps(model_of(FusedLayerNorm(5))), steps(model_of(nn.LayerNorm(5))), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize(
    ("kind", "norm"),
    [(NormAct, lambda: NormAct(5)), (ChannelsNorm, lambda: ChannelsNorm(5))],
    ids=["activation inside", "another dimension"],
)
def test_a_norm_that_is_not_its_base_is_refused_by_the_probe(
    registration: list[type[nn.Module]], kind: type[nn.Module], norm: object
) -> None:
    register_as_printed(kind, model_of(norm()))  # type: ignore[operator]
    registration.append(kind)
    model = model_of(norm()) if kind is NormAct else nn.Sequential(nn.Conv1d(4, 5, 1), norm())  # type: ignore[operator]
    opt = tk.KFAC(model, norm_blocks=True, fisher="empirical")
    x = torch.randn(8, 4) if kind is NormAct else torch.randn(8, 4, 6)
    with pytest.raises(ValueError, match=rf"registered for {kind.__name__} do not reproduce"):
        model(x).square().mean().backward()
        opt.step()
