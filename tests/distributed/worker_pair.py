"""Running a test module's worker on gloo ranks, one process each, and reading the results
each rank saved as ``out / f"rank{r}.pt"``."""

from __future__ import annotations

import multiprocessing
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(
    worker: Callable[[int, int, Path], None], out: Path, method: str, world: int = 2
) -> list[Any]:
    """``worker(rank, port, out)`` in ``world`` processes started by ``method`` (``fork``
    or ``spawn``), each given 120 s; every one must exit with 0."""
    ctx = multiprocessing.get_context(method)
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"worker exit codes {codes}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
