"""``extreme_pair``: what the spectral coarse space pays per refresh for its eigenvectors,
a full ``torch.linalg.eigh`` of each factor or one certified extreme pair
(:mod:`twolevel_kfac.curvature.extreme_eigen`), on the factors it meets.

* **problems**: the float32 factors of the step-time problems (the MNIST and CURVES
  autoencoders on their fixed batch) after 25 KFAC steps at the defaults with
  ``cov_interval = 1``; per problem and side (smallest, largest), the summed time of
  ``eigh`` and of :func:`~twolevel_kfac.curvature.extreme_eigen.extreme_eigenpair` over
  every factor (interleaved repetitions, medians), and how many factors of side above
  ``SMALL`` the iteration certified (the rest took ``eigh``).
* **conditioned**: a well-conditioned float32 factor ``XXᵀ/4n`` (``X``: ``n × 4n``
  Gaussian, the smallest eigenvalue about a quarter of the mean), which the first phase
  does not certify and the refinement does.

``--quick``: the CURVES autoencoder alone, 5 steps; conditioned sizes 144 and 160.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.problems import select_problems
from twolevel_kfac.bench.report import environment, report_header, table
from twolevel_kfac.curvature.extreme_eigen import SMALL, certified_pair, extreme_eigenpair

__all__ = ["NAME", "measure", "render"]

NAME = "extreme_pair"
PROBLEMS, QUICK_PROBLEMS = ("mnist_ae_512", "curves_ae_256"), ("curves_ae_256",)
SIZES, QUICK_SIZES = (250, 500, 1000), (144, 160)
WHICH = ("smallest", "largest")


def problem_factors(name: str, steps: int) -> list[Tensor]:
    """Every ``A`` and ``G`` of ``name``'s model after ``steps`` KFAC steps on its batch."""
    from twolevel_kfac.optim.kfac import KFAC

    problem = select_problems([name], [])[0]
    model = problem.build_model()
    x, y = problem.batch_data()
    optimizer = KFAC(model, lr=1e-3, cov_interval=1, likelihood=problem.likelihood)
    for _ in range(steps):
        optimizer.zero_grad()
        problem.loss_fn(model(x), y).backward()
        optimizer.step()
    found: list[Tensor] = []
    for factors in optimizer.preconditioner.factors.values():
        assert factors.A is not None and factors.G is not None  # the MLPs' Kronecker blocks
        found += [factors.A, factors.G]
    return found


def _eigh(matrix: Tensor, which: str) -> None:
    torch.linalg.eigh(matrix)


def _seconds(work: Callable[[Tensor, str], object], factors: list[Tensor], which: str) -> float:
    start = time.perf_counter()
    for factor in factors:
        work(factor, which)
    return time.perf_counter() - start


def _compare(factors: list[Tensor], which: str, repeats: int) -> dict[str, Any]:
    """Median seconds of ``eigh`` and of the extreme pair over ``factors``, interleaved."""
    times: dict[str, list[float]] = {"eigh": [], "pair": []}
    for repeat in range(repeats):
        order = ("eigh", "pair") if repeat % 2 == 0 else ("pair", "eigh")
        for key in order:
            work = _eigh if key == "eigh" else extreme_eigenpair
            times[key].append(_seconds(work, factors, which))
    large = [f for f in factors if f.shape[0] > SMALL]
    certified = sum(certified_pair(f, which) is not None for f in large)
    eigh_s, pair_s = (statistics.median(times[k]) for k in ("eigh", "pair"))
    return {
        "which": which,
        "factors": len(factors),
        "large": len(large),
        "certified": certified,
        "eigh_s": eigh_s,
        "pair_s": pair_s,
        "ratio": pair_s / eigh_s,
    }


def measure(options: BenchOptions) -> dict[str, Any]:
    """Time both ways per problem and per conditioned size (module docstring)."""
    env = environment(options.threads)
    repeats = options.rounds(5, 2)
    rows = []
    for name in QUICK_PROBLEMS if options.quick else PROBLEMS:
        options.log(f"[{NAME}] {name}: factors after KFAC steps")
        factors = [f.detach().clone() for f in problem_factors(name, 5 if options.quick else 25)]
        rows += [{"problem": name, **_compare(factors, which, repeats)} for which in WHICH]
    for n in QUICK_SIZES if options.quick else SIZES:
        options.log(f"[{NAME}] conditioned factor, n = {n}")
        x = torch.randn(n, 4 * n, generator=torch.Generator().manual_seed(n))
        rows += [
            {"problem": f"conditioned n={n}", **_compare([x @ x.T / (4 * n)], which, repeats)}
            for which in WHICH
        ]
    return {
        "benchmark": NAME,
        "settings": {"quick": options.quick, "repeats": repeats, "small": SMALL},
        "environment": env,
        "rows": rows,
    }


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    rows = [
        [
            r["problem"],
            r["which"],
            f"{r['certified']} / {r['large']} (of {r['factors']})",
            f"{r['eigh_s'] * 1e3:.1f}",
            f"{r['pair_s'] * 1e3:.1f}",
            f"{r['ratio']:.2f}",
        ]
        for r in data["rows"]
    ]
    small = data["settings"]["small"]
    return "\n".join(
        [
            *report_header("The spectral space's eigenvectors: eigh or one pair", NAME, data),
            f"Median of {data['settings']['repeats']} interleaved repetitions; float32 "
            f"factors. Certified: factors of side > {small} whose pair the iteration "
            f"certified (the rest, and every factor of side ≤ {small}, took `eigh`).",
            "",
            *table(
                ["factors of", "eigenvalue", "certified", "eigh ms", "pair ms", "pair / eigh"],
                rows,
            ),
            "",
        ]
    )
