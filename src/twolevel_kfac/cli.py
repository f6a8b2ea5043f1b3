"""``tlkfac``: the command line of twolevel-kfac.

Errors a user can fix (bad config, missing data, …) print ``error: …`` and exit with
status 2, without a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlkfac",
        description="KFAC and two-level KFAC: experiments, analysis and benchmarks.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: CURVES autoencoder, KFAC vs SGD vs Adam")
    demo.add_argument("--out", default="results/demo", help="output directory")
    demo.add_argument("--data-dir", default=None, help="data/cache directory (TLKFAC_DATA)")
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke version")
    return parser


def _run_demo(args: argparse.Namespace) -> None:
    from .experiments.demo import main as demo_main

    demo_main(out_dir=args.out, data_dir=args.data_dir, quick=args.quick)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"demo": _run_demo}
    try:
        commands[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
