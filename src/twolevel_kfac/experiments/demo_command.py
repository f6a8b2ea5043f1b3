"""``tlkfac demo``: the main job (``make demo``): the CURVES autoencoder comparison."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="results/demo", help="output directory")
    parser.add_argument("--data-dir", default=None, help="data/cache directory (TLKFAC_DATA)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke version")


def run(args: argparse.Namespace) -> None:
    from .demo import main

    main(out_dir=args.out, data_dir=args.data_dir, quick=args.quick)
