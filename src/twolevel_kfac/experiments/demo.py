"""The main job: ``configs/demo.yaml`` (CURVES: KFAC vs NICO vs RESIDU vs PREVIOUS vs SGD
vs Adam, one seed, CPU-sized) run through the comparison machinery.

``main()`` runs every method from scratch into ``results/demo`` (``resume=True`` keeps
finished runs and continues unfinished ones), prints the table and writes
``report.md``, the PNGs and ``summary.json``. ``quick=True`` is a seconds-long smoke
version of the same config (320 images, 2 epochs) written to ``results/demo-quick``.

``tlkfac demo`` runs on one torch thread unless ``--threads`` says otherwise: with the
demo's small matrices two threads gain at most ~1.6× on an idle 2-core machine, but on a
busy one their spin-waits made steps 10–70× slower (measured), and the runs then hit
their 90-second budgets.
"""

from __future__ import annotations

import time
from pathlib import Path

from twolevel_kfac.experiments.comparison import ComparisonResult, run_comparison
from twolevel_kfac.experiments.config import ExperimentConfig, load_config

__all__ = ["default_config_path", "demo_config", "main"]

QUICK = {"n_train": 320, "n_test": 64, "epochs": 2}


def default_config_path() -> Path:
    """``configs/demo.yaml`` of the source checkout (else of the working directory).

    Raises:
        FileNotFoundError: Neither exists.
    """
    candidates = [
        Path(__file__).resolve().parents[3] / "configs" / "demo.yaml",
        Path.cwd() / "configs" / "demo.yaml",
    ]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(map(str, candidates))
    raise FileNotFoundError(f"demo config not found (tried {tried}); pass --config")


def demo_config(path: str | Path | None = None, quick: bool = False) -> ExperimentConfig:
    """The demo config; ``quick`` shrinks it to a smoke run (``QUICK`` sizes)."""
    config = load_config(path or default_config_path())
    if quick:
        config = config.model_copy(deep=True)
        config.problem.dataset.n_train = QUICK["n_train"]
        config.problem.dataset.n_test = QUICK["n_test"]
        config.problem.epochs = QUICK["epochs"]
        config.problem.early_stopping = None
        config.problem.time_budget_s = None
        config.report.title = f"{config.report.title or config.problem.name} (quick)"
    return config


def main(
    out_dir: str | Path | None = None,
    config_path: str | Path | None = None,
    *,
    quick: bool = False,
    resume: bool = False,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> ComparisonResult:
    """Run the demo comparison, print its table and write its report.

    Args:
        out_dir: Output directory (default ``results/demo``, ``results/demo-quick``).
        config_path: Config (default ``configs/demo.yaml``).
        quick: Seconds-long smoke version.
        resume: Keep finished runs of an earlier demo in ``out_dir`` and continue
            unfinished ones (default: start every run afresh).
        data_dir: Data directory (CURVES cache).
        progress: tqdm bars (on a terminal).

    Returns:
        The comparison's outcome.
    """
    start = time.perf_counter()
    config = demo_config(config_path, quick)
    out = Path(out_dir or ("results/demo-quick" if quick else "results/demo"))
    outcome = run_comparison(config, out, progress=progress, fresh=not resume, data_dir=data_dir)
    print()
    print(outcome.table)
    print(f"[demo] wrote {outcome.report} in {time.perf_counter() - start:.0f} s")
    return outcome
