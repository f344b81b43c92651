"""config.yml: finding, loading and validating it; every rule of the Config section."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncpro.config import environment
from syncpro.config import load as config_module
from syncpro.config.environment import VARIABLES
from syncpro.config.load import find_config, load_config
from syncpro.config.model import (
    DEFAULT_IGNORE,
    Config,
    ControlSettings,
    HttpSettings,
    PublishSettings,
    WatchSettings,
)
from syncpro.config.schema import APP_KEYS, REQUIRED, SECTIONS, describe_keys
from syncpro.errors import ConfigError
from syncpro.inventory.apps import App
from syncpro.inventory.settings import InventorySettings

DIRS = {
    "remotecomdir": "var/remotecomdir",
    "updatedir": "var/updatedir",
    "softdir": "var/softdir",
    "configuredir": "var/configuredir",
}
APP = {"app_key": "server1", "local_name": "server"}
# The token in tests, a name ruff's S105 does not take for a hard-coded secret.
WORD = "s3cret-token"


def doc(**sections: Any) -> dict[str, Any]:
    """A minimal valid document, with `sections` replacing or adding top-level keys."""
    base: dict[str, Any] = {"dirs": dict(DIRS), "apps": [dict(APP)]}
    base.update(sections)
    return base


def write(path: Path, document: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def load(tmp_path: Path, document: Any) -> Config:
    return load_config(write(tmp_path / "config.yml", document))


def problems(tmp_path: Path, document: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, document)
    return caught.value.problems


def problems_of_text(tmp_path: Path, text: str) -> tuple[ConfigError, list[str]]:
    path = tmp_path / "config.yml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value, caught.value.problems


def apps_with(**fields: Any) -> dict[str, Any]:
    return doc(apps=[{**APP, **fields}])


# --- loading and paths ---


def test_minimal_valid_config_loads(tmp_path: Path) -> None:
    config = load(tmp_path, doc())

    assert config.path == tmp_path / "config.yml"
    assert [(a.app_key, a.local_name) for a in config.apps] == [("server1", "server")]
    assert config.config_inventory.by_key()["server1"].local_name == "server"


def test_relative_paths_follow_the_folder_a_symlinked_config_is_named_in(tmp_path: Path) -> None:
    real = tmp_path / "shared/config.yml"
    write(real, doc())
    named = tmp_path / "etc/syncpro/config.yml"
    named.parent.mkdir(parents=True)
    named.symlink_to(real)

    config = load_config(named)

    assert config.dirs.softdir == named.parent / "var/softdir"


def test_relative_paths_resolve_against_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    write(folder / "config.yml", doc(http={"token_file": "token.txt"}))
    (folder / "token.txt").write_text(WORD + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(Path("../etc/config.yml"))

    base = folder.resolve()
    assert config.dirs.remotecomdir == base / "var/remotecomdir"
    assert config.dirs.updatedir == base / "var/updatedir"
    assert config.dirs.softdir == base / "var/softdir"
    assert config.dirs.configuredir == base / "var/configuredir"
    assert config.http.token_file == base / "token.txt"
    assert config.http.token == WORD


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    config = load(tmp_path, doc(control={"socket": "/run/x/control.sock"}))

    assert config.control.socket == Path("/run/x/control.sock")


def test_tilde_expands_to_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    config = load(tmp_path, doc(dirs={**DIRS, "softdir": "~/soft"}))

    assert config.dirs.softdir == tmp_path / "home" / "soft"


def test_every_default_is_applied(tmp_path: Path) -> None:
    config = load(tmp_path, doc())

    assert config.dirs.state == Path("/var/lib/syncpro")
    assert config.publish == PublishSettings()
    assert config.watch == WatchSettings()
    assert config.watch.ignore == DEFAULT_IGNORE
    assert config.control == ControlSettings()
    assert config.control.mode == 0o660
    assert config.http == HttpSettings()
    assert config.inventory == InventorySettings()
    app = config.apps[0]
    assert (app.auto_deploy, app.configure_file_status, app.configure_file_list) == (True, 0, ())


def test_empty_sections_take_their_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, doc(publish=None, watch={}, apps=None))

    assert config.publish == PublishSettings()
    assert config.watch == WatchSettings()
    assert config.apps == ()


# --- unknown keys ---


def test_an_unknown_section_is_an_error_naming_it(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(wacth={"settle": 1}))

    assert len(found) == 1
    assert found[0].startswith("wacth: unknown section")


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_an_unknown_key_in_any_section_is_an_error_naming_the_dotted_key(
    tmp_path: Path, section: str
) -> None:
    document = doc()
    document[section] = {**document.get(section, {}), "colour": "red"}

    found = problems(tmp_path, document)

    assert len(found) == 1
    assert found[0].startswith(f"{section}.colour: unknown key")


def test_an_unknown_app_key_is_an_error_naming_the_row(tmp_path: Path) -> None:
    document = doc(apps=[dict(APP), {"app_key": "web1", "local_name": "web", "colour": "red"}])

    found = problems(tmp_path, document)

    assert len(found) == 1
    assert found[0].startswith("apps[1].colour: unknown key")


def test_missing_dirs_section_is_an_error(tmp_path: Path) -> None:
    document = doc()
    del document["dirs"]

    assert problems(tmp_path, document)[0].startswith("dirs: missing")


def test_a_missing_required_dir_is_named(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(dirs={k: v for k, v in DIRS.items() if k != "updatedir"}))

    assert len(found) == 1
    assert found[0].startswith("dirs.updatedir: missing")


# --- types ---


@pytest.mark.parametrize("value", ["3", True, -1, None, [3], float("nan"), float("inf")])
def test_a_wrong_type_for_watch_settle_is_named(tmp_path: Path, value: Any) -> None:
    found = problems(tmp_path, doc(watch={"settle": value}))

    assert len(found) == 1
    assert found[0].startswith("watch.settle: must be a number of seconds")


@pytest.mark.parametrize("key", ["rescan_interval", "poll_interval"])
def test_a_zero_period_that_would_make_the_daemon_spin_is_refused(tmp_path: Path, key: str) -> None:
    found = problems(tmp_path, doc(watch={key: 0}))

    assert found == [f"watch.{key}: must be a number of seconds > 0, not 0"]


def test_an_explicit_null_for_a_required_dir_is_named_not_a_crash(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(dirs={**DIRS, "softdir": None}))

    assert len(found) == 1
    assert found[0].startswith("dirs.softdir: must be a non-empty string")


def test_a_nul_byte_in_a_dir_or_a_listed_config_file_is_named_not_a_crash(tmp_path: Path) -> None:
    listed = {**APP, "configure_file_status": 1, "configure_file_list": ["ok.yml", "a\0b"]}

    found = problems(tmp_path, doc(dirs={**DIRS, "remotecomdir": "r\0x"}, apps=[listed]))

    assert [p.split(":", 1)[0] for p in found] == [
        "dirs.remotecomdir",
        "apps[0].configure_file_list",
    ]
    assert all("NUL" in p for p in found)


@pytest.mark.parametrize(("value", "mode"), [("0660", 0o660), ("0600", 0o600), ("0o640", 0o640)])
def test_control_mode_accepts_octal_strings_and_numbers(
    tmp_path: Path, value: Any, mode: int
) -> None:
    assert load(tmp_path, doc(control={"mode": value})).control.mode == mode


@pytest.mark.parametrize("written", ["440", "600", "7"])
def test_control_mode_written_as_an_unquoted_decimal_number_is_refused(
    tmp_path: Path, written: str
) -> None:
    path = write(tmp_path / "config.yml", doc())
    path.write_text(path.read_text() + f"control:\n  mode: {written}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.problems == [
        f"control.mode: must be written in octal, like '0{written}' (quoted) or 0{written}"
    ]


def test_control_mode_given_unquoted_in_yaml_is_read_as_octal(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yml", doc())
    path.write_text(path.read_text() + "control:\n  mode: 0640\n")

    assert load_config(path).control.mode == 0o640


@pytest.mark.parametrize("value", ["rw", "0999", "01777", True, "-1"])
def test_control_mode_refuses_what_is_not_an_octal_mode(tmp_path: Path, value: Any) -> None:
    found = problems(tmp_path, doc(control={"mode": value}))

    assert len(found) == 1
    assert found[0].startswith("control.mode: must be an octal mode")


def test_a_section_that_is_not_a_mapping_is_named(tmp_path: Path) -> None:
    assert problems(tmp_path, doc(watch=[1, 2])) == ["watch: must be a mapping, not list"]


@pytest.mark.parametrize("value", ["localhost", ":3000", "host:0", "host:70000", 3000])
def test_http_listen_must_be_host_and_port(tmp_path: Path, value: Any) -> None:
    found = problems(tmp_path, doc(http={"listen": value}))

    assert len(found) == 1
    assert found[0].startswith("http.listen: must be host:port like '127.0.0.1:3000'")


def test_inventory_table_must_be_a_plain_name_because_it_is_spliced_into_sql(
    tmp_path: Path,
) -> None:
    found = problems(tmp_path, doc(inventory={"table": "t; DROP TABLE x"}))

    assert len(found) == 1
    assert found[0].startswith("inventory.table: 't; DROP TABLE x' is not a plain table name")


# --- apps ---


def test_a_duplicate_app_key_names_both_rows(tmp_path: Path) -> None:
    document = doc(
        apps=[dict(APP), {"app_key": "web1", "local_name": "web"}, {**APP, "local_name": "x"}]
    )

    found = problems(tmp_path, document)

    assert found == ["apps[2].app_key: 'server1' duplicates apps[0].app_key"]


@pytest.mark.parametrize("field", ["app_key", "local_name"])
@pytest.mark.parametrize("value", ["..", ".", "a/b", "", "   ", "all", "a\0b", "a b", "a,b", 7])
def test_an_unsafe_app_key_or_local_name_is_refused_with_the_row_named(
    tmp_path: Path, field: str, value: Any
) -> None:
    document = doc(apps=[dict(APP), {"app_key": "web1", "local_name": "web", field: value}])

    found = problems(tmp_path, document)

    assert len(found) == 1
    assert found[0].startswith(f"apps[1].{field}: ")


def test_a_missing_app_key_is_named(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(apps=[{"local_name": "server"}]))

    assert len(found) == 1
    assert found[0].startswith("apps[0].app_key: missing")


def test_an_app_row_that_is_not_a_mapping_is_named(tmp_path: Path) -> None:
    assert problems(tmp_path, doc(apps=[dict(APP), "web1"])) == [
        "apps[1]: must be a mapping, not str"
    ]


@pytest.mark.parametrize(
    ("value", "entries"),
    [
        (["config.properties", "conf/app.yml"], ("config.properties", "conf/app.yml")),
        ("config.properties, conf/app.yml", ("config.properties", "conf/app.yml")),
        ("config.properties,, ,conf/app.yml,", ("config.properties", "conf/app.yml")),
        (["a.yml", " ", ""], ("a.yml",)),
        ("", ()),
        (None, ()),
        ([], ()),
    ],
)
def test_configure_file_list_is_accepted_as_list_or_comma_string_with_blanks_dropped(
    tmp_path: Path, value: Any, entries: tuple[str, ...]
) -> None:
    config = load(tmp_path, apps_with(configure_file_status=1, configure_file_list=value))

    assert config.apps[0].configure_file_list == entries


@pytest.mark.parametrize("value", [7, [1, 2], {"a": 1}])
def test_configure_file_list_of_another_type_is_refused(tmp_path: Path, value: Any) -> None:
    found = problems(tmp_path, apps_with(configure_file_list=value))

    assert len(found) == 1
    assert found[0].startswith("apps[0].configure_file_list: must be a list of paths")


@pytest.mark.parametrize(("value", "status"), [(0, 0), (1, 1), ("0", 0), ("1", 1), (None, 0)])
def test_configure_file_status_accepts_0_1_as_numbers_text_or_null(
    tmp_path: Path, value: Any, status: int
) -> None:
    assert load(tmp_path, apps_with(configure_file_status=value)).apps[0].configure_file_status == (
        status
    )


@pytest.mark.parametrize("value", [2, "2", True, "yes"])
def test_configure_file_status_refuses_anything_else(tmp_path: Path, value: Any) -> None:
    found = problems(tmp_path, apps_with(configure_file_status=value))

    assert found == [f"apps[0].configure_file_status: must be 0 or 1, not {value!r}"]


@pytest.mark.parametrize(("value", "auto"), [(True, True), (False, False), (1, True), (0, False)])
def test_auto_deploy_accepts_bool_and_0_1(tmp_path: Path, value: Any, auto: bool) -> None:
    assert load(tmp_path, apps_with(auto_deploy=value)).apps[0].auto_deploy is auto


@pytest.mark.parametrize("value", [2, "maybe", None])
def test_auto_deploy_refuses_anything_else(tmp_path: Path, value: Any) -> None:
    found = problems(tmp_path, apps_with(auto_deploy=value))

    assert len(found) == 1
    assert found[0].startswith("apps[0].auto_deploy: must be true or false")


# --- YAML itself ---


def test_broken_yaml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    error, found = problems_of_text(tmp_path, "dirs:\n  softdir: [unclosed\napps: []\n")

    assert error.path == str(tmp_path / "config.yml")
    assert str(error).startswith(f"invalid configuration {tmp_path / 'config.yml'}:\n  ")
    assert len(found) == 1
    assert found[0].startswith("not valid YAML: line ")
    assert "\n" not in found[0]


def test_a_value_yaml_cannot_construct_is_a_config_error_not_a_crash(tmp_path: Path) -> None:
    _, found = problems_of_text(tmp_path, "dirs:\n  softdir: 2024-13-45\n")

    assert len(found) == 1
    assert found[0].startswith("not valid YAML:")


def test_python_tags_are_refused(tmp_path: Path) -> None:
    _, found = problems_of_text(tmp_path, "dirs: !!python/object/apply:os.getcwd []\n")

    assert found[0].startswith("not valid YAML: line 1")


def test_a_duplicate_yaml_key_is_refused_with_both_lines(tmp_path: Path) -> None:
    text = "dirs:\n  softdir: a\n  softdir: b\n"

    _, found = problems_of_text(tmp_path, text)

    assert found == [
        "not valid YAML: line 3, column 3: duplicate key 'softdir' (first given on line 2)"
    ]


def test_an_unhashable_yaml_key_is_a_config_error(tmp_path: Path) -> None:
    _, found = problems_of_text(tmp_path, "? [a, b]\n: 1\n")

    assert found[0].startswith("not valid YAML: line 1")


def test_a_document_that_is_a_list_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, [doc()])

    assert len(found) == 1
    assert found[0].startswith("the document must be a mapping of sections")


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    _, found = problems_of_text(tmp_path, "# nothing yet\n")

    assert found == ["the file is empty; it needs at least dirs"]


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    document = doc(
        watch={"settle": "soon"},
        control={"mode": "rw"},
        apps=[dict(APP), {"app_key": "../x", "local_name": "web"}],
    )

    error, found = problems_of_text(tmp_path, yaml.safe_dump(document))

    assert len(found) == 3
    assert [p.split(":")[0] for p in found] == ["watch.settle", "control.mode", "apps[1].app_key"]
    assert str(error) == f"invalid configuration {tmp_path / 'config.yml'}:\n" + "\n".join(
        f"  {p}" for p in found
    )


# --- http token ---


def test_http_enabled_without_a_token_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(http={"enabled": True}))

    assert found == ["http.token: required when http.enabled is true (or http.token_file)"]


def test_http_token_file_is_read_and_the_token_is_absent_from_the_repr(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"  {WORD} \n")

    config = load(tmp_path, doc(http={"enabled": True, "token_file": "token"}))

    assert config.http.token == WORD
    assert WORD not in repr(config)


def test_an_inline_token_is_absent_from_the_repr_too(tmp_path: Path) -> None:
    config = load(tmp_path, doc(http={"enabled": True, "token": WORD}))

    assert config.http.token == WORD
    assert WORD not in repr(config)


def test_a_token_of_the_wrong_type_is_refused_without_repeating_it(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(http={"enabled": True, "token": 918273645}))

    assert len(found) == 1
    assert found[0].startswith("http.token: must be a non-empty string")
    assert "918273645" not in found[0]


def test_http_token_and_token_file_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")

    found = problems(tmp_path, doc(http={"token": "other", "token_file": "token"}))

    assert found == ["http.token_file: give http.token or http.token_file, not both"]


@pytest.mark.parametrize(("content", "reason"), [(None, "cannot read"), ("\n", "is empty")])
def test_a_missing_or_empty_token_file_is_named(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    if content is not None:
        (tmp_path / "token").write_text(content)

    found = problems(tmp_path, doc(http={"enabled": True, "token_file": "token"}))

    assert len(found) == 1
    assert found[0].startswith("http.token_file: ")
    assert reason in found[0]


# --- inventory ---


def test_inventory_source_mysql_needs_a_url(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(inventory={"source": "mysql"}, apps=[]))

    assert found == ["inventory.url: required when inventory.source is mysql"]


def test_inventory_source_mysql_needs_empty_apps(tmp_path: Path) -> None:
    url = "mysql://syncpro@db:3306/platform"

    found = problems(tmp_path, doc(inventory={"source": "mysql", "url": url}))

    assert found == ["apps: must be empty when inventory.source is mysql (one source)"]


def test_inventory_source_mysql_with_url_and_no_apps_loads_and_hides_the_url(
    tmp_path: Path,
) -> None:
    url = "mysql://syncpro:pa55word@db:3306/platform"

    config = load(tmp_path, doc(inventory={"source": "mysql", "url": url}, apps=[]))

    assert config.inventory.url == url
    assert "pa55word" not in repr(config)


def test_an_unknown_inventory_source_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(inventory={"source": "ldap"}))

    assert found == ["inventory.source: must be one of config, mysql, not 'ldap'"]


# --- cross-field checks ---


def test_softdir_inside_remotecomdir_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(dirs={**DIRS, "softdir": "var/remotecomdir/soft"}))

    assert len(found) == 1
    assert found[0].startswith("dirs.softdir: ")
    assert "overlaps dirs.remotecomdir" in found[0]


def test_configuredir_containing_updatedir_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(dirs={**DIRS, "updatedir": "var/configuredir/up"}))

    assert len(found) == 1
    assert found[0].startswith("dirs.configuredir: ")
    assert "overlaps dirs.updatedir" in found[0]


def test_state_inside_a_source_or_target_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(dirs={**DIRS, "state": "var/updatedir/.state"}))

    assert len(found) == 1
    assert found[0].startswith("dirs.state: ")
    assert "overlaps dirs.updatedir" in found[0]


def test_max_wait_shorter_than_settle_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, doc(watch={"settle": 10, "max_wait": 5}))

    assert found == ["watch.max_wait: 5 is shorter than watch.settle 10"]


# --- finding the file ---


def test_find_config_prefers_the_explicit_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = write(tmp_path / "explicit.yml", doc())
    from_env = write(tmp_path / "env.yml", doc())
    write(tmp_path / "config.yml", doc())
    monkeypatch.setenv("SYNCPRO_CONFIG", str(from_env))
    monkeypatch.chdir(tmp_path)

    assert find_config(explicit) == explicit
    assert load_config(explicit).path == explicit


def test_find_config_then_takes_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = write(tmp_path / "env.yml", doc())
    write(tmp_path / "config.yml", doc())
    monkeypatch.setenv("SYNCPRO_CONFIG", str(from_env))
    monkeypatch.chdir(tmp_path)

    assert find_config() == from_env
    assert find_config(None) == from_env


def test_find_config_then_takes_config_yml_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "config.yml", doc())
    monkeypatch.delenv("SYNCPRO_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)

    assert find_config().resolve() == (tmp_path / "config.yml").resolve()
    assert load_config().dirs.softdir == tmp_path.resolve() / "var/softdir"


def test_without_config_env_or_local_file_the_system_wide_config_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert config_module.DEFAULT_PATHS[-1] == Path("/etc/syncpro/config.yml")
    system = write(tmp_path / "etc/syncpro/config.yml", doc())
    # The real /etc is the host's: the same lookup, with the system path moved into tmp_path.
    monkeypatch.setattr(config_module, "DEFAULT_PATHS", (Path("config.yml"), system))
    monkeypatch.delenv("SYNCPRO_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)

    assert find_config() == system
    assert load_config().dirs.softdir == system.parent / "var/softdir"
    write(tmp_path / "config.yml", doc())
    assert find_config() == Path("config.yml")  # ./config.yml comes first


def test_no_config_anywhere_is_a_config_error_saying_what_was_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if Path("/etc/syncpro/config.yml").exists():
        pytest.skip("this host has /etc/syncpro/config.yml")
    monkeypatch.delenv("SYNCPRO_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigError) as caught:
        find_config()

    message = str(caught.value)
    assert "--config" in message
    assert "$SYNCPRO_CONFIG" in message
    assert str(tmp_path / "config.yml") in message
    assert "/etc/syncpro/config.yml" in message


def test_a_named_config_that_does_not_exist_says_who_named_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCPRO_CONFIG", str(tmp_path / "nowhere.yml"))

    with pytest.raises(ConfigError) as caught:
        load_config()

    assert caught.value.path == str(tmp_path / "nowhere.yml")
    assert caught.value.problems == [
        "cannot read (given by $SYNCPRO_CONFIG): " + os.strerror(2)  # ENOENT
    ]


# --- documentation and the shipped file ---


def test_every_key_has_a_non_empty_description() -> None:
    for _section, (_cls, opts) in SECTIONS.items():
        for key, opt in opts.items():
            assert opt.doc.strip(), key
    rows = describe_keys()
    assert all(doc.strip() for _, doc, _ in rows)
    assert {key for key, _, _ in rows} >= {
        f"{section}.{key}" for section, (_, opts) in SECTIONS.items() for key in opts
    }
    assert "apps[].configure_file_list" in {key for key, _, _ in rows}


def test_every_section_default_matches_its_settings_class_default(tmp_path: Path) -> None:
    config = load(tmp_path, doc())

    for section, (cls, _) in SECTIONS.items():
        if section != "dirs":
            assert getattr(config, section) == cls(), section


def test_every_schema_key_is_a_field_of_its_model_class_and_back() -> None:
    # The model holds the one default of each key; a key in one place only would be lost.
    for section, (cls, opts) in SECTIONS.items():
        assert set(opts) == {item.name for item in dataclasses.fields(cls)}, section
    assert set(APP_KEYS) == {item.name for item in dataclasses.fields(App)}


def test_described_defaults_are_the_model_defaults_and_dirs_are_required() -> None:
    rows = {key: default for key, _, default in describe_keys()}

    assert rows["publish.grace"] == PublishSettings().grace
    assert rows["control.mode"] == "0660"  # in the octal the file takes
    assert rows["dirs.state"] == Path("/var/lib/syncpro")
    assert rows["dirs.softdir"] is REQUIRED
    assert rows["apps[].app_key"] is REQUIRED


def test_every_environment_variable_the_source_reads_is_in_the_one_list() -> None:
    source = Path(config_module.__file__).parent.parent
    named: dict[str, set[str]] = {}
    for path in source.rglob("*.py"):
        for name in re.findall(r"SYNCPRO_[A-Z_]+", path.read_text(encoding="utf-8")):
            named.setdefault(name, set()).add(path.name)

    listed = {variable.name for variable in VARIABLES}
    assert set(named) == listed
    # Each is read somewhere, not only listed: by its name, or through its constant here.
    constants = {
        value.name: attr for attr, value in vars(environment).items() if value in VARIABLES
    }
    for name in listed:
        through = {
            path.name
            for path in source.rglob("*.py")
            if f"environment.{constants[name]}" in path.read_text(encoding="utf-8")
        }
        assert (named[name] | through) - {"environment.py"}, name


def test_shipped_config_validates() -> None:
    shipped = Path(__file__).parent.parent / "config.yml"

    config = load_config(shipped)

    assert config.apps
    assert config.inventory.source == "config"


def test_the_shipped_config_serves_the_monitor_on_localhost() -> None:
    shipped = load_config(Path(__file__).parent.parent / "config.yml")

    assert shipped.monitor.listen == "127.0.0.1:9469"


@pytest.mark.parametrize("value", ["", None])
def test_an_empty_monitor_listen_turns_the_monitor_off(tmp_path: Path, value: Any) -> None:
    assert load(tmp_path, doc(monitor={"listen": value})).monitor.listen == ""


@pytest.mark.parametrize("value", ["localhost", "host:0", 9469])
def test_monitor_listen_must_be_host_and_port(tmp_path: Path, value: Any) -> None:
    found = problems(tmp_path, doc(monitor={"listen": value}))

    assert len(found) == 1
    assert found[0].startswith("monitor.listen: must be host:port")
