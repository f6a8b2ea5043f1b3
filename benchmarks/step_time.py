"""Per-step time of KFAC's two-level variants relative to KFAC (and SGD), in one process.

Each method trains its own copy of the model on the same fixed batches; repetitions are
interleaved (method A block, method B block, …, then again) so that machine noise hits all
methods alike, and each block is one full refresh interval (``T`` steps), so the
amortised factor/eigendecomposition cost is included. Reported: median block time per
step, the ratio to the baseline measured in the same run, and the min–max spread.

    python benchmarks/step_time.py --model mnist_autoencoder --batch 512 --interval 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import twolevel_kfac as tk
from twolevel_kfac.experiments import losses
from twolevel_kfac.experiments.models import build_model

SPACES = ("nicolaides", "spectral", "residual", "krylov_nicolaides", "krylov_residual",
          "tselepidis")
COMBINATIONS = ("additive", "adef2", "adef1", "balanced")


def make_optimizer(method: str, model: nn.Module, interval: int,
                   refresh: str) -> torch.optim.Optimizer:
    common = {"lr": 1e-3, "damping": 1e-3, "fisher": "mc", "likelihood": "bernoulli",
              "fisher_batch": 0.25, "cov_interval": interval, "inv_interval": interval,
              "kl_clip": 1e-2}
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    if method == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-4)
    if method == "kfac":
        return tk.KFAC(model, **common)
    space, combination = method.split("+")
    return tk.TwoLevelKFAC(model, coarse_space=space, combination=combination,
                           coarse_refresh=refresh, **common)


def runner(method: str, args: argparse.Namespace, x: torch.Tensor) -> Callable[[int], float]:
    torch.manual_seed(0)
    model = build_model(args.model)
    opt = make_optimizer(method, model, args.interval, args.refresh)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = losses.bce_logits_loss(model(x), x)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="mnist_autoencoder")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--interval", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--refresh", default="consistent")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="all",
                        help="comma-separated: sgd, adam, kfac, SPACE+COMBINATION, or 'all'")
    parser.add_argument("--out", default="docs/benchmarks/step_time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = ["sgd", "kfac", *(f"{s}+{c}" for s, c in itertools.product(SPACES, COMBINATIONS))]
    if args.methods != "all":
        methods = args.methods.split(",")
    x = torch.rand(args.batch, 784, generator=torch.Generator().manual_seed(0))
    runs = {m: runner(m, args, x) for m in methods}
    for run in runs.values():  # warm-up: one interval each (first factors, allocations)
        run(args.interval)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(args.reps):
        for method, run in runs.items():
            times[method].append(run(args.interval))
        print(f"rep {rep + 1}/{args.reps} done", flush=True)
    base = statistics.median(times["kfac"]) if "kfac" in times else None
    sgd = statistics.median(times["sgd"]) if "sgd" in times else None
    rows = []
    for method, ts in times.items():
        med = statistics.median(ts)
        rows.append({"method": method, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                     "vs_kfac": med / base if base else None,
                     "vs_sgd": med / sgd if sgd else None})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: getattr(args, k) for k in ("model", "batch", "interval", "reps", "refresh",
                                           "threads")}
    out.with_suffix(".json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    lines = [f"Step time, {args.model}, batch {args.batch}, T_cov = T_inv = {args.interval}, "
             f"{args.threads} threads, refresh={args.refresh}, {args.reps} interleaved reps",
             "", "| method | × KFAC | × SGD | spread (min–max / median) |", "|---|---|---|---|"]
    for r in rows:
        spread = f"{r['min_s'] / r['median_s']:.2f}–{r['max_s'] / r['median_s']:.2f}"
        vk = f"{r['vs_kfac']:.3f}" if r["vs_kfac"] else "–"
        vs = f"{r['vs_sgd']:.2f}" if r["vs_sgd"] else "–"
        lines.append(f"| {r['method']} | {vk} | {vs} | {spread} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
