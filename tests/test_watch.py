"""The watcher with real inotify on a real tree: which events are changes, which are an upload's
temporaries, and which are nothing at all."""

from __future__ import annotations

import os
import queue
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from syncpro.config.model import DEFAULT_IGNORE
from syncpro.daemon.routing import source_root_in
from syncpro.daemon.watch import DONE, TOUCHED, WRITING, Watcher
from syncpro.engine.tree import Ignore

from helpers import make_config, wait_until

WAIT = 10.0


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, queue.Queue[tuple[str, str]]]]:
    config = make_config(tmp_path, [], extra={"watch": {"ignore": ["logs/*", "tmp/*/*"]}})
    dirs = config.dirs
    source = dirs.remotecomdir / "softdir" / "server1"
    source.mkdir(parents=True)
    # Nested folders made before watching: watchdog 7.1 warns about a doubled watch when a
    # tree is made faster than it adds watches, and this suite turns warnings into errors.
    (source / "tmp/a/b/c").mkdir(parents=True)
    seen: queue.Queue[tuple[str, str]] = queue.Queue()

    def rel(path: str) -> str:
        return str(Path(path).relative_to(source))

    watcher = Watcher(
        [dirs.remotecomdir],
        ignore=Ignore(config.watch.ignore),
        on_change=lambda path: seen.put(("change", rel(path))),
        on_temporary=lambda path, state: seen.put((state, rel(path))),
        on_trouble=lambda reason: seen.put(("trouble", reason)),
        source_root_of=lambda path: source_root_in(dirs, path),
    )
    with watcher:
        yield source, seen


def until_change(seen: queue.Queue[tuple[str, str]], rel: str) -> list[tuple[str, str]]:
    """Every event up to the first change of rel: inotify keeps the order of one tree."""
    events = []
    while True:
        event = seen.get(timeout=WAIT)
        events.append(event)
        if event == ("change", rel):
            return events


def until_event(
    seen: queue.Queue[tuple[str, str]], wanted: tuple[str, str]
) -> list[tuple[str, str]]:
    """Every event up to the first that is `wanted`."""
    events = []
    while True:
        event = seen.get(timeout=WAIT)
        events.append(event)
        if event == wanted:
            return events


def test_user_patterns_come_on_top_of_the_defaults(tmp_path: Path) -> None:
    config = make_config(tmp_path, [], extra={"watch": {"ignore": ["*.bak", "*.part"]}})
    assert config.watch.ignore == (*DEFAULT_IGNORE, "*.bak")


def test_an_rsync_temporary_is_written_then_done_and_its_rename_is_the_change(
    watched: tuple[Path, queue.Queue[tuple[str, str]]],
) -> None:
    source, seen = watched
    temporary = source / ".run.sh.AbC123"
    temporary.write_text("whole\n", encoding="utf-8")
    temporary.rename(source / "run.sh")
    events = until_change(seen, "run.sh")
    states = [state for state, path in events if path == ".run.sh.AbC123"]
    assert states[0] == WRITING
    assert DONE in states
    assert set(states) <= {WRITING, DONE, TOUCHED}
    assert [e for e in events if e[0] == "change"] == [("change", "run.sh")]


def test_path_globs_are_matched_under_the_source_root_and_never_reported(
    watched: tuple[Path, queue.Queue[tuple[str, str]]],
) -> None:
    source, seen = watched
    (source / "logs").mkdir()
    (source / "logs/app.log").write_text("line\n", encoding="utf-8")
    os.utime(source / "logs/app.log")
    # tmp/*/* leaves out what lies two levels down, and so the whole tree of tmp/a/b.
    (source / "tmp/a/b/c/x").write_text("x\n", encoding="utf-8")
    (source / "tmp/a/b/y").write_text("y\n", encoding="utf-8")
    (source / "tmp/new").mkdir()
    (source / "tmp/new/z").write_text("z\n", encoding="utf-8")
    (source / "real.txt").write_text("r\n", encoding="utf-8")
    events = until_change(seen, "real.txt")
    assert [e for e in events if e[1].startswith(("logs/", "tmp/a/", "tmp/new/"))] == []
    # The folders themselves are published, so they count.
    assert {("change", "logs"), ("change", "tmp/new")} <= set(events)


# The tree below the root made again is made faster than watchdog adds its watches: watchdog
# then adds one folder twice and warns that it overwrites its own callback, which is harmless,
# but this suite turns warnings into errors, and in watchdog's thread that error kills it.
@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_deleted_root_is_made_again_and_watched_with_its_own_backend(
    tmp_path: Path, polling: bool
) -> None:
    root = tmp_path / "remotecomdir"
    (root / "softdir/server1").mkdir(parents=True)
    seen: queue.Queue[tuple[str, str]] = queue.Queue()
    watcher = Watcher(
        [root],
        ignore=Ignore(DEFAULT_IGNORE),
        on_change=lambda path: seen.put(("change", str(Path(path).relative_to(tmp_path)))),
        on_trouble=lambda reason: seen.put(("trouble", reason)),
        poll_interval=0.05,
        force_polling=polling,
    )
    with watcher, capture_logs() as logs:
        shutil.rmtree(root)

        def checked() -> bool:
            watcher.check()  # what the daemon's main loop does every tick
            return root.is_dir()

        wait_until(checked, WAIT)
        assert watcher.backends[root] == ("polling" if polling else "inotify")
        (root / "softdir/server1").mkdir(parents=True)
        (root / "softdir/server1/run.sh").write_text("back\n", encoding="utf-8")
        events = until_event(seen, ("change", "remotecomdir/softdir/server1/run.sh"))
    assert ("trouble", "root_missing") in events
    missing = [e for e in logs if e["event"] == "watch.root_missing"]
    assert missing == [{"event": "watch.root_missing", "log_level": "warning", "root": str(root)}]


def test_a_root_that_cannot_be_made_again_is_retried_by_every_check(tmp_path: Path) -> None:
    root = tmp_path / "parent/remotecomdir"
    root.mkdir(parents=True)
    seen: queue.Queue[tuple[str, str]] = queue.Queue()
    watcher = Watcher(
        [root],
        ignore=Ignore(DEFAULT_IGNORE),
        on_change=lambda path: seen.put(("change", Path(path).name)),
        on_trouble=lambda reason: seen.put(("trouble", reason)),
    )
    with watcher, capture_logs() as logs:
        shutil.rmtree(tmp_path / "parent")
        # A file where the root's parent was: the root cannot be made.
        (tmp_path / "parent").write_text("in the way\n", encoding="utf-8")
        wait_until(lambda: watcher.check() or watcher.backends[root] == "unavailable", WAIT)
        watcher.check()
        watcher.check()
        (tmp_path / "parent").unlink()
        wait_until(lambda: watcher.check() or watcher.backends[root] == "inotify", WAIT)
        (root / "new.txt").write_text("n\n", encoding="utf-8")
        until_event(seen, ("change", "new.txt"))
    unavailable = [e for e in logs if e["event"] == "watch.root_unavailable"]
    assert len(unavailable) == 1, "logged once per outage, not once per check"
    assert unavailable[0]["root"] == str(root)


def _inotify_masks() -> dict[int, list[int]]:
    """Every inotify instance of this process, by fd: the event masks of its watches."""
    found: dict[int, list[int]] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/self/fdinfo/{name}").read_text()
        except OSError:
            continue
        found[int(name)] = [
            int(field.split(":", 1)[1], 16)
            for line in info.splitlines()
            if line.startswith("inotify ")
            for field in line.split()
            if field.startswith("mask:")
        ]
    return found


def test_reads_are_never_subscribed_to_only_changes_are(tmp_path: Path) -> None:
    root = tmp_path / "remotecomdir"
    (root / "softdir/server1/lib").mkdir(parents=True)
    before = set(_inotify_masks())
    watcher = Watcher(
        [root], ignore=Ignore(DEFAULT_IGNORE), on_change=lambda path: None, on_trouble=print
    )
    with watcher:
        masks = {fd: m for fd, m in _inotify_masks().items() if fd not in before}
    watches = [mask for per_fd in masks.values() for mask in per_fd]
    assert len(watches) == 4, "the root, softdir, server1 and lib are each watched"
    in_access, in_close_nowrite, in_open = 0x1, 0x10, 0x20
    for mask in watches:
        assert mask & (in_access | in_close_nowrite | in_open) == 0, hex(mask)
        # created, deleted, modified, attributes, closed after writing, moved both ways
        assert mask & 0x100 and mask & 0x200 and mask & 0x2 and mask & 0x4
        assert mask & 0x8 and mask & 0x40 and mask & 0x80


def test_reading_every_file_many_times_queues_nothing_and_a_write_still_counts(
    watched: tuple[Path, queue.Queue[tuple[str, str]]],
) -> None:
    source, seen = watched
    for i in range(50):
        (source / f"f{i}").write_text(f"{i}\n", encoding="utf-8")
    # A folder made after them has one event, which comes after all of theirs.
    (source / "sentinel").mkdir()
    until_change(seen, "sentinel")
    for _ in range(200):  # 10,000 opens: past any queue of opened/closed events
        for i in range(50):
            (source / f"f{i}").read_bytes()
    (source / "f0").write_text("written\n", encoding="utf-8")
    events = until_change(seen, "f0")
    assert set(events) == {("change", "f0")}
