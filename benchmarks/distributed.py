"""Data-parallel step time and communication: 2 processes × 1 thread vs 1 process × 2 threads.

Each configuration trains the same model on the same global batch: one process with two
intra-op threads on the whole batch, or two gloo processes (one thread each, the model in
``DistributedDataParallel``) on half of it each; one process × one thread is the
baseline. Each method trains its own copy; a block is one refresh interval (``T`` steps,
so the amortised factor and decomposition work is included), repeated ``--reps`` times
after one warm-up block. Reported per method: the median block time per step in each
configuration, and rank 0's bytes handed to the preconditioner's collectives (mean per
step over a block, and on the refresh step); DDP's own gradient all-reduce (4 bytes ×
parameters per step in float32) is not included.

    python benchmarks/distributed.py --model curves_autoencoder --batch 256 --interval 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import twolevel_kfac as tk
from twolevel_kfac.distributed import Communicator
from twolevel_kfac.experiments import losses
from twolevel_kfac.experiments.models import build_model

METHODS = ("sgd", "kfac", "nicolaides+additive", "residual+adef2", "tselepidis+additive",
           "spectral+balanced")  # fmt: skip


def make_optimizer(method: str, model: nn.Module, interval: int) -> torch.optim.Optimizer:
    common = {"lr": 1e-3, "damping": 1e-3, "fisher": "mc", "likelihood": "bernoulli",
              "fisher_batch": 0.25, "cov_interval": interval, "inv_interval": interval,
              "kl_clip": 1e-2}  # fmt: skip
    if method == "sgd":  # the data-parallel baseline: DDP's gradient all-reduce only
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if method == "kfac":
        return tk.KFAC(model, **common)
    space, combination = method.split("+")
    return tk.TwoLevelKFAC(model, coarse_space=space, combination=combination, **common)


def measure(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    """Per method: block times per step and rank-local bytes (``world`` ranks, this one's
    share of the batch)."""
    x = torch.rand(args.batch, 784, generator=torch.Generator().manual_seed(0))
    share = args.batch // world
    x = x[rank * share : (rank + 1) * share]
    results: dict[str, Any] = {}
    runs = {}
    for method in args.methods:
        torch.manual_seed(0)
        model: nn.Module = build_model(args.model)
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model)
        runs[method] = (model, make_optimizer(method, model, args.interval))

    def block(method: str) -> tuple[float, list[int], float]:
        model, opt = runs[method]
        if world > 1:
            dist.barrier()
        sent: list[int] = []
        comm = opt.preconditioner.comm if isinstance(opt, tk.KFAC) else Communicator()
        waited, before = comm.seconds, comm.payload_bytes
        start = time.perf_counter()
        for _ in range(args.interval):
            opt.zero_grad(set_to_none=True)
            losses.bce_logits_loss(model(x), x).backward()
            opt.step()
            sent.append(comm.payload_bytes)
        seconds = (time.perf_counter() - start) / args.interval
        sent = [b - a for a, b in zip([before, *sent[:-1]], sent, strict=True)]
        return seconds, sent, (comm.seconds - waited) / args.interval

    for method in args.methods:
        block(method)  # warm-up: first factors and decompositions, allocations
    for method in args.methods:
        results[method] = {"times": [], "comm_s": []}
    for _ in range(args.reps):
        for method in args.methods:
            seconds, sent, comm_seconds = block(method)
            results[method]["times"].append(seconds)
            results[method]["comm_s"].append(comm_seconds)
            results[method]["bytes_per_step"] = sum(sent) / len(sent)
            results[method]["bytes_refresh_step"] = sent[0]
    return results


def _worker(rank: int, port: int, args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    try:
        results = measure(args, rank, 2)
        if rank == 0:
            out.write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="curves_autoencoder")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2, help="blocks per method and round")
    parser.add_argument("--rounds", type=int, default=3, help="turns of the 3 configurations")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="docs/benchmarks/distributed")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    load_before = os.getloadavg()[0]
    two, single, one = [], [], []
    for _ in range(args.rounds):  # the configurations take turns, so load drifts hit all
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        scratch = out.with_suffix(".rank0.json")
        mp.spawn(_worker, args=(port, args, scratch), nprocs=2)
        two.append(json.loads(scratch.read_text()))
        scratch.unlink()
        torch.set_num_threads(1)
        single.append(measure(args, 0, 1))
        torch.set_num_threads(2)
        one.append(measure(args, 0, 1))
    two, single, one = _merge(two), _merge(single), _merge(one)

    rows = []
    for method in args.methods:
        t1, t2 = statistics.median(one[method]["times"]), statistics.median(two[method]["times"])
        rows.append({"method": method, "one_thread_s": statistics.median(single[method]["times"]),
                     "one_process_s": t1, "two_processes_s": t2,
                     "speedup": t1 / t2, "one_spread": _spread(one[method]["times"]),
                     "two_spread": _spread(two[method]["times"]),
                     "comm_s": statistics.median(two[method]["comm_s"]),
                     "bytes_per_step": two[method]["bytes_per_step"],
                     "bytes_refresh_step": two[method]["bytes_refresh_step"]})  # fmt: skip
    settings = {k: getattr(args, k) for k in ("model", "batch", "interval", "reps", "rounds")}
    settings["torch"] = torch.__version__
    settings["load_average"] = [load_before, os.getloadavg()[0]]  # 1-min, before / after
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows},
                                                   indent=2))  # fmt: skip
    lines = [
        f"Data-parallel step time, {args.model}, global batch {args.batch}, "
        f"T_cov = T_inv = {args.interval}, fisher mc (fisher_batch 0.25), float32, "
        f"ms/step, median of {args.rounds} rounds × {args.reps} blocks of {args.interval} "
        "steps, the three configurations taking turns (spread min–max / median). "
        "Bytes: rank 0's payload to the preconditioner's collectives (not DDP's gradient "
        "all-reduce); gloo on localhost, distributed_inverses='split'. Machine: "
        f"{os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after the run (other tenants included).",
        "",
        "| method | 1 proc × 1 thread | 1 proc × 2 threads | 2 procs × 1 thread "
        "| of which in KFAC collectives | 2 procs vs 1 proc × 2 threads | KiB/step (mean) "
        "| KiB on a refresh step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {1e3 * r['one_thread_s']:.1f} "
            f"| {1e3 * r['one_process_s']:.1f} ({r['one_spread']}) "
            f"| {1e3 * r['two_processes_s']:.1f} ({r['two_spread']}) | {1e3 * r['comm_s']:.1f} "
            f"| {r['speedup']:.2f} "
            f"| {r['bytes_per_step'] / 1024:.1f} | {r['bytes_refresh_step'] / 1024:.1f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate the per-round lists of times; the byte counts are the same each round."""
    merged = rounds[0]
    for extra in rounds[1:]:
        for method, result in extra.items():
            merged[method]["times"] += result["times"]
            merged[method]["comm_s"] += result["comm_s"]
    return merged


def _spread(times: list[float]) -> str:
    med = statistics.median(times)
    return f"{min(times) / med:.2f}–{max(times) / med:.2f}"


if __name__ == "__main__":
    main()
