"""Property: after any sequence of source changes and syncs, every target equals its source
exactly and the sources are never changed by a sync."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncpro.config.model import Config
from syncpro.engine.publish import sweep

from helpers import (
    BASE_NS,
    Dir,
    File,
    Symlink,
    app,
    config_source,
    config_target,
    make_config,
    program_source,
    program_target,
    snapshot,
    sync,
    write_tree,
)

APPS = [app("a1", "a"), app("b1", "b")]
# (k, update) of the syncs a sequence may run, and the apps each selects.
SYNCS = {("all", False): ("a1", "b1"), ("a1", False): ("a1",), ("b1", False): ("b1",)}
SYNCS |= {("a1", True): ("a1",), ("all", True): ("a1", "b1")}
LINK_TARGETS = ["a", "b/c", "../../outside", "/nonexistent/x", "."]
MODES = [0o600, 0o644, 0o755, 0o700, 0o4755, 0o2750, 0o1777, 0o000]

# Every source starts with a file, a nested file, an empty dir and a symlink, all published.
SEED = {"b/a": File("ba", mtime_ns=BASE_NS), "a": Dir(), "b/l": Symlink("a")}
SOURCE_COUNT = 6  # program and config of a1 and b1 (update=0), of a1 (update=1)
paths = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map("/".join)
sources = st.integers(0, SOURCE_COUNT - 1)
picks = st.integers(0, 63)  # which existing entry of the source a change applies to
steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), sources, paths, st.binary(max_size=48)),
        st.tuples(st.just("modify"), sources, picks, st.binary(max_size=48)),
        st.tuples(st.just("delete"), sources, picks),
        st.tuples(st.just("mkdir"), sources, paths),
        st.tuples(st.just("symlink"), sources, paths, st.sampled_from(LINK_TARGETS)),
        st.tuples(st.just("chmod"), sources, picks, st.sampled_from(MODES)),
        st.tuples(st.just("touch"), sources, picks),
        # Three sync branches of eleven: changes meet a published tree often.
        *[st.tuples(st.just("sync"), st.sampled_from(sorted(SYNCS)))] * 3,
        # The sweep: replaced trees become spares, without the files only they held.
        st.tuples(st.just("sweep")),
    ),
    min_size=8,
    max_size=30,
)


class World:
    """Sources and targets of one example, with the expected content of every target."""

    def __init__(self, root: Path) -> None:
        self.config: Config = make_config(root, APPS, grace=0, fsync=False)
        self.sources = [
            program_source(self.config, "a1"),
            config_source(self.config, "a1"),
            program_source(self.config, "b1"),
            config_source(self.config, "b1"),
            program_source(self.config, "a1", update=True),
            config_source(self.config, "a1", update=True),
        ]
        (root / "outside").mkdir()
        self.expected: dict[Path, dict[str, tuple[Any, ...]]] = {}
        self.clock = 0
        for source in self.sources:
            write_tree(source, {**SEED, "c": File("c", mtime_ns=self.tick())})

    def publish_all(self) -> None:
        """Sync everything once, so that changes meet published trees."""
        self.sync("all", False)
        self.sync("a1", True)

    def tick(self) -> int:
        # Every change gets a distinct mtime: size+mtime+mode is what tells a changed file.
        self.clock += 1
        return BASE_NS + self.clock * 1_000_000_007

    # --- source changes ---

    def _make_parents(self, path: Path, base: Path) -> None:
        for parent in reversed(path.relative_to(base).parents[:-1]):
            full = base / parent
            if full.is_symlink() or (full.exists() and not full.is_dir()):
                full.unlink()
            full.mkdir(exist_ok=True)

    def _remove(self, path: Path) -> None:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        elif path.is_dir():
            for dirpath, _, _ in os.walk(path):
                os.chmod(dirpath, 0o700)
            shutil.rmtree(path)

    def _pick(self, base: Path, index: int, *, files_only: bool = False) -> Path | None:
        """The index-th entry under base (wrapping), never following links; None if empty."""
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames) if files_only else sorted(dirnames + filenames):
                path = Path(dirpath) / name
                if not files_only or not path.is_symlink():
                    found.append(path)
        return found[index % len(found)] if found else None

    def apply(self, step: tuple[Any, ...]) -> None:
        kind = step[0]
        if kind == "sync":
            self.sync(*step[1])
            return
        if kind == "sweep":
            for root in (self.config.dirs.softdir, self.config.dirs.configuredir):
                sweep(root, now=time.time() + 1)  # a grace of 0, whatever the clock says
            return
        base = self.sources[step[1]]
        if kind in ("write", "mkdir", "symlink"):
            path = base / step[2]
            self._make_parents(path, base)
            if os.path.lexists(path) and not (kind == "mkdir" and path.is_dir()):
                self._remove(path)
            if kind == "write":
                path.write_bytes(step[3])
                mtime = self.tick()
                os.utime(path, ns=(mtime, mtime))
            elif kind == "mkdir":
                path.mkdir(exist_ok=True)
            else:
                os.symlink(step[3], path)
            return
        picked = self._pick(base, step[2], files_only=kind in ("modify", "chmod"))
        if picked is None:
            return
        if kind == "modify":
            picked.write_bytes(step[3])
            mtime = self.tick()
            os.utime(picked, ns=(mtime, mtime))
        elif kind == "delete":
            self._remove(picked)
        elif kind == "chmod":
            if not picked.is_symlink():
                os.chmod(picked, step[3])
        elif kind == "touch":
            mtime = self.tick()
            os.utime(picked, ns=(mtime, mtime), follow_symlinks=False)

    # --- syncs and the property ---

    def sync(self, k: str, update: bool) -> None:
        before = [snapshot(s, identity=True) for s in self.sources]
        result = sync(self.config, k, update=update)
        assert [snapshot(s, identity=True) for s in self.sources] == before, "a source changed"
        for key in SYNCS[(k, update)]:
            outcome = next(a for a in result.apps if a.app_key == key)
            pairs = [
                (program_source(self.config, key, update=update), program_target(self.config, key)),
                (config_source(self.config, key, update=update), config_target(self.config, key)),
            ]
            for (source, target), target_outcome in zip(
                pairs, (outcome.program, outcome.config), strict=True
            ):
                if source.is_dir():
                    assert target_outcome.status == "published", target_outcome.error
                    self.expected[target] = snapshot(source)
        self.check()

    def check(self) -> None:
        for target, expected in self.expected.items():
            assert snapshot(target) == expected, f"{target} differs from its source"

    def make_writable(self) -> None:
        """Let the temporary directory be removed whatever modes the example left."""
        root = self.config.path.parent
        for dirpath, _, _ in os.walk(root):
            if not os.path.islink(dirpath):
                os.chmod(dirpath, stat.S_IRWXU)


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(steps=steps)
def test_every_target_equals_its_source_after_any_changes_and_syncs(
    steps: list[tuple[Any, ...]],
) -> None:
    with tempfile.TemporaryDirectory(prefix="syncpro-property-") as tmp:
        world = World(Path(tmp))
        try:
            world.publish_all()
            for step in steps:
                world.apply(step)
            world.publish_all()
        finally:
            world.make_writable()
