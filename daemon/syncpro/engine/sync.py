"""The sync engine: select apps, build their trees, publish them, report one result."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from syncpro.config.model import Config
from syncpro.engine import gcpause, layout
from syncpro.engine.buildpool import BuildPool
from syncpro.engine.drift import tree_differences
from syncpro.engine.plan import ConfigPlan, ProgramPlan, config_plan, program_plans
from syncpro.engine.publish import (
    Published,
    Staged,
    commit,
    lock_order,
    locks_held,
    manifest_path,
    stage,
    sweep,
)
from syncpro.engine.request import CONFIG, PROGRAM, SyncRequest
from syncpro.engine.response import response_document
from syncpro.engine.result import (
    FAILED,
    MISSING,
    PUBLISHED,
    SUPERSEDED,
    AppOutcome,
    Drift,
    SyncResult,
    TargetOutcome,
)
from syncpro.engine.selection import select
from syncpro.engine.tree import Ignore, ListedFileError, Progress, TreeBuilder
from syncpro.engine.walk import Manifest, TreePlan, plan_path
from syncpro.errors import PublishError, RequestError
from syncpro.inventory.apps import App, Inventory

log = structlog.get_logger()
T = TypeVar("T")
R = TypeVar("R")

_swept: set[Path] = set()
_swept_lock = threading.Lock()


def sweep_once(config: Config) -> None:
    """Remove leftovers of crashed runs under the target roots, once per process."""
    with _swept_lock:
        for root in (config.dirs.softdir, config.dirs.configuredir):
            if root not in _swept:
                _swept.add(root)
                sweep(root)


def ignore_for(config: Config) -> Ignore:
    """The names never published: upload temporaries, and the ready marker if one is set."""
    patterns = list(config.watch.ignore)
    if config.watch.ready_marker:
        patterns.append(config.watch.ready_marker)
    return Ignore(patterns)


def run_sync(
    request: SyncRequest,
    config: Config,
    inventory: Inventory,
    progress: Progress | None = None,
    builds: BuildPool | None = None,
) -> SyncResult:
    """Given a request, the config and the inventory, sync every selected app and return the
    result, telling `progress` of each file built. A target's first tree is built on
    `builds`, if given. Raise RequestError if `k` selects nothing at all (empty)."""
    tokens = request.tokens
    if not tokens:
        raise RequestError("k must not be empty: give an app_key, a local_name or all")
    sweep_once(config)
    if not config.publish.processes:
        builds = None  # first trees are built here, as every other
    result = SyncResult(request=request, started=time.time(), config_path=config.path)
    clock = time.monotonic()
    selection = select(tokens, inventory)
    result.unknown = selection.unknown
    result.skipped = selection.skipped
    outcomes = {app.app_key: AppOutcome(app.app_key, app.local_name) for app in selection.apps}
    result.apps = list(outcomes.values())
    ignore = ignore_for(config)

    # Targets are independent (a lock each); their builds wait on the disk, so a few at once
    # overlap well. Results are gathered in selection order: the document does not depend on
    # which build finished first. One app's two targets (a one-app request, the daemon's
    # usual) need no pool: starting and joining its threads cost a millisecond a sync.
    with _Runner(config.publish.parallel) as pool:
        programs, configs = _targets(config, request, selection.apps, ignore, progress)
        if not request.update:
            pool.map(lambda p: p[1].check_drift(p[0], ignore), programs)
        targets = [p for _, _, p in programs if p is not None] + [p for _, p in configs if p]
        _publish_all(config, targets, pool, builds)
    for plan, run, publishing in programs:
        run.record(plan, publishing.outcome if publishing is not None else None)
        run.merge_into(outcomes, result)
    for found, publishing in configs:
        if publishing is None:
            result.missing_config.append(str(found.source))
        outcomes[found.app.app_key].config = (
            publishing.outcome
            if publishing is not None
            else TargetOutcome("config", str(found.source), str(found.target.path), MISSING)
        )
    for app_outcome in outcomes.values():
        for target in (app_outcome.program, app_outcome.config):
            if target is not None and target.digest is not None:
                result.digests[target.source] = target.digest
    result.seconds = time.monotonic() - clock
    _report(result)
    return result


Programs = list[tuple[ProgramPlan, "_ProgramRun", "_TargetPublish | None"]]
Configs = list[tuple[ConfigPlan, "_TargetPublish | None"]]


def _targets(
    config: Config,
    request: SyncRequest,
    apps: tuple[App, ...],
    ignore: Ignore,
    progress: Progress | None,
) -> tuple[Programs, Configs]:
    """The request's targets, each with its publish when its source exists: a program
    target per group, a config target per app, for the parts the request names."""

    def publishing(
        kind: str, source: Path, target: layout.Target, listed: tuple[str, ...] | None
    ) -> _TargetPublish:
        return _TargetPublish(config, kind, source, target, ignore, listed, progress)

    programs: Programs = []
    if PROGRAM in request.parts:
        for plan in program_plans(config.dirs, apps, request.update):
            winner = plan.winner
            program = publishing("program", winner[1], plan.target, None) if winner else None
            programs.append((plan, _ProgramRun(), program))
    configs: Configs = []
    if CONFIG in request.parts:
        for app in apps:
            found = config_plan(config.dirs, app, request.update)
            made = None
            if found.exists:
                made = publishing("config", found.source, found.target, found.listed)
            configs.append((found, made))
    return programs, configs


SERIAL_MAX = 2
"""Targets run one after the other rather than on threads: an app's program and config."""


class _Runner:
    """Runs a function over targets: on a pool of `parallel` threads, started only for a map
    of more than SERIAL_MAX targets (and then kept for the rest of the sync)."""

    def __init__(self, parallel: int) -> None:
        self._parallel = parallel
        self._pool: ThreadPoolExecutor | None = None

    def serial(self, count: int) -> bool:
        """Whether `count` targets run one after the other, here."""
        return count <= SERIAL_MAX or self._parallel < 2

    def map(self, work: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if self.serial(len(items)):
            return [work(item) for item in items]
        return list(self._threads().map(work, items))

    def submit(self, work: Callable[..., R], *args: object, inline: bool) -> Future[R]:
        """Start work(*args) on the pool, or run it now when `inline`."""
        if not inline:
            return self._threads().submit(work, *args)
        done: Future[R] = Future()
        try:
            done.set_result(work(*args))
        except Exception as exc:  # kept for result(), as the pool's own futures do
            done.set_exception(exc)
        return done

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._parallel)
        return self._pool

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()


@dataclass
class _ProgramRun:
    """What syncing one group's program target gave, merged into the result in order."""

    outcomes: dict[str, TargetOutcome] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    drift: list[Drift] = field(default_factory=list)
    digests: dict[str, tuple[str, float]] = field(default_factory=dict)

    def check_drift(self, plan: ProgramPlan, ignore: Ignore) -> None:
        """Compare the group's other present sources with the winner's (before publishing)."""
        if plan.winner is not None:
            self.drift = _drift(plan.group, list(plan.present), ignore, self.digests)

    def record(self, plan: ProgramPlan, published: TargetOutcome | None) -> None:
        """Given the winner's outcome (None: no app of the group has a source), set every
        app's: the winner's own, superseded (or failed with it) for the others, missing."""
        target = plan.target
        for app, source in plan.missing:
            self.outcomes[app.app_key] = TargetOutcome(
                "program", str(source), str(target.path), MISSING
            )
            self.missing.append(str(source))
        if plan.winner is None or published is None:
            return
        winner = plan.winner[0]
        for app, app_source in plan.present:
            if app is winner:
                self.outcomes[app.app_key] = published
                continue
            self.outcomes[app.app_key] = TargetOutcome(
                "program",
                str(app_source),
                str(target.path),
                SUPERSEDED if published.ok else FAILED,
                error=None if published.ok else published.error,
                winner=winner.app_key,
            )

    def merge_into(self, outcomes: dict[str, AppOutcome], result: SyncResult) -> None:
        for key, outcome in self.outcomes.items():
            outcomes[key].program = outcome
        for source in self.missing:
            if source not in result.missing_program:
                result.missing_program.append(source)
        result.drift.extend(self.drift)
        result.digests.update(self.digests)


def _drift(
    group: str,
    existing: list[tuple[App, Path]],
    ignore: Ignore,
    digests: dict[str, tuple[str, float]],
) -> list[Drift]:
    winner, winner_source = existing[-1]
    found: list[Drift] = []
    winner_plan: TreePlan | None = None
    for app, source in existing[:-1]:
        try:
            if winner_plan is None:  # walked once for all the group's comparisons
                winner_plan = plan_path(winner_source, None, ignore, owners=False)
            plan = plan_path(source, None, ignore, owners=False)
            digests[str(source)] = (plan.digest, plan.newest_ctime)
            count, paths = tree_differences(
                source, winner_source, ignore, plans=(plan, winner_plan)
            )
        except OSError as exc:
            log.warning("sync.drift_check_failed", group=group, app_key=app.app_key, error=str(exc))
            continue
        if count:
            found.append(Drift(group, (app.app_key, winner.app_key), count, tuple(paths)))
    return found


COMMIT_BATCH = 64
"""Targets published together: built, made durable by one flush, swapped, their locks held
until then. Bounds how long a batch keeps its targets locked, and what a failed flush undoes."""


def _publish_all(
    config: Config,
    targets: list[_TargetPublish],
    pool: _Runner,
    builds: BuildPool | None,
) -> None:
    """Publish every target, COMMIT_BATCH at a time: each batch's locks are taken in
    lock_order, each target's build starting on the pool as soon as it holds its lock; then
    one flush makes them all durable (a catch-up of a thousand apps pays a few dozen
    flushes, not two per app) and each is swapped in."""
    for batch in _batches(targets, COMMIT_BATCH):
        batch = sorted(batch, key=lambda t: lock_order(t.target))
        inline = pool.serial(len(batch))
        # The walks, builds and manifests of the batch, on whichever threads they run.
        with locks_held() as take, gcpause.paused():
            building: list[tuple[_TargetPublish, Future[Staged | None]]] = []
            for t in batch:
                try:
                    take(t.target)
                except PublishError as exc:
                    t.failed(exc)
                    continue
                building.append((t, pool.submit(t.stage, builds, inline=inline)))
            wait([f for _, f in building])  # none left building once the locks go
            ready = [(t, s) for t, f in building if (s := f.result()) is not None]
            done = commit(
                [s for _, s in ready], grace=config.publish.grace, durable=config.publish.fsync
            )
            for (t, _), published in zip(ready, done, strict=True):
                t.finish(published)


def _batches(targets: list[_TargetPublish], size: int) -> Iterator[list[_TargetPublish]]:
    """Consecutive runs of at most `size` targets, never one target twice in a run (a second
    lock of it would wait for the first)."""
    batch: list[_TargetPublish] = []
    paths: set[Path] = set()
    for t in targets:
        if len(batch) == size or t.target.path in paths:
            yield batch
            batch, paths = [], set()
        batch.append(t)
        paths.add(t.target.path)
    if batch:
        yield batch


class _TargetPublish:
    """One target's publish within a sync: the walk of its source, its build, its outcome."""

    def __init__(
        self,
        config: Config,
        kind: str,
        source: Path,
        target: layout.Target,
        ignore: Ignore,
        listed: tuple[str, ...] | None,
        progress: Progress | None,
    ) -> None:
        self.config = config
        self.source = source
        self.target = target
        self.listed = listed
        self.outcome = TargetOutcome(kind, str(source), str(target.path), PUBLISHED)
        self._ignore = ignore
        self._progress = progress
        self._builder: TreeBuilder | None = None
        self._plan: TreePlan | None = None
        self._manifest_file = manifest_path(target)
        self._preserve_owner = os.geteuid() == 0
        self._started = time.monotonic()

    def stage(self, builds: BuildPool | None) -> Staged | None:
        """Build the new tree; return it staged, or None when there is nothing to swap in
        (the published tree is unchanged, or the build failed: see `outcome`)."""
        self._started = time.monotonic()
        try:
            staged = stage(
                self.target,
                lambda staging, current: self._build(staging, current, builds),
                # A type-2 list is small and its checks must run: always build it.
                unchanged=self._unchanged if self.listed is None else None,
                spare=self.listed is None,
            )
        except ListedFileError as exc:
            self._fail("; ".join(exc.problems))
            return None
        except PublishError as exc:
            self.failed(exc)
            return None
        if isinstance(staged, Published):
            self.finish(staged)
            return None
        # Built: until the batch is flushed and swapped in, only the walk's digest is needed.
        self._plan = None
        if self._builder is not None:
            self._builder.forget_entries()
        return staged

    def _unchanged(self, current: Path) -> bool:
        # The one walk of the source: it answers this and tells the build what to reuse.
        self._builder = self._new_builder(current)
        self._plan = self._builder.plan(self.source, Manifest.load(self._manifest_file))
        return self._plan.unchanged

    def _build(self, staging: Path, current: Path | None, builds: BuildPool | None) -> list[str]:
        builder = self._builder
        if builder is None or builder.reuse != current:
            # No walk yet against this published tree: copy_tree makes its own.
            builder = self._builder = self._new_builder(current)
            self._plan = None
        if self.listed is not None:
            builder.copy_listed(self.source, self.listed, staging)
        elif (
            builds is not None
            and current is None
            and not os.path.lexists(staging)
            and not _few_files(self.source)
        ):
            builds.build(builder, self.source, staging, self.config.publish.processes)
        else:
            builder.copy_tree(self.source, staging, self._plan)
        return builder.written

    def _new_builder(self, reuse: Path | None) -> TreeBuilder:
        return TreeBuilder(
            ignore=self._ignore,
            reuse=reuse,
            preserve_owner=self._preserve_owner,
            progress=self._progress,
            durable=self.config.publish.fsync,
        )

    def finish(self, published: Published | PublishError) -> None:
        """Record how the publish ended: its outcome, and the manifest of the tree."""
        if isinstance(published, PublishError):
            self.failed(published)
            return
        self.outcome.unchanged = published.unchanged
        _keep_manifest(self._manifest_file, self._builder, published.unchanged)
        self._close()

    def failed(self, error: PublishError) -> None:
        self._fail(str(error))

    def _fail(self, error: str) -> None:
        self.outcome.status, self.outcome.error = FAILED, error
        log.error(
            "sync.target_failed", kind=self.outcome.kind, target=self.outcome.target, error=error
        )
        self._close()

    def _close(self) -> None:
        outcome = self.outcome
        outcome.seconds = time.monotonic() - self._started
        builder = self._builder
        if builder is not None:
            outcome.stats = builder.stats
            if builder.last_plan is not None and self.listed is None:
                outcome.digest = (builder.last_plan.digest, builder.last_plan.newest_ctime)


FEW_FILES = 8


def _few_files(source: Path) -> bool:
    """Whether a source is at most FEW_FILES names and no folder (a config, as a rule): its
    first tree is built in the daemon, where it costs less than the round trip to a build
    process. Measured: a first start of 1,000 apps took 4.1-4.2 s instead of 4.6-4.9 s with
    their one-file configs built in the daemon, the processes' CPU unchanged."""
    try:
        with os.scandir(source) as names:
            for count, name in enumerate(names, 1):
                if count > FEW_FILES or name.is_dir(follow_symlinks=False):
                    return False
    except OSError:
        return False  # the build says what is wrong
    return True


def _keep_manifest(path: Path, builder: TreeBuilder | None, unchanged: bool) -> None:
    """Record what this publish compared in full, so the next walk need not read it again."""
    if builder is None:
        return
    plan = builder.last_plan
    if unchanged and (plan is None or not plan.read_in_full):
        return  # the manifest on disk vouched for every entry: it is still right
    manifest = (plan.manifest() if plan is not None else None) if unchanged else builder.manifest
    if manifest is None:
        return
    try:
        path.parent.mkdir(exist_ok=True)
        manifest.save(path)
    except OSError as exc:  # a cache: the next walk compares in full
        log.warning("publish.manifest_not_saved", path=str(path), error=str(exc))


def _report(result: SyncResult) -> None:
    # A failed sync is a warning (its failed targets were errors), so `-q` never hides it.
    emit = log.info if result.ok else log.warning
    emit(
        "sync.finished",
        ok=result.ok,
        k=result.request.normalised_k,
        update=result.request.update,
        origin=result.request.origin,
        seconds=round(result.seconds, 6),
        response=response_document(result),
    )
