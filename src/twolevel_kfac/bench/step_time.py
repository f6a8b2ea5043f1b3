"""``step_time``: per-step time of every method relative to SGD, on the paper's problems.

Problems: MNIST autoencoder (batch 512 and 1000), CURVES autoencoder (256), DeepLinear
(64 layers, 512), cuda-convnet (256); refresh intervals T ∈ {1, 20, 100}; methods: SGD,
Adam, KFAC in each damping mode with eigen and Cholesky inverses, EKFAC, KPSVD, every
two-level coarse space × combination (consistent refresh) and the faithful residual
(:mod:`twolevel_kfac.bench.methods`). Per (problem, T) the methods run interleaved in one
process (:mod:`twolevel_kfac.bench.timing`); reported: median ms/step with its IQR, the
ratio to SGD (median and IQR of per-round ratios), the FLOP-floor ratio
(:mod:`twolevel_kfac.bench.flops`), measured / floor, and the extra peak memory over a
plain forward+backward pass (:mod:`twolevel_kfac.bench.memory`, measured once per problem
and method, with the smallest T).

``--quick``: CURVES only, T ∈ {2, 4}, six methods, 3 rounds of short blocks, memory of
SGD, KFAC and one two-level method only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twolevel_kfac.bench.compare import compare, group_table, memory_by_method, with_baseline
from twolevel_kfac.bench.flops import flop_floor, layer_shapes
from twolevel_kfac.bench.memory import METHOD_NOTE
from twolevel_kfac.bench.methods import KFAC_SETTINGS, select_methods
from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.problems import select_problems
from twolevel_kfac.bench.report import environment, report_header

__all__ = ["NAME", "measure", "plot", "render"]

NAME = "step_time"
PROBLEMS = ("mnist_ae_512", "mnist_ae_1000", "curves_ae_256", "deep_linear_512", "cuda_convnet_256")
QUICK_PROBLEMS = ("curves_ae_256",)
INTERVALS, QUICK_INTERVALS = (1, 20, 100), (2, 4)
QUICK_METHODS = (
    "sgd",
    "adam",
    "kfac",
    "kfac:pi:cholesky",
    "nicolaides+additive",
    "residual+additive:faithful",
)
QUICK_MEMORY = ("sgd", "kfac", "nicolaides+additive")
MIN_BLOCK, QUICK_MIN_BLOCK = 10, 2


def _floors(problems: list[Any]) -> dict[str, Any]:
    """The KFAC floor parts of each problem (MC Fisher on a quarter of the batch, eigen)."""
    floors = {}
    for problem in problems:
        shapes = layer_shapes(problem.build_model(), problem.input_shape)
        n_fisher = round(KFAC_SETTINGS["fisher_batch"] * problem.batch)
        floors[problem.name] = {
            "fisher_batch": n_fisher,
            "gflop": flop_floor(shapes, problem.batch, n_fisher).as_gflop(),
            "layers": [[s.name, s.d_in, s.d_out, s.locations, s.bias] for s in shapes],
        }
    return floors


def measure(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark (module docstring) and return its JSON document."""
    env = environment(options.threads)
    problems = select_problems(options.problems, QUICK_PROBLEMS if options.quick else PROBLEMS)
    specs = with_baseline(select_methods(options.methods, QUICK_METHODS if options.quick else ()))
    intervals = options.pick(INTERVALS, QUICK_INTERVALS)
    repeats = options.rounds(5, 3)
    min_block = QUICK_MIN_BLOCK if options.quick else MIN_BLOCK
    probe = [s for s in specs if not options.quick or s.label in QUICK_MEMORY]
    groups = []
    for problem in problems:
        options.log(f"[{NAME}] {problem.name}: memory of {len(probe)} methods")
        memory = memory_by_method(probe, problem, min(intervals), options.threads, options.log)
        for interval in intervals:
            groups.append(
                compare(problem, interval, specs, repeats, min_block, options.log, memory)
            )
    return {
        "benchmark": NAME,
        "settings": {
            "quick": options.quick,
            "repeats": repeats,
            "intervals": list(intervals),
            "min_block_steps": min_block,
            "kfac_settings": KFAC_SETTINGS,
            "memory": METHOD_NOTE,
        },
        "environment": env,
        "floors": _floors(problems),
        "results": groups,
    }


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    s = data["settings"]
    lines = [
        *report_header("Step time relative to SGD", "step_time", data, s["quick"]),
        f"Each method trains its own model on one fixed batch; per problem and interval T the "
        f"methods run in one process, {s['repeats']} interleaved rounds of blocks of at least "
        f"{s['min_block_steps']} steps (a multiple of T, so each block carries its share of "
        "the refresh work). ms/step: median (interquartile range) over blocks; × SGD: median "
        "(IQR) of the per-round ratios to SGD's block of the same round; × kfac (KFAC at "
        "its defaults): "
        "the same pairing against KFAC's block (the two-level targets are ratios to KFAC). "
        "FLOP floor × SGD: "
        "the issue's floor model (forward+backward, preconditioner application, factor "
        "refresh/T, eigen- or Cholesky decompositions/T) from the layer shapes; two-level "
        "methods add their coarse level's work (restrictions, prolongations and F̂ products "
        "per step; F_c and a residual basis's M⁻¹ applies and Fisher products per refresh, "
        "the basis at every step in the faithful schedule); for EKFAC and KPSVD it is "
        "KFAC's (a lower bound). "
        "× floor: measured ratio / "
        "floor ratio. Extra peak MiB: " + s["memory"] + ", once per problem and method.",
        "",
        f"KFAC family: {s['kfac_settings']}, cov_interval = inv_interval = T.",
        "",
        "## FLOP floor parts (GFLOP per step; refresh and decompositions per refresh)",
        "",
    ]
    for name, floor in data["floors"].items():
        g = floor["gflop"]
        lines.append(
            f"* {name}: forward+backward {g['forward_backward']:.2f}, preconditioner "
            f"{g['precondition']:.2f}, factor refresh {g['refresh_per_T']:.2f}/T "
            f"(Fisher batch {floor['fisher_batch']}), eigendecompositions "
            f"{g['decomposition_per_T']:.1f}/T."
        )
    lines += ["", "## Results", ""]
    for group in data["results"]:
        lines += group_table(group)
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per problem: ratio to SGD per method and T, with the FLOP floors."""
    from twolevel_kfac.bench.plots import ratio_bars

    paths = []
    for problem in dict.fromkeys(g["problem"] for g in data["results"]):
        groups = [g for g in data["results"] if g["problem"] == problem]
        paths.append(ratio_bars(groups, out / f"{NAME}_{problem}.png"))
    return paths
