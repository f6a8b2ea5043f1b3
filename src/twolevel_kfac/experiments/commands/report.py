"""Re-render a comparison's report from its finished runs: ``tlkfac report DIR``.

Reads ``DIR/<method>/seed<k>/metrics.jsonl`` (and ``DIR/compare.yaml`` for the method
order, title, notes, target loss and reference curves when present) and rewrites
``DIR/report.md``, the PNGs and ``DIR/summary.json``, with the runs' provenance
(``provenance.jsonl``) and any ``--reference [LABEL=]FILE`` curve drawn beside them.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's arguments to its parser."""
    parser.add_argument("dir", help="comparison directory (tlkfac compare --out)")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument(
        "--target-loss", type=float, default=None, help="train loss for the time-to-target column"
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
    from twolevel_kfac.experiments.comparison import describe
    from twolevel_kfac.experiments.config import load_config
    from twolevel_kfac.experiments.epoch_table import epoch_table
    from twolevel_kfac.experiments.metrics import load_runs
    from twolevel_kfac.experiments.provenance import describe_runs
    from twolevel_kfac.experiments.reference_curves import parse_reference, read_reference
    from twolevel_kfac.experiments.report import markdown_table, write_report

    root = Path(args.dir)
    if not root.is_dir():
        raise FileNotFoundError(f"comparison directory {root} does not exist")
    config = load_config(root / "compare.yaml") if (root / "compare.yaml").is_file() else None
    results = load_runs(root, order=list(config.methods) if config else ())
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
