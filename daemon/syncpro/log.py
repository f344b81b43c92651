"""Configure structlog once: JSON lines off a terminal, readable console output on one."""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any, TextIO

import structlog

from syncpro.engine.response import text_safe


def _text_safe(_logger: object, _name: str, event: structlog.typing.EventDict) -> Any:
    # A log line must never fail, nor carry invalid UTF-8, for a file name of odd bytes.
    return text_safe(event)


def configure(stream: TextIO | None = None, *, verbose: bool = False, quiet: bool = False) -> None:
    """Send log events to stream (default stdout): JSON lines unless it is a terminal.
    `verbose` adds debug events; `quiet` keeps only warnings and errors."""
    stream = stream or sys.stdout
    renderer: structlog.typing.Processor
    if stream.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False, sort_keys=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _text_safe,
            renderer,
        ],
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
        structlog.get_logger().warning(
            "python.warning",
            category=category.__name__,
            message=str(message),
            where=f"{filename}:{lineno}",
        )

    warnings.showwarning = show
