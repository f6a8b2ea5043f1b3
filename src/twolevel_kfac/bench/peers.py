"""``asdl``: ASDL's KFAC (and kfac-pytorch with ``--external PATH``) beside ours and SGD.

Each peer is paired with our KFAC configured to do the same work
(:mod:`twolevel_kfac.bench.external` says what each peer does):

* ``asdl:kfac`` (π-damping, Cholesky inverses, the empirical Fisher of the whole batch,
  no KL clip) beside ``ours:asdl`` = ``tk.KFAC(damping_mode="pi",
  inverse_method="cholesky", fisher="empirical", fisher_batch=1.0, kl_clip=None)``, and
  ``ours:defaults`` = ``tk.KFAC(fisher="empirical", fisher_batch=1.0)``, everything else
  at our defaults (``per_factor``, ``inverse_method="auto"``, KL clip 1e-2), and
  ``ours:asdl:unchecked``, ``ours:asdl`` with ``nonfinite_policy="unchecked"``: ASDL
  reads no gradient for NaN/Inf, ours reads every preconditioned direction once per step
  unless told not to (the one piece of work the two do not share);
* ``kfac_pytorch`` (eigen, damping added to the eigenvalue products, empirical Fisher, KL
  clip with lr²) beside ``ours:kfac_pytorch`` = ``tk.KFAC(damping_mode="eigen_sum",
  fisher="empirical", fisher_batch=1.0, kl_clip_form="lr_squared")``.

Same model, batch, damping (0.1: ASDL's float32 Cholesky of the π-damped CURVES factors
fails at 1e-3, and damping does not change the work), lr (1e-3), momentum 0.9,
running-average weight 0.95 and T (factors and inverses every T steps), all interleaved
with SGD in one process (:mod:`twolevel_kfac.bench.compare`), plus each method's extra
peak memory. A peer that is not available is skipped with the reason in the report (ASDL:
``pip install asdfghjkl`` or the ``bench`` extra; kfac-pytorch: ``--external PATH``).

``--quick``: CURVES only, T ∈ {2, 4}, 3 rounds, no memory probe.
"""

from __future__ import annotations

from typing import Any

from twolevel_kfac.bench import external
from twolevel_kfac.bench.compare import compare, group_table, memory_by_method
from twolevel_kfac.bench.memory import METHOD_NOTE
from twolevel_kfac.bench.methods import MethodSpec, method_spec
from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.problems import select_problems
from twolevel_kfac.bench.report import environment, report_header

__all__ = ["NAME", "measure", "render"]

NAME = "asdl"
PROBLEMS = ("mnist_ae_512", "curves_ae_256", "deep_linear_512", "cuda_convnet_256")
QUICK_PROBLEMS = ("curves_ae_256",)
INTERVALS, QUICK_INTERVALS = (1, 20, 100), (2, 4)
MIN_BLOCK, QUICK_MIN_BLOCK = 10, 2
SHARED = {"lr": 1e-3, "damping": 0.1, "ema_decay": 0.95}
KL_CLIP = 1e-2


AUTHORS_PAIRS = (  # the authors' preconditioner (their combination is additive) and ours
    # their KFAC inverts A + √λI and G + √λI explicitly: our per_factor form, the same
    # step at damping √λ (docs/migrating.md); the timing pairs the work at one λ
    (
        "authors:kfac",
        {"variant": "kfac"},
        "kfac",
        {"damping_mode": "per_factor", "inverse_method": "cholesky"},
    ),
    (
        "authors:nicolaides",
        {"variant": "twolevel", "coarse_space": "nicolaides"},
        "twolevel",
        {"coarse_space": "nicolaides", "combination": "additive"},
    ),
    (
        "authors:residual",
        {"variant": "twolevel", "coarse_space": "residual"},
        "twolevel",
        {"coarse_space": "residual", "combination": "additive", "coarse_refresh": "faithful"},
    ),
)


def authors_specs(checkout: str | None) -> tuple[list[MethodSpec], dict[str, str]]:
    """The authors' KFAC, NICO and RESIDU preconditioners, each after ours configured to
    do its work: the MC Fisher on a quarter of the batch, KL clip without lr², factors and
    inverses every T steps; their KFAC's explicit inverses of the √λ-damped factors (ours:
    ``per_factor`` Cholesky inverses), their two-level eigendecompositions of ``A + λI`` and
    ``G + λI`` (ours: ``per_factor``, ``eigen``) and per-step residual basis
    (``coarse_refresh="faithful"``)."""
    reason = external.authors_status(checkout)
    if reason is not None:
        return [], {"authors": reason}
    shared = {**SHARED, "fisher_batch": 0.25, "kl_clip": KL_CLIP}
    specs = []
    for label, theirs, kind, ours in AUTHORS_PAIRS:
        mine = {**shared, "fisher": "mc", "inverse_method": "eigen", **ours}
        specs += [
            MethodSpec(f"ours:{label}", kind, tuple(mine.items())),
            MethodSpec(label, "authors", tuple({**shared, **theirs, "path": checkout}.items())),
        ]
    return specs, {}


def peer_specs(checkout: str | None) -> tuple[list[MethodSpec], dict[str, str]]:
    """The available peers with their matched configurations of ours, and the reasons
    for the peers left out."""
    specs: list[MethodSpec] = []
    skipped: dict[str, str] = {}
    reason = external.asdl_status()
    if reason is None:
        matched = {
            **SHARED,
            "damping_mode": "pi",
            "inverse_method": "cholesky",
            "fisher": "empirical",
            "fisher_batch": 1.0,
            "kl_clip": None,
        }
        asdl = {**SHARED, "inverse_method": "cholesky", "fisher": "empirical"}
        unchecked = {**matched, "nonfinite_policy": "unchecked"}
        # our defaults with ASDL's Fisher and intervals: per_factor damping, auto inverses
        # (Cholesky here), the KL clip and the non-finite guard on
        defaults = {**SHARED, "fisher": "empirical", "fisher_batch": 1.0}
        specs += [
            MethodSpec("ours:asdl", "kfac", tuple(matched.items())),
            MethodSpec("ours:asdl:unchecked", "kfac", tuple(unchecked.items())),
            MethodSpec("ours:defaults", "kfac", tuple(defaults.items())),
            MethodSpec("asdl:kfac", "asdl", tuple(asdl.items())),
        ]
    else:
        skipped["asdl:kfac"] = reason
    reason = external.kfac_pytorch_status(checkout)
    if reason is None:
        matched = {
            **SHARED,
            "damping_mode": "eigen_sum",
            "fisher": "empirical",
            "fisher_batch": 1.0,
            "kl_clip": KL_CLIP,
            "kl_clip_form": "lr_squared",
        }
        peer = {**SHARED, "kl_clip": KL_CLIP, "fisher": "empirical", "path": checkout}
        specs += [
            MethodSpec("ours:kfac_pytorch", "kfac", tuple(matched.items())),
            MethodSpec("kfac_pytorch", "kfac_pytorch", tuple(peer.items())),
        ]
    else:
        skipped["kfac_pytorch"] = reason
    return specs, skipped


def measure(options: BenchOptions) -> dict[str, Any]:
    """Run the side-by-side (module docstring) and return the JSON document."""
    env = environment(options.threads)
    specs, skipped = peer_specs(options.external)
    more, also_skipped = authors_specs(options.authors)
    specs, skipped = [*specs, *more], {**skipped, **also_skipped}
    for label, reason in skipped.items():
        options.log(f"[{NAME}] skipping {label}: {reason}")
    problems = select_problems(options.problems, QUICK_PROBLEMS if options.quick else PROBLEMS)
    intervals = options.pick(INTERVALS, QUICK_INTERVALS)
    repeats = options.rounds(5, 3)
    min_block = QUICK_MIN_BLOCK if options.quick else MIN_BLOCK
    groups = []
    if specs:
        specs = [method_spec("sgd"), *specs]
        for problem in problems:
            memory = None
            if not options.quick:
                memory = memory_by_method(
                    specs, problem, min(intervals), options.threads, options.log
                )
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
            "shared": SHARED,
            "methods": {s.label: s.kwargs for s in specs},
            "memory": METHOD_NOTE,
        },
        "skipped": skipped,
        "environment": env,
        "results": groups,
    }


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    s = data["settings"]
    lines = [
        *report_header("KFAC of ASDL (and kfac-pytorch) beside ours", "asdl", data, s["quick"]),
        "Each peer runs beside our KFAC configured to do the same work and SGD, interleaved "
        f"in one process ({s['repeats']} rounds of blocks of at least {s['min_block_steps']} "
        "steps, a multiple of T); see `src/twolevel_kfac/bench/peers.py` for the pairing. "
        "× asdl:kfac: median (IQR) of the per-round ratios to ASDL's block of the same round. "
        "Extra peak MiB: " + s["memory"] + ".",
        "",
    ]
    for label, reason in data["skipped"].items():
        lines += [f"**{label} skipped:** {reason}", ""]
    if data["results"]:
        lines += ["Configurations:", ""]
        lines += [f"* `{label}`: {kwargs}" for label, kwargs in s["methods"].items()] + [""]
    for group in data["results"]:
        lines += group_table(group)
    return "\n".join(lines)
