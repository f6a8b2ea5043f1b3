"""Writing a benchmark's results: ``NAME.json`` (everything measured) and ``NAME.md`` (the
tables), both in the output directory, plus the machine facts every report starts with.

The markdown is rendered from the JSON alone, so ``tlkfac bench NAME --render`` rewrites
it (and the plots) from an existing ``NAME.json`` without measuring again.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "fmt_range", "read_json", "table", "write_json", "write_markdown"]


def environment(threads: int) -> dict[str, Any]:
    """Facts of this machine and process that timings depend on."""
    try:
        load = list(os.getloadavg())
    except OSError:  # not available on this platform
        load = []
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "load_average_1_5_15": load,
    }


def describe_environment(env: dict[str, Any]) -> str:
    """One sentence about ``environment()`` for the top of a report."""
    load = env.get("load_average_1_5_15") or []
    load_text = f", 1-min load average {load[0]:.1f} at the start" if load else ""
    return (
        f"torch {env['torch']}, Python {env['python']}, {env['cpus']} CPUs ({env['machine']}), "
        f"{env['threads']} torch thread(s){load_text}."
    )


def fmt_range(median: float, low: float, high: float, digits: int = 2) -> str:
    """``median (low–high)``."""
    return f"{median:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def write_json(out: Path, name: str, data: dict[str, Any]) -> Path:
    """Write ``out/NAME.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write_markdown(out: Path, name: str, text: str) -> Path:
    """Write ``out/NAME.md``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    return path


def read_json(out: Path, name: str) -> dict[str, Any]:
    """Read ``out/NAME.json``.

    Raises:
        FileNotFoundError: It does not exist (with the command that makes it).
    """
    path = out / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `tlkfac bench {name} --out {out}`")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
