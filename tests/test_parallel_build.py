"""Builds whose big files go to the file pool, and builds sharing one flush of their filesystem."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from syncpro.config.model import DEFAULT_IGNORE
from syncpro.engine import publish
from syncpro.engine.publish import FlushBarrier
from syncpro.engine.tree import POOL_MIN_AVERAGE, Ignore, TreeBuilder

from helpers import BASE_NS, Dir, File, Symlink, snapshot, wait_until, write_tree


def _builder(reuse: Path | None = None, progress: Any = None) -> TreeBuilder:
    return TreeBuilder(
        ignore=Ignore(DEFAULT_IGNORE),
        reuse=reuse,
        preserve_owner=os.geteuid() == 0,
        progress=progress,
    )


FILES = 72


def _big(tmp_path: Path) -> Path:
    """A tree of FILES files, big enough on average for the file pool, in 36 folders; small
    files, a symlink and a file with three names beside them, which the walking thread makes."""
    spec: dict[str, Any] = {}
    for i in range(FILES):
        spec[f"d{i % 12}/sub{i % 3}/f{i:04d}"] = File(
            bytes([i]) * (POOL_MIN_AVERAGE + i * 997),
            mode=0o600 + (i % 8) * 0o10,
            mtime_ns=BASE_NS + i,
        )
    spec["d0/link"] = Symlink("sub0/f0000")
    spec["d1/ro"] = Dir(mode=0o555, mtime_ns=BASE_NS + 7)
    spec["d2"] = Dir(mode=0o750, mtime_ns=BASE_NS + 8)
    spec["small/a"] = File("a\n", mtime_ns=BASE_NS + 9)
    spec["small/b"] = File("b\n", mode=0o640, mtime_ns=BASE_NS + 10)
    source = write_tree(tmp_path / "src", spec)
    # One file with names in three folders: the copy must link them, never copy twice.
    os.link(source / "d3/sub0/f0003", source / "d4/twin")
    os.link(source / "d3/sub0/f0003", source / "d11/sub2/twin")
    return source


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_big_files_are_copied_on_the_file_pool_and_small_ones_inline(tmp_path: Path) -> None:
    source = _big(tmp_path)
    threads: dict[int, set[str]] = {}
    lock = threading.Lock()

    def progress(event: str, files: int, size: int) -> None:
        if event == "copied":
            with lock:
                threads.setdefault(size, set()).add(threading.current_thread().name)

    builder = _builder(progress=progress)
    before = _open_fds()
    builder.copy_tree(source, tmp_path / "dst")

    assert snapshot(tmp_path / "dst") == snapshot(source)
    dst = tmp_path / "dst"
    twins = {os.lstat(p).st_ino for p in (dst / "d3/sub0/f0003", dst / "d4/twin")}
    assert twins == {os.lstat(dst / "d11/sub2/twin").st_ino}
    assert builder.stats.files == FILES + 4
    assert builder.stats.copied == FILES + 2
    assert builder.stats.hardlinks == 2
    assert builder.stats.symlinks == 1
    assert len(builder.written) == builder.stats.copied
    big = set().union(*(names for size, names in threads.items() if size >= POOL_MIN_AVERAGE))
    assert any(name.startswith("syncpro-files") for name in big), threads
    # Small files (and every name of a file with several) are made by the walking thread.
    assert threads[2] == {threading.current_thread().name}
    assert _open_fds() == before


def test_a_big_rebuild_links_what_is_unchanged_and_copies_the_rest(tmp_path: Path) -> None:
    source = _big(tmp_path)
    first = _builder()
    first.copy_tree(source, tmp_path / "pub")
    for i in range(0, FILES, 2):  # half the files change: the pool copies them
        path = source / f"d{i % 12}/sub{i % 3}/f{i:04d}"
        path.write_bytes(b"new" * POOL_MIN_AVERAGE)
        os.utime(path, ns=(BASE_NS, BASE_NS + 10**9 + i))

    second = _builder(reuse=tmp_path / "pub")
    second.copy_tree(source, tmp_path / "dst", second.plan(source, first.manifest))

    assert snapshot(tmp_path / "dst") == snapshot(source)
    assert second.stats.copied == FILES // 2
    # The unchanged half and the twins' three names, of which the first is linked from the
    # published tree and the others to it.
    assert second.stats.linked + second.stats.hardlinks == FILES // 2 + 4
    assert second.stats.hardlinks == 2
    assert second.manifest is not None
    assert len(second.manifest.entries) > FILES


def test_a_file_failing_in_a_pool_job_fails_the_build_and_leaks_nothing(tmp_path: Path) -> None:
    source = _big(tmp_path)
    builder = _builder()
    plan = builder.plan(source)
    # Replaced after the walk: the copy must refuse a folder where the walk saw a file.
    victim = source / "d5/sub2/f0005"
    victim.unlink()
    victim.mkdir()
    before = _open_fds()

    with pytest.raises(OSError, match="replaced"):
        builder.copy_tree(source, tmp_path / "dst", plan)

    assert _open_fds() == before
    # The conftest's thread check proves the pool's threads ended with the build.


def _late_callers_of_a_held_flush(
    barrier: FlushBarrier,
    first: Callable[[], None],
    late: list[Callable[[], None]],
    *,
    held: Callable[[], bool],
    release: threading.Event,
) -> None:
    """Run `first` on a thread until its flush is running and `held`; then each of `late` on
    a thread until all wait on the barrier; then release the held flush and join them all."""
    first_thread = threading.Thread(target=first)
    first_thread.start()
    wait_until(held)
    threads = [threading.Thread(target=call) for call in late]
    for thread in threads:
        thread.start()
    wait_until(lambda: barrier.waiting == len(late))
    release.set()
    for thread in (first_thread, *threads):
        thread.join(30)


def test_callers_arriving_during_a_flush_share_the_next_one(tmp_path: Path) -> None:
    real = publish.syncfs_or_sync
    release = threading.Event()
    started: list[float] = []

    def held_syncfs(fd: int) -> None:
        started.append(time.monotonic())
        if len(started) == 1:
            assert release.wait(30), "the first flush was never released"
        real(fd)  # the real syncfs, once let through

    barrier = FlushBarrier(held_syncfs)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    called: dict[int, float] = {}

    def late(i: int) -> None:
        called[i] = time.monotonic()
        barrier.flush(fd)

    try:
        _late_callers_of_a_held_flush(
            barrier,
            lambda: barrier.flush(fd),
            [functools.partial(late, i) for i in range(5)],
            held=lambda: bool(started),
            release=release,
        )
    finally:
        os.close(fd)

    # Five callers that came while the first flush ran are served by one more, which began
    # after each of them called: two syncfs in all, not six.
    assert barrier.flushes == 2
    assert len(started) == 2
    assert all(started[1] >= at for at in called.values())


def test_publishes_into_one_folder_share_its_barrier(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    same = publish.barrier_of("fsync", os.stat(tmp_path))
    assert publish.barrier_of("fsync", os.stat(tmp_path)) is same
    assert publish.barrier_of("fsync", os.stat(tmp_path / "a")) is not same
    assert publish.barrier_of("syncfs", os.stat(tmp_path)) is publish.barrier_of(
        "syncfs", os.stat(tmp_path / "a")
    )


def test_a_failed_flush_fails_every_caller_it_was_to_serve(tmp_path: Path) -> None:
    release = threading.Event()
    calls: list[int] = []

    def failing(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            assert release.wait(30), "the first flush was never released"
            return
        raise OSError(5, "Input/output error", "the disk")

    barrier = FlushBarrier(failing)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    outcomes: dict[int, str] = {}

    def caller(i: int) -> None:
        try:
            barrier.flush(fd)
        except OSError as exc:
            outcomes[i] = f"failed: {exc.strerror}"
        else:
            outcomes[i] = "ok"

    try:
        _late_callers_of_a_held_flush(
            barrier,
            functools.partial(caller, 0),
            [functools.partial(caller, i) for i in (1, 2, 3)],
            held=lambda: bool(calls),
            release=release,
        )
    finally:
        os.close(fd)

    # The first flush succeeded for its caller; the one shared by the three late callers
    # failed, and none of them may believe its data is on disk.
    assert outcomes == {
        0: "ok",
        1: "failed: Input/output error",
        2: "failed: Input/output error",
        3: "failed: Input/output error",
    }
    assert barrier.flushes == 2
