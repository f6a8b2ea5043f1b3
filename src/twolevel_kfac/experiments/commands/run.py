"""Train one method with one seed of a config: ``tlkfac run CONFIG [--out DIR] [--resume]``.

The run directory gets ``config.yaml`` (resolved), ``metrics.jsonl`` and ``checkpoint.pt``
(every ``problem.checkpoint_every`` steps, at the end, and on Ctrl-C). ``--resume``
continues from the checkpoint bit-identically; ``--max-steps N`` stops after N steps in
total (resumable). ``--nproc N`` trains data-parallel on N local processes, each on its
part of every global batch; under ``torchrun`` each process is one rank (see
``experiments.launch``). ``--device`` overrides ``problem.device`` (``experiments.device``).
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
    positive_int,
    progress_enabled,
    with_device,
)
from twolevel_kfac.experiments.run_state import outcome


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this command's arguments to its parser."""
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument(
        "--out", default=None, help="run directory (default: results/<config>/<method>/seed<k>)"
    )
    parser.add_argument("--method", default=None, help="method label (needed if several)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the first)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument(
        "--nproc",
        type=positive_int,
        default=None,
        metavar="N",
        help="data-parallel: N local processes share every batch (gloo on the CPU, NCCL on "
        "GPUs; default: 1, or the world size of torchrun)",
    )
    add_device(parser, nproc=True)
    add_common(parser)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from twolevel_kfac.experiments.config import load_config
    from twolevel_kfac.experiments.launch import launcher_world_size, train_parallel
    from twolevel_kfac.experiments.report import epoch_records

    apply_common(args)
    config = with_device(load_config(args.config), args)
    label = args.method
    if label is None:
        if len(config.methods) > 1:
            raise ValueError(
                f"{args.config} has several methods {list(config.methods)}; pick one with --method"
            )
        (label,) = config.methods
    seed = config.problem.seeds[0] if args.seed is None else args.seed
    out = Path(args.out or Path("results") / Path(args.config).stem / label / f"seed{seed}")
    result = train_parallel(
        config.for_run(label, seed),
        out,
        args.nproc,
        resume=args.resume,
        max_steps=args.max_steps,
        progress=progress_enabled(args),
        data_dir=args.data_dir,
        threads=args.threads,
    )
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    epochs = epoch_records(result.records)
    last = epochs[-1] if epochs else {}
    loss = last.get("train_loss")
    print(
        f"{label} seed {seed}: {outcome(result.stop_reason, result.step)}"
        + (f", train loss {loss:.4g}" if isinstance(loss, float) else "")
        + f" → {out}"
    )
    if result.interrupted:
        nproc = f" --nproc {args.nproc}" if args.nproc else ""
        launcher = " under the same launcher" if launcher_world_size() else ""
        print(
            f"interrupted: checkpoint saved; continue with `tlkfac run {args.config} "
            f"--method {label} --seed {seed} --out {out}{nproc}{continue_flags(args)} "
            f"--resume`{launcher}"
        )
        return INTERRUPTED
    return 0
