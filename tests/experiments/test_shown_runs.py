"""Which runs ``tlkfac report`` and ``tlkfac compare`` show (``experiments/shown_runs``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twolevel_kfac.cli import main
from twolevel_kfac.experiments.config import load_config
from twolevel_kfac.experiments.shown_runs import shown_runs

SMOKE_COMPARE = Path(__file__).resolve().parents[2] / "configs" / "smoke" / "compare.yaml"


def _config(tmp_path: Path, sgd_lr: str = "1.0e-2") -> str:
    path = tmp_path / f"compare_{sgd_lr}.yaml"
    text = SMOKE_COMPARE.read_text().replace("sgd: {lr: 1.0e-2}", f"sgd: {{lr: {sgd_lr}}}")
    path.write_text(text)
    return str(path)


def test_the_report_shows_unfinished_runs_as_compare_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``compare --max-steps 3`` reports its call's runs as they stand, but ``tlkfac report
    DIR`` then failed ("no run finished"): a user who stopped a long comparison to look
    had no report. Both show them now, named as unfinished in the notes."""
    out = tmp_path / "cmp"
    argv = ["compare", _config(tmp_path), "--out", str(out), "--quiet", "--seeds", "0"]
    assert main([*argv, "--methods", "kfac,sgd", "--max-steps", "3"]) == 0
    compared = (out / "report.md").read_text()
    note = "Unfinished, shown as they stand"
    assert note in compared and "kfac/seed0 (step 3), sgd/seed0 (step 3)" in compared
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unfinished, shown as they stand: kfac/seed0 (step 3), sgd/seed0 (step 3)" in printed
    assert "left out" not in printed
    assert (out / "report.md").read_text() == compared
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == {"unfinished": {"kfac/seed0": 3, "sgd/seed0": 3}, "left_out": []}
    assert main([*argv, "--methods", "kfac,sgd"]) == 0  # finished: no longer named
    finished = (out / "report.md").read_text()
    assert note not in finished and "| kfac | 1 |" in finished and "| sgd | 1 |" in finished
    assert json.loads((out / "summary.json").read_text())["runs"]["unfinished"] == {}


def test_unfinished_runs_of_another_config_are_left_out_of_table_notes_and_provenance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SGD's two seeds stopped early under lr 1e-2, then seed 0 rerun to the end under lr
    2e-2 (``--fresh``): seed 1 is another config's run. It is left out of the table, and
    now of the notes' seeds and of the provenance too (both counted every seed folder)."""
    out = tmp_path / "cmp"
    base = ["--out", str(out), "--quiet", "--methods", "sgd"]
    assert main(["compare", _config(tmp_path), *base, "--seeds", "0,1", "--max-steps", "2"]) == 0
    changed = _config(tmp_path, "2.0e-2")
    assert main(["compare", changed, *base, "--seeds", "0", "--fresh"]) == 0
    compared = (out / "report.md").read_text()
    assert "seeds [0]." in compared and "Unfinished" not in compared
    assert "Provenance (1 starts and resumes)" in compared
    assert "Left out (runs in this folder of another method or config): sgd/seed1." in compared
    shown = shown_runs(load_config(out / "compare.yaml"), out)
    assert shown.left_out == ["sgd/seed1"] and shown.unfinished == {}
    assert list(shown.by_method) == ["sgd"] and list(shown.by_method["sgd"]) == [0]
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "left out (not runs of" in capsys.readouterr().out
    assert (out / "report.md").read_text() == compared


def test_a_folder_with_no_run_of_its_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every run another config's: a clear error naming what to do, no report written."""
    out = tmp_path / "cmp"
    base = ["--out", str(out), "--quiet", "--methods", "sgd", "--seeds", "0"]
    assert main(["compare", _config(tmp_path), *base, "--max-steps", "2"]) == 0
    (out / "report.md").unlink()
    other = load_config(_config(tmp_path, "3.0e-2")).model_dump(mode="json")
    import yaml

    (out / "compare.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    assert main(["report", str(out)]) == 2
    assert "no run under" in capsys.readouterr().err
    assert not (out / "report.md").exists()


def test_a_first_comparison_killed_hard_reports_its_unfinished_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``compare`` wrote ``compare.yaml`` after its runs alone: a first comparison killed
    hard (SIGKILL, a scheduler's limit; here the second run dies after 3 steps) left
    none, and ``tlkfac report`` averaged the cut run with the finished ones, unflagged
    (a review: seed 1 at epoch 23 of 40 in the mean). It is written first now."""
    from twolevel_kfac.experiments import comparison

    out = tmp_path / "cmp"
    real = comparison.run_one

    def killed(config: object, label: str, seed: int, *args: object, **kwargs: object) -> object:
        if seed == 1:
            real(config, label, seed, *args, **{**kwargs, "max_steps": 3})  # type: ignore[arg-type]
            raise RuntimeError("killed")
        return real(config, label, seed, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(comparison, "run_one", killed)
    argv = ["compare", _config(tmp_path), "--out", str(out), "--quiet", "--methods", "sgd"]
    assert main([*argv, "--seeds", "0,1"]) == 2  # (the error printed, no report)
    assert (out / "compare.yaml").is_file() and not (out / "report.md").exists()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "unfinished, shown as they stand: sgd/seed1 (step 3)" in capsys.readouterr().out
    assert "Unfinished, shown as they stand" in (out / "report.md").read_text()
