"""`syncpro ctl` in-process against a real control socket with a recording handler."""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import control_fakes
from control_fakes import FakeHandler, document, read_line
from syncpro.config.model import ControlSettings
from syncpro.control.client import add_ctl_parser, run_ctl, send_request
from syncpro.control.socket_server import ControlServer
from syncpro.engine.request import SyncRequest
from syncpro.errors import RequestError

from helpers import SERVER_GROUP, make_config, wait_until


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="syncpro")
    add_ctl_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def ctl(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_ctl(parse(["ctl", *argv]))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _quiet_server() -> Iterator[None]:
    # The server logs to stdout by default; only the client's output is under test here.
    with structlog.testing.capture_logs():
        yield


# The fixtures of a control server on a short socket path, bound by name for pytest.
sock_dir, handler, server = control_fakes.sock_dir, control_fakes.handler, control_fakes.server


def test_the_arguments_mirror_syncpro_sync() -> None:
    args = parse(["ctl", "-k", "server", "--update"])
    assert (args.command, args.ctl_action, args.k, args.update) == ("ctl", "sync", "server", True)
    assert parse(["ctl", "diff", "-k", "server"]).ctl_action == "diff"
    assert parse(["ctl", "status"]).ctl_action == "status"
    assert parse(["ctl", "reload", "--socket", "/x"]).socket == "/x"
    assert parse(["ctl", "status"]).timeout == 600


def test_a_successful_sync_prints_one_line_and_exits_0(
    server: ControlServer, handler: FakeHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = ctl(
        ["-k", "server1,server2", "--update", "--socket", str(server.path)], capsys
    )
    assert code == 0
    assert err == ""
    assert out.count("\n") == 1
    assert json.loads(out)["data"]["data"]["0"] == "1"
    [(name, request)] = handler.calls
    assert name == "sync"
    assert isinstance(request, SyncRequest)
    assert (request.normalised_k, request.update, request.origin) == (
        "server1 server2",
        True,
        "control",
    )


def test_an_unsuccessful_sync_exits_1(
    server: ControlServer, handler: FakeHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    handler.ok = False
    code, out, _ = ctl(["-k", "server1", "--socket", str(server.path)], capsys)
    assert code == 1
    assert json.loads(out)["data"]["data"]["0"] == "0"


def test_a_refused_request_exits_2(
    server: ControlServer, handler: FakeHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(request: SyncRequest) -> dict[str, Any]:
        raise RequestError("k selects nothing")

    handler.on_sync = refuse
    code, out, _ = ctl(["-k", "x", "--socket", str(server.path)], capsys)
    assert code == 2
    assert json.loads(out)["data"]["msg"] == "k selects nothing"


def test_diff_sends_the_diff_action(
    server: ControlServer, handler: FakeHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = ctl(["diff", "-k", "server", "--socket", str(server.path)], capsys)
    assert code == 0
    [(name, request)] = handler.calls
    assert name == "diff"
    assert request is not None and request.action == "Deploy:Core:diff"


@pytest.mark.parametrize("action", ["status", "reload"])
def test_status_and_reload_exit_0_and_pretty_prints_on_request(
    server: ControlServer, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    code, out, _ = ctl([action, "--pretty", "--socket", str(server.path)], capsys)
    assert code == 0
    assert out.startswith("{\n  ")
    assert json.loads(out)["code"] == "0"


def test_a_missing_k_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ctl(["--socket", "/nonexistent.sock"], capsys)
    assert (code, out) == (2, "")
    assert "-k" in err


def test_status_with_a_k_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = ctl(["status", "-k", "x", "--socket", "/nonexistent.sock"], capsys)
    assert code == 2
    assert "takes no -k" in err


def test_no_daemon_at_the_socket_path_exits_2_naming_the_path(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sock_dir / "missing.sock"
    code, out, err = ctl(["status", "--socket", str(path)], capsys)
    assert (code, out) == (2, "")
    assert str(path) in err
    assert "not running" in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_a_socket_nobody_listens_on_exits_2_naming_the_path(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sock_dir / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    code, _, err = ctl(["-k", "server", "--socket", str(path)], capsys)
    assert code == 2
    assert str(path) in err
    assert "connection refused" in err or "not running" in err


def test_a_daemon_that_never_answers_times_out_with_exit_2(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sock_dir / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(1)
        code, _, err = ctl(["status", "--timeout", "0.3", "--socket", str(path)], capsys)
    assert code == 2
    assert "no answer" in err
    assert str(path) in err


def test_the_socket_is_found_through_the_config(
    tmp_path: Path, sock_dir: Path, handler: FakeHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sock_dir / "from-config.sock"
    config = make_config(tmp_path, SERVER_GROUP, extra={"control": {"socket": str(path)}})
    with ControlServer(config.control, handler):
        code, out, _ = ctl(["status", "--config", str(config.path)], capsys)
    assert code == 0
    assert json.loads(out)["msg"] == "ok"


def test_ctl_runs_without_importing_structlog_or_the_tree_builder(
    tmp_path: Path, sock_dir: Path, handler: FakeHandler
) -> None:
    # `ctl` runs once per request: structlog alone takes ~0.1 s to import (asyncio with it),
    # the builder as much again, and it logs nothing and builds nothing.
    path = sock_dir / "light.sock"
    config = make_config(tmp_path, SERVER_GROUP, extra={"control": {"socket": str(path)}})
    script = (
        "import sys\n"
        "from syncpro.cli import main\n"
        "code = main(['ctl', 'status', '--config', sys.argv[1]])\n"
        "heavy = [m for m in sys.modules if m == 'structlog' or m == 'syncpro.engine.tree']\n"
        "print('imported:', sorted(heavy), 'exit:', int(code))\n"
    )
    with ControlServer(config.control, handler):
        ran = subprocess.run(
            [sys.executable, "-c", script, str(config.path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout.splitlines()[0])["msg"] == "ok"
    assert ran.stdout.splitlines()[-1] == "imported: [] exit: 0"


def test_an_invalid_config_exits_2_with_its_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "config.yml"
    bad.write_text("dirs: 3\n")
    code, _, err = ctl(["status", "--config", str(bad)], capsys)
    assert code == 2
    assert str(bad) in err


def test_a_typo_in_the_config_on_disk_still_lets_ctl_reach_the_running_daemon(
    tmp_path: Path, sock_dir: Path, handler: FakeHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sock_dir / "c.sock"
    config = make_config(tmp_path, SERVER_GROUP, extra={"control": {"socket": str(path)}})
    # An operator edits the file; the daemon still runs on what it loaded before.
    config.path.write_text(config.path.read_text() + "watch:\n  setle: 3\n")
    with ControlServer(config.control, handler):
        code, out, err = ctl(["status", "--config", str(config.path)], capsys)

    assert code == 0
    assert json.loads(out)["msg"] == "ok"
    assert "watch.setle: unknown key" in err
    assert str(path) in err


# --- a full listen queue: wait for room, never fail at once ---

_CONNECT_SYSCALL = {"x86_64": 42, "aarch64": 203}


def _fill_queue(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A listener on path that accepts nobody, its queue full of idle clients."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    fillers: list[socket.socket] = []
    while True:
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        try:
            filler.connect(str(path))
        except BlockingIOError:
            filler.close()
            return listener, fillers
        fillers.append(filler)


def _in_connect(thread: threading.Thread) -> bool:
    """Whether the thread is blocked in connect(2) right now, as the kernel says."""
    try:
        text = Path(f"/proc/self/task/{thread.native_id}/syscall").read_text()
    except OSError:
        return False
    return text.split(" ", 1)[0] == str(_CONNECT_SYSCALL[platform.machine()])


@pytest.mark.skipif(platform.machine() not in _CONNECT_SYSCALL, reason="syscall number unknown")
def test_ctl_waits_for_room_in_a_full_listen_queue_and_gets_its_answer(sock_dir: Path) -> None:
    path = sock_dir / "full.sock"
    listener, fillers = _fill_queue(path)
    answers: list[dict[str, Any]] = []
    errors: list[Exception] = []

    def client() -> None:
        try:
            answers.append(send_request(path, {"action": "status"}, 20))
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    with listener:
        thread.start()
        try:
            # Before the fix, connect() failed with EAGAIN here at once and ctl exited 2.
            wait_until(lambda: _in_connect(thread) or not thread.is_alive())
            assert thread.is_alive(), errors
            listener.settimeout(10)
            for _ in fillers:  # make room: the waiting client gets in
                listener.accept()[0].close()
            conn, _ = listener.accept()
            with conn:
                assert json.loads(read_line(conn)) == {"action": "status"}
                conn.sendall(json.dumps(document()).encode() + b"\n")
        finally:
            thread.join(20)
            for filler in fillers:
                filler.close()
    assert errors == []
    assert [doc["code"] for doc in answers] == ["0"]


def test_ctl_says_busy_when_the_queue_stays_full_for_its_whole_timeout(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sock_dir / "full.sock"
    listener, fillers = _fill_queue(path)
    with listener:
        started = time.monotonic()
        code, _, err = ctl(["status", "--timeout", "0.5", "--socket", str(path)], capsys)
        waited = time.monotonic() - started
        for filler in fillers:
            filler.close()
    assert code == 2
    assert "busy" in err and str(path) in err
    assert waited >= 0.45  # it waited its timeout for room, not failing at once


def test_a_burst_of_ctl_clients_on_a_tiny_backlog_is_all_served(
    sock_dir: Path, handler: FakeHandler
) -> None:
    settings = ControlSettings(socket=sock_dir / "c.sock")
    answers: list[str] = []
    errors: list[Exception] = []
    lock = threading.Lock()

    def client() -> None:
        try:
            doc = send_request(settings.socket, {"action": "status"}, 60)
            with lock:
                answers.append(str(doc["code"]))
        except Exception as exc:
            with lock:
                errors.append(exc)

    with ControlServer(settings, handler, backlog=1, max_clients=256):
        threads = [threading.Thread(target=client) for _ in range(150)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert answers == ["0"] * 150
    assert len(handler.calls) == 150
