"""`syncpro sync` and friends as a real subprocess: exit codes, one JSON document, clear errors."""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

import control_fakes
from syncpro import __version__, log
from syncpro.errors import ExitCode

from helpers import (
    SERVER_GROUP,
    app,
    config_dict,
    read_terminal,
    snapshot,
    without_dac_override,
    write_config,
    write_tree,
)
from mysql_support import app_row, reachable_server, throwaway_database

pytestmark = pytest.mark.daemon  # nearly every test here runs the syncpro command

SYNCPRO = str(Path(sys.executable).parent / "syncpro")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

sock_dir, handler, server = control_fakes.sock_dir, control_fakes.handler, control_fakes.server


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SYNCPRO_CONFIG"}


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = _environ()
    environ.update(env or {})
    return subprocess.run(
        [SYNCPRO, *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_as_deploy_user(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run syncpro as root that obeys file modes, as an unprivileged deploy user would."""
    return subprocess.run(
        without_dac_override(SYNCPRO, *args),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_on_terminal(*args: str, cwd: Path) -> tuple[int, str, str]:
    """Run syncpro with stdout on a pseudo-terminal and stderr on a pipe; return the exit code,
    what the terminal showed (colours aside) and stderr."""
    main, side = pty.openpty()
    with subprocess.Popen(
        [SYNCPRO, *args],
        cwd=cwd,
        env=_environ(),
        stdin=subprocess.DEVNULL,
        stdout=side,
        stderr=subprocess.PIPE,
    ) as proc:
        os.close(side)
        written = read_terminal(main)
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
        code = proc.wait(timeout=60)
    os.close(main)
    shown = ANSI.sub("", written.decode()).replace("\r\n", "\n")
    return code, shown, stderr


def run_with_closed_stdout(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run syncpro with a stdout whose reader has gone (`syncpro ... | head -0`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [SYNCPRO, *args],
            cwd=cwd,
            env=_environ(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


def one_document(stdout: str) -> dict[str, object]:
    """Parse stdout as exactly one JSON document (json.loads refuses trailing data)."""
    doc = json.loads(stdout)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """A config with the server group synced from complete sources; return its path."""
    for key in ("server1", "server2"):
        write_tree(tmp_path / f"var/remotecomdir/softdir/{key}", {"bin/run": "v1"})
        write_tree(tmp_path / f"var/remotecomdir/configuredir/{key}", {"app.conf": key})
    write_tree(tmp_path / "var/updatedir/softdir/server", {"bin/run": "v2"})
    for key in ("server1", "server2"):
        write_tree(tmp_path / f"var/updatedir/configuredir/server/{key}", {"app.conf": key})
    return write_config(tmp_path / "config.yml", config_dict(SERVER_GROUP, grace=0))


def test_sync_exits_0_and_prints_exactly_one_json_document_when_all_is_good(
    demo: Path, tmp_path: Path
) -> None:
    proc = run("sync", "-k", "server", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1  # one compact line when stdout is not a terminal
    doc = one_document(proc.stdout)
    assert doc["code"] == "0"
    assert doc["data"] == {"code": "0", "data": {"0": "1", "1": "", "2": ""}, "msg": "成功"}
    assert doc["param"] == {"action": "Deploy:Core:syncpro", "k": "server", "update": "0"}
    assert (tmp_path / "var/softdir/server/bin/run").read_text() == "v1"
    assert "Traceback" not in proc.stderr


def test_sync_logs_one_json_event_per_sync_on_stderr_carrying_the_response(
    demo: Path, tmp_path: Path
) -> None:
    proc = run("sync", "-k", "server1", "--config", str(demo), cwd=tmp_path)

    events = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    finished = [e for e in events if e.get("event") == "sync.finished"]
    assert len(finished) == 1
    response = finished[0]["response"]
    assert response["param"]["k"] == "server1"
    assert response == one_document(proc.stdout) | {"started": response["started"]}
    assert response["drift"] == []
    program = response["apps"][0]["program"]
    assert program["status"] == "published"
    assert (program["files"], program["copied"]) == (1, 1)
    assert program["bytes_copied"] == len("v1")
    assert program["seconds"] >= 0


def test_quiet_keeps_stderr_to_warnings_and_errors(demo: Path, tmp_path: Path) -> None:
    proc = run("sync", "-q", "-k", "server1,nosuch", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == 1
    assert one_document(proc.stdout)["unknown"] == ["nosuch"]
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    assert {e["level"] for e in events} <= {"warning", "error"}
    # The sync was unsuccessful (an unknown key): -q must not hide that it finished so.
    assert [e["level"] for e in events if e["event"] == "sync.finished"] == ["warning"]


def test_on_a_terminal_log_events_are_rendered_for_people_not_as_json(tmp_path: Path) -> None:
    import pty

    from syncpro import log

    main, side = pty.openpty()
    with os.fdopen(side, "w") as terminal:
        log.configure(terminal)
        structlog.get_logger().info("sync.finished", k="server1", ok=True)
        terminal.flush()
    text = re.sub(r"\x1b\[[0-9;]*m", "", os.read(main, 4096).decode())  # colours aside
    os.close(main)

    assert "sync.finished" in text
    assert "k=server1" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_sync_with_update_publishes_from_updatedir(demo: Path, tmp_path: Path) -> None:
    proc = run("sync", "-k", "server", "--update", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert one_document(proc.stdout)["param"]["update"] == "1"
    assert (tmp_path / "var/softdir/server/bin/run").read_text() == "v2"


def test_pretty_output_is_still_exactly_one_json_document(demo: Path, tmp_path: Path) -> None:
    proc = run("sync", "-k", "server1", "--pretty", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") > 1
    assert one_document(proc.stdout)["code"] == "0"


def test_sync_exits_1_for_an_unknown_key_and_still_syncs_the_known_ones(
    demo: Path, tmp_path: Path
) -> None:
    proc = run("sync", "-k", "server1,nosuch", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == 1
    doc = one_document(proc.stdout)
    assert doc["code"] == "0"
    assert doc["data"]["data"]["0"] == "0"
    assert "nosuch" in doc["data"]["msg"]
    assert (tmp_path / "var/softdir/server/bin/run").read_text() == "v1"


def test_sync_exits_1_when_a_source_is_missing(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yml", config_dict([app("a1", "a")], grace=0))
    write_tree(tmp_path / "var/remotecomdir/softdir/a1", {"p": "1"})

    proc = run("sync", "-k", "a1", "--config", str(config), cwd=tmp_path)

    assert proc.returncode == 1
    doc = one_document(proc.stdout)
    assert doc["data"]["data"]["2"] == str(tmp_path / "var/remotecomdir/configuredir/a1")


@pytest.mark.parametrize("k", ["", " , ", "''"])
def test_sync_exits_2_for_an_empty_k_and_runs_nothing(demo: Path, tmp_path: Path, k: str) -> None:
    proc = run("sync", "-k", k, "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == 2
    doc = one_document(proc.stdout)  # the refusal, as any entry point answers one
    assert doc["code"] != "0"
    assert doc["parseparameters"]["code"] == doc["code"]
    assert "k must not be empty" in doc["data"]["msg"]
    assert doc["param"]["k"] == ""  # normalised, as every document echoes k
    assert doc["data"]["data"]["0"] == "0"
    assert "k" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "var/softdir/server").exists()


def test_sync_without_k_is_a_usage_error(demo: Path, tmp_path: Path) -> None:
    proc = run("sync", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == 2
    assert "-k" in proc.stderr


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "dirs: {remotecomdir: r, updatedir: u, softdir: s, configuredir: c}\n"
            "apps:\n  - {app_key: '../x', local_name: server}\n",
            ["apps[0].app_key", "../x"],
        ),
        (
            "dirs: {remotecomdir: r, updatedir: u, softdir: s, configuredir: c}\n"
            "apps:\n  - {app_key: all, local_name: server}\n",
            ["apps[0].app_key", "all"],
        ),
        (
            "dirs: {remotecomdir: r, updatedir: u, softdir: s, configuredir: c}\n"
            "apps:\n  - {app_key: a, local_name: g}\n  - {app_key: a, local_name: h}\n",
            ["apps[1].app_key", "duplicate"],
        ),
        (
            "dirs: {remotecomdir: r, updatedir: u, softdir: s, configuredir: c}\n"
            "publish: {grace: 10, colour: blue}\n",
            ["publish.colour", "unknown"],
        ),
        ("dirs: [unclosed\n", ["YAML"]),
    ],
)
def test_a_broken_config_exits_2_with_one_clear_message_and_no_traceback(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    config = tmp_path / "broken.yml"
    config.write_text(text)

    for command in (["sync", "-k", "server"], ["check-config"]):
        proc = run(*command, "--config", str(config), cwd=tmp_path)

        assert proc.returncode == 2, command
        assert proc.stdout == ""
        assert str(config) in proc.stderr
        for word in words:
            assert word in proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_missing_config_file_exits_2_naming_it(tmp_path: Path) -> None:
    proc = run("sync", "-k", "server", "--config", str(tmp_path / "nope.yml"), cwd=tmp_path)

    assert proc.returncode == 2
    assert "nope.yml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_without_any_config_the_error_says_where_it_looked(tmp_path: Path) -> None:
    if Path("/etc/syncpro/config.yml").exists():
        pytest.skip("this machine has a system-wide config")

    proc = run("check-config", cwd=tmp_path)

    assert proc.returncode == 2
    assert "SYNCPRO_CONFIG" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_config_is_found_through_syncpro_config_then_the_working_directory(
    demo: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    by_env = run("check-config", cwd=elsewhere, env={"SYNCPRO_CONFIG": str(demo)})
    by_cwd = run("check-config", cwd=tmp_path)

    assert by_env.returncode == 0, by_env.stderr
    assert str(demo) in by_env.stdout
    assert by_cwd.returncode == 0, by_cwd.stderr
    assert "config.yml" in by_cwd.stdout


def test_check_config_validates_and_summarises(demo: Path, tmp_path: Path) -> None:
    proc = run("check-config", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout
    assert str(tmp_path / "var/softdir") in proc.stdout
    assert "server" in proc.stdout
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert "missing" not in lines["remotecomdir"]
    assert "missing: made at the first sync" in lines["softdir"]  # not synced yet


def test_check_config_points_at_a_source_dir_that_does_not_exist(tmp_path: Path) -> None:
    doc = config_dict(SERVER_GROUP)
    doc["dirs"]["remotecomdir"] = "var/remotecomdr"  # the typo
    config = write_config(tmp_path / "config.yml", doc)

    proc = run("check-config", "--config", str(config), cwd=tmp_path)

    assert proc.returncode == 0
    line = next(x for x in proc.stdout.splitlines() if "remotecomdir" in x)
    assert "var/remotecomdr   (missing: nothing to sync; a typo?)" in line


def mysql_config(tmp_path: Path, url: str, **inventory: Any) -> Path:
    doc = config_dict([], extra={"inventory": {"source": "mysql", "url": url, **inventory}})
    return write_config(tmp_path / "config.yml", doc)


def test_check_config_fails_for_a_password_file_that_is_not_there(tmp_path: Path) -> None:
    missing = tmp_path / "db.password"
    config = mysql_config(
        tmp_path, "mysql://syncpro@127.0.0.1:3306/test", password_file=str(missing)
    )

    proc = run("check-config", "--config", str(config), cwd=tmp_path)

    assert proc.returncode == ExitCode.UNSUCCESSFUL, proc.stdout
    line = next(x for x in proc.stdout.splitlines() if "inventory.password_file" in x)
    assert line.split()[0] == "failed"
    assert f"{missing} does not exist" in line
    assert proc.stdout.splitlines()[-1] == "preflight: 1 failed (4 warnings)"


def test_check_config_strict_fails_when_folders_are_missing(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yml", config_dict(SERVER_GROUP))

    lenient = run("check-config", "--config", str(config), cwd=tmp_path)
    strict = run("check-config", "--strict", "--config", str(config), cwd=tmp_path)

    assert lenient.returncode == 0, lenient.stdout
    assert strict.returncode == ExitCode.UNSUCCESSFUL
    failed = {x.split()[1] for x in strict.stdout.splitlines() if x.split()[0] == "failed"}
    assert failed == {"dirs.remotecomdir", "dirs.updatedir", "dirs.softdir", "dirs.configuredir"}


def test_check_config_json_lists_every_check_for_scripts(demo: Path, tmp_path: Path) -> None:
    proc = run("check-config", "--json", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == 0
    doc = one_document(proc.stdout)
    assert (doc["valid"], doc["ok"]) == (True, True)
    checks = {c["key"]: c for c in doc["checks"]}
    assert checks["dirs.remotecomdir"]["status"] == "ok"
    assert checks["dirs.softdir"]["status"] == "warning"  # made at the first sync


def test_check_config_json_of_an_invalid_config_lists_its_problems(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text("dirs: {remotecomdir: r}\n")

    proc = run("check-config", "--json", "--config", str(config), cwd=tmp_path)

    assert proc.returncode == ExitCode.USAGE
    doc = one_document(proc.stdout)
    assert doc["valid"] is False
    assert any("dirs.updatedir: missing" in p for p in doc["problems"])


def test_check_config_connect_reports_an_unreachable_database_as_failed(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = mysql_config(tmp_path, f"mysql://root@127.0.0.1:{port}/test", connect_timeout=2)

    proc = run("check-config", "--connect", "--config", str(config), cwd=tmp_path)

    assert proc.returncode == ExitCode.UNSUCCESSFUL
    line = next(x for x in proc.stdout.splitlines() if x.split()[:2] == ["failed", "inventory"])
    assert f"127.0.0.1:{port}" in line


@pytest.mark.mysql
def test_check_config_connect_reads_the_inventory_table(tmp_path: Path) -> None:
    with throwaway_database(reachable_server()) as db:
        db.add(app_row("server1"), app_row("server2"), app_row("web1", "web", auto_deloy="0"))
        config = mysql_config(tmp_path, db.url)

        proc = run("check-config", "--connect", "--config", str(config), cwd=tmp_path)
        missing_table = mysql_config(tmp_path, db.url, table="no_such_table")
        refused = run(
            "check-config", "--connect", "--json", "--config", str(missing_table), cwd=tmp_path
        )

    assert proc.returncode == 0, proc.stdout
    assert "ok       inventory" in proc.stdout
    assert "3 apps (2 auto-deploy) read from table pre_server_detail" in proc.stdout
    assert refused.returncode == ExitCode.UNSUCCESSFUL
    inventory = one_document(refused.stdout)["checks"][-1]
    assert (inventory["key"], inventory["status"]) == ("inventory", "failed")
    assert "no_such_table" in inventory["message"]


def test_check_config_keys_prints_every_key_with_its_default_and_needs_no_config(
    tmp_path: Path,
) -> None:
    proc = run("check-config", "--keys", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    first = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines if line[:1].isalpha()}
    assert set(first) >= {"dirs.softdir", "control.mode", "apps[].auto_deploy", "publish.grace"}
    assert first["dirs.softdir"] == "(required)"
    assert first["control.mode"] == "0660"
    assert first["publish.grace"] == "10.0"
    assert any(line.startswith("$SYNCPRO_DB_PASSWORD ") for line in lines)


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    proc = run("--version", cwd=tmp_path)

    assert proc.returncode == 0
    assert proc.stdout.strip() == f"syncpro {__version__}"


def test_help_lists_sync_and_check_config(tmp_path: Path) -> None:
    proc = run("--help", cwd=tmp_path)

    assert proc.returncode == 0
    assert "sync" in proc.stdout
    assert "check-config" in proc.stdout


def test_a_cli_sync_leaves_sources_untouched_and_targets_exact(demo: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path / "var/remotecomdir", identity=True)

    for _ in range(2):
        assert run("sync", "-k", "all", "--config", str(demo), cwd=tmp_path).returncode == 0

    assert snapshot(tmp_path / "var/remotecomdir", identity=True) == before
    assert snapshot(tmp_path / "var/softdir/server") == snapshot(
        tmp_path / "var/remotecomdir/softdir/server2"
    )


def test_a_fifo_in_a_source_is_skipped_by_the_cli_without_hanging(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yml", config_dict([app("a1", "a")], grace=0))
    source = write_tree(tmp_path / "var/remotecomdir/softdir/a1", {"bin/run": "1"})
    write_tree(tmp_path / "var/remotecomdir/configuredir/a1", {"c": "1"})
    os.mkfifo(source / "bin/pipe")  # opening it for reading would block for ever

    proc = run("sync", "-k", "a1", "--config", str(config), cwd=tmp_path)  # 60 s timeout

    assert proc.returncode == 0, proc.stderr
    assert one_document(proc.stdout)["apps"][0]["program"]["skipped"] == ["bin/pipe"]
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    skipped = [e for e in events if e["event"] == "copy.special_file_skipped"]
    assert [(e["path"], e["kind"]) for e in skipped] == [(str(source / "bin/pipe"), "fifo")]
    # A published target that left something out says so after the success message.
    assert (
        one_document(proc.stdout)["data"]["msg"]
        == "成功: a1: program left out special files bin/pipe"
    )
    assert not (tmp_path / "var/softdir/a/bin/pipe").exists()
    assert (tmp_path / "var/softdir/a/bin/run").read_text() == "1"


def test_a_file_name_of_non_utf8_bytes_keeps_stdout_and_logs_valid_utf8_json(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "config.yml", config_dict(list(SERVER_GROUP), grace=0))
    for key in ("server1", "server2"):
        write_tree(tmp_path / f"var/remotecomdir/softdir/{key}", {"ok": key})
        write_tree(tmp_path / f"var/remotecomdir/configuredir/{key}", {"c": "1"})
    odd = os.fsencode(tmp_path / "var/remotecomdir/softdir/server1") + b"/bad\xff"
    with open(odd, "wb") as f:  # only server1 has it: drift names it in the document
        f.write(b"x")

    proc = subprocess.run(
        [SYNCPRO, "sync", "-k", "server", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )

    doc = json.loads(proc.stdout.decode("utf-8", "strict"))
    logs = [json.loads(line) for line in proc.stderr.decode("utf-8", "strict").splitlines()]
    assert proc.returncode == 0
    assert any("bad\\xff" in path for path in doc["drift"][0]["paths"])
    assert any(e["event"] == "sync.finished" for e in logs)
    assert os.path.exists(os.fsencode(tmp_path / "var/softdir/server") + b"/ok")


def test_folders_syncpro_creates_are_open_to_the_deploy_step_whatever_the_umask(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "config.yml", config_dict(list(SERVER_GROUP)))
    for key in ("server1", "server2"):
        write_tree(tmp_path / f"var/remotecomdir/softdir/{key}", {"bin/run": "1"})
        write_tree(tmp_path / f"var/remotecomdir/configuredir/{key}", {"c": "1"})
    os.chmod(tmp_path / "var/remotecomdir/softdir/server2", 0o700)  # a source's own mode

    proc = subprocess.run(
        ["sh", "-c", 'umask 0077 && exec "$@"', "sh", SYNCPRO, "sync", "-k", "server"],
        cwd=tmp_path,
        env={**os.environ, "SYNCPRO_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    mode = {
        rel: stat.S_IMODE(os.stat(tmp_path / "var" / rel).st_mode)
        for rel in ("softdir", "configuredir", "configuredir/server", "softdir/server")
    }
    # Made by syncpro: 0755 under a umask of 0077. A published tree keeps its source's mode.
    assert mode == {
        "softdir": 0o755,
        "configuredir": 0o755,
        "configuredir/server": 0o755,
        "softdir/server": 0o700,
    }


def test_a_failed_build_reports_its_own_error_though_its_staging_has_read_only_dirs(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "config.yml", config_dict([app("a1", "a")], grace=0))
    source = write_tree(
        tmp_path / "var/remotecomdir/softdir/a1", {"a_ro/x": "1", "z/secret.key": "2"}
    )
    write_tree(tmp_path / "var/remotecomdir/configuredir/a1", {"c": "1"})
    os.chmod(source / "a_ro", 0o500)  # copied first, so the staging holds a read-only dir
    os.chmod(source / "z/secret.key", 0)

    proc = run_as_deploy_user("sync", "-k", "a1", "--config", str(config), cwd=tmp_path)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "secret.key" in one_document(proc.stdout)["data"]["msg"]
    assert os.listdir(tmp_path / "var/softdir/.syncpro/staging") == []


@pytest.mark.parametrize("unreadable", ["lib/secret.key", "lib"])
def test_an_unreadable_source_fails_only_that_app_and_keeps_its_old_target(
    tmp_path: Path, unreadable: str
) -> None:
    apps = [app("a1", "a"), app("b1", "b")]
    config = write_config(tmp_path / "config.yml", config_dict(apps, grace=0))
    for key in ("a1", "b1"):
        write_tree(tmp_path / f"var/remotecomdir/softdir/{key}", {"lib/secret.key": "v1"})
        write_tree(tmp_path / f"var/remotecomdir/configuredir/{key}", {"c": "1"})
    assert run("sync", "-k", "all", "--config", str(config), cwd=tmp_path).returncode == 0
    old = snapshot(tmp_path / "var/softdir/a")
    for key in ("a1", "b1"):
        (tmp_path / f"var/remotecomdir/softdir/{key}/lib/secret.key").write_text("v2")
    os.chmod(tmp_path / "var/remotecomdir/softdir/a1" / unreadable, 0)

    proc = run_as_deploy_user("sync", "-k", "all", "--config", str(config), cwd=tmp_path)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = one_document(proc.stdout)
    assert "a1" in doc["data"]["msg"]
    assert "ermission denied" in doc["data"]["msg"]
    assert snapshot(tmp_path / "var/softdir/a") == old
    assert (tmp_path / "var/softdir/b/lib/secret.key").read_text() == "v2"
    assert os.listdir(tmp_path / "var/softdir/.syncpro/staging") == []


# --- readable output on a terminal ---


def test_on_a_terminal_sync_prints_one_short_line_per_app_and_target(
    demo: Path, tmp_path: Path
) -> None:
    code, shown, stderr = run_on_terminal(
        "sync", "-k", "server", "--config", str(demo), cwd=tmp_path
    )

    assert code == 0, stderr
    lines = shown.splitlines()
    rows = {tuple(line.split()[:2]): line for line in lines[:-1]}
    assert sorted(rows) == [
        ("server1", "config"),
        ("server1", "program"),
        ("server2", "config"),
        ("server2", "program"),
    ]
    programs = sorted(rows[(key, "program")].split()[2] for key in ("server1", "server2"))
    assert programs == ["published", "superseded"]  # one tree per group, one winner
    assert rows[("server1", "config")].split()[2] == "published"
    published = next(line for line in lines if " program  published " in line)
    assert published.endswith(" s") and "1 file, 1 copied, 0 linked, 2 B" in published
    assert lines[-1].startswith("ok: 2 apps, 4 targets, 0 failed")
    assert all(len(line) < 120 for line in lines)
    assert "{" not in shown  # no JSON document unless asked
    assert (tmp_path / "var/softdir/server/bin/run").read_text() == "v1"


def test_on_a_terminal_a_second_sync_says_unchanged_and_a_failure_names_its_error(
    demo: Path, tmp_path: Path
) -> None:
    assert run_on_terminal("sync", "-k", "server1", "--config", str(demo), cwd=tmp_path)[0] == 0
    shutil.rmtree(tmp_path / "var/remotecomdir/configuredir/server2")

    code, shown, _ = run_on_terminal("sync", "-k", "server", "--config", str(demo), cwd=tmp_path)

    assert code == 1
    rows = {tuple(line.split()[:2]): line for line in shown.splitlines()[:-1]}
    assert rows[("server1", "config")].split()[2] == "unchanged"
    missing = rows[("server2", "config")]
    assert missing.split()[2] == "missing"
    assert f"source {tmp_path / 'var/remotecomdir/configuredir/server2'} is missing" in missing
    assert shown.splitlines()[-1].startswith("unsuccessful:")


def test_on_a_terminal_a_failed_target_shows_its_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yml", config_dict([app("a1", "a")], grace=0))
    write_tree(tmp_path / "var/remotecomdir/softdir/a1", {"p": "1"})
    write_tree(tmp_path / "var/remotecomdir/configuredir/a1", {"c": "1"})
    (tmp_path / "var").mkdir(exist_ok=True)
    (tmp_path / "var/softdir").write_text("a file where the folder belongs")

    code, shown, _ = run_on_terminal("sync", "-k", "a1", "--config", str(config), cwd=tmp_path)

    assert code == 1
    failed = next(line for line in shown.splitlines() if line.startswith("a1  program"))
    assert failed.split()[2] == "failed"
    assert "Not a directory" in failed, failed


def test_on_a_terminal_json_prints_the_whole_document_instead(demo: Path, tmp_path: Path) -> None:
    code, shown, _ = run_on_terminal(
        "sync", "-k", "server1", "--json", "--config", str(demo), cwd=tmp_path
    )

    assert code == 0
    assert one_document(shown)["param"] == {
        "action": "Deploy:Core:syncpro",
        "k": "server1",
        "update": "0",
    }


def test_log_format_console_renders_stderr_for_people_and_keeps_documents_short(
    demo: Path, tmp_path: Path
) -> None:
    proc = run(
        "sync", "-k", "server1", "--log-format", "console", "--config", str(demo), cwd=tmp_path
    )

    assert proc.returncode == 0
    one_document(proc.stdout)  # piped stdout keeps its document
    finished = next(line for line in proc.stderr.splitlines() if "sync.finished" in line)
    with pytest.raises(json.JSONDecodeError):
        json.loads(finished)
    assert "\x1b[" not in finished  # no colours into a pipe
    assert re.search(r"response='<\d+ keys>'", finished)  # the document summarised, not dumped
    assert len(finished) < 300


def test_log_format_json_keeps_json_lines_on_a_terminal() -> None:
    main, side = pty.openpty()
    with os.fdopen(side, "w") as terminal:
        log.configure(terminal, fmt="json")
        structlog.get_logger().info("sync.finished", k="server1", response={"code": "0"})
        terminal.flush()
    text = os.read(main, 4096).decode()
    os.close(main)

    assert json.loads(text)["response"] == {"code": "0"}


# --- exit codes and pipes ---


def test_a_k_that_selects_nothing_is_a_usage_error_with_did_you_mean(
    demo: Path, tmp_path: Path
) -> None:
    proc = run("sync", "-k", "sever1", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == ExitCode.USAGE == 2
    assert "'sever1' (did you mean server1" in proc.stderr
    assert one_document(proc.stdout)["unknown"] == ["sever1"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "var/softdir/server").exists()


def test_an_unknown_key_beside_known_ones_is_named_with_a_hint_in_a_warning(
    demo: Path, tmp_path: Path
) -> None:
    proc = run("sync", "-q", "-k", "server1,servr2", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == 1
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    unknown = [e for e in events if e["event"] == "cli.unknown_key"]
    assert [(e["token"], e["level"]) for e in unknown] == [("servr2", "warning")]
    assert "did you mean server2" in unknown[0]["hint"]


def test_a_sync_whose_reader_went_away_ends_quietly_after_publishing(
    demo: Path, tmp_path: Path
) -> None:
    proc = run_with_closed_stdout("sync", "-k", "server1", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == ExitCode.BROKEN_PIPE
    assert "Traceback" not in proc.stderr
    assert "Exception ignored" not in proc.stderr
    assert (tmp_path / "var/softdir/server/bin/run").read_text() == "v1"


def test_check_config_into_a_closed_pipe_ends_quietly(demo: Path, tmp_path: Path) -> None:
    proc = run_with_closed_stdout("check-config", "--config", str(demo), cwd=tmp_path)

    assert proc.returncode == ExitCode.BROKEN_PIPE
    assert proc.stderr == ""


def test_help_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    proc = run_with_closed_stdout("--help", cwd=tmp_path)

    assert proc.returncode == 0  # argparse itself drops a failed write of the help
    assert proc.stderr == ""


def test_ctl_status_into_a_closed_pipe_ends_quietly(
    tmp_path: Path, server: control_fakes.ControlServer
) -> None:
    proc = run_with_closed_stdout("ctl", "status", "--socket", str(server.path), cwd=tmp_path)

    assert proc.returncode == ExitCode.BROKEN_PIPE
    assert proc.stderr == ""


def test_a_sync_that_published_exits_0_when_the_trash_sweeper_cannot_be_started(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What `prlimit --nproc` does to a deploy user: the fork of the sweeper fails with EAGAIN.
    # (root is exempt from RLIMIT_NPROC, so the refusal is injected where the spawn happens.)
    from syncpro import cli

    refused: list[object] = []

    def no_process_left(*args: object, **kwargs: object) -> int:
        refused.append(args)
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "posix_spawn", no_process_left)
    monkeypatch.chdir(tmp_path)
    write_tree(tmp_path / "var/remotecomdir/softdir/server2", {"bin/run": "v3"})
    assert cli.main(["sync", "-k", "server", "--config", str(demo), "--json"]) == 0  # a swap
    write_tree(tmp_path / "var/remotecomdir/softdir/server2", {"bin/run": "v4"})

    code = cli.main(["sync", "-k", "server", "--config", str(demo), "--json"])

    out = capsys.readouterr()
    assert code == 0, out.err
    assert refused, "the sweeper was never asked for"
    assert "Traceback" not in out.err
    assert "cli.sweep_not_started" in out.err
    assert (tmp_path / "var/softdir/server/bin/run").read_text() == "v4"
