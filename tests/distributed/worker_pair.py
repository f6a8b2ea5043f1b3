"""Running a test module's worker on gloo ranks, one process each, and reading the results
each rank saved as ``out / f"rank{r}.pt"``."""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(
    worker: Callable[[int, int, Path], None], out: Path, method: str, world: int = 2
) -> list[Any]:
    """``worker(rank, port, out)`` in ``world`` processes started by ``method`` (``fork``
    or ``spawn``), each given 120 s; every one must exit with 0. The test is skipped where
    ``torch.distributed`` has no gloo, or where ``fork`` is asked and the platform has none
    (spawning re-imports torch: too slow)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if method == "fork" and "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("the workers are forked (spawning re-imports torch: too slow)")
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


@contextmanager
def gloo_group(rank: int, port: int, world: int = 2, **options: Any) -> Iterator[None]:
    """This worker in a gloo group of ``world`` processes on localhost (one torch thread),
    destroyed on the way out (``options``: of ``init_process_group``, e.g. a timeout)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # this child's environment only
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **options
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
