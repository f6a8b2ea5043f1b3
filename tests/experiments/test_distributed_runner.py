"""``tlkfac run --nproc N``: data-parallel runs of the runner against one process.

The exact comparisons run in float64: the runner trains in the default dtype on float32
data, so these tests set ``torch.float64`` as default dtype and hand the runner float64
data (``runner.load_data`` patched) before the workers are *forked*
(``TLKFAC_START_METHOD=fork``: they inherit both, and the imports, so a run starts in about
a second). The tiny CURVES problem (40 images, batch 7, one epoch) splits every batch
unequally (4 + 3 rows, the last batch 3 + 2), so the gradient and loss weights ``B_r/B`` are
exercised on every step. The Ctrl-C test runs the real console script (``spawn``: fresh
interpreters, float32).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml

from twolevel_kfac import cli
from twolevel_kfac.experiments import runner
from twolevel_kfac.experiments.config import load_config
from twolevel_kfac.experiments.parallel import Parallel
from twolevel_kfac.experiments.problem import Data, load_data

ROOT = Path(__file__).resolve().parents[2]
PROBLEM: dict[str, Any] = {
    "name": "tiny distributed",
    "model": {"name": "curves_autoencoder"},
    "dataset": {"name": "curves", "n_train": 40, "n_test": 8, "val_fraction": 0.0},
    "loss": "bce",
    "batch_size": 7,
    "epochs": 1,
    "log_every": 2,
    "seeds": [0],
}
# fisher "empirical" with the whole batch: the curvature of N ranks is that of one process
# (MC targets and Fisher subsets are drawn per rank, from per-rank seeds).
METHOD = {
    "lr": 0.1,
    "damping": 0.1,
    "fisher": "empirical",
    "fisher_batch": 1.0,
    "cov_interval": 1,
    "inv_interval": 3,
    "kl_clip": 1e-2,
}

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend"
)


def write_config(path: Path, **problem: Any) -> Path:
    data = {"problem": {**PROBLEM, **problem}, "methods": {"kfac": METHOD}}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def tlkfac_run(config: Path, out: Path, *extra: str) -> int:
    """``tlkfac run`` in this process (the workers are forked from it)."""
    return cli.main(["run", str(config), "--out", str(out), "--quiet", *extra])


def lines(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def relative_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    got = torch.cat([actual[k].reshape(-1) for k in sorted(expected)])
    want = torch.cat([expected[k].reshape(-1) for k in sorted(expected)])
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="module")
def curves(tmp_path_factory: pytest.TempPathFactory) -> Data:
    """The tiny problem's data, loaded once (forked workers get them from the patched
    ``runner.load_data``)."""
    if sys.platform != "linux":
        pytest.skip("the workers are forked (Linux)")
    import torch._dynamo  # noqa: F401 (DDP imports it: once here, not in every worker)

    config = write_config(tmp_path_factory.mktemp("data") / "tiny.yaml")
    return load_data(load_config(config).problem)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, curves: Data) -> Iterator[dict[str, Path]]:
    """One process; two processes; two processes stopped by --max-steps, then resumed."""
    tmp = tmp_path_factory.mktemp("distributed_runner")
    config = write_config(tmp / "tiny.yaml")
    assert curves.test is not None
    train, test = (tuple(t.double() for t in split) for split in (curves.train, curves.test))
    data64 = Data(train=train, val=None, test=test)  # type: ignore[arg-type]
    out = {name: tmp / name for name in ("one", "two", "resumed")}
    previous = torch.get_default_dtype()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "load_data", lambda problem, data_dir=None: data64)
        patch.setenv("TLKFAC_START_METHOD", "fork")
        torch.set_default_dtype(torch.float64)
        try:
            assert tlkfac_run(config, out["one"], "--nproc", "1") == 0
            assert tlkfac_run(config, out["two"], "--nproc", "2") == 0
            assert tlkfac_run(config, out["resumed"], "--nproc", "2", "--max-steps", "4") == 0
            assert lines(out["resumed"])[-1]["event"] == "partial"
            assert tlkfac_run(config, out["resumed"], "--nproc", "2", "--resume") == 0
        finally:
            torch.set_default_dtype(previous)
    yield out


def test_two_processes_equal_one_process(runs: dict[str, Path]) -> None:
    """Same parameters and losses to float64 rounding: the ranks' sums (gradients, factors,
    loss) are added in another order than one process adds them (measured: 4e-16)."""
    error = relative_error(parameters(runs["two"]), parameters(runs["one"]))
    assert error <= 1e-12, f"parameters: relative error {error:.2e}"
    one, two = lines(runs["one"]), lines(runs["two"])
    assert [(r["event"], r["step"]) for r in two] == [(r["event"], r["step"]) for r in one]
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-12)
    assert two[-1]["test_loss"] == pytest.approx(one[-1]["test_loss"], rel=1e-12)


def test_resumed_distributed_run_equals_uninterrupted(runs: dict[str, Path]) -> None:
    straight, resumed = parameters(runs["two"]), parameters(runs["resumed"])
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())
    drop = ("wall_time_s", "cpu_time_s", "comm_bytes")  # timings; comm_bytes is averaged over steps

    def values(run_dir: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in drop} for r in lines(run_dir)]

    assert values(runs["resumed"]) == values(runs["two"])


def test_rank_zero_alone_writes(runs: dict[str, Path]) -> None:
    """One line per record (two writers would double them), nothing else left behind."""
    for name in ("two", "resumed"):
        records = lines(runs[name])
        assert len(records) == len(lines(runs["one"])) == 4
        assert len({(r["event"], r["step"]) for r in records}) == len(records)
        files = sorted(p.name for p in runs[name].iterdir())
        assert files == [
            "checkpoint.pt",
            "config.yaml",
            "metrics.jsonl",
            "provenance.jsonl",
            "result.json",
        ]


@pytest.mark.parametrize(
    ("nproc", "env", "message"),
    [
        (8, {}, "problem.batch_size 7 is smaller than the 8 processes (--nproc)"),
        (3, {"RANK": "0", "WORLD_SIZE": "2"}, "leave --nproc out under a launcher"),
        (6, {}, "the last batch of an epoch has 5 row(s) (40 training examples, problem"),
    ],
)
def test_bad_nproc_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    curves: Data,
    nproc: int,
    env: dict[str, str],
    message: str,
) -> None:
    """Refused before any process starts, or (the last batch, known once the data are
    loaded) by every worker, whose error the parent prints."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TLKFAC_START_METHOD", "fork")
    monkeypatch.setattr(runner, "load_data", lambda problem, data_dir=None: curves)
    config = write_config(tmp_path / "tiny.yaml")
    assert tlkfac_run(config, tmp_path / "out", "--nproc", str(nproc)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_nproc_below_one_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tlkfac_run(write_config(tmp_path / "tiny.yaml"), tmp_path / "out", "--nproc", "0")
    assert exit_info.value.code == 2
    assert "error: argument --nproc: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_one_process_is_the_identity() -> None:
    par = Parallel()
    batch = torch.arange(7)
    assert not par.distributed and par.is_main
    assert par.shard(batch) is batch and par.global_loss(2.5) == 2.5 and par.any(True)
    assert par.from_main(lambda: 3) == 3
    par.check_split(1, 7)  # one process takes any split


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_every_rank_with_one_checkpoint(tmp_path: Path, signum: int) -> None:
    """The console script with spawned workers: SIGINT to the process group (a terminal's
    Ctrl-C), or SIGTERM to the launcher alone (``timeout``, a batch system), which passes
    it on, makes the ranks agree to stop, rank 0 checkpoints and says so once."""
    config = write_config(tmp_path / "long.yaml", epochs=200)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "twolevel_kfac.cli", "run", str(config), "--out", str(out)]
    process = subprocess.Popen(
        [*command, "--nproc", "2", "--quiet"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "TLKFAC_START_METHOD": "spawn"},
    )
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"  # its first record: the ranks are training
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid, signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert stderr.count(": saving a checkpoint after this step") == 1
    assert "--nproc 2 --resume" in stdout
    records = lines(out)
    assert records[-1]["event"] == "partial"
    step = torch.load(out / "checkpoint.pt", weights_only=True)["loop"]["step"]
    assert step == records[-1]["step"] < 200 * 6  # 6 steps per epoch


def test_more_cpu_processes_than_cores_are_warned_of_and_a_kill_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--nproc 64`` on 2 cores ran without a word and died with a bare "process 57
    terminated with signal SIGKILL" (the system out of memory): a warning before the
    start, and the likely cause beside the signal."""
    from torch.multiprocessing.spawn import ProcessExitedException

    from twolevel_kfac.experiments import launch

    config = load_config(write_config(tmp_path / "tiny.yaml"))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.warns(RuntimeWarning, match=r"--nproc 3 on 2 CPU core\(s\)"):
        launch._check_distributed(config, 3)
    killed = ProcessExitedException(
        "process 57 terminated with signal SIGKILL", 57, 0, 137, "SIGKILL"
    )
    assert "out of memory" in launch._told(killed)
    failed = ProcessExitedException("process 1 terminated with exit code 3", 1, 0, 3)
    assert launch._told(failed) == "process 1 terminated with exit code 3"
