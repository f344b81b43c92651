"""The dispatch contract: a request to its answer, what the answer means, how it is written."""

from __future__ import annotations

import json
from typing import Any

import structlog

from control_fakes import FakeHandler, document
from syncpro.control.dispatch import (
    Code,
    answer_line,
    dispatch,
    encode,
    exit_code,
    render,
    succeeded,
    with_stdout,
)
from syncpro.control.protocol import parse_request
from syncpro.engine.response import REDACTED, refusal_document
from syncpro.errors import ExitCode, RequestError

SYNC = "Deploy:Core:syncpro"


def test_a_canned_failure_document_maps_to_exit_1_not_2() -> None:
    assert exit_code(document(False), SYNC) is ExitCode.UNSUCCESSFUL
    assert exit_code({"code": "403"}, SYNC) is ExitCode.USAGE
    assert exit_code({"code": "0"}, "status") is ExitCode.OK
    assert exit_code(document(True), SYNC) is ExitCode.OK


def test_status_health_and_reload_that_ran_and_say_1_exit_1_a_refusal_of_them_2() -> None:
    for action in ("status", "health", "reload"):
        assert exit_code({"code": "1", "msg": "last sync failed: server1"}, action) == 1
        assert exit_code(refusal_document({"action": action}, "bad"), action) == 2


def test_succeeded_is_exactly_an_exit_code_of_ok() -> None:
    docs: list[dict[str, Any]] = [
        document(True),
        document(False),
        {"code": "0"},
        {"code": "1"},
        {"code": "403"},
        dict(refusal_document({}, "bad")),
    ]
    for doc in docs:
        for action in (SYNC, "Deploy:Core:diff", "status", "reload", "health", None):
            assert succeeded(doc, action) == (exit_code(doc, action) is ExitCode.OK)


def test_dispatch_adds_the_ignored_fields_and_the_echo_without_touching_the_handlers_doc() -> None:
    handler = FakeHandler()
    kept = {"code": "0", "msg": "ok"}
    handler.status = lambda: kept  # type: ignore[method-assign]
    doc = dispatch(handler, parse_request(b"action=status&colour=red\n"), "control")
    assert doc["ignored"] == ["colour"]
    assert doc.get("param") == {"action": "status"}
    assert kept == {"code": "0", "msg": "ok"}  # the handler's own document is not changed


def test_a_handler_that_raises_is_answered_500_naming_the_error_and_logged() -> None:
    handler = FakeHandler()

    def broken() -> dict[str, Any]:
        raise KeyError("boom")

    handler.health = broken  # type: ignore[assignment]
    with structlog.testing.capture_logs() as logs:
        doc = dispatch(handler, parse_request(b"action=health\n"), "control")
    assert doc["code"] == Code.INTERNAL == "500"
    assert type(doc["code"]) is str  # a plain str in the document, never the enum
    assert "KeyError" in json.dumps(doc)
    assert [e["event"] for e in logs] == ["control.handler_failed"]


def test_a_request_error_from_the_handler_is_a_refusal_with_code_1() -> None:
    handler = FakeHandler()

    def refuses(request: Any) -> dict[str, Any]:
        raise RequestError("inventory unavailable")

    handler.sync = refuses  # type: ignore[method-assign]
    reply = answer_line(handler, b"action=Deploy:Core:syncpro&k=server\n", "control")
    assert reply.doc["code"] == "1"
    assert reply.error == "inventory unavailable"
    assert not reply.ok
    assert exit_code(reply.doc, reply.action) is ExitCode.USAGE


def test_a_line_that_cannot_be_parsed_is_answered_its_refusal_and_nothing_runs() -> None:
    handler = FakeHandler()
    reply = answer_line(handler, b"action=nope&token=s3cret\n", "control")
    assert handler.calls == []
    assert reply.action == "nope"
    assert reply.param["token"] == REDACTED
    assert reply.error is not None and "unknown action" in reply.error
    assert "s3cret" not in encode(reply.doc).decode()


def test_sprint_says_a_line_per_app_and_the_msg_on_stdout() -> None:
    doc = document(
        True,
        apps=[{"app_key": "s1", "program": {"status": "published"}, "config": None}],
        skipped=[{"app_key": "s2", "reason": "not auto-deploy"}],
        respon={"stdout": "", "stderr": ""},
    )
    out = with_stdout(doc)  # type: ignore[arg-type]
    assert out.get("print_stdout") == "1"
    stdout = json.loads(encode(out))["respon"]["stdout"]
    assert stdout == "s1: program published\ns2: skipped, not auto-deploy\n成功"


def test_encode_is_one_line_or_indented_and_says_when_it_cannot_encode() -> None:
    doc = {"code": "0", "msg": "成功"}
    assert encode(doc) == '{"code": "0", "msg": "成功"}\n'.encode()
    indented = json.dumps(doc, ensure_ascii=False, indent=2)
    assert encode(doc, pretty=True) == indented.encode() + b"\n"
    with structlog.testing.capture_logs() as logs:
        line = encode({"code": "0", "keys": {(1, 2): 3}})  # a tuple key: no JSON
    assert line.count(b"\n") == 1
    assert json.loads(line)["code"] == "500"
    assert [e["event"] for e in logs] == ["control.unencodable_document"]


def test_render_is_compact_for_a_pipe_and_indented_for_a_person() -> None:
    doc = {"code": "0", "data": {"msg": "成功"}}
    assert render(doc, pretty=False) == '{"code":"0","data":{"msg":"成功"}}'
    assert render(doc, pretty=True).splitlines()[1] == '  "code": "0",'
