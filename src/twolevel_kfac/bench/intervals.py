"""``intervals``: the default refresh intervals, chosen by the train loss reached per second.

KFAC at its defaults otherwise (``per_factor`` damping, ``inverse_method="auto"``, the
configs' lr, damping, KL clip and Fisher batch B/4) is trained by the experiment runner on
three problems of different shape, once per setting of ``(cov_interval, inv_interval)``
in :data:`SETTINGS` (``T5``: both 5; ``T1_inv20``: factors every step, decompositions every
20), plus the library's old defaults (``old_T1_eigen``: both 1, eigendecompositions):

| problem | config | cut to |
|---|---|---|
| CURVES autoencoder (generated data) | ``configs/cpu/curves.yaml`` | 10 epochs (250 steps) |
| MNIST autoencoder | ``configs/cpu/mnist.yaml`` | 5 epochs (160 steps) |
| cuda-convnet on Fashion-MNIST | ``configs/cpu/cuda_convnet.yaml`` | 10,000 images, 3 epochs |

Each run logs the mean train loss every :data:`LOG_EVERY` steps with its training wall
time. Two readings per problem and seed: the loss **at equal time** (when the fastest
setting has finished all its steps, each run's last logged loss by then) and the loss
**at equal steps** (the end of every run). A setting's score is its loss at equal time
divided by the best setting's on that problem and seed; the default is the setting with
the lowest mean score over problems and seeds, and the report shows every curve.

MNIST and Fashion-MNIST are read where the data commands put them (``TLKFAC_DATA`` or
``../shared/data``); a problem whose data is missing is skipped with the reason.
``--quick``: CURVES on 1,024 images, 2 epochs, three settings.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.report import environment, report_header, table

__all__ = ["NAME", "measure", "plot", "render"]

NAME = "intervals"
LOG_EVERY = 5
OLD_DEFAULTS = "old_T1_eigen"
SETTINGS: dict[str, dict[str, Any]] = {
    OLD_DEFAULTS: {"cov_interval": 1, "inv_interval": 1, "inverse_method": "eigen"},
    "T1": {"cov_interval": 1, "inv_interval": 1},
    "T1_inv20": {"cov_interval": 1, "inv_interval": 20},
    "T5": {"cov_interval": 5, "inv_interval": 5},
    "T10": {"cov_interval": 10, "inv_interval": 10},
    "T20": {"cov_interval": 20, "inv_interval": 20},
    "T50": {"cov_interval": 50, "inv_interval": 50},
    "T100": {"cov_interval": 100, "inv_interval": 100},
}
QUICK_SETTINGS = (OLD_DEFAULTS, "T1", "T10")
PROBLEMS: dict[str, tuple[str, dict[str, Any]]] = {
    "curves": ("configs/cpu/curves.yaml", {"epochs": 10}),
    "mnist_ae": ("configs/cpu/mnist.yaml", {"epochs": 5}),
    "convnet": ("configs/cpu/cuda_convnet.yaml", {"epochs": 3, "n_train": 10000}),
}


def _config(path: str, cut: dict[str, Any], settings: list[str], quick: bool) -> Any:
    from twolevel_kfac.bench.time_to_target import config_path
    from twolevel_kfac.experiments.config import parse_config
    from twolevel_kfac.experiments.yaml_io import read_yaml

    full = config_path().parents[2] / path
    raw = read_yaml(full)
    kfac = raw["methods"].get("kfac") or {}
    raw["methods"] = {label: {"optimizer": "kfac", **kfac, **SETTINGS[label]} for label in settings}
    raw.pop("tune", None)
    problem = raw["problem"]
    problem.update(epochs=cut["epochs"], log_every=LOG_EVERY, early_stopping=None)
    if "n_train" in cut:
        problem["dataset"]["n_train"] = cut["n_train"]
    if quick:
        problem["dataset"].update(n_train=1024, n_test=128)
        problem["epochs"] = 2
    return parse_config(raw, str(full))


def _curve(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    steps = [r for r in records if r.get("event") == "step"]
    return {
        "step": [float(r["step"]) for r in steps],
        "wall_time_s": [float(r["wall_time_s"]) for r in steps],
        "train_loss": [float(r["train_loss"]) for r in steps],
    }


def measure(options: BenchOptions) -> dict[str, Any]:
    """Train every setting on every problem and seed (module docstring)."""
    from twolevel_kfac.experiments.problem import load_data
    from twolevel_kfac.experiments.runner import train_run

    settings = list(QUICK_SETTINGS if options.quick else SETTINGS)
    names = ["curves"] if options.quick else list(options.problems or PROBLEMS)
    seeds = list(range(options.repeats or (1 if options.quick else 2)))
    runs, skipped = [], {}
    for name in names:
        path, cut = PROBLEMS[name]
        config = _config(path, cut, settings, options.quick)
        try:
            data = load_data(config.problem)
        except (FileNotFoundError, OSError) as error:
            skipped[name] = str(error)
            options.log(f"[{NAME}] skipping {name}: {error}")
            continue
        for seed in seeds:
            order = settings[seed % len(settings) :] + settings[: seed % len(settings)]
            for label in order:
                options.log(f"[{NAME}] {name}, {label}, seed {seed}")
                with tempfile.TemporaryDirectory() as scratch:
                    result = train_run(
                        config.for_run(label, seed), scratch, progress=False, data=data
                    )
                runs.append(
                    {"problem": name, "setting": label, "seed": seed, **_curve(result.records)}
                )
    return {
        "benchmark": NAME,
        "settings": {
            "quick": options.quick,
            "settings": {label: SETTINGS[label] for label in settings},
            "problems": {n: PROBLEMS[n] for n in names},
            "seeds": seeds,
            "log_every": LOG_EVERY,
        },
        "skipped": skipped,
        "environment": environment(options.threads),
        "runs": runs,
        "summary": summarize(runs),
    }


def loss_at(run: dict[str, Any], seconds: float) -> float:
    """The last logged train loss at or before ``seconds`` of training (the first if none)."""
    before = [loss for t, loss in zip(run["wall_time_s"], run["train_loss"], strict=True)
              if t <= seconds]  # fmt: skip
    return before[-1] if before else run["train_loss"][0]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (problem, seed): the loss of every setting at equal time and at equal steps, and
    each setting's score (equal-time loss over the best one's); the mean score per setting
    over problems and seeds, and the best setting."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["problem"], run["seed"]), []).append(run)
    cells: list[dict[str, Any]] = []
    scores: dict[str, list[float]] = {}
    for (problem, seed), group in groups.items():
        budget = min(r["wall_time_s"][-1] for r in group)
        at_time = {r["setting"]: loss_at(r, budget) for r in group}
        best = min(at_time.values())
        for r in group:
            score = at_time[r["setting"]] / best
            scores.setdefault(r["setting"], []).append(score)
            cells.append(
                {
                    "problem": problem,
                    "seed": seed,
                    "setting": r["setting"],
                    "budget_s": budget,
                    "loss_at_time": at_time[r["setting"]],
                    "loss_at_end": r["train_loss"][-1],
                    "seconds": r["wall_time_s"][-1],
                    "score": score,
                }
            )
    mean = {label: statistics.fmean(values) for label, values in scores.items()}
    return {"cells": cells, "mean_score": mean, "best": min(mean, key=mean.__getitem__)}


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    s, summary = data["settings"], data["summary"]
    lines = [
        *report_header(
            "Default refresh intervals: loss reached per second", NAME, data, s["quick"]
        ),
        "KFAC with the configs' hyper-parameters, one run per setting of (T_cov, T_inv), "
        f"problem and seed (seeds {s['seeds']}), the train loss logged every "
        f"{s['log_every']} steps. At equal time: each run's last logged loss when the "
        "fastest run of the same problem and seed has finished; score: that loss over the "
        "best one (1 = best). At equal steps: the loss at the end of every run. See "
        "`src/twolevel_kfac/bench/intervals.py`.",
        "",
    ]
    for problem, reason in data["skipped"].items():
        lines += [f"**{problem} skipped:** {reason}", ""]
    ranked = sorted(summary["mean_score"].items(), key=lambda item: item[1])
    lines += table(["setting", "mean score (1 = best)"], [[k, f"{v:.3f}"] for k, v in ranked])
    lines += ["", f"Best: **{summary['best']}**.", ""]
    for problem in dict.fromkeys(c["problem"] for c in summary["cells"]):
        cells = [c for c in summary["cells"] if c["problem"] == problem]
        body = []
        for label in s["settings"]:
            mine = [c for c in cells if c["setting"] == label]
            if mine:
                body.append(
                    [
                        label,
                        f"{statistics.fmean(c['loss_at_time'] for c in mine):.3f}",
                        f"{statistics.fmean(c['loss_at_end'] for c in mine):.3f}",
                        f"{statistics.fmean(c['seconds'] for c in mine):.1f}",
                    ]
                )
        budget = statistics.fmean(c["budget_s"] for c in cells)
        lines += [f"### {problem} (equal time: {budget:.1f} s, mean over seeds)", ""]
        lines += table(["setting", "loss at equal time", "loss at equal steps", "s"], body)
        lines += ["", f"Plot: `{NAME}_{problem}.png`.", ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    """``intervals_<problem>.png``: train loss against wall time and against steps."""
    from twolevel_kfac.bench.plots import interval_curves

    settings = list(data["settings"]["settings"])
    return [
        interval_curves(
            [r for r in data["runs"] if r["problem"] == problem],
            settings,
            OLD_DEFAULTS,
            f"KFAC refresh intervals: {problem}",
            out / f"{NAME}_{problem}.png",
        )
        for problem in dict.fromkeys(r["problem"] for r in data["runs"])
    ]
