"""SPEC section 8: atomic swaps, the grace period, leftovers swept, one publisher per target."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from small_fs import small_ext4
from syncpro.engine import publish as publish_module
from syncpro.engine.layout import Target
from syncpro.engine.publish import (
    Published,
    Staged,
    barrier_of,
    commit,
    locks_held,
    publish,
    stage,
    sweep,
    target_lock,
    work_area,
)
from syncpro.errors import PublishError

from helpers import (
    SERVER_GROUP,
    app,
    config_dict,
    config_source,
    config_target,
    make_config,
    program_source,
    program_target,
    snapshot,
    sync,
    wait_until,
    without_dac_override,
    write_config,
    write_tree,
)

SYNCPRO = str(Path(sys.executable).parent / "syncpro")


def _read_by_fd(fd: int, prefix: str = "") -> dict[str, Any]:
    """Read a whole tree through an open directory descriptor, never through its path."""
    found: dict[str, Any] = {}
    for name in sorted(os.listdir(fd)):
        rel = prefix + name
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            try:
                found.update(_read_by_fd(sub, rel + "/"))
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            file_fd = os.open(name, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(file_fd, "rb") as handle:
                found[rel] = (handle.read(), st.st_mode, st.st_mtime_ns)
        else:
            found[rel] = ("link", os.readlink(name, dir_fd=fd))
    return found


def _change(source: Path, round_no: int) -> None:
    """Modify, delete and add files, and add a directory: a new build."""
    for i in range(round_no, 100, 10):
        path = source / f"d{i % 5}" / f"f{i}"
        if path.exists():
            path.write_text(f"round {round_no} " * 40)
    for i in range(round_no + 5, 100, 20):
        (source / f"d{i % 5}" / f"f{i}").unlink(missing_ok=True)
    write_tree(source, {f"new{round_no}/f": f"added in {round_no}"})


class _Reader(threading.Thread):
    """Reads a tree again and again until stopped, counting whole reads, keeping problems."""

    def __init__(self, read: Any, check: Any) -> None:
        super().__init__(name="tree-reader")
        self.read, self.check = read, check
        self.stop_event = threading.Event()
        self.reads = 0
        self.problems: list[str] = []
        self.cond = threading.Condition()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                problem = self.check(self.read())
            except OSError as exc:
                problem = f"read failed: {exc!r}"
            if problem:
                self.problems.append(problem)
                return
            with self.cond:
                self.reads += 1
                self.cond.notify_all()

    def wait_reads(self, count: int, timeout: float = 10) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.reads >= count or self.problems, timeout)
        assert ok, "the reader made no progress"

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def test_a_reader_holding_the_old_tree_never_sees_it_change_or_vanish(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER_GROUP, grace=60)
    source = program_source(config, "server1")
    write_tree(source, {f"d{i % 5}/f{i}": f"v0-{i} " * 50 for i in range(100)})
    write_tree(config_source(config, "server1"), {"c": "1"})
    assert sync(config, "server1").ok
    target = program_target(config, "server1")
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    expected = _read_by_fd(fd)
    reader = _Reader(lambda: _read_by_fd(fd), lambda seen: "changed" if seen != expected else "")
    reader.start()
    try:
        for round_no in range(1, 6):
            before = reader.reads
            _change(source, round_no)
            assert sync(config, "server1").ok
            assert snapshot(target) == snapshot(source)
            reader.wait_reads(before + 2)  # at least one whole read after this swap
    finally:
        reader.stop()

    assert reader.problems == []
    assert _read_by_fd(fd) == expected
    trash = work_area(config.dirs.softdir) / "trash"
    assert len(os.listdir(trash)) == 5
    assert sweep(config.dirs.softdir) == []  # within the grace period every old tree stays
    assert _read_by_fd(fd) == expected
    removed = sweep(config.dirs.softdir, now=time.time() + 61)
    assert len(removed) == 5
    assert os.listdir(trash) == []
    os.close(fd)


def test_a_reader_by_path_always_finds_a_whole_tree_old_or_new(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER_GROUP, grace=60)
    source = program_source(config, "server1")
    write_tree(source, {f"d{i % 5}/f{i}": f"v0-{i} " * 50 for i in range(100)})
    write_tree(config_source(config, "server1"), {"c": "1"})
    assert sync(config, "server1").ok
    target = program_target(config, "server1")
    versions = [_read_by_fd_path(target)]
    lock = threading.Lock()

    def check(seen: dict[str, Any]) -> str:
        with lock:
            return "" if seen in versions else f"a tree that was never published: {sorted(seen)}"

    reader = _Reader(lambda: _read_by_fd_path(target), check)
    reader.start()
    try:
        for round_no in range(1, 6):
            _change(source, round_no)
            with lock:
                versions.append(_read_by_fd_path(source))
            before = reader.reads
            assert sync(config, "server1").ok
            reader.wait_reads(before + 2)
    finally:
        reader.stop()

    assert reader.problems == []


def _read_by_fd_path(path: Path) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)  # ENOENT here: the target was missing
    try:
        return _read_by_fd(fd)
    finally:
        os.close(fd)


def test_a_replaced_tree_is_kept_for_the_grace_period_then_swept(tmp_path: Path) -> None:
    target = Target(tmp_path / "softdir", "server")
    publish(target, lambda s, c: write_tree(s, {"v": "1"}), grace=10, durable=False)

    done = publish(target, lambda s, c: write_tree(s, {"v": "2"}), grace=10, durable=False)

    assert done.replaced is not None
    assert done.expires is not None
    assert (done.replaced / "v").read_text() == "1"
    assert (target.path / "v").read_text() == "2"
    assert sweep(target.root, now=done.expires - 1) == []
    assert done.replaced.exists()
    # The trash name keeps the expiry in milliseconds: allow for its rounding.
    assert sweep(target.root, now=done.expires + 0.001) == [done.replaced]
    assert not done.replaced.exists()
    assert (target.path / "v").read_text() == "2"


def test_a_new_tree_is_durable_before_the_swap_when_fsync_is_on(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER_GROUP, fsync=True)
    write_tree(program_source(config, "server1"), {"a": "1", "d/b": "2"})
    write_tree(config_source(config, "server1"), {"c": "1"})

    assert sync(config, "server1").ok
    assert snapshot(program_target(config, "server1")) == snapshot(
        program_source(config, "server1")
    )


def test_leftover_staging_of_a_dead_process_is_swept_and_the_target_is_intact(
    tmp_path: Path,
) -> None:
    target = Target(tmp_path / "softdir", "server")
    publish(target, lambda s, c: write_tree(s, {"v": "1"}), grace=0, durable=False)
    published = snapshot(target.path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = work_area(target.root) / "staging"
    leftover = write_tree(staging / f"{dead.pid}.0badc0de.server", {"half": "x", "d/e": "y"})
    os.chmod(leftover / "d", 0o500)
    live = write_tree(staging / f"{os.getppid()}.1234abcd.server", {"busy": "z"})

    removed = sweep(target.root)

    assert removed == [leftover]
    assert not leftover.exists()
    assert live.exists()  # another process that still runs is building it
    assert snapshot(target.path) == published


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_read_only_leftovers_are_swept_by_a_process_that_obeys_file_modes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "softdir"
    trash = write_tree(work_area(root) / "trash" / f"{time.time() - 5:.3f}.server.0badc0de", {})
    staging = write_tree(work_area(root) / "staging" / f"{_dead_pid()}.0badc0de.server", {})
    for tree in (trash, staging):
        write_tree(tree, {"ro/f": "x", "closed/g": "y"})
        os.chmod(tree / "ro", 0o500)  # as a source's read-only directory is published
        os.chmod(tree / "closed", 0)
    code = (
        "from pathlib import Path; from syncpro.engine.publish import sweep; "
        f"sweep(Path({str(root)!r}))"
    )

    proc = subprocess.run(
        without_dac_override(sys.executable, "-c", code),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert os.listdir(work_area(root) / "trash") == []
    assert os.listdir(work_area(root) / "staging") == []


def test_a_sweep_of_an_unusable_work_area_logs_and_raises_nothing(tmp_path: Path) -> None:
    root = tmp_path / "softdir"
    work_area(root).mkdir(parents=True)
    (work_area(root) / "trash").write_text("not a directory")

    with structlog.testing.capture_logs() as logs:
        assert sweep(root) == []

    failed = [e for e in logs if e["event"] == "publish.sweep_failed"]
    assert [e["path"] for e in failed] == [str(work_area(root) / "trash")]


def test_a_target_root_that_is_not_a_directory_fails_that_app_naming_it(tmp_path: Path) -> None:
    target = Target(tmp_path / "softdir", "server")
    target.root.write_text("a file where the softdir should be")

    with pytest.raises(PublishError, match=r"softdir"):
        publish(target, lambda s, c: write_tree(s, {"v": "1"}), grace=0, durable=False)


def test_staging_of_a_reused_pid_is_swept_when_the_process_start_time_differs(
    tmp_path: Path,
) -> None:
    staging = work_area(tmp_path / "softdir") / "staging"
    # The parent runs, but it is not the process that named this staging: its start time
    # differs, as after a reboot that handed the same pid to another program.
    reused = write_tree(staging / f"{os.getppid()}-1.0badc0de.server", {"half": "x"})
    ours = write_tree(staging / f"{publish_module._owner_tag()}.1234abcd.server", {"busy": "z"})

    assert sweep(tmp_path / "softdir") == [reused]
    assert ours.exists()


def test_a_death_between_the_two_fallback_renames_is_undone_by_the_next_sweep(
    tmp_path: Path,
) -> None:
    target = Target(tmp_path / "softdir", "server")
    publish(target, lambda s, c: write_tree(s, {"v": "1"}), grace=0, durable=False)
    staging = work_area(target.root) / "staging"
    owner = f"{_dead_pid()}-1.0badc0de.server"
    # What the fallback leaves when its process dies after the first rename: the old tree
    # aside, the complete new tree still in staging, and no target at all.
    new = write_tree(staging / owner, {"v": "2"})
    os.rename(target.path, staging / f"{owner}+old")

    sweep(target.root)

    assert (target.path / "v").read_text() == "1"  # as before the publish
    assert os.listdir(staging) == []
    assert not new.exists()


def test_leftovers_are_swept_when_a_sync_starts(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER_GROUP)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = work_area(config.dirs.configuredir) / "staging"
    leftover = write_tree(staging / f"{dead.pid}.0badc0de.server%2Fserver1", {"half": "x"})
    trash = work_area(config.dirs.softdir) / "trash"
    expired = write_tree(trash / f"{time.time() - 5:.3f}.server.0badc0de", {"old": "x"})

    sync(config, "server1")

    assert not leftover.exists()
    assert not expired.exists()


def test_a_build_that_raises_leaves_the_old_target_and_no_staging(tmp_path: Path) -> None:
    target = Target(tmp_path / "softdir", "server")
    publish(target, lambda s, c: write_tree(s, {"v": "1", "d/x": "2"}), grace=0, durable=False)
    old = snapshot(target.path)

    def half_then_fail(staging: Path, current: Path | None) -> None:
        write_tree(staging, {"v": "2"})
        raise RuntimeError("crash mid-build")

    with pytest.raises(RuntimeError):
        publish(target, half_then_fail, grace=0, durable=False)

    def disk_full(staging: Path, current: Path | None) -> None:
        write_tree(staging, {"v": "2"})
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "v"))

    with pytest.raises(PublishError, match="No space left"):
        publish(target, disk_full, grace=0, durable=False)

    assert snapshot(target.path) == old
    assert os.listdir(work_area(target.root) / "staging") == []


_CRASHER = """
import sys
from pathlib import Path
from syncpro.engine.layout import Target
from syncpro.engine.publish import publish

def build(staging, current):
    staging.mkdir()
    (staging / "v").write_text("half")
    print(staging, flush=True)
    sys.stdin.readline()  # killed here

publish(Target(Path(sys.argv[1]), "server"), build, grace=0, durable=False)
"""


def test_a_kill_9_mid_build_leaves_the_old_target_and_the_next_start_sweeps(
    tmp_path: Path,
) -> None:
    target = Target(tmp_path / "softdir", "server")
    publish(target, lambda s, c: write_tree(s, {"v": "1"}), grace=0, durable=False)
    old = snapshot(target.path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(target.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    staging = Path(proc.stdout.readline().strip())
    assert (staging / "v").read_text() == "half"

    proc.kill()
    proc.wait(timeout=10)
    assert proc.stdin is not None
    proc.stdin.close()
    proc.stdout.close()

    assert snapshot(target.path) == old
    assert sweep(target.root) == [staging]
    # The dead process's lock went with it: the next publish does not wait.
    publish(target, lambda s, c: write_tree(s, {"v": "3"}), grace=0, durable=False)
    assert (target.path / "v").read_text() == "3"


def test_without_rename_exchange_two_renames_still_publish_and_park_the_old_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(a: Path, b: Path) -> None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")

    monkeypatch.setattr(publish_module, "exchange", unsupported)
    target = Target(tmp_path / "softdir", "server")
    publish(target, lambda s, c: write_tree(s, {"v": "1"}), grace=10, durable=False)

    done = publish(target, lambda s, c: write_tree(s, {"v": "2"}), grace=10, durable=False)

    assert (target.path / "v").read_text() == "2"
    assert done.replaced is not None
    assert (done.replaced / "v").read_text() == "1"
    assert os.listdir(work_area(target.root) / "staging") == []


# --- one publisher per target, across processes ---

_HOLDER = """
import sys
from pathlib import Path
from syncpro.engine.layout import Target
from syncpro.engine.publish import target_lock

root, rel, order = sys.argv[1:4]
with target_lock(Target(Path(root), rel)):
    print("locked", flush=True)
    sys.stdin.readline()
    with open(order, "a") as f:
        f.write("holder\\n")
"""

_PUBLISHER = """
import sys
from pathlib import Path
from syncpro.engine.layout import Target
from syncpro.engine.publish import publish

root, rel, order = sys.argv[1:4]

def build(staging, current):
    with open(order, "a") as f:
        f.write("publisher\\n")
    staging.mkdir()
    (staging / "by").write_text("publisher")

publish(Target(Path(root), rel), build, grace=0, durable=False)
"""


def _blocked_on_flock(pid: int) -> bool:
    """True once the kernel lists pid as waiting for an flock (a `->` line in /proc/locks)."""
    with open("/proc/locks") as handle:
        return any("->" in line and "FLOCK" in line and str(pid) in line.split() for line in handle)


@pytest.fixture
def holder(tmp_path: Path) -> Any:
    """Start a process holding the lock of softdir/server; yield (process, order file)."""
    if not os.path.exists("/proc/locks"):
        pytest.skip("needs /proc/locks to see a blocked waiter")
    order = tmp_path / "order"
    order.touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / "var/softdir"), "server", str(order)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    assert proc.stdout.readline().strip() == "locked"
    yield proc, order
    proc.stdin.close()
    proc.stdout.close()
    proc.wait(timeout=10)


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_a_publish_waits_while_another_process_holds_the_target_lock(
    tmp_path: Path, holder: Any
) -> None:
    proc, order = holder
    second = subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, str(tmp_path / "var/softdir"), "server", str(order)]
    )
    wait_until(lambda: _blocked_on_flock(second.pid))
    assert order.read_text() == ""

    _release(proc)

    assert second.wait(timeout=10) == 0
    assert order.read_text().split() == ["holder", "publisher"]
    assert (tmp_path / "var/softdir/server/by").read_text() == "publisher"


@pytest.mark.daemon
def test_a_syncpro_sync_waits_for_the_lock_then_publishes(tmp_path: Path, holder: Any) -> None:
    proc, _ = holder
    config_path = write_config(tmp_path / "config.yml", config_dict(SERVER_GROUP, grace=0))
    write_tree(tmp_path / "var/remotecomdir/softdir/server1", {"v": "new"})
    write_tree(tmp_path / "var/remotecomdir/configuredir/server1", {"c": "1"})
    write_tree(tmp_path / "var/softdir/server", {"v": "old"})
    cli = subprocess.Popen(
        [SYNCPRO, "sync", "-k", "server1", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_until(lambda: _blocked_on_flock(cli.pid))
    assert (tmp_path / "var/softdir/server/v").read_text() == "old"

    _release(proc)

    _, err = cli.communicate(timeout=30)
    assert cli.returncode == 0, err
    assert (tmp_path / "var/softdir/server/v").read_text() == "new"


def test_the_target_lock_excludes_threads_of_one_process_too(tmp_path: Path) -> None:
    target = Target(tmp_path / "softdir", "server")
    entered = threading.Event()
    order: list[str] = []

    def second() -> None:
        entered.set()
        with target_lock(target):
            order.append("second")

    with target_lock(target):
        worker = threading.Thread(target=second)
        worker.start()
        entered.wait(timeout=10)
        wait_until(lambda: _blocked_on_flock(os.getpid()))
        order.append("first")
    worker.join(timeout=10)

    assert order == ["first", "second"]


@pytest.mark.daemon
def test_two_processes_syncing_one_group_at_once_both_succeed_and_leave_an_exact_copy(
    tmp_path: Path,
) -> None:
    apps = [app("server1", "server"), app("server2", "server")]
    config_path = write_config(tmp_path / "config.yml", config_dict(apps, grace=0))
    source = tmp_path / "var/updatedir/softdir/server"
    write_tree(source, {f"d{i % 40}/f{i}": f"content {i}\n" * (i % 7) for i in range(3000)})
    for key in ("server1", "server2"):
        write_tree(tmp_path / f"var/updatedir/configuredir/server/{key}", {"app.conf": key})
    command = [SYNCPRO, "sync", "-k", "server", "--update", "--config", str(config_path)]

    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    assert snapshot(tmp_path / "var/softdir/server") == snapshot(source)
    for key in ("server1", "server2"):
        assert (tmp_path / f"var/configuredir/server/{key}/app.conf").read_text() == key
    staging = tmp_path / "var/softdir/.syncpro/staging"
    assert os.listdir(staging) == []


def test_a_target_that_is_a_symlink_is_replaced_without_touching_what_it_points_to(
    tmp_path: Path,
) -> None:
    elsewhere = write_tree(tmp_path / "elsewhere", {"precious": "keep me", "d/x": "y"})
    before = snapshot(elsewhere, identity=True)
    target = Target(tmp_path / "softdir", "server")
    target.root.mkdir()
    target.path.symlink_to(elsewhere)

    done = publish(target, lambda s, c: write_tree(s, {"v": "new"}), grace=0, durable=False)
    sweep(target.root, now=time.time() + 1)

    assert not target.path.is_symlink()
    assert (target.path / "v").read_text() == "new"
    assert done.replaced is not None
    assert not os.path.lexists(done.replaced)
    assert snapshot(elsewhere, identity=True) == before


@pytest.mark.parametrize("key", ["k" * 200, "配置" * 15], ids=["200 bytes", "30 CJK characters"])
def test_any_key_a_config_accepts_can_be_synced_however_long_its_encoded_name(
    tmp_path: Path, key: str
) -> None:
    config = make_config(tmp_path, [app(key, "grp")])
    write_tree(program_source(config, key), {"bin": "1"})
    write_tree(config_source(config, key), {"c": "1"})

    result = sync(config, key)

    assert result.ok, [a.errors for a in result.apps]
    assert (config_target(config, key) / "c").read_text() == "1"
    (config_source(config, key) / "c").write_text("2")
    assert sync(config, key).ok
    assert (config_target(config, key) / "c").read_text() == "2"


def test_a_death_between_the_fallback_renames_is_undone_for_a_hashed_name_too(
    tmp_path: Path,
) -> None:
    rel = "grp/" + "配置" * 15
    target = Target(tmp_path / "configuredir", rel)
    publish(target, lambda s, c: write_tree(s, {"v": "1"}), grace=0, durable=False)
    name = publish_module._name(target)
    assert len(name) < 60  # hashed
    staging = work_area(target.root) / "staging"
    owner = f"{_dead_pid()}-1.0badc0de.{name}"
    write_tree(staging / owner, {"v": "2"})
    os.rename(target.path, staging / f"{owner}+old")

    sweep(target.root)

    assert (target.path / "v").read_text() == "1"
    assert os.listdir(staging) == []


@pytest.fixture
def flushed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors syncfs is called with, instead of flushing the filesystem."""
    calls: list[int] = []
    monkeypatch.setattr(publish_module, "_syncfs", lambda fd: calls.append(fd) or 0)
    return calls


def test_a_durable_publish_of_few_copied_files_fsyncs_them_instead_of_the_filesystem(
    tmp_path: Path, flushed: list[int]
) -> None:

    def few(staging: Path, current: Path | None) -> list[str]:
        write_tree(staging, {"a": "1", "d/b": "2"})
        return [str(staging / "a"), str(staging / "d/b")]

    def many(staging: Path, current: Path | None) -> list[str]:
        count = publish_module.FSYNC_FILES_MAX + 1
        write_tree(staging, {f"f{i}": "x" for i in range(count)})
        return [str(staging / f"f{i}") for i in range(count)]

    with small_ext4(tmp_path) as mnt:  # journaled, as mkfs.ext4 makes it by default
        target = Target(mnt / "softdir", "server")
        assert publish_module._journal_in_order(mnt)
        publish(target, few, grace=0, durable=True)
        assert flushed == [] and (target.path / "d/b").read_text() == "2"
        publish(target, many, grace=0, durable=True)
        assert len(flushed) == 1
        publish(target, lambda s, c: write_tree(s, {"v": "1"}), grace=0, durable=True)
        assert len(flushed) == 2  # a build that does not say what it wrote: syncfs


def test_an_ext4_without_a_journal_is_flushed_whole_even_for_few_files(
    tmp_path: Path, flushed: list[int]
) -> None:
    # Without a journal, ext4 writes each folder back on its own: the root's fsync would not
    # carry the rest of the tree, so only a syncfs makes it durable.

    def one(staging: Path, current: Path | None) -> list[str]:
        write_tree(staging, {"a": "1"})
        return [str(staging / "a")]

    with small_ext4(tmp_path, journal=False) as mnt:
        target = Target(mnt / "softdir", "server")
        assert not publish_module._journal_in_order(mnt)
        publish(target, one, grace=0, durable=True)
        assert len(flushed) == 1 and (target.path / "a").read_text() == "1"


def test_the_detached_sweeper_removes_replaced_trees_at_idle_io_priority(tmp_path: Path) -> None:
    from syncpro.engine.publish import sweep_later
    from syncpro.engine.sweeper import io_priority_class

    target = Target(tmp_path / "softdir", "server")
    publish(target, lambda s, c: write_tree(s, {"v": "1"}), grace=0, durable=False)
    publish(target, lambda s, c: write_tree(s, {"v": "2"}), grace=60, durable=False)

    pid = sweep_later([target.root])

    assert pid is not None
    try:
        if io_priority_class(os.getpid()) is None:
            pytest.skip("ioprio_get is not known on this architecture")
        assert wait_until(lambda: io_priority_class(pid) == 3)
    finally:
        os.kill(pid, 9)


def _stage_all(targets: list[Target], count: int) -> list[Staged]:
    """Stage a tree of `count` files for each target, its lock held by the caller."""
    staged = []
    for n, target in enumerate(targets):
        made = stage(target, lambda s, c, n=n: _files(s, count, f"tree {n}"))
        assert isinstance(made, Staged)
        staged.append(made)
    return staged


def _files(staging: Path, count: int, content: str) -> list[str]:
    write_tree(staging, {f"f{i}": content for i in range(count)})
    return [str(staging / f"f{i}") for i in range(count)]


def _fsyncs_of(folders: list[Path]) -> list[int]:
    return [barrier_of("fsync", os.stat(folder)).flushes for folder in folders]


def _commit_batch(
    targets: list[Target], count: int
) -> tuple[list[Published | PublishError], list[int]]:
    """Stage `count` files for each target and commit them as one durable batch; return the
    outcomes and how many fsyncs each target's folder (made first, to count them) had."""
    folders = [target.path.parent for target in targets]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    before = _fsyncs_of(folders)
    with locks_held() as take:
        for target in targets:
            take(target)
        done = commit(_stage_all(targets, count), grace=0, durable=True)
    after = _fsyncs_of(folders)
    return done, [a - b for a, b in zip(after, before, strict=True)]


def test_a_batch_of_trees_is_made_durable_by_one_syncfs_and_one_folder_fsync(
    tmp_path: Path, flushed: list[int]
) -> None:
    with small_ext4(tmp_path) as mnt:  # journaled: the last swap's folder carries the rest
        targets = [Target(mnt / "softdir", f"g{n}/tree") for n in range(5)]
        # 5 x 10 files: more than FSYNC_FILES_MAX in all, so the filesystem is flushed.
        done, fsyncs = _commit_batch(targets, 10)
        assert all(isinstance(d, Published) for d in done)
        assert len(flushed) == 1
        assert fsyncs == [0, 0, 0, 0, 1]
        assert [(t.path / "f9").read_text() for t in targets] == [f"tree {n}" for n in range(5)]


def test_without_a_journal_every_folder_swapped_into_is_fsynced(
    tmp_path: Path, flushed: list[int]
) -> None:
    with small_ext4(tmp_path, journal=False) as mnt:
        targets = [Target(mnt / "softdir", f"g{n}/tree") for n in range(3)]
        _, fsyncs = _commit_batch(targets, 1)
        assert len(flushed) == 1  # no journal: a syncfs even for three files
        assert fsyncs == [1, 1, 1]


def test_a_failed_syncfs_is_raised_not_papered_over_by_a_sync() -> None:
    # A descriptor that is no longer open: syncfs fails for real (EBADF), as it does with EIO
    # for a failed writeback, which cannot be brought about here.
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    os.close(fd)
    with pytest.raises(OSError) as caught:
        publish_module.syncfs_or_sync(fd)
    assert caught.value.errno == errno.EBADF


def test_a_flush_that_fails_fails_every_target_of_its_batch_and_keeps_their_trees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_syncfs(fd: int) -> int:
        ctypes.set_errno(errno.EIO)  # a writeback error: what no filesystem here will give
        return -1

    targets = [Target(tmp_path / "softdir", f"t{n}") for n in range(3)]
    for target in targets:
        publish(target, lambda s, c: write_tree(s, {"f0": "old"}), grace=0, durable=False)
    monkeypatch.setattr(publish_module, "_syncfs", failing_syncfs)
    done, fsyncs = _commit_batch(targets, 40)
    assert all(isinstance(d, PublishError) and "Input/output error" in str(d) for d in done)
    assert fsyncs == [0, 0, 0]
    assert [(t.path / "f0").read_text() for t in targets] == ["old"] * 3
    assert os.listdir(work_area(tmp_path / "softdir") / "staging") == []


def _publish_v2_with_the_trash(tmp_path: Path, trash_becomes: str | None) -> Published:
    """Publish v1 of a target, then v2 with a build that removes the trash folder meanwhile
    and, given `trash_becomes`, puts a file of that content where it was."""
    target = Target(tmp_path / "softdir", "server")
    publish(target, lambda s, c: write_tree(s, {"v": "1"}), grace=60, durable=False)
    trash = work_area(target.root) / "trash"

    def build(staging: Path, current: Path | None) -> None:
        write_tree(staging, {"v": "2"})
        os.rmdir(trash)  # an operator tidying up, say
        if trash_becomes is not None:
            trash.write_text(trash_becomes)

    done = publish(target, build, grace=60, durable=False)
    assert (target.path / "v").read_text() == "2"
    return done


def test_a_trash_folder_removed_during_a_build_is_made_again(tmp_path: Path) -> None:
    done = _publish_v2_with_the_trash(tmp_path, None)

    assert done.replaced is not None and done.replaced.parent.name == "trash"
    assert (done.replaced / "v").read_text() == "1"


def test_an_old_tree_the_trash_cannot_take_leaves_the_publish_done(tmp_path: Path) -> None:
    # Once the new tree is swapped in, it is published: a trash that cannot take the old one
    # (here a file where its folder goes) is logged, never reported as a failed publish.
    with structlog.testing.capture_logs() as logs:
        done = _publish_v2_with_the_trash(tmp_path, "not a folder")

    assert done.replaced is None
    [warning] = [e for e in logs if e["event"] == "publish.park_failed"]
    assert warning["target"] == str(done.target) and "Not a directory" in warning["error"]
    # The old tree waits in the staging area, for the sweep of a later start.
    assert (Path(warning["replaced"]) / "v").read_text() == "1"
