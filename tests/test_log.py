"""Logging: one structured event per thing that happened, whatever emitted it."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator

import pytest
import structlog

from syncpro import log


@pytest.fixture
def restored_showwarning() -> Iterator[None]:
    original = warnings.showwarning
    yield
    warnings.showwarning = original


@pytest.mark.usefixtures("restored_showwarning")
def test_a_python_warning_becomes_one_json_log_event() -> None:
    stream = io.StringIO()
    log.configure(stream)
    log.capture_warnings()

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Callback already exists for watch", RuntimeWarning, stacklevel=1)

    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(events) == 1
    assert events[0]["event"] == "python.warning"
    assert events[0]["category"] == "RuntimeWarning"
    assert events[0]["message"] == "Callback already exists for watch"
    assert events[0]["level"] == "warning"


@pytest.mark.usefixtures("restored_showwarning")
def test_a_long_warning_is_cut_and_watchdogs_double_watch_notice_is_only_debug() -> None:
    stream = io.StringIO()
    log.configure(stream)
    log.capture_warnings()
    repr_of_watches = "Callback with id '1' already exists for watch " + "x" * 150_000
    watchdog_file = "/venv/lib/python3.11/site-packages/watchdog/observers/inotify.py"

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn_explicit("y" * 5000, UserWarning, "/app/lib.py", 7)
        warnings.warn_explicit(repr_of_watches, RuntimeWarning, watchdog_file, 365)

    (event,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert event["level"] == "warning"
    assert event["message"] == "y" * log.WARNING_TEXT_MAX + "... (4000 more characters)"
    stream = io.StringIO()
    log.configure(stream, verbose=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn_explicit(repr_of_watches, RuntimeWarning, watchdog_file, 365)
    (event,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert (event["event"], event["level"]) == ("python.warning", "debug")
    assert len(event["message"]) < 1100


def test_a_log_event_with_undecodable_bytes_in_a_path_is_still_valid_utf8_json() -> None:
    stream = io.StringIO()
    log.configure(stream)

    structlog.get_logger().info("copy.special_file_skipped", path="/src/bad\udcff")

    text = stream.getvalue()
    text.encode("utf-8", "strict")  # no lone surrogate left to fail a real stream
    assert json.loads(text)["path"] == "/src/bad\\xff"
