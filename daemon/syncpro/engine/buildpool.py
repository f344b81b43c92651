"""Fresh builds on processes of their own.

A target's first publish (a first start's catch-up, a new app) copies every file. Most of
that is the kernel making inodes, but each file also costs some twenty microseconds of
Python around a dozen system calls, and threads building at once hand the interpreter lock
back and forth at every one of them: on two cores, four workers spent twice the system time
of one, in context switches. Processes share no lock: two of them build 300 apps of 100
files in 0.7 s, where one thread takes 1.1 to 2.5 s and `cp -a` 0.95 s.

Only fresh builds go there: an incremental one is mostly hard links and needs the walk its
sync made against the published tree, in the daemon. What a pool build logs and tells its
progress about is sent back with its result and replayed in the daemon, in order.

A first tree that comes while no other is building (one new app, not a first start's
catch-up, whose trees keep every process busy) is shared out: every process makes its share
of its files at once (see tree.Share), and the daemon gives the folders their attributes
once all are done. One process alone copies small files slower than `cp -a` (each costs
some twenty microseconds of Python); two at once made 5,000 files of 200 MB in 0.25 s, where
one took 0.39 s and `cp -a` 0.31 s.

The processes stop when idle, and their start (some 0.2 s of both cores) costs more than a
new app's whole first tree: while they are not up, a tree of fewer than WORTH_WAITING names
is built in the daemon, and they are started after it, for the trees that follow; at once
when first trees come together (a catch-up).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import select
import shutil
import threading
import time
from collections.abc import MutableMapping
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from syncpro.engine.ignore import Ignore
from syncpro.engine.tree import CopyStats, Folder, Share, TreeBuilder, make_root
from syncpro.engine.walk import Manifest, TreePlan

log = structlog.get_logger()

IDLE_SECONDS = 10.0
"""A pool unused this long is stopped; the next first tree starts it again."""

WORTH_WAITING = 10_000
"""Names from which a first tree waits for processes still starting rather than being built
in the daemon. A process takes some 0.2 s to start (spawn, imports), longer than a small
tree's whole build: measured on an idle daemon, a new app of 100 files was published in
0.18 s on processes started for it, in 0.025 s built in the daemon; one of 5,000 files in
0.48 s and 0.35 s (0.26-0.30 s on processes already up). Bigger trees gain more from the
processes (two of them share one out) than their start costs."""


@dataclass
class FreshBuild:
    """What a build on a pool process made, for the daemon's TreeBuilder to take over."""

    written: list[str]
    stats: CopyStats
    manifest: Manifest | None
    plan: TreePlan
    """The walk's plan without its entries: its digest is what the state records."""
    told: list[tuple[str, int, int]] = field(default_factory=list)
    """The progress events, in order."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """The log events, in order."""
    folders: list[Folder] = field(default_factory=list)
    """For a share of a tree: the folders it walked, their attributes not given yet."""


class BuildPool:
    """A few processes that build fresh trees: started at the first such build, stopped once
    none has come for IDLE_SECONDS, so that a daemon at rest holds no memory for them."""

    def __init__(self) -> None:
        self._executor: ProcessPoolExecutor | None = None
        self._processes = 0
        self._busy = 0
        self._last_used = 0.0
        self._timer: threading.Timer | None = None
        self._closed = False
        self._lock = threading.Lock()
        # One trivial job per process, submitted as the pool starts: all done, it is ready.
        self._starting: list[Future[int]] = []
        self._made = 0
        self._here = 0  # first trees being built in the daemon while the processes are down

    def build(self, builder: TreeBuilder, source: Path, staging: Path, processes: int) -> None:
        """Given a builder with nothing to reuse, a source, a staging path that does not
        exist and how many processes the pool should have, build staging as
        builder.copy_tree would, on a pool process, and leave in builder what that build
        made. Raise its OSError. A pool that has broken (a process killed) is replaced, and
        this build runs in the daemon. Built while no other build runs, the tree is shared
        out to all the processes. While the processes are not up (stopped when idle), a
        tree of fewer than WORTH_WAITING names is built here, and they start after it."""
        if not self.ready(processes, start=False) and not _holds_at_least(source, WORTH_WAITING):
            self._build_here(builder, source, staging, processes)
            return
        executor, alone = self._take(processes)
        if executor is None:  # the daemon is stopping: a sync still running builds here
            builder.copy_tree(source, staging)
            return
        count = processes if alone else 1
        made_staging = False
        try:
            if count > 1:
                os.close(make_root(staging))
                made_staging = True
            futures = [
                executor.submit(
                    _fresh_build,
                    str(source),
                    str(staging),
                    builder.ignore.patterns,
                    builder.preserve_owner,
                    builder.progress is not None,
                    builder.durable,
                    Share(index, count) if count > 1 else None,
                )
                for index in range(count)
            ]
            made = _merged(_results(futures))
        except BrokenProcessPool as exc:
            log.warning("publish.build_pool_broken", error=str(exc) or type(exc).__name__)
            self._discard(executor)
            shutil.rmtree(staging, ignore_errors=True)  # what the lost process had made
            builder.copy_tree(source, staging)
            return
        except BaseException:
            if made_staging:  # as a single build whose source cannot be read: no tree
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._give_back()
        for event in made.events:
            level = event.pop("level", "info")
            getattr(log, level, log.info)(event.pop("event"), **event)
        with self._lock:
            self._made += 1
        builder.stats, builder.written = made.stats, made.written
        builder.manifest, builder.last_plan = made.manifest, made.plan
        if count > 1:
            builder.finish_folders(staging, made.folders)
        if builder.progress is not None:
            for what, files, size in made.told:
                builder.progress(what, files, size)

    @property
    def running(self) -> bool:
        """Whether the processes are up or starting."""
        with self._lock:
            return self._executor is not None

    @property
    def made(self) -> int:
        """How many trees the processes have built."""
        with self._lock:
            return self._made

    def close(self) -> None:
        """Stop the processes, letting builds running finish; no build starts one again."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
            if self._timer is not None:
                self._timer.cancel()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def ready(self, processes: int, *, start: bool = True) -> bool:
        """Whether the pool of `processes` is up and every process has answered; with
        `start`, start it if it is not running. A pool whose processes failed to start is
        stopped: the next start starts another. False once closed."""
        with self._lock:
            if self._closed:
                return False
            if not start and (self._executor is None or self._processes != processes):
                return False
            old = self._ensure(processes)
            done = all(job.done() for job in self._starting)
            failed = done and any(job.cancelled() or job.exception() for job in self._starting)
            if failed:
                old, self._executor, self._starting = self._executor, None, []
            elif done:
                self._starting = []
        if old is not None:
            old.shutdown(wait=False)
        return done and not failed

    def _build_here(
        self, builder: TreeBuilder, source: Path, staging: Path, processes: int
    ) -> None:
        """Build a first tree in the daemon while the processes are down, and start them:
        after it, or at once when another is being built here too."""
        with self._lock:
            others = self._here
            self._here += 1
        if others:
            # Builds coming together (a catch-up, a storm) are what the processes are for:
            # start them now, not after the first of them.
            self.ready(processes)
        try:
            builder.copy_tree(source, staging)
        finally:
            with self._lock:
                self._here -= 1
            # Started once this build is done, for the next: the start's CPU (both cores for
            # some 0.2 s) slowed a build of 5,000 files from 0.35 s to 0.49 s.
            self.ready(processes)

    def _take(self, processes: int) -> tuple[ProcessPoolExecutor | None, bool]:
        """Return the pool (None once closed) and whether no other build is running on it."""
        with self._lock:
            if self._closed:
                return None, False
            old = self._ensure(processes)
            alone = self._busy == 0
            self._busy += 1
            executor = self._executor
        if old is not None:
            old.shutdown(wait=False)  # its builds running finish and are collected
        return executor, alone

    def _ensure(self, processes: int) -> ProcessPoolExecutor | None:
        """With the lock held: have a pool of `processes` running or starting; return the
        one it replaces (a reload changed the count), for the caller to shut down."""
        old = None
        if self._executor is not None and self._processes != processes:
            old, self._executor = self._executor, None
        if self._executor is None:
            # Not fork: the daemon has threads, and a child forked from it could inherit
            # a lock one of them held. Nor a fork server, which would outlive the pool.
            self._executor = ProcessPoolExecutor(
                processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child,
                initargs=(os.getpid(),),
            )
            self._processes = processes
            # A process is spawned per job while none is idle: one job each starts them all.
            self._starting = [self._executor.submit(_answer) for _ in range(processes)]
            self._last_used = time.monotonic()
            if self._timer is None:
                self._arm(IDLE_SECONDS)  # started and never used, it stops all the same
        return old

    def _give_back(self) -> None:
        with self._lock:
            self._busy -= 1
            self._last_used = time.monotonic()
            if self._timer is None and not self._closed:
                self._arm(IDLE_SECONDS)

    def _stop_if_idle(self) -> None:
        with self._lock:
            self._timer = None
            if self._closed or self._executor is None:
                return
            left = self._last_used + IDLE_SECONDS - time.monotonic()
            if self._busy or left > 0:
                self._arm(max(left, 0.1))
                return
            executor, self._executor, self._starting = self._executor, None, []
        executor.shutdown(wait=False)

    def _arm(self, delay: float) -> None:
        """Look again in `delay` seconds whether the pool is idle; with the lock held."""
        self._timer = threading.Timer(delay, self._stop_if_idle)
        self._timer.daemon = True
        self._timer.start()

    def _discard(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is executor:
                self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)


def _results(futures: list[Future[FreshBuild]]) -> list[FreshBuild]:
    """Wait for every share of a build, then return what they made or raise the first
    error: none may still write into a staging tree the caller removes."""
    wait(futures)
    return [future.result() for future in futures]


def _merged(shares: list[FreshBuild]) -> FreshBuild:
    """What the shares of one tree made, as one build: the plan is the first share's (each
    walked the whole source), its progress told every file planned before any made."""
    if len(shares) == 1:
        return shares[0]
    stats = CopyStats()
    first = shares[0].manifest  # every share made its manifest of the same root
    entries: dict[str, tuple[int, int, int]] = {}
    manifest = Manifest(first.root, entries) if first is not None else None
    made = FreshBuild([], stats, manifest, shares[0].plan)
    done: list[tuple[str, int, int]] = []
    for share in shares:
        stats.add(share.stats)
        made.written.extend(share.written)
        if share.manifest is not None:
            entries.update(share.manifest.entries)
        made.told.extend(t for t in share.told if t[0] == "planned")
        done.extend(t for t in share.told if t[0] != "planned")
        made.events.extend(share.events)
        made.folders.extend(share.folders)
    made.told.extend(done)
    return made


def _holds_at_least(source: Path, count: int) -> bool:
    """Whether source holds `count` names or more, all folders down: a walk by names alone
    (no stat), which stops there."""
    folders, seen = [str(source)], 0
    try:
        while folders:
            with os.scandir(folders.pop()) as names:
                for name in names:
                    seen += 1
                    if seen >= count:
                        return True
                    if name.is_dir(follow_symlinks=False):
                        folders.append(name.path)
    except OSError:
        return False  # the build says what is wrong
    return False


def _answer() -> int:
    """In a pool process, once it has started: what the daemon waits for."""
    return os.getpid()


def _start_child(daemon: int) -> None:
    """In a pool process: end with the daemon, even one killed outright, so that no builder
    is left writing into its staging area. (Not PR_SET_PDEATHSIG: that fires when the thread
    that started the process ends, here whichever thread's build needed one.)"""
    try:
        watched = os.pidfd_open(daemon)
    except ProcessLookupError:
        os._exit(1)

    def watch() -> None:
        select.select([watched], [], [])  # readable once the daemon has exited
        os._exit(1)

    threading.Thread(target=watch, name="syncpro-build-watch", daemon=True).start()


def _fresh_build(
    source: str,
    staging: str,
    patterns: tuple[str, ...],
    preserve_owner: bool,
    told: bool,
    durable: bool,
    share: Share | None,
) -> FreshBuild:
    """In a pool process: build staging from source (its share of it, if given), keeping
    what it logs and tells."""
    events: list[dict[str, Any]] = []

    def keep(_logger: object, _name: str, event: MutableMapping[str, Any]) -> str:
        events.append(dict(event))
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.processors.add_log_level, keep])
    progress: list[tuple[str, int, int]] = []
    builder = TreeBuilder(
        ignore=Ignore(patterns),
        reuse=None,
        preserve_owner=preserve_owner,
        progress=(lambda what, files, size: progress.append((what, files, size))) if told else None,
        durable=durable,
        share=share,
    )
    builder.copy_tree(Path(source), Path(staging))
    assert builder.last_plan is not None
    plan = dataclasses.replace(builder.last_plan, entries=[], skipped=[])
    return FreshBuild(
        builder.written, builder.stats, builder.manifest, plan, progress, events, builder.folders
    )
