"""Which runs of a comparison directory its report shows, and how they stand.

A comparison directory ``OUT`` (``tlkfac compare --out``) may hold runs the report of its
``compare.yaml`` must not show: runs of a method the config no longer has, or of an earlier
config (another learning rate: ``compare --fresh`` rewrote only the methods it ran). A run
is shown when it answers the config:

* a run of the current call (``ran``), as it stands;
* a finished run (its ``result.json`` written for this config: :func:`.run_state.read_finished`);
* an unfinished run (stopped by ``--max-steps``, Ctrl-C or a killed process) whose
  ``config.yaml`` is this config's run config. Before 2026-12-08 ``tlkfac report`` left
  these out (or failed when none had finished), where ``tlkfac compare`` showed its own
  call's as they stood; both now show them and say which are unfinished.

Everything else in ``OUT/*/seed*`` is *left out* and named.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twolevel_kfac.experiments.config import ExperimentConfig, load_config
from twolevel_kfac.experiments.metrics import read_metrics
from twolevel_kfac.experiments.report import Records
from twolevel_kfac.experiments.run_state import read_finished

__all__ = ["ShownRuns", "seed_folders", "shown_runs"]


@dataclass
class ShownRuns:
    """The runs a comparison's report shows (by method in config order, then seed)."""

    by_method: dict[str, dict[int, Records]] = field(default_factory=dict)
    unfinished: dict[str, int] = field(default_factory=dict)  # "<method>/seed<k>" → step
    left_out: list[str] = field(default_factory=list)  # "<method>/seed<k>" not shown

    @property
    def results(self) -> dict[str, list[Records]]:
        """The runs' records by method, as ``report.write_report`` takes them."""
        return {label: list(by_seed.values()) for label, by_seed in self.by_method.items()}

    @property
    def seeds(self) -> list[int]:
        """The seeds of the shown runs."""
        return sorted({seed for by_seed in self.by_method.values() for seed in by_seed})

    def run_dirs(self, out: Path) -> list[Path]:
        """The shown runs' folders under ``out``."""
        return [
            out / label / f"seed{seed}"
            for label, by_seed in self.by_method.items()
            for seed in by_seed
        ]

    def unfinished_text(self) -> str:
        """The unfinished runs as ``<method>/seed<k> (step N)``, comma-separated."""
        return ", ".join(f"{run} (step {step})" for run, step in self.unfinished.items())

    def status(self) -> dict[str, object]:
        """What ``summary.json`` records of the runs beside the table: the unfinished
        ones with their last step, and those left out."""
        return {"unfinished": dict(self.unfinished), "left_out": list(self.left_out)}

    def note(self) -> str:
        """Markdown naming the unfinished runs and those left out ("" when neither)."""
        lines = []
        if self.unfinished:
            lines.append(
                "Unfinished, shown as they stand (their last record; `tlkfac compare` "
                f"continues them): {self.unfinished_text()}."
            )
        if self.left_out:
            lines.append(
                "Left out (runs in this folder of another method or config): "
                f"{', '.join(self.left_out)}."
            )
        return "\n\n".join(lines)


def seed_folders(method_dir: Path) -> set[int]:
    """The seeds of a method's run folders (``seed<k>``)."""
    return {int(p.name[4:]) for p in method_dir.glob("seed*") if p.name[4:].isdigit()}


def shown_runs(
    config: ExperimentConfig,
    out: Path,
    seeds: Sequence[int] = (),
    ran: Collection[tuple[str, int]] = (),
) -> ShownRuns:
    """The runs of ``out`` the report of ``config`` shows (see the module docstring).

    Args:
        config: The comparison's config.
        out: The comparison directory.
        seeds: Seeds to look for besides the ``seed<k>`` folders found.
        ran: ``(method, seed)`` of the runs this call trained: shown as they stand.
    """
    shown = ShownRuns()
    for label in config.methods:
        for seed in sorted(seed_folders(out / label) | set(seeds)):
            run_dir = out / label / f"seed{seed}"
            metrics = run_dir / "metrics.jsonl"
            if not metrics.exists():
                continue
            records = read_metrics(metrics)
            run_config = config.for_run(label, seed)
            finished = _finished(run_config, run_dir, records)
            ours = finished or (label, seed) in ran
            if not ours and not (finished is False and _config_of(run_config, run_dir)):
                continue
            shown.by_method.setdefault(label, {})[seed] = records
            if not finished:
                step = records[-1].get("step") if records else None
                shown.unfinished[f"{label}/seed{seed}"] = int(step) if step is not None else 0
    found = sorted(f"{p.parent.name}/{p.name}" for p in out.glob("*/seed*") if p.is_dir())
    kept = {f"{label}/seed{seed}" for label, by_seed in shown.by_method.items() for seed in by_seed}
    shown.left_out = [run for run in found if run not in kept]
    return shown


def _finished(
    run_config: ExperimentConfig, run_dir: Path, records: list[dict[str, Any]]
) -> bool | None:
    """``True`` when the run finished under ``run_config`` (its ``result.json``), ``False``
    when it has no ``result.json``, ``None`` when that file answers another config."""
    try:
        kept = read_finished(run_dir, run_config, records)
    except ValueError:  # another config's, or cut short
        return None
    return kept is not None


def _config_of(run_config: ExperimentConfig, run_dir: Path) -> bool:
    """Whether the run's ``config.yaml`` is ``run_config``."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return False
    try:
        saved = load_config(path)
    except (OSError, ValueError):  # unreadable or invalid (read_yaml, parse_config)
        return False
    return saved.fingerprint() == run_config.fingerprint()
