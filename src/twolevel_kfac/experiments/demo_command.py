"""``tlkfac demo``: the main job (``make demo``), the CURVES comparison of ``configs/demo.yaml``.

KFAC, NICO, RESIDU, PREVIOUS, SGD and Adam on a CURVES subset, one seed, sized to finish
in a few minutes on 2 CPU cores; writes ``results/demo/report.md`` and its plots.
``--quick`` runs a seconds-long version into ``results/demo-quick``. Runs on one thread
unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse

from twolevel_kfac.experiments.commands import (
    INTERRUPTED,
    add_common,
    apply_common,
    continue_flags,
    progress_enabled,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's arguments to its parser."""
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: results/demo, quick: results/demo-quick)",
    )
    parser.add_argument("--config", default=None, help="config (default: configs/demo.yaml)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke version")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep finished runs in --out and continue unfinished ones",
    )
    add_common(parser, max_steps=False, threads="1")


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from twolevel_kfac.experiments.demo import main

    if args.threads is None:
        args.threads = 1  # small matrices; robust on a shared machine (see demo.py)
    apply_common(args)
    try:
        outcome = main(
            args.out,
            args.config,
            quick=args.quick,
            resume=args.resume,
            data_dir=args.data_dir,
            progress=progress_enabled(args),
        )
    except ValueError as error:  # (the demo starts over without --resume: it has no --fresh)
        fresh = "run `tlkfac demo` without --resume to start over"
        raise ValueError(str(error).replace("pass --fresh to discard it", fresh)) from None
    if not outcome.interrupted:
        return 0
    again = "tlkfac demo --resume" + "".join(
        f" {flag} {value}"
        for flag, value in (("--config", args.config), ("--out", args.out))
        if value is not None
    )
    again += (" --quick" if args.quick else "") + continue_flags(args)
    print(f"interrupted: run `{again}` to continue (without --resume it starts over)")
    return INTERRUPTED
