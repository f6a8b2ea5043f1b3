"""``asdl_target``: wall time to a target train loss, our KFAC against ASDL's, each at its
documented defaults with lr and damping tuned on the same grid.

Problems: the data, model and batch of ``configs/cpu/mnist.yaml`` (MNIST autoencoder) and
``configs/cpu/curves.yaml`` (CURVES autoencoder), in our loss convention. Per library:

* **ours**: ``tk.KFAC(model, lr=lr, damping=damping, likelihood=...)``, every other
  argument at its default (MC Fisher of the whole batch, ``per_factor`` damping,
  ``inverse_method="auto"``, ``cov_interval = inv_interval = 10``, KL clip 1e-2,
  momentum 0.9);
* **ASDL**: ``KfacGradientMaker(model, PreconditioningConfig(data_size=B,
  damping=damping))`` with its defaults (intervals 1, no running average) and
  ``torch.optim.SGD(lr=lr, momentum=0.9)`` as its README shows. Its Monte-Carlo Fisher
  knows the categorical and Gaussian likelihoods only; for these Bernoulli (BCE)
  autoencoders it takes ``fisher_type="fisher_emp"`` (the empirical Fisher) instead.

Tuning: every (lr, damping) of :data:`GRID` for :data:`TUNE_EPOCHS` epochs, seed 0; the
lowest final train loss wins (the paper's rule). Then each library's best setting trains
for the config's epochs with seeds 0, 1, 2; the target is 1.05 × the larger of the two
libraries' median final losses (a loss both reach), and the time to it is the training
wall time (no evaluation) at the end of the first epoch at or below it, median over
seeds. Runs alternate between the libraries.

``--quick``: 512 CURVES images, one setting per library, one epoch, one seed.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.report import environment, report_header, table

__all__ = ["NAME", "measure", "render"]

NAME = "asdl_target"
CONFIGS = {"mnist_ae": "configs/cpu/mnist.yaml", "curves": "configs/cpu/curves.yaml"}
GRID = {"lr": (1e-3, 1e-2, 1e-1, 1.0), "damping": (1e-4, 1e-3, 1e-2, 1e-1, 1.0)}
TUNE_EPOCHS, SEEDS = 2, (0, 1, 2)
LIBRARIES = ("ours", "asdl")
Step = Callable[[Tensor, Tensor], Tensor]


def _problem(name: str, quick: bool) -> Any:
    from twolevel_kfac.bench.time_to_target import config_path
    from twolevel_kfac.experiments.config import parse_config
    from twolevel_kfac.experiments.yaml_io import read_yaml

    raw = read_yaml(config_path().parents[2] / CONFIGS[name])
    raw["methods"] = {"kfac": raw["methods"].get("kfac") or {}}
    raw.pop("tune", None)
    if quick:
        raw["problem"]["dataset"].update(n_train=512, n_test=64)
        raw["problem"]["epochs"] = 1
    return parse_config(raw).problem


def make_step(library: str, model: nn.Module, problem: Any, lr: float, damping: float) -> Step:
    """One training step of ``library`` at its defaults: ``step(x, y) -> loss``."""
    from twolevel_kfac.experiments.losses import LIKELIHOODS, loss_function

    loss_fn = loss_function(problem.loss, problem.loss_reduction)
    if library == "ours":
        import twolevel_kfac as tk

        opt = tk.KFAC(model, lr=lr, damping=damping, likelihood=LIKELIHOODS[problem.loss])

        def ours(x: Tensor, y: Tensor) -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        return ours
    from asdl import KfacGradientMaker, PreconditioningConfig

    from twolevel_kfac.bench.external import reducible

    config = PreconditioningConfig(data_size=problem.batch_size, damping=damping)
    likelihood = LIKELIHOODS[problem.loss]
    fisher = "fisher_mc" if likelihood in ("categorical", "gaussian") else "fisher_emp"
    loss_type = "cross_entropy" if likelihood == "categorical" else "mse"
    maker = KfacGradientMaker(model, config, fisher_type=fisher, loss_type=loss_type)
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_call = reducible(loss_fn)

    def asdl(x: Tensor, y: Tensor) -> Tensor:
        sgd.zero_grad(set_to_none=True)
        dummy = maker.setup_model_call(model, x)
        maker.setup_loss_call(loss_call, dummy, y)
        _, loss = maker.forward_and_backward()
        sgd.step()
        return loss.detach()

    return asdl


def train(
    library: str, problem: Any, data: Any, lr: float, damping: float, seed: int, epochs: int
) -> dict[str, Any]:
    """Train ``epochs`` epochs; per epoch the mean train loss and the training wall time.
    A step that raises (ASDL's Cholesky of a factor that is not positive definite) ends the
    run as diverged: a last epoch of loss NaN, the error kept under ``"error"``."""
    from twolevel_kfac.experiments.models import build_model

    torch.manual_seed(seed)
    model = build_model(problem.model.name, **problem.model.kwargs)
    step = make_step(library, model, problem, lr, damping)
    x_all, y_all = data.train
    batch = problem.batch_size
    seconds, curve, error = 0.0, [], None
    for epoch in range(epochs):
        order = torch.randperm(
            len(x_all), generator=torch.Generator().manual_seed(seed * 1000 + epoch)
        )
        total, count = 0.0, 0
        start = time.perf_counter()
        for i in range(0, len(order) - batch + 1, batch):
            index = order[i : i + batch]
            try:
                loss = float(step(x_all[index], y_all[index]))
            except RuntimeError as failure:  # torch's LinAlgError included
                error, total, count = str(failure).splitlines()[0][:200], float("nan"), 1
                break
            total, count = total + loss, count + 1
        seconds += time.perf_counter() - start
        curve.append({"epoch": epoch + 1, "wall_time_s": seconds, "train_loss": total / count})
        if error is not None or not torch.isfinite(torch.tensor(total)):
            break
    run = {"library": library, "lr": lr, "damping": damping, "seed": seed, "curve": curve}
    return run if error is None else {**run, "error": error}


def _final(run: dict[str, Any]) -> float:
    return _loss(run["curve"][-1]["train_loss"])


def time_to(run: dict[str, Any], target: float) -> float | None:
    """The wall time at the end of the first epoch at or below ``target`` (a diverged
    epoch's loss is NaN, or ``null`` in the JSON)."""
    return next((p["wall_time_s"] for p in run["curve"] if _loss(p["train_loss"]) <= target), None)


def _loss(value: float | None) -> float:
    """A loss as a number: a NaN or missing one (diverged) is infinite, never the best."""
    return math.inf if value is None or value != value else value


def measure(options: BenchOptions) -> dict[str, Any]:
    """Tune, then time both libraries on both problems (module docstring).

    Raises:
        RuntimeError: ASDL is not installed (the ``bench`` extra).
    """
    from twolevel_kfac.bench.external import asdl_status
    from twolevel_kfac.experiments.problem import load_data

    reason = asdl_status()
    if reason is not None:
        raise RuntimeError(f"{NAME} compares with ASDL: {reason}")

    names = ["curves"] if options.quick else list(options.problems or CONFIGS)
    grid = {"lr": (1e-2,), "damping": (1e-1,)} if options.quick else GRID
    seeds = (0,) if options.quick else SEEDS
    results = []
    for name in names:
        problem = _problem(name, options.quick)
        data = load_data(problem)
        tuning, best = [], {}
        for library in LIBRARIES:
            for lr in grid["lr"]:
                for damping in grid["damping"]:
                    options.log(f"[{NAME}] {name} tune {library} lr={lr:g} damping={damping:g}")
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        epochs = min(TUNE_EPOCHS, problem.epochs)
                        tuning.append(train(library, problem, data, lr, damping, 0, epochs))
            mine = [r for r in tuning if r["library"] == library]
            best[library] = min(mine, key=_final)
        runs = []
        for seed in seeds:
            for library in LIBRARIES if seed % 2 == 0 else LIBRARIES[::-1]:
                b = best[library]
                options.log(f"[{NAME}] {name} {library} seed {seed}")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    runs.append(
                        train(library, problem, data, b["lr"], b["damping"], seed, problem.epochs)
                    )
        finals = {
            lib: statistics.median(_final(r) for r in runs if r["library"] == lib)
            for lib in LIBRARIES
        }
        reached = [value for value in finals.values() if math.isfinite(value)]
        target = 1.05 * max(reached) if reached else math.inf
        times = {}
        for library in LIBRARIES:
            hit = [time_to(r, target) for r in runs if r["library"] == library]
            reached = [t for t in hit if t is not None]
            times[library] = statistics.median(reached) if reached else None
        chosen = {k: {"lr": v["lr"], "damping": v["damping"]} for k, v in best.items()}
        results.append(
            {
                "problem": name,
                "best": chosen,
                "tuning": tuning,
                "runs": runs,
                "finals": finals,
                "target": target,
                "times": times,
            }
        )
    return {
        "benchmark": NAME,
        "settings": {"quick": options.quick, "grid": grid, "seeds": list(seeds)},
        "environment": environment(options.threads),
        "results": results,
    }


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    s = data["settings"]
    lines = [
        *report_header(
            "Time to a target loss: our KFAC and ASDL's at their defaults", NAME, data, s["quick"]
        ),
        f"lr × damping grid {s['grid']}, tuned on {TUNE_EPOCHS} epochs (seed 0); then seeds "
        f"{s['seeds']} at each library's best; target 1.05 × the larger median final loss. "
        "See `src/twolevel_kfac/bench/asdl_target.py` for the set-up of each library.",
        "",
    ]
    rows = []
    for r in data["results"]:
        ours, asdl = r["times"]["ours"], r["times"]["asdl"]
        ratio = f"{ours / asdl:.2f}" if ours and asdl else "–"
        rows.append(
            [
                r["problem"],
                ", ".join(f"{k}: lr {v['lr']:g}, λ {v['damping']:g}" for k, v in r["best"].items()),
                f"{_loss(r['finals']['ours']):.4g} / {_loss(r['finals']['asdl']):.4g}",
                f"{_loss(r['target']):.4g}",
                "–" if ours is None else f"{ours:.1f}",
                "–" if asdl is None else f"{asdl:.1f}",
                ratio,
            ]
        )
    headers = ["problem", "best settings", "final loss ours / ASDL", "target", "ours s",
               "ASDL s", "ours / ASDL"]  # fmt: skip
    failed = [
        f"* {r['problem']}, {run['library']} lr {run['lr']:g} λ {run['damping']:g} seed "
        f"{run['seed']}: {run['error']}"
        for r in data["results"]
        for run in (*r["tuning"], *r["runs"])
        if "error" in run
    ]
    notes = ["", "Runs that raised (counted as diverged):", "", *failed] if failed else []
    return "\n".join([*lines, *table(headers, rows), *notes]) + "\n"


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    """``asdl_target_<problem>.png``: train loss against wall time, both libraries."""
    from twolevel_kfac.bench.plots import target_curves

    return [
        target_curves(
            r,
            LIBRARIES,
            f"{r['problem']}: ours vs ASDL at their defaults",
            out / f"{NAME}_{r['problem']}.png",
        )
        for r in data["results"]
    ]
