"""``eigh_dtype``: which dtype makes ``torch.linalg.eigh`` of a KFAC factor fastest here?

A factor-like matrix ``X Xᵀ / 2n`` (X: n × 2n Gaussian) per size; float32 and float64
take turns (interleaved repetitions); reported: median seconds of each and their ratio.
This is the measurement behind ``factor_dtype``'s default (``curvature/kronecker.py``).

``--quick``: sizes 64 and 128.
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
DTYPES = (torch.float32, torch.float64)


def _seconds(matrix: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.linalg.eigh(matrix)
    return time.perf_counter() - start


def measure(options: BenchOptions) -> dict[str, Any]:
    """Time ``eigh`` per size and dtype (module docstring); return the JSON document."""
    env = environment(options.threads)
    repeats = options.rounds(5, 3)
    rows = []
    for n in QUICK_SIZES if options.quick else SIZES:
        options.log(f"[{NAME}] n = {n}")
        a = torch.randn(n, 2 * n, generator=torch.Generator().manual_seed(0))
        factor = a @ a.T / (2 * n)
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
    return "\n".join(lines)
