"""``tables``: an untied embedding table's token factor kept dense (``V × V``, the form of
every table of at most 4096 rows before 2026-12-09) or as the vector of token frequencies
(the default since, :mod:`twolevel_kfac.curvature.token_form`).

The model: a language model of an untied ``nn.Embedding(V, 128)``, a position table of
``T`` rows (called on ``arange(T).expand(B, T)``), a residual ``128 → 512 → 128`` MLP and a
256-way head, batch ``B × T`` tokens, ``tk.KFAC`` at its defaults (``cov_interval =
inv_interval = 10``, MC Fisher, KL clip) and SGD (momentum 0.9) on the same model. Per
``V`` and round, each of SGD, the dense form (built under
:func:`~twolevel_kfac.optim.construction.dense_tables`) and the vector takes ``steps``
steps on a fresh model (the order alternating by round); reported: the median CPU time of
the steady steps (not refreshing, from the third) and of the refresh steps (10, 20, …),
the steady step ÷ SGD's, and ``torch.save(optimizer.state_dict())``'s size.

``--quick``: V = 64 and 300, ``B × T = 4 × 16``, one round of 12 steps.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from twolevel_kfac.bench.options import BenchOptions
from twolevel_kfac.bench.report import environment, report_header, table
from twolevel_kfac.optim.construction import dense_tables

__all__ = ["NAME", "measure", "render"]

NAME = "tables"
ROWS, QUICK_ROWS = (1000, 4096), (64, 300)
WIDTH, HEAD = 128, 256
FORMS = ("sgd", "dense", "vector")


class TableLM(nn.Module):
    """The benchmark's language model (module docstring)."""

    def __init__(self, rows: int, length: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(rows, WIDTH)
        self.positions = nn.Embedding(length, WIDTH)
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, HEAD)

    def forward(self, x: Tensor) -> Tensor:
        where = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        h = self.tokens(x) + self.positions(where)
        return self.head(h + self.down(F.gelu(self.up(h))))


def _optimizer(form: str, model: nn.Module) -> torch.optim.Optimizer:
    if form == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    settings: dict[str, Any] = {"lr": 1e-3, "class_dim": -1, "loss_reduction": "mean"}
    if form == "dense":
        with dense_tables():
            return tk.KFAC(model, **settings)
    return tk.KFAC(model, **settings)


def _run(form: str, rows: int, shape: tuple[int, int], steps: int) -> dict[str, Any]:
    """One optimizer's step times (CPU seconds) and state size on a fresh model."""
    model = TableLM(rows, shape[1])
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, rows, shape, generator=gen)
    y = torch.randint(0, HEAD, shape, generator=gen)
    opt = _optimizer(form, model)
    times = []
    for _ in range(steps):
        start = time.process_time()
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        times.append(time.process_time() - start)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return {
        "steady": [t for i, t in enumerate(times) if i >= 2 and i % 10 != 0],
        "refresh": [t for i, t in enumerate(times) if i > 0 and i % 10 == 0],
        "state_mib": buffer.tell() / 2**20,
    }


def measure(options: BenchOptions) -> dict[str, Any]:
    """Time both forms of the token factor per ``V`` (module docstring)."""
    env = environment(options.threads)
    rounds, steps = options.rounds(5, 1), 12 if options.quick else 21
    shape = (4, 16) if options.quick else (32, 64)
    rows_out = []
    for rows in QUICK_ROWS if options.quick else ROWS:
        options.log(f"[{NAME}] V = {rows}")
        runs: dict[str, list[dict[str, Any]]] = {form: [] for form in FORMS}
        for index in range(rounds):
            for form in FORMS if index % 2 == 0 else FORMS[::-1]:
                runs[form].append(_run(form, rows, shape, steps))
        sgd = statistics.median(t for r in runs["sgd"] for t in r["steady"])
        for form in FORMS[1:]:
            steady = statistics.median(t for r in runs[form] for t in r["steady"])
            refresh = statistics.median(t for r in runs[form] for t in r["refresh"])
            rows_out.append(
                {
                    "rows": rows,
                    "form": form,
                    "steady_s": steady,
                    "refresh_s": refresh,
                    "sgd_s": sgd,
                    "ratio": steady / sgd,
                    "state_mib": runs[form][0]["state_mib"],
                }
            )
    return {
        "benchmark": NAME,
        "settings": {"quick": options.quick, "rounds": rounds, "steps": steps, "shape": shape},
        "environment": env,
        "rows": rows_out,
    }


def render(data: dict[str, Any]) -> str:
    """The markdown report of a ``measure`` document."""
    settings = data["settings"]
    rows = [
        [
            str(r["rows"]),
            r["form"],
            f"{r['steady_s'] * 1e3:.1f}",
            f"{r['ratio']:.2f}",
            f"{r['refresh_s'] * 1e3:.0f}",
            f"{r['state_mib']:.1f}",
        ]
        for r in data["rows"]
    ]
    return "\n".join(
        [
            *report_header("An untied embedding table: dense vs vector token factor", NAME, data),
            f"Batch {settings['shape'][0]} × {settings['shape'][1]} tokens; "
            f"{settings['rounds']} round(s) of {settings['steps']} steps per optimizer; CPU "
            "time medians. `dense`: the table's `G` as a `V × V` matrix (every table of at "
            "most 4096 rows before 2026-12-09); `vector`: its diagonal (the default).",
            "",
            *table(["V", "form", "steady ms", "steady ÷ SGD", "refresh ms", "state MiB"], rows),
        ]
    )
