"""``scaling``: how the step-time ratio to SGD moves with batch size, width and depth.

A ReLU MLP classifier 784 → width × depth → 10 (cross-entropy), base point batch 256,
width 512, depth 4; each sweep varies one quantity with the others at the base point. At
every point KFAC and two two-level methods run interleaved with SGD
(:mod:`twolevel_kfac.bench.compare`, T = 20) and KFAC's FLOP-floor ratio is computed from
the layer shapes. Expected from the floor: the ratio falls with the batch (fixed
preconditioner and decomposition work over a growing forward+backward), rises with the
width (d³ decompositions against d² forward work) and stays flat with the depth.

Widths 256 … 4096 and depths 4 … 64 (the fast-defaults issue); points slower than
:data:`SLOW_GFLOP` run one round. ``--quick``: base batch 64, width 128, depth 2, two points
per sweep, T = 4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twolevel_kfac.bench.compare import compare, method_floor, with_baseline
from twolevel_kfac.bench.flops import layer_shapes
from twolevel_kfac.bench.methods import method_spec, select_methods
from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.problems import mlp_problem
from twolevel_kfac.bench.report import (
    environment,
    fmt_range,
    report_header,
    table,
)

__all__ = ["NAME", "measure", "plot", "render"]

NAME = "scaling"
METHODS = ("kfac", "nicolaides+additive", "residual+adef2")
QUICK_METHODS = ("kfac", "nicolaides+additive")
BASE = {"batch": 256, "width": 512, "depth": 4}
QUICK_BASE = {"batch": 64, "width": 128, "depth": 2}
SWEEPS = {
    "batch": (32, 64, 128, 256, 512, 1024),
    "width": (256, 512, 1024, 2048, 4096),
    "depth": (4, 8, 16, 32, 64),
}
SLOW_GFLOP = 100.0
"""Points whose KFAC floor exceeds this many GFLOP per step (widths 2048 and 4096: 1.7 s and
12 s per step on two cores) run one round of one block, not the others' repeats."""
QUICK_SWEEPS = {"batch": (32, 64), "width": (64, 128), "depth": (1, 2)}
MIN_BLOCK, QUICK_MIN_BLOCK = 20, 4


def measure(options: BenchOptions) -> dict[str, Any]:
    """Run the sweeps (module docstring) and return the JSON document."""
    env = environment(options.threads)
    base, sweeps = (QUICK_BASE, QUICK_SWEEPS) if options.quick else (BASE, SWEEPS)
    specs = with_baseline(
        select_methods(options.methods, QUICK_METHODS if options.quick else METHODS)
    )
    interval = options.pick((20,), (4,))[0]
    repeats = options.rounds(5, 3)
    min_block = QUICK_MIN_BLOCK if options.quick else MIN_BLOCK
    kfac = method_spec("kfac")
    done: dict[str, dict[str, Any]] = {}  # the base point recurs in every sweep
    out = []
    for quantity, values in sweeps.items():
        points = []
        for value in values:
            problem = mlp_problem(**{**base, quantity: value})
            shapes = layer_shapes(problem.build_model(), problem.input_shape)
            if problem.name not in done:
                slow = method_floor(kfac, problem, shapes).step(interval) / 1e9 > SLOW_GFLOP
                rounds, block = (1, interval) if slow else (repeats, min_block)
                options.log(f"[{NAME}] {quantity} = {value}" + (" (one round)" if slow else ""))
                done[problem.name] = compare(problem, interval, specs, rounds, block, options.log)
            points.append(
                {
                    "value": value,
                    "problem": problem.name,
                    "kfac_floor_ratio": method_floor(kfac, problem, shapes).ratio(interval),
                    "rows": {r["method"]: r for r in done[problem.name]["rows"]},
                }
            )
        title = ", ".join(f"{k} {v}" for k, v in base.items() if k != quantity)
        out.append(
            {
                "quantity": quantity,
                "title": title,
                "points": points,
                "methods": [s.label for s in specs],
            }
        )
    return {
        "benchmark": NAME,
        "settings": {
            "quick": options.quick,
            "base": base,
            "interval": interval,
            "repeats": repeats,
            "min_block_steps": min_block,
        },
        "environment": env,
        "sweeps": out,
    }


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    s = data["settings"]
    lines = [
        *report_header(
            "Step-time ratio to SGD vs batch size, width and depth", "scaling", data, s["quick"]
        ),
        f"ReLU MLP 784 → width × depth → 10, cross-entropy; base point {s['base']}; "
        f"T = {s['interval']}; {s['repeats']} interleaved rounds of blocks of at least "
        f"{s['min_block_steps']} steps. Cells: median (IQR) of the per-round ratio to SGD; "
        "floor: KFAC's FLOP-floor ratio. Plot: `scaling.png`.",
        "",
    ]
    for sweep in data["sweeps"]:
        methods = [m for m in sweep["methods"] if m != "sgd"]
        rows = []
        for point in sweep["points"]:
            r = point["rows"]
            sgd_ms = r["sgd"]["median_ms"]
            cells = [
                fmt_range(r[m]["ratio_sgd"], r[m]["ratio_q1"], r[m]["ratio_q3"]) for m in methods
            ]
            rows.append(
                [str(point["value"]), f"{sgd_ms:.1f}", *cells, f"{point['kfac_floor_ratio']:.2f}"]
            )
        headers = [sweep["quantity"], "SGD ms/step", *methods, "KFAC floor"]
        lines += [f"## {sweep['quantity']} ({sweep['title']})", "", *table(headers, rows), ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    """``scaling.png``: one panel per sweep."""
    from twolevel_kfac.bench.plots import scaling_panels

    return [scaling_panels(data, out / f"{NAME}.png")]
