"""The inventory read from the original platform's MariaDB table (SPEC section 3)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from syncpro.errors import InventoryError
from syncpro.inventory.apps import App
from syncpro.inventory.mysql import (
    PASSWORD_ENV,
    MysqlTarget,
    load_mysql_inventory,
    parse_mysql_url,
)
from syncpro.inventory.settings import InventorySettings
from syncpro.testing import write_config

from mysql_support import Database, Server, app_row, reachable_server, throwaway_database


@pytest.fixture(scope="module")
def server() -> Server:
    return reachable_server()


@pytest.fixture
def db(server: Server) -> Iterator[Database]:
    with throwaway_database(server) as database:
        yield database


@pytest.fixture
def db_user(server: Server, db: Database) -> Iterator[tuple[str, str]]:
    """A user that may only read the test database, with a password of its own."""
    user = f"syncpro_{uuid.uuid4().hex[:10]}"
    password = f"pw-{uuid.uuid4().hex}"
    with server.connect() as conn, conn.cursor() as cursor:
        cursor.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (user, password))
        cursor.execute(f"GRANT SELECT ON `{db.name}`.* TO %s@'%%'", (user,))
    try:
        yield user, password
    finally:
        with server.connect() as conn, conn.cursor() as cursor:
            cursor.execute("DROP USER IF EXISTS %s@'%%'", (user,))


@pytest.fixture(autouse=True)
def _no_password_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)


def keys(apps: tuple[App, ...]) -> list[str]:
    return [app.app_key for app in apps]


def assert_secret_absent(secret: str, exc: BaseException, logs: list[dict[str, Any]]) -> None:
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc)), repr(logs)]
    for text in texts:
        assert secret not in text


# --- reading the table ---


@pytest.mark.mysql
def test_rows_load_in_id_order_with_their_fields(db: Database) -> None:
    db.add(
        {"id": 30, **app_row("server2", configure_file_status=0, configure_file_list="conf/x.yml")},
        {"id": 10, **app_row("server1", configure_file_status=None, configure_file_list=None)},
        {
            "id": 20,
            **app_row("gate1", "gate", configure_file_status=1),
            "configure_file_list": " conf/app.yml, ,bin/start.sh ,",
            "network_ip": "10.0.0.1",
            "pro_dir": "/data/www/gate",
        },
    )

    inventory, warnings = load_mysql_inventory(db.settings())

    assert warnings == []
    assert inventory.apps == (
        App("server1", "server", True, 0, ()),
        App("gate1", "gate", True, 1, ("conf/app.yml", "bin/start.sh")),
        App("server2", "server", True, 0, ("conf/x.yml",)),
    )
    assert inventory.apps[1].config_integrated


@pytest.mark.mysql
def test_only_auto_deloy_one_makes_an_app_deployable(db: Database) -> None:
    db.add(
        app_row("on", auto_deloy="1"),
        app_row("off", auto_deloy="0"),
        app_row("null", auto_deloy=None),
        app_row("blank", auto_deloy=""),
        app_row("yes", auto_deloy="y"),
    )

    inventory, warnings = load_mysql_inventory(db.settings())

    assert warnings == []
    assert keys(inventory.apps) == ["on", "off", "null", "blank", "yes"]
    assert keys(inventory.deployable) == ["on"]


@pytest.mark.mysql
def test_empty_file_list_or_null_status_makes_no_type_two_app(db: Database) -> None:
    db.add(
        app_row("listed_empty", configure_file_status=1, configure_file_list=""),
        app_row("listed_null", configure_file_status=1, configure_file_list=None),
        app_row("status_null", configure_file_status=None, configure_file_list="conf/a.yml"),
    )

    inventory, _ = load_mysql_inventory(db.settings())

    assert [a.config_integrated for a in inventory.apps] == [False, False, False]
    assert [a.configure_file_status for a in inventory.apps] == [1, 1, 0]


@pytest.mark.mysql
def test_rows_without_app_key_are_skipped_without_a_warning(db: Database) -> None:
    db.add(
        app_row("server1"),
        {"app_key": None, "local_name": "server", "auto_deloy": "1"},
        {"app_key": "", "local_name": "server", "auto_deloy": "1"},
        {"network_ip": "10.0.0.9"},
    )

    inventory, warnings = load_mysql_inventory(db.settings())

    assert keys(inventory.apps) == ["server1"]
    assert warnings == []


@pytest.mark.mysql
def test_unsafe_names_skip_their_row_with_a_warning_naming_its_id(db: Database) -> None:
    db.add(
        {"id": 1, **app_row("server1")},
        {"id": 7, **app_row("../x")},
        {"id": 8, **app_row("all")},
        {"id": 9, **app_row("a/b")},
        {"id": 10, **app_row("..")},
        {"id": 11, **app_row("server3", "..")},
        {"id": 12, **app_row("server4", None)},
        {"id": 13, **app_row("server5", "all")},
        {"id": 14, **app_row("server2")},
    )

    inventory, warnings = load_mysql_inventory(db.settings())

    assert keys(inventory.apps) == ["server1", "server2"]
    assert len(warnings) == 7
    assert warnings[0] == (
        "pre_server_detail id=7: app_key '../x' is not a safe path component (contains '/' or NUL)"
    )
    assert warnings[1] == "pre_server_detail id=8: app_key 'all' is reserved (it selects every app)"
    expected = [("id=9", "app_key"), ("id=10", "app_key"), ("id=11", "local_name")]
    expected += [("id=12", "local_name"), ("id=13", "local_name")]
    for warning, (row_id, column) in zip(warnings[2:], expected, strict=True):
        assert warning.startswith(f"pre_server_detail {row_id}: {column} ")


@pytest.mark.mysql
def test_sql_in_values_and_keys_is_plain_data(db: Database) -> None:
    db.add(
        {"id": 1, **app_row("server1' OR '1'='1")},
        {"id": 2, **app_row("x`;DROP", "server", configure_file_list="a.yml');DROP TABLE x;--")},
        {"id": 3, **app_row("server1", "x'); DROP TABLE pre_server_detail; --")},
    )

    inventory, warnings = load_mysql_inventory(db.settings())

    assert inventory.apps == (App("x`;DROP", "server", True, 0, ("a.yml');DROP TABLE x;--",)),)
    assert [w.split(":")[0] for w in warnings] == [
        "pre_server_detail id=1",
        "pre_server_detail id=3",
    ]
    again, _ = load_mysql_inventory(db.settings())
    assert again == inventory


@pytest.mark.mysql
def test_duplicate_app_keys_keep_the_first_row_and_warn_about_the_others(db: Database) -> None:
    db.add(
        {"id": 4, **app_row("server1", "old", auto_deloy="0")},
        {"id": 5, **app_row("server2")},
        {"id": 6, **app_row("server1", "new")},
        {"id": 9, **app_row("server1", "newer")},
    )

    inventory, warnings = load_mysql_inventory(db.settings())

    assert inventory.apps == (App("server1", "old", False), App("server2", "server"))
    assert warnings == [
        "pre_server_detail id=6: app_key 'server1' duplicates id=4; the first row wins",
        "pre_server_detail id=9: app_key 'server1' duplicates id=4; the first row wins",
    ]


@pytest.mark.mysql
def test_a_table_without_an_id_column_loads_in_table_order(db: Database) -> None:
    db.execute(
        "CREATE TABLE apps_noid (app_key VARCHAR(64), local_name VARCHAR(64),"
        " auto_deloy VARCHAR(2), configure_file_status INT, configure_file_list TEXT)"
    )
    db.table = "apps_noid"
    db.add(app_row("b"), app_row("../bad"), app_row("a"), app_row("b", "other"))

    inventory, warnings = load_mysql_inventory(db.settings(table="apps_noid"))

    assert keys(inventory.apps) == ["b", "a"]
    assert warnings[0].startswith("apps_noid row 2: app_key '../bad'")
    assert warnings[1] == "apps_noid row 4: app_key 'b' duplicates row 1; the first row wins"


@pytest.mark.mysql
def test_column_names_match_regardless_of_case(db: Database) -> None:
    db.execute(
        "CREATE TABLE upper_case (ID INT PRIMARY KEY, APP_KEY VARCHAR(64), Local_Name VARCHAR(64),"
        " AUTO_DELOY VARCHAR(2), Configure_File_Status INT, CONFIGURE_FILE_LIST TEXT)"
    )
    db.table = "upper_case"
    db.add({"ID": 2, **app_row("second")}, {"ID": 1, **app_row("first")})

    inventory, _ = load_mysql_inventory(db.settings(table="upper_case"))

    assert keys(inventory.apps) == ["first", "second"]


@pytest.mark.mysql
def test_loading_logs_one_event_with_the_counts(db: Database) -> None:
    db.add(app_row("server1"), app_row("../x"), {"app_key": None})

    with structlog.testing.capture_logs() as logs:
        load_mysql_inventory(db.settings())

    loaded = [e for e in logs if e["event"] == "inventory.loaded"]
    assert len(loaded) == 1
    assert loaded[0]["apps"] == 1
    assert loaded[0]["skipped"] == 1
    assert loaded[0]["server"] == f"{db.server.host}:{db.server.port}/{db.name}"


# --- failures: one line, naming the server, never the password ---


@pytest.mark.mysql
def test_a_missing_table_is_an_inventory_error_naming_the_server(db: Database) -> None:
    with pytest.raises(InventoryError) as caught:
        load_mysql_inventory(db.settings(table="no_such_table"))

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"cannot read inventory from mysql {db.server.host}:{db.server.port}/{db.name}: "
    )
    assert "no_such_table" in message
    assert "doesn't exist" in message


@pytest.mark.mysql
def test_a_missing_column_is_an_inventory_error_naming_it(db: Database) -> None:
    db.execute("ALTER TABLE pre_server_detail DROP COLUMN auto_deloy")

    with pytest.raises(InventoryError, match="has no column auto_deloy") as caught:
        load_mysql_inventory(db.settings())

    assert "\n" not in str(caught.value)


@pytest.mark.mysql
def test_an_unknown_database_is_an_inventory_error(db: Database) -> None:
    settings = db.settings(url=db.server.url(f"{db.name}_missing"))

    with pytest.raises(InventoryError, match=r"Unknown database .*_missing") as caught:
        load_mysql_inventory(settings)

    assert str(caught.value).startswith(f"cannot read inventory from mysql {db.server.host}:")


def test_a_table_name_that_is_not_an_identifier_is_refused_before_connecting() -> None:
    settings = InventorySettings(
        source="mysql", url="mysql://root@127.0.0.1:1/autotask", table="t; DROP TABLE x"
    )

    with pytest.raises(
        InventoryError, match=re.escape("inventory.table: 't; DROP TABLE x' is not a plain")
    ):
        load_mysql_inventory(settings)


def test_an_unreachable_server_gives_one_line_naming_host_port_and_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = f"file-secret-{uuid.uuid4().hex}"
    secret_env = f"env-secret-{uuid.uuid4().hex}"
    password_file = tmp_path / "db.password"
    password_file.write_text(secret_file + "\n")
    monkeypatch.setenv(PASSWORD_ENV, secret_env)
    settings = InventorySettings(
        source="mysql",
        url="mysql://root@127.0.0.1:1/autotask",
        password_file=password_file,
        connect_timeout=2.0,
    )

    with structlog.testing.capture_logs() as logs, pytest.raises(InventoryError) as caught:
        load_mysql_inventory(settings)

    message = str(caught.value)
    assert message == "cannot read inventory from mysql 127.0.0.1:1/autotask: connection refused"
    for secret in (secret_file, secret_env):
        assert_secret_absent(secret, caught.value, logs)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port whose connections the kernel completes and nobody ever answers: a server that
    accepts and sends no greeting."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


def test_a_server_that_never_greets_is_given_up_on_after_the_connect_timeout(
    silent_server: int,
) -> None:
    settings = InventorySettings(
        source="mysql", url=f"mysql://root@127.0.0.1:{silent_server}/autotask", connect_timeout=1.0
    )
    started = time.monotonic()

    with pytest.raises(InventoryError) as caught:
        load_mysql_inventory(settings)

    # PyMySQL alone would wait max(connect_timeout, 30) s for the greeting.
    assert time.monotonic() - started < 20
    assert str(caught.value) == (
        f"cannot read inventory from mysql 127.0.0.1:{silent_server}/autotask:"
        " connected, but no answer within 1s (is it a MySQL/MariaDB server?)"
    )


def test_a_password_in_the_url_never_appears_when_the_server_is_unreachable() -> None:
    secret = f"url-secret-{uuid.uuid4().hex}"
    settings = InventorySettings(source="mysql", url=f"mysql://root:{secret}@127.0.0.1:1/autotask")

    with structlog.testing.capture_logs() as logs, pytest.raises(InventoryError) as caught:
        load_mysql_inventory(settings)

    assert "127.0.0.1:1/autotask" in str(caught.value)
    assert_secret_absent(secret, caught.value, logs)


@pytest.mark.mysql
def test_a_wrong_password_from_a_file_is_refused_without_showing_it(
    db: Database, db_user: tuple[str, str], tmp_path: Path
) -> None:
    user, _ = db_user
    wrong = f"wrong-{uuid.uuid4().hex}"
    password_file = tmp_path / "db.password"
    password_file.write_text(wrong)
    settings = db.settings(url=db.server.url(db.name, user=user), password_file=password_file)

    with structlog.testing.capture_logs() as logs, pytest.raises(InventoryError) as caught:
        load_mysql_inventory(settings)

    assert "Access denied" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert_secret_absent(wrong, caught.value, logs)


@pytest.mark.mysql
def test_the_password_comes_from_the_url_then_the_file_then_the_environment(
    db: Database, db_user: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, password = db_user
    db.add(app_row("server1"))
    right_file, wrong_file = tmp_path / "right", tmp_path / "wrong"
    right_file.write_text(f"{password}\n")
    wrong_file.write_text("wrong")
    bare_url = db.server.url(db.name, user=user)
    url_with_password = db.server.url(db.name, user=user, password=password)

    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    from_url, _ = load_mysql_inventory(db.settings(url=url_with_password, password_file=wrong_file))
    from_file, _ = load_mysql_inventory(db.settings(url=bare_url, password_file=right_file))
    monkeypatch.setenv(PASSWORD_ENV, password)
    from_env, _ = load_mysql_inventory(db.settings(url=bare_url))

    assert keys(from_url.apps) == keys(from_file.apps) == keys(from_env.apps) == ["server1"]
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(InventoryError, match="Access denied"):
        load_mysql_inventory(db.settings(url=bare_url))


def test_an_unreadable_password_file_is_an_inventory_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent.password"
    settings = InventorySettings(
        source="mysql", url="mysql://root@127.0.0.1:1/autotask", password_file=missing
    )

    with pytest.raises(
        InventoryError, match=re.escape(f"inventory.password_file {missing}: No such file")
    ):
        load_mysql_inventory(settings)


# --- the URL ---


def test_a_url_names_user_host_port_database_and_maybe_a_password() -> None:
    assert parse_mysql_url("mysql://deploy:s%40cret@db.example:3307/autotask") == MysqlTarget(
        "db.example", 3307, "deploy", "autotask"
    )
    assert parse_mysql_url("mysql://deploy:s%40cret@db:3307/a").password == "s@cret"  # noqa: S105
    assert parse_mysql_url("mariadb://root@127.0.0.1/autotask").port == 3306
    assert parse_mysql_url("mysql://root@127.0.0.1/autotask").password is None
    assert parse_mysql_url("mysql://root@[::1]:3306/autotask").where == "[::1]:3306/autotask"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgres://root:hunter2@h/db", "scheme must be mysql:// or mariadb://"),
        ("mysql://root:hunter2@h:port/db", "the port must be a number from 1 to 65535"),
        ("mysql://root:hunter2@h:3306", "names no database"),
        ("mysql://root:hunter2@h:3306/db/extra", "names no database"),
        ("mysql://:hunter2@h:3306/db", "names no user"),
        ("mysql://root:hunter2@h/db?ssl=1", "takes no ?query"),
        ("mysql://root:hunter2@h:33x6/db", "the port must be a number from 1 to 65535"),
        ("mysql://root:hunter2@h:0/db", "the port must be a number from 1 to 65535"),
        ("mysql://root:hunter2@h:65536/db", "the port must be a number from 1 to 65535"),
        ("mysql://root:hunter2@h:/db", "the port must be a number from 1 to 65535"),
        ("mysql://root:hunter2@h:+80/db", "the port must be a number from 1 to 65535"),
        ("mysql://root:hunter2@[::1/db", "names no host"),
        ("mysql://root:hunter2@ho st/db", "names no host"),
        ("mysql://root:hunter2@/db", "names no host"),
    ],
)
def test_a_malformed_url_is_refused_without_repeating_it(url: str, problem: str) -> None:
    with pytest.raises(InventoryError) as caught:
        parse_mysql_url(url)

    assert problem in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_a_target_never_shows_its_password_in_repr() -> None:
    target = parse_mysql_url("mysql://root:hunter2@127.0.0.1:3306/autotask")

    assert "hunter2" not in repr(target)
    assert "hunter2" not in target.where


def _check_config_with_url(tmp_path: Path, url: str) -> subprocess.CompletedProcess[str]:
    """Run check-config on a MySQL-inventory config (no apps: list) with this url."""
    config = write_config(tmp_path, [], inventory={"source": "mysql", "url": url})
    text = config.read_text(encoding="utf-8").replace("apps: []\n", "")
    config.write_text(text, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "syncpro", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.daemon
@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://root:hunter2@127.0.0.1:33x6/autotask", "the port must be a number"),
        ("mysql://root:hunter2@127.0.0.1:3306/", "names no database"),
        ("http://root:hunter2@127.0.0.1:3306/autotask", "scheme must be"),
    ],
)
def test_check_config_refuses_a_malformed_inventory_url_naming_the_key_not_the_password(
    tmp_path: Path, url: str, problem: str
) -> None:
    done = _check_config_with_url(tmp_path, url)

    assert done.returncode == 2, done.stdout
    assert "valid" not in done.stdout
    [line] = [line for line in done.stderr.splitlines() if "inventory.url" in line]
    assert problem in line
    assert "hunter2" not in done.stderr + done.stdout


@pytest.mark.daemon
def test_a_well_formed_inventory_url_passes_check_config(tmp_path: Path) -> None:
    done = _check_config_with_url(tmp_path, "mysql://root:hunter2@127.0.0.1:3306/autotask")

    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout
    assert "hunter2" not in done.stderr + done.stdout
