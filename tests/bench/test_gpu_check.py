"""``benchmarks/gpu_check.sh --device cpu``: the dry run of the GPU check (its tests, the
step-time matrix on tiny problems and bf16 autocast with every optimizer class) runs
through and writes its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), "--python", sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_dry_run_writes_the_report(tmp_path: Path) -> None:
    result = check("--device", "cpu", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["settings"]["device"] == "cpu" and data["settings"]["quick"]
    assert {c["label"] for c in data["autocast"]} >= {"KFAC", "EKFAC", "KPSVD", "TwoLevelKFAC"}
    assert all(c["ok"] for c in data["autocast"]), data["autocast"]
    for group in data["results"]:
        methods = {r["method"] for r in group["rows"]}
        assert {"sgd", "kfac", "nicolaides+additive", "residual+adef2"} <= methods
    report = (tmp_path / "gpu.md").read_text()
    assert "## bf16 autocast, every optimizer class" in report
    if not torch.cuda.is_available():
        assert "skipped" in (tmp_path / "gpu_tests.log").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--device", "tpu"], "--device must be"), (["--fast"], "unknown argument --fast")],
)
def test_bad_arguments_are_named(args: list[str], message: str) -> None:
    result = check(*args)
    assert result.returncode == 2 and message in result.stderr
