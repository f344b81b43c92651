"""Load the inventory from where the config says it lives: config.yml or MariaDB."""

from __future__ import annotations

import structlog

from syncpro.config.settings import Config
from syncpro.inventory.apps import Inventory

log = structlog.get_logger()


def load_inventory(config: Config) -> Inventory:
    """Given the config, return the inventory. Raise InventoryError if its source fails."""
    if config.inventory.source == "config":
        return config.config_inventory
    from syncpro.inventory.mysql import load_mysql_inventory

    inventory, warnings = load_mysql_inventory(config.inventory)
    for warning in warnings:
        log.warning("inventory.row_skipped", reason=warning)
    return inventory
