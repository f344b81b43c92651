"""Load the inventory from where the settings say it lives: the config's apps or MariaDB."""

from __future__ import annotations

import structlog

from syncpro.inventory.apps import Inventory
from syncpro.inventory.settings import InventorySettings

log = structlog.get_logger()


def load_inventory(settings: InventorySettings, configured: Inventory) -> Inventory:
    """Given the inventory settings and the apps written in the config, return the inventory.
    Raise InventoryError if its source fails."""
    if settings.source == "config":
        return configured
    from syncpro.inventory.mysql import load_mysql_inventory

    inventory, warnings = load_mysql_inventory(settings)
    for warning in warnings:
        log.warning("inventory.row_skipped", reason=warning)
    return inventory
