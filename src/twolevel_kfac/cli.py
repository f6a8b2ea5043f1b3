"""``tlkfac``: the command line of twolevel-kfac.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int | None``; this file only wires them (``COMMANDS``), so subpackages
never import each other through the CLI. Errors a user can fix (bad config, missing data,
…) print ``error: …`` and exit with status 2, without a traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from .extras import missing_modules

# name → (module, help). Modules are imported when the parser is built; keep their
# top-level imports light (torch-heavy work inside ``run``).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("twolevel_kfac.experiments.demo_command", "the main job: the CURVES comparison"),
    "run": ("twolevel_kfac.experiments.commands.run", "one optimizer on one problem"),
    "compare": ("twolevel_kfac.experiments.commands.compare", "optimizers × seeds, then report"),
    "tune": ("twolevel_kfac.experiments.commands.tune", "the paper's lr × damping grid search"),
    "report": ("twolevel_kfac.experiments.commands.report", "re-render report.md and plots"),
    "data": ("twolevel_kfac.experiments.data.command", "fetch / verify / info of data sets"),
    "analyze": ("twolevel_kfac.analysis.command", "exact-Fisher analysis on a small network"),
    "bench": ("twolevel_kfac.bench", "the benchmarks of benchmarks/"),
}


def _load(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and module.startswith(error.name):
            return None  # a command that is not built yet is simply not offered
        raise


def build_parser() -> argparse.ArgumentParser:
    """The ``tlkfac`` argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="tlkfac",
        description="KFAC and two-level KFAC: experiments, analysis and benchmarks.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tlkfac`` with ``argv``; returns the exit status (2: a user error, printed)."""
    missing = missing_modules("experiments")
    if missing:
        print(
            f"error: tlkfac needs the 'experiments' extra (missing: {', '.join(missing)}); "
            "install it with: pip install 'twolevel-kfac[experiments]'",
            file=sys.stderr,
        )
        return 2
    args = build_parser().parse_args(argv)
    try:
        status = args.handler(args)
    except (ValueError, TypeError, RuntimeError, OSError, ArithmeticError) as error:
        if args.debug:
            raise
        notes = "".join(f" {note}" for note in getattr(error, "__notes__", ()))
        print(f"error: {error}{notes}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
