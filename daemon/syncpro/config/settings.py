"""Find, load and validate config.yml into typed settings, collecting every problem."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from syncpro.errors import ConfigError
from syncpro.inventory.apps import App, Inventory, path_component_problem, split_file_list
from syncpro.inventory.settings import InventorySettings

DEFAULT_PATHS = (Path("config.yml"), Path("/etc/syncpro/config.yml"))
ENV_VAR = "SYNCPRO_CONFIG"

DEFAULT_IGNORE = (
    # rsync's temporary .<name>.XXXXXX: a dot, a name, a dot, exactly six letters or digits.
    ".*." + "[A-Za-z0-9]" * 6,
    "*.part",
    "*.tmp",
    "*.swp",
    "*.swx",
    "*~",
    ".#*",
    "4913",  # vim's probe file when checking a directory is writable
)


@dataclass(frozen=True)
class Dirs:
    remotecomdir: Path
    updatedir: Path
    softdir: Path
    configuredir: Path
    state: Path


@dataclass(frozen=True)
class PublishSettings:
    grace: float = 10.0
    fsync: bool = True


@dataclass(frozen=True)
class WatchSettings:
    settle: float = 3.0
    max_wait: float = 60.0
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    ready_marker: str | None = None
    rescan_interval: float = 300.0
    workers: int = 4
    poll_interval: float = 2.0


@dataclass(frozen=True)
class ControlSettings:
    socket: Path = Path("/run/syncpro/control.sock")
    mode: int = 0o660
    group: str | None = None
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()


@dataclass(frozen=True)
class HttpSettings:
    enabled: bool = False
    listen: str = "127.0.0.1:3000"
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    max_body: int = 65536

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Config:
    path: Path
    dirs: Dirs
    apps: tuple[App, ...]
    publish: PublishSettings = PublishSettings()
    watch: WatchSettings = WatchSettings()
    control: ControlSettings = ControlSettings()
    http: HttpSettings = HttpSettings()
    inventory: InventorySettings = field(default_factory=InventorySettings)

    @property
    def config_inventory(self) -> Inventory:
        return Inventory(self.apps)


# --- value converters: each returns the typed value or raises ValueError with the reason ---

Converter = Callable[[Any, Path], Any]


def _str(value: Any, base: Path) -> str:
    if not isinstance(value, str) or value == "":
        raise ValueError(f"must be a non-empty string, not {value!r}")
    if "\0" in value:
        raise ValueError(f"must not contain a NUL byte: {value!r}")
    return value


def _path(value: Any, base: Path) -> Path:
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
    elif isinstance(value, _DecimalInt):
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
    """One key of a section: how to read it, its default, and what it is for."""

    convert: Converter
    doc: str
    default: Any = None
    required: bool = False


SECTIONS: dict[str, tuple[type, dict[str, Opt]]] = {
    "dirs": (
        Dirs,
        {
            "remotecomdir": Opt(
                _path, "programs and config downloaded from servers", required=True
            ),
            "updatedir": Opt(_path, "new builds: program and config", required=True),
            "softdir": Opt(_path, "pending-release programs, one tree per group", required=True),
            "configuredir": Opt(_path, "pending-release config, one tree per app", required=True),
            "state": Opt(_path, "the daemon's small persistent state", "/var/lib/syncpro"),
        },
    ),
    "publish": (
        PublishSettings,
        {
            "grace": Opt(_positive, "seconds a replaced tree is kept for its readers", 10.0),
            "fsync": Opt(_bool, "make a new tree durable before swapping it in", True),
        },
    ),
    "watch": (
        WatchSettings,
        {
            "settle": Opt(_positive, "quiet seconds before an app syncs", 3.0),
            "max_wait": Opt(_positive, "latest sync after a burst's first event", 60.0),
            "ignore": Opt(
                _more_patterns,
                "globs that never trigger nor get published, added to the defaults"
                " (rsync's .name.XXXXXX, *.part, *.tmp, editor swap files)",
                list(DEFAULT_IGNORE),
            ),
            "ready_marker": Opt(
                _optional(_marker), "file in the source that must change before a sync", None
            ),
            "rescan_interval": Opt(_interval, "seconds between full re-checks", 300.0),
            "workers": Opt(_count, "groups synced in parallel", 4),
            "poll_interval": Opt(_interval, "seconds between polls when inotify fails", 2.0),
        },
    ),
    "control": (
        ControlSettings,
        {
            "socket": Opt(_path, "the control socket's path", "/run/syncpro/control.sock"),
            "mode": Opt(_mode, "the control socket's permissions", "0660"),
            "group": Opt(_optional(_str), "group owning the control socket", None),
            "allow_uids": Opt(_ids, "uids allowed besides root and the daemon's", []),
            "allow_gids": Opt(_ids, "gids whose members are allowed", []),
        },
    ),
    "http": (
        HttpSettings,
        {
            "enabled": Opt(_bool, "serve the original POST /rex endpoint", False),
            "listen": Opt(_listen, "host:port of the HTTP endpoint", "127.0.0.1:3000"),
            "token": Opt(_optional(_secret), "token clients pass as ?token=", None),
            "token_file": Opt(_optional(_path), "file holding the token", None),
            "max_body": Opt(_count, "largest accepted request body in bytes", 65536),
        },
    ),
    "inventory": (
        InventorySettings,
        {
            "source": Opt(_choice("config", "mysql"), "where the apps come from", "config"),
            "url": Opt(_optional(_mysql_url), "mysql://user@host:port/database", None),
            "table": Opt(_table, "the inventory table", "pre_server_detail"),
            "password_file": Opt(_optional(_path), "file holding the database password", None),
            "refresh": Opt(_interval, "seconds between re-reads by the daemon", 60.0),
            "connect_timeout": Opt(_positive, "seconds to wait for the database", 5.0),
        },
    ),
}

APP_KEYS: dict[str, Opt] = {
    "app_key": Opt(_component, "unique key of the app", required=True),
    "local_name": Opt(_component, "the group: apps sharing one program", required=True),
    "auto_deploy": Opt(_bool, "only auto-deploy apps can be synced", True),
    "configure_file_status": Opt(_status, "1: type-2 app, config listed", 0),
    "configure_file_list": Opt(_file_list, "listed config files (type 2)", []),
}

TOP_KEYS = ("dirs", "apps", *[name for name in SECTIONS if name != "dirs"])


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice instead of keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            continue  # construct_mapping below refuses it with its own message
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first given on line {seen[key].line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _DecimalInt(int):
    """An integer the YAML file wrote in decimal (`440`), as opposed to octal (`0440`)."""


def _construct_int(loader: _UniqueKeyLoader, node: yaml.ScalarNode) -> int:
    value = loader.construct_yaml_int(node)
    text = str(node.value).replace("_", "").lstrip("+-")
    return _DecimalInt(value) if text.isdigit() and not text.startswith("0") else value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Given a YAML error, return it on one line: where, then what (yaml's own is 5 lines)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = "; ".join(part for part in (exc.context, exc.problem) if part) or "invalid"
        if mark is not None:
            return f"not valid YAML: line {mark.line + 1}, column {mark.column + 1}: {what}"
        return f"not valid YAML: {what}"
    return f"not valid YAML: {exc}"


def _locate(explicit: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """Return the config path and where it came from, for messages."""
    if explicit:
        return Path(explicit), "--config"
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate, "default"
    tried = ", ".join(str(p.absolute()) for p in DEFAULT_PATHS)
    raise ConfigError(
        "(none found)",
        [
            f"no configuration file: --config not given, ${ENV_VAR} not set, and none of"
            f" {tried} exists; pass --config PATH"
        ],
    )


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Given the --config value, return the config path: --config, $SYNCPRO_CONFIG, ./config.yml,
    /etc/syncpro/config.yml. Raise ConfigError, saying what was tried, if none exists."""
    return _locate(explicit)[0]


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Given a config path (or None to search), return the validated Config.
    Raise ConfigError listing every problem, each with its dotted key."""
    config_path, origin = _locate(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        given = "" if origin == "default" else f" (given by {origin})"
        raise ConfigError(config_path, [f"cannot read{given}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(config_path, ["cannot read: not UTF-8 text"]) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(config_path, [_yaml_problem(exc)]) from None
    except ValueError as exc:
        # yaml's constructors let some ValueErrors through, e.g. a date like 2024-13-45.
        raise ConfigError(config_path, [f"not valid YAML: {exc}"]) from None
    return parse_config(raw, config_path)


def control_socket_of(path: Path) -> Path | None:
    """Given a config file that does not validate, return the control.socket it names, if it
    names one a client can still use; else None. A typo elsewhere in the file must not keep
    `syncpro ctl status` from the daemon that runs on the config it loaded before."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
        value = raw["control"]["socket"]
        return _path(value, Path(os.path.abspath(path)).parent)
    except (OSError, UnicodeError, yaml.YAMLError, TypeError, KeyError, ValueError):
        return None


def parse_config(raw: Any, config_path: Path) -> Config:
    """Given the parsed YAML document, return the Config. Raise ConfigError with all problems."""
    # Relative paths follow the folder the config is named in: a symlinked config.yml in
    # /etc/syncpro resolves var/ under /etc/syncpro, not next to the file it points to.
    base = Path(os.path.abspath(config_path)).parent
    if raw is None:
        raise ConfigError(config_path, ["the file is empty; it needs at least dirs"])
    if not isinstance(raw, Mapping):
        raise ConfigError(
            config_path,
            [
                f"the document must be a mapping of sections ({', '.join(TOP_KEYS)}),"
                f" not a {type(raw).__name__}"
            ],
        )
    problems: list[str] = []
    for key in raw:
        if key not in TOP_KEYS:
            problems.append(f"{key}: unknown section (known: {', '.join(TOP_KEYS)})")
    sections: dict[str, Any] = {}
    for name, (cls, opts) in SECTIONS.items():
        section_raw = raw.get(name)
        if section_raw is None and name == "dirs":
            problems.append("dirs: missing (remotecomdir, updatedir, softdir, configuredir)")
            continue
        values = _parse_fields(
            name, {} if section_raw is None else section_raw, opts, base, problems
        )
        if values is not None:
            sections[name] = cls(**values)
    apps = _parse_apps(raw.get("apps"), base, problems)
    if "http" in sections:
        sections["http"] = _resolve_token(sections["http"], problems)
    _cross_checks(sections, apps, problems)
    if problems:
        raise ConfigError(config_path, problems)
    return Config(path=config_path, apps=apps, **sections)


def _parse_fields(
    where: str, raw: Any, opts: dict[str, Opt], base: Path, problems: list[str]
) -> dict[str, Any] | None:
    """Given one section (or app row), return its converted values, or None if any key is wrong
    (each wrong key appended to problems)."""
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping, not {type(raw).__name__}")
        return None
    values: dict[str, Any] = {}
    before = len(problems)
    for key in raw:
        if key not in opts:
            problems.append(f"{where}.{key}: unknown key (known: {', '.join(opts)})")
    for key, opt in opts.items():
        if key not in raw:
            if opt.required:
                problems.append(f"{where}.{key}: missing ({opt.doc})")
                continue
            value = opt.default
        else:
            value = raw[key]
        try:
            # An explicit null goes through the converter too: only optional keys accept it.
            values[key] = opt.convert(value, base)
        except ValueError as exc:
            problems.append(f"{where}.{key}: {exc}")
    return values if len(problems) == before else None


def _parse_apps(raw: Any, base: Path, problems: list[str]) -> tuple[App, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"apps: must be a list of apps, not {type(raw).__name__}")
        return ()
    apps: list[App] = []
    seen: dict[str, int] = {}
    for index, row in enumerate(raw):
        where = f"apps[{index}]"
        values = _parse_fields(where, row, APP_KEYS, base, problems)
        # A duplicate is reported even when the row has other problems: one pass, all of them.
        key = row.get("app_key") if isinstance(row, Mapping) else None
        if isinstance(key, str) and path_component_problem(key) is None:
            if key in seen:
                problems.append(f"{where}.app_key: {key!r} duplicates apps[{seen[key]}].app_key")
                continue
            seen[key] = index
        if values is not None:
            apps.append(App(**values))
    return tuple(apps)


def _resolve_token(http: HttpSettings, problems: list[str]) -> HttpSettings:
    if http.token_file is None:
        return http
    if http.token is not None:
        problems.append("http.token_file: give http.token or http.token_file, not both")
        return http
    try:
        token = http.token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"http.token_file: cannot read {http.token_file}: {exc.strerror or exc}")
        return http
    except UnicodeDecodeError:
        problems.append(f"http.token_file: {http.token_file} is not UTF-8 text")
        return http
    if not token:
        problems.append(f"http.token_file: {http.token_file} is empty")
        return http
    return replace(http, token=token)


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _cross_checks(sections: dict[str, Any], apps: tuple[App, ...], problems: list[str]) -> None:
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


def describe_keys() -> list[tuple[str, str, Any]]:
    """Return (dotted key, description, default) for every key, for docs and `check-config`."""
    rows: list[tuple[str, str, Any]] = []
    for name, (_, opts) in SECTIONS.items():
        rows.extend((f"{name}.{key}", opt.doc, opt.default) for key, opt in opts.items())
    rows.extend((f"apps[].{key}", opt.doc, opt.default) for key, opt in APP_KEYS.items())
    return rows
