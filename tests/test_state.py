"""The daemon's persistent state: fingerprints of sources, and what says when they changed."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from syncpro.daemon.state import Record, StateStore, fingerprint
from syncpro.engine.tree import Ignore

from helpers import app, make_config, program_source, wait_until


def test_a_deletion_directly_in_a_source_folder_counts_as_its_newest_arrival(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, [app("server1", "server")])
    source = program_source(config, "server1")
    (source / "lib").mkdir(parents=True)
    (source / "lib/app.jar").write_text("jar\n", encoding="utf-8")
    (source / "old.txt").write_text("old\n", encoding="utf-8")
    server1 = config.config_inventory.by_key()["server1"]
    before = fingerprint(config.dirs, server1, False, Ignore(()))
    assert before is not None
    probe = tmp_path / "probe"
    # File times tick coarsely: let the clock pass everything written so far.
    wait_until(lambda: probe.write_text("x") and probe.stat().st_ctime > before.newest)
    deleted_after = probe.stat().st_ctime
    (source / "old.txt").unlink()
    after = fingerprint(config.dirs, server1, False, Ignore(()))
    assert after is not None
    assert after.digest != before.digest
    # Only the folder's own ctime says when: the deleted file left nothing else behind.
    assert after.newest >= deleted_after


def _filled(directory: Path, rows: int = 2000) -> Path:
    """A state database with rows over many pages, closed; return its path."""
    store = StateStore(directory)
    for i in range(rows):
        store.record(f"app{i:05}", bool(i % 2), f"fingerprint-{i:032}", 1.0)
    store.close()
    assert store.path.stat().st_size > 4 * 4096
    return store.path


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _damage_page_2(path: Path) -> None:
    with path.open("r+b") as db:
        page = int.from_bytes(db.read(18)[16:18], "big")  # the page size, in the header
        db.seek(page)
        db.write(b"\xa5" * page)


@pytest.mark.parametrize(
    "damage", [_truncate, _garbage, _damage_page_2], ids=["truncated", "garbage", "page 2"]
)
def test_a_damaged_state_is_set_aside_and_rebuilt_empty(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    path = _filled(tmp_path)
    damage(path)
    damaged = path.read_bytes()
    with capture_logs() as logs:
        store = StateStore(tmp_path)
    try:
        assert store.resets == 1
        assert not store.in_memory
        # Empty: every app counts as changed.
        assert store.get("app00000", False) is None
        assert store.get("app01999", True) is None
        store.record("server1", False, "abc", 2.0)
        assert store.get("server1", False) == Record("abc", 2.0, None)
    finally:
        store.close()
    aside = [e for e in logs if e["event"] == "state.set_aside"]
    assert len(aside) == 1 and aside[0]["log_level"] == "error"
    assert "rebuilt" in aside[0]["error"]
    kept = Path(aside[0]["moved_to"])
    assert kept.parent == tmp_path and kept.read_bytes() == damaged
    # The rebuilt one opens cleanly next time, with what was recorded since.
    with capture_logs() as logs:
        again = StateStore(tmp_path)
    try:
        assert again.get("server1", False) == Record("abc", 2.0, None)
        assert again.resets == 0
    finally:
        again.close()
    assert [e for e in logs if e["event"].startswith("state.")] == []


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make folder a read-only bind mount of itself for the block: EROFS even for root."""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_damaged_state_on_a_read_only_folder_lives_in_memory(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    _garbage(_filled(directory))
    with read_only(directory), capture_logs() as logs:
        store = StateStore(directory)
        try:
            assert store.in_memory
            store.record("server1", True, "abc", 3.0)
            assert store.get("server1", True) == Record("abc", 3.0, None)
        finally:
            store.close()
    events = [e["event"] for e in logs if e["event"].startswith("state.")]
    assert events[0] == "state.set_aside_failed"
    assert events[-1] == "state.in_memory"


def test_a_state_another_process_holds_is_not_set_aside(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record("server1", False, "before", 1.0)
    operator = sqlite3.connect(store.path, isolation_level=None)
    try:
        operator.execute("BEGIN IMMEDIATE")  # an operator's shell, writing
        with capture_logs() as logs:
            store.record("server1", False, "during", 2.0)
        operator.execute("ROLLBACK")
        assert [e["event"] for e in logs] == ["state.busy"]
        assert store.resets == 0
        assert store.get("server1", False) == Record("before", 1.0, None)
        store.record("server1", False, "after", 3.0)
        assert store.get("server1", False) == Record("after", 3.0, None)
    finally:
        operator.close()
        store.close()
