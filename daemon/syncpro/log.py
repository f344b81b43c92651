"""Configure structlog once: JSON lines off a terminal, readable console output on one."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from syncpro.response import text_safe


def _text_safe(_logger: object, _name: str, event: structlog.typing.EventDict) -> Any:
    # A log line must never fail, nor carry invalid UTF-8, for a file name of odd bytes.
    return text_safe(event)


def configure(stream: TextIO | None = None, *, verbose: bool = False) -> None:
    """Send log events to stream (default stdout): JSON lines unless it is a terminal."""
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
            logging.DEBUG if verbose else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
