"""Ctrl-C during a run: the first one asks the loop to checkpoint and stop, a second aborts."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["interrupt_flag"]


@contextmanager
def interrupt_flag(announce: bool = True) -> Iterator[threading.Event]:
    """A flag that the first SIGINT sets; a second SIGINT raises ``KeyboardInterrupt``.

    Outside the main thread no handler can be installed, and the flag is never set.

    Args:
        announce: Print on stderr that a checkpoint follows (off on all ranks but one of
            a distributed run, which all receive the terminal's SIGINT).

    Yields:
        The flag; the previous SIGINT handler is restored on exit.
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
            print(
                "\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)",
                file=sys.stderr,
            )

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
