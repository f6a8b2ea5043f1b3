"""``tlkfac run | compare | tune | report``: one module per subcommand.

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int | None`` (see
``twolevel_kfac.cli``). Errors a user can fix raise ``ValueError`` / ``FileNotFoundError``
with a clear message; the CLI prints it as ``error: …`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["INTERRUPTED", "add_common", "apply_common", "positive_int", "progress_enabled"]

INTERRUPTED = 130  # exit status after Ctrl-C (the run was checkpointed)


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_common(parser: argparse.ArgumentParser, max_steps: bool = True) -> None:
    """Options shared by the training commands."""
    if max_steps:
        parser.add_argument(
            "--max-steps",
            type=positive_int,
            default=None,
            metavar="N",
            help="stop each run after N steps (checkpointed, resumable)",
        )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--data-dir", default=None, help="data directory (else $TLKFAC_DATA)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads (default: torch's choice)",
    )


def apply_common(args: argparse.Namespace) -> None:
    """Apply ``--threads``."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars unless ``--quiet`` (the runner also needs a terminal)."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()
