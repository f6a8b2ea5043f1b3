"""Outputs of ``tlkfac analyze``: ``analysis.json``, ``details.json``, ``spectra.npz``,
``report.md`` and PNG figures (matplotlib, Agg backend).

Figures: ``methods.png`` (bars per method: cosine to the exact natural gradient and
relative F̂-norm error), ``fisher_blocks.png`` (heatmap of ``log10 ‖F_ij‖_F``),
``spectra.png`` (eigenvalues of ``P F̂``), ``damping_sweep.png``, and with training
``training_loss.png``, ``coarse_gain.png`` (the authors' ``E(β*) − E(0)`` per iteration)
and ``training_metrics.png``; with a run analysed, ``along_run.json`` and the figures of
:mod:`.along_run_report`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from .along_run_report import along_run_markdown, plot_along_run
from .config import AnalyzeConfig
from .formatting import (
    FLOOR,
    FLOOR_NOTE,
    LEGEND_NOTE,
    clean,
    fmt,
    line_style,
    md_table,
    save_figure,
    short_name,
)
from .pipeline import AnalysisOutput


def write_outputs(output: AnalysisOutput, out_dir: str | Path) -> list[Path]:
    """Write every output file of the analysis into ``out_dir``.

    Args:
        output: the result of :func:`~.pipeline.run_analysis`.
        out_dir: the output directory (created).

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    payloads = [("analysis.json", output.methods), ("details.json", output.details)]
    if output.along_run is not None:
        payloads.append(("along_run.json", output.along_run))
    else:  # a stale one from an earlier analysis would be re-rendered by --render-only
        (out / "along_run.json").unlink(missing_ok=True)
    for name, payload in payloads:
        path = out / name
        path.write_text(json.dumps(clean(payload), indent=1) + "\n")
        written.append(path)
    if output.spectra:
        path = out / "spectra.npz"
        arrays: dict[str, Any] = {k: np.asarray(v) for k, v in output.spectra.items()}
        np.savez_compressed(path, **arrays)
        written.append(path)
    return written + render(output, out)


def load_outputs(out_dir: str | Path) -> AnalysisOutput:
    """Read back ``analysis.json``, ``details.json``, ``spectra.npz`` and ``along_run.json``
    of a finished run (to re-render the report and figures without recomputing;
    non-finite numbers come back as ``None``).

    Raises:
        FileNotFoundError: if ``analysis.json`` or ``details.json`` is missing.
    """
    out = Path(out_dir)
    for name in ("analysis.json", "details.json"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} does not exist: run the analysis first")
    methods = json.loads((out / "analysis.json").read_text())
    details = json.loads((out / "details.json").read_text())
    spectra: dict[str, list[float]] = {}
    if (out / "spectra.npz").is_file():
        with np.load(out / "spectra.npz") as archive:
            spectra = {k: archive[k].tolist() for k in archive.files}
    along = out / "along_run.json"
    along_run = json.loads(along.read_text()) if along.is_file() else None
    config = AnalyzeConfig.model_validate(details["config"])
    return AnalysisOutput(config, methods, details, spectra, along_run)


def render(output: AnalysisOutput, out_dir: str | Path) -> list[Path]:
    """Write the figures and ``report.md`` only (the JSON files are left untouched)."""
    out = Path(out_dir)
    figures = plot_all(output, out)
    path = out / "report.md"
    path.write_text(markdown(output, [f.name for f in figures]))
    return [*figures, path]


# ------------------------------------------------------------------ figures
def plot_methods(methods: dict[str, dict[str, Any]], path: Path) -> Path:
    """Horizontal bars: ``cos_to_exact_ng`` and ``energy_error_relative`` per method."""
    names = [n for n in methods if n != "exact"]
    cos = [methods[n]["cos_to_exact_ng"] for n in names]
    energy = [max(methods[n]["energy_error_relative"], FLOOR) for n in names]
    colors = ["tab:green" if "+" not in n else "tab:blue" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.25 * len(names) + 1.5), sharey=True)
    ypos = np.arange(len(names))
    axes[0].barh(ypos, cos, color=colors)
    axes[0].set_xlim(min(0.0, min(cos)), 1.0)
    axes[0].set_xlabel("cosine to exact natural gradient F̂⁻¹g")
    axes[1].barh(ypos, energy, color=colors)
    axes[1].set_xscale("log")
    axes[1].axvline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_xlabel("E(d)/E(0) = ‖d − F̂⁻¹g‖²_F̂ / gᵀF̂⁻¹g  (1 = no better than d = 0)")
    axes[0].set_yticks(ypos, [short_name(n) for n in names], fontsize=7)
    axes[0].invert_yaxis()
    kinds = [
        Patch(color=c, label=k) for c, k in (("tab:green", "one level"), ("tab:blue", "two-level"))
    ]
    axes[0].legend(handles=kinds, fontsize=7, loc="lower right")
    return save_figure(fig, path)


def plot_blocks(fisher: dict[str, Any], path: Path) -> Path:
    """Heatmap of ``log10 ‖F_ij‖_F`` over the layer × layer blocks."""
    norms = np.asarray(fisher["block_norms"])
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    image = ax.imshow(np.log10(np.maximum(norms, 1e-300)), cmap="viridis")
    labels = [f"L{i + 1}" for i in range(norms.shape[0])]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(
        f"log10 ‖F_ij‖_F (off-diag mass {100 * fisher['off_diagonal_fraction']:.0f}%)", fontsize=9
    )
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)


SPECTRUM_PLOT = (
    "exact",
    "block_diagonal",
    "kfac",
    "kfac_pi",
    "kfac_eigen_sum",
    "nicolaides+adef2",
    "residual+adef2",
    "krylov_residual+adef2",
    "tselepidis+adef2",
)


def plot_spectra(spectra: dict[str, list[float]], path: Path) -> Path:
    """Sorted eigenvalues of ``P F̂`` (log scale) for a readable subset of the methods;
    indefinite spectra (a non-positive eigenvalue) cannot be drawn on a log scale and are
    listed in the title instead."""
    fig, ax = plt.subplots(figsize=(6, 4))
    skipped = []
    for i, name in enumerate(n for n in SPECTRUM_PLOT if n in spectra):
        vals = np.asarray(spectra[name])
        if vals.min() <= 0:
            skipped.append(short_name(name))
            continue
        ax.plot(np.linspace(0, 1, len(vals)), vals, label=short_name(name), lw=1, ls="-:"[i % 2])
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (normalised)")
    ax.set_ylabel("eigenvalue of P F̂")
    if skipped:
        ax.set_title(f"indefinite, not shown: {', '.join(skipped)}", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_sweep(sweep: dict[str, dict[str, dict[str, float]]], path: Path) -> Path:
    """Relative energy error per method and relative coarse gain per space vs ``λ``."""
    lams = sorted(sweep, key=float)
    x = [float(v) for v in lams]
    first = sweep[lams[0]]
    methods = [n for n in first if not n.startswith("space:") and n != "exact"]
    methods = [n for n in methods if "+" not in n or n.endswith("+adef2")]
    spaces = [n for n in first if n.startswith("space:")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, name in enumerate(methods):
        ys = [max(sweep[lam][name]["energy_error_relative"], FLOOR) for lam in lams]
        axes[0].plot(x, ys, marker="o", ms=3, label=short_name(name), ls=line_style(i))
    for i, name in enumerate(spaces):
        ys = [max(-sweep[lam][name]["coarse_gain_relative"], FLOOR) for lam in lams]
        label = short_name(name[6:]) + (" (NICO's vectors)" if name == "space:tselepidis" else "")
        axes[1].plot(x, ys, marker="osd^v<>"[i % 7], ms=3, label=label, ls=line_style(i))
    axes[0].set_ylabel("E(d)/E(0)")
    axes[1].set_ylabel("−(E(β*) − E(0)) / E(M⁻¹g)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("damping λ")
        ax.set_title(FLOOR_NOTE, fontsize=7)
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def plot_training(training: dict[str, Any], out: Path) -> list[Path]:
    """Loss per step per run, the coarse gain per iteration, metrics along training."""
    runs = training["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        ax.plot(run["losses"], label=short_name(name), lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("batch loss")
    clip = training.get("kl_clip")
    ax.set_title(
        f"exact-curvature training, lr {training['lr']}, λ {training['damping']}"
        + (f", KL clip {clip}" if clip else ""),
        fontsize=9,
    )
    ax.legend(fontsize=7)
    paths = [save_figure(fig, out / "training_loss.png")]
    run = runs[training["gain_run"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for space, gains in run["coarse_gain_per_step"].items():
        axes[0].plot([max(-g, FLOOR) for g in gains], label=short_name(space), lw=1)
        steps = [c["step"] for c in run["checkpoints"]]
        rel = [max(-c["spaces"][space]["coarse_gain_relative"], FLOOR) for c in run["checkpoints"]]
        axes[1].plot(steps, rel, marker="o", ms=3, label=short_name(space))
    axes[0].set_ylabel("−(E(β*) − E(0))")
    axes[1].set_ylabel("−(E(β*) − E(0)) / E(M⁻¹g)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_title(FLOOR_NOTE, fontsize=7)
        ax.set_xlabel(f"iteration ({short_name(training['gain_run'])} run)")
        ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "coarse_gain.png"))
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(run["checkpoints"][0]["methods"]) if run["checkpoints"] else []
    for i, name in enumerate(names):
        steps = [c["step"] for c in run["checkpoints"]]
        values = [c["methods"][name]["cos_to_exact_ng"] for c in run["checkpoints"]]
        ax.plot(steps, values, marker="o", ms=3, label=short_name(name), ls=line_style(i))
    ax.set_xlabel(f"iteration ({short_name(training['gain_run'])} run)")
    ax.set_ylabel("cosine to exact natural gradient")
    ax.set_title(f"directions at the run's snapshots, λ {training['damping']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines
    paths.append(save_figure(fig, out / "training_metrics.png"))
    return paths


def plot_all(output: AnalysisOutput, out: Path) -> list[Path]:
    """Every figure of the module docstring."""
    details = output.details
    paths = [
        plot_methods(output.methods, out / "methods.png"),
        plot_blocks(details["fisher"], out / "fisher_blocks.png"),
        plot_sweep(details["damping_sweep"], out / "damping_sweep.png"),
    ]
    if output.spectra:
        paths.append(plot_spectra(output.spectra, out / "spectra.png"))
    if details["training"]:
        training = {"kl_clip": output.config.train.kl_clip, **details["training"]}
        paths += plot_training(training, out)
    if output.along_run is not None:
        paths += plot_along_run(output.along_run, out)
    return paths


# ----------------------------------------------------------------- markdown
def _backend_note(details: dict[str, Any]) -> str:
    """One paragraph: how the exact curvature was multiplied, solved and summarised."""
    solver = details.get("solver", {})
    fisher = details["fisher"]
    blocks = fisher.get("block_norms_method", "dense")
    if solver.get("backend", "dense") == "dense":
        return "Backend: dense (`P × P` float64 matrices, every eigenvalue of `P F̂`)."
    exact = solver.get("exact", {})
    steps = details["config"]["matrix_free"]["lanczos_steps"]
    how = {
        "gram": "exactly, from the per-layer Gram matrices of the per-sample gradients",
        "hutchinson": f"estimated with {fisher.get('block_norms_probes')} Rademacher "
        "probes per layer (Hutchinson)",
    }.get(blocks, blocks)
    return (
        "Backend: matrix-free. `F v` by torch.func jvp/vjp "
        f"({solver.get('fisher_vector_products')} products for the main table); `F̂⁻¹g` by "
        f"conjugate gradients ({exact.get('cg_iterations')} iterations, true relative "
        f"residual {fmt(exact.get('cg_relative_residual'))}, tolerance "
        f"{fmt(exact.get('cg_tol'))}); the block-diagonal NG by one CG solve per layer; "
        f"the spectrum of `P F̂` by {steps} Lanczos steps in the F̂-inner product (extreme "
        "Ritz values: the condition numbers are lower bounds; no spectra.png); block norms "
        f"{how}. fvp torch.func vs optimizer statistics: "
        f"{fmt(fisher.get('fvp_func_vs_stats'))}."
    )


def markdown(output: AnalysisOutput, figures: list[str]) -> str:
    """``report.md``: the problem, the per-method table, coarse spaces, sweep, training."""
    d, methods = output.details, output.methods
    p = d["problem"]
    lines = [
        f"# Fisher analysis: {d['name']}",
        "",
        f"{p['num_params']} parameters in {len(p['layers'])} layers, batch {p['batch_size']}, "
        f"likelihood {p['likelihood']}, Fisher `{p['fisher']}`, "
        f"damping λ = {d['config']['damping']} ({d['config']['damping_mode']}), "
        f"step α = {d['config']['step_size']}; loss {p['loss']:.4f}. Off-diagonal share of "
        f"‖F‖²_F: {d['fisher']['off_diagonal_fraction']:.3f}.",
        "",
        _backend_note(d),
        "",
        "## Methods at "
        + (
            f"step {p['state_steps']} of a {p['state_method']} run"
            if p["state_steps"]
            else "initialisation"
        ),
        "",
    ]
    cols = [
        "cos_to_exact_ng",
        "relative_error",
        "energy_error",
        "energy_error_relative",
        "predicted_decrease",
        "actual_decrease",
        "condition_number",
    ]
    lines += md_table(
        ["method", *cols], [[n] + [m.get(c) for c in cols] for n, m in methods.items()]
    )
    lines += ["", "## Coarse spaces", ""]
    scols = [
        "coarse_dim",
        "coarse_gain",
        "coarse_gain_relative",
        "optimizer_energy_gain",
        "off_diagonal_captured",
    ]
    lines += md_table(
        ["space", *scols], [[s] + [v[c] for c in scols] for s, v in d["coarse_spaces"].items()]
    )
    lines += ["", "## Damping sweep (E(d)/E(0))", ""]
    lams = sorted(d["damping_sweep"], key=float)
    names = [n for n in d["damping_sweep"][lams[0]] if not n.startswith("space:")]
    rows = [
        [n] + [d["damping_sweep"][lam][n]["energy_error_relative"] for lam in lams] for n in names
    ]
    lines += md_table(["method", *[f"λ={float(v):g}" for v in lams]], rows)
    if d["training"]:
        lines += ["", "## Training with exact curvature", ""]
        rows = [
            [
                n,
                r["losses"][0] if r["losses"] else None,
                r["losses"][-1] if r["losses"] else None,
                r["eval_losses"][-1] if r["eval_losses"] else None,
                r["diverged"],
            ]
            for n, r in d["training"]["runs"].items()
        ]
        lines += md_table(
            ["method", "first batch loss", "last batch loss", "final eval loss", "non-finite loss"],
            rows,
        )
    if output.along_run is not None and output.along_run["snapshots"]:
        lines += ["", *along_run_markdown(output.along_run)]
    lines += ["", "## Figures", "", LEGEND_NOTE, ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
