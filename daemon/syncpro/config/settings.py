"""The config's names under their old module path, for importers not yet moved to
`config.model` (the settings classes) and `config.load` (finding and loading the file)."""

from syncpro.config.load import (
    DEFAULT_PATHS,
    ENV_VAR,
    control_socket_of,
    find_config,
    load_config,
    parse_config,
)
from syncpro.config.model import (
    DEFAULT_IGNORE,
    Config,
    ControlSettings,
    Dirs,
    HttpSettings,
    PublishSettings,
    WatchSettings,
)
from syncpro.config.schema import APP_KEYS, SECTIONS, TOP_KEYS, describe_keys
from syncpro.inventory.settings import InventorySettings

__all__ = [
    "APP_KEYS",
    "DEFAULT_IGNORE",
    "DEFAULT_PATHS",
    "ENV_VAR",
    "SECTIONS",
    "TOP_KEYS",
    "Config",
    "ControlSettings",
    "Dirs",
    "HttpSettings",
    "InventorySettings",
    "PublishSettings",
    "WatchSettings",
    "control_socket_of",
    "describe_keys",
    "find_config",
    "load_config",
    "parse_config",
]
