"""An eager runner and its ``torch.compile`` twin, measured side by side in one process.

A :class:`CompilePair` builds two runners (:class:`~twolevel_kfac.bench.methods.Runner`)
that do the same work, one eager and one compiled, plus a read-out of their state
(parameters, or the last output). :func:`measure_pair` starts each pair from a clean
Dynamo state (``torch._dynamo.reset()``, default Dynamo settings, so the recompile limit
and graph breaks are what a user with one model would meet) and then:

1. takes the first step of each, timed: for the compiled twin that is the compilation
   (reported apart from the step times; Inductor's on-disk caches make a repeat faster,
   so their hits and misses are recorded);
2. takes a second step and compares the states: ``‖s_c − s_e‖ / ‖s_e − s_0‖`` (``s_0``
   the state before any step) must stay below a tolerance near float32 rounding, else the
   pair is *not equivalent* and is not timed;
3. finishes the warm-up (a full refresh cycle, so every guard variant is compiled), reads
   Dynamo's counters (graphs, graph breaks and their reasons, recompile-limit hits);
4. times both in interleaved blocks (:func:`twolevel_kfac.bench.timing.interleave`) and
   reports the compiled / eager ratio of each round's pair of blocks (median and IQR).

A compilation that raises is recorded as the error text, not raised.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from twolevel_kfac.bench.methods import Runner
from twolevel_kfac.bench.timing import interleave, quartiles, ratio_stats, seconds

__all__ = [
    "MARGIN",
    "TOLERANCE",
    "CompilePair",
    "compile_unavailable",
    "error_text",
    "measure_pair",
    "verdict",
]

Log = Callable[[str], None]
State = Callable[[], Tensor]
TOLERANCE = 1e-4
"""Largest relative state difference counted as equal (float32 rounding, amplified a
little by two steps through a damped inverse; a lost statistic gives ~1e-1)."""
MARGIN = 0.02
"""Ratios within 2 % of 1 count as no clear difference (not worth a compilation)."""
LIMIT_REASON = "Dynamo recompile limit exceeded"
MAX_REASON = 240


@dataclass(frozen=True)
class CompilePair:
    """Two runners doing the same work, eager and compiled.

    Attributes:
        label: Row label.
        build: ``build(compiled)`` → the runner and a read-out of its state.
        warmup: Steps before timing (at least 2; a multiple of T plus one covers every
            refresh variant).
        block: Steps per timed block.
        facts: Extra facts about a runner after the warm-up (e.g. statistics it lost).
    """

    label: str
    build: Callable[[bool], tuple[Runner, State]]
    warmup: int
    block: int
    facts: Callable[[Runner], dict[str, Any]] | None = None


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` with Inductor cannot run here, or ``None`` when it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo

        supported = dynamo.is_dynamo_supported()
    except Exception as exc:  # torch raises RuntimeError on unsupported Pythons
        return f"Dynamo is not supported here: {error_text(exc)}"
    if not supported:
        return "Dynamo is not supported on this Python / platform"
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++, c++ or clang++) on PATH; Inductor on CPU needs one"
    return None


def error_text(exc: BaseException) -> str:
    """``Type: first lines of the message`` (at most 500 characters)."""
    lines = [line for line in str(exc).splitlines() if line.strip()][:4]
    return f"{type(exc).__name__}: " + " / ".join(lines)[:500]


def _counters() -> dict[str, Counter[str]]:
    from torch._dynamo.utils import counters

    return {key: Counter(value) for key, value in counters.items()}


def _grown(before: dict[str, Counter[str]], after: dict[str, Counter[str]], key: str) -> Counter:
    return after.get(key, Counter()) - before.get(key, Counter())


def _reason(text: str) -> str:
    """The first line of a Dynamo message and its ``Explanation:`` line, shortened."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    why = [line.removeprefix("Explanation:").strip() for line in lines if "Explanation:" in line]
    return (lines[0] + (f" ({why[0]})" if why else ""))[:MAX_REASON] if lines else ""


def _break_sites() -> list[str]:
    """Each graph break since the last ``reset()`` with where it happened (file:line)."""
    try:
        from torch._dynamo.utils import graph_break_reasons
    except ImportError:  # an internal list; other torch versions may lack it
        return []
    sites = set()
    for reason in graph_break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f" at {Path(frame.filename).name}:{frame.lineno} ({frame.name})" if frame else ""
        sites.add(_reason(reason.reason) + where)
    return sorted(sites)


def dynamo_facts(before: dict[str, Counter[str]], after: dict[str, Counter[str]]) -> dict:
    """What Dynamo and Inductor did between two ``_counters()`` snapshots (the break sites
    are those since the last ``reset()``)."""
    breaks = _grown(before, after, "graph_break")
    unsupported = _grown(before, after, "unimplemented")
    inductor = _grown(before, after, "inductor")
    sites = _break_sites() or [_reason(r) for r in breaks]
    return {
        "graphs": _grown(before, after, "stats")["unique_graphs"],
        "graph_breaks": sum(breaks.values()),
        "recompile_limit_hits": sum(n for r, n in unsupported.items() if LIMIT_REASON in r),
        "reasons": sorted({*sites, *(_reason(r) for r in unsupported)}),
        "cache_hits": inductor["fxgraph_cache_hit"],
        "cache_misses": inductor["fxgraph_cache_miss"],
    }


def _relative_difference(compiled: Tensor, eager: Tensor, start: Tensor) -> float:
    scale = float(torch.linalg.vector_norm(eager - start))
    gap = float(torch.linalg.vector_norm(compiled - eager))
    return gap / scale if scale > 0 else (0.0 if gap == 0 else float("inf"))


def _times(times: list[float], base: list[float]) -> dict[str, Any]:
    q1, median, q3 = quartiles(times)
    e1, eager, e3 = quartiles(base)
    r1, ratio, r3 = ratio_stats(times, base)
    return {
        "eager_ms": 1e3 * eager,
        "eager_q1_ms": 1e3 * e1,
        "eager_q3_ms": 1e3 * e3,
        "compiled_ms": 1e3 * median,
        "compiled_q1_ms": 1e3 * q1,
        "compiled_q3_ms": 1e3 * q3,
        "ratio": ratio,
        "ratio_q1": r1,
        "ratio_q3": r3,
        "eager_times_s": base,
        "compiled_times_s": times,
    }


def _compiled_warmup(
    pair: CompilePair, eager_state: Tensor, start: Tensor
) -> tuple[Runner, dict[str, Any]]:
    """Build, compile and warm up the compiled twin; the facts of steps 1–3 above."""
    runner, state = pair.build(True)
    first = seconds(runner, 1)
    second = seconds(runner, 1)
    difference = _relative_difference(state(), eager_state, start)
    return runner, {
        "compile_s": first,
        "warmup_rest_s": second + seconds(runner, pair.warmup - 2),
        "relative_difference": difference,
        "equivalent": bool(difference <= TOLERANCE),
    }


def measure_pair(pair: CompilePair, repeats: int, log: Log) -> dict[str, Any]:
    """Measure one pair (module docstring); the row of the report."""
    import torch._dynamo as dynamo

    dynamo.reset()
    eager, eager_state = pair.build(False)
    start = eager_state().clone()
    eager_first = seconds(eager, 1)
    eager_second = seconds(eager, 1)
    reference = eager_state().clone()
    row: dict[str, Any] = {
        "label": pair.label,
        "eager_first_s": eager_first,
        "eager_warmup_s": eager_first + eager_second + seconds(eager, pair.warmup - 2),
        "error": None,
    }
    before = _counters()
    try:
        compiled, facts = _compiled_warmup(pair, reference, start)
    except Exception as exc:  # compilation failures come in many types; record the text
        log(f"  {pair.label}: compilation failed: {error_text(exc)}")
        return {**row, "error": error_text(exc), **dynamo_facts(before, _counters())}
    row |= facts | dynamo_facts(before, _counters())
    if pair.facts is not None:
        row["facts"] = {"eager": pair.facts(eager), "compiled": pair.facts(compiled)}
    log(
        f"  {pair.label}: compiled in {row['compile_s']:.1f} s, {row['graphs']} graph(s), "
        f"{row['graph_breaks']} break(s), relative difference {row['relative_difference']:.1e}"
    )
    if not row["equivalent"]:
        return row
    before = _counters()
    times = interleave({"eager": eager, "compiled": compiled}, pair.block, repeats, log)
    row["graphs_while_timed"] = dynamo_facts(before, _counters())["graphs"]
    return row | _times(times["compiled"], times["eager"])


def verdict(row: dict[str, Any]) -> str:
    """``compile wins`` (the whole IQR of the ratio below ``1 − MARGIN``), ``compile loses``
    (above ``1 + MARGIN``), ``no clear difference``, ``not equivalent`` or ``failed``."""
    if row.get("error"):
        return "failed"
    if not row.get("equivalent"):
        return "not equivalent"
    if row["ratio_q3"] < 1.0 - MARGIN:
        return "compile wins"
    if row["ratio_q1"] > 1.0 + MARGIN:
        return "compile loses"
    return "no clear difference"
