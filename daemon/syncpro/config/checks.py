"""Cross-checks: rules between keys of the config, on values each valid alone."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from syncpro.config.model import Dirs, HttpSettings, WatchSettings
from syncpro.inventory.apps import App
from syncpro.inventory.settings import InventorySettings


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def cross_checks(sections: Mapping[str, Any], apps: tuple[App, ...]) -> list[str]:
    """Given the converted sections (a section with a wrong key is absent) and apps, return the
    problems between keys: overlapping dirs, a token required, one inventory source."""
    problems: list[str] = []
    dirs: Dirs | None = sections.get("dirs")
    if dirs is not None:
        for target in ("softdir", "configuredir"):
            for source in ("remotecomdir", "updatedir"):
                t, s = getattr(dirs, target), getattr(dirs, source)
                if _overlap(t, s):
                    problems.append(
                        f"dirs.{target}: {t} overlaps dirs.{source} {s}; publishing into a"
                        " watched source would loop"
                    )
        if _overlap(dirs.softdir, dirs.configuredir):
            problems.append(
                f"dirs.softdir: {dirs.softdir} overlaps dirs.configuredir {dirs.configuredir}"
            )
        for other in ("remotecomdir", "updatedir", "softdir", "configuredir"):
            # In a source, every state write would wake the watcher; in a target it would be
            # taken for (or swept as) a published tree.
            if _overlap(dirs.state, getattr(dirs, other)):
                problems.append(
                    f"dirs.state: {dirs.state} overlaps dirs.{other} {getattr(dirs, other)}"
                )
    watch: WatchSettings | None = sections.get("watch")
    if watch is not None and watch.max_wait < watch.settle:
        problems.append(
            f"watch.max_wait: {watch.max_wait:g} is shorter than watch.settle {watch.settle:g}"
        )
    http: HttpSettings | None = sections.get("http")
    # A token_file that could not be read is reported already, on its own key.
    if http is not None and http.enabled and not http.token and http.token_file is None:
        problems.append("http.token: required when http.enabled is true (or http.token_file)")
    inventory: InventorySettings | None = sections.get("inventory")
    if inventory is not None and inventory.source == "mysql":
        if not inventory.url:
            problems.append("inventory.url: required when inventory.source is mysql")
        if apps:
            problems.append("apps: must be empty when inventory.source is mysql (one source)")
    return problems
