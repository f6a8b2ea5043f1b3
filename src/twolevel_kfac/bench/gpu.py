"""``gpu``: the GPU check, run by ``benchmarks/gpu_check.sh`` after the GPU tests.

With ``--device cuda``:

* **Step time** on the MNIST autoencoder (batch 512), cuda-convnet (256) and a ResNet-18
  (128), both on CIFAR-shaped random data, T = 20: SGD, KFAC at its defaults (MC Fisher on
  a quarter of the batch), EKFAC, two-level NICOLAIDES + additive, RESIDUAL + A-DEF2 and
  the authors' faithful RESIDUAL schedule, and, when ASDL is installed, ASDL's KFAC beside
  ours configured to do its work (``ours:asdl``, :mod:`.peers`). Interleaved blocks
  (:mod:`.compare`) timed with ``torch.cuda.synchronize`` before and after each block
  (:func:`.timing.seconds`), and each method's peak CUDA memory over its first steps.
* **bf16 autocast** for every optimizer class: a few steps of a small convnet inside
  ``torch.autocast(device, torch.bfloat16)``, the step outside it as the README says;
  the losses and parameters must stay finite.

With ``--device cpu`` and ``--quick`` (the script's dry run, in ``make test``): the same
code on tiny problems, a check that the script runs, not numbers.
"""

from __future__ import annotations

import importlib.metadata
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from twolevel_kfac.bench.compare import compare, group_table
from twolevel_kfac.bench.methods import MethodSpec, method_spec, runner_for
from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.peers import peer_specs
from twolevel_kfac.bench.problems import PROBLEMS, Problem, mlp_problem
from twolevel_kfac.bench.report import environment, report_header, table
from twolevel_kfac.bench.timing import ratio_stats

__all__ = ["NAME", "measure", "render"]

NAME = "gpu"
PROBLEMS_FULL = ("mnist_ae_512", "cuda_convnet_256", "resnet18_128")
METHODS = (
    "sgd",
    "kfac",
    "ekfac",
    "nicolaides+additive",
    "residual+adef2",
    "residual+additive:faithful",
)
INTERVAL, MIN_BLOCK, REPEATS = 20, 20, 5
QUICK_INTERVAL, QUICK_MIN_BLOCK, QUICK_REPEATS = 2, 2, 1
MEMORY_STEPS = 3
AUTOCAST_STEPS = 4
AUTOCAST_CASES: dict[str, dict[str, Any]] = {
    "KFAC": {},
    "EKFAC": {},
    "KPSVD": {},
    "KFACCorrected": {},
    "TwoLevelKFAC": {},
    "TwoLevelKFAC residual+adef2": {"coarse_space": "residual", "combination": "adef2"},
    "TwoLevelKFAC spectral+balanced": {"coarse_space": "spectral", "combination": "balanced"},
    "KFACPreconditioner + SGD": {},
}


def _problems(quick: bool) -> list[Problem]:
    if not quick:
        return [PROBLEMS[name] for name in PROBLEMS_FULL]
    convnet = PROBLEMS["cuda_convnet_256"]
    tiny_conv = Problem("cuda_convnet_8", convnet.model, 8, convnet.input_shape, convnet.loss,
                        convnet.classes, convnet.model_kwargs)  # fmt: skip
    return [mlp_problem(32, 32, 2), tiny_conv]


def _specs() -> tuple[list[MethodSpec], dict[str, str]]:
    """Our methods, then ASDL's KFAC beside ours configured to do its work (if installed)."""
    specs = [method_spec(label) for label in METHODS]
    peers, skipped = peer_specs(None)
    keep = ("ours:asdl", "asdl:kfac")
    return specs + [s for s in peers if s.label in keep], {
        k: v for k, v in skipped.items() if k == "asdl:kfac"
    }


def peak_cuda_mib(spec: MethodSpec, problem: Problem, interval: int, device: str) -> float | None:
    """Peak CUDA memory (MiB) of ``MEMORY_STEPS`` steps of a fresh model, optimizer and
    batch (``None`` off CUDA)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    runner = runner_for(spec, problem, interval, device=device)
    runner.run(MEMORY_STEPS)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    del runner
    return peak


def _autocast_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    ).to(device)


def _optimizer(label: str, model: nn.Module) -> Any:
    import twolevel_kfac as tk

    kwargs = {"lr": 0.05, "damping": 0.1, "cov_interval": 2, "inv_interval": 2}
    if label == "KFACPreconditioner + SGD":
        pre = tk.KFACPreconditioner(model, damping=0.1)
        sgd = torch.optim.SGD(model.parameters(), lr=0.05)
        return pre, sgd
    cls = getattr(tk, label.split()[0])
    return None, cls(model, **kwargs, **AUTOCAST_CASES[label])


def autocast_check(label: str, device: str) -> dict[str, Any]:
    """``AUTOCAST_STEPS`` steps of ``label`` with the forward and loss under bf16 autocast."""
    model = _autocast_model(device)
    pre, opt = _optimizer(label, model)
    gen = torch.Generator().manual_seed(0)
    losses, error = [], None
    try:
        for _ in range(AUTOCAST_STEPS):
            x = torch.randn(32, 3, 16, 16, generator=gen).to(device)
            y = torch.randint(10, (32,), generator=gen).to(device)
            opt.zero_grad()
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            if pre is not None:
                pre.step()
            opt.step()
            losses.append(float(loss.detach()))
    except Exception as exc:  # reported, not raised: one class failing must not hide others
        error = f"{type(exc).__name__}: {exc}"
    finite = all(math.isfinite(v) for v in losses) and all(
        bool(torch.isfinite(p).all()) for p in model.parameters()
    )
    return {
        "label": label,
        "losses": losses,
        "ok": error is None and finite and len(losses) == AUTOCAST_STEPS,
        "error": error,
    }


def _asdl_version() -> str | None:
    try:
        return "asdfghjkl " + importlib.metadata.version("asdfghjkl")
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return "CPU"


def measure(options: BenchOptions) -> dict[str, Any]:
    """Run the GPU check (module docstring) on ``options.device``.

    Raises:
        RuntimeError: ``--device cuda`` on a machine without CUDA.
    """
    device = options.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: torch sees no CUDA device here")
    quick = options.quick
    interval = QUICK_INTERVAL if quick else INTERVAL
    min_block = QUICK_MIN_BLOCK if quick else MIN_BLOCK
    repeats = options.rounds(REPEATS, QUICK_REPEATS)
    specs, skipped = _specs()
    groups = []
    for problem in _problems(quick):
        memory = {}
        for spec in specs:
            memory[spec.label] = {"peak_cuda_mib": peak_cuda_mib(spec, problem, interval, device)}
        groups.append(
            compare(problem, interval, specs, repeats, min_block, options.log, memory, device)
        )
    checks = [autocast_check(label, device) for label in AUTOCAST_CASES]
    for check in checks:
        options.log(f"[{NAME}] bf16 autocast {check['label']}: {'ok' if check['ok'] else 'FAILED'}")
    return {
        "benchmark": NAME,
        "settings": {
            "quick": quick,
            "device": device,
            "device_name": _device_name(device),
            "interval": interval,
            "repeats": repeats,
            "min_block_steps": min_block,
            "methods": {s.label: s.kwargs for s in specs},
        },
        "skipped": skipped,
        "environment": environment(options.threads),
        "results": groups,
        "autocast": checks,
        "asdl_version": _asdl_version(),
    }


def _asdl_line(group: dict[str, Any]) -> list[str]:
    rows = {r["method"]: r for r in group["rows"]}
    if "ours:asdl" not in rows or "asdl:kfac" not in rows:
        return []
    low, ratio, high = ratio_stats(rows["ours:asdl"]["times_s"], rows["asdl:kfac"]["times_s"])
    return ["", f"ours:asdl / asdl:kfac, paired by round: {ratio:.2f} ({low:.2f}–{high:.2f})."]


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    s = data["settings"]
    lines = [
        *report_header("The GPU check", NAME, data, s["quick"]),
        f"Device: {s['device']} ({s['device_name']}). Step times: interleaved blocks of at "
        f"least {s['min_block_steps']} steps, {s['repeats']} rounds, T = {s['interval']}, "
        "each block timed between two `torch.cuda.synchronize()`; × kfac is KFAC at its "
        "defaults (MC Fisher on a quarter of the batch). Peak CUDA MiB: "
        "`torch.cuda.max_memory_allocated` over a fresh model's first steps (model, batch, "
        "activations and optimizer state). ASDL: "
        + (data.get("asdl_version") or "not installed")
        + ".",
        "",
    ]
    for label, reason in data["skipped"].items():
        lines += [f"**{label} skipped:** {reason}", ""]
    for group in data["results"]:
        lines += group_table(group)
        peaks = [
            f"{r['method']} {r['peak_cuda_mib']:.0f}"
            for r in group["rows"]
            if r.get("peak_cuda_mib") is not None
        ]
        if peaks:
            lines += ["", "Peak CUDA MiB: " + ", ".join(peaks) + "."]
        lines += [*_asdl_line(group), ""]
    lines += ["## bf16 autocast, every optimizer class", ""]
    rows = [
        [
            c["label"],
            "ok" if c["ok"] else "**failed**",
            " → ".join(f"{v:.3f}" for v in c["losses"][:: max(1, len(c["losses"]) - 1)]),
            c["error"] or "",
        ]
        for c in data["autocast"]
    ]
    lines += table(["optimizer", "result", "loss first → last", "error"], rows)
    return "\n".join(lines) + "\n"
