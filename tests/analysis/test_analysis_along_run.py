"""The Fisher analysis along a real training run: the runner keeps model snapshots only
when asked (``problem.keep_checkpoints``, fingerprint unchanged), ``dataset.image_size``
pools as the analysis does, the metrics at each snapshot equal a direct analysis of that
state, mismatched runs and runs without snapshots are refused by name, and
``tlkfac analyze --run`` end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from twolevel_kfac.analysis.along_run import along_run, open_run, problem_differences
from twolevel_kfac.analysis.config import AnalyzeConfig
from twolevel_kfac.analysis.config import load_config as load_analysis_config
from twolevel_kfac.analysis.evaluate import evaluate_state
from twolevel_kfac.analysis.exact import compute_curvature
from twolevel_kfac.analysis.formatting import clean
from twolevel_kfac.analysis.pipeline import run_analysis
from twolevel_kfac.analysis.problems import load_data as analysis_data
from twolevel_kfac.analysis.stages import STAGE_DIR, Stages, stage_key
from twolevel_kfac.cli import main
from twolevel_kfac.experiments.checkpoint import list_snapshots
from twolevel_kfac.experiments.config import (
    ExperimentConfig,
    ProblemSpec,
    load_config,
    parse_config,
)
from twolevel_kfac.experiments.models import build_model
from twolevel_kfac.experiments.problem import Data, load_data, pool_images
from twolevel_kfac.experiments.runner import train_run

ROOT = Path(__file__).resolve().parents[2]
SIZES = [6, 5, 4, 3]
METHODS = ["block_diagonal", "kfac", "nicolaides+adef2", "residual+adef2"]
SPACES = ["nicolaides", "spectral", "residual", "krylov_residual"]
STEPS = [0, 3, 6, 8]  # 2 epochs × 4 batches, a checkpoint every 3 steps and at the end


def _analysis(backend: str = "dense", **changes: Any) -> AnalyzeConfig:
    raw: dict[str, Any] = {
        "name": "along",
        "model": {"kind": "mlp", "sizes": SIZES, "activation": "tanh"},
        "data": {"name": "synthetic", "n_train": 64},
        "likelihood": "categorical",
        "batch_size": 8,
        "damping": 1e-2,
        "damping_sweep": [1e-2],
        "methods": ["exact", "kfac", "nicolaides+adef2"],
        "spectra": [],
        "backend": backend,
        "along_run": {"methods": METHODS, "spaces": SPACES},
        **changes,
    }
    return AnalyzeConfig.model_validate(raw)


def _run_config(**problem: Any) -> ExperimentConfig:
    data = {
        "problem": {
            "model": {"name": "mlp", "kwargs": {"sizes": SIZES, "activation": "tanh"}},
            "dataset": {"name": "in-memory"},
            "loss": "cross_entropy",
            "batch_size": 16,
            "epochs": 2,
            "checkpoint_every": 3,
            **problem,
        },
        "methods": {"kfac": {"lr": 0.3, "damping": 0.1, "cov_interval": 1, "inv_interval": 2}},
    }
    return parse_config(data).for_run("kfac", 0)


def _train(run_dir: Path, **problem: Any) -> Path:
    """A tiny KFAC run on the analysis' own synthetic data (float32 in the runner)."""
    x, y = analysis_data(_analysis())
    data = Data(train=(x.float(), y), val=None, test=None)
    train_run(_run_config(**problem), run_dir, data=data, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("along") / "run", keep_checkpoints=True)


# ------------------------------------------------------------------ the runner side
def test_runner_keeps_snapshots_only_when_asked(run_dir: Path, tmp_path: Path) -> None:
    plain = _train(tmp_path / "plain")
    assert not (plain / "snapshots").exists() and list_snapshots(plain) == []
    snapshots = list_snapshots(run_dir)
    assert [step for step, _ in snapshots] == STEPS
    states = [torch.load(path, weights_only=True) for _, path in snapshots]
    assert [s["step"] for s in states] == STEPS and {s["kind"] for s in states} == {"snapshot"}
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    for key, value in final.items():
        torch.testing.assert_close(states[-1]["model"][key], value, rtol=0, atol=0)
    assert not torch.equal(states[0]["model"]["0.weight"], final["0.weight"])  # it trained
    # an interrupted and resumed run keeps the same snapshots, bit for bit
    part = tmp_path / "part"
    x, y = analysis_data(_analysis())
    data = Data(train=(x.float(), y), val=None, test=None)
    config = _run_config(keep_checkpoints=True)
    train_run(config, part, data=data, progress=False, max_steps=4)
    assert [step for step, _ in list_snapshots(part)] == [0, 3, 4]
    train_run(config, part, data=data, progress=False, resume=True)
    assert [step for step, _ in list_snapshots(part)] == [0, 3, 4, 6, 8]
    resumed = torch.load(part / "snapshots" / "step8.pt", weights_only=True)["model"]
    for key, value in states[-1]["model"].items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


def test_fingerprint_unchanged_without_the_new_options() -> None:
    raw = {
        "problem": {
            "model": {"name": "curves_autoencoder"},
            "dataset": {"name": "curves", "n_train": 64},
            "loss": "bce",
            "batch_size": 16,
            "epochs": 1,
        },
        "methods": {"kfac": {"lr": 0.1, "damping": 0.1}},
    }
    config = parse_config(raw)
    # the value before keep_checkpoints / dataset.image_size existed: old checkpoints resume
    assert config.fingerprint() == (
        "dae4a54436064971bcfd57a03a236c2e3ea9960e1d9652b61d25349f7df2015b"
    )
    assert "keep_checkpoints" not in config.fingerprinted()["problem"]
    assert "image_size" not in config.fingerprinted()["problem"]["dataset"]
    raw["problem"]["keep_checkpoints"] = True  # type: ignore[index]
    assert parse_config(raw).fingerprint() == config.fingerprint()  # same trajectory
    raw["problem"]["dataset"]["image_size"] = 7  # type: ignore[index]
    assert parse_config(raw).fingerprint() != config.fingerprint()  # other inputs


def test_dataset_image_size_pools_as_the_analysis() -> None:
    flat = torch.rand(3, 784, dtype=torch.float64)
    expected = F.adaptive_avg_pool2d(flat.reshape(3, 1, 28, 28), 7).flatten(1)
    torch.testing.assert_close(pool_images(flat, 7), expected, rtol=0, atol=0)
    assert pool_images(flat.reshape(3, 1, 28, 28), 14).shape == (3, 1, 14, 14)
    with pytest.raises(ValueError, match="square"):
        pool_images(torch.rand(3, 50), 7)
    # the runner's pooled CURVES are the analysis' (float32 vs float64), targets included
    problem = ProblemSpec.model_validate(
        {
            "model": {"name": "mlp", "kwargs": {"sizes": [49, 4, 49]}},
            "dataset": {"name": "curves", "n_train": 64, "n_test": 0, "image_size": 7},
            "loss": "bce",
            "batch_size": 8,
            "epochs": 1,
        }
    )
    data = load_data(problem)
    analysis = _analysis(
        model={"kind": "mlp", "sizes": [49, 4, 49], "activation": "relu"},
        data={"name": "curves", "n_train": 64, "image_size": 7},
        likelihood="bernoulli",
    )
    x, y = analysis_data(analysis)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))[round(64 * 0.2) :]
    torch.testing.assert_close(data.train[0].double(), x[order], rtol=0, atol=1e-6)
    torch.testing.assert_close(data.train[1].double(), y[order], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ the analysis side
@pytest.mark.parametrize("backend", ["dense", "matrix_free"])
def test_metrics_along_the_run_equal_a_direct_analysis(run_dir: Path, backend: str) -> None:
    config = _analysis(backend)
    along = along_run(config, open_run(config, run_dir))
    assert along["backend"] == backend and along["method"] == "kfac"
    assert [row["step"] for row in along["snapshots"]] == STEPS
    x, y = analysis_data(config)
    index = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:8]
    names = [*METHODS, *(f"{s}+adef2" for s in SPACES)]
    for (_, path), row in zip(list_snapshots(run_dir), along["snapshots"], strict=True):
        model = build_model("mlp", sizes=SIZES, activation="tanh").double()  # the runner's
        model.load_state_dict(torch.load(path, weights_only=True)["model"])
        curvature = compute_curvature(
            model, x[index], y[index], "categorical", "true",
            generator=torch.Generator().manual_seed(3),
            dense="func" if backend == "dense" else None,
        )  # fmt: skip
        direct = evaluate_state(
            model, curvature, (x[index], y[index]), "categorical", names,
            damping=1e-2, backend=backend, options=config.matrix_free,
        )  # fmt: skip
        assert row["loss"] == pytest.approx(curvature.loss, rel=1e-12)
        for name in METHODS:
            for key in ("cos_to_exact_ng", "energy_error", "energy_error_relative"):
                got, want = row["methods"][name][key], direct.methods[name][key]
                assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (row["step"], name, key)
        for space in SPACES:
            for key in ("coarse_gain", "coarse_gain_relative"):
                got, want = row["spaces"][space][key], direct.spaces[space][key]
                assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (row["step"], space, key)
    first, last = along["snapshots"][0], along["snapshots"][-1]
    assert first["loss"] > last["loss"]  # the snapshots are different states


def _refusal(config: AnalyzeConfig, run: Path) -> str:
    with pytest.raises(ValueError) as info:
        run_analysis(config, progress=False, run_dir=run)
    return str(info.value)


def test_mismatched_run_is_refused_by_name(run_dir: Path) -> None:
    message = _refusal(_analysis(model={"kind": "mlp", "sizes": [6, 4, 3]}), run_dir)
    assert "does not match the analysis config" in message
    assert "model.sizes: the run has [6, 5, 4, 3], the analysis config [6, 4, 3]" in message
    assert "model.activation: the run has 'tanh', the analysis config 'tanh'" not in message
    message = _refusal(_analysis(likelihood="gaussian"), run_dir)
    assert "likelihood: the run's loss 'cross_entropy' is 'categorical'" in message
    model = {"kind": "mlp", "sizes": SIZES, "activation": "relu"}
    assert "model.activation: the run has 'tanh', the analysis config 'relu'" in _refusal(
        _analysis(model=model), run_dir
    )
    cnn = {"kind": "cnn", "channels": [2], "image_size": 4, "num_outputs": 3}
    assert "no runner counterpart" in _refusal(_analysis(model=cnn), run_dir)


def test_shipped_configs_match() -> None:
    """configs/analysis/along_run_curves.yaml analyses runs of along_run_train.yaml."""
    analysis = load_analysis_config(ROOT / "configs/analysis/along_run_curves.yaml")
    train = load_config(ROOT / "configs/analysis/along_run_train.yaml")
    assert train.problem.keep_checkpoints and train.problem.checkpoint_every
    assert problem_differences(analysis, train.for_run("kfac", 0)) == []


def test_run_without_snapshots_is_refused(tmp_path: Path) -> None:
    plain = _train(tmp_path / "plain")
    message = _refusal(_analysis(), plain)
    assert "has no snapshots" in message and "problem.keep_checkpoints: true" in message
    with pytest.raises(FileNotFoundError, match=r"no config\.yaml"):
        run_analysis(_analysis(), progress=False, run_dir=tmp_path)


def test_cli_end_to_end(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = _analysis().model_dump(mode="json")
    path = tmp_path / "along.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    argv = ["analyze", str(path), "--out", str(out), "--run", str(run_dir), "--no-progress"]
    assert main(argv) == 0
    along = json.loads((out / "along_run.json").read_text())
    assert [row["step"] for row in along["snapshots"]] == STEPS
    assert set(along["snapshots"][0]["methods"]) == set(METHODS)
    report = (out / "report.md").read_text()
    assert "## Along a training run" in report and "Relative coarse gain" in report
    for name in ("along_run_metrics.png", "along_run_coarse_gain.png"):
        assert (out / name).stat().st_size > 0 and f"]({name})" in report
    (out / "along_run_coarse_gain.png").unlink()
    assert main(["analyze", str(path), "--out", str(out), "--render-only"]) == 0
    assert (out / "along_run_coarse_gain.png").is_file()
    raw["along_run"]["run_dir"] = str(tmp_path)  # the config key; not a run directory
    path.write_text(yaml.safe_dump(raw))
    assert main(["analyze", str(path), "--out", str(out), "--no-progress"]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_a_sequence_run_is_refused_by_name() -> None:
    """A run over logits with positions has no exact-Fisher analysis: said by name."""
    run = _run_config(loss="sequence_cross_entropy")
    differences = problem_differences(_analysis(), run)
    assert any("has logits with positions" in d for d in differences)


# ------------------------------------------------------------------ a resumed analysis
class _Stopped(Stages):
    """Stages that stop the run (a Ctrl-C) before computing the ``stop``-th stage."""

    def __init__(self, out: Path, key: str, stop: int) -> None:
        super().__init__(out, key)
        self.stop, self.seen = stop, 0

    def __call__(self, name: str, compute: Any) -> Any:
        self.seen += 1
        if self.seen == self.stop:
            raise KeyboardInterrupt
        return super().__call__(name, compute)


def _outputs(output: Any) -> str:
    details = {k: v for k, v in output.details.items() if k != "timings"}
    return json.dumps(
        clean([output.methods, details, output.spectra, output.along_run]), sort_keys=True
    )


@pytest.mark.parametrize("stop", [2, 5, 8])
def test_an_analysis_stopped_part_way_resumes_to_the_same_outputs(
    run_dir: Path, tmp_path: Path, stop: int
) -> None:
    """``tlkfac analyze`` had no resume: a run stopped part-way (the ViT analysis takes 10
    minutes) began again. Each finished stage is kept; stopped before its ``stop``-th stage
    (of: the state's training, the methods, the structure, the sweep, two training runs,
    one per snapshot), the run again reads the ones kept and writes what an uninterrupted
    run writes, bit for bit."""
    config = _analysis(state_steps=2, train={"steps": 3, "methods": ["kfac", "block_diagonal"]})
    want = _outputs(run_analysis(config, progress=False, run_dir=run_dir))
    key = stage_key(config, run_dir)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(config, progress=False, run_dir=run_dir, stages=_Stopped(tmp_path, key, stop))
    stages = Stages(tmp_path, key)
    got = run_analysis(config, progress=False, run_dir=run_dir, stages=stages)
    assert len(stages.resumed) == stop - 1
    assert _outputs(got) == want
    assert len(list((tmp_path / STAGE_DIR / key).iterdir())) == 4 + 2 + len(STEPS)


def test_the_command_resumes_and_starts_afresh_when_asked(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command keeps the stages while it runs, says how many it read back, removes
    them once the outputs are written; ``--fresh`` ignores kept ones; another config
    keeps its own."""
    path, out = tmp_path / "a.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(_analysis().model_dump(mode="json")))
    argv = ["analyze", str(path), "--out", str(out), "--run", str(run_dir), "--no-progress"]
    key = stage_key(load_analysis_config(path), run_dir)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(_analysis(), False, run_dir, _Stopped(out, key, 4))
    assert main(argv) == 0
    assert "resumed 3 finished stage(s)" in capsys.readouterr().out  # methods, structure, sweep
    assert not (out / STAGE_DIR).exists()
    with pytest.raises(KeyboardInterrupt):
        run_analysis(_analysis(), False, run_dir, _Stopped(out, key, 4))
    assert main([*argv, "--fresh"]) == 0
    assert "resumed" not in capsys.readouterr().out
    other = _analysis(damping=0.1)
    assert stage_key(other, run_dir) != key
