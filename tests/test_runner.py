"""Runner (tiny training runs, determinism, optimizer factory), losses, and report rendering."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twolevel_kfac.experiments import losses
from twolevel_kfac.experiments.report import markdown_table, summarize, write_report
from twolevel_kfac.experiments.runner import evaluate, make_optimizer, train


def _classification_data(n: int = 96) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x[:64], y[:64], x[64:], y[64:]


def _run(name: str = "sgd", epochs: int = 3, **hp: Any) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = make_optimizer(name, model, **hp)
    tx, ty, vx, vy = _classification_data()
    return train(
        model, opt, losses.cross_entropy, tx, ty, vx, vy, epochs, 10, seed=1, progress=False
    )


def test_train_sgd_records() -> None:
    records = _run(lr=0.1)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [7, 14, 21]  # ceil(64 / 10) steps per epoch
    for r in records:
        assert set(r) == {"epoch", "step", "wall_time_s", "train_loss", "test_loss", "test_acc"}
        assert math.isfinite(r["train_loss"]) and 0.0 <= r["test_acc"] <= 1.0
    times = [r["wall_time_s"] for r in records]
    assert times == sorted(times) and times[0] > 0
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_train_is_deterministic() -> None:
    a, b = _run(lr=0.1), _run(lr=0.1)
    strip = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time_s"} for r in b]
    assert _run(lr=0.1)[0]["train_loss"] == a[0]["train_loss"]


def test_train_autoencoder_has_no_accuracy_and_adam_works() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 3), nn.ReLU(), nn.Linear(3, 12))
    x = torch.rand(40, 12)
    opt = make_optimizer("adam", model, lr=1e-2)
    records = train(
        model, opt, losses.bce_logits_loss, x, x, x[:8], x[:8], 2, 16, 0, progress=False
    )
    assert len(records) == 2 and "test_acc" not in records[0]


def test_train_stops_on_budget_and_divergence() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    tx, ty, vx, vy = _classification_data()
    opt = make_optimizer("sgd", model, lr=0.1)
    records = train(model, opt, losses.cross_entropy, tx, ty, vx, vy, 50, 10, 0, 0.0, False)
    assert len(records) == 1 and records[0]["step"] == 1  # budget exhausted after one step

    calls = []

    def nan_at_step_10(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.requires_grad:  # count training steps, not evaluation batches
            calls.append(1)
        loss = losses.cross_entropy(out, y)
        return loss * float("nan") if len(calls) == 10 else loss

    records = train(model, opt, nan_at_step_10, tx, ty, vx, vy, 50, 10, 0, None, False)
    assert len(records) == 2 and records[-1]["diverged"] is True
    assert records[-1]["step"] == 10 and math.isnan(records[-1]["train_loss"])


def test_evaluate_matches_full_batch() -> None:
    model = nn.Linear(8, 3)
    _, _, vx, vy = _classification_data()
    loss, acc = evaluate(model, losses.cross_entropy, vx, vy, batch_size=7)
    with torch.no_grad():
        out = model(vx)
    assert loss == pytest.approx(float(F.cross_entropy(out, vy)), rel=1e-6)
    assert acc == pytest.approx(float((out.argmax(1) == vy).float().mean()))


def test_make_optimizer() -> None:
    model = nn.Linear(3, 2)
    sgd = make_optimizer("SGD", model, lr=0.5)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert isinstance(make_optimizer("adam", model), torch.optim.Adam)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        make_optimizer("lbfgs", model)


def test_make_optimizer_kfac_names() -> None:
    tk = pytest.importorskip("twolevel_kfac")
    if not hasattr(tk, "KFAC") or not hasattr(tk, "TwoLevelKFAC"):
        pytest.skip("twolevel_kfac.KFAC / TwoLevelKFAC not available yet")
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert isinstance(make_optimizer("kfac", model, lr=0.1), tk.KFAC)
    for name in ("nico", "residu", "previous"):
        assert isinstance(make_optimizer(name, model), tk.TwoLevelKFAC)


def test_losses_scaling() -> None:
    gen = torch.Generator().manual_seed(0)
    z, t = torch.randn(5, 7, generator=gen), torch.rand(5, 7, generator=gen)
    bce = F.binary_cross_entropy_with_logits(z, t, reduction="sum") / 5
    assert float(losses.bce_logits_loss(z, t)) == pytest.approx(float(bce), rel=1e-6)
    assert float(losses.mse_loss(z, t)) == pytest.approx(float(0.5 * ((z - t) ** 2).sum() / 5))
    labels = torch.tensor([0, 3, 6, 1, 2])
    assert float(losses.cross_entropy(z, labels)) == pytest.approx(
        float(F.cross_entropy(z, labels))
    )
    assert set(losses.LOSSES) == set(losses.LIKELIHOODS)
    assert losses.LIKELIHOODS["bce"] == "bernoulli"


def _fixture_records() -> dict[str, list[dict[str, Any]]]:
    def recs(scale: float, sec: float, acc: bool = True) -> list[dict[str, Any]]:
        out = []
        for e in range(1, 5):
            r: dict[str, Any] = {
                "epoch": e,
                "step": 10 * e,
                "wall_time_s": sec * e,
                "train_loss": scale / e,
                "test_loss": 1.1 * scale / e,
            }
            if acc:
                r["test_acc"] = 0.5 + 0.1 * e
            out.append(r)
        return out

    return {"kfac": recs(1.0, 2.0), "nico": recs(0.9, 3.0), "sgd": recs(2.0, 1.0)}


def test_report_table_and_pngs(tmp_path: Path) -> None:
    results = _fixture_records()
    rows = {r["method"]: r for r in summarize(results)}
    assert rows["nico"]["overhead_vs_kfac"] == pytest.approx(1.5)
    assert rows["sgd"]["best_train_loss"] == pytest.approx(0.5)
    assert rows["kfac"]["sec_per_epoch"] == pytest.approx(2.0)
    table = markdown_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and lines[0].startswith("| method |")
    assert "time vs KFAC" in lines[0] and "1.50×" in table and "90.00%" in table
    path = write_report(results, tmp_path / "out", title="Fixture")
    assert path.read_text().startswith("# Fixture")
    for name in ("loss_vs_epoch.png", "loss_vs_time.png"):
        png = tmp_path / "out" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"]({name})" in path.read_text()


def test_report_without_kfac_or_accuracy(tmp_path: Path) -> None:
    results = {"sgd": _fixture_records()["sgd"], "adam": []}
    for r in results["sgd"]:
        del r["test_acc"]
    results["sgd"][1]["train_loss"] = float("nan")
    table = markdown_table(results)
    assert "time vs KFAC" not in table and "test acc" not in table
    assert "| adam | 0 |" in table
    write_report(results, tmp_path)
    assert (tmp_path / "loss_vs_time.png").is_file()
