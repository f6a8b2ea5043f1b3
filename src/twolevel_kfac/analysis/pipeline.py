"""``run_analysis``: everything ``tlkfac analyze`` computes for one configuration.

1. Data and the float64 network at initialisation (seeded), optionally advanced by
   ``state_steps`` exact-curvature training steps of ``state_method``; the analysed batch is
   the first ``batch_size`` samples of a seeded permutation of the pool. The backend
   (dense or matrix-free, :mod:`.backends`) follows from the parameter count and
   ``backend`` (:meth:`~.config.AnalyzeConfig.resolve_backend`).
2. The exact curvature of that batch (the optimizer's statistics, torch.func Fisher–vector
   products, and for the dense backend the torch.func dense Fisher).
3. Every method's metrics at ``damping`` (:func:`~.evaluate.evaluate_state`), the Fisher's
   block structure (:func:`~.structure.fisher_structure`), and the damping sweep.
4. Optionally, training with exact curvature (:mod:`.training`) from the initial network,
   one run per method.
5. Optionally, the metrics at the model snapshots of a real ``tlkfac run``
   (:mod:`.along_run`; ``along_run.run_dir`` or ``tlkfac analyze --run DIR``).
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..experiments.progress import progress_bar
from .along_run import along_run, open_run
from .config import AnalyzeConfig
from .coordinates import analysis_layers, num_parameters
from .evaluate import damping_sweep, evaluate_state
from .exact import Curvature, compute_curvature
from .problems import analysis_batch, build_model, load_data
from .stages import Stages
from .structure import fisher_structure
from .training import train_run


@dataclass
class AnalysisOutput:
    """``methods`` goes to ``analysis.json``, ``details`` to ``details.json``, ``spectra``
    (method → eigenvalues of ``P F̂``) to ``spectra.npz``, ``along_run`` (when a run was
    analysed) to ``along_run.json``."""

    config: AnalyzeConfig
    methods: dict[str, dict[str, Any]]
    details: dict[str, Any]
    spectra: dict[str, list[float]]
    along_run: dict[str, Any] | None = None


def run_analysis(
    config: AnalyzeConfig,
    progress: bool = True,
    run_dir: str | Path | None = None,
    stages: Stages | None = None,
) -> AnalysisOutput:
    """Run the analysis of ``config``.

    Args:
        config: the validated configuration.
        progress: show tqdm progress bars (only on a terminal).
        run_dir: a ``tlkfac run`` directory whose snapshots are analysed (default
            ``config.along_run.run_dir``; none: no analysis along a run).
        stages: where finished stages are kept and read back (:mod:`.stages`: a run
            stopped part-way resumes); default: nothing kept.

    Returns:
        The :class:`AnalysisOutput`.

    Raises:
        ValueError: a run directory of another problem, or without snapshots
            (:func:`~.along_run.open_run`, checked before anything is computed).
        FileNotFoundError: ``run_dir`` is not a run directory.
    """
    run_dir = run_dir if run_dir is not None else config.along_run.run_dir
    run = open_run(config, run_dir) if run_dir is not None else None  # refuse early
    stage = stages if stages is not None else Stages(None, "")
    clock = _Clock()
    initial, model, data, batch = _problem(config, stage)
    backend = config.resolve_backend(num_parameters(analysis_layers(model)))
    held: list[Curvature] = []

    def exact_curvature() -> Curvature:  # (only where a stage is not kept)
        if not held:
            held.append(compute_curvature(
                model, *batch, config.likelihood, config.fisher,
                mc_samples=config.mc_samples,
                generator=torch.Generator().manual_seed(config.seed + 3),
                dense="func" if backend == "dense" else None,
            ))  # fmt: skip
            clock.lap("curvature_s")
        return held[0]

    names = config.method_names
    opts = config.matrix_free
    kwargs: dict[str, Any] = {
        "damping_mode": config.damping_mode,
        "coarse_scale": config.coarse_scale,
        "spectral_which": config.spectral_which,
        "backend": backend,
        "options": opts,
    }

    def state_metrics() -> dict[str, Any]:
        with progress_bar(len(names), "methods", progress) as bar:
            state = evaluate_state(
                model, exact_curvature(), batch, config.likelihood, names,
                damping=config.damping, spectra=config.spectrum_methods,
                step_size=config.step_size, progress=lambda _name: bar.update(), **kwargs,
            )  # fmt: skip
        spectra = {k: v.tolist() for k, v in state.spectra.items()}
        problem = _describe(config, exact_curvature())
        return {"methods": state.methods, "spaces": state.spaces, "spectra": spectra,
                "solver": state.solver, "problem": problem}  # fmt: skip

    state = stage("methods", state_metrics)
    clock.lap("methods_s")
    structure = stage("structure", lambda: fisher_structure(
        exact_curvature(), probes=opts.block_norm_probes, max_numbers=opts.gram_max_numbers,
        seed=opts.seed,
    ))  # fmt: skip
    clock.lap("structure_s")
    sweep = stage("sweep", lambda: damping_sweep(
        model, exact_curvature(), names, config.damping_sweep, **kwargs
    ))  # fmt: skip
    clock.lap("sweep_s")
    held.clear()  # (the dense Fisher: not held through the training runs)
    training = _train(initial, data, config, progress, stage)
    clock.lap("training_s")
    along = None
    if run is not None:
        with progress_bar(len(run.snapshots), "snapshots", progress) as bar:
            along = along_run(config, run, bar.update, stage)
    clock.lap("along_run_s")
    details = {
        "name": config.name,
        "config": config.model_dump(mode="json"),
        "problem": state["problem"],
        "solver": state["solver"],
        "fisher": structure,
        "coarse_spaces": state["spaces"],
        "damping_sweep": sweep,
        "training": training,
        "timings": clock.laps,
    }
    return AnalysisOutput(config, state["methods"], details, state["spectra"], along)


class _Clock:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now


def _problem(
    config: AnalyzeConfig, stage: Stages
) -> tuple[torch.nn.Module, torch.nn.Module, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The network at initialisation, the analysed network, the data pool and the analysed
    batch (the analysed network is the initial one unless ``state_steps > 0``: then its
    parameters are a kept stage).

    Raises:
        ValueError: if the network has more analysis parameters than ``max_params``, or
            the ``state_steps`` run diverged.
    """
    torch.manual_seed(config.seed)
    x_all, y_all = load_data(config)
    initial = build_model(config.model, config.seed)
    model: torch.nn.Module = initial
    config.resolve_backend(num_parameters(analysis_layers(model)))  # refuses too large nets

    def trained() -> dict[str, Tensor]:
        run = train_run(
            initial, (x_all, y_all), config, config.state_method, steps=config.state_steps
        )
        if run.diverged or run.model is None:
            raise ValueError(
                f"state_steps: the {config.state_method!r} run diverged before step "
                f"{config.state_steps}; lower train.lr or raise train.damping"
            )
        return run.model.state_dict()

    if config.state_steps:
        model = copy.deepcopy(initial)
        model.load_state_dict(stage("state", trained))
    return initial, model, (x_all, y_all), analysis_batch(config, (x_all, y_all))


def _describe(config: AnalyzeConfig, curvature: Curvature) -> dict[str, Any]:
    return {
        "num_params": curvature.num_params,
        "layers": curvature.names,
        "layer_shapes": [list(s) for s in curvature.shapes],
        "batch_size": config.batch_size,
        "state_steps": config.state_steps,
        "state_method": config.state_method,
        "virtual_samples": curvature.stats[0].num_samples,
        "likelihood": config.likelihood,
        "fisher": config.fisher,
        "loss": curvature.loss,
        "grad_norm": float(curvature.flat_grad.norm()),
    }


def _train(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    config: AnalyzeConfig,
    progress: bool,
    stage: Stages,
) -> dict[str, Any]:
    spec = config.train
    if spec.steps == 0:
        return {}
    runs: dict[str, Any] = {}
    with progress_bar(spec.steps * len(spec.methods), "training", progress) as bar:

        def trained(method: str) -> dict[str, Any]:
            return train_run(model, data, config, method, bar.update).to_dict()

        for method in spec.methods:
            name = f"training/{method}"
            runs[method] = stage(name, functools.partial(trained, method))
            if name in stage.resumed:  # (a kept run: its steps at once)
                bar.update(spec.steps)
    return {
        "steps": spec.steps,
        "lr": spec.lr,
        "damping": spec.damping if spec.damping is not None else config.damping,
        "kl_clip": spec.kl_clip,
        "gain_run": spec.gain_run,
        "runs": runs,
    }
