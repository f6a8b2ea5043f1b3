"""The benchmark figures: ratios to SGD per method, scaling curves, loss against wall
time. Each is a bare ``matplotlib.figure.Figure`` (Agg canvas), so no pyplot state or
display is involved."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["interval_curves", "loss_curves", "ratio_bars", "scaling_panels", "target_curves"]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def ratio_bars(groups: Sequence[dict[str, Any]], path: Path) -> Path:
    """Horizontal bars: ratio to SGD (IQR as error bars) per method, one bar per T, with
    the FLOP-floor ratio as a black tick; a method a group did not time has no bar there
    (a document merged from runs with different ``--methods`` per T)."""
    methods = list(dict.fromkeys(r["method"] for g in groups for r in g["rows"]))
    missing = {"ratio_sgd": math.nan, "ratio_q1": math.nan, "ratio_q3": math.nan}
    height = 0.8 / len(groups)
    fig = Figure(figsize=(8, 0.32 * len(methods) * max(1, len(groups) / 2) + 1.5))
    ax = fig.subplots()
    for k, group in enumerate(groups):
        timed = {r["method"]: r for r in group["rows"]}
        rows = [timed.get(m, {**missing, "floor_ratio": math.nan}) for m in methods]
        ys = [i + k * height for i in range(len(methods))]
        ratios = [r["ratio_sgd"] for r in rows]
        errors = [
            [0.0 if math.isnan(r["ratio_sgd"]) else r["ratio_sgd"] - r["ratio_q1"] for r in rows],
            [0.0 if math.isnan(r["ratio_sgd"]) else r["ratio_q3"] - r["ratio_sgd"] for r in rows],
        ]
        ax.barh(
            ys, ratios, height=height, xerr=errors, ecolor="0.3", label=f"T = {group['interval']}"
        )
        floors = [r["floor_ratio"] for r in rows]
        ax.scatter(floors, ys, marker="|", color="red", s=80, zorder=3)
    ax.set_yticks([i + height * (len(groups) - 1) / 2 for i in range(len(methods))], methods)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("step time / SGD step time (red ticks: FLOP floor)")
    ax.set_title(f"{groups[0]['problem']}: {groups[0]['description']}")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def scaling_panels(data: dict[str, Any], path: Path) -> Path:
    """One panel per swept quantity: ratio to SGD of each method (IQR band) and KFAC's
    FLOP floor (dashed)."""
    sweeps = data["sweeps"]
    fig = Figure(figsize=(4.2 * len(sweeps), 3.6))
    axes = fig.subplots(1, len(sweeps), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps, strict=True):
        xs = [point["value"] for point in sweep["points"]]
        for method in sweep["methods"]:
            rows = [point["rows"][method] for point in sweep["points"]]
            (line,) = ax.plot(xs, [r["ratio_sgd"] for r in rows], marker="o", label=method)
            low, high = [r["ratio_q1"] for r in rows], [r["ratio_q3"] for r in rows]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
        floors = [point["kfac_floor_ratio"] for point in sweep["points"]]
        ax.plot(xs, floors, linestyle="--", color="black", label="KFAC FLOP floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(sweep["quantity"])
        ax.set_ylabel("step time / SGD")
        ax.set_title(sweep["title"], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def _loss_axes(ax: Any, xlabel: str, ylabel: str = "train loss") -> None:
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def loss_curves(data: dict[str, Any], path: Path) -> Path:
    """Train loss (epoch mean) against training wall time, per method and seed, with the
    target losses as horizontal lines."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    colours: dict[str, Any] = {}
    for run in data["runs"]:
        kwargs: dict[str, Any] = {"alpha": 0.8}
        if run["method"] in colours:
            kwargs["color"] = colours[run["method"]]
        else:
            kwargs["label"] = run["method"]
        (line,) = ax.plot(run["wall_time_s"], run["train_loss"], **kwargs)
        colours.setdefault(run["method"], line.get_color())
    for target in data["settings"]["targets"]:
        ax.axhline(target, color="grey", linewidth=0.6, linestyle=":")
    _loss_axes(ax, "training wall time (s)", "train loss (epoch mean)")
    ax.set_title(data["settings"]["title"], fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def interval_curves(
    runs: Sequence[dict[str, Any]], settings: Sequence[str], dashed: str, title: str, path: Path
) -> Path:
    """Train loss against wall time and against steps, one colour per setting (one line
    per seed; ``dashed`` drawn dashed): ``tlkfac bench intervals``."""
    fig = Figure(figsize=(11, 4))
    by_time, by_step = fig.subplots(1, 2)
    for k, label in enumerate(settings):
        for j, run in enumerate(r for r in runs if r["setting"] == label):
            style = {"color": f"C{k}", "label": label if j == 0 else None, "lw": 1}
            if label == dashed:
                style["ls"] = "--"
            by_time.plot(run["wall_time_s"], run["train_loss"], **style)
            by_step.plot(run["step"], run["train_loss"], **style)
    _loss_axes(by_time, "training wall time (s)")
    _loss_axes(by_step, "step")
    by_time.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def target_curves(result: dict[str, Any], groups: Sequence[str], title: str, path: Path) -> Path:
    """Train loss against wall time, one colour per ``group`` (``run["library"]``, a line
    per seed), and the target loss: ``tlkfac bench asdl_target``."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for k, group in enumerate(groups):
        for j, run in enumerate(r for r in result["runs"] if r["library"] == group):
            curve = run["curve"]
            losses = [math.nan if p["train_loss"] is None else p["train_loss"] for p in curve]
            ax.plot([p["wall_time_s"] for p in curve], losses,
                    color=f"C{k}", label=group if j == 0 else None)  # fmt: skip
    if result["target"] is not None and math.isfinite(result["target"]):
        ax.axhline(result["target"], color="grey", ls=":", label="target")
    _loss_axes(ax, "training wall time (s)")
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)
