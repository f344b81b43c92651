"""Turn a request's `k` into the apps it selects (SPEC section 4)."""

from __future__ import annotations

from dataclasses import dataclass

from syncpro.inventory.apps import App, Inventory

ALL = "all"


@dataclass(frozen=True)
class Selection:
    """The apps a `k` selects, in inventory order, and the tokens that matched nothing."""

    apps: tuple[App, ...]
    unknown: tuple[str, ...]


def select(tokens: tuple[str, ...], inventory: Inventory) -> Selection:
    """Given the tokens of `k` and the inventory, return the selected auto-deploy apps.
    A token matches an app_key, a local_name (the whole group), or `all`."""
    deployable = inventory.deployable
    keys = {app.app_key for app in deployable}
    groups = {app.local_name for app in deployable}
    chosen: set[str] = set()
    unknown: list[str] = []
    for token in tokens:
        if token == ALL:
            chosen.update(keys)
            continue
        matched = False
        if token in keys:
            chosen.add(token)
            matched = True
        if token in groups:
            chosen.update(app.app_key for app in deployable if app.local_name == token)
            matched = True
        if not matched:
            unknown.append(token)
    return Selection(tuple(app for app in deployable if app.app_key in chosen), tuple(unknown))
