"""A replaced tree past its grace period becomes its target's spare, and the next publish
brings the spare up to date in place instead of building a whole new tree."""

from __future__ import annotations

import marshal
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog

from syncpro.config.model import DEFAULT_IGNORE, Config
from syncpro.daemon.service import Service
from syncpro.engine import sweeper
from syncpro.engine.layout import Target
from syncpro.engine.publish import SPARE, publish, sweep, work_area
from syncpro.engine.sweeper import io_priority_class
from syncpro.engine.tree import Ignore, TreeBuilder
from syncpro.engine.walk import Manifest

from helpers import (
    BASE_NS,
    SERVER_GROUP,
    Dir,
    File,
    Symlink,
    config_source,
    inodes,
    make_config,
    program_source,
    program_target,
    snapshot,
    sync,
    write_tree,
)

FILES = 60


def _published(tmp_path: Path, *, grace: float = 0) -> tuple[Config, Path, Path]:
    """A config whose replaced trees expire at once, server1's program source of FILES files
    in six folders plus a symlink, and its target, published once."""
    config = make_config(tmp_path, SERVER_GROUP, grace=grace)
    source = program_source(config, "server1")
    spec: dict[str, object] = {
        f"d{i % 6}/f{i:03}": File(f"x{i}", mtime_ns=BASE_NS) for i in range(FILES)
    }
    spec["link"] = Symlink("d1/f001")
    write_tree(source, spec)  # type: ignore[arg-type]
    write_tree(config_source(config, "server1"), {"c": "1"})
    sync(config, "server1")
    return config, source, program_target(config, "server1")


def _trash(target: Path) -> list[Path]:
    return sorted((work_area(target.parent) / "trash").iterdir())


def _spare(target: Path) -> Path:
    return work_area(target.parent) / SPARE / target.name


def _sweep_expired(config: Config) -> list[Path]:
    """Sweep a grace-0 target root just after a sync: a trash entry's name carries its expiry
    rounded to the millisecond, which a sweep in the same millisecond may still be before."""
    return sweep(config.dirs.softdir, now=time.time() + 1)


def test_the_tree_replaced_earlier_is_brought_up_to_date_and_published_again(
    tmp_path: Path,
) -> None:
    config, source, target = _published(tmp_path)
    first_root = target.stat().st_ino
    (source / "d1/f007").write_text("second")
    sync(config, "server1")  # no spare yet: built anew, the first tree goes to the trash
    second = (snapshot(target), inodes(target))
    (source / "d2/f008").write_text("third")

    result = sync(config, "server1")

    stats = result.apps[0].program.stats
    assert (stats.files, stats.copied, stats.linked) == (FILES, 1, FILES - 1)
    assert target.stat().st_ino == first_root, "the first tree was not taken as the spare"
    assert snapshot(target) == snapshot(source)
    # The tree it replaced is the second one, whole and untouched by the update (link
    # counts and ctimes aside: the spare let go of some of its files' names).
    (replaced,) = _trash(target)
    assert (snapshot(replaced), inodes(replaced)) == second


def test_a_sweep_keeps_an_expired_tree_as_the_spare_without_the_files_only_it_held(
    tmp_path: Path,
) -> None:
    config, source, target = _published(tmp_path)
    old = inodes(target)
    (source / "d1/f007").write_text("second")
    sync(config, "server1")
    assert len(_trash(target)) == 1

    _sweep_expired(config)

    assert _trash(target) == []
    spare = _spare(target)
    kept = inodes(spare)
    # The old version of the changed file was the spare's alone: its space went back.
    assert "d1/f007" not in kept
    assert kept == {rel: ino for rel, ino in old.items() if rel != "d1/f007"}
    # A symlink is one inode per tree, yet it stays: it holds no data, and its removal would
    # move its folder's mtime, which the next build would take for a change.
    assert (spare / "link").is_symlink()
    shared = {rel: ino for rel, ino in kept.items() if rel != "link"}
    assert shared.items() <= inodes(target).items()
    spare_root = spare.stat().st_ino
    (source / "d5/f011").write_text("third")

    result = sync(config, "server1")

    assert target.stat().st_ino == spare_root
    assert not spare.exists()
    assert snapshot(target) == snapshot(source)
    assert result.apps[0].program.stats.copied == 1


def test_a_spare_whose_shape_differs_everywhere_is_made_exact(tmp_path: Path) -> None:
    config, source, target = _published(tmp_path)
    (source / "d1/f007").write_text("second")
    sync(config, "server1")
    spare = _trash(target)[0]
    # What the spare holds, against what the source will hold: a folder for a file, a file
    # for a folder, a symlink for a file, an extra folder, an attribute the folder lost.
    # (Its files are the published tree's too: unlinked, never written to.)
    for rel in ("d0/f000", "d3/f009", "d4/f004"):
        os.unlink(spare / rel)
    write_tree(spare, {"d0/f000": Dir(), "extra/deep/x": "x", "d3/f009": Symlink("nowhere")})
    (spare / "d4/f004").write_text("stale")
    os.setxattr(spare / "d2", "user.stale", b"1")
    os.chmod(spare / "d5", 0o500)
    os.unlink(source / "d1/f001")
    write_tree(source, {"d1/f001/inner": "now a folder", "new/file": "n", "d2/f002": "new"})

    result = sync(config, "server1")

    assert result.ok
    assert snapshot(target) == snapshot(source)
    assert os.listxattr(target / "d2") == []
    assert not _spare(target).exists()


def test_a_spare_that_cannot_be_updated_is_given_up_for_a_fresh_build(tmp_path: Path) -> None:
    config, source, target = _published(tmp_path)
    (source / "d1/f007").write_text("second")
    sync(config, "server1")
    stuck = _trash(target)[0] / "d0/stuck"
    stuck.write_text("immutable")
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    try:
        (source / "d2/f008").write_text("third")
        with structlog.testing.capture_logs() as logs:
            result = sync(config, "server1")

        assert result.ok
        assert snapshot(target) == snapshot(source)
        failed = [e for e in logs if e["event"] == "publish.spare_failed"]
        assert len(failed) == 1 and "stuck" in failed[0]["error"]
    finally:
        subprocess.run(["chattr", "-R", "-i", str(tmp_path / "var")], check=False)


def test_the_spare_of_a_target_that_is_gone_is_removed(tmp_path: Path) -> None:
    config, source, target = _published(tmp_path)
    (source / "d1/f007").write_text("second")
    sync(config, "server1")
    _sweep_expired(config)
    assert _spare(target).is_dir()
    os.rename(target, tmp_path / "moved-away")

    removed = _sweep_expired(config)

    assert removed == [_spare(target)]
    assert not _spare(target).exists()
    assert os.listdir(work_area(target.parent) / "staging") == []


def test_within_the_grace_period_nothing_is_taken_from_the_trash(tmp_path: Path) -> None:
    config, source, target = _published(tmp_path, grace=600)
    first = (snapshot(target), inodes(target))
    (source / "d1/f007").write_text("second")
    sync(config, "server1")
    (source / "d2/f008").write_text("third")

    sync(config, "server1")

    trash = _trash(target)
    assert len(trash) == 2
    assert first in [(snapshot(tree), inodes(tree)) for tree in trash]
    assert snapshot(target) == snapshot(source)


def test_the_daemon_sweeps_on_a_thread_of_its_own_at_idle_io_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, source, target = _published(tmp_path)
    (source / "d1/f007").write_text("second")
    sync(config, "server1")
    seen: list[tuple[str, int | None]] = []
    real_sweep = sweeper.sweep

    def watched(root: Path, now: float | None = None) -> list[Path]:
        seen.append((threading.current_thread().name, io_priority_class(threading.get_native_id())))
        return real_sweep(root, now)

    monkeypatch.setattr(sweeper, "sweep", watched)
    service = Service(str(tmp_path / "config.yml"))

    service._sweep_expired(config)
    assert service._sweeping is not None
    service._sweeping.join(30)

    assert seen and {name for name, _ in seen} == {"syncpro-sweep"}
    assert {io_class for _, io_class in seen} == {3}
    assert _trash(target) == [] and _spare(target).is_dir()


def test_a_big_update_of_a_spare_is_exact(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER_GROUP, grace=0)
    source = program_source(config, "server1")
    count = 768
    write_tree(source, {f"d{i % 9}/f{i:04}": File(f"v1-{i}") for i in range(count)})
    write_tree(config_source(config, "server1"), {"c": "1"})
    sync(config, "server1")
    target = program_target(config, "server1")
    first_root = target.stat().st_ino
    write_tree(source, {f"d{i % 9}/f{i:04}": File(f"v2-{i}") for i in range(0, count, 2)})
    sync(config, "server1")
    # Every file rewritten, a folder gone, one new: hundreds of copies into the spare.
    write_tree(source, {f"d{i % 9}/f{i:04}": File(f"v3-{i}") for i in range(count)})
    shutil.rmtree(source / "d4")
    write_tree(source, {"new/deeper/x": "x"})

    result = sync(config, "server1")

    assert result.ok
    assert target.stat().st_ino == first_root
    assert result.apps[0].program.stats.copied == count - count // 9 + 1
    assert snapshot(target) == snapshot(source)


_CRASHER = """
import sys
from pathlib import Path
from syncpro.engine.layout import Target
from syncpro.engine.publish import publish

def build(staging, current):
    assert staging.is_dir(), "no spare was handed over"
    (staging / "v").unlink()
    (staging / "v").write_text("half")
    print(staging, flush=True)
    sys.stdin.readline()  # killed here

publish(Target(Path(sys.argv[1]), "server"), build, grace=0, durable=False, spare=True)
"""


def test_a_kill_9_while_a_spare_is_updated_leaves_the_target_and_is_swept(
    tmp_path: Path,
) -> None:
    target = Target(tmp_path / "softdir", "server")
    publish(target, lambda s, c: write_tree(s, {"v": "1"}), grace=0, durable=False)
    publish(target, lambda s, c: write_tree(s, {"v": "2"}), grace=0, durable=False)
    published = (snapshot(target.path), inodes(target.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(target.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    staging = Path(proc.stdout.readline().strip())
    assert (staging / "v").read_text() == "half"

    proc.kill()
    proc.wait(timeout=10)
    proc.stdin.close()
    proc.stdout.close()

    assert (snapshot(target.path), inodes(target.path)) == published
    assert sweep(target.root) == [staging]
    publish(target, lambda s, c: write_tree(s, {"v": "3"}), grace=0, durable=False, spare=True)
    assert (target.path / "v").read_text() == "3"


def test_syncs_and_sweeps_racing_for_the_same_trees_publish_exact_trees(tmp_path: Path) -> None:
    config, source, target = _published(tmp_path)
    stop = threading.Event()
    failures: list[BaseException] = []

    def sweep_all_the_time() -> None:
        while not stop.is_set():
            try:
                sweep(config.dirs.softdir)
            except BaseException as exc:  # sweep never raises: any exception is a failure
                failures.append(exc)
                return

    sweeper_thread = threading.Thread(target=sweep_all_the_time)
    sweeper_thread.start()
    roots: list[int] = []
    try:
        for round_ in range(40):
            (source / f"d{round_ % 6}/f{round_:03}").write_text(f"round {round_}")
            result = sync(config, "server1")
            assert result.ok, result.errors
            assert snapshot(target) == snapshot(source)
            roots.append(target.stat().st_ino)
    finally:
        stop.set()
        sweeper_thread.join(30)
    assert failures == []
    assert len(set(roots)) < len(roots), "no tree came back as a spare"
    assert os.listdir(work_area(target.parent) / "staging") == []


# --- folders of the spare left as they are ---


def _builder(reuse: Path | None) -> TreeBuilder:
    return TreeBuilder(ignore=Ignore(DEFAULT_IGNORE), reuse=reuse, preserve_owner=os.geteuid() == 0)


def _three_generations(tmp_path: Path) -> tuple[Path, Path, Path, Manifest]:
    """A source of 8 folders (4 with a subfolder), the tree A built from it, and B built
    from it reusing A, as two publishes leave them: B published (its manifest returned), A
    replaced, to be the spare of the next build."""
    spec: dict[str, object] = {}
    for i in range(8):
        spec[f"d{i}/f"] = File(f"file {i}", mtime_ns=BASE_NS + i)
        spec[f"d{i}/link"] = Symlink("f")
        if i % 2:
            spec[f"d{i}/sub/g"] = File(f"deeper {i}", mtime_ns=BASE_NS)
        spec[f"d{i}"] = Dir(mtime_ns=BASE_NS + 100 + i)
    source = write_tree(tmp_path / "src", spec)  # type: ignore[arg-type]
    os.link(source / "d0/f", source / "d1/twin")  # a file with two names, one kept
    a, b = tmp_path / "A", tmp_path / "B"
    _builder(None).copy_tree(source, a)
    second = _builder(a)
    second.copy_tree(source, b, second.plan(source))
    assert second.manifest is not None
    return source, a, b, second.manifest


def _next_build(
    source: Path,
    published: Path,
    spare: Path,
    known: Manifest,
    told: list[tuple[str, int, int]] | None = None,
) -> TreeBuilder:
    builder = _builder(published)
    if told is not None:
        builder.progress = lambda what, files, size: told.append((what, files, size))
    plan = builder.plan(source, known)
    assert not plan.unchanged
    builder.copy_tree(source, spare, plan)
    return builder


def test_a_spare_keeps_every_folder_nothing_changed_in_since_it_was_published(
    tmp_path: Path,
) -> None:
    source, spare, published, known = _three_generations(tmp_path)
    before = inodes(spare)
    (source / "d2/f").write_text("changed")
    os.utime(source / "d2/f", ns=(BASE_NS, BASE_NS + 10**9))
    told: list[tuple[str, int, int]] = []

    builder = _next_build(source, published, spare, known, told)

    assert snapshot(spare) == snapshot(source)
    # d2 and the root were filled; the 7 other top folders and their 4 subfolders were not
    # even opened.
    assert builder.folders_kept == 7 + 4
    assert builder.stats.copied == 1
    after = inodes(spare)
    assert {rel: after[rel] for rel in after if rel != "d2/f"} == {
        rel: before[rel] for rel in before if rel != "d2/f"
    }
    # The twins stay one file.
    assert os.stat(spare / "d0/f").st_ino == os.stat(spare / "d1/twin").st_ino
    assert builder.manifest is not None and builder.manifest.changed == {"d2"}
    # Progress in bulk: the 13 files planned at once, each kept folder's in one call.
    sizes = {rel: os.lstat(source / rel).st_size for rel in inodes(source)}
    assert told[0] == ("planned", 13, sum(sizes.values()))
    assert ("copied", 1, sizes["d2/f"]) in told
    assert len(told) == 1 + 1 + 7  # planned, d2/f, a call per kept folder
    assert sum(files for _, files, _ in told[1:]) == 13


def test_a_name_added_to_a_folder_of_the_spare_makes_it_filled_again(tmp_path: Path) -> None:
    # What a writer into the published tree during its replacement would leave: the folder's
    # mtime moves, so the folder is filled again and the stray file removed.
    source, spare, published, known = _three_generations(tmp_path)
    (spare / "d5/stray").write_text("not in the source")
    (source / "d2/f").write_text("changed")

    builder = _next_build(source, published, spare, known)

    assert snapshot(spare) == snapshot(source)
    assert builder.folders_kept == 7 + 4 - 1  # d5 is filled, its subfolder kept


def test_a_file_the_sweep_removed_from_a_folder_of_the_spare_is_put_back(
    tmp_path: Path,
) -> None:
    source, spare, published, known = _three_generations(tmp_path)
    os.unlink(spare / "d3/sub/g")  # as the sweep prunes a file only that tree held
    (source / "d2/f").write_text("changed")

    builder = _next_build(source, published, spare, known)

    assert snapshot(spare) == snapshot(source)
    assert builder.folders_kept == 7 + 4 - 2  # d3/sub is filled, and d3 is opened for it
    assert os.stat(spare / "d3/sub/g").st_ino == os.stat(published / "d3/sub/g").st_ino


def test_a_spare_that_is_not_the_tree_the_published_one_reused_is_filled_in_full(
    tmp_path: Path,
) -> None:
    source, _spare, published, known = _three_generations(tmp_path)
    other = tmp_path / "other"
    _builder(None).copy_tree(source, other)  # the same content, another tree
    (source / "d2/f").write_text("changed")

    builder = _next_build(source, published, other, known)

    assert snapshot(other) == snapshot(source)
    assert builder.folders_kept == 0


def test_a_manifest_written_before_the_spare_record_still_vouches_for_its_entries(
    tmp_path: Path,
) -> None:
    path = tmp_path / "manifest"
    path.write_bytes(marshal.dumps((1, (1, 2), {"a": (3, 4, 5)})))

    loaded = Manifest.load(path)

    assert loaded == Manifest((1, 2), {"a": (3, 4, 5)})
    assert loaded.reused is None and loaded.changed == frozenset()
    new = Manifest((1, 2), {"a": (3, 4, 5)}, (6, 7), frozenset({"", "x/y"}))
    new.save(path)
    assert Manifest.load(path) == new


def test_after_a_sweep_a_sync_opens_only_the_folders_on_the_way_to_a_change(
    tmp_path: Path,
) -> None:
    config, source, target = _published(tmp_path)
    (source / "d1/f007").write_text("second")
    sync(config, "server1")
    _sweep_expired(config)  # the tree replaced becomes the spare, pruned
    spare = _spare(target)
    ctimes = {d.name: d.stat().st_ctime_ns for d in spare.iterdir() if d.is_dir()}
    (source / "d4/f010").write_text("third")

    result = sync(config, "server1")

    assert result.ok and snapshot(target) == snapshot(source)
    # Filling a folder sets its mode and times again, which moves its ctime: only d1 (where
    # the sweep removed the old version, and the last sync changed a file) and d4 (changed
    # now) were filled. The others were left as they were.
    moved = {name for name, ctime in ctimes.items() if (target / name).stat().st_ctime_ns != ctime}
    assert moved == {"d1", "d4"}
