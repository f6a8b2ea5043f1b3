"""The grid search's score: the paper's lowest epoch train loss, a NaN-diverged run last,
and a run that blew up to a finite loss after the others."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from tests.experiments.test_cli import SMOKE_COMPARE

from twolevel_kfac.experiments import tuning
from twolevel_kfac.experiments.tuning import Score, _score


def _epochs(*losses: float, diverged: bool = False) -> list[dict[str, Any]]:
    records = [{"event": "epoch", "epoch": k + 1, "train_loss": v} for k, v in enumerate(losses)]
    if diverged:
        records[-1]["diverged"] = True
    return records


def test_score_of_runs() -> None:
    assert _score(_epochs(5.0, 3.0, 2.0)) == Score(2.0, 5.0, 2.0)
    assert not _score(_epochs(5.0, 3.0, 4.0)).blew_up  # ended above its best, below its first
    blown = _score(_epochs(900.0, 861.0, 2.5e10))
    assert blown.blew_up and blown.best == 861.0
    assert blown.text() == "861 (blew up: 2.5e+10)"
    assert _score(_epochs(5.0, math.nan)).blew_up  # the last epoch had no finite loss
    assert _score(_epochs(5.0, 3.0, diverged=True)).text() == "diverged"
    assert _score([]).best == math.inf
    ranked = sorted([blown, _score(_epochs(5.0, 3.0)), Score(math.inf)], key=Score.rank)
    assert [s.best for s in ranked] == [3.0, 861.0, math.inf]


def test_tune_passes_over_a_run_that_blew_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lr 0.1 reached the lowest loss on the way to a finite blow-up: lr 0.01 is chosen."""
    curves = {"lr0.1_damping0.1": _epochs(50.0, 1.0, 3e9), "lr0.01_damping0.1": _epochs(50.0, 9.0)}
    monkeypatch.setattr(tuning, "load_data", lambda *a: None)
    monkeypatch.setattr(
        tuning,
        "run_one",
        lambda config, label, seed, run_dir, **kw: SimpleNamespace(records=curves[run_dir.name]),
    )
    raw = yaml.safe_load(Path(SMOKE_COMPARE).read_text())
    raw["tune"] = {"methods": ["kfac"], "lr": [0.1, 0.01], "damping": [0.1], "epochs": 2}
    lines: list[str] = []
    chosen, path = tuning.run_tuning(raw, tmp_path, progress=False, log=lines.append)
    assert chosen["kfac"] == (0.01, 0.1, 9.0)
    assert yaml.safe_load(path.read_text())["methods"]["kfac"]["lr"] == 0.01
    table = (tmp_path / "tune.md").read_text()
    assert "| 0.1 | 1 (blew up: 3e+09) |" in table and "| 0.01 | **9** |" in table
    assert "kfac lr0.1_damping0.1: 1 (blew up: 3e+09)" in lines
