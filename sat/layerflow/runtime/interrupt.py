"""Stopping a run from outside: Ctrl-C (SIGINT) and SIGTERM end it the same way, with one line.

SIGTERM is what a cluster scheduler (or torchrun, passing on a Ctrl-C) sends; while
:func:`sigterm_as_interrupt` is active it raises :class:`Terminated`, a ``KeyboardInterrupt``, so
every ``finally`` and every atomic write unwinds as for Ctrl-C. The entry point then exits with
:func:`exit_status`: 130 for SIGINT, 143 for SIGTERM (128 + the signal number, as a shell reports).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster scheduler stopping the job), handled like Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C for the duration of the block (main thread only; restored afterwards)."""

    def stop(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_status(stop: KeyboardInterrupt) -> int:
    """The exit status for a run stopped by ``stop``: 143 after SIGTERM, 130 after Ctrl-C."""
    return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED
