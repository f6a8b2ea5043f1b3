"""``tlkfac bench intervals``: the summary that picks the default refresh intervals, and
the ``--quick`` run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twolevel_kfac.bench.intervals import loss_at, summarize
from twolevel_kfac.cli import main


def run(setting: str, seconds: list[float], losses: list[float], seed: int = 0) -> dict:
    return {
        "problem": "p",
        "setting": setting,
        "seed": seed,
        "step": [5.0 * (k + 1) for k in range(len(seconds))],
        "wall_time_s": seconds,
        "train_loss": losses,
    }


def test_loss_at_takes_the_last_logged_loss_by_then() -> None:
    r = run("T1", [1.0, 2.0, 3.0], [9.0, 8.0, 7.0])
    assert loss_at(r, 2.5) == 8.0 and loss_at(r, 3.0) == 7.0 and loss_at(r, 0.5) == 9.0


def test_the_setting_with_the_lowest_loss_at_equal_time_wins() -> None:
    # T1 is better per step (6 vs 7 at the end) but slower: at the fast run's 2 s it is at 8
    runs = [
        run("T1", [1.0, 2.0, 3.0], [9.0, 8.0, 6.0]),
        run("T10", [0.5, 1.0, 2.0], [9.0, 8.0, 7.0]),
    ]
    summary = summarize(runs)
    assert summary["best"] == "T10"
    assert summary["mean_score"] == pytest.approx({"T1": 8 / 7, "T10": 1.0})
    cells = {c["setting"]: c for c in summary["cells"]}
    assert cells["T1"]["loss_at_end"] == 6.0 and cells["T1"]["budget_s"] == 2.0


def test_intervals_quick(tmp_path: Path) -> None:
    assert main(["bench", "intervals", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "intervals.json").read_text())
    assert {r["setting"] for r in data["runs"]} == {"old_T1_eigen", "T1", "T10"}
    assert all(r["train_loss"] and r["wall_time_s"] for r in data["runs"])
    assert data["summary"]["best"] in data["summary"]["mean_score"]
    assert (tmp_path / "intervals_curves.png").stat().st_size > 5000
    assert "Best: **" in (tmp_path / "intervals.md").read_text()
