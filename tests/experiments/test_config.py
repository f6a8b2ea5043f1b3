"""Experiment configs: every shipped YAML validates; errors name the key and the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from twolevel_kfac.experiments.config import ExperimentConfig, load_config, parse_config
from twolevel_kfac.experiments.optimizers import METHODS, allowed_arguments
from twolevel_kfac.experiments.yaml_io import config_diff, read_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER_METHODS = {
    "kfac",
    "nico",
    "residu",
    "kry_residu",
    "kry_nico",
    "spectral",
    "previous",
    "sgd",
    "adam",
}
# Beyond the paper: the other fine levels, in every paper and CPU config too.
CONFIG_METHODS = PAPER_METHODS | {"ekfac", "kpsvd"}
# The transformer problems (configs/cpu/tiny_gpt.yaml, vit.yaml): AdamW against the KFAC
# family with AdamW on the parameters without a curvature block.
TRANSFORMER_METHODS = {"adamw", "kfac", "kfac_reduce", "ekfac", "nico"}
PAPER_PROBLEMS = ["curves", "mnist", "faces", "d_mnist", "deep_linear", "cuda_convnet"]


def _experiment_files() -> list[Path]:
    """Every YAML under configs/ except the analysis schema's files."""
    files = sorted(CONFIGS.rglob("*.yaml"))
    return [
        f
        for f in files
        if "analysis" not in f.relative_to(CONFIGS).parts and f.name != "analyze.yaml"
    ]


def _minimal(**methods: Any) -> dict[str, Any]:
    return {
        "problem": {
            "model": {"name": "deep_linear", "kwargs": {"depth": 2, "width": 3, "in_features": 4}},
            "dataset": {"name": "toy"},
            "loss": "cross_entropy",
            "batch_size": 8,
            "epochs": 2,
        },
        "methods": methods or {"kfac": {"lr": 0.1}},
    }


@pytest.mark.parametrize("path", _experiment_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads(path: Path) -> None:
    raw = read_yaml(path)
    if "problem" not in raw:  # another schema (e.g. the analysis configs)
        pytest.skip("not an experiment config")
    config = load_config(path)
    for label in config.methods:
        run = config.for_run(label, config.problem.seeds[0])
        assert run.fingerprint() == config.for_run(label, config.problem.seeds[0]).fingerprint()


def test_expected_config_files_exist() -> None:
    for name in [*PAPER_PROBLEMS, "resnet18", "resnet34"]:
        assert (CONFIGS / "paper" / f"{name}.yaml").is_file()
    for name in [*PAPER_PROBLEMS, "tiny_gpt", "vit"]:
        assert (CONFIGS / "cpu" / f"{name}.yaml").is_file()
    for path in ("demo.yaml", "smoke/run.yaml", "smoke/compare.yaml"):
        assert (CONFIGS / path).is_file()
    for path in ("paper_cpu/mnist.yaml", "paper_cpu/curves.yaml"):
        assert (CONFIGS / path).is_file()


@pytest.mark.parametrize(
    "name",
    ["curves", "mnist", "faces", "d_mnist", "deep_linear", "cuda_convnet", "resnet18", "resnet34"],
)
def test_paper_configs_follow_the_paper(name: str) -> None:
    config = load_config(CONFIGS / "paper" / f"{name}.yaml")
    assert set(config.methods) == CONFIG_METHODS
    assert config.problem.seeds == [0, 1, 27]
    assert config.problem.early_stopping is not None
    assert config.problem.early_stopping.patience == 10
    assert config.problem.dataset.val_fraction == 0.2
    assert config.problem.loss_reduction == "mean"  # the authors' losses (torch's defaults)
    for label in config.methods:
        kind, kwargs = config.method_kwargs(label, 0)
        assert kwargs["weight_decay"] == 1e-3
        if kind != "adam":
            assert kwargs["momentum"] == 0.9
        if kind == "sgd":
            assert kwargs["nesterov"] is True
        if kind not in ("sgd", "adam"):
            assert kwargs["fisher_batch"] == 0.25
            assert kwargs["cov_interval"] == kwargs["inv_interval"] == 100


def test_paper_curves_values() -> None:
    config = load_config(CONFIGS / "paper" / "curves.yaml")
    assert config.problem.batch_size == 256 and config.problem.epochs == 500
    kfac = config.method_kwargs("kfac", 0)[1]
    # the authors' KFAC adds √λ to each factor, their two-level fine step λ (config header)
    assert (kfac["lr"], kfac["damping"], kfac["kl_clip"]) == (1e-3, 0.03162, 1e-2)
    assert config.method_kwargs("nico", 0)[1]["damping"] == 1e-3
    assert kfac["loss_reduction"] == "mean" and config.problem.loss_reduction == "mean"
    kry = config.method_kwargs("kry_nico", 0)[1]
    assert (kry["lr"], kry["damping"]) == (1e-2, 1e-2)
    assert config.method_kwargs("sgd", 0)[1]["lr"] == 1e-2
    assert config.method_kwargs("adam", 0)[1]["lr"] == 1e-4
    resnet = load_config(CONFIGS / "paper" / "resnet18.yaml")
    assert resnet.method_kwargs("spectral", 0)[1]["damping"] == 1e-2
    assert resnet.method_kwargs("nico", 0)[1]["damping"] == 1e-3


def test_cpu_configs_have_three_seeds() -> None:
    for path in sorted((CONFIGS / "cpu").glob("*.yaml")):
        config = load_config(path)
        assert len(config.problem.seeds) >= 3, path
        if path.stem.startswith("norm_blocks"):  # KFAC and NICO with norm blocks on, off
            methods = {"kfac", "kfac_norms", "nico", "nico_norms"}
        else:
            methods = CONFIG_METHODS if path.stem in PAPER_PROBLEMS else TRANSFORMER_METHODS
        assert set(config.methods) == methods, path
        assert path.read_text().startswith("#"), f"{path} lacks its header comment"


def test_unknown_keys_are_named_with_suggestions() -> None:
    data = _minimal()
    data["problem"]["batchsize"] = 3
    with pytest.raises(
        ValueError, match=r"unknown key 'problem.batchsize'.*did you mean 'batch_size'"
    ):
        parse_config(data)
    data = _minimal()
    data["problem"]["dataset"]["n_trian"] = 3
    with pytest.raises(ValueError, match=r"'problem.dataset.n_trian'.*'n_train'"):
        parse_config(data)
    with pytest.raises(ValueError, match=r"unknown key 'methods.kfac.dampng'.*'damping'"):
        parse_config(_minimal(kfac={"lr": 0.1, "dampng": 1.0}))
    data = _minimal()
    data["defaults"] = {"kfac": {"kl_clp": 1.0}}
    with pytest.raises(ValueError, match=r"'defaults.kfac.kl_clp'.*'kl_clip'"):
        parse_config(data)
    data = _minimal()
    data["method"] = {}
    with pytest.raises(ValueError, match=r"unknown key 'method'.*'methods'"):
        parse_config(data)


def test_method_validation() -> None:
    with pytest.raises(ValueError, match=r"methods.kfac: damping must be"):
        parse_config(_minimal(kfac={"lr": 0.1, "damping": -1.0}))
    with pytest.raises(ValueError, match=r"unknown optimizer 'kfca'.*'kfac'"):
        parse_config(_minimal(kfca={"lr": 0.1}))
    with pytest.raises(ValueError, match=r"methods.kfac: no lr"):
        parse_config(_minimal(kfac={"damping": 0.1}))
    with pytest.raises(ValueError, match=r"'methods.nico.coarse_space'"):
        parse_config(_minimal(nico={"lr": 0.1, "coarse_space": "spectral"}))
    with pytest.raises(ValueError, match=r"'methods.sgd.damping'"):
        parse_config(_minimal(sgd={"lr": 0.1, "damping": 0.1}))
    with pytest.raises(ValueError, match="combination"):
        parse_config(_minimal(nico={"lr": 0.1, "combination": "multiplicative"}))
    config = parse_config(_minimal(kfac_pi={"optimizer": "kfac", "lr": 0.1, "damping_mode": "pi"}))
    assert config.method_kwargs("kfac_pi", 3)[0] == "kfac"


def test_resolution_and_fingerprint() -> None:
    data = _minimal(kfac={}, nico={"damping": 0.01}, sgd={"lr": 0.01}, adam={"lr": 1e-3})
    data["defaults"] = {
        "weight_decay": 1e-3,
        "kfac": {"lr": 0.1, "damping": 0.1},
        "twolevel": {"combination": "adef2"},
    }
    config = parse_config(data)
    kind, kwargs = config.method_kwargs("nico", 5)
    assert kind == "nico" and kwargs["damping"] == 0.01 and kwargs["lr"] == 0.1
    assert kwargs["likelihood"] == "categorical" and kwargs["seed"] == 5
    assert kwargs["combination"] == "adef2" and kwargs["weight_decay"] == 1e-3
    assert "combination" not in config.method_kwargs("kfac", 5)[1]
    assert config.method_kwargs("sgd", 0)[1] == {
        "weight_decay": 1e-3,
        "momentum": 0.9,
        "nesterov": True,
        "lr": 0.01,
    }
    assert config.method_kwargs("adam", 0)[1] == {"weight_decay": 1e-3, "lr": 1e-3}
    run = config.for_run("nico", 5)
    assert list(run.methods) == ["nico"] and run.problem.seeds == [5]
    assert run.method_kwargs("nico", 5) == (kind, kwargs)
    assert run.for_run("nico", 5).fingerprint() == run.fingerprint()
    longer = run.model_copy(deep=True)
    longer.problem.epochs = 99
    assert longer.fingerprint() == run.fingerprint()  # more epochs may resume a run
    other = config.for_run("nico", 6)
    assert other.fingerprint() != run.fingerprint()
    diff = config_diff(run.fingerprinted(), other.fingerprinted())
    assert "methods.nico.seed: 5 → 6" in diff and "problem.seeds: [5] → [6]" in diff
    with pytest.raises(ValueError, match=r"unknown method 'nicco'.*'nico'"):
        config.for_run("nicco", 0)


def test_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("problem:\n  model: {name: x\n  loss: bce\n")
    with pytest.raises(ValueError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="is empty"):
        load_config(empty)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(listed)
    dup = tmp_path / "dup.yaml"
    dup.write_text("problem: {}\nmethods: {}\nproblem: {}\n")
    with pytest.raises(ValueError, match=r"dup.yaml:3:1: invalid YAML: duplicate key 'problem'"):
        load_config(dup)


def test_yaml_reads_exponent_floats(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("a: 1e-3\nb: 2E+2\nc: 1.0e-3\nd: '1e-3'\ne: 12\n")
    assert read_yaml(path) == {"a": 1e-3, "b": 200.0, "c": 1e-3, "d": "1e-3", "e": 12}


def test_value_errors_name_the_field() -> None:
    data = _minimal()
    data["problem"]["batch_size"] = 0
    data["problem"]["seeds"] = [1, 1]
    with pytest.raises(ValueError) as info:
        parse_config(data)
    assert "problem.batch_size: Input should be greater than 0 (got 0)" in str(info.value)
    assert "seeds must be distinct" in str(info.value)
    data = _minimal()
    del data["problem"]["loss"]
    with pytest.raises(ValueError, match=r"missing required key 'problem\.loss'"):
        parse_config(data)
    data = _minimal()
    data["problem"]["model"]["name"] = "resnet19"
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'.*'resnet18'"):
        parse_config(data)


def test_allowed_arguments_cover_the_optimizers() -> None:
    for method in METHODS:
        assert "lr" in allowed_arguments(method)
    assert "coarse_scale" in allowed_arguments("residu")
    assert "coarse_scale" not in allowed_arguments("kfac")
    data = _minimal(kfac=None)  # `kfac:` with nothing after it
    data["defaults"] = {"kfac": {"lr": 0.5}}
    config = parse_config(data)
    assert isinstance(config, ExperimentConfig) and config.methods == {"kfac": {}}


def test_a_method_can_run_fewer_seeds(tmp_path: Path) -> None:
    """``methods.<label>.seeds``: a comparison runs that method with those seeds only."""
    from twolevel_kfac.experiments.comparison import run_comparison

    raw = _minimal(kfac={"lr": 0.1}, sgd={"lr": 0.1, "seeds": [1]})
    raw["problem"] |= {
        "seeds": [0, 1],
        "model": {"name": "curves_autoencoder"},
        "dataset": {"name": "curves", "n_train": 64, "n_test": 16},
        "loss": "bce",
        "epochs": 1,
    }
    config = parse_config(raw)
    assert config.method_seeds("kfac") == [0, 1] and config.method_seeds("sgd") == [1]
    assert "seeds" not in config.method_kwargs("sgd", 1)[1]
    outcome = run_comparison(config, tmp_path, progress=False, log=lambda _: None)
    done = sorted(str(p.relative_to(tmp_path).parent) for p in tmp_path.glob("*/*/metrics.jsonl"))
    assert done == ["kfac/seed0", "kfac/seed1", "sgd/seed1"]
    assert outcome.report is not None
    for bad in ([5], [], "0"):
        raw["methods"]["sgd"]["seeds"] = bad
        with pytest.raises(ValueError, match=r"methods\.sgd\.seeds must be a non-empty list"):
            parse_config(raw)


def test_compare_refuses_seeds_the_config_does_not_run() -> None:
    """``tlkfac compare --seeds 7`` with ``problem.seeds: [0, 1]`` ran nothing and exited 0
    with an empty report (``--seeds 0,7`` ran seed 0 under a report saying ``[0, 7]``):
    refused, naming the seeds the selected methods run, as unknown methods are."""
    from twolevel_kfac.experiments.comparison import select

    raw = _minimal(kfac={"lr": 0.1}, sgd={"lr": 0.1, "seeds": [1]})
    raw["problem"] |= {"seeds": [0, 1]}
    config = parse_config(raw)
    assert select(config, None, [1, 0]) == (["kfac", "sgd"], [1, 0])
    assert select(config, None, None) == (["kfac", "sgd"], [0, 1])
    with pytest.raises(ValueError, match=r"seed\(s\) \[7\] are run by none of.*\[0, 1\]"):
        select(config, None, [0, 7])
    with pytest.raises(ValueError, match=r"methods \['sgd'\]: they run seeds \[1\]"):
        select(config, ["sgd"], [0])
