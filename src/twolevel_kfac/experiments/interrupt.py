"""Ctrl-C or SIGTERM during a run (``kill``, ``timeout``, a batch system's preemption, ``docker
stop``): the first one asks the loop to checkpoint and stop, a second aborts."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["interrupt_flag"]


@contextmanager
def interrupt_flag(announce: bool = True) -> Iterator[threading.Event]:
    """A flag that the first SIGINT or SIGTERM sets; a second raises ``KeyboardInterrupt``
    (SIGTERM was not caught before 2026-12-11: a run killed by ``timeout`` kept only its
    last periodic checkpoint, a trial found).

    Outside the main thread no handler can be installed, and the flag is never set.

    Args:
        announce: Print on stderr that a checkpoint follows (off on all ranks but one of
            a distributed run, which all receive the terminal's SIGINT).

    Yields:
        The flag; the previous handlers are restored on exit.
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        if announce:
            what = "interrupt" if signum == signal.SIGINT else "terminate (SIGTERM)"
            print(
                f"\n{what}: saving a checkpoint after this step (again to abort)",
                file=sys.stderr,
            )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
