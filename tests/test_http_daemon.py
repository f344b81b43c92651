"""The original platform's clients against the real daemon: multipart forms, extra fields,
CORS, and a group with a member that is not auto-deployed (issue: every client of /rex)."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from control_fakes import short_dir
from syncpro.testing import put, running, tree, write_config

pytestmark = pytest.mark.daemon  # every test here starts syncpro as a subprocess

SYNC_ACTION = "Deploy:Core:syncpro"
APPS = [
    {"app_key": "server1", "local_name": "server"},
    {"app_key": "server2", "local_name": "server", "auto_deploy": False},
]
ORIGIN = "https://deploy.example"


@pytest.fixture
def run_dir() -> Iterator[Path]:
    with short_dir() as path:  # a unix socket path must fit in 108 bytes
        yield path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def curl(*args: str) -> tuple[int, str, dict[str, str]]:
    """Run curl; return the status, the body and the headers (names in lower case)."""
    proc = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-D", "/dev/stderr", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    body, _, status = proc.stdout.rpartition("\n")
    headers = {}
    for line in proc.stderr.splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(status), body, headers


def test_the_originals_clients_are_served_by_the_daemon_and_never_see_the_token(
    tmp_path: Path, run_dir: Path
) -> None:
    token = secrets.token_hex(16)
    port = free_port()
    put(tmp_path / "r/softdir/server1", {"bin/run.sh": "v1\n"})
    put(tmp_path / "r/configuredir/server1", {"app.properties": "node=1\n"})
    put(tmp_path / "r/softdir/server2", {"bin/run.sh": "from the wrong app\n"})
    config = write_config(
        tmp_path,
        APPS,
        watch={"settle": 60, "max_wait": 120},
        control={"socket": str(run_dir / "control.sock")},
        http={
            "enabled": True,
            "listen": f"127.0.0.1:{port}",
            "token": token,
            "cors_origin": ORIGIN,
        },
    )
    rex = f"http://127.0.0.1:{port}/rex"
    answers: list[str] = []
    with running(config) as daemon:
        daemon.wait(lambda: bool(daemon.syncs()), what="the catch-up")
        put(tmp_path / "r/softdir/server1", {"bin/run.sh": "v2 over multipart\n"})

        # curl -F with the token in the form: the group syncs its one auto-deployed member.
        status, body, headers = curl(
            "-F", f"token={token}", "-F", f"action={SYNC_ACTION}", "-F", "k=server", rex
        )
        answers.append(body)
        assert status == 200, body
        doc = json.loads(body)
        assert doc["data"]["data"]["0"] == "1", doc["data"]["msg"]
        assert doc["skipped"] == [{"app_key": "server2", "reason": "auto_deploy is false"}]
        assert headers["access-control-allow-origin"] == ORIGIN
        assert tree(tmp_path / "soft/server") == {"bin/run.sh": "v2 over multipart\n"}

        # curl -d with the original's debug and a field of its own: run, and named.
        status, body, _ = curl(
            "-d", f"action={SYNC_ACTION}&k=server1&debug=1&foo=2", f"{rex}?token={token}"
        )
        answers.append(body)
        assert status == 200, body
        assert json.loads(body)["ignored"] == ["foo"]

        # requests with files=, sprint on: respon.stdout says what became of each app.
        response = requests.post(
            rex,
            data={"token": token},
            files={"action": (None, SYNC_ACTION), "k": (None, "server"), "sprint": (None, "1")},
            timeout=30,
        )
        answers.append(response.text)
        assert response.status_code == 200, response.text
        stdout = response.json()["respon"]["stdout"]
        assert "server1: program published, config published" in stdout
        assert "server2: skipped, auto_deploy is false" in stdout

        # The preflight runs nothing; naming the skipped app itself is an unknown key.
        syncs = len(daemon.find("sync.finished", origin="http"))
        status, body, headers = curl(
            "-X",
            "OPTIONS",
            "-H",
            f"Origin: {ORIGIN}",
            "-H",
            "Access-Control-Request-Method: POST",
            rex,
        )
        assert (status, body) == (204, "")
        assert "POST" in headers["access-control-allow-methods"]
        status, body, _ = curl("-d", f"action={SYNC_ACTION}&k=server2&token={token}", rex)
        answers.append(body)
        doc = json.loads(body)
        assert doc["data"]["data"]["0"] == "0"
        assert doc["unknown"] == ["server2"]
        daemon.wait_event("sync.finished", count=syncs + 1, origin="http")
        assert daemon.stop() == 0
    logged: list[Any] = daemon.raw
    assert not [line for line in logged if token in line]
    assert not [answer for answer in answers if token in answer]
