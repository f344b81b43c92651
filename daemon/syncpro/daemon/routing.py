"""Where a watched path goes: the app keys it concerns and their mode (pure functions of the
snapshot), and the router that hands watcher events on to the scheduler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import structlog

from syncpro.config.model import Dirs
from syncpro.daemon.runtime import Runtime, Snapshot
from syncpro.daemon.watch import DONE, WRITING
from syncpro.engine import layout

log = structlog.get_logger()

AREAS = ("softdir", "configuredir")


@dataclass(frozen=True)
class Route:
    """What one source path concerns."""

    app_keys: tuple[str, ...]
    update: bool
    unknown: str | None
    """Where the path lies when it concerns no known app ("remotecomdir:ghost"), None when
    nothing is amiss (the keys were found, or the path is a root or an area folder)."""
    part: str | None
    """"program" or "config": the part of the app the path belongs to; None outside them."""


def route(snap: Snapshot, path: Path) -> Route:
    """Given the snapshot and a path under remotecomdir or updatedir, return the app keys it
    concerns (auto-deployed apps of the inventory only), their mode and part, and where it
    lies when it concerns no known app."""
    dirs = snap.config.dirs
    owner = layout.owner_of(dirs, path)
    if owner is None:
        for root, name in ((dirs.remotecomdir, "remotecomdir"), (dirs.updatedir, "updatedir")):
            with contextlib.suppress(ValueError):
                parts = path.relative_to(root).parts
                if parts and parts[0] not in AREAS:
                    # A stray beside the areas.
                    return Route((), False, f"{name}:{parts[0]}", None)
        return Route((), False, None, None)  # the roots and their softdir/configuredir folders
    keys: list[str] = []
    if owner.app_key is not None:
        app = snap.app(owner.app_key)
        if app is not None and (owner.group is None or app.local_name == owner.group):
            keys.append(app.app_key)
    elif owner.group is not None:
        keys = [a.app_key for a in snap.inventory.group(owner.group) if a.auto_deploy]
    where = f"{'updatedir' if owner.update else 'remotecomdir'}:{owner.top}"
    return Route(tuple(keys), owner.update, None if keys else where, owner.part)


def group_of(snap: Snapshot, app_key: str) -> str | None:
    """Given the snapshot and an app key, return the group it syncs in (its local_name), or
    None when it is not an auto-deployed app."""
    app = snap.app(app_key)
    return app.local_name if app is not None else None


def source_root_in(dirs: Dirs, path: str) -> str | None:
    """Given a normalised absolute path under remotecomdir or updatedir, return the source
    root of the app (or group program) it lies in, which path globs of watch.ignore are
    relative to; None for a path outside every source. On strings: the watcher asks it for
    every event (an upload of 40,000 files makes some 300,000), and pathlib's parsing cost
    more than everything else the event costs."""
    for root, update in ((str(dirs.remotecomdir), False), (str(dirs.updatedir), True)):
        if path == root:
            return None
        if not path.startswith(root + "/"):
            continue
        parts = path[len(root) + 1 :].split("/", 3)
        # <updatedir>/configuredir/L/A is one app's config; every other source is one level.
        depth = 3 if update and parts[0] == "configuredir" else 2
        if len(parts) < depth or parts[0] not in AREAS:
            return None
        return "/".join([root, *parts[:depth]])
    return None


class Router:
    """Hands the watcher's events to the scheduler of the moment, for the apps they concern."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # Called from the watcher's threads only, one root each: a set add is atomic enough,
        # and a warning told twice is harmless.
        self._unmapped: set[str] = set()
        # Routes by source root, for the snapshot they were found in: every path of one
        # source goes where its root goes. Replaced whole, so a thread still holding the
        # old one never files a route under the new snapshot.
        self._routes: tuple[Snapshot | None, dict[str, Route]] = (None, {})

    def on_change(self, path: str) -> None:
        scheduler = self.runtime.scheduler
        if scheduler is None:
            return
        found = self._route(path)
        if found.unknown is not None and found.unknown not in self._unmapped:
            self._unmapped.add(found.unknown)
            # Named for what operators see: a watched change that goes nowhere.
            log.warning("watch.unknown_app", path=path, where=found.unknown)
        for key in found.app_keys:
            scheduler.submit(key, found.update, path, "watcher", part=found.part)

    def on_temporary(self, path: str, state: str) -> None:
        scheduler = self.runtime.scheduler
        if scheduler is None:
            return
        found = self._route(path)
        for key in found.app_keys:
            if state == WRITING:
                scheduler.hold(key, found.update, path)
            elif state == DONE:
                scheduler.release(key, found.update, path)
            else:
                scheduler.touch(key, found.update)

    def _route(self, path: str) -> Route:
        snap = self.runtime.snapshot
        source = source_root_in(snap.config.dirs, path)
        if source is None:
            return route(snap, Path(path))  # a root, an area folder, a stray: rare
        of, routes = self._routes
        if of is not snap or len(routes) > _ROUTES_KEPT:
            routes = {}
            self._routes = (snap, routes)
        found = routes.get(source)
        if found is None:
            found = routes[source] = route(snap, Path(source))
        return found


_ROUTES_KEPT = 100_000
"""More source roots than any inventory has (unknown folders count too): then start over."""
