"""``tlkfac bench asdl_target``: the time-to-target reading, and the ``--quick`` run when
ASDL (the ``bench`` extra) is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twolevel_kfac.bench import asdl_target, external
from twolevel_kfac.bench.asdl_target import time_to
from twolevel_kfac.cli import main


def test_time_to_is_the_end_of_the_first_epoch_at_the_target() -> None:
    run = {
        "curve": [{"wall_time_s": t, "train_loss": v} for t, v in ((1, 9.0), (2, 5.0), (3, 4.0))]
    }
    assert time_to(run, 5.0) == 2 and time_to(run, 4.5) == 3 and time_to(run, 1.0) is None


def test_a_run_that_raises_counts_as_diverged_and_is_listed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ASDL's Cholesky raises on a factor that is not positive definite: that grid point is
    a diverged run (final loss NaN, never the best), and the report names it."""
    from types import SimpleNamespace

    import torch

    def failing_step(*_: object) -> object:
        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            raise torch.linalg.LinAlgError("linalg.cholesky: not positive-definite\nmore")

        return step

    monkeypatch.setattr(asdl_target, "make_step", failing_step)
    problem = SimpleNamespace(model=SimpleNamespace(name="mlp_classifier", kwargs={}), batch_size=2)
    data = SimpleNamespace(train=(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
    monkeypatch.setattr(
        "twolevel_kfac.experiments.models.build_model", lambda *a, **k: torch.nn.Linear(3, 2)
    )
    run = asdl_target.train("asdl", problem, data, 0.1, 1e-4, 0, 3)
    assert run["error"] == "linalg.cholesky: not positive-definite"
    assert len(run["curve"]) == 1 and run["curve"][0]["train_loss"] != run["curve"][0]["train_loss"]
    result = {
        "problem": "p", "best": {"ours": {"lr": 1, "damping": 1}, "asdl": {"lr": 1, "damping": 1}},
        "tuning": [run], "runs": [], "finals": {"ours": 1.0, "asdl": 2.0}, "target": 2.1,
        "times": {"ours": 1.0, "asdl": None},
    }  # fmt: skip
    data_doc = {
        "benchmark": "asdl_target",
        "settings": {"quick": False, "grid": {}, "seeds": [0]},
        "environment": {"torch": "x", "python": "x", "machine": "x", "cpus": 2, "threads": 1},
        "results": [result],
    }
    text = asdl_target.render(data_doc)
    assert "* p, asdl lr 0.1 λ 0.0001 seed 0: linalg.cholesky: not positive-definite" in text
    # strict JSON has no NaN: the diverged loss is written as null and read back as such
    from twolevel_kfac.bench.report import read_json, write_json

    write_json(tmp_path, "asdl_target", data_doc)
    assert "NaN" not in (tmp_path / "asdl_target.json").read_text()
    again = read_json(tmp_path, "asdl_target")
    assert again["results"][0]["tuning"][0]["curve"][0]["train_loss"] is None
    assert asdl_target.render(again) == text
    assert time_to(again["results"][0]["tuning"][0], 10.0) is None


@pytest.mark.skipif(external.asdl_status() is not None, reason="ASDL (bench extra) not installed")
def test_asdl_target_quick(tmp_path: Path) -> None:
    args = ["bench", "asdl_target", "--quick", "--threads", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    data = json.loads((tmp_path / "asdl_target.json").read_text())
    (result,) = data["results"]
    assert {r["library"] for r in result["runs"]} == {"ours", "asdl"}
    assert result["target"] >= max(result["finals"].values())
    assert (tmp_path / "asdl_target_curves.png").stat().st_size > 5000
