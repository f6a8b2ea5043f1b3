"""Compare methods × seeds of a config: ``tlkfac compare CONFIG [--out DIR]``.

Every (method, seed) becomes ``DIR/<method>/seed<k>/`` (a ``tlkfac run`` directory), then
``DIR/report.md``, ``DIR/*.png`` and ``DIR/summary.json`` are written and the table is
printed. Re-running continues: finished runs are kept, unfinished ones resume.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twolevel_kfac.experiments.commands import (
    INTERRUPTED,
    add_common,
    add_device,
    apply_common,
    continue_flags,
    progress_enabled,
    with_device,
)


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's arguments to its parser."""
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("--out", default=None, help="output directory (default: results/<config>)")
    parser.add_argument("--methods", type=_list, default=None, help="comma-separated subset")
    parser.add_argument("--seeds", type=_list, default=None, help="comma-separated seeds")
    parser.add_argument("--fresh", action="store_true", help="discard existing runs in --out")
    add_device(parser)
    add_common(parser)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from twolevel_kfac.experiments.comparison import run_comparison
    from twolevel_kfac.experiments.config import load_config

    apply_common(args)
    config = with_device(load_config(args.config), args)
    try:
        seeds = [int(s) for s in args.seeds] if args.seeds else None
    except ValueError:
        raise ValueError(f"--seeds must be integers; got {args.seeds}") from None
    out = Path(args.out or Path("results") / Path(args.config).stem)
    outcome = run_comparison(
        config,
        out,
        methods=args.methods,
        seeds=seeds,
        max_steps=args.max_steps,
        progress=progress_enabled(args),
        fresh=args.fresh,
        data_dir=args.data_dir,
    )
    print(outcome.table)
    print(f"report: {outcome.report}")
    if outcome.interrupted:
        again = f"tlkfac compare {args.config} --out {out}{continue_flags(args)}"
        print(f"interrupted: run `{again}` to continue")
        return INTERRUPTED
    return 0
