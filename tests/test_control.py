"""The control socket over real unix sockets: requests, refusals, peers, and many clients."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

import control_fakes
from control_fakes import FakeHandler, ask, client_threads, document, fd_count, read_line
from reference_request import reading
from syncpro.config.model import Config, ControlSettings
from syncpro.control.socket_server import ControlServer
from syncpro.engine.diff import diff
from syncpro.engine.request import SyncRequest
from syncpro.engine.response import REDACTED, response_document
from syncpro.engine.sync import run_sync
from syncpro.errors import ControlError, RequestError

from helpers import (
    SERVER_GROUP,
    app,
    make_config,
    program_source,
    program_target,
    wait_until,
    write_tree,
)

NOBODY = 65534
SECRET = "1527669337mxchcptwhwevbwgyiahtilfadcycyfxm"  # noqa: S105 - the seed's example


# The fixtures of a control server on a short socket path, bound by name for pytest.
sock_dir, handler, server = control_fakes.sock_dir, control_fakes.handler, control_fakes.server


# --- requests and answers ---


def test_a_form_request_as_in_the_seed_is_answered_with_the_handlers_document(
    server: ControlServer, handler: FakeHandler
) -> None:
    doc = ask(server.path, b"action=Deploy:Core:syncpro&k='server'&update='1'\n")
    assert doc["code"] == "0"
    assert doc["data"]["data"]["0"] == "1"
    [(name, request)] = handler.calls
    assert name == "sync"
    assert request is not None
    assert (request.k, request.update, request.origin) == ("server", True, "control")


def test_a_json_request_is_answered_on_one_line_in_utf8(
    server: ControlServer, handler: FakeHandler
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.path))
        sock.sendall(b'{"action": "Deploy:Core:syncpro", "k": "server1 server2"}\n')
        line = read_line(sock)
    assert "成功".encode() in line  # not \u escapes
    doc = json.loads(line)
    assert doc["param"] == {"action": "Deploy:Core:syncpro", "k": "server1 server2"}
    assert handler.calls[0][1] is not None and handler.calls[0][1].update is False


def test_diff_status_and_reload_reach_their_handler_methods(
    server: ControlServer, handler: FakeHandler
) -> None:
    assert ask(server.path, b"action=Deploy:Core:diff&k=server1\n")["code"] == "0"
    status = ask(server.path, b'{"action": "status"}\n')
    assert status["version"] == "test"
    assert status["param"] == {"action": "status"}
    assert ask(server.path, b"action=reload\n")["msg"] == "reload requested"
    assert [name for name, _ in handler.calls] == ["diff", "status", "reload"]
    diff_request = handler.calls[0][1]
    assert diff_request is not None and diff_request.action == "Deploy:Core:diff"


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\n", "empty"),
        (b"action=Deploy:Core:syncpro\n", "k is required"),
        (b"action=Deploy:Core:rm&k=x\n", "unknown action"),
        (b"action=Deploy:Core:syncpro&k=x&update=2\n", "update must be 0 or 1"),
        (b"[1]\n", "object"),
        (b'{"action": \n', "not valid JSON"),
        (b"action=Deploy:Core:syncpro&k=\xff\n", "UTF-8"),
        (b"k=x&k=y&action=status\n", "more than once"),
        (b"action=Deploy:Core:syncpro&k=" + b"a" * 70000 + b"\n", "64 KiB"),
        (b"a" * 200000, "64 KiB"),
    ],
)
def test_a_bad_request_is_refused_with_a_reason_and_nothing_runs(
    server: ControlServer, handler: FakeHandler, payload: bytes, why: str
) -> None:
    doc = ask(server.path, payload)
    assert doc["code"] != "0"
    assert doc["parseparameters"]["code"] == doc["code"]
    assert why in doc["data"]["msg"]
    assert doc["data"]["data"]["0"] == "0"
    assert handler.calls == []


def test_a_handler_that_raises_gets_a_refusal_naming_the_error_and_the_server_lives_on(
    server: ControlServer, handler: FakeHandler
) -> None:
    def explode(request: SyncRequest) -> dict[str, Any]:
        raise KeyError("boom")

    handler.on_sync = explode
    doc = ask(server.path, b"action=Deploy:Core:syncpro&k=server\n")
    assert doc["code"] not in ("0", "")
    assert "KeyError" in doc["data"]["msg"]
    assert doc["param"]["k"] == "server"

    def invalid(request: SyncRequest) -> dict[str, Any]:
        raise RequestError("k selects nothing")

    handler.on_sync = invalid
    assert ask(server.path, b"action=Deploy:Core:syncpro&k=x\n")["data"]["msg"] == (
        "k selects nothing"
    )
    assert ask(server.path, b"action=status\n")["code"] == "0"


def test_a_handler_answering_no_document_gets_a_refusal_not_a_dead_connection(
    server: ControlServer, handler: FakeHandler
) -> None:
    handler.on_sync = lambda request: None  # type: ignore[assignment,return-value]
    doc = ask(server.path, b"action=Deploy:Core:syncpro&k=server\n")
    assert doc["code"] == "500"
    assert "NoneType" in doc["data"]["msg"]
    handler.on_sync = lambda request: {"code": "0", "loop": [float("nan")], "x": {1, 2}}
    doc = ask(server.path, b"action=Deploy:Core:syncpro&k=server\n")
    assert doc["x"] == "{1, 2}"  # not JSON: sent as its text rather than failing the answer


def test_every_request_is_logged_once_and_never_with_the_token(server: ControlServer) -> None:
    with structlog.testing.capture_logs() as logs:
        ask(server.path, f"action=Deploy:Core:syncpro&k=server&token={SECRET}\n".encode())
        ask(server.path, f"action=nope&token={SECRET}\n".encode())
        # Logged once the answer is out: wait for the second event.
        wait_until(lambda: sum(e["event"] == "control.request" for e in logs) == 2)
    # Each is logged on its client's thread after its answer: in either order.
    requests = sorted(
        (e for e in logs if e["event"] == "control.request"),
        key=lambda e: e["action"] != "Deploy:Core:syncpro",
    )
    assert len(requests) == 2
    first = requests[0]
    assert (first["action"], first["k"], first["update"], first["ok"]) == (
        "Deploy:Core:syncpro",
        "server",
        "0",
        True,
    )
    assert first["uid"] == os.geteuid()
    assert first["pid"] == os.getpid()
    assert requests[1]["ok"] is False
    assert SECRET not in repr(logs)


def test_the_token_is_echoed_redacted(server: ControlServer, handler: FakeHandler) -> None:
    handler.on_sync = lambda request: response_document_stub(request)
    doc = ask(server.path, f"action=Deploy:Core:syncpro&k=server&token={SECRET}\n".encode())
    assert doc["param"]["token"] == REDACTED
    assert SECRET not in json.dumps(doc)


def response_document_stub(request: SyncRequest) -> dict[str, Any]:
    from syncpro.engine.response import param_of

    return document(param=param_of(request))


# --- random input to a live server ---

FORM_FIELD = st.sampled_from(["action", "k", "update", "w", "token", "pretty", "x", ""])
FORM_VALUE = st.one_of(
    st.sampled_from(["Deploy:Core:syncpro", "Deploy:Core:diff", "status", "reload", "server"]),
    st.sampled_from(["0", "1", "'1'", "'", "", "all", " , "]),
    st.text(max_size=12),
)
LINE = st.one_of(
    st.binary(max_size=200),
    st.lists(st.tuples(FORM_FIELD, FORM_VALUE), max_size=5).map(lambda p: urlencode(p).encode()),
    st.dictionaries(FORM_FIELD, st.one_of(FORM_VALUE, st.integers(-1, 2), st.booleans())).map(
        lambda d: json.dumps(d).encode()
    ),
)


def _exchange(path: Path, raw: bytes, newline: bool) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(raw + b"\n" if newline else raw)
        if not newline:
            sock.shutdown(socket.SHUT_WR)
        reply = read_line(sock)
    doc = json.loads(reply)
    assert isinstance(doc, dict)
    return doc


def test_random_input_to_a_live_server_runs_only_valid_requests_and_never_stops_it(
    server: ControlServer, handler: FakeHandler
) -> None:
    @settings(max_examples=300, deadline=None)
    @given(raw=LINE, newline=st.booleans())
    def check(raw: bytes, newline: bool) -> None:
        with handler.lock:
            handler.calls.clear()
        if not newline and b"\n" not in raw and not raw:
            return  # nothing sent at all: nothing to answer
        doc = _exchange(server.path, raw, newline)
        line = raw.partition(b"\n")[0] + b"\n" if newline or b"\n" in raw else None
        expected = None if line is None else reading(line)
        calls = list(handler.calls)
        if expected is None:
            assert calls == [], (raw, calls)
            assert doc["code"] not in ("0", "")
            assert doc["data"]["msg"]
            if line is None:
                assert "newline" in doc["data"]["msg"]
            return
        assert doc["code"] == "0", (raw, doc)
        [(name, request)] = calls
        method = {"Deploy:Core:syncpro": "sync", "Deploy:Core:diff": "diff"}
        assert name == method.get(expected["action"], expected["action"])
        if request is not None:
            assert (request.action, request.normalised_k, request.update, request.w) == (
                expected["action"],
                expected["k"],
                expected["update"],
                expected["w"],
            )
            assert request.token_given is expected["token"]

    with structlog.testing.capture_logs():
        check()
    handler.calls.clear()
    assert ask(server.path, b"action=Deploy:Core:syncpro&k=server\n")["code"] == "0"
    assert [name for name, _ in handler.calls] == ["sync"]


# --- many clients, idle clients, clients that leave ---


def test_twenty_concurrent_clients_are_all_answered(
    server: ControlServer, handler: FakeHandler
) -> None:
    # Every sync waits until all twenty are inside the handler at once: served in parallel.
    together = threading.Barrier(20)

    def sync(request: SyncRequest) -> dict[str, Any]:
        together.wait(timeout=20)
        return document(param={"k": request.k})

    handler.on_sync = sync
    answers: dict[int, dict[str, Any]] = {}

    def client(n: int) -> None:
        answers[n] = ask(server.path, f"action=Deploy:Core:syncpro&k=app{n}\n".encode(), 30)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(answers) == list(range(20))
    assert all(answers[n]["param"]["k"] == f"app{n}" for n in range(20))


def test_an_idle_client_delays_nobody_and_is_dropped_after_the_read_timeout(
    sock_dir: Path, handler: FakeHandler
) -> None:
    settings = ControlSettings(socket=sock_dir / "c.sock")
    with (
        ControlServer(settings, handler, read_timeout=1.0) as server,
        structlog.testing.capture_logs() as logs,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle,
    ):
        idle.connect(str(server.path))
        idle.sendall(b"action=Deploy:Core:sync")  # and then nothing more
        started = time.monotonic()
        assert ask(server.path, b"action=status\n")["code"] == "0"
        assert time.monotonic() - started < 1.0
        idle.settimeout(10)
        assert idle.recv(100) == b""  # closed by the server, no answer: nothing ran
        assert time.monotonic() - started < 8
    assert [name for name, _ in handler.calls] == ["status"]
    dropped = [e for e in logs if e["event"] == "control.dropped"]
    assert len(dropped) == 1
    assert "within 1 s" in dropped[0]["reason"]


def test_clients_leaving_mid_request_leak_no_thread_and_no_descriptor(
    server: ControlServer, handler: FakeHandler
) -> None:
    ask(server.path, b"action=status\n")  # warm up: lazily created objects exist now
    # The server's thread for that request logs and closes after the answer has reached us:
    # a baseline taken before it ends counts one thread and one descriptor too many.
    wait_until(lambda: not client_threads())
    threads, fds = threading.active_count(), fd_count()
    for n in range(30):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(server.path))
            if n % 2:
                sock.sendall(b"action=Deploy:Core:syncpro&k=server&upd")
    # At most the baseline, not equal to it: a daemon thread of an earlier test may end (and
    # close its descriptors) meanwhile; a leak is growth.
    wait_until(
        lambda: not client_threads() and threading.active_count() <= threads and fd_count() <= fds
    )
    assert [name for name, _ in handler.calls] == ["status"]


def test_many_idle_clients_delay_nobody_and_hold_no_request_slot(
    sock_dir: Path, handler: FakeHandler
) -> None:
    settings = ControlSettings(socket=sock_dir / "c.sock")
    with ControlServer(settings, handler, read_timeout=30.0, max_clients=4) as server:
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(70)]
        try:
            for n, sock in enumerate(idle):
                sock.connect(str(server.path))
                if n % 2:
                    sock.sendall(b"action=Deploy:Core:syncpro&k=ser")  # and then nothing more
            wait_until(lambda: server.waiting == 70)
            started = time.monotonic()
            answers = [ask(server.path, b"action=status\n") for _ in range(8)]
            assert [doc["code"] for doc in answers] == ["0"] * 8
            assert time.monotonic() - started < 5
        finally:
            for sock in idle:
                sock.close()
    assert [name for name, _ in handler.calls] == ["status"] * 8


def test_past_the_cap_of_waiting_connections_the_oldest_are_dropped(
    sock_dir: Path, handler: FakeHandler
) -> None:
    settings = ControlSettings(socket=sock_dir / "c.sock")
    with (
        ControlServer(settings, handler, read_timeout=30.0, max_waiting=8) as server,
        structlog.testing.capture_logs() as logs,
    ):
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(12)]
        try:
            for sock in idle:
                sock.connect(str(server.path))
                sock.settimeout(10)
            for sock in idle[:4]:
                assert sock.recv(100) == b""  # closed by the server to make room
            wait_until(lambda: server.waiting == 8)
            for sock in idle[4:]:
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(100)  # still open, still waited for
            assert ask(server.path, b"action=status\n")["code"] == "0"
        finally:
            for sock in idle:
                sock.close()
    dropped = [e for e in logs if e["event"] == "control.dropped" and "oldest" in e["reason"]]
    assert len(dropped) >= 4


@pytest.mark.parametrize("payload", [b"action=Deploy:Core:syncpro&k=server&update=1", b"\xff"])
def test_a_request_cut_off_by_eof_before_its_newline_is_refused_and_nothing_runs(
    server: ControlServer, handler: FakeHandler, payload: bytes
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        doc = json.loads(read_line(sock))
    assert doc["code"] not in ("0", "")
    assert "newline" in doc["data"]["msg"]
    assert handler.calls == []


def test_socat_piping_a_request_without_its_newline_gets_a_refusal_and_with_it_an_answer(
    server: ControlServer, handler: FakeHandler
) -> None:
    def socat(data: bytes) -> dict[str, Any]:
        done = subprocess.run(
            ["socat", "-t", "10", "-", f"UNIX-CONNECT:{server.path}"],
            input=data,
            capture_output=True,
            timeout=30,
            check=True,
        )
        assert done.stdout.count(b"\n") == 1, done
        doc = json.loads(done.stdout)
        assert isinstance(doc, dict)
        return doc

    cut = socat(b"action=status")
    assert cut["code"] not in ("0", "")
    assert "newline" in cut["data"]["msg"]
    assert handler.calls == []
    assert socat(b"action=status\n")["code"] == "0"
    assert [name for name, _ in handler.calls] == ["status"]


def test_a_json_lone_surrogate_escape_is_refused_and_nothing_runs(
    server: ControlServer, handler: FakeHandler
) -> None:
    doc = ask(server.path, b'{"action": "Deploy:Core:syncpro", "k": "\\udc80"}\n')

    assert doc["code"] != "0"
    assert "UTF-8" in doc["data"]["msg"]
    assert handler.calls == []


def test_an_answer_holding_a_lone_surrogate_still_reaches_its_client(
    server: ControlServer, handler: FakeHandler
) -> None:
    # A file name's odd byte reaches a document as a lone surrogate; the request ran, so its
    # client must hear how it went.
    handler.on_sync = lambda request: document(param={"k": "bad\udcff"})

    doc = ask(server.path, b"action=Deploy:Core:syncpro&k=server\n")

    assert doc["param"]["k"] == "bad\\xff"


def test_a_failure_with_one_connection_leaves_the_server_answering_the_others(
    server: ControlServer, handler: FakeHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = server._service

    def fail_once(*args: Any) -> None:
        monkeypatch.setattr(server, "_service", service)
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(server, "_service", fail_once)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.path))
        sock.sendall(b"action=status\n")
        # Dropped (closed with its line unread, so maybe reset), not left hanging.
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""

    assert ask(server.path, b"action=status\n")["code"] == "0"
    assert [name for name, _ in handler.calls] == ["status"]


def test_stopping_drops_a_client_still_sending_and_removes_the_socket(
    sock_dir: Path, handler: FakeHandler
) -> None:
    server = ControlServer(ControlSettings(socket=sock_dir / "c.sock"), handler)
    server.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(str(server.path))
        slow.sendall(b"action=")
        wait_until(lambda: server.waiting == 1)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
    assert not server.path.exists()
    assert handler.calls == []


# --- the socket file ---


def test_the_socket_gets_the_configured_mode_and_its_directory_is_created(
    sock_dir: Path, handler: FakeHandler
) -> None:
    settings = ControlSettings(socket=sock_dir / "run/syncpro/c.sock", mode=0o600)
    with ControlServer(settings, handler) as server:
        st = os.stat(server.path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600


def test_the_default_mode_is_0660(server: ControlServer) -> None:
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o660


@pytest.mark.parametrize("group", ["nogroup", str(NOBODY)])
def test_the_socket_is_given_the_configured_group_by_name_or_number(
    sock_dir: Path, handler: FakeHandler, group: str
) -> None:
    settings = ControlSettings(socket=sock_dir / "c.sock", group=group)
    with ControlServer(settings, handler) as server:
        assert os.stat(server.path).st_gid == NOBODY


def test_an_unknown_group_is_refused_before_anything_is_bound(
    sock_dir: Path, handler: FakeHandler
) -> None:
    settings = ControlSettings(socket=sock_dir / "c.sock", group="no-such-group-here")
    with pytest.raises(ControlError, match="no-such-group-here"):
        ControlServer(settings, handler).start()
    assert not settings.socket.exists()


def test_a_stale_socket_file_is_replaced(sock_dir: Path, handler: FakeHandler) -> None:
    path = sock_dir / "c.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed daemon leaves
    with ControlServer(ControlSettings(socket=path), handler) as server:
        assert ask(server.path, b"action=status\n")["code"] == "0"


def test_a_second_server_on_a_live_socket_is_refused_and_the_first_keeps_serving(
    server: ControlServer, handler: FakeHandler
) -> None:
    second = ControlServer(ControlSettings(socket=server.path), FakeHandler())
    with pytest.raises(ControlError, match=str(server.path)):
        second.start()
    assert ask(server.path, b"action=status\n")["code"] == "0"


def test_a_path_that_is_not_a_socket_is_refused(sock_dir: Path, handler: FakeHandler) -> None:
    path = sock_dir / "c.sock"
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(ControlSettings(socket=path), handler).start()
    assert path.read_text() == "not a socket"


def test_a_path_too_long_for_a_socket_is_a_clear_error(
    sock_dir: Path, handler: FakeHandler
) -> None:
    path = sock_dir / ("x" * 120) / "c.sock"
    with pytest.raises(ControlError, match="cannot serve the control socket"):
        ControlServer(ControlSettings(socket=path), handler).start()


# --- who may talk: SO_PEERCRED ---


def _runnable_by_others(path: str) -> bool:
    real = Path(os.path.realpath(path))
    if not real.is_file() or not os.stat(real).st_mode & stat.S_IXOTH:
        return False
    return all(os.stat(parent).st_mode & stat.S_IXOTH for parent in real.parents)


def _python_for_nobody() -> str:
    for candidate in (sys.executable, "/usr/bin/python3"):
        if _runnable_by_others(candidate):
            return candidate
    pytest.skip("no python interpreter that uid 65534 may run")


CLIENT = textwrap.dedent(
    """
    import socket, sys
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(sys.argv[1])
    sock.sendall(b"action=Deploy:Core:syncpro&k=server\\n")
    reply = b""
    while not reply.endswith(b"\\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    sock.close()
    sys.stdout.write(reply.decode())
    """
)


def _ask_as_nobody(path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [_python_for_nobody(), "-I", "-c", CLIENT, str(path)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture
def open_dir(sock_dir: Path) -> Path:
    # uid 65534 must reach the socket to be judged by it.
    os.chmod(sock_dir, 0o755)  # noqa: S103 - a test directory, for the test's other uid
    return sock_dir


def test_a_peer_whose_uid_is_not_allowed_is_refused_and_nothing_runs(
    open_dir: Path, handler: FakeHandler
) -> None:
    settings = ControlSettings(socket=open_dir / "c.sock", mode=0o666)
    with ControlServer(settings, handler), structlog.testing.capture_logs() as logs:
        doc = _ask_as_nobody(settings.socket)
        wait_until(lambda: any(e["event"] == "control.request" for e in logs))
    assert doc["code"] == "403"
    assert "uid 65534" in doc["data"]["msg"]
    assert "control.allow_uids" in doc["data"]["msg"]
    assert handler.calls == []
    [event] = [e for e in logs if e["event"] == "control.request"]
    assert (event["uid"], event["ok"]) == (NOBODY, False)


IDLE_CLIENTS = textwrap.dedent(
    """
    import socket, sys
    conns = []
    for _ in range(int(sys.argv[2])):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sys.argv[1])
        conns.append(sock)
    # The refusal must come unasked: this client never sends a byte.
    first = conns[0]
    first.settimeout(20)
    reply = b""
    while not reply.endswith(b"\\n"):
        chunk = first.recv(65536)
        if not chunk:
            break
        reply += chunk
    sys.stdout.write(reply.decode() or "no answer\\n")
    sys.stdout.flush()
    sys.stdin.read()  # hold every connection open until the test is done
    """
)


def test_refused_peers_holding_idle_connections_lock_nobody_out(
    open_dir: Path, handler: FakeHandler
) -> None:
    settings = ControlSettings(socket=open_dir / "c.sock", mode=0o666)
    with (
        ControlServer(settings, handler, read_timeout=30.0) as server,
        subprocess.Popen(
            [_python_for_nobody(), "-I", "-c", IDLE_CLIENTS, str(settings.socket), "70"],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        ) as intruder,
    ):
        assert intruder.stdin is not None and intruder.stdout is not None
        try:
            refusal = json.loads(intruder.stdout.readline())
            assert refusal["code"] == "403"
            assert "uid 65534" in refusal["data"]["msg"]
            started = time.monotonic()
            answers = [ask(server.path, b"action=status\n") for _ in range(3)]
            assert [doc["code"] for doc in answers] == ["0"] * 3
            assert time.monotonic() - started < 5
        finally:
            intruder.stdin.close()
            intruder.wait(30)
    assert [name for name, _ in handler.calls] == ["status"] * 3


def test_a_peer_whose_uid_is_allowed_is_served(open_dir: Path, handler: FakeHandler) -> None:
    settings = ControlSettings(socket=open_dir / "c.sock", mode=0o666, allow_uids=(NOBODY,))
    with ControlServer(settings, handler):
        doc = _ask_as_nobody(settings.socket)
    assert doc["code"] == "0"
    assert [name for name, _ in handler.calls] == ["sync"]


def test_a_peer_whose_group_is_allowed_is_served(open_dir: Path, handler: FakeHandler) -> None:
    settings = ControlSettings(socket=open_dir / "c.sock", mode=0o666, allow_gids=(NOBODY,))
    with ControlServer(settings, handler):
        assert _ask_as_nobody(settings.socket)["code"] == "0"


# --- with the real engine behind the socket ---


class EngineHandler:
    """What the daemon does for control requests, without the daemon."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def sync(self, request: SyncRequest) -> dict[str, Any]:
        result = run_sync(request, self.config, self.config.config_inventory)
        return response_document(result)

    def diff(self, request: SyncRequest) -> dict[str, Any]:
        return diff(request, self.config, self.config.config_inventory)

    def status(self) -> dict[str, Any]:
        return {"code": "0", "msg": "ok"}

    def reload(self) -> dict[str, Any]:
        return {"code": "0", "msg": "reload requested"}

    def health(self) -> dict[str, Any]:
        return {"code": "0", "msg": "healthy"}


def test_a_real_sync_and_diff_over_the_socket(tmp_path: Path, sock_dir: Path) -> None:
    config = make_config(tmp_path, SERVER_GROUP)
    write_tree(program_source(config, "server1"), {"bin/run.sh": "v1\n"})
    write_tree(program_source(config, "server2"), {"bin/run.sh": "v2\n", "lib/x.jar": "x"})
    for key in ("server1", "server2"):
        write_tree(config.dirs.remotecomdir / "configuredir" / key, {"app.yml": key})
    settings = ControlSettings(socket=sock_dir / "c.sock")
    with ControlServer(settings, EngineHandler(config)) as server:
        before = ask(server.path, b"action=Deploy:Core:diff&k=server\n")
        # bin, bin/run.sh, lib, lib/x.jar: all to be added
        assert before["diff"]["server2"]["program"]["differcount"] == "4,0,0,4"
        assert not program_target(config, "server1").exists()  # a diff writes nothing

        doc = ask(server.path, b"action=Deploy:Core:syncpro&k='server'\n")
        assert doc["data"]["data"] == {"0": "1", "1": "", "2": ""}
        assert doc["origin"] == "control"
        assert (program_target(config, "server1") / "lib/x.jar").read_text() == "x"

        after = ask(server.path, b'{"action": "Deploy:Core:diff", "k": "server"}\n')
        assert after["data"]["data"]["0"] == "1"
        assert after["diff"]["server1"]["program"]["differcount"] == "4,0,0,0"
        assert after["diff"]["server1"]["config"]["differcount"] == "1,0,0,0"


def test_unknown_fields_are_ignored_and_listed_and_sprint_prints_what_each_app_became(
    tmp_path: Path, sock_dir: Path
) -> None:
    config = make_config(tmp_path, SERVER_GROUP)
    for key in ("server1", "server2"):
        write_tree(program_source(config, key), {"bin/run.sh": key})
        write_tree(config.dirs.remotecomdir / "configuredir" / key, {"app.yml": key})
    with ControlServer(
        ControlSettings(socket=sock_dir / "c.sock"), EngineHandler(config)
    ) as server:
        plain = ask(server.path, b"action=Deploy:Core:syncpro&k=server1&force=1&debug=1\n")
        assert plain["data"]["data"]["0"] == "1"
        assert plain["ignored"] == ["force"]
        assert (plain["print_stdout"], plain["respon"]["stdout"]) == ("0", "")
        assert plain["param"]["debug"] == "1"

        doc = ask(server.path, b'{"action": "Deploy:Core:syncpro", "k": "server", "sprint": 1}\n')
        assert doc["data"]["data"]["0"] == "1"
        assert doc["ignored"] == []
        assert doc["print_stdout"] == "1"
        lines = doc["respon"]["stdout"].splitlines()
        assert lines[:2] == [
            "server1: program superseded, config published",
            "server2: program published, config published",
        ]
        assert lines[-1] == "成功"


def test_a_groups_member_that_is_not_auto_deployed_is_reported_skipped_not_failed(
    tmp_path: Path, sock_dir: Path
) -> None:
    config = make_config(
        tmp_path, [app("server1", "server"), app("server2", "server", auto_deploy=False)]
    )
    write_tree(program_source(config, "server1"), {"bin/run.sh": "v1"})
    write_tree(config.dirs.remotecomdir / "configuredir" / "server1", {"app.yml": "1"})
    with ControlServer(
        ControlSettings(socket=sock_dir / "c.sock"), EngineHandler(config)
    ) as server:
        doc = ask(server.path, b"action=Deploy:Core:syncpro&k=server\n")
        # Success is the synced members'; the one left out is named with why.
        assert doc["data"]["data"]["0"] == "1", doc["data"]["msg"]
        assert [a["app_key"] for a in doc["apps"]] == ["server1"]
        assert doc["skipped"] == [{"app_key": "server2", "reason": "auto_deploy is false"}]
        assert (program_target(config, "server1") / "bin/run.sh").read_text() == "v1"

        direct = ask(server.path, b"action=Deploy:Core:syncpro&k=server2\n")
        assert direct["data"]["data"]["0"] == "0"
        assert direct["unknown"] == ["server2"]
        assert direct["skipped"] == []
        assert "unknown key: server2" in direct["data"]["msg"]
