"""SIGHUP against the real daemon: what it tells systemd, and that no reload stops the
watchdog pings, drops pending work or takes the daemon down (SPEC section 7)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_fakes import ask, short_dir
from syncpro.testing import Daemon, free_port, put, running, tree, write_config

from helpers import holding

pytestmark = pytest.mark.daemon  # every test here starts syncpro as a subprocess

APPS = [
    {"app_key": "server1", "local_name": "server"},
    {"app_key": "web1", "local_name": "web"},
]
# The daemon pings every 0.2 s: a main loop blocked for a second misses five.
WATCHDOG = {"WATCHDOG_USEC": "400000"}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    put(tmp_path / "r/softdir/server1", {"bin/run.sh": "v1\n"})
    put(tmp_path / "r/softdir/web1", {"index.html": "web\n"})
    return tmp_path


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short directory for the control socket: tmp_path can pass the 108-byte limit."""
    with short_dir() as path:
        yield path


def config_for(base: Path, run_dir: Path, **sections: Any) -> Path:
    control = {"socket": str(run_dir / "control.sock")}
    return write_config(base, APPS, control=control, **sections)


def status(run_dir: Path) -> dict[str, Any]:
    return ask(run_dir / "control.sock", b'{"action": "status"}\n', timeout=30)


def pings_since_reload(daemon: Daemon) -> int:
    return daemon.notes_after("RELOADING=1").count("WATCHDOG=1")


def test_sighup_says_reloading_with_its_monotonic_time_then_ready_with_a_status(
    base: Path, run_dir: Path
) -> None:
    with running(config_for(base, run_dir)) as daemon:
        daemon.wait_sync("server1")
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.signal(signal.SIGHUP)
        daemon.wait_note("READY=1", count=2)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        messages = list(daemon.messages)
        (reloading,) = [i for i, m in enumerate(messages) if "RELOADING=1" in m]
        stamps = [int(f.partition("=")[2]) for f in messages[reloading] if "MONOTONIC_USEC=" in f]
        assert len(stamps) == 1 and before <= stamps[0] <= after
        ready = [i for i, m in enumerate(messages) if "READY=1" in m]
        assert ready[0] < reloading < ready[1]
        statuses = [f for f in messages[ready[1]] if f.startswith("STATUS=")]
        assert len(statuses) == 1 and statuses[0].startswith("STATUS=watching 2 apps")
        assert daemon.stop() == 0


def test_a_reload_with_new_timings_keeps_pinging_and_keeps_the_pending_work(
    base: Path, run_dir: Path
) -> None:
    config = config_for(base, run_dir, watch={"workers": 1})
    with running(config, env=WATCHDOG) as daemon:
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        with holding(base / "soft", "server") as lock:
            put(base / "r/softdir/server1", {"bin/run.sh": "v2\n"})
            daemon.wait(lambda: daemon.waits_for_lock(lock), what="the sync blocked mid-way")
            put(base / "r/softdir/web1", {"after.txt": "a\n"})
            daemon.wait(
                lambda: "web1" in [p["app_key"] for p in status(run_dir)["pending"]],
                what="web1 pending behind the one busy worker",
            )
            config_for(base, run_dir, watch={"workers": 2, "settle": 0.2, "max_wait": 2})
            daemon.signal(signal.SIGHUP)
            # The reload ends, and the pings go on, while the sync it found is still running.
            daemon.wait_note("READY=1", count=2, timeout=10)
            daemon.wait(lambda: pings_since_reload(daemon) >= 3, 10, "pings after the reload")
            sync = daemon.wait_sync("web1", count=2)
            assert sync["response"]["trigger"]["by"] == "watcher"
            assert str(base / "r/softdir/web1/after.txt") in sync["response"]["trigger"]["paths"]
            assert daemon.waits_for_lock(lock)
        daemon.wait(lambda: tree(base / "soft/server") == {"bin/run.sh": "v2\n"}, what="v2")
        daemon.wait_event("scheduler.reconfigured", workers=2, settle=0.2)
        assert daemon.stop() == 0


def test_a_reload_onto_a_busy_http_port_keeps_the_old_config_and_its_servers(
    base: Path, run_dir: Path
) -> None:
    port = free_port()
    http = {"enabled": True, "listen": f"127.0.0.1:{port}", "token": "s3cret"}
    config = config_for(base, run_dir, http=http)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy,
        running(config) as daemon,
    ):
        daemon.wait_sync("server1")
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        doc = yaml.safe_load(config.read_text(encoding="utf-8"))
        doc["http"]["listen"] = f"127.0.0.1:{taken}"
        doc["apps"].append({"app_key": "api1", "local_name": "api"})
        config.write_text(yaml.safe_dump(doc), encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_event("service.reload_failed")
        assert f"127.0.0.1:{taken}" in failed["error"]
        daemon.wait_note("READY=1", count=2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as answer:
            assert (answer.status, json.load(answer)) == (200, {"status": "ok"})
        assert "api1" not in status(run_dir)["apps"]  # the old config, whole
        put(base / "r/softdir/server1", {"bin/run.sh": "after the failed reload\n"})
        daemon.wait(
            lambda: tree(base / "soft/server") == {"bin/run.sh": "after the failed reload\n"},
            what="a change published by the daemon that kept running",
        )
        assert daemon.stop() == 0


def mysql_config(base: Path, run_dir: Path, url: str) -> Path:
    """A config whose apps come from the database alone: no `apps:` at all."""
    inventory = {"source": "mysql", "url": url, "refresh": 60, "connect_timeout": 2}
    config = config_for(base, run_dir, inventory=inventory)
    doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    del doc["apps"]
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return config


def test_a_reload_whose_database_never_answers_keeps_pinging_the_watchdog(
    base: Path, run_dir: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        # Listening but never accepting: the connection is made, no greeting ever comes.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"mysql://root@127.0.0.1:{silent.getsockname()[1]}/autotask"
        with running(config_for(base, run_dir), env=WATCHDOG) as daemon:
            daemon.wait_sync("server1")
            mysql_config(base, run_dir, url)
            daemon.signal(signal.SIGHUP)
            daemon.wait_note("READY=1", count=2)
            during = daemon.notes_after("RELOADING=1")
            during = during[: during.index("READY=1")]
            assert during.count("WATCHDOG=1") >= 3, during
            # Log lines and notifications come by two roads: wait for the line.
            assert "no answer" in daemon.wait_event("inventory.unavailable")["error"]
            assert status(run_dir)["inventory"]["apps"] == 2  # the apps it had are kept
            assert daemon.stop() == 0


def test_ctl_with_the_inventory_unavailable_says_so_and_why(base: Path, run_dir: Path) -> None:
    config = mysql_config(base, run_dir, "mysql://root@127.0.0.1:1/autotask")
    with running(config) as daemon:
        daemon.wait_event("inventory.unavailable")
        ctl = subprocess.run(
            [sys.executable, "-m", "syncpro", "ctl", "-k", "server", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        one_shot = subprocess.run(
            [sys.executable, "-m", "syncpro", "sync", "-k", "server", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (ctl.returncode, one_shot.returncode) == (2, 2)
        reason = one_shot.stderr.strip().removeprefix("syncpro: ")
        assert reason.startswith("cannot read inventory from mysql 127.0.0.1:1/autotask: ")
        msg = json.loads(ctl.stdout)["data"]["msg"]
        assert "inventory unavailable" in msg
        assert reason in msg
        assert "unknown key" not in msg
        assert daemon.stop() == 0


def reload_outcome(daemon: Daemon) -> None:
    """Wait for the reload to end, failed as it should or crashed as it must not."""
    daemon.wait(
        lambda: bool(daemon.find("service.reload_failed") or daemon.find("service.reload_crashed")),
        what="the reload's end",
    )
    assert daemon.find("service.reload_crashed") == []


@pytest.mark.parametrize("where", ["state", "remotecomdir"])
def test_a_reload_onto_a_dir_it_cannot_make_keeps_the_old_config_servers_and_watcher(
    base: Path, run_dir: Path, where: str
) -> None:
    port = free_port()
    http = {"enabled": True, "listen": f"127.0.0.1:{port}", "token": "s3cret"}
    config = config_for(base, run_dir, http=http)
    (base / "blocker").write_text("a file where a folder should be\n", encoding="utf-8")
    with running(config) as daemon:
        daemon.wait_sync("server1")
        doc = yaml.safe_load(config.read_text(encoding="utf-8"))
        doc["dirs"][where] = str(base / "blocker" / where)
        doc["http"]["listen"] = f"127.0.0.1:{free_port()}"
        doc["apps"].append({"app_key": "api1", "local_name": "api"})
        config.write_text(yaml.safe_dump(doc), encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        reload_outcome(daemon)
        (failed,) = daemon.find("service.reload_failed")
        assert str(base / "blocker" / where) in failed["error"]
        daemon.wait_note("READY=1", count=2)
        ready = [m for m in daemon.messages if "READY=1" in m][1]
        assert [f for f in ready if f.startswith("STATUS=")] == [
            f"STATUS=reload failed, old config kept: {failed['error']}"
        ]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as answer:
            assert answer.status == 200
        assert "api1" not in status(run_dir)["apps"]  # the old config, whole
        put(base / "r/softdir/server1", {"bin/run.sh": "after the failed reload\n"})
        daemon.wait(
            lambda: tree(base / "soft/server") == {"bin/run.sh": "after the failed reload\n"},
            what="a change seen by the old watcher and published",
        )
        assert daemon.stop() == 0


def test_sigterm_during_a_reload_stops_at_once_without_adopting_the_new_config(
    base: Path, run_dir: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.settimeout(30)
        url = f"mysql://root@127.0.0.1:{silent.getsockname()[1]}/autotask"
        with running(config_for(base, run_dir)) as daemon:
            daemon.wait_sync("server1")
            config = mysql_config(base, run_dir, url)
            doc = yaml.safe_load(config.read_text(encoding="utf-8"))
            # Far longer than the test waits: only a daemon that does not wait gets through.
            doc["inventory"]["connect_timeout"] = 60
            doc["http"] = {"enabled": True, "listen": f"127.0.0.1:{free_port()}", "token": "t"}
            config.write_text(yaml.safe_dump(doc), encoding="utf-8")
            daemon.signal(signal.SIGHUP)
            connection, _ = silent.accept()  # the reload waits for the database's greeting
            with connection:
                daemon.wait_note("RELOADING=1")
                daemon.signal(signal.SIGTERM)
                daemon.wait_note("STOPPING=1", timeout=10)
                assert daemon.wait_exit(20) == 0
            notes = daemon.notes
            assert "READY=1" not in notes[notes.index("STOPPING=1") :]
            assert daemon.find("service.reloaded") == []
            assert daemon.find("http.listening") == []
            daemon.wait_event("service.stopped")


def end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(30)


def test_shutdown_waits_for_syncs_and_requests_within_one_deadline(
    base: Path, run_dir: Path
) -> None:
    config = config_for(base, run_dir)
    stop_timeout = 2.0
    env = {"SYNCPRO_STOP_TIMEOUT": str(stop_timeout)}
    with running(config, env=env) as daemon, contextlib.ExitStack() as cleanup:
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        server_lock = cleanup.enter_context(holding(base / "soft", "server"))
        web_lock = cleanup.enter_context(holding(base / "soft", "web"))
        put(base / "r/softdir/server1", {"bin/run.sh": "v2\n"})
        daemon.wait(lambda: daemon.waits_for_lock(server_lock), what="a sync blocked mid-way")
        ctl = subprocess.Popen(
            [sys.executable, "-m", "syncpro", "ctl", "-k", "web1", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        cleanup.callback(end, ctl)
        daemon.wait(lambda: daemon.waits_for_lock(web_lock), what="a ctl request blocked")
        daemon.signal(signal.SIGTERM)
        # The control server's wait for that request shares the deadline with the sync's
        # (alone it would wait 30 s), and both end well inside the unit's TimeoutStopSec.
        assert daemon.wait_exit(stop_timeout + 15) == 0
        (abandoned,) = daemon.find("service.abandoned")
        assert abandoned["batches"] == [{"app_keys": ["server1"], "update": False}]


def test_an_inventory_refresh_begun_before_a_reload_never_writes_back_its_error(
    base: Path, run_dir: Path
) -> None:
    connections: list[socket.socket] = []
    second = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as fake:
        fake.bind(("127.0.0.1", 0))
        fake.listen(8)
        fake.settimeout(30)

        def serve() -> None:
            # The first connection (at start) is closed at once: the inventory is unavailable
            # and the daemon retries a second later. The second (that retry) is held silent.
            with contextlib.suppress(OSError):
                first, _ = fake.accept()
                first.close()
                held, _ = fake.accept()
                connections.append(held)
                second.set()

        server = threading.Thread(target=serve)
        server.start()
        url = f"mysql://root@127.0.0.1:{fake.getsockname()[1]}/autotask"
        config = mysql_config(base, run_dir, url)
        doc = yaml.safe_load(config.read_text(encoding="utf-8"))
        doc["inventory"]["connect_timeout"] = 60
        config.write_text(yaml.safe_dump(doc), encoding="utf-8")
        try:
            with running(config) as daemon:
                assert second.wait(30), "the daemon never retried the inventory"
                config_for(base, run_dir)  # the apps listed in the config, no database
                daemon.signal(signal.SIGHUP)
                daemon.wait_event("service.reloaded")
                connections[0].close()  # the refresh begun before the reload fails now
                daemon.wait(
                    lambda: bool(
                        daemon.find("inventory.refresh_discarded")
                        or len(daemon.find("inventory.unavailable")) >= 2
                    ),
                    what="the end of the refresh begun before the reload",
                )
                assert status(run_dir)["inventory"] == {
                    "source": "config",
                    "apps": 2,
                    "error": None,
                }
                assert daemon.stop() == 0
        finally:
            fake.close()
            server.join(30)
            for connection in connections:
                connection.close()
