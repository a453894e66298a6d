"""Stopping on SIGTERM (Slurm preemption, ``kill``, torchrun's shutdown) and SIGINT (Ctrl-C) without a traceback.

Outside the training loop (loading, final evaluation, export) a signal raises :class:`Interrupted` at once; the
export is atomic, so nothing half-written is left. Inside the loop, :class:`StopFlag` only records the first signal:
the ranks agree on it in the all-reduce every optimizer step already makes, finish that step, write a resume
checkpoint when ``--save_every`` is on, and stop with :class:`Interrupted` (exit code 128 + signal number: 130 for
SIGINT, 143 for SIGTERM). Further signals while stopping are ignored; SIGKILL still stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal; ``str(e)`` is the one line to print, ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    """``SIGINT``, ``SIGTERM``, ..."""
    return signal.Signals(signum).name


@contextlib.contextmanager
def _handlers(handler) -> Iterator[None]:
    """``handler`` for the stop signals while active (main thread only: signals reach no other), then the old ones."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def signals_raise(what: str = "the run") -> contextlib.AbstractContextManager[None]:
    """While active, SIGINT and SIGTERM raise :class:`Interrupted` (``"<what> was interrupted by SIGINT"``)."""
    def handler(signum, frame):
        raise Interrupted(signum, f"{what} was interrupted by {signal_name(signum)}")

    return _handlers(handler)


class StopFlag:
    """Records the first SIGINT / SIGTERM while :meth:`installed`; the training loop polls :attr:`signum`."""

    def __init__(self):
        self.signum: int | None = None

    def installed(self) -> contextlib.AbstractContextManager[None]:
        """Catch the stop signals into this flag (restoring the previous handlers afterwards)."""
        return _handlers(lambda signum, frame: setattr(self, "signum", self.signum or signum))
