"""Waking the daemon's main loop from signal handlers and other threads.

A signal handler runs in the main thread between two bytecodes, possibly while that thread is
inside `threading.Event.wait()` and holds the event's lock: an `Event.set()` in the handler
then waits for that lock for ever (a SIGTERM that never stopped the daemon, 1 in ~50 stops
here). A pipe needs no lock: the handler writes a byte, the loop waits on the read end.
"""

from __future__ import annotations

import contextlib
import os
import select


class Wakeup:
    """An event the main loop waits on, set from anywhere: signal handlers included. Its pipe
    lives as long as the process: a thread may still set it while the daemon exits, and a
    closed descriptor's number may be another file's by then."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: wake-ups enough are waiting
            os.write(self._write, b"!")

    def wait(self, timeout: float | None) -> bool:
        """Wait until set, at most `timeout` seconds; return whether it was."""
        ready, _, _ = select.select([self._read], [], [], timeout)
        return bool(ready)

    def clear(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
