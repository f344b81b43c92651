"""The environment variables syncpro reads, in one place: each name and what it is for.

The modules that read them name them from here where the layers allow it; a test keeps this
list and the source in step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name and a one-line meaning."""

    name: str
    doc: str


CONFIG = Variable("SYNCPRO_CONFIG", "the config file when --config is not given")
DB_PASSWORD = Variable(
    "SYNCPRO_DB_PASSWORD",
    "the inventory database's password, when neither inventory.url nor"
    " inventory.password_file gives one",
)
WATCH_POLLING = Variable(
    "SYNCPRO_WATCH_POLLING", "1: watch by polling every watch.poll_interval, not inotify"
)
STOP_TIMEOUT = Variable(
    "SYNCPRO_STOP_TIMEOUT", "seconds shutdown waits for running syncs (default 30)"
)

VARIABLES = (CONFIG, DB_PASSWORD, WATCH_POLLING, STOP_TIMEOUT)
