"""Methods side by side on one problem at one refresh interval: times, ratios to SGD in the
same process, FLOP floors, peak memory; and the markdown table of such a group.

This is the unit that ``step_time``, ``scaling`` and ``asdl`` repeat over problems and
intervals. SGD is the baseline of every group and always runs (first in the list).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from twolevel_kfac.bench.flops import FlopFloor, coarse_floor, flop_floor, layer_shapes
from twolevel_kfac.bench.memory import footprint
from twolevel_kfac.bench.methods import (
    MethodSpec,
    empirical,
    fisher_batch,
    inverse_method,
    method_spec,
    runner_for,
)
from twolevel_kfac.bench.problems import Problem
from twolevel_kfac.bench.report import fmt_range, table
from twolevel_kfac.bench.timing import block_steps, interleave, quartiles, ratio_stats

__all__ = ["compare", "group_table", "memory_by_method", "with_baseline"]

Log = Callable[[str], None]
BASELINE = "sgd"


def with_baseline(specs: Sequence[MethodSpec]) -> list[MethodSpec]:
    """``specs`` with SGD first (added when missing)."""
    rest = [s for s in specs if s.label != BASELINE]
    base = next((s for s in specs if s.label == BASELINE), method_spec(BASELINE))
    return [base, *rest]


def method_floor(spec: MethodSpec, problem: Problem, shapes: Any) -> FlopFloor:
    """The FLOP floor of ``spec`` on ``problem`` (its inverse method, Fisher batch and type;
    a two-level method's coarse work, :func:`~.flops.coarse_floor`)."""
    n_fisher = max(1, round(fisher_batch(spec) * problem.batch))
    floor = flop_floor(shapes, problem.batch, n_fisher, inverse_method(spec), not empirical(spec))
    if spec.kind != "twolevel":
        return floor
    options = spec.kwargs
    step, refresh = coarse_floor(
        shapes,
        n_fisher,
        options.get("coarse_space", "nicolaides"),
        options.get("combination", "additive"),
        options.get("coarse_refresh", "consistent"),
        inverse_method(spec),
    )
    return replace(floor, coarse_step=step, coarse_refresh=refresh)


def memory_by_method(
    specs: Sequence[MethodSpec], problem: Problem, interval: int, threads: int, log: Log
) -> dict[str, dict[str, Any]]:
    """Extra peak memory and saved-state size of each method
    (:mod:`twolevel_kfac.bench.memory`), by label."""
    found: dict[str, dict[str, Any]] = {}
    for spec in specs:
        measured = footprint(spec, problem, interval, threads)
        found[spec.label] = {
            "peak_mib": measured.peak_mib,
            "state_mib": measured.state_mib,
            "memory_error": measured.error,
        }
        if measured.error:
            log(f"  memory of {spec.label}: {measured.error}")
    return found


def _row(
    spec: MethodSpec,
    times: list[float],
    base: list[float],
    floor: FlopFloor,
    interval: int,
    skipped: int,
) -> dict[str, Any]:
    q1, median, q3 = quartiles(times)
    r1, ratio, r3 = ratio_stats(times, base)
    floor_ratio = floor.ratio(interval, spec.preconditioned)
    return {
        "method": spec.label,
        "kind": spec.kind,
        "median_ms": 1e3 * median,
        "q1_ms": 1e3 * q1,
        "q3_ms": 1e3 * q3,
        "ratio_sgd": ratio,
        "ratio_q1": r1,
        "ratio_q3": r3,
        "floor_ratio": floor_ratio,
        "vs_floor": ratio / floor_ratio,
        "skipped_steps": skipped,
        "times_s": times,
    }


def compare(
    problem: Problem,
    interval: int,
    specs: Sequence[MethodSpec],
    repeats: int,
    min_block: int,
    log: Log,
    memory: dict[str, dict[str, Any]] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Time ``specs`` (SGD added first) on ``problem`` with refresh interval ``interval``.

    Args:
        problem: The problem.
        interval: T.
        specs: The methods.
        repeats: Interleaved rounds.
        min_block: Minimum steps per block (rounded up to a multiple of T).
        log: Progress sink.
        memory: ``memory_by_method`` results to merge into the rows, or ``None``.
        device: Where the models and the batch live (CUDA blocks are synchronised).

    Returns:
        The group: problem, interval, block and one row per method.
    """
    specs = with_baseline(specs)
    shapes = layer_shapes(problem.build_model(), problem.input_shape)
    block = block_steps(interval, min_block)
    log(f"{problem.name}, T = {interval}: {len(specs)} methods × {repeats} blocks of {block} steps")
    runners = {spec.label: runner_for(spec, problem, interval, device=device) for spec in specs}
    times = interleave(runners, block, repeats, log)
    base = times[BASELINE]
    rows = []
    for spec in specs:
        floor = method_floor(spec, problem, shapes)
        row = _row(spec, times[spec.label], base, floor, interval, runners[spec.label].skipped())
        rows.append({**row, **(memory or {}).get(spec.label, {})})
    return {
        "problem": problem.name,
        "description": problem.describe(),
        "batch": problem.batch,
        "interval": interval,
        "block_steps": block,
        "repeats": repeats,
        "rows": rows,
    }


PAIRED_REFERENCES = ("kfac", "kfac:per_factor:eigen", "asdl:kfac")
"""The rows a group's paired column compares against, the first present: KFAC for the
step-time tables (the two-level targets are ratios to it), ASDL's KFAC for the peers."""


def group_table(group: dict[str, Any]) -> list[str]:
    """The markdown lines of one group: a heading, the table, a warning on skipped steps.

    Besides the ratio to SGD, a group with a row of :data:`PAIRED_REFERENCES` gets the
    median (IQR) over rounds of each method's block divided by that row's block of the same
    round: drift of the machine's speed between rounds cancels in it, as in ``× SGD``.
    """
    has_memory = any(r.get("peak_mib") is not None for r in group["rows"])
    by_method = {r["method"]: r for r in group["rows"]}
    reference = next((by_method[m] for m in PAIRED_REFERENCES if m in by_method), None)
    headers = ["method", "ms/step (IQR)", "× SGD (IQR)"]
    headers += [f"× {reference['method']} (IQR)"] if reference is not None else []
    headers += ["FLOP floor × SGD", "× floor"]
    headers += ["extra peak MiB"] if has_memory else []
    rows = []
    for r in group["rows"]:
        cells = [
            r["method"],
            fmt_range(r["median_ms"], r["q1_ms"], r["q3_ms"], 1),
            fmt_range(r["ratio_sgd"], r["ratio_q1"], r["ratio_q3"]),
        ]
        if reference is not None:
            low, ratio, high = ratio_stats(r["times_s"], reference["times_s"])
            cells.append(fmt_range(ratio, low, high))
        cells += [f"{r['floor_ratio']:.2f}", f"{r['vs_floor']:.2f}"]
        if has_memory:
            cells.append("–" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}")
        rows.append(cells)
    lines = [
        f"### {group['problem']}: {group['description']}, T = {group['interval']}",
        "",
        f"{group['repeats']} interleaved blocks of {group['block_steps']} steps per method.",
        "",
        *table(headers, rows),
    ]
    skipped = [f"{r['method']} ({r['skipped_steps']})" for r in group["rows"] if r["skipped_steps"]]
    if skipped:
        lines += [
            "",
            "Steps skipped as non-finite (cheaper, so those times are too low): "
            + ", ".join(skipped)
            + ".",
        ]
    return [*lines, ""]
