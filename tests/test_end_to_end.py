"""The control plane against the real daemon: `syncpro ctl`, raw socket clients, curl over
HTTP, a one-shot sync racing the daemon, SIGHUP, and the MariaDB inventory (SPEC sections 5-7).
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_fakes import ask
from syncpro.testing import Daemon, put, running, tree, write_config

from mysql_support import Database, TcpProxy, app_row, reachable_server, throwaway_database

pytestmark = pytest.mark.daemon  # every test here starts syncpro as a subprocess

APPS = [
    {"app_key": "server1", "local_name": "server"},
    {"app_key": "server2", "local_name": "server"},
    {"app_key": "web1", "local_name": "web"},
]
# The watcher waits long enough never to sync by itself during a test: whatever gets
# published was published by the request under test. The catch-up at start still runs.
QUIET_WATCHER = {"settle": 60, "max_wait": 120}
SYNC_ACTION = "Deploy:Core:syncpro"


# --- files ---


@pytest.fixture
def base(base: Path) -> Path:
    """conftest's sources of server1 and web1, and server2's too (run_dir is conftest's)."""
    put(base / "r/softdir/server2", {"bin/run.sh": "v1\n"})
    put(base / "r/configuredir/server2", {"app.properties": "node=2\n"})
    return base


def config_for(
    base: Path, run_dir: Path, apps: list[dict[str, Any]] | None = None, **sections: Any
) -> Path:
    sections.setdefault("watch", QUIET_WATCHER)
    control = {"socket": str(run_dir / "control.sock"), **sections.pop("control", {})}
    return write_config(base, APPS if apps is None else apps, control=control, **sections)


def socket_of(config: Path) -> Path:
    doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    return Path(doc["control"]["socket"])


# --- clients ---


def syncpro(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncpro", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return syncpro("ctl", *args, "--config", str(config))


def one_document(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {proc.stdout!r} (stderr {proc.stderr!r})"
    doc = json.loads(lines[0])
    assert isinstance(doc, dict)
    return doc


def eventually(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling interval of a deadline-bound wait


def caught_up(daemon: Daemon, *keys: str, update: bool = False) -> None:
    """Wait until the catch-up at start has synced each of keys (alone or in a batch)."""

    def synced() -> set[str]:
        return {key for e in daemon.syncs(update=update) for key in e["k"].split()}

    daemon.wait(lambda: set(keys) <= synced(), what=f"the catch-up of {keys}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def curl(*args: str) -> tuple[int, str]:
    """Run curl as the original platform's clients do; return the HTTP status and the body."""
    proc = subprocess.run(
        ["curl", "-s", "--max-time", "30", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"curl failed: {proc.stderr!r}"
    body, _, status = proc.stdout.rpartition("\n")
    return int(status), body


def rex(port: int, token: str, body: str) -> tuple[int, str]:
    return curl("-X", "POST", f"http://127.0.0.1:{port}/rex?token={token}", "-d", body)


def http_config(base: Path, run_dir: Path, token: str) -> tuple[Path, int]:
    port = free_port()
    http = {"enabled": True, "listen": f"127.0.0.1:{port}", "token": token}
    return config_for(base, run_dir, http=http), port


# --- syncpro ctl ---


def test_ctl_syncs_a_key_and_prints_one_json_line(base: Path, run_dir: Path) -> None:
    config = config_for(base, run_dir)
    with running(config) as daemon:
        caught_up(daemon, "server1", "server2")
        put(base / "r/softdir/server1", {"bin/run.sh": "v2 via ctl\n"})
        put(base / "r/softdir/server2", {"bin/run.sh": "v2 via ctl\n"})

        proc = ctl(config, "-k", "server1")

        assert proc.returncode == 0, proc.stderr
        doc = one_document(proc)
        assert doc["code"] == "0"
        assert doc["data"]["data"]["0"] == "1"
        assert doc["param"] == {"action": SYNC_ACTION, "k": "server1", "update": "0"}
        assert tree(base / "soft/server") == {"bin/run.sh": "v2 via ctl\n"}
        logged = daemon.wait_event("sync.finished", origin="control")
        assert logged["k"] == "server1"
        assert daemon.stop() == 0


def test_ctl_with_an_unknown_key_exits_1_naming_it(base: Path, run_dir: Path) -> None:
    config = config_for(base, run_dir)
    with running(config) as daemon:
        proc = ctl(config, "-k", "nosuchapp")

        assert proc.returncode == 1, proc.stderr
        doc = one_document(proc)
        assert doc["data"]["data"]["0"] == "0"
        assert "nosuchapp" in doc["data"]["msg"]
        assert daemon.stop() == 0


def test_ctl_with_an_empty_key_exits_2(base: Path, run_dir: Path) -> None:
    config = config_for(base, run_dir)
    with running(config) as daemon:
        empty = ctl(config, "-k", "")
        assert empty.returncode == 2
        assert empty.stdout == ""
        assert "-k" in empty.stderr
        # Blank to the daemon's eyes only: it refuses the request, nothing runs.
        blank = ctl(config, "-k", " , ")
        assert blank.returncode == 2, blank.stdout
        doc = one_document(blank)
        assert doc["code"] != "0"
        assert doc["parseparameters"]["code"] != "0"
        # Each request is logged after its answer: once it is seen, so would be its sync.
        daemon.wait_event("control.request", k=" , ")
        assert daemon.find("sync.finished", origin="control") == []
        assert daemon.stop() == 0


def test_ctl_diff_shows_the_changed_path_and_writes_nothing(base: Path, run_dir: Path) -> None:
    config = config_for(base, run_dir)
    with running(config) as daemon:
        caught_up(daemon, "server1", "server2")
        before = tree(base / "soft/server")
        put(base / "r/softdir/server2", {"bin/run.sh": "v2, not yet published\n"})
        put(base / "r/configuredir/server1", {"new.properties": "n\n"})

        proc = ctl(config, "diff", "-k", "server1")

        assert proc.returncode == 0, proc.stderr
        doc = one_document(proc)
        found = doc["diff"]["server1"]
        assert found["config"]["added"] == ["new.properties"]
        assert found["config"]["differcount"] == "2,0,0,1"
        # server1's program target receives server2's tree (the group's last app) and says so.
        diff_all = one_document(ctl(config, "diff", "-k", "server"))
        assert "bin/run.sh" in diff_all["diff"]["server2"]["program"]["changed"]
        assert tree(base / "soft/server") == before
        assert tree(base / "conf/server/server1") == {"app.properties": "node=1\n"}
        daemon.wait_event("control.request", action="Deploy:Core:diff", count=2)
        assert daemon.find("sync.finished", origin="control") == []
        assert daemon.stop() == 0


def test_ctl_status_shows_version_uptime_roots_last_results_and_queues(
    base: Path, run_dir: Path
) -> None:
    config = config_for(base, run_dir)
    with running(config) as daemon:
        caught_up(daemon, "web1")
        assert ctl(config, "-k", "web1").returncode == 0
        put(base / "r/softdir/server1", {"bin/run.sh": "waiting for the quiet period\n"})
        sock = socket_of(config)

        def pending_server1() -> bool:
            pending = ask(sock, b'{"action": "status"}\n', timeout=30)["pending"]
            return any(p["app_key"] == "server1" for p in pending)

        eventually(pending_server1, "server1 pending after a source change")
        proc = ctl(config, "status")

        assert proc.returncode == 0, proc.stderr
        status = one_document(proc)
        version = syncpro("--version").stdout.split()[-1]
        assert status["version"] == version
        assert status["uptime"] > 0
        assert set(status["watched"]) == {str(base / "r"), str(base / "u")}
        web1 = status["apps"]["web1"]
        assert web1["ok"] is True
        assert web1["update"] is False
        # ISO 8601 in UTC, as every time of the status answer.
        at = datetime.fromisoformat(web1["at"]).timestamp()
        assert time.time() - 60 < at <= time.time()
        [pending] = [p for p in status["pending"] if p["app_key"] == "server1"]
        assert pending["update"] is False
        assert pending["due_in"] > 0
        assert isinstance(status["running"], list)
        assert daemon.stop() == 0


def test_ctl_reload_makes_a_new_app_syncable(base: Path, run_dir: Path) -> None:
    config = config_for(base, run_dir)
    put(base / "r/softdir/api1", {"api.bin": "api\n"})
    put(base / "r/configuredir/api1", {"api.conf": "a\n"})
    with running(config) as daemon:
        caught_up(daemon, "web1")
        assert ctl(config, "-k", "api1").returncode == 1
        config_for(base, run_dir, [*APPS, {"app_key": "api1", "local_name": "api"}])

        proc = ctl(config, "reload")

        assert proc.returncode == 0, proc.stderr
        assert one_document(proc)["code"] == "0"
        daemon.wait_event("service.reloaded")
        synced = ctl(config, "-k", "api1")
        assert synced.returncode == 0, synced.stdout
        assert one_document(synced)["data"]["data"]["0"] == "1"
        assert tree(base / "soft/api") == {"api.bin": "api\n"}
        assert daemon.stop() == 0


def test_ctl_against_a_stopped_daemon_exits_2_naming_the_socket(base: Path, run_dir: Path) -> None:
    config = config_for(base, run_dir)
    with running(config) as daemon:
        assert ctl(config, "status").returncode == 0
        assert daemon.stop() == 0
    sock = str(socket_of(config))
    for args in (("status",), ("-k", "server1"), ("reload",)):
        proc = ctl(config, *args)
        assert proc.returncode == 2, args
        assert proc.stdout == ""
        assert sock in proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_ctl_against_a_killed_daemon_exits_2_and_a_restart_takes_the_socket_over(
    base: Path, run_dir: Path
) -> None:
    config = config_for(base, run_dir)
    sock = socket_of(config)
    with running(config) as daemon:
        caught_up(daemon, "web1")
        daemon.signal(signal.SIGKILL)
        daemon.proc.wait(10)
    assert sock.exists()  # left behind: nobody listens on it

    proc = ctl(config, "status")

    assert proc.returncode == 2
    assert str(sock) in proc.stderr
    assert "Traceback" not in proc.stderr
    with running(config) as daemon:
        assert ctl(config, "status").returncode == 0
        assert daemon.stop() == 0


# --- the control socket, raw ---


def test_a_seed_style_form_request_on_the_socket_answers_one_line(
    base: Path, run_dir: Path
) -> None:
    put(base / "u/softdir/server", {"bin/run.sh": "build 7\n"})
    put(base / "u/configuredir/server/server1", {"app.properties": "u1\n"})
    put(base / "u/configuredir/server/server2", {"app.properties": "u2\n"})
    config = config_for(base, run_dir)
    with running(config) as daemon:
        # Let the catch-up of both modes finish first: it would publish over the answer.
        caught_up(daemon, "server1", "server2", update=False)
        caught_up(daemon, "server1", "server2", update=True)
        put(base / "u/softdir/server", {"bin/run.sh": "build 8\n"})

        doc = ask(
            socket_of(config), b"action=Deploy:Core:syncpro&k='server'&update='1'\n", timeout=30
        )

        assert doc["param"]["k"] == "server"
        assert doc["param"]["update"] == "1"
        assert doc["param"]["action"] == SYNC_ACTION
        assert doc["code"] == "0"
        assert doc["data"]["data"]["0"] == "1", doc["data"]["msg"]
        assert tree(base / "soft/server") == {"bin/run.sh": "build 8\n"}
        assert tree(base / "conf/server/server2") == {"app.properties": "u2\n"}
        assert daemon.stop() == 0


# --- HTTP, as the original platform's clients call it ---


def test_curl_post_rex_with_the_token_publishes_and_a_wrong_token_is_refused(
    base: Path, run_dir: Path
) -> None:
    token = secrets.token_hex(16)
    wrong = secrets.token_hex(16)
    config, port = http_config(base, run_dir, token)
    answers: list[str] = []
    with running(config) as daemon:
        caught_up(daemon, "server1", "server2")
        put(base / "r/softdir/server1", {"bin/run.sh": "v2 over http\n"})
        put(base / "r/softdir/server2", {"bin/run.sh": "v2 over http\n"})

        status, body = rex(port, token, f"action={SYNC_ACTION}&k=server1,server2")
        answers.append(body)

        assert status == 200, body
        doc = json.loads(body)
        assert doc["code"] == "0"
        assert doc["data"]["data"]["0"] == "1"
        assert doc["param"]["k"] == "server1 server2"
        assert tree(base / "soft/server") == {"bin/run.sh": "v2 over http\n"}
        daemon.wait_event("sync.finished", origin="http")

        put(base / "r/softdir/server1", {"bin/run.sh": "v3 must not publish\n"})
        put(base / "r/softdir/server2", {"bin/run.sh": "v3 must not publish\n"})
        status, body = rex(port, wrong, f"action={SYNC_ACTION}&k=server1,server2")
        answers.append(body)

        assert status == 403
        assert json.loads(body)["code"] != "0"
        # The refusal is logged after any sync it could have run: once it is seen, so is that.
        daemon.wait_event("http.request", status=403)
        assert len(daemon.find("sync.finished", origin="http")) == 1
        assert tree(base / "soft/server") == {"bin/run.sh": "v2 over http\n"}

        status, body = curl(f"http://127.0.0.1:{port}/healthz")
        answers.append(body)
        assert status == 200
        assert daemon.stop() == 0
    for secret in (token, wrong):
        assert not [line for line in daemon.raw if secret in line]
        assert not [body for body in answers if secret in body]


def test_a_token_sent_in_the_form_body_is_accepted_and_echoed_redacted(
    base: Path, run_dir: Path
) -> None:
    token = secrets.token_hex(16)
    config, port = http_config(base, run_dir, token)
    with running(config) as daemon:
        caught_up(daemon, "web1")
        status, body = curl(
            "-X",
            "POST",
            f"http://127.0.0.1:{port}/rex",
            "-d",
            f"action={SYNC_ACTION}&k=web1&token={token}",
        )
        assert status == 200, body
        doc = json.loads(body)
        assert doc["data"]["data"]["0"] == "1"
        assert token not in body
        assert daemon.stop() == 0
    assert not [line for line in daemon.raw if token in line]


def test_sighup_with_a_new_http_token_refuses_the_old_and_accepts_the_new(
    base: Path, run_dir: Path
) -> None:
    old, new = secrets.token_hex(16), secrets.token_hex(16)
    config, port = http_config(base, run_dir, old)
    with running(config) as daemon:
        caught_up(daemon, "web1")
        assert rex(port, old, f"action={SYNC_ACTION}&k=web1")[0] == 200
        http = {"enabled": True, "listen": f"127.0.0.1:{port}", "token": new}
        config_for(base, run_dir, http=http)

        daemon.signal(signal.SIGHUP)

        daemon.wait_event("service.reloaded")
        daemon.wait_event("http.listening", count=2)
        refused, _ = rex(port, old, f"action={SYNC_ACTION}&k=web1")
        assert refused == 403
        accepted, body = rex(port, new, f"action={SYNC_ACTION}&k=web1")
        assert accepted == 200, body
        assert json.loads(body)["data"]["data"]["0"] == "1"
        assert daemon.stop() == 0
    assert not [line for line in daemon.raw if old in line or new in line]


# --- the daemon and a one-shot sync at once ---


def test_the_daemon_and_a_one_shot_sync_publish_one_group_at_once(
    base: Path, run_dir: Path
) -> None:
    config = config_for(base, run_dir)
    with running(config) as daemon:
        caught_up(daemon, "server1", "server2")
        for round_ in range(3):
            build = {f"lib/{i:03d}.txt": f"round {round_} file {i}\n" for i in range(200)}
            put(base / "r/softdir/server1", build)
            put(base / "r/softdir/server2", build)
            command = ["-k", "server", "--config", str(config)]
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "syncpro", verb, *command],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for verb in ("ctl", "sync")
            ]
            answers = [(proc, *proc.communicate(timeout=60)) for proc in procs]
            for proc, out, err in answers:
                assert proc.returncode == 0, (out, err)
                assert json.loads(out.splitlines()[-1])["data"]["data"]["0"] == "1"
            assert tree(base / "soft/server") == tree(base / "r/softdir/server2")
        daemon.wait_event("sync.finished", origin="control", count=3)
        assert daemon.stop() == 0


# --- the MariaDB inventory ---


@pytest.fixture
def db() -> Iterator[Database]:
    with throwaway_database(reachable_server()) as database:
        yield database


def mysql_config(base: Path, run_dir: Path, url: str, **sections: Any) -> Path:
    """A config whose apps come from the database alone: no `apps:` at all."""
    inventory = {"source": "mysql", "url": url, "refresh": 1, "connect_timeout": 2}
    inventory.update(sections.pop("inventory", {}))
    sections.setdefault("watch", {"settle": 0.3})
    config = config_for(base, run_dir, [], inventory=inventory, **sections)
    doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    del doc["apps"]
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return config


@pytest.mark.mysql
def test_the_daemon_syncs_apps_of_the_table_and_picks_up_a_new_row(
    base: Path, run_dir: Path, db: Database
) -> None:
    db.add(app_row("server1", "server"))
    config = mysql_config(base, run_dir, db.url)
    with running(config) as daemon:
        daemon.wait_sync("server1")
        assert tree(base / "soft/server") == {"bin/run.sh": "v1\n"}
        assert tree(base / "conf/server/server1") == {"app.properties": "node=1\n"}
        assert daemon.syncs("web1") == []  # its sources are there, its row is not yet

        db.add(app_row("web1", "web"))

        daemon.wait_event("inventory.refreshed", timeout=15)
        daemon.wait_sync("web1", timeout=15)
        assert tree(base / "soft/web") == {"index.html": "web\n"}
        proc = ctl(config, "-k", "web1")
        assert proc.returncode == 0, proc.stdout
        assert daemon.stop() == 0


@pytest.mark.mysql
def test_a_one_shot_sync_reads_the_table(base: Path, run_dir: Path, db: Database) -> None:
    db.add(app_row("web1", "web"))
    config = mysql_config(base, run_dir, db.url)

    proc = syncpro("sync", "-k", "web1", "--config", str(config))

    assert proc.returncode == 0, proc.stderr
    assert one_document(proc)["data"]["data"]["0"] == "1"
    assert tree(base / "conf/web/web1") == {"web.conf": "w\n"}


def test_an_unreachable_inventory_still_lets_the_daemon_start_and_says_so(
    base: Path, run_dir: Path
) -> None:
    config = mysql_config(base, run_dir, "mysql://root@127.0.0.1:1/autotask")
    with running(config) as daemon:  # READY=1 arrives all the same
        daemon.wait(
            lambda: any(
                n.startswith("STATUS=") and "inventory unavailable" in n for n in daemon.notes
            ),
            what="a STATUS= saying the inventory is unavailable",
        )
        status = [n for n in daemon.notes if n.startswith("STATUS=") and "inventory" in n]
        assert "127.0.0.1:1/autotask" in status[0]

        proc = syncpro("sync", "-k", "server1", "--config", str(config))

        assert proc.returncode == 2
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert re.search(r"127\.0\.0\.1:1\b", lines[0])
        assert daemon.stop() == 0


def test_a_one_shot_sync_against_a_server_that_never_greets_exits_2_within_its_timeout(
    base: Path, run_dir: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        # The kernel completes every connection; nobody ever sends the server's greeting.
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = int(silent.getsockname()[1])
        config = mysql_config(base, run_dir, f"mysql://root@127.0.0.1:{port}/autotask")
        started = time.monotonic()

        proc = syncpro("sync", "-k", "server1", "--config", str(config))

        elapsed = time.monotonic() - started
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"syncpro: cannot read inventory from mysql 127.0.0.1:{port}/autotask: connected, but no"
        " answer within 2s (is it a MySQL/MariaDB server?)"
    ]
    assert elapsed < 20  # not PyMySQL's 30 s read timeout


def status_of(config: Path) -> dict[str, Any]:
    return ask(socket_of(config), b'{"action": "status"}\n', timeout=30)


@pytest.mark.mysql
def test_the_daemon_keeps_its_last_good_inventory_through_a_database_outage_and_recovers(
    base: Path, run_dir: Path, db: Database
) -> None:
    db.add(app_row("server1", "server"))
    with TcpProxy(db.server.host, db.server.port) as proxy:
        where = f"127.0.0.1:{proxy.port}"
        url = db.url.replace(f"{db.server.host}:{db.server.port}", where)
        config = mysql_config(base, run_dir, url, inventory={"refresh": 3})
        with running(config) as daemon:
            daemon.wait_sync("server1")

            proxy.stop()

            # Retries back off 1 s, 2 s, then the refresh period: no faster, no slower.
            daemon.wait_event("inventory.unavailable", count=3, timeout=30)
            outage = daemon.find("inventory.unavailable")[:3]
            assert [e["retry_in"] for e in outage] == [1.0, 2.0, 3.0]
            assert [e["level"] for e in outage] == ["error", "warning", "warning"]
            assert all(where in e["error"] and e["apps_kept"] == 1 for e in outage)
            status = status_of(config)
            assert status["inventory"]["apps"] == 1
            assert where in status["inventory"]["error"]
            put(base / "r/softdir/server1", {"bin/run.sh": "v2 during the outage\n"})
            synced = ctl(config, "-k", "server1")
            assert synced.returncode == 0, synced.stdout  # from the inventory kept
            assert tree(base / "soft/server") == {"bin/run.sh": "v2 during the outage\n"}

            proxy.start()

            daemon.wait_event("inventory.refreshed", recovered=True, timeout=30)
            assert status_of(config)["inventory"]["error"] is None
            assert daemon.stop() == 0


def test_ctl_and_http_while_the_inventory_is_unavailable_say_so_naming_the_server(
    base: Path, run_dir: Path
) -> None:
    token = secrets.token_hex(16)
    port = free_port()
    http = {"enabled": True, "listen": f"127.0.0.1:{port}", "token": token}
    config = mysql_config(base, run_dir, "mysql://root@127.0.0.1:1/autotask", http=http)
    with running(config) as daemon:
        proc = ctl(config, "-k", "server1")

        assert proc.returncode != 0
        doc = one_document(proc)
        assert doc["data"]["data"]["0"] == "0"
        message = doc["data"]["msg"]
        assert "inventory" in message and "127.0.0.1:1" in message, message
        status, body = rex(port, token, f"action={SYNC_ACTION}&k=server1")
        answer = json.loads(body)
        assert answer["data"]["data"]["0"] == "0"
        message = answer["data"]["msg"]
        assert "inventory" in message and "127.0.0.1:1" in message, (status, message)
        assert daemon.find("sync.finished", origin="control") == []
        assert daemon.stop() == 0
