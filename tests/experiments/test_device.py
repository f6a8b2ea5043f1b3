"""Devices: ``problem.device`` / ``--device`` resolution and validation, the backend of a
distributed run, CPU runs unchanged bit for bit, CPU checkpoints, and optimizer state placed
on the parameters' device when loaded.

No GPU is needed: GPUs are faked with monkeypatch where only the choice is tested, and the
``meta`` device stands in for "a device other than the CPU" where tensors must really move.
What needs a real GPU (CUDA kernels, NCCL collectives, the CPU round trip of MC sampling)
is not exercised here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from twolevel_kfac.cli import main
from twolevel_kfac.curvature.likelihoods import sample_targets
from twolevel_kfac.experiments import launch, runner
from twolevel_kfac.experiments.config import ExperimentConfig, parse_config
from twolevel_kfac.experiments.device import backend_for, resolve_device
from twolevel_kfac.experiments.losses import LOSSES
from twolevel_kfac.experiments.models import build_model
from twolevel_kfac.experiments.optimizers import make_optimizer
from twolevel_kfac.experiments.runner import Data, train_run
from twolevel_kfac.placement import CPU, move_tensors
from twolevel_kfac.twolevel.coarse_matrix import CoarseOperator

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error without a GPU")


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def _problem(**extra: Any) -> dict[str, Any]:
    return {
        "model": {"name": "deep_linear", "kwargs": {"depth": 3, "width": 4, "in_features": 8}},
        "dataset": {"name": "in-memory"},
        "loss": "cross_entropy",
        "batch_size": 16,
        "epochs": 2,
        **extra,
    }


def _config(method: str = "kfac", **extra: Any) -> ExperimentConfig:
    entry = {"lr": 0.1, "damping": 0.1, "fisher_batch": 0.5, "cov_interval": 2}
    data = {"problem": _problem(**extra), "methods": {method: entry}}
    return parse_config(data).for_run(method, 0)


def _data() -> Data:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(104, 8, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return Data(train=(x[:80], y[:80]), val=(x[80:92], y[80:92]), test=(x[92:], y[92:]))


def _tensors(tree: Any) -> Iterator[Tensor]:
    """Every tensor in nested dicts, lists, tuples and dataclasses."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for f in dataclasses.fields(tree):
            yield from _tensors(getattr(tree, f.name))


# ------------------------------------------------------------------ resolution
def test_resolution_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == resolve_device("cpu") == CPU
    assert resolve_device("auto", 1, 4) == CPU
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=r"needs a GPU, but torch sees none.*--device cpu"):
            resolve_device(spec)
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:K'"):
        resolve_device("gpu")


def test_resolution_with_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", 1, 2) == torch.device("cuda", 1)  # one GPU per process
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu", 1, 2) == CPU
    with pytest.raises(ValueError, match=r"3 processes on this machine .* torch sees 2"):
        resolve_device("auto", 0, 3)
    with pytest.raises(ValueError, match=r"'cuda:2', but torch sees 2 GPU"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="names one GPU, but 2 processes"):
        resolve_device("cuda:0", 0, 2)
    # under torchrun the local rank picks the GPU (rank 5 of 8 on the second node of two)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_device("cuda", 5, 8) == torch.device("cuda", 1)


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend_for(CPU) == "gloo"
    _fake_gpus(monkeypatch, 2)
    backend = backend_for(resolve_device("auto", 1, 2))
    assert backend == "cpu:gloo,cuda:nccl"  # NCCL for CUDA tensors, gloo for the CPU ones
    _fake_gpus(monkeypatch, 0)
    assert backend_for(resolve_device("auto", 1, 2)) == "gloo"


@pytest.mark.parametrize(("gpus", "backend"), [(2, "cpu:gloo,cuda:nccl"), (0, "gloo")])
def test_rank_joins_its_device_and_backend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gpus: int, backend: str
) -> None:
    _fake_gpus(monkeypatch, gpus)
    calls: list[tuple[str, Any]] = []

    class Joined(Exception):
        pass

    def init_process_group(name: str, **kwargs: Any) -> None:
        calls.append(("init", (name, kwargs["rank"], kwargs["world_size"])))
        raise Joined

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set", device)))
    monkeypatch.setattr(launch.dist, "init_process_group", init_process_group)
    job = launch._Job(_config(), tmp_path, False, None, False, None, None)
    with pytest.raises(Joined):
        launch._train_rank(job, 1, 2, f"file://{tmp_path / 'store'}")
    expected: list[tuple[str, Any]] = [("init", (backend, 1, 2))]
    if gpus:
        expected.insert(0, ("set", torch.device("cuda", 1)))
    assert calls == expected


def test_nproc_is_checked_against_the_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_gpus(monkeypatch, 1)
    with pytest.raises(ValueError, match=r"2 processes on this machine .* torch sees 1"):
        launch.train_parallel(_config(), tmp_path / "run", 2)
    _fake_gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match="needs a GPU"):
        launch.train_parallel(_config(device="cuda"), tmp_path / "run", 2)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ config and CLI
def test_config_validates_the_device_and_leaves_it_out_of_the_fingerprint() -> None:
    for bad in ("gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "mps"):
        with pytest.raises(ValueError, match=r"problem\.device: device must be .*'cuda:K'"):
            parse_config({"problem": _problem(device=bad), "methods": {"sgd": {"lr": 0.1}}})
    default = _config()
    assert default.problem.device == "auto"
    assert "device" not in default.fingerprinted()["problem"]
    for spec in ("cpu", "cuda", "cuda:3"):  # the GPU count is checked when a run starts
        assert _config(device=spec).fingerprint() == default.fingerprint()


@CPU_ONLY
def test_cli_device_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    smoke = str(Path(__file__).resolve().parents[2] / "configs" / "smoke" / "run.yaml")
    out = tmp_path / "run"
    argv = ["run", smoke, "--out", str(out), "--quiet", "--max-steps", "1"]
    assert main([*argv, "--device", "cuda"]) == 2
    assert "needs a GPU, but torch sees none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--device", "gpu"])
    assert "device must be 'auto', 'cpu', 'cuda' or 'cuda:K'" in capsys.readouterr().err
    assert main([*argv, "--device", "cpu"]) == 0
    assert "device: cpu" in (out / "config.yaml").read_text()
    # the device is not fingerprinted: the run resumes under the config's own (auto)
    assert main(["run", smoke, "--out", str(out), "--quiet", "--resume"]) == 0


# ------------------------------------------------------------------ CPU runs
def _hand_loop(method: str) -> dict[str, Tensor]:
    """The runner's protocol written out without any device code: the reference."""
    config = _config(method)
    problem, data = config.problem, _data()
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002
    model = build_model(problem.model.name, **problem.model.kwargs)
    kind, kwargs = config.method_kwargs(method, 0)
    optimizer = make_optimizer(kind, model, **kwargs)
    loss_fn = LOSSES[problem.loss]
    x, y = data.train
    torch.set_flush_denormal(True)
    try:
        for epoch in range(problem.epochs):
            for idx in runner._epoch_order(len(x), 0, epoch).split(problem.batch_size):
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), y[idx]).backward()
                optimizer.step()
    finally:
        torch.set_flush_denormal(False)
    return model.state_dict()


@pytest.mark.parametrize("method", ["kfac", "nico"])
def test_cpu_run_is_unchanged_and_saves_cpu_tensors(tmp_path: Path, method: str) -> None:
    runs = {}
    for name, extra in (("default", {}), ("cpu", {"device": "cpu"})):
        runs[name] = train_run(
            _config(method, **extra), tmp_path / name, data=_data(), progress=False
        )
    losses = {k: [r["train_loss"] for r in v.records] for k, v in runs.items()}
    assert losses["default"] == losses["cpu"] and all(map(math.isfinite, losses["cpu"]))
    expected = _hand_loop(method)
    for name in runs:
        saved = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())
        tensors = list(_tensors(saved))
        assert len(tensors) > 10 and {t.device for t in tensors} == {CPU}


# ------------------------------------------------------------------ state placement
def test_move_tensors_keeps_structure_and_cpu_tensors() -> None:
    a, b = torch.ones(2), torch.zeros(3)
    tree: dict[str, Any] = {"a": a, "pairs": [(a, 1), (b, None)], "name": "x", "n": 3}
    same = move_tensors(tree, CPU)
    assert same["a"] is a and same["pairs"][1][0] is b  # no copy on the same device
    moved = move_tensors(tree, torch.device("meta"))
    assert moved["name"] == "x" and moved["n"] == 3 and moved["pairs"][0][1] == 1
    assert isinstance(moved["pairs"], list) and isinstance(moved["pairs"][0], tuple)
    assert [t.device.type for t in _tensors(moved)] == ["meta"] * 3
    assert a.device == CPU  # the input is left alone


def _trained(method: str, model: nn.Module, steps: int) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"lr": 0.1, "damping": 0.1, "cov_interval": 1, "inv_interval": 2}
    if method == "nico_faithful":
        method, kwargs = "residu", {**kwargs, "coarse_refresh": "faithful", "fine": "ekfac"}
    optimizer = make_optimizer(method, model, likelihood="categorical", **kwargs)
    pre = getattr(optimizer, "preconditioner", None)
    if pre is not None:
        pre.retain_statistics = True
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(12, 8, generator=gen).to(next(model.parameters()).device)
        y = torch.randint(0, 3, (12,), generator=gen).to(x.device)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return optimizer


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize(
    "method", ["kfac", "ekfac", "kpsvd", "kfac_corrected", "nico", "nico_faithful"]
)
def test_loaded_state_lives_on_the_parameters_device(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU state loaded by an optimizer whose model is on another device (``meta``) ends
    up on that device: factors, decompositions, EKFAC scalings, KPSVD corrections, the
    retained and two-level Fisher statistics, the coarse basis and matrix, momentum."""
    torch.manual_seed(0)
    state = _trained(method, _mlp(), steps=3).state_dict()
    with torch.device("meta"):
        target = _mlp()
    optimizer = _trained(method, target, steps=0)
    coarse: list[Tensor] = []  # the two-level operator is built on load; meta has no values

    def from_matrix(basis: list[Tensor | tuple[Tensor, ...]], matrix: Tensor) -> None:
        for b in basis:  # a dense tensor, or the tensors of outer products / split parts
            coarse.extend([b] if isinstance(b, Tensor) else b)
        coarse.append(matrix)

    monkeypatch.setattr(CoarseOperator, "from_matrix", staticmethod(from_matrix))
    optimizer.load_state_dict(state)
    pre = optimizer.preconditioner  # type: ignore[attr-defined]
    held = {k: v for k, v in vars(pre).items() if not isinstance(v, nn.Module)}
    tensors = list(_tensors(held)) + list(_tensors(optimizer.state)) + coarse
    assert len(tensors) >= 10
    assert {t.device.type for t in tensors} == {"meta"}
    assert bool(coarse) == method.startswith("nico")
    assert pre.generator.device == CPU  # the sampler stays on the CPU (device-independent)


# ------------------------------------------------------------------ MC sampling
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_cpu_sampling_is_unchanged(likelihood: str) -> None:
    """Drawing on the generator's device is, on the CPU, the same draws as before."""
    output = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = sample_targets(output, likelihood, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    if likelihood == "categorical":
        want = torch.multinomial(torch.softmax(output.float(), dim=1), 1, generator=gen)[:, 0]
    elif likelihood == "bernoulli":
        want = torch.bernoulli(torch.sigmoid(output), generator=gen)
    else:
        want = output + torch.randn(output.shape, generator=gen, dtype=output.dtype)
    assert got.device == output.device and torch.equal(got, want)
