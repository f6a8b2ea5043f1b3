"""``tlkfac run | compare | tune | report | demo`` end to end on the smoke configs (seconds),
resume equivalence through the CLI, and bad inputs → exit status 2 with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from twolevel_kfac.cli import main
from twolevel_kfac.experiments import provenance
from twolevel_kfac.experiments.metrics import read_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMOKE_RUN = str(CONFIGS / "smoke" / "run.yaml")
SMOKE_COMPARE = str(CONFIGS / "smoke" / "compare.yaml")


def _train_losses(run_dir: Path) -> list[tuple[str, int, float]]:
    return [
        (r["event"], r["step"], r["train_loss"]) for r in read_metrics(run_dir / "metrics.jsonl")
    ]


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def test_run_and_resume_equivalence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["run", SMOKE_RUN, "--out", str(full), "--quiet"]) == 0
    assert "kfac seed 0: finished its epochs after 8 steps" in capsys.readouterr().out
    assert {p.name for p in full.iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.pt",
        "provenance.jsonl",
        "result.json",  # finished
    }
    resolved = yaml.safe_load((full / "config.yaml").read_text())
    assert resolved["methods"]["kfac"]["likelihood"] == "bernoulli"
    assert main(["run", SMOKE_RUN, "--out", str(part), "--quiet", "--max-steps", "5"]) == 0
    assert read_metrics(part / "metrics.jsonl")[-1]["event"] == "partial"
    assert main(["run", SMOKE_RUN, "--out", str(part), "--quiet", "--resume"]) == 0
    assert _train_losses(part) == _train_losses(full)
    assert [e["event"] for e in provenance.read(part)] == ["start", "resume"]
    a, b = _params(full), _params(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resolved config.yaml of a run directory is itself a valid config
    again = tmp_path / "again"
    assert main(["run", str(full / "config.yaml"), "--out", str(again), "--quiet"]) == 0
    assert _train_losses(again) == _train_losses(full)


def test_compare_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", SMOKE_COMPARE, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| method | seeds |" in printed and "| nico | 2 |" in printed
    for method in ("kfac", "nico", "sgd", "adam"):
        for seed in (0, 1):
            assert (out / method / f"seed{seed}" / "metrics.jsonl").is_file()
    report = (out / "report.md").read_text()
    assert report.startswith("# Smoke comparison") and "time vs KFAC" in report
    assert "Provenance (8 starts and resumes): commit " in report  # 4 methods × 2 seeds
    for name in ("loss_vs_epoch.png", "loss_vs_time.png", "test_vs_epoch.png"):
        assert (out / name).stat().st_size > 5000
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report
    # a published curve beside the runs
    curve = tmp_path / "authors.csv"
    curve.write_text("epoch,train_loss\n1,500\n2,400\n")
    assert main(["report", str(out), "--reference", f"authors KFAC={curve}"]) == 0
    assert (
        f"Reference curves (dashed, loss vs epoch): authors KFAC (`{curve}`)"
        in (out / "report.md").read_text()
    )
    # re-running continues: finished runs are kept as they are (no resume recorded, the
    # checkpoint not rewritten)
    before = (out / "kfac" / "seed0" / "metrics.jsonl").read_text()
    saved_at = (out / "kfac" / "seed0" / "checkpoint.pt").stat().st_mtime_ns
    assert main(["compare", SMOKE_COMPARE, "--out", str(out), "--quiet", "--methods", "kfac"]) == 0
    assert (out / "kfac" / "seed0" / "metrics.jsonl").read_text() == before
    assert [e["event"] for e in provenance.read(out / "kfac" / "seed0")] == ["start"]
    assert (out / "kfac" / "seed0" / "checkpoint.pt").stat().st_mtime_ns == saved_at
    # … and a subset's report and saved config keep every method
    saved = yaml.safe_load((out / "compare.yaml").read_text())
    assert list(saved["methods"]) == ["kfac", "nico", "sgd", "adam"]
    report = (out / "report.md").read_text()
    assert all(f"| {m} | 2 |" in report for m in ("kfac", "nico", "sgd", "adam"))


def test_compare_max_steps_then_continue(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare",
        SMOKE_COMPARE,
        "--out",
        str(out),
        "--quiet",
        "--methods",
        "sgd,adam",
        "--seeds",
        "1",
    ]
    assert main([*args, "--max-steps", "2"]) == 0
    assert read_metrics(out / "sgd" / "seed1" / "metrics.jsonl")[-1]["event"] == "partial"
    assert main(args) == 0
    records = read_metrics(out / "sgd" / "seed1" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["sgd", "adam"]


def test_tune_writes_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load(Path(SMOKE_COMPARE).read_text())
    raw["problem"]["seeds"] = [0]
    raw["tune"] = {"methods": ["kfac", "sgd"], "lr": [0.1, 0.01], "damping": [0.1], "epochs": 1}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "tune"
    assert main(["tune", str(config), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "kfac: lr" in printed and "sgd: lr" in printed
    tuned = yaml.safe_load((out / "tuned.yaml").read_text())
    assert tuned["methods"]["kfac"]["lr"] in (0.1, 0.01)
    assert tuned["methods"]["kfac"]["damping"] == 0.1
    assert tuned["methods"]["nico"] is None  # untouched
    assert "### kfac" in (out / "tune.md").read_text()
    assert (out / "kfac" / "lr0.1_damping0.1" / "metrics.jsonl").is_file()
    assert (
        main(
            [
                "run",
                str(out / "tuned.yaml"),
                "--method",
                "sgd",
                "--out",
                str(tmp_path / "r"),
                "--max-steps",
                "1",
                "--quiet",
            ]
        )
        == 0
    )


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for method in ("kfac", "nico", "residu", "previous", "sgd", "adam"):
        assert f"| {method} |" in printed
    assert (out / "report.md").is_file() and (out / "loss_vs_epoch.png").is_file()
    # --resume over another config's runs: the demo's way to start over (it has no --fresh)
    other = _write(
        tmp_path, "d.yaml", (CONFIGS / "demo.yaml").read_text().replace("lr: 0.3", "lr: 0.2")
    )
    argv = ["demo", "--quick", "--resume", "--config", other, "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "run `tlkfac demo` without --resume to start over" in capsys.readouterr().err


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["run", str(tmp_path / "nope.yaml")], "does not exist"),
        (["run", _write(tmp_path, "e.yaml", "")], "is empty"),
        (["run", _write(tmp_path, "s.yaml", "problem: [\n")], "s.yaml:2:1: invalid YAML"),
        (
            [
                "run",
                _write(
                    tmp_path,
                    "k.yaml",
                    Path(SMOKE_RUN).read_text().replace("batch_size:", "batchsize:"),
                ),
            ],
            "did you mean 'batch_size'",
        ),
        (["run", SMOKE_COMPARE, "--out", str(tmp_path / "x")], "pick one with --method"),
        (["run", SMOKE_COMPARE, "--method", "lbfgs"], "unknown method 'lbfgs'"),
        (["run", SMOKE_RUN, "--out", str(tmp_path / "y"), "--resume"], "no checkpoint"),
        (
            ["compare", SMOKE_COMPARE, "--methods", "kfac,sdg", "--out", str(tmp_path / "z")],
            "['sdg'] are not in the config",
        ),
        (
            [
                "run",
                _write(
                    tmp_path,
                    "l.yaml",
                    Path(SMOKE_RUN).read_text().replace("lr: 1.2755102040816327e-04", "lr: fast"),
                ),
            ],
            "methods.kfac.lr: a number, got 'fast'",
        ),
        (["report", str(tmp_path)], "no runs"),
        (["report", str(tmp_path / "missing")], "does not exist"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, (argv, err)


def test_resume_with_another_config_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["run", SMOKE_RUN, "--out", str(out), "--quiet", "--max-steps", "1"]) == 0
    text = Path(SMOKE_RUN).read_text().replace("kl_clip: 1.0e-2", "kl_clip: 2.0e-2")
    other = _write(tmp_path, "o.yaml", text)
    assert main(["run", other, "--out", str(out), "--quiet", "--resume"]) == 2
    assert "methods.kfac.kl_clip: 0.01 → 0.02" in capsys.readouterr().err
    # a comparison refused for another config keeps the folder's compare.yaml (it was
    # written first, so that `tlkfac report` named the refused config's settings)
    cmp = tmp_path / "cmp"
    assert main(["compare", SMOKE_COMPARE, "--out", str(cmp), "--quiet", "--methods", "kfac"]) == 0
    kept = (cmp / "compare.yaml").read_text()
    changed = _write(
        tmp_path,
        "c.yaml",
        Path(SMOKE_COMPARE).read_text().replace("kl_clip: 1.0e-2", "kl_clip: 3.0e-2"),
    )
    assert Path(changed).read_text() != Path(SMOKE_COMPARE).read_text()
    assert main(["compare", changed, "--out", str(cmp), "--quiet", "--methods", "kfac"]) == 2
    assert (cmp / "compare.yaml").read_text() == kept
    assert main(["run", SMOKE_RUN, "--out", str(out), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["run", SMOKE_RUN, "--max-steps", "0"])
    assert exit_info.value.code == 2


def test_a_resume_with_other_threads_is_warned_of(tmp_path: Path) -> None:
    """A run resumed with another thread count does not continue bit for bit: warned of,
    and the interrupted runs' hint repeats ``--threads`` and ``--data-dir``."""
    import argparse

    from twolevel_kfac.experiments.commands import continue_flags

    out = tmp_path / "run"
    args = ["run", SMOKE_RUN, "--out", str(out), "--quiet"]
    assert main([*args, "--max-steps", "2", "--threads", "1"]) == 0
    before = torch.get_num_threads()
    try:
        with pytest.warns(RuntimeWarning, match=r"ran with 1 torch thread\(s\) and resumes with 2"):
            assert main([*args, "--resume", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(before)
    hint = continue_flags(argparse.Namespace(threads=1, data_dir="/my data"))
    assert hint == " --threads 1 --data-dir '/my data'"


def test_an_interrupted_comparison_reports_no_other_configs_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the first run of a comparison with another ``sgd`` setting: the ``sgd``
    runs it never reached are the earlier config's, and are not reported under this one
    (they were, with this config's settings beside them)."""
    import dataclasses

    from twolevel_kfac.experiments import comparison

    out = tmp_path / "cmp"
    base = ["--out", str(out), "--quiet", "--methods", "kfac,sgd", "--seeds", "0"]
    assert main(["compare", SMOKE_COMPARE, *base]) == 0
    assert "| sgd | 1 |" in (out / "report.md").read_text()
    changed = _write(
        tmp_path,
        "c.yaml",
        Path(SMOKE_COMPARE).read_text().replace("sgd: {lr: 1.0e-2}", "sgd: {lr: 2.0e-2}"),
    )
    real = comparison.run_one

    def interrupted(*args: object, **kwargs: object) -> object:
        return dataclasses.replace(real(*args, **kwargs), interrupted=True)  # type: ignore[arg-type]

    monkeypatch.setattr(comparison, "run_one", interrupted)
    assert main(["compare", changed, *base]) == 130
    report = (out / "report.md").read_text()
    assert "| kfac | 1 |" in report and "| sgd |" not in report


def test_an_interrupted_comparisons_hint_repeats_its_budget_and_subset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The "to continue" hint after Ctrl-C left out ``--max-steps``, ``--methods`` and
    ``--seeds`` (a trial: following it started every method and seed of the config, and ran
    the interrupted run past its 60-step budget); it repeats them now."""
    import dataclasses

    from twolevel_kfac.experiments import comparison

    real = comparison.run_one

    def interrupted(*args: object, **kwargs: object) -> object:
        return dataclasses.replace(real(*args, **kwargs), interrupted=True)  # type: ignore[arg-type]

    monkeypatch.setattr(comparison, "run_one", interrupted)
    out = tmp_path / "cmp"
    flags = ["--methods", "kfac,sgd", "--seeds", "0", "--max-steps", "2", "--threads", "1"]
    before = torch.get_num_threads()
    try:
        assert main(["compare", SMOKE_COMPARE, "--out", str(out), "--quiet", *flags]) == 130
    finally:
        torch.set_num_threads(before)
    hint = capsys.readouterr().out.split("interrupted: run `")[1].split("`")[0]
    assert hint == f"tlkfac compare {SMOKE_COMPARE} --out {out} {' '.join(flags)}"


def test_a_tuned_point_far_above_every_other_methods_is_flagged() -> None:
    """A one-epoch grid cannot see a blow-up: SGD's chosen point ended at 6e16 in a trial,
    without a word. A point 100× above the lowest loss any method reached is flagged."""
    from twolevel_kfac.experiments.tuning import _implausible

    with pytest.warns(RuntimeWarning, match=r"sgd: its chosen point \(lr 0.01\) ended at"):
        notes = _implausible({"kfac": (0.1, 0.1, 30.0), "sgd": (0.01, None, 6e16)})
    assert len(notes) == 2 and "sgd" in notes[1]
    assert _implausible({"kfac": (0.1, 0.1, 30.0), "sgd": (0.01, None, 45.0)}) == []


def test_the_report_shows_only_the_runs_of_its_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A comparison, then only ``kfac`` again under another ``kfac`` lr with ``--fresh``:
    ``tlkfac compare`` reported kfac and sgd, but ``tlkfac report DIR`` tabulated every
    run in the folder, nico's under the old lr with the new lr in its notes. It reports
    what ``compare`` does now, and names the runs it leaves out."""
    out = tmp_path / "cmp"
    base = ["--out", str(out), "--quiet", "--seeds", "0"]
    assert main(["compare", SMOKE_COMPARE, *base, "--methods", "kfac,nico"]) == 0
    changed = _write(
        tmp_path, "c.yaml", Path(SMOKE_COMPARE).read_text().replace("lr: 0.1,", "lr: 0.2,")
    )
    assert main(["compare", changed, *base, "--methods", "kfac", "--fresh"]) == 0
    compared = (out / "report.md").read_text()
    assert "| kfac | 1 |" in compared and "| nico |" not in compared
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "left out (not runs of" in printed and "nico/seed0" in printed
    assert (out / "report.md").read_text() == compared


def test_a_fresh_run_drops_the_old_runs_snapshots(tmp_path: Path) -> None:
    """``compare --fresh`` removed the old run's checkpoint and metrics but kept its
    ``snapshots/`` and ``provenance.jsonl``: ``analyze --run`` then read both runs'
    snapshots as one trajectory, and the report counted the old start."""
    out = tmp_path / "cmp"
    keep = (
        Path(SMOKE_COMPARE)
        .read_text()
        .replace(
            "  seeds: [0, 1]", "  seeds: [0, 1]\n  keep_checkpoints: true\n  checkpoint_every: 3"
        )
    )
    first = _write(tmp_path, "a.yaml", keep)
    base = ["--out", str(out), "--quiet", "--seeds", "0", "--methods", "sgd"]
    assert main(["compare", first, *base]) == 0
    run = out / "sgd" / "seed0"
    old = sorted(p.name for p in (run / "snapshots").iterdir())
    second = _write(tmp_path, "b.yaml", keep.replace("checkpoint_every: 3", "checkpoint_every: 4"))
    assert main(["compare", second, *base, "--fresh"]) == 0
    new = sorted(p.name for p in (run / "snapshots").iterdir())
    assert new != old and not (set(new) - {"step0.pt", "step8.pt"}) & set(old)
    assert [e["event"] for e in provenance.read(run)] == ["start"]


def test_a_comparison_of_another_experiment_into_a_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A comparison of another problem into a folder holding one (no method in common)
    wrote over its compare.yaml, report and plots and tabulated both. Refused by name now
    (``--fresh`` writes over it); a method added or more epochs is the same experiment."""
    out = tmp_path / "cmp"
    base = ["--out", str(out), "--quiet", "--seeds", "0", "--methods", "sgd"]
    assert main(["compare", SMOKE_COMPARE, *base]) == 0
    report = (out / "report.md").read_text()
    other = _write(
        tmp_path,
        "o.yaml",
        Path(SMOKE_COMPARE).read_text().replace("batch_size: 64", "batch_size: 32"),
    )
    assert main(["compare", other, *base]) == 2
    assert "holds the comparison of another experiment (problem.batch_size differs" in (
        capsys.readouterr().err
    )
    assert (out / "report.md").read_text() == report
    longer = _write(
        tmp_path, "l.yaml", Path(SMOKE_COMPARE).read_text().replace("epochs: 2", "epochs: 3")
    )
    assert main(["compare", longer, *base]) == 0
    assert main(["compare", other, *base, "--fresh"]) == 0


def test_a_checkpoint_changed_after_it_was_written_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A byte flipped in a tensor of a checkpoint: ``torch.load`` does not check the zip's
    CRC-32s, and the run resumed from the changed weights, silently (0.059 off an
    uninterrupted run in a trial). Refused by name now, the file left as it is."""
    from file_damage import flip_tensor_byte

    run = tmp_path / "run"
    assert main(["run", SMOKE_RUN, "--out", str(run), "--quiet", "--max-steps", "5"]) == 0
    path = run / "checkpoint.pt"
    raw = flip_tensor_byte(path)
    capsys.readouterr()
    assert main(["run", SMOKE_RUN, "--out", str(run), "--quiet", "--resume"]) == 2
    assert "fails its CRC-32 check" in capsys.readouterr().err
    assert path.read_bytes() == raw


@pytest.mark.parametrize("value", ["nan", "-5", "0", "inf"])
def test_a_target_loss_that_is_not_a_positive_number_is_refused(
    tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tlkfac report DIR --target-loss nan`` (or ``-5``) was taken, as the config's
    ``report.target_loss`` is not."""
    with pytest.raises(SystemExit) as stopped:
        main(["report", str(tmp_path), "--target-loss", value])
    assert stopped.value.code == 2
    assert "--target-loss: must be a finite number > 0" in capsys.readouterr().err


def test_sgd_without_momentum_is_plain_sgd() -> None:
    """``sgd: {momentum: 0}`` met torch's "Nesterov momentum requires a momentum and zero
    dampening": Nesterov is the config's default for SGD, not the user's choice, and is
    off where the momentum is 0 now; asked for, it is still refused by torch."""
    from twolevel_kfac.experiments.optimizers import make_optimizer

    model = torch.nn.Linear(2, 2)
    group = make_optimizer("sgd", model, lr=0.1, momentum=0).param_groups[0]
    assert (group["momentum"], group["nesterov"]) == (0, False)
    assert make_optimizer("sgd", model, lr=0.1).param_groups[0]["nesterov"]
    with pytest.raises(ValueError, match="Nesterov"):
        make_optimizer("sgd", model, lr=0.1, momentum=0, nesterov=True)


def test_a_model_that_does_not_fit_the_data_leaves_no_run_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model whose input size is not the data's failed in its first step and left a
    step-0 run behind: the corrected config then met "already holds a run", and with
    ``--resume`` "written for another config" (a trial). The run directory holds no run
    after such a failure now, and the error says so."""
    text = Path(SMOKE_RUN).read_text()
    bad = _write(
        tmp_path,
        "bad.yaml",
        text.replace("{name: curves_autoencoder}", "{name: mlp, kwargs: {sizes: [6, 5, 784]}}"),
    )
    out = tmp_path / "run"
    assert main(["run", bad, "--out", str(out), "--quiet", "--max-steps", "2"]) == 2
    said = capsys.readouterr().err
    assert "cannot be multiplied" in said and "nothing was trained" in said
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()
    assert main(["run", SMOKE_RUN, "--out", str(out), "--quiet", "--max-steps", "2"]) == 0
