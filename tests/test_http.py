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
from typing import Any

import pytest
import structlog

from control_fakes import FakeHandler, document
from syncpro.config.settings import HttpSettings
from syncpro.control.http import HttpServer
from syncpro.engine.request import SyncRequest
from syncpro.engine.response import REDACTED, param_of

from helpers import wait_until

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


def curl(*args: str) -> tuple[int, dict[str, Any]]:
    """Run curl as a client of the original would; return the HTTP status and the document."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body, _, status = done.stdout.rpartition("\n")
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
    requests = [e for e in logs if e["event"] == "http.request"]
    # The token in the body is read before the body's bad action: a refusal by the document.
    assert [e["status"] for e in requests] == [200, 403, 200, 400]
    assert requests[0]["path"] == "/rex"
    assert requests[0]["k"] == "server"


def test_the_request_log_says_ok_only_for_a_request_that_ran_and_succeeded(
    server: HttpServer, handler: FakeHandler
) -> None:
    with structlog.testing.capture_logs() as logs:
        curl("-d", "action=Deploy:Core:syncpro&k=", url(server, f"/rex?token={TOKEN}"))
        curl("-d", "action=nope", url(server, f"/rex?token={TOKEN}"))
        curl("-d", SEED_BODY, url(server, f"/rex?token={TOKEN}"))
        wait_until(lambda: sum(e["event"] == "http.request" for e in logs) == 3)

    requests = [e for e in logs if e["event"] == "http.request"]
    assert [(e["status"], e["code"] != "0", e["ok"]) for e in requests] == [
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
