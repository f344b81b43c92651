"""The sync engine: select apps, build their trees, publish them, report one result."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import structlog

from syncpro.config.model import Config
from syncpro.engine import layout
from syncpro.engine.drift import tree_differences
from syncpro.engine.publish import publish, sweep
from syncpro.engine.request import SyncRequest
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
from syncpro.engine.walk import TreePlan, plan_path
from syncpro.errors import PublishError, RequestError
from syncpro.inventory.apps import App, Inventory

log = structlog.get_logger()

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
    request: SyncRequest, config: Config, inventory: Inventory, progress: Progress | None = None
) -> SyncResult:
    """Given a request, the config and the inventory, sync every selected app and return the
    result, telling `progress` of each file built. Raise RequestError if `k` selects nothing
    at all (empty)."""
    tokens = request.tokens
    if not tokens:
        raise RequestError("k must not be empty: give an app_key, a local_name or all")
    sweep_once(config)
    result = SyncResult(request=request, started=time.time(), config_path=config.path)
    clock = time.monotonic()
    selection = select(tokens, inventory)
    result.unknown = selection.unknown
    result.skipped = selection.skipped
    outcomes = {app.app_key: AppOutcome(app.app_key, app.local_name) for app in selection.apps}
    result.apps = list(outcomes.values())
    ignore = ignore_for(config)

    for group, apps in _groups(selection.apps).items():
        _sync_program(config, request.update, group, apps, outcomes, result, ignore, progress)
    for app in selection.apps:
        outcomes[app.app_key].config = _sync_config(
            config, request.update, app, result, ignore, progress
        )

    for outcome in outcomes.values():
        for target in (outcome.program, outcome.config):
            if target is not None and target.digest is not None:
                result.digests[target.source] = target.digest
    result.seconds = time.monotonic() - clock
    _report(result)
    return result


def _groups(apps: tuple[App, ...]) -> dict[str, list[App]]:
    groups: dict[str, list[App]] = {}
    for app in apps:
        groups.setdefault(app.local_name, []).append(app)
    return groups


def _sync_program(
    config: Config,
    update: bool,
    group: str,
    apps: list[App],
    outcomes: dict[str, AppOutcome],
    result: SyncResult,
    ignore: Ignore,
    progress: Progress | None = None,
) -> None:
    dirs = config.dirs
    target = layout.program_target(dirs, apps[0])
    existing: list[tuple[App, Path]] = []
    for app in apps:
        source = layout.program_source(dirs, app, update)
        if source.is_dir():
            existing.append((app, source))
            continue
        outcomes[app.app_key].program = TargetOutcome(
            "program", str(source), str(target.path), MISSING
        )
        if str(source) not in result.missing_program:
            result.missing_program.append(str(source))
    if not existing:
        return
    # In inventory order the last app whose program exists wins, as the original did.
    winner, source = existing[-1]
    if not update:
        result.drift.extend(_drift(group, existing, ignore, result))
    published = _publish(config, "program", source, target, ignore, None, progress)
    for app, app_source in existing:
        if app is winner:
            outcomes[app.app_key].program = published
            continue
        outcomes[app.app_key].program = TargetOutcome(
            "program",
            str(app_source),
            str(target.path),
            SUPERSEDED if published.ok else FAILED,
            error=None if published.ok else published.error,
            winner=winner.app_key,
        )


def _drift(
    group: str, existing: list[tuple[App, Path]], ignore: Ignore, result: SyncResult
) -> list[Drift]:
    winner, winner_source = existing[-1]
    found: list[Drift] = []
    winner_plan: TreePlan | None = None
    for app, source in existing[:-1]:
        try:
            if winner_plan is None:  # walked once for all the group's comparisons
                winner_plan = plan_path(winner_source, None, ignore, owners=False)
            plan = plan_path(source, None, ignore, owners=False)
            result.digests[str(source)] = (plan.digest, plan.newest_ctime)
            count, paths = tree_differences(
                source, winner_source, ignore, plans=(plan, winner_plan)
            )
        except OSError as exc:
            log.warning("sync.drift_check_failed", group=group, app=app.app_key, error=str(exc))
            continue
        if count:
            found.append(Drift(group, (app.app_key, winner.app_key), count, tuple(paths)))
    return found


def _sync_config(
    config: Config,
    update: bool,
    app: App,
    result: SyncResult,
    ignore: Ignore,
    progress: Progress | None = None,
) -> TargetOutcome:
    source = layout.config_source(config.dirs, app, update)
    target = layout.config_target(config.dirs, app)
    if not source.is_dir():
        result.missing_config.append(str(source))
        return TargetOutcome("config", str(source), str(target.path), MISSING)
    listed = app.configure_file_list if app.config_integrated else None
    return _publish(config, "config", source, target, ignore, listed, progress)


def _publish(
    config: Config,
    kind: str,
    source: Path,
    target: layout.Target,
    ignore: Ignore,
    listed: tuple[str, ...] | None,
    progress: Progress | None = None,
) -> TargetOutcome:
    started = time.monotonic()
    builder: TreeBuilder | None = None
    plan: TreePlan | None = None
    preserve_owner = os.geteuid() == 0

    def unchanged(current: Path) -> bool:
        # The one walk of the source: it answers this and tells the build what to reuse.
        nonlocal builder, plan
        builder = TreeBuilder(
            ignore=ignore, reuse=current, preserve_owner=preserve_owner, progress=progress
        )
        plan = builder.plan(source)
        return plan.unchanged

    def build(staging: Path, current: Path | None) -> list[str]:
        nonlocal builder, plan
        if builder is None or builder.reuse != current:
            # No walk yet against this published tree: copy_tree makes its own.
            builder = TreeBuilder(
                ignore=ignore, reuse=current, preserve_owner=preserve_owner, progress=progress
            )
            plan = None
        if listed is None:
            builder.copy_tree(source, staging, plan)
        else:
            builder.copy_listed(source, listed, staging)
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
        )
        outcome.unchanged = published.unchanged
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


def _report(result: SyncResult) -> None:
    log.info(
        "sync.finished",
        ok=result.ok,
        k=result.request.normalised_k,
        update=result.request.update,
        origin=result.request.origin,
        seconds=round(result.seconds, 6),
        response=response_document(result),
    )
