"""CPU demo: SGD vs Adam vs KFAC on a CURVES subset with the paper's CURVES autoencoder.

Run ``python -m twolevel_kfac.experiments.demo [--out-dir DIR] [--minutes M]``. It
generates (or reuses the cached) CURVES data set, trains the 784-…-6-…-784 autoencoder
(Koroko et al. 2023, §3) from the same initialisation with each method on the first
5,000 training / 1,000 test images, batch 256, and writes ``report.md``,
``loss_vs_epoch.png``, ``loss_vs_time.png`` and ``results.json`` into the output folder.

Hyper-parameters. The paper's CURVES values (KFAC lr 1e-3, damping 1e-3, KL-clip 1e-2;
SGD 1e-2; Adam 1e-4) were tuned for 500 epochs on 20,000 images. For a demo of a few
dozen epochs we use the best of a small (not full) search on this subset, 20 epochs,
seed 0 (loss = Bernoulli NLL summed over the 784 pixels, batch mean): SGD (Nesterov,
momentum 0.9) lr 1e-2 (lr ∈ {1e-3, 1e-2, 3e-2, 1e-1}; ≥ 3e-2 diverges); Adam lr 1e-3
(lr ∈ {1e-4, 3e-4, 1e-3}; all stall near the mean-image plateau, loss ≈ 71); KFAC lr 0.3,
damping 0.1 (per-factor), KL-clip c = 1e-2, MC Fisher on a quarter of the batch, factors
and inverses refreshed every 20 steps (lr ∈ {1e-2 … 1}, damping ∈ {1e-2 … 1},
c ∈ {1e-2, 3e-2, 1e-1, off}, T ∈ {10, 20}). KFAC without KL clipping diverged for every
lr tried at this loss scale. No weight decay.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from twolevel_kfac.experiments.data import load_dataset
from twolevel_kfac.experiments.losses import bce_logits_loss
from twolevel_kfac.experiments.models import curves_autoencoder
from twolevel_kfac.experiments.report import markdown_table, write_report
from twolevel_kfac.experiments.runner import make_optimizer, train

__all__ = ["DEMO_METHODS", "main"]

DEMO_METHODS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1e-2},
    "adam": {"lr": 1e-3},
    "kfac": {
        "lr": 0.3,
        "damping": 0.1,
        "kl_clip": 1e-2,
        "likelihood": "bernoulli",
        "fisher": "mc",
        "fisher_batch": 0.25,
        "cov_interval": 20,
        "inv_interval": 20,
    },
}


def _run_method(
    name: str,
    hparams: Mapping[str, Any],
    data: Sequence[torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    max_seconds: float,
) -> list[dict[str, Any]] | None:
    """Train one method from the seed's initialisation; ``None`` if it is unavailable."""
    torch.manual_seed(seed)
    model = curves_autoencoder()
    try:
        optimizer = make_optimizer(name, model, **hparams)
    except ImportError as exc:
        print(f"[demo] skipping {name}: {exc}")
        return None
    train_x, train_y, test_x, test_y = data
    return train(
        model,
        optimizer,
        bce_logits_loss,
        train_x,
        train_y,
        test_x,
        test_y,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        max_seconds=max_seconds,
    )


def main(
    out_dir: str | Path = "results/demo",
    minutes_budget: float = 4.0,
    epochs: int = 60,
    n_train: int = 5000,
    n_test: int = 1000,
    batch_size: int = 256,
    seed: int = 0,
    data_dir: str | Path | None = None,
    methods: Mapping[str, Mapping[str, Any]] | None = None,
    quick: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Run the demo comparison and write its report.

    Args:
        out_dir: Output folder.
        minutes_budget: Wall-clock budget of the whole demo; each method gets an equal
            share of what is left after loading the data (training stops early when
            its share runs out).
        epochs: Maximum epochs per method.
        n_train: Training images (first ``n_train`` of the 20,000).
        n_test: Test images (first ``n_test`` of the 10,000).
        batch_size: Minibatch size (paper: 256).
        seed: Initialisation, shuffling and CURVES generator seed.
        data_dir: CURVES cache base (default ``$TLKFAC_DATA``, else ``<repo>/data``).
        methods: ``name -> hyper-parameters``; default ``DEMO_METHODS``.
        quick: Smoke version (overrides the sizes): 1,024 / 256 images, 2 epochs,
            1 minute budget.

    Returns:
        ``method -> per-epoch records``.
    """
    if quick:
        n_train, n_test, epochs, minutes_budget = 1024, 256, 2, min(minutes_budget, 1.0)
    start = time.perf_counter()
    torch.set_flush_denormal(True)  # denormal activations make CPU steps several × slower
    methods = DEMO_METHODS if methods is None else methods
    data = load_dataset("curves", data_dir, n_train=n_train, n_test=n_test, seed=seed)
    share = (60 * minutes_budget - (time.perf_counter() - start)) * 0.85 / max(len(methods), 1)
    results: dict[str, list[dict[str, Any]]] = {}
    for name, hparams in methods.items():
        print(f"[demo] {name} {dict(hparams)} (≤ {epochs} epochs, ≤ {share:.0f} s)")
        records = _run_method(
            name,
            hparams,
            data,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            max_seconds=max(share, 1.0),
        )
        if records is not None:
            results[name] = records
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    notes = (
        f"CURVES autoencoder, {n_train} train / {n_test} test images, batch {batch_size}, "
        f"seed {seed}, loss: Bernoulli NLL summed over pixels (batch mean). "
        f"Hyper-parameters: {json.dumps({k: dict(v) for k, v in methods.items()})}."
    )
    write_report(results, out, title="CURVES demo: SGD vs Adam vs KFAC", notes=notes)
    print(markdown_table(results))
    print(f"[demo] wrote {out / 'report.md'} in {time.perf_counter() - start:.0f} s")
    return results


def _cli() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="CURVES demo: SGD vs Adam vs KFAC")
    parser.add_argument("--out-dir", default="results/demo")
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke version")
    args = parser.parse_args()
    main(
        args.out_dir,
        args.minutes,
        args.epochs,
        seed=args.seed,
        data_dir=args.data_dir,
        quick=args.quick,
    )


if __name__ == "__main__":
    _cli()
