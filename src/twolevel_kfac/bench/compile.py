"""``compile``: where does ``torch.compile`` (Inductor) pay off after warm-up, and where not?

Each row is an eager runner and its compiled twin in one process
(:mod:`twolevel_kfac.bench.compiled`: compilation timed apart, the two states compared
after two steps, Dynamo's graphs and graph breaks counted, then interleaved blocks and
the compiled / eager ratio per round):

1. SGD with ``torch.compile(model)`` (MNIST autoencoder, batch 512; CURVES autoencoder,
   256);
2. ``tk.KFAC`` (the benchmarks' settings at the defaults, ``kfac``, T = 20) on the same
   problems, with the paper's MC Fisher and with the empirical Fisher (the two capture
   paths: a root forward hook that calls ``torch.autograd.grad`` on the layer outputs, and
   tensor hooks on them), each compiled two ways: ``KFAC(torch.compile(model))`` (the
   hooks sit on the modules inside the compiled wrapper) and ``torch.compile(model)``
   after ``KFAC(model)``;
3. one layer's preconditioner apply, ``KroneckerFactors.apply_inverse`` (factored damping:
   ``G⁻¹ V A⁻¹``, two GEMMs; ``eigen_sum``: four GEMMs and a scaling in the eigenbasis),
   eager vs ``torch.compile`` of the bound method, for every layer shape of the MNIST
   autoencoder.

A compiled KFAC whose step differs from the eager one (beyond float32 rounding) is
reported *not equivalent*, with how many layers ended with an all-zero ``G`` factor,
instead of a time.

``--quick``: an MLP 784-64-64-10 (batch 64), SGD and KFAC with both Fishers in the
first compile pattern only, and the apply of its first layer with factored damping.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from twolevel_kfac.bench.compiled import (
    MARGIN,
    TOLERANCE,
    CompilePair,
    State,
    compile_unavailable,
    measure_pair,
    verdict,
)
from twolevel_kfac.bench.flops import LayerShape, layer_shapes
from twolevel_kfac.bench.methods import (
    KFAC_SETTINGS,
    MethodSpec,
    Runner,
    build_runner,
    method_spec,
)
from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.problems import Problem, mlp_problem, select_problems
from twolevel_kfac.bench.report import (
    environment,
    fmt_range,
    report_header,
    table,
)
from twolevel_kfac.bench.timing import block_steps, timed
from twolevel_kfac.curvature.kronecker import KroneckerFactors

__all__ = ["NAME", "measure", "render"]

NAME = "compile"
PROBLEMS = ("mnist_ae_512", "curves_ae_256")
QUICK_PROBLEM = {"batch": 64, "width": 64, "depth": 2}
INTERVAL = 20
KFAC = "kfac"
FISHERS = ("mc", "empirical")
PATTERNS = {
    "wrapped": "KFAC(torch.compile(model))",
    "after": "torch.compile(model) after KFAC(model)",
}
QUICK_PATTERNS = ("wrapped",)
APPLY_MODES, QUICK_APPLY_MODES = ("per_factor", "eigen_sum"), ("per_factor",)
BLOCK_SECONDS, QUICK_BLOCK_SECONDS = 0.2, 0.02
MIN_BLOCK = 20


def _kfac_facts(runner: Runner) -> dict[str, Any]:
    """How many layers' ``G`` factor is all zero (lost gradient statistics)."""
    factors = runner.optimizer.preconditioner.factors
    zero = [n for n, f in factors.items() if f.G is not None and not bool(f.G.any())]
    return {"layers": len(factors), "zero_G_layers": len(zero)}


def _model_pair(problem: Problem, spec: MethodSpec, pattern: str, block: int) -> CompilePair:
    """``spec`` on ``problem``, eager vs compiled with ``pattern`` (a key of ``PATTERNS``)."""

    def build(compiled: bool) -> tuple[Runner, State]:
        model = problem.build_model()
        hooked, forward = model, None
        if compiled and pattern == "wrapped":
            hooked = cast(nn.Module, torch.compile(model))  # an OptimizedModule
        elif compiled:
            forward = torch.compile(model)
        runner = build_runner(
            spec,
            hooked,
            problem.batch_data(),
            problem.loss_fn,
            problem.likelihood,
            INTERVAL,
            forward,
        )
        return runner, lambda: parameters_to_vector(model.parameters()).detach()

    label = spec.label if not spec.preconditioned else f"{spec.label} · {PATTERNS[pattern]}"
    facts = _kfac_facts if spec.preconditioned else None
    return CompilePair(label, build, warmup=INTERVAL + 1, block=block, facts=facts)


def model_pairs(problem: Problem, patterns: tuple[str, ...], block: int) -> list[CompilePair]:
    """SGD, then KFAC with each Fisher and compile pattern."""
    kfac = method_spec(KFAC)
    pairs = [_model_pair(problem, method_spec("sgd"), "wrapped", block)]
    for fisher in FISHERS:
        spec = kfac.with_options(f"{KFAC} ({fisher} Fisher)", fisher=fisher)
        pairs += [_model_pair(problem, spec, pattern, block) for pattern in patterns]
    return pairs


def _factors(d_in: int, d_out: int, seed: int, bordered: bool) -> KroneckerFactors:
    """Factor-like SPD ``A``, ``G`` (``X Xᵀ / 2n``), decomposed for the eigen method
    (``bordered``: ``A``'s last coordinate a bias', as the optimizer keeps it)."""
    gen = torch.Generator().manual_seed(seed)
    a, g = torch.randn(d_in, 2 * d_in, generator=gen), torch.randn(d_out, 2 * d_out, generator=gen)
    factors = KroneckerFactors(bordered=bordered)
    factors.update(a @ a.T / (2 * d_in), g @ g.T / (2 * d_out), ema_decay=0.95, num_locations=1)
    factors.decompose("eigen")
    return factors


def apply_pair(shape: LayerShape, mode: str, block_seconds: float) -> CompilePair:
    """``apply_inverse`` of one layer shape in damping ``mode``, eager vs compiled."""
    d_in = shape.d_in + int(shape.bias)
    factors = _factors(d_in, shape.d_out, seed=0, bordered=shape.bias)
    grad = torch.randn(shape.d_out, d_in, generator=torch.Generator().manual_seed(1))
    damping = float(KFAC_SETTINGS["damping"])

    def build(compiled: bool) -> tuple[Runner, State]:
        apply = torch.compile(factors.apply_inverse) if compiled else factors.apply_inverse
        out = [torch.zeros_like(grad)]

        def step() -> None:
            out[0] = apply(grad, damping, mode, "eigen")

        return Runner(step), lambda: out[0]

    eager, _ = build(False)
    eager.run(1)  # fills the cached inverses, shared by both twins
    block = max(3, math.ceil(block_seconds / timed(eager, 3)))
    label = f"{shape.name}: {shape.d_out} × {d_in}, {mode}"
    return CompilePair(label, build, warmup=3, block=block)


def _problems(options: BenchOptions) -> list[Problem]:
    if options.quick and not options.problems:
        return [mlp_problem(**QUICK_PROBLEM)]
    return select_problems(options.problems, PROBLEMS)


def _apply_rows(problem: Problem, options: BenchOptions, repeats: int) -> list[dict[str, Any]]:
    shapes = layer_shapes(problem.build_model(), problem.input_shape)
    modes = QUICK_APPLY_MODES if options.quick else APPLY_MODES
    block_seconds = QUICK_BLOCK_SECONDS if options.quick else BLOCK_SECONDS
    rows = []
    for shape in shapes[:1] if options.quick else shapes:
        for mode in modes:
            pair = apply_pair(shape, mode, block_seconds)
            rows.append({**measure_pair(pair, repeats, options.log), "block_steps": pair.block})
    return rows


def measure(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark (module docstring) and return its JSON document."""
    env = environment(options.threads)
    repeats = options.rounds(5, 3)
    block = block_steps(INTERVAL, MIN_BLOCK)
    problems = _problems(options)
    patterns = QUICK_PATTERNS if options.quick else tuple(PATTERNS)
    unavailable = compile_unavailable()
    models, apply = [], []
    if unavailable is None:
        for problem in problems:
            options.log(f"[{NAME}] {problem.name}")
            pairs = model_pairs(problem, patterns, block)
            rows = [measure_pair(pair, repeats, options.log) for pair in pairs]
            models.append(
                {"problem": problem.name, "description": problem.describe(), "rows": rows}
            )
        options.log(f"[{NAME}] preconditioner apply, layers of {problems[0].name}")
        apply = _apply_rows(problems[0], options, repeats)
        torch._dynamo.reset()  # drop the compiled code of the last pair
    return {
        "benchmark": NAME,
        "settings": {
            "quick": options.quick,
            "repeats": repeats,
            "interval": INTERVAL,
            "block_steps": block,
            "warmup_steps": INTERVAL + 1,
            "tolerance": TOLERANCE,
            "margin": MARGIN,
            "kfac_settings": KFAC_SETTINGS,
            "patterns": [PATTERNS[p] for p in patterns],
            "apply_problem": problems[0].name,
        },
        "environment": env,
        "unavailable": unavailable,
        "models": models,
        "apply": apply,
    }


def _range(row: dict[str, Any], key: str, digits: int = 2) -> str:
    return fmt_range(row[key], row[f"{key}_q1"], row[f"{key}_q3"], digits)


def _ms(row: dict[str, Any], which: str) -> str:
    return fmt_range(row[f"{which}_ms"], row[f"{which}_q1_ms"], row[f"{which}_q3_ms"], 2)


def _break_even(row: dict[str, Any]) -> str:
    """Steps after which the compile time is paid back (when compile wins)."""
    saved = (row["eager_ms"] - row["compiled_ms"]) / 1e3
    extra = row["compile_s"] + row["warmup_rest_s"] - row["eager_warmup_s"]
    steps = math.ceil(extra / saved)
    return f"pays back its {extra:.1f} s of compilation after ≈ {steps} steps (or calls)"


def _outcome(row: dict[str, Any]) -> str:
    """One sentence: the verdict and its numbers."""
    kind = verdict(row)
    if kind == "failed":
        return f"{kind}: {row['error']}"
    if kind == "not equivalent":
        text = f"the compiled step differs by {row['relative_difference']:.1e} (relative)"
        facts = row.get("facts", {}).get("compiled")
        if facts:
            text += f"; G is all zero in {facts['zero_G_layers']} of {facts['layers']} layers"
        return f"{kind}: {text}, so no time is reported"
    text = f"{kind}: compiled / eager {_range(row, 'ratio')}"
    return text + (f"; {_break_even(row)}" if kind == "compile wins" else "")


def _cells(row: dict[str, Any]) -> list[str]:
    timed_row = "ratio" in row
    dash = "–"
    return [
        row["label"],
        _ms(row, "eager") if timed_row else dash,
        _ms(row, "compiled") if timed_row else dash,
        _range(row, "ratio") if timed_row else dash,
        verdict(row),
        f"{row['eager_first_s']:.2f} / " + (dash if row["error"] else f"{row['compile_s']:.2f}"),
        f"{row['eager_warmup_s']:.2f} / "
        + (dash if row["error"] else f"{row['compile_s'] + row['warmup_rest_s']:.2f}"),
        str(row["graphs"]),
        str(row["graph_breaks"]),
        dash if row["error"] else f"{row['relative_difference']:.1e}",
    ]


HEADERS = [
    "variant",
    "eager ms (IQR)",
    "compiled ms (IQR)",
    "compiled / eager (IQR)",
    "verdict",
    "first step s: eager / compiled",
    "warm-up s: eager / compiled",
    "graphs",
    "graph breaks",
    "rel. difference",
]


def _section(title: str, rows: list[dict[str, Any]]) -> list[str]:
    """A table of pairs and the graph-break reasons of each."""
    lines = [f"### {title}", "", *table(HEADERS, [_cells(r) for r in rows]), ""]
    for row in rows:
        notes = list(row["reasons"])
        if row["recompile_limit_hits"]:
            notes.append(
                f"the recompile limit was hit {row['recompile_limit_hits']} time(s): "
                "those frames run eagerly"
            )
        if row.get("graphs_while_timed"):
            notes.append(f"{row['graphs_while_timed']} graph(s) compiled while timed")
        if notes:
            lines.append(f"* {row['label']}: " + "; ".join(notes))
    return [*lines, ""]


def _summary(data: dict[str, Any]) -> list[str]:
    lines = ["## Where compile wins and where it does not", ""]
    for group in data["models"]:
        lines += [f"* {group['problem']}, {r['label']}: {_outcome(r)}." for r in group["rows"]]
    lines += [f"* apply, {r['label']}: {_outcome(r)}." for r in data["apply"]]
    return [*lines, ""]


def _method(s: dict[str, Any]) -> str:
    """The paragraph on how the numbers were taken."""
    return (
        "Each row is an eager runner and its `torch.compile` twin (Inductor, default "
        "settings) in one process, after `torch._dynamo.reset()`. *First step*: for the "
        "compiled twin, the compilation (Inductor's on-disk cache shortens a repeat run); "
        f"*warm-up*: the first {s['warmup_steps']} steps (a refresh cycle of "
        f"T = {s['interval']}, so every guard variant is compiled). Then {s['repeats']} "
        f"interleaved rounds of one block each ({s['block_steps']} steps for the models, "
        "calls filling about a fifth of a second for the apply); ms per step or call: median "
        "(IQR) over blocks; compiled / eager: median (IQR) of the per-round ratios, below 1 "
        "when compile is faster. *compile wins* / *loses*: the whole IQR below "
        f"{1 - s['margin']:g} / above {1 + s['margin']:g}; a win pays back the extra "
        "warm-up time after the number of steps given. *Rel. difference*: "
        "‖θ_compiled − θ_eager‖ / ‖θ_eager − θ_0‖ after two steps (apply: of the output); "
        f"above {s['tolerance']:g} the pair is *not equivalent* and not timed. Graphs, "
        "graph breaks, their reasons and recompile-limit hits (frames Dynamo then leaves "
        "eager): Dynamo's counters during the warm-up. "
        f"KFAC: {s['kfac_settings']}, cov_interval = inv_interval = T."
    )


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    s = data["settings"]
    lines = [
        *report_header("torch.compile: compiled / eager", NAME, data, s["quick"]),
        _method(s),
        "",
    ]
    if data["unavailable"]:
        return "\n".join([*lines, f"torch.compile could not run here: {data['unavailable']}."])
    lines += _summary(data)
    lines += ["## Training steps", ""]
    for group in data["models"]:
        lines += _section(f"{group['problem']}: {group['description']}", group["rows"])
    lines += ["## Preconditioner apply (`KroneckerFactors.apply_inverse`, ms per call)", ""]
    lines += _section(f"layers of {s['apply_problem']}", data["apply"])
    return "\n".join(lines)
