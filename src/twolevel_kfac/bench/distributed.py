"""``distributed``: data-parallel step time and communication, 2 processes × 1 thread vs
1 process × 2 threads.

Each configuration trains the same model on the same global batch: one process with two
intra-op threads on the whole batch, or two gloo processes (one thread each, the model in
``DistributedDataParallel``) on half of it each; one process × one thread is the baseline.
Each method trains its own copy; a block is one refresh interval (T steps, so the
amortised factor and decomposition work is included), ``blocks`` per round after one
warm-up block, the three configurations taking turns for ``--repeats`` rounds. Reported
per method: the median block time per step in each configuration, and rank 0's bytes
handed to the preconditioner's collectives (mean per step over a block, and on the
refresh step); DDP's own gradient all-reduce (4 bytes × parameters per step in float32)
is not included.

``--quick``: SGD and KFAC, T = 2, one round of one block.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twolevel_kfac.bench.methods import MethodSpec, build_runner, select_methods
from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.problems import Problem, select_problems
from twolevel_kfac.bench.report import table

__all__ = ["NAME", "measure", "render"]

NAME = "distributed"
METHODS = (
    "sgd",
    "kfac",
    "nicolaides+additive",
    "residual+adef2",
    "tselepidis+additive",
    "spectral+balanced",
)
QUICK_METHODS = ("sgd", "kfac")


@dataclass(frozen=True)
class Setup:
    """What every rank measures (picklable for ``torch.multiprocessing.spawn``)."""

    problem: Problem
    specs: tuple[MethodSpec, ...]
    interval: int
    blocks: int


def _block(runner: Any, interval: int, world: int) -> tuple[float, list[int], float]:
    """Seconds per step, bytes sent per step and seconds in collectives per step."""
    import torch.distributed as dist

    import twolevel_kfac as tk
    from twolevel_kfac.distributed import Communicator

    if world > 1:
        dist.barrier()
    opt = runner.optimizer
    comm = opt.preconditioner.comm if isinstance(opt, tk.KFAC) else Communicator()
    waited, before = comm.seconds, comm.payload_bytes
    sent: list[int] = []
    start = time.perf_counter()
    for _ in range(interval):
        runner.step()
        sent.append(comm.payload_bytes)
    seconds = (time.perf_counter() - start) / interval
    sent = [b - a for a, b in zip([before, *sent[:-1]], sent, strict=True)]
    return seconds, sent, (comm.seconds - waited) / interval


def measure_ranks(setup: Setup, rank: int, world: int) -> dict[str, Any]:
    """Per method: block times per step and rank-local bytes (this rank's batch share)."""
    from torch import nn

    x, y = setup.problem.batch_data()
    share = setup.problem.batch // world
    batch = (x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
    runners = {}
    for spec in setup.specs:
        model: nn.Module = setup.problem.build_model()
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model)
        runners[spec.label] = build_runner(
            spec, model, batch, setup.problem.loss_fn, setup.problem.likelihood, setup.interval
        )
    for runner in runners.values():
        _block(runner, setup.interval, world)  # warm-up: first factors, allocations
    results: dict[str, Any] = {label: {"times": [], "comm_s": []} for label in runners}
    for _ in range(setup.blocks):
        for label, runner in runners.items():
            seconds, sent, comm_seconds = _block(runner, setup.interval, world)
            results[label]["times"].append(seconds)
            results[label]["comm_s"].append(comm_seconds)
            results[label]["bytes_per_step"] = sum(sent) / len(sent)
            results[label]["bytes_refresh_step"] = sent[0]
    return results


def _worker(rank: int, port: int, setup: Setup, out: Path) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = measure_ranks(setup, rank, 2)
        if rank == 0:
            out.write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _two_processes(setup: Setup, scratch: Path) -> dict[str, Any]:
    import json

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, setup, scratch), nprocs=2)
    results: dict[str, Any] = json.loads(scratch.read_text())
    return results


def _merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate the per-round lists of times; the byte counts are the same each round."""
    merged = rounds[0]
    for extra in rounds[1:]:
        for label, result in extra.items():
            merged[label]["times"] += result["times"]
            merged[label]["comm_s"] += result["comm_s"]
    return merged


def _spread(times: list[float]) -> str:
    med = statistics.median(times)
    return f"{min(times) / med:.2f}–{max(times) / med:.2f}"


def measure(options: BenchOptions) -> dict[str, Any]:
    """Run the three configurations in turns (module docstring); return the JSON document."""
    problem = select_problems(options.problems, ("curves_ae_256",))[0]
    specs = select_methods(options.methods, QUICK_METHODS if options.quick else METHODS)
    setup = Setup(problem, tuple(specs), options.pick((10,), (2,))[0], 1 if options.quick else 2)
    rounds = options.rounds(3, 1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    load_before = os.getloadavg()[0]
    two, single, one = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for k in range(rounds):  # the configurations take turns, so load drifts hit all
            options.log(f"[{NAME}] round {k + 1}/{rounds}")
            two.append(_two_processes(setup, Path(scratch) / "rank0.json"))
            torch.set_num_threads(1)
            single.append(measure_ranks(setup, 0, 1))
            torch.set_num_threads(2)
            one.append(measure_ranks(setup, 0, 1))
    torch.set_num_threads(options.threads)
    merged = [_merge(runs) for runs in (two, single, one)]
    return {
        "benchmark": NAME,
        "settings": {
            "quick": options.quick,
            "problem": problem.name,
            "model": problem.model,
            "batch": problem.batch,
            "interval": setup.interval,
            "blocks": setup.blocks,
            "rounds": rounds,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_average": [load_before, os.getloadavg()[0]],
        },
        "rows": [_row(spec.label, *(m[spec.label] for m in merged)) for spec in specs],
    }


def _row(
    label: str, two: dict[str, Any], single: dict[str, Any], one: dict[str, Any]
) -> dict[str, Any]:
    t1, t2 = statistics.median(one["times"]), statistics.median(two["times"])
    return {
        "method": label,
        "one_thread_s": statistics.median(single["times"]),
        "one_process_s": t1,
        "two_processes_s": t2,
        "speedup": t1 / t2,
        "one_spread": _spread(one["times"]),
        "two_spread": _spread(two["times"]),
        "comm_s": statistics.median(two["comm_s"]),
        "bytes_per_step": two["bytes_per_step"],
        "bytes_refresh_step": two["bytes_refresh_step"],
    }


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    s = data["settings"]
    head = (
        f"Data-parallel step time, {s['model']}, global batch {s['batch']}, "
        f"T_cov = T_inv = {s['interval']}, fisher mc (fisher_batch 0.25), float32, ms/step, "
        f"median of {s['rounds']} rounds × {s['blocks']} blocks of {s['interval']} steps, the "
        "three configurations taking turns (spread min–max / median). Bytes: rank 0's "
        "payload to the preconditioner's collectives (not DDP's gradient all-reduce); gloo on "
        f"localhost, distributed_inverses='split'. Machine: {s['cpus']} CPUs, torch "
        f"{s['torch']}, 1-min load average {s['load_average'][0]:.1f} before and "
        f"{s['load_average'][1]:.1f} after the run (other tenants included). Generated by "
        "`tlkfac bench distributed`."
    )
    headers = [
        "method",
        "1 proc × 1 thread",
        "1 proc × 2 threads",
        "2 procs × 1 thread",
        "of which in KFAC collectives",
        "2 procs vs 1 proc × 2 threads",
        "KiB/step (mean)",
        "KiB on a refresh step",
    ]
    rows = [
        [
            r["method"],
            f"{1e3 * r['one_thread_s']:.1f}",
            f"{1e3 * r['one_process_s']:.1f} ({r['one_spread']})",
            f"{1e3 * r['two_processes_s']:.1f} ({r['two_spread']})",
            f"{1e3 * r['comm_s']:.1f}",
            f"{r['speedup']:.2f}",
            f"{r['bytes_per_step'] / 1024:.1f}",
            f"{r['bytes_refresh_step'] / 1024:.1f}",
        ]
        for r in data["rows"]
    ]
    return "\n".join([head, "", *table(headers, rows)])
