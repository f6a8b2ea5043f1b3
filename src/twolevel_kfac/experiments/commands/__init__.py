"""``tlkfac run | compare | tune | report``: one module per subcommand.

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int | None`` (see
``twolevel_kfac.cli``). Errors a user can fix raise ``ValueError`` / ``FileNotFoundError``
with a clear message; the CLI prints it as ``error: …`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twolevel_kfac.experiments.config import ExperimentConfig

__all__ = [
    "INTERRUPTED",
    "add_common",
    "add_device",
    "apply_common",
    "positive_int",
    "progress_enabled",
    "with_device",
]

INTERRUPTED = 130  # exit status after Ctrl-C (the run was checkpointed)


def positive_int(text: str) -> int:
    """Argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def device_spec(text: str) -> str:
    """Argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:K``."""
    from twolevel_kfac.experiments.device import check_device_spec

    try:
        return check_device_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_device(parser: argparse.ArgumentParser, nproc: bool = False) -> None:
    """``--device``, which overrides the config's ``problem.device`` (``nproc``: the
    command also has ``--nproc``)."""
    multi = " With --nproc N and a GPU: one GPU per process, NCCL" if nproc else ""
    parser.add_argument(
        "--device",
        type=device_spec,
        default=None,
        help="auto | cpu | cuda | cuda:K, overriding problem.device (default: the config's; "
        f"auto: a GPU when torch sees one).{multi}",
    )


def with_device(config: ExperimentConfig, args: argparse.Namespace) -> ExperimentConfig:
    """``config`` with ``--device`` (when given) as its ``problem.device``; the device is
    not fingerprinted, so the override may differ from the run being resumed."""
    if getattr(args, "device", None) is None:
        return config
    problem = config.problem.model_copy(update={"device": args.device})
    return config.model_copy(update={"problem": problem})


def add_common(
    parser: argparse.ArgumentParser, max_steps: bool = True, threads: str = "torch's choice"
) -> None:
    """Options shared by the training commands (``threads``: what ``--threads`` defaults
    to, in words)."""
    if max_steps:
        parser.add_argument(
            "--max-steps",
            type=positive_int,
            default=None,
            metavar="N",
            help="stop each run after N steps (checkpointed, resumable)",
        )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (or lines, off a terminal)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="data directory (default: $TLKFAC_DATA, else <repo>/data or ../shared/data)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help=f"torch intra-op threads (default: {threads})",
    )


def apply_common(args: argparse.Namespace) -> None:
    """Apply ``--threads``."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def continue_flags(args: argparse.Namespace) -> str:
    """The options of the command line that a resume must repeat, as command text: to
    continue bit for bit (``--threads``: the sums' order; ``--data-dir``: the same data;
    ``--device``), and to do the same work (``--max-steps``, ``compare``'s ``--methods``
    and ``--seeds``: without them the hint of 2026-12-10 ran every method and seed of the
    config, each past the budget, a trial found)."""
    flags = ""
    for name in ("methods", "seeds", "max_steps", "device", "threads", "data_dir"):
        value = getattr(args, name, None)
        if value:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            flags += f" --{name.replace('_', '-')} {shlex.quote(text)}"
    return flags


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress unless ``--quiet``: a bar on a terminal, occasional lines elsewhere
    (:mod:`twolevel_kfac.experiments.progress`)."""
    return not getattr(args, "quiet", False)
