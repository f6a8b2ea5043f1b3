"""The paper's grid search: lr × damping per method (lr only for SGD/Adam).

Each grid point is a run (``tune.seed``, ``tune.epochs``) in
``OUT/<method>/lr<lr>_damping<damping>/``; its score is the lowest epoch train loss it
reached (a diverged run scores +inf). The lowest score wins, as in Koroko et al. (2023):
lr ∈ {1e-1 … 1e-4}, damping ∈ {1e-1 … 1e-4} unless ``tune:`` says otherwise. A run that
blew up without a NaN (its last epoch's loss above its first's: a finite 2.5e10 after a
best of 861) ranks after every run that did not, whatever its best.
``OUT/tune.md`` holds the score grids and ``OUT/tuned.yaml`` the input config with the
chosen values written into the method entries. Re-running continues unfinished runs.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from twolevel_kfac.experiments.comparison import run_one
from twolevel_kfac.experiments.config import ExperimentConfig, parse_config
from twolevel_kfac.experiments.optimizers import is_kfac_family
from twolevel_kfac.experiments.report import epoch_records
from twolevel_kfac.experiments.runner import load_data

__all__ = ["run_tuning"]


@dataclass(frozen=True)
class Score:
    """A grid point's epoch train losses: the lowest (``inf``: diverged or none finite),
    the first and the last."""

    best: float
    first: float = math.nan
    last: float = math.nan

    @property
    def blew_up(self) -> bool:
        """Finite throughout but ended above where its first epoch was."""
        return math.isfinite(self.best) and not self.last <= self.first

    def rank(self) -> tuple[bool, bool, float]:
        """Finite runs that did not blow up, by ``best``; then those that did; diverged last."""
        return math.isinf(self.best), self.blew_up, self.best

    def text(self) -> str:
        """A table cell: ``diverged``, the best loss, and how a blown-up run ended."""
        if math.isinf(self.best):
            return "diverged"
        return f"{self.best:.4g}" + (f" (blew up: {self.last:.3g})" if self.blew_up else "")


Grid = dict[tuple[float, float | None], Score]


def _score(records: Sequence[dict[str, Any]]) -> Score:
    losses = [r.get("train_loss") for r in epoch_records(records)]
    values = [float(v) if isinstance(v, (int, float)) else math.nan for v in losses]
    finite = [v for v in values if math.isfinite(v)]
    if any(r.get("diverged") for r in records) or not finite:
        return Score(math.inf)
    return Score(min(finite), values[0], values[-1])


def _grid_table(
    label: str,
    grid: Grid,
    lrs: Sequence[float],
    dampings: Sequence[float | None],
    best: tuple[float, float | None],
) -> str:
    """Markdown table lr (rows) × damping (columns); the winner in bold."""
    head = " | ".join("–" if d is None else f"damping {d:g}" for d in dampings)
    lines = [f"### {label}", "", f"| lr | {head} |", "|---|" + "---|" * len(dampings)]
    for lr in lrs:
        cells = []
        for d in dampings:
            text = grid[(lr, d)].text()
            cells.append(f"**{text}**" if (lr, d) == best else text)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_tuning(
    raw: dict[str, Any],
    out_dir: str | Path,
    *,
    methods: Sequence[str] | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    data_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, tuple[float, float | None, float]], Path]:
    """Grid-search each method's lr (× damping) and write ``tuned.yaml`` and ``tune.md``.

    Args:
        raw: The config mapping as read from YAML (``config.read_yaml``); the tuned copy
            keeps its keys and changes only the methods' ``lr`` / ``damping``.
        out_dir: Output directory.
        methods: Labels to tune (default: ``tune.methods``, else all).
        max_steps: Per-run step limit.
        progress: tqdm bars.
        data_dir: Data directory.
        log: Where progress lines go.

    Returns:
        ``label -> (lr, damping or None, score)`` and the path of ``tuned.yaml``.
    """
    config = parse_config(raw)
    spec = config.tune
    labels = list(methods or spec.methods or config.methods)
    for label in labels:
        if label not in config.methods:
            raise ValueError(
                f"method {label!r} is not in the config; it has {list(config.methods)}"
            )
    seed = spec.seed if spec.seed is not None else config.problem.seeds[0]
    base = config.model_copy(deep=True)
    if spec.epochs is not None:
        base.problem.epochs = spec.epochs
    out = Path(out_dir)
    data = load_data(base.problem, data_dir)
    chosen: dict[str, tuple[float, float | None, float]] = {}
    sections = [
        f"# Grid search: {config.problem.name}",
        "",
        f"Seed {seed}, {base.problem.epochs} epochs; score = lowest epoch train loss. A run "
        "that blew up (last epoch above its first) ranks after the others.",
    ]
    for label in labels:
        kind = str(config.methods[label].get("optimizer", label))
        dampings: list[float | None] = list(spec.damping) if is_kfac_family(kind) else [None]
        grid: Grid = {}
        for lr in spec.lr:
            for damping in dampings:
                grid[(lr, damping)] = _grid_point(
                    base, label, seed, lr, damping, out, data, max_steps, progress, log
                )
        best = min(grid, key=lambda k: grid[k].rank())
        chosen[label] = (*best, grid[best].best)
        sections += ["", _grid_table(label, grid, spec.lr, dampings, best)]
    sections += _implausible(chosen)
    (out / "tune.md").write_text("\n".join(sections) + "\n", encoding="utf-8")
    tuned = copy.deepcopy(raw)
    for label, (lr, damping, _) in chosen.items():
        entry = tuned["methods"].get(label) or {}
        entry["lr"] = lr
        if damping is not None:
            entry["damping"] = damping
        tuned["methods"][label] = entry
    path = out / "tuned.yaml"
    header = "# Written by `tlkfac tune` (see tune.md): lr/damping of the grid search.\n"
    path.write_text(header + yaml.safe_dump(tuned, sort_keys=False), encoding="utf-8")
    return chosen, path


def _implausible(chosen: dict[str, tuple[float, float | None, float]]) -> list[str]:
    """Warn (and say in tune.md) where a method's chosen point ended 100× above the lowest
    loss any method reached: every point of its grid diverged or blew up in a way one epoch
    cannot tell (a loss of 6e16 was chosen for SGD in a trial)."""
    finite = [best for *_, best in chosen.values() if math.isfinite(best)]
    lowest = min(finite, default=math.inf)
    notes = []
    for label, (lr, _, best) in chosen.items():
        if math.isfinite(lowest) and not best <= 100 * abs(lowest) + 1e-12:
            note = (
                f"{label}: its chosen point (lr {lr:g}) ended at a train loss of {best:.3g}, "
                f"over 100× the lowest any method reached ({lowest:.3g}): its grid may hold no "
                "working setting (extend the grid, or run more epochs)"
            )
            warnings.warn(note, RuntimeWarning, stacklevel=3)
            notes += ["", f"**Warning.** {note}."]
    return notes


def _grid_point(
    base: ExperimentConfig,
    label: str,
    seed: int,
    lr: float,
    damping: float | None,
    out: Path,
    data: Any,
    max_steps: int | None,
    progress: bool,
    log: Callable[[str], None],
) -> Score:
    """Run one grid point (resuming / reusing an existing run) and return its score."""
    config = base.model_copy(deep=True)
    entry = {**config.methods[label], "lr": lr}
    name = f"lr{lr:g}"
    if damping is not None:
        entry["damping"] = damping
        name += f"_damping{damping:g}"
    config.methods = {label: entry}
    run_dir = out / label / name
    result = run_one(
        config, label, seed, run_dir, data=data, max_steps=max_steps, progress=progress
    )
    score = _score(result.records)
    log(f"{label} {name}: {score.text()}")
    return score
