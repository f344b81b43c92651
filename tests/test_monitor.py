"""The monitor listener of the real daemon: Prometheus /metrics, /healthz and /readyz, and
`syncpro ctl health`, against a real subprocess with a real HTTP client."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from syncpro.testing import ctl, free_port, put, running, wait_until

pytestmark = pytest.mark.daemon  # every test here starts syncpro as a subprocess


@pytest.fixture
def base(base: Path) -> Path:
    """The shared sources, with a program file big enough to tell copied bytes apart."""
    put(base / "r/softdir/server1", {"lib/a.jar": "a" * 5000})
    return base


def config_for(quiet_config: Callable[..., Path], port: int) -> Path:
    return quiet_config(monitor={"listen": f"127.0.0.1:{port}"})


def get(port: int, path: str) -> tuple[int, bytes, str]:
    """GET path from the monitor; return the status, body and content type."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read(), reply.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape /metrics and parse it with prometheus_client's own text parser."""
    status, body, content_type = get(port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def health(port: int) -> tuple[int, dict[str, Any]]:
    status, body, content_type = get(port, "/healthz")
    assert content_type == "application/json"
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return status, doc


def test_metrics_count_the_catch_up_syncs_files_and_build_in_the_prometheus_format(
    base: Path, quiet_config: Callable[..., Path]
) -> None:
    port = free_port()
    with running(config_for(quiet_config, port)) as daemon:
        daemon.wait_synced("server1", "web1")
        ok = dict(app="server1", mode="remote", origin="watcher", outcome="ok")
        # The sync's log line comes from the engine, its metrics from the daemon just after.
        found = wait_until(
            lambda: (
                (f := samples(port))
                and value(f, "syncpro_syncs_total", **ok)
                and value(f, "syncpro_syncs_total", **{**ok, "app": "web1"})
                and f
            )
        )

        assert value(found, "syncpro_syncs_total", **ok) == 1
        assert value(found, "syncpro_syncs_total", **{**ok, "outcome": "failed"}) == 0
        assert value(found, "syncpro_sync_duration_seconds_count", origin="watcher") >= 1
        # server1: 2 program files and 1 config file; web1: 1 and 1.
        assert value(found, "syncpro_files_total", how="copied") == 5
        assert value(found, "syncpro_bytes_total", how="copied") == 3 + 5000 + 7 + 4 + 2
        assert value(found, "syncpro_last_success_timestamp_seconds", app="server1") > 0
        assert value(found, "syncpro_inventory_apps") == 2
        assert value(found, "syncpro_inventory_last_refresh_timestamp_seconds") > 0
        assert value(found, "syncpro_inventory_errors_total") == 0
        assert value(found, "syncpro_rescans_total", reason="catch-up") >= 1
        assert ("syncpro_pending", ()) in found and ("syncpro_running", ()) in found
        assert value(found, "syncpro_ready") == 1
        assert value(found, "syncpro_healthy") == 1
        [build] = [labels for name, labels in found if name == "syncpro_build_info"]
        assert dict(build)["version"]

        assert get(port, "/readyz")[0] == 200
        assert health(port) == (200, {"status": "ok", "ready": True, "problems": []})
        assert value(samples(port), "syncpro_retrying") == 0
        assert get(port, "/nothing")[0] == 404

        # A second sync links what it copied the first time: linked files and bytes.
        put(base / "r/softdir/server1", {"bin/run.sh": "v2\n"})
        assert ctl(daemon.config, "-k", "server1").returncode == 0
        found = samples(port)
        assert value(found, "syncpro_syncs_total", **{**ok, "origin": "control"}) == 1
        assert value(found, "syncpro_files_total", how="linked") >= 1
        assert value(found, "syncpro_bytes_total", how="linked") >= 5000
        assert daemon.stop() == 0


def test_healthz_turns_503_when_an_app_fails_for_real_and_200_once_fixed(
    base: Path, quiet_config: Callable[..., Path]
) -> None:
    port = free_port()
    config = config_for(quiet_config, port)
    with running(config) as daemon:
        daemon.wait(lambda: bool(daemon.syncs()), what="the catch-up")
        wait_until(lambda: health(port)[0] == 200, timeout=30)
        assert ctl(config, "health").returncode == 0

        # The program target root replaced by a file: no sync can publish into it.
        shutil.rmtree(base / "soft")
        (base / "soft").write_text("not a folder\n")
        assert ctl(config, "-k", "server1").returncode == 1

        status, doc = health(port)
        assert status == 503
        assert doc["status"] == "unhealthy"
        assert any(p.startswith("last sync of server1 failed") for p in doc["problems"])
        unhealthy = ctl(config, "health")
        assert unhealthy.returncode == 1
        assert "server1" in unhealthy.stderr
        found = samples(port)
        failed = dict(app="server1", mode="remote", origin="control", outcome="failed")
        assert value(found, "syncpro_syncs_total", **failed) == 1
        assert value(found, "syncpro_healthy") == 0
        assert value(found, "syncpro_app_last_sync_failed", app="server1") == 1
        assert value(found, "syncpro_retrying") == 1  # the failed sync waits for its retry
        # Readiness is not health: the daemon still serves.
        assert get(port, "/readyz")[0] == 200

        (base / "soft").unlink()
        (base / "soft").mkdir()
        assert ctl(config, "-k", "server1").returncode == 0
        assert health(port) == (200, {"status": "ok", "ready": True, "problems": []})
        assert value(samples(port), "syncpro_retrying") == 0
        assert ctl(config, "health").returncode == 0
        assert daemon.stop() == 0


def test_an_empty_monitor_listen_serves_nothing(quiet_config: Callable[..., Path]) -> None:
    with running(quiet_config(monitor={"listen": ""})) as daemon:
        assert daemon.find("monitor.listening") == []
        assert daemon.stop() == 0


def test_a_busy_monitor_port_is_logged_and_the_daemon_syncs_without_it(
    base: Path, quiet_config: Callable[..., Path]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with running(config_for(quiet_config, port)) as daemon:
            [event] = daemon.find("monitor.unavailable")
            assert event["error"].startswith(f"monitor.listen: cannot serve 127.0.0.1:{port}")
            daemon.wait(lambda: bool(daemon.syncs()), what="the catch-up")
            assert ctl(daemon.config, "status").returncode == 0
            assert daemon.stop() == 0
