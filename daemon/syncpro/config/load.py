"""Find and load config.yml: read the YAML, convert each section by the schema, resolve the
token file and run the cross-checks, collecting every problem before raising."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from syncpro.config import environment
from syncpro.config.checks import cross_checks
from syncpro.config.model import Config, HttpSettings
from syncpro.config.schema import (
    APP_KEYS,
    REQUIRED,
    SECTIONS,
    TOP_KEYS,
    DecimalInt,
    Opt,
    default_of,
    read_path,
)
from syncpro.errors import ConfigError
from syncpro.inventory.apps import App, path_component_problem

DEFAULT_PATHS = (Path("config.yml"), Path("/etc/syncpro/config.yml"))
ENV_VAR = environment.CONFIG.name


# libyaml's parser where PyYAML was built with it: the pure-Python one took 1.7 s of a
# first start's 2.5 s to READY on a config of 1,000 apps. The constructors stay ours.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[misc]  # one of two bases, chosen above
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
    mapping: dict[Any, Any] = loader.construct_mapping(node)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _construct_int(loader: _UniqueKeyLoader, node: yaml.ScalarNode) -> int:
    value = loader.construct_yaml_int(node)
    text = str(node.value).replace("_", "").lstrip("+-")
    return DecimalInt(value) if text.isdigit() and not text.startswith("0") else value


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
        return read_path(value, Path(os.path.abspath(path)).parent)
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
            name, {} if section_raw is None else section_raw, cls, opts, base, problems
        )
        if values is not None:
            sections[name] = cls(**values)
    apps = _parse_apps(raw.get("apps"), base, problems)
    if "http" in sections:
        sections["http"] = _resolve_token(sections["http"], problems)
    problems.extend(cross_checks(sections, apps))
    if problems:
        raise ConfigError(config_path, problems)
    return Config(path=config_path, apps=apps, **sections)


def _parse_fields(
    where: str, raw: Any, model: type, opts: dict[str, Opt], base: Path, problems: list[str]
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
            default = default_of(model, key)
            if default is REQUIRED:
                problems.append(f"{where}.{key}: missing ({opt.doc})")
            else:
                values[key] = default  # the model's default, typed already
            continue
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
        values = _parse_fields(where, row, App, APP_KEYS, base, problems)
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
