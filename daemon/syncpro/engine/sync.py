"""The sync engine: select apps, build their trees, publish them, report one result."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from syncpro.config.model import Config
from syncpro.engine import layout
from syncpro.engine.buildpool import BuildPool
from syncpro.engine.drift import tree_differences
from syncpro.engine.plan import ConfigPlan, ProgramPlan, config_plan, program_plans
from syncpro.engine.publish import manifest_path, publish, sweep
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
    # which build finished first. One target (a one-app request, the daemon's usual) needs no
    # pool: starting and joining its threads cost a millisecond a sync.
    with _Runner(config.publish.parallel) as pool:
        if PROGRAM in request.parts:
            plans = program_plans(config.dirs, selection.apps, request.update)
            parts = pool.map(
                lambda p: _sync_program(config, request.update, p, ignore, progress, builds),
                plans,
            )
            for program in parts:
                program.merge_into(outcomes, result)
        if CONFIG in request.parts:
            found = [config_plan(config.dirs, app, request.update) for app in selection.apps]
            made = pool.map(lambda c: _sync_config(config, c, ignore, progress, builds), found)
            for plan, config_outcome in zip(found, made, strict=True):
                outcomes[plan.app.app_key].config = config_outcome
                if config_outcome.status == MISSING:
                    result.missing_config.append(str(plan.source))
    for app_outcome in outcomes.values():
        for target in (app_outcome.program, app_outcome.config):
            if target is not None and target.digest is not None:
                result.digests[target.source] = target.digest
    result.seconds = time.monotonic() - clock
    _report(result)
    return result


class _Runner:
    """Runs a function over targets: on a pool of `parallel` threads, started only for a map
    of more than one target (and then kept for the rest of the sync)."""

    def __init__(self, parallel: int) -> None:
        self._parallel = parallel
        self._pool: ThreadPoolExecutor | None = None

    def map(self, work: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if len(items) < 2 or self._parallel < 2:
            return [work(item) for item in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._parallel)
        return list(self._pool.map(work, items))

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

    def merge_into(self, outcomes: dict[str, AppOutcome], result: SyncResult) -> None:
        for key, outcome in self.outcomes.items():
            outcomes[key].program = outcome
        for source in self.missing:
            if source not in result.missing_program:
                result.missing_program.append(source)
        result.drift.extend(self.drift)
        result.digests.update(self.digests)


def _sync_program(
    config: Config,
    update: bool,
    plan: ProgramPlan,
    ignore: Ignore,
    progress: Progress | None = None,
    builds: BuildPool | None = None,
) -> _ProgramRun:
    run = _ProgramRun()
    target = plan.target
    for app, source in plan.missing:
        run.outcomes[app.app_key] = TargetOutcome("program", str(source), str(target.path), MISSING)
        run.missing.append(str(source))
    if plan.winner is None:
        return run
    winner, source = plan.winner
    if not update:
        run.drift = _drift(plan.group, list(plan.present), ignore, run.digests)
    published = _publish(config, "program", source, target, ignore, None, progress, builds)
    for app, app_source in plan.present:
        if app is winner:
            run.outcomes[app.app_key] = published
            continue
        run.outcomes[app.app_key] = TargetOutcome(
            "program",
            str(app_source),
            str(target.path),
            SUPERSEDED if published.ok else FAILED,
            error=None if published.ok else published.error,
            winner=winner.app_key,
        )
    return run


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


def _sync_config(
    config: Config,
    plan: ConfigPlan,
    ignore: Ignore,
    progress: Progress | None = None,
    builds: BuildPool | None = None,
) -> TargetOutcome:
    if not plan.exists:
        return TargetOutcome("config", str(plan.source), str(plan.target.path), MISSING)
    return _publish(
        config, "config", plan.source, plan.target, ignore, plan.listed, progress, builds
    )


def _publish(
    config: Config,
    kind: str,
    source: Path,
    target: layout.Target,
    ignore: Ignore,
    listed: tuple[str, ...] | None,
    progress: Progress | None = None,
    builds: BuildPool | None = None,
) -> TargetOutcome:
    started = time.monotonic()
    builder: TreeBuilder | None = None
    plan: TreePlan | None = None
    preserve_owner = os.geteuid() == 0

    manifest_file = manifest_path(target)

    def unchanged(current: Path) -> bool:
        # The one walk of the source: it answers this and tells the build what to reuse.
        nonlocal builder, plan
        builder = TreeBuilder(
            ignore=ignore, reuse=current, preserve_owner=preserve_owner, progress=progress
        )
        plan = builder.plan(source, Manifest.load(manifest_file))
        return plan.unchanged

    def build(staging: Path, current: Path | None) -> list[str]:
        nonlocal builder, plan
        if builder is None or builder.reuse != current:
            # No walk yet against this published tree: copy_tree makes its own.
            builder = TreeBuilder(
                ignore=ignore, reuse=current, preserve_owner=preserve_owner, progress=progress
            )
            plan = None
        if listed is not None:
            builder.copy_listed(source, listed, staging)
        elif builds is not None and current is None and not os.path.lexists(staging):
            builds.build(builder, source, staging, config.publish.processes)  # a first tree
        else:
            builder.copy_tree(source, staging, plan)
        return builder.written

    outcome = TargetOutcome(kind, str(source), str(target.path), PUBLISHED)
    try:
        published = publish(
            target,
            build,
            grace=config.publish.grace,
            durable=config.publish.fsync,
            # A type-2 list is small and its checks must run: always build it.
            unchanged=unchanged if listed is None else None,
            spare=listed is None,
        )
        outcome.unchanged = published.unchanged
        _keep_manifest(manifest_file, builder, published.unchanged)
    except ListedFileError as exc:
        outcome.status, outcome.error = FAILED, "; ".join(exc.problems)
    except PublishError as exc:
        outcome.status, outcome.error = FAILED, str(exc)
    except OSError as exc:  # the work area itself could not be made
        outcome.status, outcome.error = FAILED, f"cannot publish {target.path}: {exc}"
    outcome.seconds = time.monotonic() - started
    if builder is not None:
        outcome.stats = builder.stats
        if builder.last_plan is not None and listed is None:
            outcome.digest = (builder.last_plan.digest, builder.last_plan.newest_ctime)
    if outcome.status == FAILED:
        log.error("sync.target_failed", kind=kind, target=str(target.path), error=outcome.error)
    return outcome


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
