"""Provenance of runs and reports, and reference curves read from CSV or JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from twolevel_kfac.experiments import provenance
from twolevel_kfac.experiments.reference_curves import parse_reference, read_reference

ROOT = Path(__file__).resolve().parents[2]


def test_collect_names_the_commit_torch_threads_and_machine() -> None:
    entry = provenance.collect("start")
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    if head.returncode == 0:
        assert entry["git_commit"] == head.stdout.strip()
        assert isinstance(entry["git_dirty"], bool)
    assert entry["torch"] == torch.__version__ and entry["threads"] == torch.get_num_threads()
    assert entry["event"] == "start" and "CPUs" in entry["machine"]


def test_record_appends_and_describe_sums_up(tmp_path: Path) -> None:
    provenance.record(tmp_path, "start")
    provenance.record(tmp_path, "resume")
    entries = provenance.read(tmp_path)
    assert [e["event"] for e in entries] == ["start", "resume"]
    other = {**entries[0], "git_commit": "f" * 40, "git_dirty": True, "threads": 7}
    text = provenance.describe([*entries, other], runs_without=2)
    assert text.startswith("Provenance (3 starts and resumes): commit ")
    assert "fffffff (dirty)" in text and ", 7 thread(s)" in text
    assert "2 run(s) have no provenance.jsonl" in text
    assert provenance.describe([]).startswith("Provenance: not recorded")


def test_describe_runs_reads_a_comparison_directory(tmp_path: Path) -> None:
    for method in ("kfac", "sgd"):
        run = tmp_path / method / "seed0"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("")
    provenance.record(tmp_path / "kfac" / "seed0", "start")
    text = provenance.describe_runs(tmp_path)
    assert "(1 starts and resumes)" in text and "1 run(s) have no provenance.jsonl" in text


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("header.csv", "epoch,time,loss\n1,0.5,3.0\n2,1.0,2.5\n"),
        ("train.csv", "Epoch,Train_Loss\n1,3.0\n2,2.5\n"),
        ("bare.csv", "1,3.0\n2,2.5\n"),
        ("columns.json", json.dumps({"epoch": [1, 2], "loss": [3.0, 2.5]})),
        (
            "rows.json",
            json.dumps([{"epoch": 1, "train_loss": 3.0}, {"epoch": 2, "train_loss": 2.5}]),
        ),
    ],
)
def test_reference_formats(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    curve = read_reference(tmp_path / name)
    assert curve.epochs == (1.0, 2.0) and curve.losses == (3.0, 2.5)
    assert curve.label == Path(name).stem


def test_parse_reference_takes_a_label_and_a_root(tmp_path: Path) -> None:
    (tmp_path / "k.csv").write_text("1,3\n")
    assert parse_reference("their KFAC=k.csv", root=tmp_path).label == "their KFAC"
    assert parse_reference(str(tmp_path / "k.csv")).label == "k"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("x.csv", "epoch,acc\n1,0.5\n", "needs a 'loss' or 'train_loss' column"),
        ("x.csv", "1\n2\n", "every row needs an epoch and a loss"),
        ("x.csv", "epoch,loss\n1,abc\n", "loss values must be numbers"),
        ("x.csv", "epoch,loss\n1,nan\n", "loss values must be finite"),
        ("x.csv", "epoch,loss\n", "has no points"),
        ("x.json", "{", "not valid JSON"),
        ("x.json", json.dumps({"step": [1], "loss": [2]}), "expected"),
    ],
)
def test_bad_reference_files_are_named(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_reference(tmp_path / name)
    assert str(tmp_path / name) in str(error.value)


def test_a_missing_reference_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"reference curve .*nope\.csv does not exist"):
        read_reference(tmp_path / "nope.csv")


def test_epoch_table_puts_references_beside_the_runs() -> None:
    from twolevel_kfac.experiments.epoch_table import epoch_table, loss_at_epoch
    from twolevel_kfac.experiments.reference_curves import ReferenceCurve

    def run(*losses: float) -> list[dict[str, object]]:
        return [{"event": "epoch", "epoch": k + 1, "train_loss": v} for k, v in enumerate(losses)]

    results = {"kfac": [run(3.0, 2.0), run(5.0, 4.0)], "sgd": [run(9.0)]}
    ref = ReferenceCurve("authors", (1.0, 2.0), (2.5, 1.5), "ref.csv")
    assert (
        loss_at_epoch(results["kfac"][0], 2) == 2.0 and loss_at_epoch(results["sgd"][0], 2) is None
    )
    table = epoch_table(results, [ref], [1, 2]).splitlines()
    assert table[0] == "| epoch | kfac | sgd | ref: authors |"
    assert table[2] == "| 1 | 4 ± 1.4 | 9 | 2.5 |"
    assert table[3] == "| 2 | 3 ± 1.4 | – | 1.5 |"
    assert epoch_table(results, [ref], []) == ""
