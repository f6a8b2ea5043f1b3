"""The analysis along a real training run: the metrics at the model snapshots of a
``tlkfac run``.

A run trained with ``problem.keep_checkpoints: true`` keeps its model as
``RUN_DIR/snapshots/step<k>.pt`` at the start, at every interval checkpoint and at the end
(:func:`twolevel_kfac.experiments.checkpoint.keep_snapshot`). :func:`open_run` checks that
the run trained the network of the analysis config — the analysis' ``model: {kind: mlp,
sizes, activation, bias}`` is the runner's model ``mlp`` with the same arguments
(:func:`runner_model`), the run's loss has the analysis' likelihood, and, unless the
analysis data are ``synthetic``, the run's data set and ``dataset.image_size`` pooling are
the analysis' ``data.name`` / ``data.image_size`` — and refuses, naming every difference,
or when the run kept no snapshots. :func:`along_run` then loads each snapshot in step order
into the analysis' float64 network and measures it on the fixed analysis batch
(:func:`~.problems.analysis_batch`: the same samples for every snapshot, the same seeded
sampler for ``fisher: mc``) with the configured backend, exactly as the single-state
analysis would at that state: the direction metrics of ``along_run.methods``
(``cos_to_exact_ng``, ``energy_error``, …) and, per coarse space of ``along_run.spaces``,
the coarse gain ``E(β*) − E(0)`` (absolute and relative to ``E`` of the KFAC direction),
at ``λ = along_run.damping`` (default: the analysis damping), not the run's own damping.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..experiments.checkpoint import SNAPSHOT_DIR, list_snapshots, load_snapshot
from ..experiments.config import ExperimentConfig
from ..experiments.config import load_config as load_run_config
from ..experiments.losses import LIKELIHOODS
from ..experiments.models import MODELS
from .config import AnalyzeConfig, ModelSpec
from .coordinates import analysis_layers, num_parameters
from .evaluate import checkpoint_metrics
from .exact import compute_curvature
from .problems import analysis_batch, build_model, load_data


@dataclass(frozen=True)
class RunSnapshots:
    """A checked run directory: its resolved config and its ``(step, path)`` snapshots."""

    run_dir: Path
    config: ExperimentConfig
    snapshots: list[tuple[int, Path]]


def runner_model(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """The runner's model (``experiments.models`` name and arguments) that builds the
    network of ``spec``: an analysis ``mlp`` is the runner's ``mlp`` (same layers, same
    parameter names).

    Raises:
        ValueError: for a ``cnn`` (the runner has no model with the analysis' CNN layers).
    """
    if spec.kind != "mlp":
        raise ValueError(
            f"along_run: the analysis model kind {spec.kind!r} has no runner counterpart; "
            "only model.kind 'mlp' (the runner's model 'mlp') can be analysed along a run"
        )
    return "mlp", {"sizes": list(spec.sizes), "activation": spec.activation, "bias": spec.bias}


def _arguments(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of runner model ``name`` with its defaults filled in."""
    bound = inspect.signature(MODELS[name]).bind(**kwargs)
    bound.apply_defaults()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items()}


def problem_differences(config: AnalyzeConfig, run: ExperimentConfig) -> list[str]:
    """What differs between the problem a run trained and the analysis config's (empty
    when they match; see the module docstring)."""
    name, kwargs = runner_model(config.model)
    model = run.problem.model
    diffs = []
    if model.name != name:
        diffs.append(
            f"model: the run trained {model.name!r} {model.kwargs}, the analysis config's "
            f"model is the runner's {name!r} {kwargs}"
        )
    else:
        have, want = _arguments(name, model.kwargs), _arguments(name, kwargs)
        diffs += [
            f"model.{key}: the run has {have.get(key)!r}, the analysis config {want.get(key)!r}"
            for key in sorted(set(have) | set(want))
            if have.get(key) != want.get(key)
        ]
    likelihood = LIKELIHOODS[run.problem.loss]
    if run.problem.loss.startswith("sequence"):
        diffs.append(
            f"loss: the run's {run.problem.loss!r} has logits with positions; the exact-Fisher "
            "analysis takes one output vector per sample (its Fisher is dense in them)"
        )
    elif likelihood != config.likelihood:
        diffs.append(
            f"likelihood: the run's loss {run.problem.loss!r} is {likelihood!r}, the analysis "
            f"config has {config.likelihood!r}"
        )
    data = run.problem.dataset
    if config.data.name != "synthetic":
        if data.name != config.data.name:
            diffs.append(
                f"data: the run trained on {data.name!r}, the analysis uses {config.data.name!r}"
            )
        if data.image_size != config.data.image_size:
            diffs.append(
                f"input pooling: the run has dataset.image_size {data.image_size}, the "
                f"analysis config data.image_size {config.data.image_size}"
            )
    return diffs


def open_run(config: AnalyzeConfig, run_dir: str | Path) -> RunSnapshots:
    """Read and check a ``tlkfac run`` directory for :func:`along_run`.

    Raises:
        FileNotFoundError: no ``config.yaml`` (not a run directory).
        ValueError: the run trained another problem (every difference named), or it kept
            no snapshots.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a `tlkfac run` directory (no config.yaml)")
    run = load_run_config(path)
    diffs = problem_differences(config, run)
    if diffs:
        raise ValueError(
            f"the run in {run_dir} does not match the analysis config:\n  " + "\n  ".join(diffs)
        )
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise ValueError(
            f"the run in {run_dir} has no snapshots ({SNAPSHOT_DIR}/step<k>.pt): train it with "
            "problem.keep_checkpoints: true (snapshots at the start, every "
            "problem.checkpoint_every steps and at the end)"
        )
    return RunSnapshots(run_dir, run, snapshots)


def load_state(model: nn.Module, path: Path) -> None:
    """Load the snapshot at ``path`` into ``model`` (cast to the model's float64).

    Raises:
        ValueError: not a snapshot, or one whose parameters do not fit ``model``.
    """
    state = load_snapshot(path)["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit the analysis model: {error}") from None


def state_metrics(
    model: nn.Module, batch: tuple[Tensor, Tensor], config: AnalyzeConfig, backend: str
) -> dict[str, Any]:
    """The along-run metrics of ``model`` on ``batch`` (module docstring): the batch loss,
    ``‖g‖``, ``methods`` and ``spaces`` of :func:`~.evaluate.checkpoint_metrics`."""
    spec = config.along_run
    curvature = compute_curvature(
        model,
        *batch,
        config.likelihood,
        config.fisher,
        mc_samples=config.mc_samples,
        generator=torch.Generator().manual_seed(config.seed + 3),  # as the single state
        dense="func" if backend == "dense" else None,
    )
    damping = spec.damping if spec.damping is not None else config.damping
    ms = config.method_set(model, curvature, damping, backend)
    try:
        rows = checkpoint_metrics(ms, config.along_run_methods, config.along_run_spaces)
    finally:
        ms.close()
    return {"loss": curvature.loss, "grad_norm": float(curvature.flat_grad.norm()), **rows}


def along_run(
    config: AnalyzeConfig,
    run: RunSnapshots,
    progress: Callable[[], None] | None = None,
    stage: Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The metrics at every snapshot of ``run`` (module docstring).

    Args:
        config: the analysis configuration.
        run: the checked run directory (:func:`open_run`).
        progress: called once per snapshot.
        stage: keeps each snapshot's metrics, and gives back those kept
            (:class:`~.stages.Stages`; default: none kept).

    Returns:
        ``{"run_dir", "method", "optimizer", "model", "damping", "backend", "batch_size",
        "snapshots": [{"step", "loss", "grad_norm", "methods", "spaces"}, …]}``
        (``along_run.json``).
    """
    model = build_model(config.model, config.seed)
    backend = config.resolve_backend(num_parameters(analysis_layers(model)))
    batch = analysis_batch(config, load_data(config))
    rows = []
    for step, path in run.snapshots:

        def metrics(at: Path = path) -> dict[str, Any]:
            load_state(model, at)
            return state_metrics(model, batch, config, backend)

        name = f"along_run/step{step}-{path.stat().st_mtime_ns}"  # (a snapshot written again)
        kept = stage(name, metrics) if stage else metrics()
        rows.append({"step": step, **kept})
        if progress is not None:
            progress()
    (label,) = run.config.methods
    damping = config.along_run.damping
    return {
        "run_dir": str(run.run_dir),
        "method": label,
        "optimizer": run.config.methods[label].get("optimizer", label),
        "model": run.config.problem.model.model_dump(mode="json"),
        "damping": damping if damping is not None else config.damping,
        "backend": backend,
        "batch_size": config.batch_size,
        "snapshots": rows,
    }
