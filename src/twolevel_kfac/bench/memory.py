"""Peak memory of a method: the ``ru_maxrss`` delta of a fresh child process.

``tracemalloc`` does not see tensor storage (torch allocates it outside Python's
allocator), and the peak resident set size of the timing process is a running maximum over
every method it has run. So each (problem, method) runs in its own child process, forked
from a ``forkserver`` that has only imported torch and this package (fast, and safe with
OpenMP): the child builds the model and the batch, reads ``resource.getrusage(...).ru_maxrss``,
after one plain forward and backward pass (which loads the kernels, starts autograd's
threads and touches the activations and gradients once) and after the method's first steps
on a tiny stand-in network (which imports what the method imports lazily: PyTorch loads
``torch._dynamo`` when the first optimizer is built, some 60 MiB), then builds the
optimizer, takes ``T + 2`` steps (two refresh steps, the second of which builds its
curvature and coarse basis while the first's are still held, and the step after it) and
reads it again. The reported figure is the difference in MiB: the peak memory a method
needs *beyond a plain forward and backward pass* (its state: momentum, factors,
decompositions, stored Fisher statistics; and its transients). A child that ``spawn``
started would inherit the parent's peak through ``exec`` and report nothing; a
``forkserver`` child starts at the server's small peak.

On Linux the child first sets glibc's ``M_MMAP_THRESHOLD`` to 64 KiB
(:func:`_follow_live_memory`): every larger block (a tensor's storage) is mapped on its
own and unmapped when freed, so the resident set follows the live tensors. With glibc's
defaults it also carries the heap's free space, whose size depends on the order of
allocations and the allocator's trimming heuristics: the same code's peak moved by up to
16 MiB between runs on the MNIST autoencoder (2026-12-03).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import resource
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from twolevel_kfac.bench.methods import MethodSpec, build_runner, runner_for
from twolevel_kfac.bench.problems import Problem

__all__ = ["METHOD_NOTE", "Footprint", "footprint", "state_dict_mib"]

METHOD_NOTE = (
    "extra peak resident memory (ru_maxrss delta, MiB) of a forkserver child over one plain "
    "forward+backward pass, through T + 2 steps (two refreshes): the optimizer's state and "
    "transients (freed tensors unmapped at once: glibc's mmap threshold at 64 KiB)"
)
_PRELOAD = ["torch", "twolevel_kfac.bench.methods"]


def _maxrss_mib() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _follow_live_memory() -> None:
    """Make freed tensors leave the resident set at once (module docstring): glibc's
    ``mallopt(M_MMAP_THRESHOLD, 64 KiB)``, which also stops the threshold from rising after
    a free. Nothing elsewhere (another libc, or none found)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    mmap_threshold = -3  # M_MMAP_THRESHOLD of glibc's <malloc.h>
    libc.mallopt(mmap_threshold, 64 * 1024)


def _stand_in(problem: Problem) -> Problem:
    """A tiny MLP with the loss of ``problem``: runs a method's code once before measuring."""
    out = 3 if problem.classes else 4
    return Problem(
        "stand_in",
        "mlp",
        8,
        (4,),
        problem.loss,
        3 if problem.classes else 0,
        {"sizes": (4, 4, out)},
    )


def _child(
    conn: Connection,
    spec: MethodSpec,
    problem: Problem,
    interval: int,
    steps: int,
    threads: int,
) -> None:
    import torch

    _follow_live_memory()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        runner_for(spec, _stand_in(problem), interval).run(2)  # the method's lazy imports
        model = problem.build_model()
        batch = problem.batch_data()
        problem.loss_fn(model(batch[0]), batch[1]).backward()  # kernels, autograd threads
        model.zero_grad(set_to_none=True)
        before = _maxrss_mib()
        runner = build_runner(spec, model, batch, problem.loss_fn, problem.likelihood, interval)
        runner.run(steps)
        peak = _maxrss_mib() - before
        conn.send(("ok", (peak, state_dict_mib(runner.optimizer))))
    except Exception as error:  # reported to the parent, which records it
        conn.send(("error", repr(error)))
    finally:
        conn.close()


def state_dict_mib(optimizer: Any) -> float | None:
    """MiB of ``torch.save(optimizer.state_dict())`` (``None`` for a peer without one)."""
    import io

    import torch

    if not hasattr(optimizer, "state_dict"):
        return None
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return buffer.tell() / 2**20


@dataclass(frozen=True)
class Footprint:
    """What :func:`footprint` measured: extra peak MiB, ``state_dict`` MiB, or the error."""

    peak_mib: float | None
    state_mib: float | None = None
    error: str | None = None


def footprint(
    spec: MethodSpec,
    problem: Problem,
    interval: int,
    threads: int,
    steps: int | None = None,
    timeout_s: float = 600.0,
) -> Footprint:
    """Peak memory of ``spec`` on ``problem`` (module docstring) and the size of its
    optimizer's saved ``state_dict`` after those steps.

    Args:
        spec: The method.
        problem: The problem (its model and batch are built in the child).
        interval: Refresh interval T of the method.
        threads: torch threads of the child.
        steps: Training steps taken (the first is a refresh step); ``interval + 2`` when
            ``None``, so that the peak includes a second refresh (module docstring).
        timeout_s: Give up after this long.

    Returns:
        The measurements, or the reason the child failed.
    """
    ctx: Any = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    parent, child = ctx.Pipe(duplex=False)
    steps = interval + 2 if steps is None else steps
    process = ctx.Process(target=_child, args=(child, spec, problem, interval, steps, threads))
    process.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            process.kill()
            return Footprint(None, error=f"no answer within {timeout_s:.0f} s")
        status, value = parent.recv()
    except EOFError:
        status, value = "error", f"child exited with status {process.exitcode}"
    finally:
        process.join()
        parent.close()
    if status == "ok":
        peak, state = value
        return Footprint(max(float(peak), 0.0), state)
    return Footprint(None, error=str(value))
