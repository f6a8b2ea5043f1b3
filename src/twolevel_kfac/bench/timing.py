"""The timing harness: interleaved blocks of training steps, and their statistics.

Every method trains its own model in the same process. After a warm-up of two steps each
(the first refresh and allocations), the methods take turns: one *block* of ``block``
steps each, ``repeats`` rounds, the order rotated every round so that no method always
runs right after the same other one. With refresh interval T a block is a multiple of T
steps, and any T consecutive steps hold exactly one refresh step, so each block carries
its share of the factor and decomposition work whatever step it starts on.

Denormal floats are flushed to zero while the blocks run (x86 FTZ/DAZ,
``torch.set_flush_denormal``; restored after). Each method trains its own model on one
fixed batch for hundreds of steps, and a method that fits it faster reaches confident
outputs whose tiny output gradients make denormal products first: on the scaling MLP at
batch 32 they slowed KFAC's steps from 16 to 41–52 ms (its matrix products 3.3×, and the
model's own backward). That is an artifact of the benchmark's one batch, which flushing
removes for every method alike.

Statistics: the per-step time of a method is the median over its blocks (with the
interquartile range); its ratio to a baseline is the median over rounds of the ratio of
the two blocks of the same round (paired, so a load change between rounds cancels), with
the interquartile range of those per-round ratios.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from twolevel_kfac.bench.methods import Runner

__all__ = [
    "block_steps",
    "denormals_flushed",
    "interleave",
    "quartiles",
    "ratio_stats",
    "seconds",
    "set_threads",
    "synchronize",
    "timed",
]

WARMUP_STEPS = 2


def set_threads(threads: int | None) -> int:
    """Apply ``--threads`` (``None``: torch's default) and return the count in force."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def block_steps(interval: int, minimum: int) -> int:
    """The smallest multiple of ``interval`` that is at least ``minimum`` steps."""
    return interval * max(1, math.ceil(minimum / interval))


def synchronize() -> None:
    """Wait for the CUDA device's queued work, when CUDA is in use (a no-op otherwise):
    GPU kernels run asynchronously, so a timer must not stop before they finish."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds(runner: Runner, steps: int) -> float:
    """Wall seconds of ``steps`` consecutive steps (all of them; 0 steps take 0 s),
    CUDA work included (:func:`synchronize` before and after)."""
    synchronize()
    start = time.perf_counter()
    runner.run(steps)
    synchronize()
    return time.perf_counter() - start


def timed(runner: Runner, steps: int) -> float:
    """Seconds per step of ``steps`` consecutive steps."""
    return seconds(runner, steps) / steps


def interleave(
    runners: Mapping[str, Runner],
    block: int,
    repeats: int,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per step of each runner's blocks, rounds interleaved.

    Args:
        runners: Label → runner.
        block: Steps per block.
        repeats: Rounds (blocks per runner).
        log: Progress sink (default: stderr).

    Returns:
        Label → ``repeats`` per-step times, in round order.
    """
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    labels = list(runners)
    times: dict[str, list[float]] = {label: [] for label in labels}
    with denormals_flushed():
        for label in labels:
            runners[label].run(WARMUP_STEPS)
        for round_index in range(repeats):
            shift = round_index % len(labels)
            start = time.perf_counter()
            for label in labels[shift:] + labels[:shift]:
                times[label].append(timed(runners[label], block))
            say(f"  round {round_index + 1}/{repeats}: {time.perf_counter() - start:.1f} s")
    return times


@contextmanager
def denormals_flushed() -> Iterator[bool]:
    """Denormal floats flushed to zero inside (module doc); whether the CPU supports it.
    Flushing is off again afterwards (torch's default)."""
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(False)


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` (inclusive method; a single value is all three)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def ratio_stats(times: Sequence[float], base: Sequence[float]) -> tuple[float, float, float]:
    """``quartiles`` of the per-round ratios ``times[r] / base[r]``."""
    return quartiles([t / b for t, b in zip(times, base, strict=True)])
