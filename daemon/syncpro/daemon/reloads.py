"""Reloads asked for and done, so that whoever asked can wait for the outcome of theirs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from syncpro.daemon.progress import iso


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    at: float
    """Unix time it ended."""
    error: str | None = None
    pending: bool = False
    """The outcome is not known yet: the server the asker talks to is being restarted."""

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "at": iso(self.at), "error": self.error}


class Reloads:
    """Tickets for reloads. ask() is numbered; a reload covers every ask made before it
    began (it reads the config after them), and its end wakes their waiters."""

    def __init__(self, on_outcome: Callable[[str | None], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._asked = 0
        self._done = 0
        self._released = 0
        self._release_error: str | None = None
        self._error: str | None = None
        self.last: ReloadOutcome | None = None
        self._on_outcome = on_outcome

    def ask(self) -> int:
        """Return the ticket of a reload asked for now."""
        with self._cond:
            self._asked += 1
            return self._asked

    def failed(self, error: str) -> None:
        """Given why the reload under way keeps the old config, remember it for its end."""
        with self._cond:
            self._error = error

    def around(self, reload: Callable[[], bool]) -> Callable[[], bool]:
        """Given the reload function (True when the new config was adopted), return it
        wrapped so that its outcome is recorded and its askers are woken."""

        def run() -> bool:
            with self._cond:
                ticket, self._error = self._asked, None
            error: str | None = "the reload crashed"
            try:
                ok = reload()
                with self._cond:
                    error = None if ok else (self._error or "abandoned: the daemon is stopping")
                return ok
            except Exception as exc:
                error = f"the reload crashed: {type(exc).__name__}: {exc}"
                raise
            finally:
                self._end(ticket, error)

        return run

    def _end(self, ticket: int, error: str | None) -> None:
        with self._cond:
            self.last = ReloadOutcome(error is None, time.time(), error)
            self._done = max(self._done, ticket)
            self._cond.notify_all()
        if self._on_outcome is not None:
            self._on_outcome(error)

    def release_waiters(self, error: str | None = None) -> None:
        """Wake every asker now: the server it is connected through is about to be stopped,
        and would wait for that very asker. Without `error` the outcome is not known yet
        (pending); with one, that is the outcome (the daemon is stopping)."""
        with self._cond:
            self._released = self._asked
            self._release_error = error
            self._cond.notify_all()

    def wait(self, ticket: int, timeout: float) -> ReloadOutcome | None:
        """Given a ticket, return the outcome of the reload that covered it, one with
        `pending` set when the asker was released before the end, None after timeout s."""
        with self._cond:
            finished = self._cond.wait_for(
                lambda: self._done >= ticket or self._released >= ticket, timeout
            )
            if not finished:
                return None
            if self._done >= ticket and self.last is not None:
                return self.last
            if self._release_error is not None:
                return ReloadOutcome(False, time.time(), self._release_error)
            return ReloadOutcome(True, time.time(), None, pending=True)
