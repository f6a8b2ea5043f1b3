"""Re-render a comparison's report from its runs: ``tlkfac report DIR``.

With ``DIR/compare.yaml`` (a ``tlkfac compare`` directory): the runs ``tlkfac compare``
would show (:mod:`~twolevel_kfac.experiments.shown_runs`): those finished under it, and
unfinished ones of its config as they stand, named in the notes. Runs of other methods or
of another config, left from earlier comparisons into ``DIR``, are left out and named. In
the config's method order, with its title, notes, target loss and reference curves.
Without it: every ``DIR/<method>/seed<k>/metrics.jsonl``. Rewrites ``DIR/report.md``, the
PNGs and ``DIR/summary.json``, with the shown runs' provenance (``provenance.jsonl``) and
any ``--reference [LABEL=]FILE`` curve drawn beside them.
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
    from twolevel_kfac.experiments.comparison import write_comparison_report
    from twolevel_kfac.experiments.config import load_config
    from twolevel_kfac.experiments.epoch_table import epoch_table
    from twolevel_kfac.experiments.metrics import load_runs
    from twolevel_kfac.experiments.provenance import describe_runs
    from twolevel_kfac.experiments.reference_curves import parse_reference, read_reference
    from twolevel_kfac.experiments.report import markdown_table, write_report
    from twolevel_kfac.experiments.shown_runs import shown_runs

    root = Path(args.dir)
    if not root.is_dir():
        raise FileNotFoundError(f"comparison directory {root} does not exist")
    references = [parse_reference(spec) for spec in args.reference]
    if not (root / "compare.yaml").is_file():
        results = load_runs(root)
        target = args.target_loss
        path = write_report(
            results,
            root,
            args.title or root.name,
            "",
            target,
            references,
            provenance=describe_runs(root),
            epochs_table=epoch_table(results, references, []),
        )
        table = markdown_table(results, target)
    else:
        config = load_config(root / "compare.yaml")
        shown = shown_runs(config, root)
        if shown.left_out:
            print(f"left out (not runs of {root / 'compare.yaml'}): {', '.join(shown.left_out)}")
        if shown.unfinished:
            print(f"unfinished, shown as they stand: {shown.unfinished_text()}")
        if not shown.by_method:
            raise FileNotFoundError(
                f"no run under {root} is a run of its compare.yaml (`tlkfac compare CONFIG "
                "--out DIR` trains them and writes the report)"
            )
        configured = [
            read_reference(path, label) for label, path in config.report.references.items()
        ]
        path, table = write_comparison_report(
            config,
            root,
            shown,
            configured + references,
            title=args.title,
            target_loss=args.target_loss,
        )
    print(table)
    print(f"report: {path}")
    return 0
