"""Fixtures shared by every test: clean structlog and no leaked threads; and for the tests of
the real daemon, the sources of two apps, a short folder for sockets and a quiet config."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from control_fakes import short_dir
from syncpro.testing import driver, put, write_config

from helpers import TWO_APPS


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for thread in leaked:
        thread.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test leaked threads: {still}"


@pytest.fixture(autouse=True)
def _daemons_only_in_daemon_tests(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep the fast tier honest: a test that starts the daemon through the harness must be
    marked daemon, or `-m "not daemon"` would run it."""
    if request.node.get_closest_marker("daemon") is not None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail(f"{request.node.name} starts the daemon: mark it @pytest.mark.daemon")

    monkeypatch.setattr(driver.Daemon, "__init__", refuse)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """tmp_path with remote sources for server1 (program and config) and web1 (the same),
    laid out for the harness's short dirs (`r/softdir/server1`...)."""
    put(tmp_path / "r/softdir/server1", {"bin/run.sh": "v1\n"})
    put(tmp_path / "r/configuredir/server1", {"app.properties": "node=1\n"})
    put(tmp_path / "r/softdir/web1", {"index.html": "web\n"})
    put(tmp_path / "r/configuredir/web1", {"web.conf": "w\n"})
    return tmp_path


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A fresh folder with a short path, for sockets (108 bytes at most)."""
    with short_dir() as path:
        yield path


@pytest.fixture
def quiet_config(base: Path, run_dir: Path) -> Callable[..., Path]:
    """Write base's config for TWO_APPS (or `apps=`) with the control socket in run_dir and
    settle times so long that nothing syncs by itself but the first catch-up: what a test
    sees, its own requests did. Keyword sections are merged in (`watch=` too)."""

    def write(apps: list[dict[str, Any]] | None = None, **sections: dict[str, Any]) -> Path:
        watch = {"settle": 60, "max_wait": 120, **sections.pop("watch", {})}
        control = {"socket": str(run_dir / "control.sock"), **sections.pop("control", {})}
        return write_config(
            base, TWO_APPS if apps is None else apps, watch=watch, control=control, **sections
        )

    return write
