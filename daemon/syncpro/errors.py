"""Exceptions for failures a user must act on, one class per condition, and the exit codes."""

from enum import IntEnum


class ExitCode(IntEnum):
    """What `syncpro` exits with; `ctl` and the daemon use the same numbers."""

    OK = 0
    UNSUCCESSFUL = 1  # the sync ran and something was not published
    USAGE = 2  # a usage or config error, or a refused request: nothing ran
    INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
    BROKEN_PIPE = 141  # stdout was closed early (`| head`), as a shell reports SIGPIPE


class SyncproError(Exception):
    """Base of every error syncpro reports to its user."""


class ConfigError(SyncproError):
    """The configuration file is missing, unreadable or invalid."""

    def __init__(self, path: object, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"invalid configuration {self.path}:\n{lines}")


class InventoryError(SyncproError):
    """The inventory of apps could not be loaded (database unreachable, table missing)."""


class RequestError(SyncproError):
    """A sync request could not be parsed or validated; nothing ran."""


class PublishError(SyncproError):
    """A target could not be published; its previous tree is left intact."""


class ControlError(SyncproError):
    """The daemon's control socket could not be reached or refused the request."""


class StartupError(SyncproError):
    """The daemon could not start: a folder, socket or port it needs is not usable."""
