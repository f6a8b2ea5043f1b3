"""Finished runs kept without their checkpoints (``result.json``) and ``problem.clock``."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest

from test_runner import TINY_PROBLEM, _data
from twolevel_kfac.experiments.comparison import run_one
from twolevel_kfac.experiments.config import ExperimentConfig, parse_config
from twolevel_kfac.experiments.metrics import read_metrics
from twolevel_kfac.experiments.report import markdown_table, summarize
from twolevel_kfac.experiments.run_state import RESULT_FILE
from twolevel_kfac.experiments.runner import train_run


def _comparison(lr: float = 0.05, **problem: Any) -> ExperimentConfig:
    return parse_config(
        {
            "problem": {**TINY_PROBLEM, "epochs": 2, "seeds": [0], **problem},
            "methods": {"sgd": {"lr": lr}},
        }
    )


def test_finished_run_is_kept_without_its_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "sgd" / "seed0"
    first = run_one(_comparison(), "sgd", 0, run_dir, data=_data(), progress=False)
    assert first.finished and first.step == 10
    saved = json.loads((run_dir / RESULT_FILE).read_text())
    assert saved == {
        "fingerprint": _comparison().for_run("sgd", 0).fingerprint(),
        "stop_reason": "epochs",
        "step": 10,
        "epochs": 2,
        "time_budget_s": None,
        "clock": "wall",
    }
    (run_dir / "checkpoint.pt").unlink()  # what a commit of the small files keeps
    kept = run_one(_comparison(), "sgd", 0, run_dir, data=_data(), progress=False)
    assert (kept.finished, kept.stop_reason, kept.step) == (True, "epochs", 10)
    assert kept.records == first.records == read_metrics(run_dir / "metrics.jsonl")
    assert not (run_dir / "checkpoint.pt").exists()  # not trained again
    with pytest.raises(ValueError, match=r"another config.*--fresh"):
        run_one(_comparison(lr=0.1), "sgd", 0, run_dir, data=_data(), progress=False)
    again = run_one(
        _comparison(lr=0.1), "sgd", 0, run_dir, data=_data(), progress=False, fresh=True
    )
    assert again.finished and (run_dir / "checkpoint.pt").exists()
    assert again.records != first.records


def test_a_kept_run_answers_only_its_own_limits(tmp_path: Path) -> None:
    """More epochs than a kept run (no checkpoint) finished with are refused, naming
    --fresh; a run continued from its checkpoint drops its old result until it finishes
    again; missing or cut metrics are refused."""
    run_dir = tmp_path / "run"
    run_one(_comparison(), "sgd", 0, run_dir, data=_data(), progress=False)
    metrics = (run_dir / "metrics.jsonl").read_text()
    checkpoint = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").unlink()
    more = _comparison(epochs=5)
    with pytest.raises(
        ValueError, match=r"other limits \(epochs: \[2\] then, \[5\] now\).*--fresh"
    ):
        run_one(more, "sgd", 0, run_dir, data=_data(), progress=False)
    (run_dir / "checkpoint.pt").write_bytes(checkpoint)  # with it, the run continues
    stopped = run_one(more, "sgd", 0, run_dir, data=_data(), progress=False, max_steps=13)
    assert not stopped.finished and not (run_dir / RESULT_FILE).exists()
    done = run_one(more, "sgd", 0, run_dir, data=_data(), progress=False)
    assert done.finished and done.step == 25 and (run_dir / RESULT_FILE).exists()
    (run_dir / "checkpoint.pt").unlink()
    (run_dir / "metrics.jsonl").write_text(metrics)  # the records of the 2-epoch run
    with pytest.raises(
        ValueError, match=r"finished at step 25, but its metrics.jsonl ends at step 10"
    ):
        run_one(more, "sgd", 0, run_dir, data=_data(), progress=False)
    (run_dir / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match="ends at no record"):
        run_one(more, "sgd", 0, run_dir, data=_data(), progress=False)


def test_unreadable_result_is_named(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RESULT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"result\.json cannot be read"):
        run_one(_comparison(), "sgd", 0, run_dir, data=_data(), progress=False)


def test_unfinished_run_writes_no_result(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_one(_comparison(), "sgd", 0, run_dir, data=_data(), progress=False, max_steps=3)
    assert not result.finished and not (run_dir / RESULT_FILE).exists()


def test_cpu_clock_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``clock: cpu`` stops on the process's CPU seconds, ``wall`` does not read them."""
    ticks = itertools.count()  # each process_time() call advances 1 "CPU second"
    monkeypatch.setattr(time, "process_time", lambda: float(next(ticks)))
    config = _comparison(time_budget_s=2.5, clock="cpu", epochs=50).for_run("sgd", 0)
    result = train_run(config, tmp_path / "cpu", data=_data(), progress=False)
    assert (result.stop_reason, result.step) == ("time_budget", 3)
    assert result.records[-1]["cpu_time_s"] == 3.0
    assert result.records[-1]["wall_time_s"] < 2.5
    wall = _comparison(time_budget_s=2.5, epochs=2).for_run("sgd", 0)
    assert train_run(wall, tmp_path / "wall", data=_data(), progress=False).stop_reason == "epochs"


def test_report_reads_the_clock() -> None:
    run = [
        {
            "event": "epoch",
            "epoch": 1,
            "step": 5,
            "train_loss": 2.0,
            "wall_time_s": 10.0,
            "cpu_time_s": 4.0,
        },
        {
            "event": "epoch",
            "epoch": 2,
            "step": 10,
            "train_loss": 1.0,
            "wall_time_s": 30.0,
            "cpu_time_s": 8.0,
        },
    ]
    results = {"kfac": [run]}
    assert summarize(results, 1.5)[0]["sec_per_epoch"] == 15.0
    cpu = summarize(results, 1.5, clock="cpu")[0]
    assert cpu["sec_per_epoch"] == 4.0 and cpu["time_to_target"][0] == 8.0
    header = markdown_table(results, 1.5, clock="cpu").splitlines()[0]
    assert "CPU s / epoch" in header and "CPU s to loss ≤ 1.5" in header
