"""Configure structlog once: JSON lines off a terminal, readable console output on one."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TextIO

from syncpro.engine.response import text_safe

if TYPE_CHECKING:
    import structlog

# structlog itself is imported where it is configured: importing it takes some 0.1 s (it
# brings asyncio along), which `syncpro ctl`, a client run once per request, need not pay.


def _text_safe(_logger: object, _name: str, event: structlog.typing.EventDict) -> Any:
    # A log line must never fail, nor carry invalid UTF-8, for a file name of odd bytes.
    return text_safe(event)


Format = Literal["json", "console"]
FORMATS: tuple[Format, ...] = ("json", "console")

# On a console a value longer than this is summarised: a whole response document in a log line
# buries the event (`--log-format json` keeps every value whole).
_CONSOLE_VALUE_CHARS = 80


def _brief(value: Any) -> Any:
    if not isinstance(value, Mapping | list | tuple):
        return value
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    if len(text) <= _CONSOLE_VALUE_CHARS:
        return text
    if isinstance(value, Mapping):
        return f"<{len(value)} keys>"
    return f"<{len(value)} items>"


def _console_brief(_logger: object, _name: str, event: structlog.typing.EventDict) -> Any:
    return {key: _brief(value) for key, value in event.items()}


def logger() -> Any:
    """structlog's logger, for a module that logs seldom and is also imported by `ctl`."""
    import structlog

    return structlog.get_logger()


def is_terminal(stream: TextIO) -> bool:
    """Given a stream, return whether it is an open terminal."""
    try:
        return stream.isatty()
    except ValueError:  # a closed stream
        return False


def guess_format(stream: TextIO) -> Format:
    """Given the log stream, return "console" for a terminal and "json" otherwise."""
    return "console" if is_terminal(stream) else "json"


def configure(
    stream: TextIO | None = None,
    *,
    verbose: bool = False,
    quiet: bool = False,
    fmt: Format | None = None,
) -> None:
    """Send log events to stream (default stdout): JSON lines unless it is a terminal, or as
    `fmt` says. `verbose` adds debug events; `quiet` keeps only warnings and errors."""
    import structlog

    stream = stream or sys.stdout
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        _text_safe,
    ]
    if (fmt or guess_format(stream)) == "console":
        processors += [_console_brief, structlog.dev.ConsoleRenderer(colors=is_terminal(stream))]
    else:
        processors.append(structlog.processors.JSONRenderer(ensure_ascii=False, sort_keys=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def capture_warnings() -> None:
    """Log Python warnings (a library's, watchdog's) as structured events, not as bare text that
    would break the one-JSON-event-per-line log of the daemon."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = str(message)
        if len(text) > WARNING_TEXT_MAX:
            # watchdog's double-watch warning carries the repr of every watch of the tree:
            # 150 KB on one log line after a 40,000-file tar extraction.
            cut = len(text) - WARNING_TEXT_MAX
            text = f"{text[:WARNING_TEXT_MAX]}... ({cut} more characters)"
        emit = logger().debug if _benign(category, text, filename) else logger().warning
        where = f"{filename}:{lineno}"
        emit("python.warning", category=category.__name__, message=text, where=where)

    warnings.showwarning = show


WARNING_TEXT_MAX = 1000
"""The most of a Python warning's text that one log line carries."""


def _benign(category: type[Warning], text: str, filename: str) -> bool:
    """Whether a warning says nothing an operator could act on: watchdog adding a watch twice
    for a folder made while it was adding the watches of its tree (it keeps one)."""
    return (
        issubclass(category, RuntimeWarning)
        and f"{os.sep}watchdog{os.sep}" in filename
        and text.startswith("Callback with id")
    )
