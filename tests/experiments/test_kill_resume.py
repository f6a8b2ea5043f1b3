"""``kill -9`` in the middle of ``tlkfac run``, then ``--resume``: the run ends bit-identical
to an uninterrupted one (parameters and every epoch's train loss), on CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "smoke" / "run.yaml").read_text())
    config["problem"].update(epochs=30, checkpoint_every=3, log_every=4)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def epoch_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["train_loss"] for r in records if r.get("event") == "epoch"]


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return state["model"]


def run_command(config: Path, out: Path, *extra: str) -> list[str]:
    """``tlkfac run`` in a fresh interpreter, one thread (as every run it is compared with)."""
    return [
        sys.executable,
        "-m",
        "twolevel_kfac.cli",
        "run",
        str(config),
        "--out",
        str(out),
        "--quiet",
        "--threads",
        "1",
        *extra,
    ]


def test_kill_9_then_resume_is_bit_identical(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    subprocess.run(run_command(config, reference), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)

    process = subprocess.Popen(
        run_command(config, crashed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not (crashed / "checkpoint.pt").exists() and time.monotonic() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.02)
    time.sleep(0.3)  # let it run past the first checkpoint, into the next interval
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    subprocess.run(
        run_command(config, crashed, "--resume"), cwd=ROOT, check=True, stdout=subprocess.DEVNULL
    )
    assert epoch_losses(crashed) == epoch_losses(reference)
    expected = final_parameters(reference)
    actual = final_parameters(crashed)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
