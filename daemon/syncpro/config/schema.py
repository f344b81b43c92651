"""The schema: for every config key, how its YAML value is read and what it is for.

Defaults and required keys are not written here: a field of the model without a default is
required, and a field with one takes it when the file leaves the key out.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncpro.config.model import (
    DEFAULT_IGNORE,
    ControlSettings,
    Dirs,
    HttpSettings,
    MonitorSettings,
    PublishSettings,
    WatchSettings,
)
from syncpro.inventory.apps import App, path_component_problem, split_file_list
from syncpro.inventory.settings import InventorySettings

# --- value converters: each returns the typed value or raises ValueError with the reason ---

Converter = Callable[[Any, Path], Any]


def _str(value: Any, base: Path) -> str:
    if not isinstance(value, str) or value == "":
        raise ValueError(f"must be a non-empty string, not {value!r}")
    if "\0" in value:
        raise ValueError(f"must not contain a NUL byte: {value!r}")
    return value


def _header(value: Any, base: Path) -> str:
    text = _str(value, base)
    if not text.isprintable() or not text.isascii():  # a line break would forge headers
        raise ValueError(f"must be one line of printable ASCII (an HTTP header), not {value!r}")
    return text


def read_path(value: Any, base: Path) -> Path:
    text = _str(value, base)
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else (base / path)


def _optional(inner: Converter) -> Converter:
    def convert(value: Any, base: Path) -> Any:
        return None if value is None else inner(value, base)

    return convert


def _bool(value: Any, base: Path) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1, "0", "1"):
        return bool(int(value))
    raise ValueError(f"must be true or false, not {value!r}")


def _secret(value: Any, base: Path) -> str:
    # The message never repeats the value: it may be a token or hold a password.
    if not isinstance(value, str) or value == "":
        raise ValueError(f"must be a non-empty string (quote it), not a {type(value).__name__}")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"must be a number of seconds, not {value!r}")
    return float(value)


def _positive(value: Any, base: Path) -> float:
    seconds = _seconds(value)
    if seconds < 0:
        raise ValueError(f"must be a number of seconds >= 0, not {value!r}")
    return seconds


def _interval(value: Any, base: Path) -> float:
    # A period of 0 would make the daemon spin: rescan or poll on every tick.
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError(f"must be a number of seconds > 0, not {value!r}")
    return seconds


def _count(value: Any, base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a whole number >= 1, not {value!r}")
    return value


def _count_or_zero(value: Any, base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number >= 0, not {value!r}")
    return value


def _ids(value: Any, base: Path) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"must be a list of numeric ids, not {value!r}")
    return tuple(value)


def _patterns(value: Any, base: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a list of glob patterns, not {value!r}")
    return tuple(value)


def _more_patterns(value: Any, base: Path) -> tuple[str, ...]:
    # watch.ignore adds to the defaults: a user naming one pattern of their own must not lose
    # rsync's temporaries without a word, which would publish half-written files.
    return tuple(dict.fromkeys((*DEFAULT_IGNORE, *_patterns(value, base))))


def _mode(value: Any, base: Path) -> int:
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError(f"must be an octal mode like '0660', not {value!r}") from None
    elif isinstance(value, DecimalInt):
        # `mode: 440` is the number four hundred and forty (0670): surely not what was meant.
        raise ValueError(f"must be written in octal, like '0{value}' (quoted) or 0{value}")
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise ValueError(f"must be an octal mode like '0660', not {value!r}")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"must be an octal mode between 0000 and 0777, not {value!r}")
    return mode


def _listen(value: Any, base: Path) -> str:
    if not isinstance(value, str):  # `listen: 3000` gives a port alone, a number
        raise ValueError(f"must be host:port like '127.0.0.1:3000', not {value!r}")
    text = _str(value, base)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port like '127.0.0.1:3000', not {value!r}")
    return text


def _listen_or_off(value: Any, base: Path) -> str:
    if value is None or value == "":
        return ""
    return _listen(value, base)


def _choice(*choices: str) -> Converter:
    def convert(value: Any, base: Path) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    return convert


def _marker(value: Any, base: Path) -> str:
    text = _str(value, base)
    if "/" in text or "\0" in text or text in (".", ".."):
        raise ValueError(f"must be a plain file name, not {value!r}")
    return text


_TABLE = re.compile(r"[A-Za-z0-9_]{1,64}")


def _mysql_url(value: Any, base: Path) -> str:
    text = _secret(value, base)
    # Imported here: inventory_mysql imports this module, and pymysql is loaded only by a
    # config that names a database.
    from syncpro.inventory.mysql import url_problem

    problem = url_problem(text)
    if problem is not None:
        raise ValueError(problem)  # never the URL itself: it may hold the password
    return text


def _table(value: Any, base: Path) -> str:
    # The name is spliced into SQL (it cannot be a query parameter), hence this strictness.
    text = _str(value, base)
    if not _TABLE.fullmatch(text):
        raise ValueError(f"{text!r} is not a plain table name (letters, digits and _ only)")
    return text


def _component(value: Any, base: Path) -> str:
    problem = path_component_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return str(value)


def _status(value: Any, base: Path) -> int:
    # The original table holds 0, 1 or NULL (read as 0); it is often typed as text.
    if isinstance(value, bool) or value not in (None, 0, 1, "0", "1"):
        raise ValueError(f"must be 0 or 1, not {value!r}")
    return int(value or 0)


def _file_list(value: Any, base: Path) -> tuple[str, ...]:
    if not (
        value is None
        or isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    ):
        raise ValueError(f"must be a list of paths or a comma-separated string, not {value!r}")
    entries = split_file_list(value)
    if any("\0" in entry for entry in entries):
        raise ValueError(f"an entry contains a NUL byte: {value!r}")
    return entries


@dataclass(frozen=True)
class Opt:
    """One key of a section: how to read its value, what it is for, and how to write its value
    back in the file's terms when Python's repr would mislead (a mode is octal)."""

    convert: Converter
    doc: str
    show: Callable[[Any], str] | None = None


SECTIONS: dict[str, tuple[type, dict[str, Opt]]] = {
    "dirs": (
        Dirs,
        {
            "remotecomdir": Opt(read_path, "programs and config downloaded from servers"),
            "updatedir": Opt(read_path, "new builds: program and config"),
            "softdir": Opt(read_path, "pending-release programs, one tree per group"),
            "configuredir": Opt(read_path, "pending-release config, one tree per app"),
            "state": Opt(read_path, "the daemon's small persistent state"),
        },
    ),
    "publish": (
        PublishSettings,
        {
            "grace": Opt(_positive, "seconds a replaced tree is kept for its readers"),
            "fsync": Opt(_bool, "make a new tree durable before swapping it in"),
            "parallel": Opt(_count, "targets one sync builds at once (groups of k=all, say)"),
            "processes": Opt(
                _count_or_zero,
                "processes building the daemon's first trees (0: its own threads);"
                " the CPUs, up to 4, by default",
            ),
        },
    ),
    "watch": (
        WatchSettings,
        {
            "settle": Opt(_positive, "quiet seconds before an app syncs"),
            "max_wait": Opt(_positive, "latest sync after a burst's first event"),
            "ignore": Opt(
                _more_patterns,
                "globs that never trigger nor get published, added to the defaults"
                " (rsync's .name.XXXXXX, *.part, *.tmp, editor swap files)",
            ),
            "ready_marker": Opt(
                _optional(_marker), "file in the source that must change before a sync"
            ),
            "rescan_interval": Opt(_interval, "seconds between full re-checks"),
            "workers": Opt(_count, "groups synced in parallel"),
            "poll_interval": Opt(_interval, "seconds between polls when inotify fails"),
        },
    ),
    "control": (
        ControlSettings,
        {
            "socket": Opt(read_path, "the control socket's path"),
            "mode": Opt(_mode, "the control socket's permissions", show="{:04o}".format),
            "group": Opt(_optional(_str), "group owning the control socket"),
            "allow_uids": Opt(_ids, "uids allowed besides root and the daemon's"),
            "allow_gids": Opt(_ids, "gids whose members are allowed"),
        },
    ),
    "http": (
        HttpSettings,
        {
            "enabled": Opt(_bool, "serve the original POST /rex endpoint"),
            "listen": Opt(_listen, "host:port of the HTTP endpoint"),
            "token": Opt(_optional(_secret), "token clients pass as ?token="),
            "token_file": Opt(_optional(read_path), "file holding the token"),
            "max_body": Opt(_count, "largest accepted request body in bytes"),
            "cors_origin": Opt(
                _optional(_header), "Access-Control-Allow-Origin of /rex answers ('*': any)"
            ),
        },
    ),
    "monitor": (
        MonitorSettings,
        {
            "listen": Opt(
                _listen_or_off, "host:port of GET /metrics, /healthz, /readyz (empty: off)"
            ),
        },
    ),
    "inventory": (
        InventorySettings,
        {
            "source": Opt(_choice("config", "mysql"), "where the apps come from"),
            "url": Opt(_optional(_mysql_url), "mysql://user@host:port/database"),
            "table": Opt(_table, "the inventory table"),
            "password_file": Opt(_optional(read_path), "file holding the database password"),
            "refresh": Opt(_interval, "seconds between re-reads by the daemon"),
            "connect_timeout": Opt(_positive, "seconds to wait for the database"),
        },
    ),
}

APP_KEYS: dict[str, Opt] = {
    "app_key": Opt(_component, "unique key of the app"),
    "local_name": Opt(_component, "the group: apps sharing one program"),
    "auto_deploy": Opt(_bool, "only auto-deploy apps can be synced"),
    "configure_file_status": Opt(_status, "1: type-2 app, config listed"),
    "configure_file_list": Opt(_file_list, "listed config files (type 2)"),
}

TOP_KEYS = ("dirs", "apps", *[name for name in SECTIONS if name != "dirs"])


class DecimalInt(int):
    """An integer the YAML file wrote in decimal (`440`), as opposed to octal (`0440`)."""


REQUIRED: Any = dataclasses.MISSING


def default_of(cls: type, key: str) -> Any:
    """Given a model class and one of its fields, return the field's default, or REQUIRED if it
    has none. Raise KeyError if the class has no such field."""
    for item in dataclasses.fields(cls):
        if item.name == key:
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
            return item.default
    raise KeyError(key)


def _shown(opt: Opt, value: Any) -> Any:
    return opt.show(value) if opt.show is not None and value is not REQUIRED else value


def describe_keys() -> list[tuple[str, str, Any]]:
    """Return (dotted key, description, default) for every key, for docs and `check-config`;
    the default of a required key is REQUIRED, a default with its own notation is text."""
    rows: list[tuple[str, str, Any]] = []
    for name, (cls, opts) in SECTIONS.items():
        rows.extend(
            (f"{name}.{key}", opt.doc, _shown(opt, default_of(cls, key)))
            for key, opt in opts.items()
        )
    rows.extend((f"apps[].{key}", opt.doc, default_of(App, key)) for key, opt in APP_KEYS.items())
    return rows
