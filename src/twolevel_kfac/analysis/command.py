"""``tlkfac analyze CONFIG [--out DIR] [--run RUN_DIR]``: exact-Fisher analysis of a small
network.

Writes ``analysis.json`` (method name → metrics, each with ``cos_to_exact_ng`` and
``energy_error``), ``details.json``, ``spectra.npz``, ``report.md`` and PNG figures into
``DIR`` (default ``results/analysis/<config name>``); with ``--run`` (or ``along_run.run_dir``
in the config) also ``along_run.json``: the metrics at every model snapshot of that
``tlkfac run`` directory (trained with ``problem.keep_checkpoints: true``). A run stopped
part-way goes on from the stages it finished (:mod:`.stages`; ``--fresh``: from scratch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``analyze`` arguments to ``parser``."""
    parser.add_argument("config", help="analysis YAML (e.g. configs/analysis/curves_small.yaml)")
    parser.add_argument(
        "--out", default=None, help="output directory (default: results/analysis/<name>)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default: 1)"
    )
    parser.add_argument(
        "--run",
        default=None,
        metavar="RUN_DIR",
        help="also analyse the model snapshots of this `tlkfac run` directory "
        "(problem.keep_checkpoints: true); overrides along_run.run_dir",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (or lines, off a terminal)"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="recompute every stage (default: a run stopped part-way resumes from the "
        "stages it finished, kept in OUT/.stages)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="re-draw report.md and the figures from the JSON files already in --out",
    )


def run(args: argparse.Namespace) -> None:
    """Run the analysis described by ``args.config`` and write its outputs.

    Raises:
        ValueError: for an invalid configuration (the message names the key).
        FileNotFoundError: for a missing configuration or data file.
    """
    import torch  # heavy imports only when the command runs

    from .config import load_config
    from .pipeline import run_analysis
    from .report import load_outputs, render, write_outputs
    from .stages import STAGE_DIR, Stages, stage_key

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1; got {args.threads}")
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    out = Path(args.out) if args.out else Path("results") / "analysis" / config.name
    if args.render_only:
        print(f"re-rendered {len(render(load_outputs(out), out))} files in {out}")
        return
    run_dir = args.run if args.run is not None else config.along_run.run_dir
    stages = Stages(out, stage_key(config, run_dir), fresh=args.fresh)
    try:
        output = run_analysis(config, not args.no_progress, args.run, stages)
    except KeyboardInterrupt:
        print(f"interrupted: the finished stages are kept in {out / STAGE_DIR}; run the "
              "same command again to go on from them", file=sys.stderr)  # fmt: skip
        raise
    paths = write_outputs(output, out)
    stages.finish()
    if stages.resumed:
        print(f"resumed {len(stages.resumed)} finished stage(s) kept in {out / STAGE_DIR}")
    exact, kfac = output.methods.get("exact", {}), output.methods.get("kfac", {})
    print(f"wrote {len(paths)} files to {out}")
    if output.along_run is not None:
        print(f"along the run: {len(output.along_run['snapshots'])} snapshots analysed")
    if kfac:
        print(
            f"kfac: cos to exact NG {kfac['cos_to_exact_ng']:.4f}, "
            f"E(d)/E(0) {kfac['energy_error_relative']:.4g} "
            f"(exact: cos {exact.get('cos_to_exact_ng', float('nan')):.4f})"
        )


def main(argv: list[str] | None = None) -> None:
    """``python -m twolevel_kfac.analysis.command CONFIG --out DIR``."""
    parser = argparse.ArgumentParser(prog="tlkfac analyze", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
