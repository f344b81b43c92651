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


def test_a_log_event_with_undecodable_bytes_in_a_path_is_still_valid_utf8_json() -> None:
    stream = io.StringIO()
    log.configure(stream)

    structlog.get_logger().info("copy.special_file_skipped", path="/src/bad\udcff")

    text = stream.getvalue()
    text.encode("utf-8", "strict")  # no lone surrogate left to fail a real stream
    assert json.loads(text)["path"] == "/src/bad\\xff"
