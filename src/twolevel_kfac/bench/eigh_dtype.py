"""``eigh_dtype``: which dtype makes ``torch.linalg.eigh`` of a KFAC factor fastest here,
and does batching the factors of equal shape pay?

* **dtype**: a factor-like matrix ``X Xᵀ / 2n`` (X: n × 2n Gaussian) per size; float32
  and float64 take turns (interleaved repetitions); reported: median seconds of each and
  their ratio. This is the measurement behind ``factor_dtype``'s default
  (``curvature/kronecker.py``).
* **batched**: ``k`` such float32 factors of one size (the 64 equal layers of DeepLinear,
  the mirrored layers of an autoencoder) decomposed one call each or by one batched call
  on their stack (the stack's copy included); reported: median seconds and batched / loop.
  The refresh decomposes layer by layer when this is ≈ 1 (CPU LAPACK runs a batch as a
  loop: only the Python dispatch is saved).

``--quick``: sizes 64 and 128; batches of 4 of sizes 16 and 64.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.report import environment, report_header, table

__all__ = ["NAME", "measure", "render"]

NAME = "eigh_dtype"
SIZES, QUICK_SIZES = (250, 500, 1000, 2000), (64, 128)
BATCHES, QUICK_BATCHES = ((32, 25), (32, 100), (16, 250), (8, 500)), ((4, 16), (4, 64))
DTYPES = (torch.float32, torch.float64)


def _seconds(matrix: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.linalg.eigh(matrix)
    return time.perf_counter() - start


def _factor(n: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(n, 2 * n, generator=torch.Generator().manual_seed(seed))
    return a @ a.T / (2 * n)


def _loop_seconds(factors: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for factor in factors:
        torch.linalg.eigh(factor)
    return time.perf_counter() - start


def _batched_seconds(factors: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    torch.linalg.eigh(torch.stack(factors))
    return time.perf_counter() - start


def _batched_rows(options: BenchOptions, repeats: int) -> list[dict[str, Any]]:
    """Loop vs one batched call per (count, size), alternating which goes first."""
    rows = []
    for count, n in QUICK_BATCHES if options.quick else BATCHES:
        options.log(f"[{NAME}] {count} factors of size {n}: loop vs batched")
        factors = [_factor(n, seed) for seed in range(count)]
        loop: list[float] = []
        batched: list[float] = []
        for repeat in range(repeats):
            first, second = (loop, batched) if repeat % 2 == 0 else (batched, loop)
            for times in (first, second):
                timer = _loop_seconds if times is loop else _batched_seconds
                times.append(timer(factors))
        loop_s, batched_s = statistics.median(loop), statistics.median(batched)
        rows.append(
            {
                "count": count,
                "size": n,
                "loop_s": loop_s,
                "batched_s": batched_s,
                "ratio": batched_s / loop_s,
            }
        )
    return rows


def measure(options: BenchOptions) -> dict[str, Any]:
    """Time ``eigh`` per size and dtype (module docstring); return the JSON document."""
    env = environment(options.threads)
    repeats = options.rounds(5, 3)
    rows = []
    for n in QUICK_SIZES if options.quick else SIZES:
        options.log(f"[{NAME}] n = {n}")
        factor = _factor(n)
        times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in DTYPES}
        for _ in range(repeats):
            for dtype in DTYPES:
                times[dtype].append(_seconds(factor.to(dtype)))
        f32, f64 = (statistics.median(times[d]) for d in DTYPES)
        rows.append({"size": n, "float32_s": f32, "float64_s": f64, "ratio": f32 / f64})
    return {
        "benchmark": NAME,
        "settings": {"quick": options.quick, "repeats": repeats},
        "environment": env,
        "rows": rows,
        "batched": _batched_rows(options, repeats),
    }


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    rows = [
        [str(r["size"]), f"{r['float32_s']:.4f}", f"{r['float64_s']:.4f}", f"{r['ratio']:.2f}"]
        for r in data["rows"]
    ]
    lines = [
        *report_header("`torch.linalg.eigh` of a factor: float32 vs float64", "eigh_dtype", data),
        f"Median of {data['settings']['repeats']} interleaved repetitions.",
        "",
        *table(["size", "float32 median s", "float64 median s", "float32 / float64"], rows),
    ]
    batched = data.get("batched")
    if batched:
        lines += [
            "",
            "## Equal-shape factors: one call each vs one batched call (float32)",
            "",
            *table(
                ["factors", "size", "loop median s", "batched median s", "batched / loop"],
                [
                    [
                        str(r["count"]),
                        str(r["size"]),
                        f"{r['loop_s']:.4f}",
                        f"{r['batched_s']:.4f}",
                        f"{r['ratio']:.2f}",
                    ]
                    for r in batched
                ],
            ),
        ]
    return "\n".join(lines)
