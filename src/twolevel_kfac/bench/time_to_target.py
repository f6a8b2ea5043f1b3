"""``time_to_target``: wall time of KFAC, SGD and Adam to reach target train losses on CURVES.

The problem and hyper-parameters are those of ``configs/cpu/curves.yaml`` (KFAC lr 0.3,
damping 0.1, T = 20; SGD lr 5e-3 with Nesterov momentum; Adam lr 3e-3; 40 epochs on 6,400
generated CURVES images, batch 256), trained by the experiment runner
(:func:`twolevel_kfac.experiments.runner.train_run`) into a temporary directory. Its
``wall_time_s`` counts training steps only (not evaluation or checkpoints), and
``train_loss`` is the epoch mean of the mini-batch losses; the time to a target is the
wall time at the end of the first epoch whose train loss is at or below it. The methods
take turns seed by seed (the order rotated per seed). ``--repeats K`` uses seeds
0…K−1 instead of the config's seeds.

``--quick``: 1,024 images, 2 epochs, seed 0, targets the first epochs can reach.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.report import environment, report_header, table

__all__ = ["NAME", "measure", "plot", "render"]

NAME = "time_to_target"
CONFIG = Path("configs") / "cpu" / "curves.yaml"
METHODS = ("kfac", "sgd", "adam")
TARGETS, QUICK_TARGETS = (70.0, 65.0, 60.0, 50.0, 40.0), (520.0, 200.0)


def config_path() -> Path:
    """``configs/cpu/curves.yaml`` of the working directory, else of the source checkout.

    Raises:
        FileNotFoundError: Neither exists.
    """
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / CONFIG).is_file():
            return root / CONFIG
    raise FileNotFoundError(f"{CONFIG} not found; run from the repository root")


def _config(options: BenchOptions) -> Any:
    from twolevel_kfac.experiments.config import parse_config
    from twolevel_kfac.experiments.yaml_io import read_yaml

    path = config_path()
    raw = read_yaml(path)
    raw["methods"] = {label: raw["methods"][label] for label in METHODS}
    problem = raw["problem"]
    if options.quick:
        problem["dataset"].update(n_train=1024, n_test=128)
        problem["epochs"], problem["seeds"] = 2, [0]
    if options.repeats:
        problem["seeds"] = list(range(options.repeats))
    return parse_config(raw, str(path))


def _first_time(run: dict[str, Any], target: float) -> float | None:
    for seconds, loss in zip(run["wall_time_s"], run["train_loss"], strict=True):
        if loss is not None and loss <= target:
            return float(seconds)
    return None


def _summary(runs: list[dict[str, Any]], targets: tuple[float, ...]) -> list[dict[str, Any]]:
    """Per method and target: median time over the seeds that reached it, and how many did."""
    rows: list[dict[str, Any]] = []
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        for target in targets:
            times = [t for t in (_first_time(r, target) for r in mine) if t is not None]
            rows.append(
                {
                    "method": method,
                    "target": target,
                    "median_s": statistics.median(times) if times else None,
                    "reached": len(times),
                    "seeds": len(mine),
                }
            )
    for row in rows:
        kfac = next(r for r in rows if r["method"] == "kfac" and r["target"] == row["target"])
        both = row["median_s"] is not None and kfac["median_s"] is not None
        row["vs_kfac"] = row["median_s"] / kfac["median_s"] if both else None
    return rows


def measure(options: BenchOptions) -> dict[str, Any]:
    """Train each method on each seed (module docstring) and return the JSON document."""
    from twolevel_kfac.experiments.problem import load_data
    from twolevel_kfac.experiments.report import epoch_records
    from twolevel_kfac.experiments.runner import train_run

    env = environment(options.threads)
    config = _config(options)
    data = load_data(config.problem)
    runs = []
    for k, seed in enumerate(config.problem.seeds):
        shift = k % len(METHODS)
        for method in METHODS[shift:] + METHODS[:shift]:
            options.log(f"[{NAME}] {method}, seed {seed}")
            with tempfile.TemporaryDirectory() as scratch:
                result = train_run(config.for_run(method, seed), scratch, progress=False, data=data)
            epochs = epoch_records(result.records)
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    "stop_reason": result.stop_reason,
                    "epoch": [r["epoch"] for r in epochs],
                    "wall_time_s": [r["wall_time_s"] for r in epochs],
                    "train_loss": [r["train_loss"] for r in epochs],
                }
            )
    targets = QUICK_TARGETS if options.quick else TARGETS
    hparams = {m: config.method_kwargs(m, 0)[1] for m in METHODS}
    return {
        "benchmark": NAME,
        "settings": {
            "quick": options.quick,
            "config": str(CONFIG),
            "title": config.problem.name,
            "targets": list(targets),
            "seeds": list(config.problem.seeds),
            "epochs": config.problem.epochs,
            "hyperparameters": hparams,
        },
        "environment": env,
        "runs": runs,
        "summary": _summary(runs, targets),
    }


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    s = data["settings"]
    rows = []
    for r in data["summary"]:
        median = "not reached" if r["median_s"] is None else f"{r['median_s']:.1f}"
        ratio = "–" if r["vs_kfac"] is None else f"{r['vs_kfac']:.2f}"
        rows.append(
            [r["method"], f"{r['target']:g}", median, f"{r['reached']}/{r['seeds']}", ratio]
        )
    finals = []
    for method in METHODS:
        last = [r["train_loss"][-1] for r in data["runs"] if r["method"] == method]
        finals.append(f"{method}: {statistics.median(last):.1f}")
    lines = [
        *report_header("Time to a target train loss, CURVES", "time_to_target", data, s["quick"]),
        f"`{s['config']}` ({s['title']}): {s['epochs']} epochs, seeds {s['seeds']}, trained by "
        "the experiment runner; time = training wall time (no evaluation) at the end of the "
        "first epoch whose mean train loss is at or below the target; median over the seeds "
        "that reached it. Hyper-parameters: "
        + "; ".join(f"{m} {h}" for m, h in s["hyperparameters"].items())
        + ".",
        "",
        *table(["method", "target", "median s", "seeds reached", "× KFAC's time"], rows),
        "",
        "Final train loss (median over seeds): "
        + ", ".join(finals)
        + ". Plot: `time_to_target.png`.",
    ]
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    """``time_to_target.png``: train loss against wall time."""
    from twolevel_kfac.bench.plots import loss_curves

    return [loss_curves(data, out / f"{NAME}.png")]
