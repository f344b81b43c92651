"""A durable build writes its data out while it copies: early flushes, and their failures."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncpro.engine import publish as publish_module
from syncpro.engine.buildpool import BuildPool
from syncpro.engine.tree import Ignore, TreeBuilder
from syncpro.engine.writeback import WRITEBACK_BYTES

from helpers import BASE_NS, File, snapshot, write_tree

MIB = 1 << 20


def _builder(*, durable: bool) -> TreeBuilder:
    return TreeBuilder(
        ignore=Ignore(["*.tmp"]),
        reuse=None,
        preserve_owner=os.geteuid() == 0,
        durable=durable,
    )


def _source(tmp_path: Path, size: int) -> Path:
    """Four files of `size` bytes in two folders, and a small one."""
    spec = {f"d{i % 2}/f{i}": File(bytes([i]) * size, mtime_ns=BASE_NS + i) for i in range(4)}
    spec["small"] = File("s\n", mtime_ns=BASE_NS)
    return write_tree(tmp_path / "src", spec)


def _writeback_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "syncpro-writeback"]


@pytest.fixture
def syncfs_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The devices syncfs was called for; each call still flushes for real."""
    calls: list[int] = []
    real = publish_module._syncfs
    assert real is not None

    def counted(fd: int) -> int:
        calls.append(os.fstat(fd).st_dev)
        return int(real(fd))

    monkeypatch.setattr(publish_module, "_syncfs", counted)
    yield calls


def test_a_durable_build_flushes_early_as_it_copies(
    tmp_path: Path, syncfs_calls: list[int]
) -> None:
    # 4 x 6 MiB: past WRITEBACK_BYTES once the third file is copied.
    source = _source(tmp_path, 6 * MIB)
    assert 4 * 6 * MIB > WRITEBACK_BYTES
    builder = _builder(durable=True)

    builder.copy_tree(source, tmp_path / "dst")

    assert snapshot(tmp_path / "dst") == snapshot(source)
    assert builder.writeback is not None and builder.writeback.flushes >= 1
    assert syncfs_calls and set(syncfs_calls) == {os.stat(tmp_path).st_dev}
    assert _writeback_threads() == []  # waited for when the build ended


def test_a_small_or_not_durable_build_flushes_nothing_early(
    tmp_path: Path, syncfs_calls: list[int]
) -> None:
    source = _source(tmp_path, MIB)
    durable = _builder(durable=True)
    durable.copy_tree(source, tmp_path / "small")
    big = _source(tmp_path / "big", 6 * MIB)
    not_durable = _builder(durable=False)
    not_durable.copy_tree(big, tmp_path / "dst")

    assert durable.writeback is not None and durable.writeback.flushes == 0
    assert not_durable.writeback is None
    assert syncfs_calls == []
    assert snapshot(tmp_path / "small") == snapshot(source)
    assert snapshot(tmp_path / "dst") == snapshot(big)


def test_a_failed_early_flush_fails_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel tells a failed writeback to the first syncfs after it only: the final flush
    # of the publish would never hear of it, so the build must fail.
    def failing(fd: int) -> int:
        ctypes.set_errno(errno.EIO)  # what no filesystem here gives on demand
        return -1

    monkeypatch.setattr(publish_module, "_syncfs", failing)
    source = _source(tmp_path, 6 * MIB)
    builder = _builder(durable=True)
    before = set(os.listdir("/proc/self/fd"))

    with pytest.raises(OSError) as caught:
        builder.copy_tree(source, tmp_path / "dst")

    assert caught.value.errno == errno.EIO
    assert builder.writeback is not None and builder.writeback.flushes == 1
    assert _writeback_threads() == []
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_durable_fresh_build_on_a_pool_process_is_exact(tmp_path: Path) -> None:
    source = _source(tmp_path, 6 * MIB)
    pool = BuildPool()
    try:
        builder = _builder(durable=True)
        pool.build(builder, source, tmp_path / "dst", 1)
    finally:
        pool.close()

    assert snapshot(tmp_path / "dst") == snapshot(source)
    assert builder.stats.copied == 5
