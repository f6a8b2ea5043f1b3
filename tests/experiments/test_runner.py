"""Runner: records, determinism, early stopping, divergence, checkpoints and bit-identical
resume (also after Ctrl-C), the metrics file, losses, and report rendering from fixtures."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twolevel_kfac.experiments import losses, runner
from twolevel_kfac.experiments.checkpoint import get_rng_state, set_rng_state
from twolevel_kfac.experiments.config import ExperimentConfig, parse_config
from twolevel_kfac.experiments.metrics import MetricsWriter, load_runs, read_metrics
from twolevel_kfac.experiments.optimizers import make_optimizer
from twolevel_kfac.experiments.report import (
    markdown_table,
    summarize,
    write_report,
)
from twolevel_kfac.experiments.runner import Data, evaluate, train_run


def _data(n: int = 80) -> Data:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n + 24, 8, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return Data(
        train=(x[:n], y[:n]), val=(x[n : n + 12], y[n : n + 12]), test=(x[n + 12 :], y[n + 12 :])
    )


TINY_PROBLEM: dict[str, Any] = {
    "model": {"name": "deep_linear", "kwargs": {"depth": 3, "width": 4, "in_features": 8}},
    "dataset": {"name": "in-memory"},
    "loss": "cross_entropy",
    "batch_size": 16,
}
"""The runner tests' problem (8 inputs, 3 classes; ``Data`` supplies the examples)."""


def _config(
    method: str = "kfac", epochs: int = 3, seed: int = 0, **problem: Any
) -> ExperimentConfig:
    entries: dict[str, dict[str, Any]] = {
        "kfac": {
            "lr": 0.1,
            "damping": 0.1,
            "fisher_batch": 0.5,
            "cov_interval": 2,
            "inv_interval": 3,
        },
        "nico": {"lr": 0.1, "damping": 0.1, "cov_interval": 2, "inv_interval": 2},
        "residu": {"lr": 0.1, "damping": 0.1, "cov_interval": 3, "inv_interval": 3},
        "sgd": {"lr": 0.05},
        "adam": {"lr": 1e-2},
    }
    data = {
        "problem": {**TINY_PROBLEM, "epochs": epochs, "seeds": [seed], **problem},
        "defaults": {"weight_decay": 1e-3},
        "methods": {method: entries[method]},
    }
    return parse_config(data).for_run(method, seed)


def _losses(records: list[dict[str, Any]]) -> list[Any]:
    return [(r["event"], r["step"], r["train_loss"], r.get("val_loss")) for r in records]


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def test_records_and_files(tmp_path: Path) -> None:
    result = train_run(_config(log_every=2), tmp_path / "run", data=_data(), progress=False)
    assert result.finished and result.stop_reason == "epochs" and result.step == 15
    epochs = [r for r in result.records if r["event"] == "epoch"]
    steps = [r for r in result.records if r["event"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and [r["step"] for r in epochs] == [5, 10, 15]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12, 14]
    for r in epochs:
        assert {"wall_time_s", "train_loss", "lr", "damping", "kl_scale"} <= set(r)
        assert {"val_loss", "val_acc", "test_loss", "test_acc"} <= set(r)
        assert 0.0 <= r["test_acc"] <= 1.0 and r["lr"] == 0.1
    for key in ("wall_time_s", "cpu_time_s"):
        times = [r[key] for r in result.records]
        assert times == sorted(times) and times[0] > 0
    assert {p.name for p in (tmp_path / "run").iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.pt",
        "provenance.jsonl",
        "result.json",
    }
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == result.records
    with pytest.raises(ValueError, match="already holds a run"):
        train_run(_config(), tmp_path / "run", data=_data(), progress=False)


@pytest.mark.parametrize("method", ["sgd", "adam", "nico"])
def test_deterministic(tmp_path: Path, method: str) -> None:
    a = train_run(_config(method, epochs=2), tmp_path / "a", data=_data(), progress=False)
    b = train_run(_config(method, epochs=2), tmp_path / "b", data=_data(), progress=False)
    c = train_run(_config(method, epochs=2, seed=1), tmp_path / "c", data=_data(), progress=False)
    assert _losses(a.records) == _losses(b.records) != _losses(c.records)


@pytest.mark.parametrize("method", ["kfac", "residu", "adam"])
def test_resume_is_bit_identical(tmp_path: Path, method: str) -> None:
    config = _config(method, epochs=3, log_every=3, checkpoint_every=4)
    full = train_run(config, tmp_path / "full", data=_data(), progress=False)
    part = train_run(config, tmp_path / "part", data=_data(), progress=False, max_steps=7)
    assert not part.finished and part.step == 7 and part.records[-1]["event"] == "partial"
    assert part.records[-1]["epoch"] == pytest.approx(1.4)
    done = train_run(config, tmp_path / "part", data=_data(), progress=False, resume=True)
    assert done.finished and _losses(done.records) == _losses(full.records)
    full_params, done_params = _params(tmp_path / "full"), _params(tmp_path / "part")
    assert all(torch.equal(full_params[k], done_params[k]) for k in full_params)


def test_resume_after_crash_truncates_metrics(tmp_path: Path) -> None:
    """A crash after an interval checkpoint: the lines written after it are dropped."""
    config = _config("kfac", epochs=3, log_every=1, checkpoint_every=6)
    full = train_run(config, tmp_path / "full", data=_data(), progress=False)
    run_dir = tmp_path / "crash"
    train_run(config, run_dir, data=_data(), progress=False, max_steps=6)
    saved = (run_dir / "checkpoint.pt").read_bytes()
    train_run(config, run_dir, data=_data(), progress=False, resume=True, max_steps=11)
    (run_dir / "checkpoint.pt").write_bytes(saved)  # as if it crashed after step 11
    done = train_run(config, run_dir, data=_data(), progress=False, resume=True)
    assert _losses(done.records) == _losses(full.records)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_checkpoints_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """Ctrl-C, or a SIGTERM (``timeout``, a batch system's preemption: not caught before
    2026-12-11, a run kept only its last periodic checkpoint), checkpoints after the step
    and stops; the resumed run continues bit for bit."""
    config = _config("kfac", epochs=2)
    full = train_run(config, tmp_path / "full", data=_data(), progress=False)
    original = runner._Loop.step

    def step_then_interrupt(self: Any) -> float:
        loss = original(self)
        if self.state.step == 3:
            os.kill(os.getpid(), signum)
        return loss

    monkeypatch.setattr(runner._Loop, "step", step_then_interrupt)
    stopped = train_run(config, tmp_path / "run", data=_data(), progress=False)
    assert stopped.interrupted and not stopped.finished and stopped.step == 3
    monkeypatch.setattr(runner._Loop, "step", original)
    done = train_run(config, tmp_path / "run", data=_data(), progress=False, resume=True)
    assert _losses(done.records) == _losses(full.records)


def test_resume_refuses_another_config(tmp_path: Path) -> None:
    train_run(_config("kfac", epochs=1), tmp_path / "run", data=_data(), progress=False)
    other = _config("kfac", epochs=1).model_copy(deep=True)
    other.methods["kfac"]["lr"] = 0.2
    with pytest.raises(ValueError, match=r"another config \(methods.kfac.lr: 0.1 → 0.2\)"):
        train_run(other, tmp_path / "run", data=_data(), progress=False, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_run(other, tmp_path / "new", data=_data(), progress=False, resume=True)
    longer = _config("kfac", epochs=2)  # more epochs: same fingerprint, training continues
    result = train_run(longer, tmp_path / "run", data=_data(), progress=False, resume=True)
    assert [r["epoch"] for r in result.records] == [1, 2]


def test_slim_final_checkpoint(tmp_path: Path) -> None:
    config = _config("kfac", epochs=1, final_checkpoint="model")
    first = train_run(config, tmp_path / "run", data=_data(), progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["optimizer"] is None
    again = train_run(config, tmp_path / "run", data=_data(), progress=False, resume=True)
    assert again.finished and again.records == first.records
    longer = _config("kfac", epochs=2, final_checkpoint="model")
    with pytest.raises(ValueError, match="holds only the model of a finished run"):
        train_run(longer, tmp_path / "run", data=_data(), progress=False, resume=True)


def test_early_stopping_and_divergence(tmp_path: Path) -> None:
    stop = {"patience": 2, "min_delta": 1e9}  # never improves after the first epoch
    result = train_run(
        _config("sgd", epochs=10, early_stopping=stop),
        tmp_path / "es",
        data=_data(),
        progress=False,
    )
    assert result.stop_reason == "early_stopping" and result.finished
    assert [r["epoch"] for r in result.records] == [1, 2, 3]
    config = _config("sgd", epochs=5)
    config.methods["sgd"]["lr"] = 1e12
    result = train_run(config, tmp_path / "nan", data=_data(), progress=False)
    assert result.stop_reason == "diverged" and result.records[-1]["diverged"] is True
    assert result.records[-1]["train_loss"] is None  # NaN is written as null


def test_time_budget(tmp_path: Path) -> None:
    result = train_run(
        _config("sgd", epochs=50, time_budget_s=1e-9), tmp_path / "t", data=_data(), progress=False
    )
    assert result.stop_reason == "time_budget" and result.step == 1 and result.finished
    assert result.records[-1]["epoch"] == pytest.approx(0.2) and "test_loss" in result.records[-1]


def test_evaluation_does_not_touch_kfac(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    opt = make_optimizer("kfac", model, lr=0.1)
    data = _data()
    evaluate(model, losses.cross_entropy, *data.test)
    assert not any(p.grad is not None for p in model.parameters())
    assert all(not f.ready for f in opt.preconditioner.factors.values())  # type: ignore[attr-defined]
    assert model.training
    loss, acc = evaluate(model, losses.cross_entropy, *data.test, batch_size=5)
    with torch.no_grad():
        out = model(data.test[0])
    assert loss == pytest.approx(float(F.cross_entropy(out, data.test[1])), rel=1e-6)
    assert acc == pytest.approx(float((out.argmax(1) == data.test[1]).float().mean()))


def test_make_optimizer() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    sgd = make_optimizer("SGD", model, lr=0.5)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    assert sgd.defaults["momentum"] == 0.9
    assert isinstance(make_optimizer("adam", model, lr=1e-3), torch.optim.Adam)
    import twolevel_kfac as tk

    assert isinstance(make_optimizer("kfac", model, lr=0.1, factor_dtype="float64"), tk.KFAC)
    for name in ("nico", "residu", "previous", "spectral", "kry_nico", "kry_residu"):
        assert isinstance(make_optimizer(name, model, lr=0.1), tk.TwoLevelKFAC)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        make_optimizer("lbfgs", model)
    with pytest.raises(ValueError, match="not a torch dtype"):
        make_optimizer("kfac", model, lr=0.1, factor_dtype="float65")


def test_losses_scaling() -> None:
    gen = torch.Generator().manual_seed(0)
    z, t = torch.randn(5, 7, generator=gen), torch.rand(5, 7, generator=gen)
    bce = F.binary_cross_entropy_with_logits(z, t, reduction="sum") / 5
    assert float(losses.bce_logits_loss(z, t)) == pytest.approx(float(bce), rel=1e-6)
    assert float(losses.mse_loss(z, t)) == pytest.approx(float(0.5 * ((z - t) ** 2).sum() / 5))
    assert set(losses.LOSSES) == set(losses.LIKELIHOODS)


def test_metrics_writer(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path) as writer:
        for i in range(4):
            writer.write({"step": i, "loss": float("nan") if i == 3 else 0.5 * i})
    assert read_metrics(path)[3] == {"step": 3, "loss": None}
    with MetricsWriter(path, keep_lines=2) as writer:
        assert writer.count == 2
        writer.write({"step": 9})
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 9]
    with pytest.raises(ValueError, match="does not belong"):
        MetricsWriter(path, keep_lines=5)
    path.write_text(path.read_text() + '{"step": 10, "lo')  # torn last line
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 9]


def test_rng_state_round_trip() -> None:
    import random

    import numpy as np

    state = get_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_cuda_rng_state_saved_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA machine every device's generator travels with the checkpoint (simulated:
    this machine has no GPU); a checkpoint from a machine with another device count
    leaves the CUDA generators alone."""
    devices = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(devices))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = get_rng_state()
    assert state["cuda"] == devices
    set_rng_state(state)
    assert restored == [devices]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    set_rng_state(state)
    assert len(restored) == 1


# ----------------------------------------------------------------- report
def _fixture_runs() -> dict[str, list[list[dict[str, Any]]]]:
    def run(scale: float, sec: float, acc: bool = True) -> list[dict[str, Any]]:
        out = []
        for e in range(1, 5):
            r: dict[str, Any] = {
                "event": "epoch",
                "epoch": e,
                "step": 10 * e,
                "wall_time_s": sec * e,
                "train_loss": scale / e,
                "test_loss": 1.1 * scale / e,
            }
            if acc:
                r["test_acc"] = 0.5 + 0.1 * e
            out.append(r)
            out.append(
                {
                    "event": "step",
                    "epoch": e + 0.5,
                    "step": 10 * e + 5,
                    "wall_time_s": sec * (e + 0.5),
                    "train_loss": 1e-9,
                }
            )
        return out

    return {
        "kfac": [run(1.0, 2.0), run(1.2, 2.0)],
        "nico": [run(0.9, 3.0), run(1.1, 3.0)],
        "sgd": [run(4.0, 1.0), run(4.0, 1.0)],
    }


def test_report_table_and_pngs(tmp_path: Path) -> None:
    results = _fixture_runs()
    rows = {r["method"]: r for r in summarize(results)}
    assert rows["kfac"]["final_train_loss"][0] == pytest.approx(0.275)  # step records ignored
    assert rows["kfac"]["final_train_loss"][1] == pytest.approx(0.05 / math.sqrt(2))
    assert rows["nico"]["overhead_vs_kfac"] == pytest.approx(1.5)
    assert rows["sgd"]["best_train_loss"][0] == pytest.approx(1.0)
    assert rows["kfac"]["sec_per_epoch"] == pytest.approx(2.0)
    # target 1.1 × 0.275: kfac reaches it at epoch 4 (1.0/4, 1.2/4 = 0.3 ≤ 0.3025)
    assert rows["kfac"]["time_to_target"] == (8.0, 0.0, 2, 2)
    assert rows["nico"]["time_to_target"][2:] == (2, 2)
    assert rows["sgd"]["time_to_target"][2] == 0
    table = markdown_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and lines[0].startswith("| method | seeds |")
    assert "time vs KFAC" in lines[0] and "1.50×" in table and "90%" in table
    assert "not reached" in table and "final test acc" in lines[0]
    path = write_report(results, tmp_path / "out", title="Fixture", notes="Some notes.")
    text = path.read_text()
    assert text.startswith("# Fixture") and "Some notes." in text
    for name in ("loss_vs_epoch.png", "loss_vs_time.png", "test_vs_epoch.png"):
        png = tmp_path / "out" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 5000 < png.stat().st_size < 200_000
        assert f"]({name})" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["target_loss"] == pytest.approx(0.3025)


def test_report_without_kfac_accuracy_or_records(tmp_path: Path) -> None:
    runs = _fixture_runs()
    results: dict[str, list[list[dict[str, Any]]]] = {"sgd": runs["sgd"], "adam": [[]]}
    for run in results["sgd"]:
        for r in run:
            r.pop("test_acc", None)
    results["sgd"][0][1 * 2]["train_loss"] = None  # a NaN written as null
    results["sgd"][1][-1]["diverged"] = True
    results["one"] = [[{k: v for k, v in r.items() if k != "test_acc"} for r in runs["nico"][0]]]
    table = markdown_table(results, target_loss=2.0)
    one = next(line for line in table.splitlines() if line.startswith("| one |"))
    assert "±" not in one and "| 0.225 |" in one  # a single seed: no spread shown
    assert "time vs KFAC" not in table and "test acc" not in table
    assert "final test loss" in table and "s to loss ≤ 2" in table
    assert "| adam | – |" in table.replace("| 0 |", "| – |")
    write_report(results, tmp_path)
    assert (tmp_path / "loss_vs_time.png").is_file()


def test_load_runs(tmp_path: Path) -> None:
    for method, runs in _fixture_runs().items():
        for seed, run in zip((27, 1), runs, strict=True):
            d = tmp_path / method / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run))
    results = load_runs(tmp_path, order=["sgd", "kfac"])
    assert list(results) == ["sgd", "kfac", "nico"]
    assert results["kfac"][0][0]["train_loss"] == 1.2  # seed 1 first
    with pytest.raises(FileNotFoundError, match="no runs"):
        load_runs(tmp_path / "sgd")


@pytest.mark.parametrize(
    ("method", "kwargs", "class_name"),
    [
        ("ekfac", {}, "EKFAC"),
        ("kpsvd", {"power_iterations": 3}, "KPSVD"),
        ("kfac_corrected", {}, "KFACCorrected"),
        ("nico", {"fine": "ekfac"}, "TwoLevelKFAC"),
    ],
)
def test_other_fine_levels_build_by_name(
    method: str, kwargs: dict[str, Any], class_name: str
) -> None:
    from twolevel_kfac.experiments.optimizers import allowed_arguments, make_optimizer

    assert set(kwargs) <= allowed_arguments(method)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    assert type(make_optimizer(method, model, lr=0.1, **kwargs)).__name__ == class_name


@pytest.mark.parametrize(
    ("n_rows", "batch", "processes", "refused"),
    [
        (256, 255, 1, True),
        (256, 128, 1, False),
        (10, 1, 1, True),
        (257, 128, 1, True),
        (258, 128, 1, False),
        (258, 128, 2, True),
        (260, 128, 2, False),
        (256, 3, 2, True),
    ],
)
def test_batch_norm_needs_two_rows_per_process(
    n_rows: int, batch: int, processes: int, refused: bool
) -> None:
    from twolevel_kfac.experiments.problem import check_batch_norm_rows

    with_bn = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    check_batch_norm_rows(nn.Linear(2, 3), n_rows, batch, processes)  # no BatchNorm: no limit
    if refused:
        with pytest.raises(ValueError, match="BatchNorm layers, which need at least 2 rows"):
            check_batch_norm_rows(with_bn, n_rows, batch, processes)
    else:
        check_batch_norm_rows(with_bn, n_rows, batch, processes)


def test_a_mismatched_checkpoint_names_the_model_first_and_counts_the_rest() -> None:
    """A checkpoint of another model differs in many keys: the list stopped at ten without
    a word, and the eleventh named the model (a trial). Names of models and data sets come
    first now, and the rest is counted."""
    from twolevel_kfac.experiments.checkpoint import _differences

    diff = [f"problem.a{i}: 1 → 2" for i in range(11)] + ["problem.model.name: 'a' → 'b'"]
    text = _differences(diff)
    assert text.startswith("problem.model.name: 'a' → 'b'; problem.a0")
    assert text.endswith("; … and 2 more")
    assert _differences([]) == "unknown differences"
