"""Starting the processes of a data-parallel run: ``tlkfac run CONFIG --nproc N``.

:func:`train_parallel` picks one of three ways; the training itself is always
:func:`~twolevel_kfac.experiments.runner.train_run`, which trains on the ranks of an
initialised ``torch.distributed`` group together (the conventions of
:mod:`twolevel_kfac.experiments.parallel`):

* **Under a launcher** (``RANK`` and ``WORLD_SIZE`` in the environment: ``torchrun``, or
  ``srun`` with ``MASTER_ADDR``/``MASTER_PORT`` set): this process is one rank; it joins
  the group (``init_method="env://"``) and trains. ``--nproc`` may be left out, or must
  equal ``WORLD_SIZE``.
* **``--nproc N``, N > 1**: N local worker processes (``torch.multiprocessing``, start
  method ``spawn``: fresh interpreters; ``$TLKFAC_START_METHOD`` may name ``fork`` or
  ``forkserver``) meet through a ``FileStore`` in a temporary directory (no port to pick,
  so no race for one) and train; each uses ``--threads`` intra-op threads, by default the
  cores divided by N. The parent waits; the first worker that fails has its error
  re-raised in the parent (same type and message, so the CLI prints ``error: …``) after
  the others are stopped. Ctrl-C reaches every worker (one process group): they agree to
  checkpoint and stop; a second Ctrl-C aborts.
* **Otherwise** (``--nproc 1`` or none): ``train_run`` in this process.

Device and backend (:mod:`twolevel_kfac.experiments.device`): each rank resolves
``problem.device`` (``--device``) for its local rank: on the CPU the group is gloo; on GPUs
rank ``r`` of a machine uses ``cuda:r`` (``torch.cuda.set_device``) and the group is
``"cpu:gloo,cuda:nccl"`` (NCCL for CUDA tensors). A device that cannot serve ``--nproc N``
processes (no GPU, fewer GPUs than processes, or a backend this torch lacks) is refused
before any worker starts.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException

from twolevel_kfac.experiments.config import ExperimentConfig
from twolevel_kfac.experiments.device import backend_for, resolve_device
from twolevel_kfac.experiments.metrics import read_metrics
from twolevel_kfac.experiments.parallel import Parallel
from twolevel_kfac.experiments.runner import RunResult, train_run

__all__ = ["START_METHODS", "launcher_world_size", "train_parallel"]

START_METHODS = ("spawn", "fork", "forkserver")


@dataclass(frozen=True)
class _Job:
    """What every worker needs to train its rank (picklable, sent to spawned workers)."""

    config: ExperimentConfig
    run_dir: Path
    resume: bool
    max_steps: int | None
    progress: bool
    data_dir: str | Path | None
    threads: int | None


def launcher_world_size() -> int | None:
    """``WORLD_SIZE`` when a launcher (torchrun, SLURM) started this process as one rank
    (``RANK`` and ``WORLD_SIZE`` set), else ``None``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def train_parallel(
    config: ExperimentConfig,
    run_dir: str | Path,
    nproc: int | None = None,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    data_dir: str | Path | None = None,
    threads: int | None = None,
) -> RunResult | None:
    """Train a single-run config on ``nproc`` processes (see the module docstring).

    Args:
        config: A config with one method and one seed (``ExperimentConfig.for_run``).
        run_dir: Output directory; rank 0 alone writes it.
        nproc: Local processes to start; ``None``: one, or the launcher's world size.
        resume: Continue from the run directory's checkpoint (as for ``train_run``).
        max_steps: Stop after this many steps (as for ``train_run``).
        progress: Show progress bars (as for ``train_run``).
        data_dir: Where the data sets are (as for ``train_run``).
        threads: Intra-op threads per spawned worker (default: cores / ``nproc``).

    Returns:
        The run's outcome, ``None`` on the ranks other than 0 under a launcher.

    Raises:
        ValueError: ``nproc`` < 1, more processes than rows in a batch, ``nproc`` not the
            launcher's world size, or anything ``train_run`` raises on a worker.
        KeyboardInterrupt: the workers were aborted (a second Ctrl-C).
    """
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc must be at least 1; got {nproc}")
    job = _Job(config, Path(run_dir), resume, max_steps, progress, data_dir, threads)
    world = launcher_world_size()
    if world is not None and world > 1:
        if nproc is not None and nproc != world:
            raise ValueError(
                f"--nproc {nproc}, but a launcher (torchrun/SLURM) started this process as "
                f"one of WORLD_SIZE={world}; leave --nproc out under a launcher"
            )
        return _train_rank(job, int(os.environ["RANK"]), world, "env://")
    if nproc is None or nproc == 1:
        return train_run(
            config,
            run_dir,
            resume=resume,
            max_steps=max_steps,
            progress=progress,
            data_dir=data_dir,
        )
    _check_distributed(config, nproc)
    batch = config.problem.batch_size  # the last batch is checked once the data are loaded
    Parallel(0, nproc).check_split(batch, batch)
    return _spawn(job, nproc)


def _check_distributed(config: ExperimentConfig, nproc: int) -> None:
    """Refuse a device that cannot serve ``nproc`` local processes, or a torch without the
    backend(s) for it; warn of more CPU processes than cores."""
    device = resolve_device(config.problem.device, 0, nproc)
    backend = backend_for(device)
    cores = os.cpu_count() or 1
    if nproc > cores and device.type == "cpu":
        warnings.warn(
            f"--nproc {nproc} on {cores} CPU core(s): the processes share them (one thread "
            "each), so the run is slower than on fewer processes",
            RuntimeWarning,
            stacklevel=3,
        )
    available = dist.is_available() and dist.is_gloo_available()
    if "nccl" in backend:
        available = available and dist.is_nccl_available()
    if not available:
        raise ValueError(
            f"--nproc {nproc} needs torch.distributed with the backend {backend!r}, which "
            "this torch build lacks"
        )


def _train_rank(job: _Job, rank: int, world_size: int, init_method: str) -> RunResult | None:
    """Join the group as ``rank`` (on its device), train, leave; rank 0's result (``None``
    elsewhere)."""
    device = resolve_device(job.config.problem.device, rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and DDP use the current device
    backend = backend_for(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    try:
        result = train_run(
            job.config,
            job.run_dir,
            resume=job.resume,
            max_steps=job.max_steps,
            progress=job.progress and rank == 0,
            data_dir=job.data_dir,
        )
    finally:
        dist.destroy_process_group()
    return result if rank == 0 else None


# ------------------------------------------------------------------ local workers
def _worker(rank: int, job: _Job, world_size: int, rendezvous: Path) -> None:
    """One spawned rank: train, then leave its outcome in ``rendezvous/rank<r>.pickle``."""
    torch.set_num_threads(job.threads or max(1, (os.cpu_count() or 1) // world_size))
    outcome: tuple[str, float, Any]
    try:
        result = _train_rank(job, rank, world_size, f"file://{rendezvous / 'store'}")
        outcome = ("done", time.time(), _summary(result))
    except Exception as error:
        outcome = ("error", time.time(), _portable(error))
    # atomically: the parent may read the folder while another rank is still failing
    partial = rendezvous / f"rank{rank}.pickle.partial"
    partial.write_bytes(pickle.dumps(outcome))
    partial.replace(rendezvous / f"rank{rank}.pickle")
    _leave(1 if outcome[0] == "error" else 0)  # on 1, the parent stops the other workers


def _leave(code: int) -> NoReturn:
    """End this worker with ``code`` now, without the interpreter's finalization.

    Its work is done and on disk, so nothing is lost; finalizing could lose it the exit
    code: in 3 of 60 interrupted two-rank spawn runs, a C++ thread of torch's gloo
    backend called ``std::terminate`` while the interpreter tore down ("terminate called without
    an active exception", SIGABRT), after ``destroy_process_group`` and the outcome file.
    A forked worker always ends this way (``multiprocessing`` calls ``os._exit``).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _summary(result: RunResult | None) -> tuple[bool, bool, str, int] | None:
    if result is None:
        return None
    return result.finished, result.interrupted, result.stop_reason, result.step


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling, else a ``RuntimeError`` with its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _start_method() -> str:
    method = os.environ.get("TLKFAC_START_METHOD", "spawn")
    if method not in START_METHODS:
        raise ValueError(f"TLKFAC_START_METHOD={method!r}; allowed: {list(START_METHODS)}")
    return method


def _spawn(job: _Job, nproc: int) -> RunResult:
    """Run ``nproc`` local workers to the end; rank 0's result, or the first error.

    Raises:
        Exception: the first error a worker raised (its own type, e.g. ``ValueError``).
        KeyboardInterrupt: the workers were aborted (a second Ctrl-C).
    """
    # its "Terminating process … via signal SIGTERM" after a worker's error is expected here
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    rendezvous = Path(tempfile.mkdtemp(prefix="tlkfac-run-"))
    try:
        context = torch.multiprocessing.start_processes(
            _worker,
            args=(job, nproc, rendezvous),
            nprocs=nproc,
            join=False,
            start_method=_start_method(),
        )
        try:
            with _first_interrupt_passed_on(context.processes):
                while not context.join():
                    pass
        except ProcessException as failure:
            raise _first_error(rendezvous) or RuntimeError(_told(failure)) from None
        except KeyboardInterrupt:
            for process in context.processes:
                process.terminate()
            raise
        outcome = _read_outcome(rendezvous / "rank0.pickle")
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)
    if outcome is None or outcome[0] != "done":
        raise KeyboardInterrupt  # the workers left without a result: aborted
    finished, interrupted, stop_reason, step = outcome[2]
    records = read_metrics(job.run_dir / "metrics.jsonl")
    return RunResult(job.run_dir, records, finished, interrupted, stop_reason, step)


def _told(failure: ProcessException) -> str:
    """What a worker's death without a reported error says, with the likely cause of a
    SIGKILL: the system out of memory (each worker holds the model and the data)."""
    text = str(failure).strip()
    if getattr(failure, "signal_name", None) == "SIGKILL":
        text += (
            ": most likely the system, out of memory (each of the --nproc processes holds its "
            "own model, optimizer and data set); run fewer processes"
        )
    return text


def _read_outcome(path: Path) -> tuple[str, float, Any] | None:
    if not path.is_file():
        return None
    outcome: tuple[str, float, Any] = pickle.loads(path.read_bytes())  # our own file
    return outcome


def _first_error(rendezvous: Path) -> Exception | None:
    """The earliest error any worker reported (the others are usually its echoes)."""
    outcomes = [_read_outcome(p) for p in rendezvous.glob("rank*.pickle")]
    errors = [o for o in outcomes if o is not None and o[0] == "error"]
    return min(errors, key=lambda o: o[1])[2] if errors else None


@contextmanager
def _first_interrupt_passed_on(processes: list[Any]) -> Iterator[None]:
    """While the workers run: Ctrl-C reaches them too (they checkpoint and stop), so the
    parent ignores the first one; a SIGTERM, sent to the parent alone (``timeout``, a batch
    system), is passed on to them; a second of either raises ``KeyboardInterrupt``."""
    presses = [0]

    def handler(signum: int, frame: object) -> None:
        presses[0] += 1
        if presses[0] > 1:
            raise KeyboardInterrupt
        if signum == signal.SIGTERM:
            for process in processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGTERM)

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handler
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
