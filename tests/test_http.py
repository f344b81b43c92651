"""The original POST /rex endpoint over real HTTP: curl as the seed's clients, and urllib."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_fakes import FakeHandler, document
from syncpro.config.model import HttpSettings
from syncpro.control.http import HttpServer
from syncpro.engine.request import SyncRequest
from syncpro.engine.response import REDACTED, param_of
from syncpro.errors import ConfigError

from helpers import SERVER_GROUP, make_config, wait_until

TOKEN = "1527669337mxchcptwhwevbwgyiahtilfadcycyfxm"  # noqa: S105 - the seed's example
SEED_BODY = "action=Deploy:Core:syncpro&k='server'&update='1'"


@pytest.fixture
def handler() -> FakeHandler:
    fake = FakeHandler()
    fake.on_sync = lambda request: document(param=param_of(request))
    return fake


@pytest.fixture
def server(handler: FakeHandler) -> Iterator[HttpServer]:
    settings = HttpSettings(enabled=True, listen="127.0.0.1:0", token=TOKEN, max_body=4096)
    with HttpServer(settings, handler, timeout=5) as running:
        yield running


def url(server: HttpServer, path: str) -> str:
    host, port = server.address
    return f"http://{host}:{port}{path}"


def curl(*args: str, data: bytes | None = None) -> tuple[int, dict[str, Any]]:
    """Run curl as a client of the original would (`data` on its stdin, for @-); return the
    HTTP status and the document."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", *args],
        capture_output=True,
        input=data,
        timeout=30,
        check=True,
    )
    body, _, status = done.stdout.decode().rpartition("\n")
    return int(status), json.loads(body)


def post(server: HttpServer, path: str, body: bytes) -> tuple[int, dict[str, Any], str]:
    # An http:// URL to the loopback server under test, never a file: or custom scheme.
    request = urllib.request.Request(url(server, path), data=body, method="POST")  # noqa: S310
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:  # noqa: S310
            return response.status, json.loads(response.read()), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read()), exc.headers["Content-Type"]


def raw_exchange(server: HttpServer, data: bytes) -> bytes:
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# --- the endpoint ---


def test_curl_posting_the_seeds_body_gets_the_response_document(
    server: HttpServer, handler: FakeHandler
) -> None:
    status, doc = curl("-d", SEED_BODY, url(server, f"/rex?token={TOKEN}"))
    assert status == 200
    assert doc["code"] == "0"
    assert doc["data"]["data"]["0"] == "1"
    assert doc["param"] == {
        "action": "Deploy:Core:syncpro",
        "k": "server",
        "update": "1",
        "token": REDACTED,
    }
    [(name, request)] = handler.calls
    assert name == "sync"
    assert isinstance(request, SyncRequest)
    assert (request.k, request.update, request.origin, request.token_given) == (
        "server",
        True,
        "http",
        True,
    )


def test_urllib_posting_the_seeds_request_example_is_answered_in_json_utf8(
    server: HttpServer, handler: FakeHandler
) -> None:
    status, doc, content_type = post(
        server, f"/rex?token={TOKEN}", b"action=Deploy:Core:syncpro&k=server1,server2"
    )
    assert status == 200
    assert content_type == "application/json; charset=utf-8"
    assert doc["param"]["k"] == "server1 server2"
    assert doc["data"]["msg"] == "成功"
    assert TOKEN not in json.dumps(doc)


def test_a_token_in_the_form_body_is_accepted_as_the_original_did(
    server: HttpServer, handler: FakeHandler
) -> None:
    status, doc = curl("-d", f"{SEED_BODY}&token={TOKEN}", url(server, "/rex"))
    assert status == 200
    assert doc["param"]["token"] == REDACTED
    assert len(handler.calls) == 1


def test_diff_status_and_reload_are_served_too(server: HttpServer, handler: FakeHandler) -> None:
    target = url(server, f"/rex?token={TOKEN}")
    assert curl("-d", "action=Deploy:Core:diff&k=server", target)[0] == 200
    assert curl("-d", "action=status", target)[1]["version"] == "test"
    assert curl("--data-binary", '{"action": "reload"}', target)[0] == 200
    assert [name for name, _ in handler.calls] == ["diff", "status", "reload"]


@pytest.mark.parametrize("query", ["", "?token=", "?token=wrong", f"?token={TOKEN}x"])
def test_a_missing_or_wrong_token_is_refused_with_403_and_nothing_runs(
    server: HttpServer, handler: FakeHandler, query: str
) -> None:
    status, doc = curl("-d", SEED_BODY, url(server, f"/rex{query}"))
    assert status == 403
    assert doc["code"] not in ("0", "")
    assert "token" in doc["data"]["msg"]
    assert handler.calls == []


def test_two_different_tokens_are_refused_and_the_same_one_twice_is_accepted(
    server: HttpServer, handler: FakeHandler
) -> None:
    status, doc = curl("-d", f"{SEED_BODY}&token=other", url(server, f"/rex?token={TOKEN}"))
    assert status == 403
    assert "different values" in doc["data"]["msg"]
    assert handler.calls == []
    status, _ = curl("-d", f"{SEED_BODY}&token={TOKEN}", url(server, f"/rex?token={TOKEN}"))
    assert status == 200
    assert len(handler.calls) == 1


def test_an_invalid_request_with_the_right_token_is_refused_by_its_document(
    server: HttpServer, handler: FakeHandler
) -> None:
    status, doc = curl("-d", "action=Deploy:Core:syncpro", url(server, f"/rex?token={TOKEN}"))
    assert status == 200  # as the original: heard, and the document says why it failed
    assert doc["code"] == "1"
    assert doc["parseparameters"]["code"] == "1"
    assert "k is required" in doc["data"]["msg"]
    assert handler.calls == []


def test_a_failing_handler_answers_500_with_a_document(
    server: HttpServer, handler: FakeHandler
) -> None:
    def explode(request: SyncRequest) -> dict[str, Any]:
        raise RuntimeError("disk on fire")

    handler.on_sync = explode
    status, doc = curl("-d", SEED_BODY, url(server, f"/rex?token={TOKEN}"))
    assert status == 500
    assert "RuntimeError" in doc["data"]["msg"]
    assert curl(url(server, "/healthz"))[0] == 200


# --- the token stays secret ---


def test_the_token_never_appears_in_any_log_event(server: HttpServer, handler: FakeHandler) -> None:
    with structlog.testing.capture_logs() as logs:
        curl("-d", SEED_BODY, url(server, f"/rex?token={TOKEN}"))
        curl("-d", SEED_BODY, url(server, f"/rex?token={TOKEN}zz"))
        curl("-d", f"action=nope&token={TOKEN}", url(server, "/rex"))
        # A malformed request line is logged by the standard library's handler: redacted too.
        raw_exchange(server, f"POST /rex?token={TOKEN} HTTP/1.0 junk\r\n\r\n".encode())
        wait_until(lambda: sum(e["event"] == "http.request" for e in logs) == 4)
    assert TOKEN not in repr(logs)
    events = [e for e in logs if e["event"] == "http.request"]
    # The token in the body is read before the body's bad action: a refusal by the document.
    assert [e["status"] for e in events] == [200, 403, 200, 400]
    assert events[0]["path"] == "/rex"
    assert events[0]["k"] == "server"


def test_status_polls_and_healthz_are_logged_at_debug_a_sync_at_info(
    server: HttpServer, handler: FakeHandler
) -> None:
    with structlog.testing.capture_logs() as logs:
        curl("-d", "action=status", url(server, f"/rex?token={TOKEN}"))
        curl(url(server, "/healthz"))
        curl("-d", SEED_BODY, url(server, f"/rex?token={TOKEN}"))
        wait_until(lambda: sum(e["event"] == "http.request" for e in logs) == 3)

    events = [e for e in logs if e["event"] == "http.request"]
    assert [e["log_level"] for e in events] == ["debug", "debug", "info"]


def test_the_request_log_says_ok_only_for_a_request_that_ran_and_succeeded(
    server: HttpServer, handler: FakeHandler
) -> None:
    with structlog.testing.capture_logs() as logs:
        curl("-d", "action=Deploy:Core:syncpro&k=", url(server, f"/rex?token={TOKEN}"))
        curl("-d", "action=nope", url(server, f"/rex?token={TOKEN}"))
        curl("-d", SEED_BODY, url(server, f"/rex?token={TOKEN}"))
        wait_until(lambda: sum(e["event"] == "http.request" for e in logs) == 3)

    events = [e for e in logs if e["event"] == "http.request"]
    assert [(e["status"], e["code"] != "0", e["ok"]) for e in events] == [
        (200, True, False),  # empty k: refused by its document
        (200, True, False),  # unknown action
        (200, False, True),
    ]


# --- limits and other paths ---


def test_a_body_over_the_limit_is_refused_with_413(
    server: HttpServer, handler: FakeHandler
) -> None:
    body = "action=Deploy:Core:syncpro&k=" + "a" * 10000
    status, doc = curl("--data-binary", body, url(server, f"/rex?token={TOKEN}"))
    assert status == 413
    assert doc["code"] == "413"
    assert "4096" in doc["data"]["msg"]
    assert post(server, f"/rex?token={TOKEN}", body.encode())[0] == 413
    assert handler.calls == []


def test_a_large_body_far_over_the_limit_still_gets_its_413(server: HttpServer) -> None:
    connection = http.client.HTTPConnection(*server.address, timeout=20)
    try:
        connection.request("POST", f"/rex?token={TOKEN}", body=b"k=" + b"a" * 2_000_000)
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["code"] == "413"
    finally:
        connection.close()


def test_a_post_without_body_or_content_length_is_an_empty_request_refused_by_its_document(
    server: HttpServer, handler: FakeHandler
) -> None:
    reply = raw_exchange(server, f"POST /rex?token={TOKEN} HTTP/1.0\r\n\r\n".encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    doc = json.loads(body)
    assert doc["code"] == "1"
    assert "empty request" in doc["data"]["msg"]
    assert handler.calls == []


def test_a_chunked_post_is_refused_with_411(server: HttpServer, handler: FakeHandler) -> None:
    status, doc = curl(
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        SEED_BODY,
        url(server, f"/rex?token={TOKEN}"),
    )
    assert status == 411
    assert "Content-Length" in doc["data"]["msg"]
    assert handler.calls == []


@pytest.mark.parametrize("body", [[], ["-d", ""]])
def test_fields_in_the_query_string_are_the_request_when_the_body_is_empty(
    server: HttpServer, handler: FakeHandler, body: list[str]
) -> None:
    query = f"token={TOKEN}&action=Deploy:Core:syncpro&k=server1,server2&update=1"
    status, doc = curl("-X", "POST", *body, url(server, f"/rex?{query}"))
    assert status == 200, doc
    assert doc["code"] == "0"
    assert doc["param"]["token"] == REDACTED
    [(name, request)] = handler.calls
    assert name == "sync"
    assert request is not None
    assert (request.normalised_k, request.update, request.token_given) == (
        "server1 server2",
        True,
        True,
    )


def test_fields_in_the_query_string_still_need_the_token(
    server: HttpServer, handler: FakeHandler
) -> None:
    status, doc = curl("-X", "POST", url(server, "/rex?action=Deploy:Core:syncpro&k=server"))
    assert status == 403
    assert doc["data"]["msg"] == "token missing"
    assert handler.calls == []


def test_when_both_carry_fields_the_body_is_the_request_and_the_query_only_gives_the_token(
    server: HttpServer, handler: FakeHandler
) -> None:
    query = f"token={TOKEN}&action=Deploy:Core:syncpro&k=web1&update=1"
    status, doc = curl("-d", "action=Deploy:Core:syncpro&k=server", url(server, f"/rex?{query}"))
    assert status == 200, doc
    assert doc["param"]["k"] == "server"
    [(_, request)] = handler.calls
    assert request is not None
    assert (request.k, request.update) == ("server", False)


def test_head_healthz_answers_200_with_headers_only(server: HttpServer) -> None:
    connection = http.client.HTTPConnection(*server.address, timeout=20)
    try:
        connection.request("HEAD", "/healthz")
        response = connection.getresponse()
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        assert int(response.headers["Content-Length"]) > 0  # what a GET would send
        assert response.read() == b""
    finally:
        connection.close()
    reply = raw_exchange(server, b"HEAD /nowhere HTTP/1.0\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 404")
    assert body == b""


def test_curl_head_healthz_succeeds(server: HttpServer) -> None:
    done = subprocess.run(
        ["curl", "-sS", "-I", "--fail", "--max-time", "20", url(server, "/healthz")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("HTTP/1.0 200")


def test_healthz_needs_no_token(server: HttpServer) -> None:
    status, doc = curl(url(server, "/healthz"))
    assert (status, doc) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["/nowhere"], 404),
        (["-d", "x=1", "/rex/extra"], 404),
        (["/rex"], 405),
        (["-X", "PUT", "/rex"], 501),
    ],
)
def test_other_paths_and_methods_get_a_document_with_their_status(
    server: HttpServer, handler: FakeHandler, args: list[str], expected: int
) -> None:
    *options, path = args
    status, doc = curl(*options, url(server, path))
    assert status == expected
    assert doc["code"] == str(expected)
    assert handler.calls == []


def test_past_the_connection_cap_a_client_gets_503_at_once_and_idle_ones_hold_no_more(
    handler: FakeHandler,
) -> None:
    settings = HttpSettings(enabled=True, listen="127.0.0.1:0", token=TOKEN)
    with HttpServer(settings, handler, max_clients=3) as server:
        idle = [socket.create_connection(server.address, timeout=5) for _ in range(3)]
        try:
            wait_until(lambda: _http_threads() == 3)
            for _ in range(5):  # a flood of more clients starts no thread
                assert curl(url(server, "/healthz"))[0] == 503
            assert _http_threads() == 3
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: curl(url(server, "/healthz"))[0] == 200)


def test_at_the_connection_cap_a_client_is_served_when_a_slot_frees_within_slot_wait(
    handler: FakeHandler,
) -> None:
    settings = HttpSettings(enabled=True, listen="127.0.0.1:0", token=TOKEN)
    with HttpServer(settings, handler, max_clients=2, slot_wait=30) as server:
        idle = [socket.create_connection(server.address, timeout=5) for _ in range(2)]
        answers: list[int] = []
        try:
            wait_until(lambda: _http_threads() == 2)
            client = threading.Thread(
                target=lambda: answers.append(curl(url(server, "/healthz"))[0])
            )
            client.start()
            # Its connection is accepted and waits for a slot: no thread, no answer yet.
            wait_until(lambda: _established(server) == 3)
            assert answers == []
            idle.pop().close()
            client.join(20)
        finally:
            for sock in idle:
                sock.close()
    assert answers == [200]


def _established(server: HttpServer) -> int:
    """Connections to the server's port the kernel has established, from /proc/net/tcp."""
    port = f"{server.address[1]:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(line.split()[1].endswith(f":{port}") and line.split()[3] == "01" for line in lines)


def _http_threads() -> int:
    return sum(t.name.startswith("syncpro-http-request-") for t in threading.enumerate())


def test_a_client_dribbling_its_body_is_cut_off_at_the_request_deadline(
    handler: FakeHandler,
) -> None:
    settings = HttpSettings(enabled=True, listen="127.0.0.1:0", token=TOKEN)
    head = f"POST /rex?token={TOKEN} HTTP/1.0\r\nContent-Length: 100\r\n\r\n".encode()
    with (
        HttpServer(settings, handler, timeout=1.0, max_clients=1) as server,
        socket.create_connection(server.address, timeout=10) as slow,
    ):
        slow.sendall(head)
        done = threading.Event()

        def dribble() -> None:  # a byte every 0.2 s: each recv is quick, the request never ends
            with contextlib.suppress(OSError):
                while not done.wait(0.2):
                    slow.sendall(b"a")

        dribbler = threading.Thread(target=dribble)
        dribbler.start()
        try:
            wait_until(lambda: curl(url(server, "/healthz"))[0] == 200, timeout=8)
            assert b" 408 " in slow.recv(4096)
        finally:
            done.set()
            dribbler.join()
    assert handler.calls == []


def test_a_content_length_that_is_not_ascii_digits_is_a_400_not_a_dropped_connection(
    server: HttpServer, handler: FakeHandler
) -> None:
    for length in (b"\xb2", b"9" * 5000):
        request = b"POST /rex HTTP/1.0\r\nContent-Length: " + length + b"\r\n\r\n"
        answer = raw_exchange(server, request)
        assert answer.startswith(b"HTTP/1.0 400 "), answer[:80]
    assert handler.calls == []


def test_a_token_in_a_path_with_an_encoded_question_mark_is_never_logged_or_echoed(
    server: HttpServer,
) -> None:
    with structlog.testing.capture_logs() as logs:
        status, doc = curl(url(server, f"/rex%3Ftoken={TOKEN}"))

    assert status == 404
    assert TOKEN not in json.dumps(doc)
    assert TOKEN not in json.dumps(logs, default=str)


def test_stop_returns_within_its_timeout_while_a_client_stalls_mid_request(
    handler: FakeHandler,
) -> None:
    settings = HttpSettings(enabled=True, listen="127.0.0.1:0", token=TOKEN)
    server = HttpServer(settings, handler, timeout=30.0)
    server.start()
    with socket.create_connection(server.address, timeout=10) as stalled:
        stalled.sendall(b"POST /rex HTTP/1.0\r\n")  # and nothing more
        wait_until(lambda: _http_threads() == 1)
        started = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            server.stop(timeout=1.0)
        assert time.monotonic() - started < 5
        assert any(e["event"] == "http.stop_abandoned" for e in logs)
    wait_until(lambda: _http_threads() == 0)  # its client gone, the thread ends


def test_the_server_thread_and_its_request_threads_end_on_stop(handler: FakeHandler) -> None:
    settings = HttpSettings(enabled=True, listen="127.0.0.1:0", token=TOKEN)
    server = HttpServer(settings, handler)
    server.start()
    assert curl(url(server, "/healthz"))[0] == 200
    server.stop()
    with pytest.raises(OSError), socket.create_connection(server.address, timeout=2):
        pass


# --- the original's clients: multipart forms, extra fields, CORS ---


def test_curl_f_posts_a_multipart_form_that_runs_the_request(
    server: HttpServer, handler: FakeHandler
) -> None:
    status, doc = curl(
        "-F", "action=Deploy:Core:syncpro", "-F", "k=server1", url(server, f"/rex?token={TOKEN}")
    )
    assert status == 200, doc
    assert doc["code"] == "0"
    assert doc["param"] == {
        "action": "Deploy:Core:syncpro",
        "k": "server1",
        "update": "0",
        "token": REDACTED,
    }
    assert doc["ignored"] == []
    [(name, request)] = handler.calls
    assert (name, request.k if request else None) == ("sync", "server1")


def test_curl_f_with_the_token_in_the_form_is_accepted_and_never_echoed(
    server: HttpServer, handler: FakeHandler
) -> None:
    status, doc = curl(
        "-F",
        f"token={TOKEN}",
        "-F",
        "action=Deploy:Core:syncpro",
        "-F",
        "k='server'",
        "-F",
        "update=1",
        url(server, "/rex"),
    )
    assert status == 200, doc
    assert doc["param"]["token"] == REDACTED
    assert TOKEN not in json.dumps(doc)
    [(_, request)] = handler.calls
    assert request is not None
    assert (request.k, request.update, request.token_given) == ("server", True, True)


def test_curl_d_with_debug_and_unknown_fields_runs_and_names_what_it_ignored(
    server: HttpServer, handler: FakeHandler
) -> None:
    body = f"action=Deploy:Core:syncpro&k=server1&debug=1&foo=bar&Token=x&token={TOKEN}"
    status, doc = curl("-d", body, url(server, "/rex"))
    assert status == 200, doc
    assert doc["code"] == "0"
    assert doc["ignored"] == ["foo", "Token"]
    [(_, request)] = handler.calls
    assert request is not None
    assert request.extra == {"debug": "1"}
    assert doc["param"]["debug"] == "1"


def test_sprint_sets_print_stdout_and_says_the_result_in_respon_stdout(
    server: HttpServer, handler: FakeHandler
) -> None:
    handler.on_sync = lambda request: document(
        param=param_of(request),
        respon={"stdout": "", "stderr": ""},
        apps=[{"app_key": "server1", "program": {"status": "published"}, "config": None}],
    )
    status, doc = curl(
        "-d", "action=Deploy:Core:syncpro&k=server1&sprint=1", url(server, f"/rex?token={TOKEN}")
    )
    assert status == 200
    assert doc["print_stdout"] == "1"
    assert doc["respon"]["stdout"].splitlines() == ["server1: program published", "成功"]


def test_requests_with_files_posts_a_multipart_form_that_runs(
    server: HttpServer, handler: FakeHandler
) -> None:
    # files= as clients write it: plain parts, and a part sent as a file (with a filename).
    response = requests.post(
        url(server, "/rex"),
        data={"token": TOKEN, "action": "Deploy:Core:syncpro"},
        files={"k": (None, "server1 server2"), "update": ("update.txt", b"1", "text/plain")},
        timeout=20,
    )
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["code"] == "0"
    assert TOKEN not in response.text
    [(_, request)] = handler.calls
    assert request is not None
    assert (request.normalised_k, request.update) == ("server1 server2", True)


def _multipart(fields: list[tuple[str, bytes]], boundary: str = "b0und4ry") -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value
        + b"\r\n"
        for name, value in fields
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


_FORM = "Content-Type: multipart/form-data; boundary=b0und4ry"
_SEED_FIELDS = [("action", b"Deploy:Core:syncpro"), ("k", b"server")]


@pytest.mark.parametrize(
    ("content_type", "body", "why"),
    [
        (_FORM, b"--b0und4ry\r\nnot a header line\r\n\r\nx\r\n--b0und4ry--\r\n", "malformed"),
        (_FORM, _multipart(_SEED_FIELDS)[:-20], "closing boundary"),  # cut off
        (_FORM, b"action=Deploy:Core:syncpro&k=server", "malformed at byte"),  # not multipart
        ("Content-Type: multipart/form-data", _multipart(_SEED_FIELDS), "boundary"),
        (_FORM, _multipart([*_SEED_FIELDS, ("update", b"\xff")]), "not UTF-8"),
        (
            _FORM,
            _multipart(_SEED_FIELDS).replace(b'form-data; name="k"', b"attachment"),
            "form-data field with a name",
        ),
    ],
)
@pytest.mark.parametrize("in_query", [True, False])
def test_a_malformed_multipart_body_is_a_400_and_nothing_runs(
    server: HttpServer,
    handler: FakeHandler,
    content_type: str,
    body: bytes,
    why: str,
    in_query: bool,
) -> None:
    if not in_query:  # the token somewhere in the body that cannot be read
        body = body.replace(b"Deploy:Core:syncpro", b"Deploy:Core:syncpro" + TOKEN.encode())
    path = f"/rex?token={TOKEN}" if in_query else "/rex"
    with structlog.testing.capture_logs() as logs:
        status, doc = curl("-H", content_type, "--data-binary", "@-", url(server, path), data=body)
    # Never 403 for a token that may be in the unreadable part: the body is what is wrong.
    assert status == 400, doc
    assert doc["code"] == "400"
    assert why in doc["data"]["msg"]
    assert handler.calls == []
    assert TOKEN not in json.dumps(doc) + json.dumps(logs, default=str)


def test_a_multipart_body_over_max_body_is_refused_and_nothing_runs(
    server: HttpServer, handler: FakeHandler
) -> None:
    status, doc = curl(
        "-F",
        "action=Deploy:Core:syncpro",
        "-F",
        "k=" + "a" * 5000,
        url(server, f"/rex?token={TOKEN}"),
    )
    assert status == 413
    assert "4096" in doc["data"]["msg"]
    assert handler.calls == []


def test_a_wrong_token_in_a_multipart_form_is_refused_before_anything_else(
    server: HttpServer, handler: FakeHandler
) -> None:
    status, doc = curl("-F", "token=nope", "-F", "action=nope", url(server, "/rex"))
    assert status == 403
    assert doc["data"]["msg"] == "token invalid"
    assert doc["param"] == {"token": REDACTED}
    assert handler.calls == []


@pytest.fixture
def cors_server(handler: FakeHandler) -> Iterator[HttpServer]:
    settings = HttpSettings(
        enabled=True, listen="127.0.0.1:0", token=TOKEN, cors_origin="https://deploy.example"
    )
    with HttpServer(settings, handler, timeout=5) as running:
        yield running


def _headers(*args: str) -> tuple[int, dict[str, str]]:
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-D", "-", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    status_line, *lines = done.stdout.strip().splitlines()
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


def test_a_preflight_is_answered_without_running_anything_and_answers_carry_the_origin(
    cors_server: HttpServer, handler: FakeHandler
) -> None:
    status, headers = _headers(
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://deploy.example",
        "-H",
        "Access-Control-Request-Method: POST",
        "-H",
        "Access-Control-Request-Headers: content-type",
        url(cors_server, "/rex"),
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://deploy.example"
    assert "POST" in headers["access-control-allow-methods"]
    assert "content-type" in headers["access-control-allow-headers"].lower()
    assert handler.calls == []

    status, headers = _headers("-d", SEED_BODY, url(cors_server, f"/rex?token={TOKEN}"))
    assert (status, headers["access-control-allow-origin"]) == (200, "https://deploy.example")
    status, headers = _headers("-d", SEED_BODY, url(cors_server, "/rex?token=wrong"))
    assert (status, headers["access-control-allow-origin"]) == (403, "https://deploy.example")
    assert len(handler.calls) == 1


def test_without_cors_origin_no_answer_grants_another_origin(
    server: HttpServer, handler: FakeHandler
) -> None:
    status, headers = _headers(
        "-X", "OPTIONS", "-H", "Origin: https://x.example", url(server, "/rex")
    )
    assert status == 204
    assert "access-control-allow-origin" not in headers
    status, headers = _headers("-d", SEED_BODY, url(server, f"/rex?token={TOKEN}"))
    assert status == 200
    assert "access-control-allow-origin" not in headers
    assert _headers("-X", "OPTIONS", url(server, "/other"))[0] == 404


def test_http_cors_origin_is_a_config_key_that_refuses_a_line_break(tmp_path: Path) -> None:
    http = {"enabled": True, "token": "t" * 16, "cors_origin": "*"}
    assert make_config(tmp_path, SERVER_GROUP, extra={"http": http}).http.cors_origin == "*"
    assert make_config(tmp_path, SERVER_GROUP).http.cors_origin is None
    with pytest.raises(ConfigError, match=r"http\.cors_origin"):
        make_config(tmp_path, SERVER_GROUP, extra={"http": {**http, "cors_origin": "*\r\nX: y"}})


# --- the token never shows, whatever the client sends ---


def test_a_token_sent_in_another_field_is_refused_before_it_reaches_the_engine(
    server: HttpServer, handler: FakeHandler
) -> None:
    with structlog.testing.capture_logs() as logs:
        status, doc = curl(
            "-F",
            f"k=a,{TOKEN}",
            "-F",
            "action=Deploy:Core:syncpro",
            url(server, f"/rex?token={TOKEN}"),
        )
    assert status == 400
    assert "field other than token" in doc["data"]["msg"]
    assert handler.calls == []
    assert TOKEN not in json.dumps(doc) + json.dumps(logs, default=str)


_NAMES = st.one_of(
    st.sampled_from(["action", "k", "update", "w", "pretty", "debug", "sprint", "foo", "Token"]),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12),
).filter(lambda name: name != "token")
_VALUES = st.one_of(
    st.sampled_from(["Deploy:Core:syncpro", "server1", "1", "0", "", TOKEN, f"x{TOKEN}y"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
)


def test_the_token_never_appears_in_any_answer_or_log_line_whatever_the_form(
    server: HttpServer, handler: FakeHandler
) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        fields=st.lists(st.tuples(_NAMES, _VALUES), max_size=6),
        token_in=st.sampled_from(["query", "body", "both", "none", "wrong"]),
        shape=st.sampled_from(["urlencoded", "multipart", "files", "raw-multipart"]),
        raw=st.binary(max_size=200),
    )
    def check(fields: list[tuple[str, str]], token_in: str, shape: str, raw: bytes) -> None:
        with handler.lock:
            handler.calls.clear()
        query = {"query": f"?token={TOKEN}", "both": f"?token={TOKEN}", "wrong": "?token=no"}
        body_fields = list(fields)
        if token_in in ("body", "both"):
            body_fields.append(("token", TOKEN))
        target = url(server, "/rex" + query.get(token_in, ""))
        with structlog.testing.capture_logs() as logs:
            if shape == "urlencoded":
                response = requests.post(target, data=body_fields, timeout=20)
            elif shape == "multipart":
                parts = [(name, (None, value)) for name, value in body_fields]
                response = requests.post(target, files=parts or {"": ""}, timeout=20)
            elif shape == "files":
                parts = [(name, (f"{name}.txt", value.encode())) for name, value in body_fields]
                response = requests.post(target, files=parts or {"": ""}, timeout=20)
            else:
                response = requests.post(
                    target,
                    data=b"--b\r\n" + raw + TOKEN.encode() + raw,
                    headers={"Content-Type": "multipart/form-data; boundary=b"},
                    timeout=20,
                )
            wait_until(lambda: any(e["event"] == "http.request" for e in logs))
        assert TOKEN not in response.text
        assert TOKEN not in json.dumps(logs, default=str)
        assert TOKEN not in repr(dict(response.headers))
        if token_in in ("none", "wrong") and shape != "raw-multipart":
            assert response.status_code == 403, response.text
        if response.status_code != 200 or response.json()["code"] != "0":
            assert handler.calls == []

    check()


# --- bursts ---


def test_300_concurrent_posts_are_all_served_without_a_reset(
    server: HttpServer, handler: FakeHandler
) -> None:
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "300",
            "--max-time",
            "60",
            "-w",
            "%{http_code}\\n",
            "-o",
            "/dev/null",
            "-d",
            SEED_BODY,
            url(server, f"/rex?token={TOKEN}&n=[1-300]"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    statuses = done.stdout.split()
    assert done.returncode == 0, done.stderr
    assert statuses == ["200"] * 300, done.stderr
    assert len(handler.calls) == 300
