"""Progress off a terminal: occasional plain lines instead of a tqdm bar's carriage returns."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from twolevel_kfac.experiments.progress import ProgressLines, progress_bar


def test_lines_every_interval_with_rate_and_postfix() -> None:
    out = io.StringIO()
    with ProgressLines(total=10, desc="kfac seed 0", initial=2, interval=0.0, file=out) as bar:
        bar.update(3)
        bar.set_postfix(epoch=1, loss="0.5")
        bar.update(5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("kfac seed 0: 5/10 (50 %), 00:00 elapsed, about 00:00 left")
    assert lines[1].startswith("kfac seed 0: 10/10 (100 %)")
    assert "left" not in lines[1]
    assert lines[1].endswith(", epoch 1, loss 0.5")


def test_nothing_before_the_interval() -> None:
    out = io.StringIO()
    bar = ProgressLines(total=5, desc="x", interval=3600.0, file=out)
    for _ in range(5):
        bar.update()
    bar.close()
    assert out.getvalue() == ""


def test_progress_bar_picks_lines_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress_bar(4, "x", enabled=True), ProgressLines)
    quiet = progress_bar(4, "x", enabled=False)
    assert not isinstance(quiet, ProgressLines) and quiet.disable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress_bar(4, "x", enabled=True)
    assert not isinstance(bar, ProgressLines)
    bar.close()


def test_a_run_off_a_terminal_writes_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tlkfac run`` under nohup or a batch job: its stderr gets progress lines."""
    from tests.experiments.test_runner import _config, _data

    from twolevel_kfac.experiments import progress
    from twolevel_kfac.experiments.runner import train_run

    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    train_run(_config(epochs=2), tmp_path / "run", data=_data(), progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kfac seed 0: ")]
    assert [ln.split(" ")[3] for ln in lines] == [f"{k}/10" for k in range(1, 11)]
    assert lines[-1].endswith(", epoch 2, loss " + lines[-1].rsplit(" ", 1)[1])
    train_run(_config(epochs=1), tmp_path / "quiet", data=_data(), progress=False)
    assert "kfac seed 0: " not in capsys.readouterr().err
