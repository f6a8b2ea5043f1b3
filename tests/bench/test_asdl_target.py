"""``tlkfac bench asdl_target``: the time-to-target reading, and the ``--quick`` run when
ASDL (the ``bench`` extra) is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twolevel_kfac.bench import external
from twolevel_kfac.bench.asdl_target import time_to
from twolevel_kfac.cli import main


def test_time_to_is_the_end_of_the_first_epoch_at_the_target() -> None:
    run = {
        "curve": [{"wall_time_s": t, "train_loss": v} for t, v in ((1, 9.0), (2, 5.0), (3, 4.0))]
    }
    assert time_to(run, 5.0) == 2 and time_to(run, 4.5) == 3 and time_to(run, 1.0) is None


@pytest.mark.skipif(external.asdl_status() is not None, reason="ASDL (bench extra) not installed")
def test_asdl_target_quick(tmp_path: Path) -> None:
    args = ["bench", "asdl_target", "--quick", "--threads", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    data = json.loads((tmp_path / "asdl_target.json").read_text())
    (result,) = data["results"]
    assert {r["library"] for r in result["runs"]} == {"ours", "asdl"}
    assert result["target"] >= max(result["finals"].values())
    assert (tmp_path / "asdl_target_curves.png").stat().st_size > 5000
