"""The paper's grid search: ``tlkfac tune CONFIG [--out DIR]``.

For each method (``tune.methods``, else all): lr × damping (lr only for SGD/Adam) on
``tune.seed`` for ``tune.epochs``; the lowest train loss wins. Writes ``DIR/tune.md`` and
``DIR/tuned.yaml`` (the config with the chosen values).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twolevel_kfac.experiments.commands import add_common, apply_common, progress_enabled


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's arguments to its parser."""
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument(
        "--out", default=None, help="output directory (default: results/tune-<config>)"
    )
    parser.add_argument(
        "--methods",
        type=lambda s: [p for p in s.split(",") if p],
        default=None,
        help="comma-separated subset",
    )
    add_common(parser)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from twolevel_kfac.experiments.config import read_yaml
    from twolevel_kfac.experiments.tuning import run_tuning

    apply_common(args)
    raw = read_yaml(args.config)
    out = Path(args.out or Path("results") / f"tune-{Path(args.config).stem}")
    chosen, path = run_tuning(
        raw,
        out,
        methods=args.methods,
        max_steps=args.max_steps,
        progress=progress_enabled(args),
        data_dir=args.data_dir,
    )
    for label, (lr, damping, score) in chosen.items():
        extra = "" if damping is None else f", damping {damping:g}"
        print(f"{label}: lr {lr:g}{extra} (train loss {score:.4g})")
    print(f"tuned config: {path}; grids: {out / 'tune.md'}")
    return 0
