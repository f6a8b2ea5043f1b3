"""Comparisons: every (method, seed) of a config as its own run directory, then a report.

Layout of a comparison directory ``OUT``::

    OUT/compare.yaml              the validated config, every method (in report order)
    OUT/<method>/seed<k>/         one run each: config.yaml, metrics.jsonl, checkpoint.pt
                                  (result.json once finished: run_state)
    OUT/report.md, *.png          the report (``report.write_report``)
    OUT/summary.json              the table's numbers

Re-running a comparison continues it: finished runs are kept, unfinished ones resume from
their checkpoint (a checkpoint of another config is refused unless ``fresh``). A finished
run is kept also without its checkpoint (its ``result.json``), so the small files of a
long comparison can be committed and the comparison continued on a fresh clone.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from twolevel_kfac.experiments.checkpoint import SNAPSHOT_DIR
from twolevel_kfac.experiments.config import ExperimentConfig, load_config
from twolevel_kfac.experiments.epoch_table import epoch_table
from twolevel_kfac.experiments.metrics import read_metrics
from twolevel_kfac.experiments.provenance import FILE as PROVENANCE_FILE
from twolevel_kfac.experiments.provenance import describe_runs
from twolevel_kfac.experiments.reference_curves import ReferenceCurve, read_reference
from twolevel_kfac.experiments.report import Records, epoch_records, markdown_table, write_report
from twolevel_kfac.experiments.run_state import RESULT_FILE, outcome, read_finished
from twolevel_kfac.experiments.runner import Data, RunResult, load_data, train_run
from twolevel_kfac.experiments.shown_runs import ShownRuns, shown_runs

__all__ = [
    "ComparisonResult",
    "check_same_experiment",
    "describe",
    "run_comparison",
    "run_one",
    "select",
    "write_comparison_report",
]

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.yaml", RESULT_FILE, PROVENANCE_FILE)
# what makes a comparison directory another experiment's (a method added, more epochs: not)
IDENTITY = ("model", "dataset", "loss", "loss_reduction", "batch_size")


@dataclass
class ComparisonResult:
    """What ``run_comparison`` produced."""

    results: dict[str, list[Records]]
    report: Path | None
    table: str
    interrupted: bool = False
    runs: list[RunResult] = field(default_factory=list)


def select(
    config: ExperimentConfig, methods: Sequence[str] | None, seeds: Sequence[int] | None
) -> tuple[list[str], list[int]]:
    """The methods and seeds to run (default: all of the config), checked against it."""
    labels = list(methods) if methods else list(config.methods)
    unknown = [m for m in labels if m not in config.methods]
    if unknown:
        raise ValueError(
            f"method(s) {unknown} are not in the config; it has {list(config.methods)}"
        )
    if not seeds:
        return labels, list(config.problem.seeds)
    known = sorted({s for label in labels for s in config.method_seeds(label)})
    missing = [s for s in seeds if s not in known]
    if missing:
        raise ValueError(
            f"seed(s) {missing} are run by none of the methods {labels}: they run seeds "
            f"{known} (problem.seeds, or a method's own seeds); add them there to run them"
        )
    return labels, list(seeds)


def run_one(
    config: ExperimentConfig,
    label: str,
    seed: int,
    run_dir: Path,
    *,
    data: Data,
    max_steps: int | None = None,
    progress: bool = True,
    fresh: bool = False,
) -> RunResult:
    """Start, resume or (if finished) just re-read the run of ``(label, seed)``.

    Raises:
        ValueError: ``run_dir`` holds a checkpoint of another config and not ``fresh``,
            or a ``result.json`` (a finished run kept without its checkpoint) that does not
            answer this config (:func:`.run_state.read_finished`).
    """
    run_config = config.for_run(label, seed)
    try:
        if not fresh and not (run_dir / "checkpoint.pt").exists():
            metrics = run_dir / "metrics.jsonl"
            records = read_metrics(metrics) if metrics.exists() else []
            kept = read_finished(run_dir, run_config, records)
            if kept is not None:  # finished, its checkpoint not kept (run_state)
                return kept
        if fresh or not (run_dir / "checkpoint.pt").exists():
            for name in RUN_FILES:  # a run that never reached a checkpoint starts over
                (run_dir / name).unlink(missing_ok=True)
            # (an old run's snapshots beside the new ones: `analyze --run` read both)
            shutil.rmtree(run_dir / SNAPSHOT_DIR, ignore_errors=True)
        resume = (run_dir / "checkpoint.pt").exists()
        return train_run(
            run_config,
            run_dir,
            resume=resume,
            max_steps=max_steps,
            progress=progress,
            data=data,
        )
    except ValueError as error:
        if "another config" in str(error) or "result.json" in str(error):
            raise ValueError(f"{error} (pass --fresh to discard it)") from None
        raise


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(config: ExperimentConfig, labels: Sequence[str], seeds: Sequence[int]) -> str:
    """Markdown notes: the set-up and each method's resolved hyper-parameters."""
    p, ds = config.problem, config.problem.dataset
    sizes = (
        f"{ds.n_train or 'all'} training samples ({ds.val_fraction:.0%} held out), "
        f"{'all' if ds.n_test is None else ds.n_test} test samples"
    )
    lines = [
        f"{p.name}: model `{p.model.name}`"
        + (f" {p.model.kwargs}" if p.model.kwargs else "")
        + f", data `{ds.name}` ({sizes}), "
        f"loss `{p.loss}` ({REDUCTION_TEXT[p.loss_reduction]}), batch {p.batch_size}, "
        f"{p.epochs} epochs, seeds {list(seeds)}"
        + (f", early stopping patience {p.early_stopping.patience}" if p.early_stopping else "")
        + ".",
        "",
        "| method | optimizer | hyper-parameters |",
        "|---|---|---|",
    ]
    for label in labels:
        kind, kwargs = config.method_kwargs(label, seeds[0])
        kwargs.pop("seed", None)
        args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
        lines.append(f"| {label} | {kind} | {args} |")
    if config.report.notes:
        lines += ["", config.report.notes.strip()]
    return "\n".join(lines)


REDUCTION_TEXT = {
    "sum": "per sample summed over output features, batch mean",
    "mean": "torch's default: mean over output features and batch, the authors' convention",
}


def run_comparison(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    fresh: bool = False,
    data_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> ComparisonResult:
    """Run ``methods × seeds`` of ``config`` into ``out_dir`` and write the report.

    Args:
        config: The experiment config.
        out_dir: Comparison directory (see the module docstring).
        methods: Labels to run (default: all, in config order).
        seeds: Seeds to run (default: ``problem.seeds``).
        max_steps: Per-run step limit (runs stop unfinished, checkpointed).
        progress: tqdm bars (on a terminal).
        fresh: Discard existing runs instead of continuing them.
        data_dir: Data directory.
        log: Where progress lines go.

    Returns:
        The results, report path and table; ``interrupted`` after Ctrl-C (the report
        then covers the runs so far).
    """
    labels, seed_list = select(config, methods, seeds)
    # read first: a missing reference file must not surface after hours of training
    references = [read_reference(path, label) for label, path in config.report.references.items()]
    out = Path(out_dir)
    check_same_experiment(config, out, fresh)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "compare.yaml").exists():  # (a first comparison killed hard: its runs
        _write_config(config, out)  # are reported as this config's, unfinished ones named)
    data = load_data(config.problem, data_dir)
    outcome = ComparisonResult({}, None, "")
    pairs = [(m, s) for m in labels for s in seed_list if s in config.method_seeds(m)]
    total = len(pairs)
    ran: set[tuple[str, int]] = set()  # the runs this call trained (under this config)
    for i, (label, seed) in enumerate(pairs, 1):
        run_dir = out / label / f"seed{seed}"
        log(f"[{i}/{total}] {label} seed {seed} → {run_dir}")
        ran.add((label, seed))
        result = run_one(
            config,
            label,
            seed,
            run_dir,
            data=data,
            max_steps=max_steps,
            progress=progress,
            fresh=fresh,
        )
        outcome.runs.append(result)
        log(_run_line(result))
        if result.interrupted:
            outcome.interrupted = True
            break
    # every method of the config (a later `--methods` subset adds runs to the same report),
    # written once a run was taken under it (a refused one leaves the folder's as it was)
    _write_config(config, out)
    shown = shown_runs(config, out, seed_list, ran)
    outcome.results = shown.results
    outcome.report, outcome.table = write_comparison_report(config, out, shown, references)
    return outcome


def _write_config(config: ExperimentConfig, out: Path) -> None:
    """``out/compare.yaml``: the config whose runs the folder's report shows. Written
    before the first run of a folder too (since 2026-12-08: a first comparison killed
    hard, SIGKILL or a scheduler's limit, left none, and ``tlkfac report`` then averaged
    its unfinished runs with the finished ones without a word)."""
    dump = config.model_dump(mode="json")
    (out / "compare.yaml").write_text(yaml.safe_dump(dump, sort_keys=False), encoding="utf-8")


def write_comparison_report(
    config: ExperimentConfig,
    out: Path,
    shown: ShownRuns,
    references: Sequence[ReferenceCurve] = (),
    *,
    title: str | None = None,
    target_loss: float | None = None,
) -> tuple[Path, str]:
    """Write ``out``'s report of the runs ``shown`` (``tlkfac compare`` and ``tlkfac
    report`` alike): title, notes (set-up, hyper-parameters, unfinished runs) and
    provenance of those runs alone (before 2026-12-08 the notes' seeds and the provenance
    came from every run folder, runs left out of the table too).

    Args:
        config: The comparison's config.
        out: The comparison directory.
        shown: Its runs to report (:func:`.shown_runs.shown_runs`).
        references: Curves drawn beside the runs.
        title: Overrides ``report.title`` (else the problem's name).
        target_loss: Overrides ``report.target_loss``.

    Returns:
        The report's path and its markdown table.
    """
    results = shown.results
    labels = [label for label in config.methods if label in results]
    notes = describe(config, labels, shown.seeds or config.problem.seeds)
    if shown.note():
        notes += "\n\n" + shown.note()
    target = target_loss if target_loss is not None else config.report.target_loss
    path = write_report(
        results,
        out,
        title or config.report.title or config.problem.name,
        notes,
        target,
        references=list(references),
        provenance=describe_runs(out, shown.run_dirs(out)),
        epochs_table=epoch_table(results, list(references), config.report.epochs),
        clock=config.problem.clock,
        runs=shown.status(),
    )
    return path, markdown_table(results, target, config.problem.clock)


def check_same_experiment(config: ExperimentConfig, out: Path, fresh: bool) -> None:
    """Refuse a comparison into ``out`` that holds another experiment's (its
    ``compare.yaml`` differs in a key of :data:`IDENTITY`), unless ``fresh``: its report,
    summary and plots were overwritten, its runs tabulated beside the new ones.

    Raises:
        ValueError: naming the keys that differ and the fixes.
    """
    saved = out / "compare.yaml"
    if fresh or not saved.is_file():
        return
    old = load_config(saved).problem.model_dump(mode="json")
    new = config.problem.model_dump(mode="json")
    differ = [f"problem.{k}" for k in IDENTITY if old.get(k) != new.get(k)]
    if differ:
        raise ValueError(
            f"{out} holds the comparison of another experiment ({', '.join(differ)} "
            f"{'differs' if len(differ) == 1 else 'differ'} from its compare.yaml): choose "
            "another --out, or pass --fresh to write over it"
        )


def _run_line(result: RunResult) -> str:
    epochs = epoch_records(result.records)
    if not epochs:
        return f"    {outcome(result.stop_reason, result.step)}"
    last = epochs[-1]
    held = "".join(
        f", {k} {last[k]:.4g}"
        for k in ("test_loss", "test_acc")
        if k in last and last[k] is not None
    )
    loss = last.get("train_loss")
    loss_text = f"{loss:.4g}" if isinstance(loss, float) else "nan"
    return (
        f"    {outcome(result.stop_reason, result.step)}, epoch {last['epoch']:g}: "
        f"train loss {loss_text}{held}, {last['wall_time_s']:.1f} s"
        + (f" ({last['cpu_time_s']:.1f} CPU s)" if "cpu_time_s" in last else "")
    )
