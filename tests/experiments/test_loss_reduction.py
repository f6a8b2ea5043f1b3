"""``problem.loss_reduction``: the experiment application trains on torch's default
(mean) losses when asked, hands the same convention to the KFAC family, and a ``mean``
run with ``s·lr`` and ``s²·λ`` takes the ``sum`` run's steps (``configs/smoke/run.yaml``)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from twolevel_kfac.experiments.config import load_config, parse_config
from twolevel_kfac.experiments.losses import loss_function
from twolevel_kfac.experiments.metrics import read_metrics
from twolevel_kfac.experiments.runner import train_run

SMOKE_RUN = Path(__file__).resolve().parents[2] / "configs" / "smoke" / "run.yaml"


def test_mean_losses_are_torchs_defaults() -> None:
    gen = torch.Generator().manual_seed(0)
    out, target = torch.randn(5, 7, generator=gen), torch.rand(5, 7, generator=gen)
    assert torch.equal(loss_function("mse", "mean")(out, target), F.mse_loss(out, target))
    bce = loss_function("bce", "mean")(out, target)
    assert torch.equal(bce, F.binary_cross_entropy_with_logits(out, target))
    summed = loss_function("bce", "sum")(out, target)
    torch.testing.assert_close(summed, bce * 7)
    with pytest.raises(ValueError, match="unknown loss 'mae' / reduction 'mean'"):
        loss_function("mae", "mean")


def test_the_kfac_family_gets_the_problems_reduction() -> None:
    config = load_config(SMOKE_RUN)
    assert config.problem.loss_reduction == "mean"
    assert config.method_kwargs("kfac", 0)[1]["loss_reduction"] == "mean"
    raw = copy.deepcopy(config.model_dump(mode="json"))
    raw["problem"]["loss_reduction"] = "median"
    with pytest.raises(ValueError, match="loss_reduction"):
        parse_config(raw)


def test_a_mean_run_takes_the_sum_runs_steps(tmp_path: Path) -> None:
    """Smoke run (BCE, D = 784, pi damping, KL clip): ``mean`` with lr·s, λ·s², η against
    ``sum`` with lr, λ, s·η; losses differ by the factor ``s = 1/784``, parameters agree."""
    mean = load_config(SMOKE_RUN)
    raw = copy.deepcopy(mean.model_dump(mode="json"))
    raw["problem"]["loss_reduction"] = "sum"
    raw["methods"]["kfac"].update(lr=0.1, damping=0.1)
    # weight decay is added after preconditioning: lr_m·η_m = lr_s·η_s, so η_s = s·η_m
    raw["defaults"]["weight_decay"] = mean.defaults.weight_decay / 784
    total = parse_config(raw)
    runs = {}
    for name, config in (("mean", mean), ("sum", total)):
        result = train_run(config.for_run("kfac", 0), tmp_path / name, progress=False, max_steps=6)
        runs[name] = result
    losses = {k: [r["train_loss"] for r in read_metrics(tmp_path / k / "metrics.jsonl")
                  if r["event"] == "step"] for k in runs}  # fmt: skip
    assert len(losses["sum"]) == 3
    for m, s in zip(losses["mean"], losses["sum"], strict=True):
        assert m * 784 == pytest.approx(s, rel=1e-4)
    params = {k: torch.load(tmp_path / k / "checkpoint.pt", weights_only=False)["model"]
              for k in runs}  # fmt: skip
    for key, value in params["sum"].items():
        torch.testing.assert_close(params["mean"][key], value, rtol=1e-4, atol=1e-6)
