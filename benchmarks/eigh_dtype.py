"""Which dtype makes ``torch.linalg.eigh`` of a KFAC factor fastest on this CPU?

Interleaved repetitions, median time, ratio float32/float64 in the same process.

    python benchmarks/eigh_dtype.py --sizes 250,500,1000,2000 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="250,500,1000")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| size | float32 median s | float64 median s | float32 / float64 |")
    print("|---|---|---|---|")
    for n in map(int, args.sizes.split(",")):
        a = torch.randn(n, 2 * n, generator=torch.Generator().manual_seed(0))
        factor = a @ a.T / (2 * n)
        times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.float64: []}
        for _ in range(args.reps):
            for dtype in times:
                m = factor.to(dtype)
                start = time.perf_counter()
                torch.linalg.eigh(m)
                times[dtype].append(time.perf_counter() - start)
        f32, f64 = (statistics.median(times[d]) for d in (torch.float32, torch.float64))
        print(f"| {n} | {f32:.3f} | {f64:.3f} | {f32 / f64:.1f} |")


if __name__ == "__main__":
    main()
