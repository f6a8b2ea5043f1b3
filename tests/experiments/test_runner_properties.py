"""Property test through the runner (hypothesis): for any method of the config registry and
any hyper-parameters in their valid ranges, finite data never yields non-finite parameters.
A diverging run may stop (``stop_reason`` says why) but what it saved stays finite."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from twolevel_kfac.experiments.config import parse_config
from twolevel_kfac.experiments.optimizers import KFAC_FAMILY, TWO_LEVEL_METHODS
from twolevel_kfac.experiments.runner import Data, train_run
from twolevel_kfac.twolevel.combinations import COMBINATIONS


def _data() -> Data:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return Data(train=(x[:40], y[:40]), val=(x[40:50], y[40:50]), test=(x[50:], y[50:]))


kfac_entries = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 1.0),
        "damping": st.floats(1e-6, 1.0),
        "damping_mode": st.sampled_from(["per_factor", "pi", "eigen_sum"]),
        "kl_clip": st.sampled_from([None, 1e-3, 1e-2]),
        "fisher": st.sampled_from(["mc", "empirical"]),
        "fisher_batch": st.floats(0.1, 1.0),
        "cov_interval": st.integers(1, 4),
        "inv_interval": st.integers(1, 4),
        "ema_decay": st.floats(0.0, 0.99),
    }
)


@st.composite
def method_entries(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    method = draw(st.sampled_from([*KFAC_FAMILY, "sgd", "adam"]))
    if method == "sgd":
        return method, {"lr": draw(st.floats(1e-4, 1.0))}
    if method == "adam":
        return method, {"lr": draw(st.floats(1e-5, 0.1))}
    entry = draw(kfac_entries)
    if method == "kfac_corrected":  # A⊗G + A₂⊗G₂ has no eigen_sum form (refused by name)
        entry["damping_mode"] = draw(st.sampled_from(["per_factor", "pi"]))
    if method in TWO_LEVEL_METHODS:
        entry["combination"] = draw(st.sampled_from(sorted(COMBINATIONS)))
    return method, entry


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    choice=method_entries(),
    momentum=st.sampled_from([0.0, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-3]),
    batch_size=st.sampled_from([2, 7, 16]),
)
@example(  # found by this test: the step overflowed the parameters to ±inf before any
    # checkpoint existed, and the run saved them (now: a checkpoint at step 0 is kept)
    choice=(
        "kfac",
        {
            "lr": 1.0,
            "damping": 1e-6,
            "damping_mode": "per_factor",
            "kl_clip": None,
            "fisher": "mc",
            "fisher_batch": 1.0,
            "cov_interval": 1,
            "inv_interval": 1,
            "ema_decay": 0.0,
        },
    ),
    momentum=0.0,
    weight_decay=0.0,
    batch_size=2,
)
def test_finite_data_never_gives_nonfinite_parameters(
    tmp_path: Path,
    choice: tuple[str, dict[str, Any]],
    momentum: float,
    weight_decay: float,
    batch_size: int,
) -> None:
    method, entry = choice
    config = parse_config(
        {
            "problem": {
                "model": {
                    "name": "deep_linear",
                    "kwargs": {"depth": 3, "width": 4, "in_features": 6},
                },
                "dataset": {"name": "in-memory"},
                "loss": "cross_entropy",
                "batch_size": batch_size,
                "epochs": 1,
                "max_consecutive_nonfinite": 3,
            },
            # Nesterov SGD needs a momentum (refused otherwise, tested in test_bad_inputs)
            "defaults": {
                "weight_decay": weight_decay,
                "momentum": 0.9 if method == "sgd" else momentum,
            },
            "methods": {method: entry},
        }
    ).for_run(method, 0)
    run_dir = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    result = train_run(config, run_dir, data=_data(), progress=False, max_steps=6)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(bool(torch.isfinite(t).all()) for t in saved.values()), result.stop_reason
    finite_losses = [r["train_loss"] for r in result.records if math.isfinite(r["train_loss"])]
    assert finite_losses or result.stop_reason != "epochs"
