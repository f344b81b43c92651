"""First trees built on processes of their own: exact, reported as if built here, and gone
when idle, when a process dies, and with the daemon."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from syncpro.config.load import load_config
from syncpro.engine import buildpool
from syncpro.engine.buildpool import BuildPool
from syncpro.engine.request import SyncRequest
from syncpro.engine.sync import run_sync
from syncpro.engine.tree import Ignore, Share, Tally, TreeBuilder
from syncpro.testing import Daemon, app, write_config
from syncpro.testing.configs import write_doc

from helpers import (
    BASE_NS,
    Dir,
    Fifo,
    File,
    Symlink,
    config_dict,
    snapshot,
    wait_until,
    write_tree,
)

WAIT = 60.0


@pytest.fixture
def pool() -> Iterator[BuildPool]:
    made = BuildPool()
    yield made
    made.close()


def _started(pool: BuildPool, processes: int) -> BuildPool:
    """The pool with its processes up: a build while they start may be made here."""
    assert wait_until(lambda: pool.ready(processes), WAIT)
    return pool


Told = list[tuple[str, int, int]]


def _builder(told: Told | None = None) -> TreeBuilder:
    progress = (
        (lambda what, files, size: told.append((what, files, size))) if told is not None else None
    )
    return TreeBuilder(
        ignore=Ignore(["*.tmp"]),
        reuse=None,
        preserve_owner=os.geteuid() == 0,
        progress=progress,
    )


def _source(root: Path) -> Path:
    source = write_tree(
        root,
        {
            "bin/run": File("#!/bin/sh\n", mode=0o755, mtime_ns=BASE_NS + 1),
            "lib/a.jar": File(b"\x00\xff" * 5000, mode=0o640, mtime_ns=BASE_NS + 2),
            "setuid": File("s", mode=0o4755, mtime_ns=BASE_NS + 3),
            "link": Symlink("lib/a.jar"),
            "upload.tmp": "not published",
            "pipe": Fifo(),
        },
    )
    os.link(source / "lib/a.jar", source / "lib/b.jar")
    return source


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command, or None for a process gone or a
    zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields if fields[0] != "Z" else None


def _descendants(pid: int) -> set[int]:
    """The processes below pid, from /proc; zombies count as gone."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(entry) if entry.isdigit() else None
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _builders(pid: int) -> set[int]:
    """The pool processes below pid."""
    found = set()
    for child in _descendants(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(child)
        except OSError:
            continue
    return found


@dataclass
class _Built:
    """One tree built twice: here, by copy_tree, and there, on the pool."""

    here: TreeBuilder
    there: TreeBuilder
    told_here: Told = field(default_factory=list)
    told_there: Told = field(default_factory=list)
    skipped_here: list[MutableMapping[str, Any]] = field(default_factory=list)
    skipped_there: list[MutableMapping[str, Any]] = field(default_factory=list)


def _assert_alike(tmp_path: Path, built: _Built) -> None:
    """The tree built there is the one built here, counted, recorded and digested alike."""
    here, there = built.here, built.there
    assert snapshot(tmp_path / "there") == snapshot(tmp_path / "here") != {}
    assert there.stats == here.stats
    assert there.manifest is not None and here.manifest is not None
    assert there.manifest.entries.keys() == here.manifest.entries.keys()
    assert there.last_plan is not None and here.last_plan is not None
    assert there.last_plan.digest == here.last_plan.digest


def _written(builder: TreeBuilder, root: Path) -> list[Path]:
    """The files a build wrote, relative to the tree it built."""
    return [Path(p).relative_to(root) for p in builder.written]


def _made(told: Told) -> list[tuple[str, int, int]]:
    return sorted(t for t in told if t[0] != "planned")


def _tally(told: Told) -> Tally:
    tally = Tally()
    for event in told:
        tally.count(*event)
    return tally


def _build_both_ways(tmp_path: Path, pool: BuildPool, source: Path, processes: int) -> _Built:
    told_here: Told = []
    told_there: Told = []
    built = _Built(_builder(told_here), _builder(told_there), told_here, told_there)
    with capture_logs() as logs:
        built.here.copy_tree(source, tmp_path / "here")
    built.skipped_here = [e for e in logs if e["event"] == "copy.special_file_skipped"]
    with capture_logs() as logs:
        _started(pool, processes).build(built.there, source, tmp_path / "there", processes)
    assert pool.made == 1
    built.skipped_there = [e for e in logs if e["event"] == "copy.special_file_skipped"]
    return built


def test_a_tree_built_on_the_pool_is_the_one_built_here_and_reported_alike(
    tmp_path: Path, pool: BuildPool
) -> None:
    built = _build_both_ways(tmp_path, pool, _source(tmp_path / "src"), 1)

    assert pool.running
    _assert_alike(tmp_path, built)
    assert built.there.stats.hardlinks == 1
    assert _written(built.there, tmp_path / "there") == _written(built.here, tmp_path / "here")
    assert built.told_there == built.told_here != []
    # What the pool's process logged is logged here, the FIFO it never opened among it.
    assert built.skipped_there == built.skipped_here != []


def _wide_source(root: Path) -> Path:
    """A source for shared builds: folders of many files at several depths, names of one
    file in different folders, symlinks, a FIFO, extended attributes, set times."""
    spec: dict[str, object] = {}
    for d in range(6):
        for f in range(40):
            spec[f"d{d}/sub{f % 3}/f{f:02}"] = File(f"{d}/{f}" * (f + 1), mode=0o640 + f % 2)
        spec[f"d{d}/l{d}"] = Symlink(f"sub0/f{d:02}")
        spec[f"d{d}/sub1"] = Dir(mode=0o750, mtime_ns=BASE_NS + d)
        spec[f"d{d}"] = Dir(mtime_ns=BASE_NS + 10 + d)
    spec["pipe"] = Fifo()
    spec["skip.tmp"] = "never published"
    source = write_tree(root, spec)  # type: ignore[arg-type]
    for d in range(1, 6):  # one inode, six names in six folders
        os.link(source / "d0/sub0/f00", source / f"d{d}/sub2/same")
    os.setxattr(source / "d3/sub1/f07", "user.tag", b"file")
    os.setxattr(source / "d4/sub1", "user.tag", b"folder")
    for folder in ("d0/sub2", "d1/sub2", "d2/sub2", "d3/sub2", "d4/sub2", "d5/sub2"):
        os.utime(source / folder, ns=(BASE_NS, BASE_NS))  # the links moved it
    os.utime(source, ns=(BASE_NS, BASE_NS))
    return source


def test_a_first_tree_built_while_nothing_else_builds_is_shared_out_and_exact(
    tmp_path: Path, pool: BuildPool
) -> None:
    built = _build_both_ways(tmp_path, pool, _wide_source(tmp_path / "src"), 2)
    there, told_here, told_there = built.there, built.told_here, built.told_there

    assert len(_builders(os.getpid())) == 2, "one process per share"
    _assert_alike(tmp_path, built)
    assert os.stat(tmp_path / "there/d5/sub2/same").st_nlink == 6
    assert os.getxattr(tmp_path / "there/d3/sub1/f07", "user.tag") == b"file"
    assert os.getxattr(tmp_path / "there/d4/sub1", "user.tag") == b"folder"
    assert there.stats.hardlinks == 5 and there.stats.dirs == 1 + 6 * 4
    assert sorted(_written(there, tmp_path / "there")) == sorted(
        _written(built.here, tmp_path / "here")
    )
    root = os.stat(tmp_path / "there")
    assert there.manifest is not None and there.manifest.root == (root.st_dev, root.st_ino)
    # Every file told of once, all planned (a count per share) before the first made.
    planned = [what == "planned" for what, _, _ in told_there]
    assert planned == sorted(planned, reverse=True)
    assert planned.count(True) == 2
    assert _made(told_there) == _made(told_here)
    assert _tally(told_there) == _tally(told_here)
    assert len(built.skipped_there) == 1
    assert built.skipped_there == built.skipped_here


def test_each_name_is_one_share_and_all_names_of_a_file_the_same_one() -> None:
    single = os.stat_result((0o100644, 7, 1, 1, 0, 0, 10, 0, 0, 0))
    linked = os.stat_result((0o100644, 7, 1, 3, 0, 0, 10, 0, 0, 0))
    names = [f"d{d}/f{f}" for d in range(10) for f in range(30)]
    for count in (2, 3, 4):
        shares = [Share(index, count) for index in range(count)]
        owners = [[s.index for s in shares if s.owns(name, single)] for name in names]
        assert all(len(found) == 1 for found in owners)
        spread = [sum(found == [s.index] for found in owners) for s in shares]
        assert min(spread) > len(names) / count / 2, spread
        assert {s.index for name in names for s in shares if s.owns(name, linked)} == {7 % count}


def test_a_shared_build_whose_shares_fail_raises_their_error_and_leaves_nothing(
    tmp_path: Path, pool: BuildPool
) -> None:
    source = write_tree(tmp_path / "src", {"a/b": "1", "c": "2"})
    os.mkfifo(tmp_path / "fifo-root")
    with pytest.raises(NotADirectoryError) as raised:
        _started(pool, 2).build(_builder(), tmp_path / "fifo-root", tmp_path / "staging", 2)
    assert raised.value.errno == 20
    assert not (tmp_path / "staging").exists()
    pool.build(_builder(), source, tmp_path / "after", 2)
    assert snapshot(tmp_path / "after") == snapshot(source)


@pytest.mark.parametrize("processes", [1, 2])
def test_an_error_of_a_pool_build_is_raised_here_with_its_errno(
    tmp_path: Path, pool: BuildPool, processes: int
) -> None:
    with pytest.raises(FileNotFoundError) as raised:
        _started(pool, processes).build(
            _builder(), tmp_path / "no-such-source", tmp_path / "staging", processes
        )
    assert raised.value.errno == 2
    assert not (tmp_path / "staging").exists()


def test_the_pool_stops_when_idle_and_starts_again_for_the_next_first_tree(
    tmp_path: Path, pool: BuildPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(buildpool, "IDLE_SECONDS", 0.2)
    source = write_tree(tmp_path / "src", {"a": "1"})
    pool.build(_builder(), source, tmp_path / "one", 1)
    assert pool.running
    assert wait_until(lambda: not pool.running, WAIT)
    pool.build(_builder(), source, tmp_path / "two", 1)
    assert (tmp_path / "two/a").read_text() == "1"


def test_a_first_tree_that_comes_while_the_processes_start_is_built_here_if_small(
    tmp_path: Path, pool: BuildPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new app on an idle daemon: its tree is made before the processes would be up.
    monkeypatch.setattr(buildpool, "WORTH_WAITING", 60)
    small = write_tree(
        tmp_path / "small", {f"d{d}/f{f}": f"{d}{f}" for d in range(3) for f in range(9)}
    )
    big = write_tree(
        tmp_path / "big", {f"d{d}/f{f}": f"{d}{f}" for d in range(6) for f in range(9)}
    )

    pool.build(_builder(), small, tmp_path / "small-here", 2)
    assert pool.made == 0
    assert pool.running, "started after it, for the next"
    assert snapshot(tmp_path / "small-here") == snapshot(small)
    _started(pool, 2).build(_builder(), small, tmp_path / "small-there", 2)
    assert pool.made == 1
    assert snapshot(tmp_path / "small-there") == snapshot(small)
    pool.close()

    # One worth the wait waits for the processes to start.
    waiting = BuildPool()
    try:
        waiting.build(_builder(), big, tmp_path / "big-there", 2)
        assert waiting.made == 1
        assert snapshot(tmp_path / "big-there") == snapshot(big)
    finally:
        waiting.close()


def test_a_second_first_tree_while_one_is_built_here_starts_the_processes_at_once(
    tmp_path: Path, pool: BuildPool
) -> None:
    # A catch-up: its trees keep coming, and the processes should not wait for the first.
    source = write_tree(tmp_path / "src", {f"d{d}/f{f}": "x" for d in range(2) for f in range(4)})
    building, release = threading.Event(), threading.Event()

    def held(what: str, files: int, size: int) -> None:
        building.set()
        assert release.wait(WAIT)

    first = TreeBuilder(ignore=Ignore([]), reuse=None, preserve_owner=False, progress=held)
    thread = threading.Thread(target=pool.build, args=(first, source, tmp_path / "one", 1))
    thread.start()
    try:
        assert building.wait(WAIT)
        assert not pool.running, "one build alone starts them only once done"
        running: list[bool] = []
        second = TreeBuilder(
            ignore=Ignore([]),
            reuse=None,
            preserve_owner=False,
            progress=lambda what, files, size: running.append(pool.running),
        )
        pool.build(second, source, tmp_path / "two", 1)
        assert running and all(running), "started before the second was built"
        assert pool.made == 0
    finally:
        release.set()
        thread.join(WAIT)
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two") == snapshot(source)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_pool_process_killed_mid_build_leaves_the_build_to_the_daemon(
    tmp_path: Path, pool: BuildPool, processes: int
) -> None:
    source = tmp_path / "src"
    for d in range(50):
        write_tree(source / f"d{d:02}", {f"f{f:03}": f"{d}/{f}" for f in range(100)})
    staging = tmp_path / "staging"
    _started(pool, processes)
    assert _builders(os.getpid()), "the pool's processes run below this one"

    def kill_once_building() -> None:
        assert wait_until(staging.exists, WAIT, 0.0005)
        for pid in _builders(os.getpid()):
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_building)
    killer.start()
    builder = _builder()
    with capture_logs() as logs:
        pool.build(builder, source, staging, processes)
    killer.join(WAIT)

    assert [e["event"] for e in logs if e["event"].startswith("publish.")] == [
        "publish.build_pool_broken"
    ]
    assert snapshot(staging) == snapshot(source)
    assert builder.stats.copied == 5000
    _started(pool, processes).build(_builder(), source, tmp_path / "after", processes)  # a new pool
    assert snapshot(tmp_path / "after") == snapshot(source)


def test_processes_0_builds_first_trees_in_the_daemon(tmp_path: Path, pool: BuildPool) -> None:
    write_tree(tmp_path / "var/remotecomdir/softdir/web1", {"static/index.html": "1"})
    doc = config_dict([app("web1", "web")])
    for processes, started in ((0, False), (1, True)):
        doc["publish"]["processes"] = processes
        config = load_config(write_doc(tmp_path / f"config{processes}.yml", doc))
        request = SyncRequest(k="web1", update=False)
        result = run_sync(request, config, config.config_inventory, builds=pool)
        assert result.apps[0].program is not None and result.apps[0].program.ok
        assert pool.running is started
        (tmp_path / "var/softdir/web").rename(tmp_path / f"published-{processes}")


@pytest.mark.daemon
def test_the_build_processes_die_with_a_daemon_killed_outright(base: Path) -> None:
    source = base / "r/softdir/big"
    for d in range(200):
        write_tree(source / f"d{d:03}", {f"f{f:03}": "x" for f in range(100)})
    config = write_config(base, [app("big", "big")])
    with Daemon(config) as daemon:
        daemon.wait_ready(WAIT)
        assert wait_until(lambda: _builders(daemon.pid), WAIT, 0.001)
        below = _descendants(daemon.pid)  # the resource tracker too
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.proc.wait(WAIT)
        # Each watches the daemon's pidfd: a daemon killed outright takes them along.
        assert wait_until(lambda: not _alive(below), WAIT)


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if _stat(pid) is not None}


def test_a_first_tree_of_a_few_files_and_no_folder_is_built_in_the_daemon(
    tmp_path: Path, pool: BuildPool
) -> None:
    # A config of one file, as most are: its round trip to a process costs more than it.
    write_tree(tmp_path / "var/remotecomdir/softdir/web1", {"a": "1", "b": "2"})
    write_tree(tmp_path / "var/remotecomdir/configuredir/web1", {"app.properties": "x=1"})
    config = load_config(write_doc(tmp_path / "config.yml", config_dict([app("web1", "web")])))

    result = run_sync(
        SyncRequest(k="web1", update=False), config, config.config_inventory, builds=pool
    )

    assert result.ok
    assert not pool.running
    # Past FEW_FILES names, or with a folder, it goes to a process.
    write_tree(tmp_path / "var/remotecomdir/softdir/web2", {f"f{i}": "x" for i in range(9)})
    write_tree(tmp_path / "var/remotecomdir/configuredir/web2", {"app.properties": "x=2"})
    config = load_config(write_doc(tmp_path / "config2.yml", config_dict([app("web2", "web2")])))
    assert run_sync(
        SyncRequest(k="web2", update=False), config, config.config_inventory, builds=pool
    ).ok
    assert pool.running
