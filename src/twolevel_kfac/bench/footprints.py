"""``memory``: peak memory per step and saved-state size of every method on every problem
of the step-time matrix, against KFAC at its defaults.

Each (problem, method) runs in a fresh ``forkserver`` child (:mod:`.memory`): the extra
peak resident memory of ``T + 2`` steps (two refreshes, the second building its basis while
the first's is held) over one plain forward and backward pass, and the size of
``torch.save(optimizer.state_dict())`` after them. The methods are the step-time
benchmark's (:func:`~.methods.step_time_methods`), T = 20.

Targets (the fast-defaults issue): ``TwoLevelKFAC``'s state and peak ≤ 1.2× KFAC's. The
default two-level configuration (additive, consistent refresh) keeps no Fisher mini-batch
between refreshes; the other combinations, the faithful residual schedule and the
diagnostics read it at every step (:attr:`~twolevel_kfac.optim.coarse.
CoarseLevel.reads_statistics`) and keep its rows or, for the combinations with a basis
fixed between refreshes, ``W₀ = FR₀ᵀ`` where that is smaller (``kept_fisher="auto"``).

``--quick``: one small MLP, four methods.
"""

from __future__ import annotations

from typing import Any

from twolevel_kfac.bench.compare import memory_by_method
from twolevel_kfac.bench.memory import METHOD_NOTE
from twolevel_kfac.bench.methods import select_methods, step_time_methods
from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.problems import mlp_problem, select_problems
from twolevel_kfac.bench.report import environment, report_header, table
from twolevel_kfac.bench.step_time import PROBLEMS

__all__ = ["NAME", "measure", "render"]

NAME = "memory"
INTERVAL = 20
REFERENCE = "kfac"
QUICK_METHODS = ("sgd", "kfac", "nicolaides+additive", "residual+adef2")
TARGET = 1.2


def measure(options: BenchOptions) -> dict[str, Any]:
    """Measure every (problem, method) footprint (module docstring)."""
    if options.quick:
        problems = [mlp_problem(64, 64, 2)]
        specs = select_methods(options.methods, QUICK_METHODS)
    else:
        problems = select_problems(options.problems, PROBLEMS)
        specs = select_methods(options.methods) if options.methods else step_time_methods()
    results = []
    for problem in problems:
        options.log(f"[{NAME}] {problem.name}: {len(specs)} methods")
        found = memory_by_method(specs, problem, INTERVAL, options.threads, options.log)
        results.append({"problem": problem.name, "description": problem.describe(), "rows": found})
    return {
        "benchmark": NAME,
        "settings": {"quick": options.quick, "interval": INTERVAL, "memory": METHOD_NOTE},
        "environment": environment(options.threads),
        "results": results,
    }


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "–"
    return f"{value / reference:.2f}"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def over_target(data: dict[str, Any]) -> list[str]:
    """``problem/method (what)`` for each two-level method above :data:`TARGET` × KFAC."""
    found = []
    for group in data["results"]:
        rows = group["rows"]
        reference = rows.get(REFERENCE, {})
        for label, row in rows.items():
            if "+" not in label:  # two-level labels are SPACE+COMBINATION
                continue
            for key, what in (("state_mib", "state"), ("peak_mib", "peak")):
                value, base = row.get(key), reference.get(key)
                if value is not None and base and value > TARGET * base:
                    found.append(f"{group['problem']}/{label} ({what} {value / base:.2f}×)")
    return found


def summary_table(data: dict[str, Any]) -> list[str]:
    """Methods × problems, each cell ``state× / peak×`` of KFAC's, bold above the target."""
    problems = [g["problem"] for g in data["results"]]
    labels = list(dict.fromkeys(k for g in data["results"] for k in g["rows"]))
    body = []
    for label in labels:
        if label in ("sgd", "adam", REFERENCE) or label.startswith("kfac:"):
            continue
        cells = [label]
        for group in data["results"]:
            row, base = group["rows"].get(label, {}), group["rows"].get(REFERENCE, {})
            parts = []
            for key in ("state_mib", "peak_mib"):
                text = _ratio(row.get(key), base.get(key))
                over = text != "–" and float(text) > TARGET
                parts.append(f"**{text}**" if over else text)
            cells.append(" / ".join(parts))
        body.append(cells)
    return table(["state× / peak× of KFAC", *problems], body)


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    s = data["settings"]
    lines = [
        *report_header("Memory: peak per step and saved state", NAME, data, s["quick"]),
        f"Every method of the step-time matrix, T = {s['interval']}. Extra peak MiB: "
        f"{s['memory']}. State MiB: `torch.save(optimizer.state_dict())` after those steps. "
        f"× kfac: the ratio to KFAC at its defaults on the same problem.",
        "",
    ]
    above = over_target(data)
    lines += [
        f"{len(above)} (problem, two-level method, state or peak) pairs are above {TARGET}× "
        "KFAC's (bold below). The default two-level configuration (additive, consistent "
        "refresh) keeps no Fisher mini-batch between refreshes, and a Nicolaides basis is "
        "rebuilt on load rather than saved. A-DEF1, A-DEF2 and BALANCED read the "
        "mini-batch at every step: they keep its rows or `W₀ = FR₀ᵀ` (`K` numbers per "
        'parameter), as `kept_fisher="auto"` weighs their size and the build of `W₀` '
        "(`W₀` for the convolutions, whose rows are per location, the rows for the MLPs); "
        "the faithful "
        "residual schedule keeps the rows (its basis changes at every step). The "
        "residual spaces save their basis (one vector per layer: `P` numbers; "
        "Krylov-residual two); a spectral or Krylov-Nicolaides basis is rebuilt on load "
        "when the saved fine level built it (no refresh since: the case here), else "
        "saved.",
        "",
        *summary_table(data),
        "",
    ]
    for group in data["results"]:
        rows = group["rows"]
        reference = rows.get(REFERENCE, {})
        body = [
            [
                label,
                _mib(row.get("peak_mib")),
                _ratio(row.get("peak_mib"), reference.get("peak_mib")),
                _mib(row.get("state_mib")),
                _ratio(row.get("state_mib"), reference.get("state_mib")),
            ]
            for label, row in rows.items()
        ]
        lines += [f"### {group['problem']}: {group['description']}", ""]
        lines += table(["method", "extra peak MiB", "× kfac", "state MiB", "× kfac"], body)
        errors = [f"{k}: {r['memory_error']}" for k, r in rows.items() if r.get("memory_error")]
        if errors:
            lines += ["", "Failed: " + "; ".join(errors)]
        lines.append("")
    return "\n".join(lines)
