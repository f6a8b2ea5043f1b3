"""Re-render a comparison's report from its finished runs: ``tlkfac report DIR``.

With ``DIR/compare.yaml`` (a ``tlkfac compare`` directory): the runs of its methods that
finished under it (runs of other methods or of another config, left from earlier
comparisons into ``DIR``, are left out and named: before 2026-12-07 they were tabulated
beside them; so are unfinished ones, which ``tlkfac compare`` reports as they stand for
the runs of its own call), in its method order, with its title, notes, target loss and
reference curves. Without it: every ``DIR/<method>/seed<k>/metrics.jsonl``.
Rewrites ``DIR/report.md``, the PNGs and ``DIR/summary.json``, with the runs' provenance
(``provenance.jsonl``) and any ``--reference [LABEL=]FILE`` curve drawn beside them.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _positive(text: str) -> float:
    """A finite number > 0 (``nan`` and ``-5`` were taken, as ``report.target_loss`` is
    not)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's arguments to its parser."""
    parser.add_argument("dir", help="comparison directory (tlkfac compare --out)")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument(
        "--target-loss",
        type=_positive,
        default=None,
        help="train loss for the time-to-target column (a finite number > 0)",
    )
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="[LABEL=]FILE",
        help="a CSV or JSON (epoch, loss) curve drawn beside the runs (repeatable; "
        "experiments/reference_curves.py lists the formats)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from twolevel_kfac.experiments.comparison import comparison_runs, describe
    from twolevel_kfac.experiments.config import load_config
    from twolevel_kfac.experiments.epoch_table import epoch_table
    from twolevel_kfac.experiments.metrics import load_runs
    from twolevel_kfac.experiments.provenance import describe_runs
    from twolevel_kfac.experiments.reference_curves import parse_reference, read_reference
    from twolevel_kfac.experiments.report import Results, markdown_table, write_report

    root = Path(args.dir)
    if not root.is_dir():
        raise FileNotFoundError(f"comparison directory {root} does not exist")
    config = load_config(root / "compare.yaml") if (root / "compare.yaml").is_file() else None
    results: Results
    if config is None:
        results = load_runs(root)
    else:
        runs = comparison_runs(config, root)
        results = {label: list(by_seed.values()) for label, by_seed in runs.items()}
        shown = {f"{label}/seed{seed}" for label, by_seed in runs.items() for seed in by_seed}
        found = sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/seed*") if p.is_dir())
        if left := [run for run in found if run not in shown]:
            print(f"left out (not finished under {root / 'compare.yaml'}): {', '.join(left)}")
        if not results:
            raise FileNotFoundError(
                f"no run under {root} finished under its compare.yaml (runs made before "
                "result.json existed, or not finished: `tlkfac compare CONFIG --out DIR` "
                "re-reads or finishes them and writes the report)"
            )
    title, notes, target = args.title or root.name, "", args.target_loss
    clock = config.problem.clock if config is not None else "wall"
    if config is not None:
        title = args.title or config.report.title or config.problem.name
        seeds = sorted({int(p.name[4:]) for p in root.glob("*/seed*") if p.name[4:].isdigit()})
        labels = [m for m in config.methods if m in results]
        notes = describe(config, labels, seeds or config.problem.seeds)
        target = target if target is not None else config.report.target_loss
    references = [parse_reference(spec) for spec in args.reference]
    epochs: list[int] = []
    if config is not None:
        configured = config.report.references.items()
        references = [read_reference(path, label) for label, path in configured] + references
        epochs = config.report.epochs
    path = write_report(
        results,
        root,
        title,
        notes,
        target,
        references,
        provenance=describe_runs(root),
        epochs_table=epoch_table(results, references, epochs),
        clock=clock,
    )
    print(markdown_table(results, target, clock))
    print(f"report: {path}")
    return 0
