"""The one contract between a control request and its answer, for the socket, HTTP and `ctl`.

A request line or body is parsed (`protocol`) into a ControlRequest; `dispatch()` runs it on
the ControlHandler and returns its answer; `exit_code()` says what the answer means (the exit
code of `ctl`, and whether the request succeeded for a log event); `encode()` and `render()`
write it, on the wire and for a person. Nothing else decides any of these.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NotRequired, Protocol, TypedDict, cast

from syncpro.control.protocol import (
    DIFF_ACTION,
    HEALTH_ACTION,
    NEEDS_K,
    STATUS_ACTION,
    ControlRequest,
    ProtocolError,
    parse_request,
    to_sync_request,
)
from syncpro.engine.request import CONFIG, PROGRAM, SYNC_ACTION, SyncRequest
from syncpro.engine.response import (
    Respon,
    ResponseDocument,
    RunDocument,
    refusal_document,
    text_safe,
)
from syncpro.errors import ExitCode, RequestError
from syncpro.log import logger  # not structlog's: `ctl` reads answers with this module


class Code(StrEnum):
    """An answer's `code`, a str as the original wrote it. HTTP answers a refusal of its own
    with its HTTP status as the code (404, 405, 413...)."""

    OK = "0"
    FAILURE = "1"  # a refused request, or a status, health or reload saying the daemon is unwell
    BAD_REQUEST = "400"
    FORBIDDEN = "403"  # a peer or token not allowed
    INTERNAL = "500"  # the handler raised, or its answer could not be encoded
    BUSY = "503"


# --- the daemon's answers to status, reload and health ---


class StatusAnswer(TypedDict):
    """`status`: the daemon's state; code "1" (msg naming them) when an app's last sync failed."""

    code: str
    msg: str
    version: str
    pid: int
    uptime: float
    config: str
    watched: dict[str, str]
    inventory: dict[str, Any]
    apps: dict[str, dict[str, Any] | None]  # per app_key, its last sync
    pending: list[Any]
    running: list[dict[str, Any]]
    retrying: list[dict[str, Any]]
    state: dict[str, Any]
    reload: dict[str, Any] | None
    last_reload_error: str | None
    ready: bool
    healthy: bool
    problems: list[str]
    param: NotRequired[dict[str, str]]
    ignored: NotRequired[list[str]]


class ReloadAnswer(TypedDict):
    """`reload`: code "0" when the new config is in use, "1" with the error when not."""

    code: str
    msg: str
    reload: dict[str, Any] | None
    param: NotRequired[dict[str, str]]
    ignored: NotRequired[list[str]]


class HealthAnswer(TypedDict):
    code: str
    msg: str
    ready: bool | None
    healthy: bool
    problems: list[str]
    param: NotRequired[dict[str, str]]
    ignored: NotRequired[list[str]]


Answer = ResponseDocument | StatusAnswer | ReloadAnswer | HealthAnswer
"""Any answer of the control plane: a sync's or diff's RunDocument (a ResponseDocument), a
refusal, or the daemon's status, reload and health answers."""


class ControlHandler(Protocol):
    """What the control socket and the HTTP endpoint drive: the daemon, or a test double."""

    def sync(self, request: SyncRequest) -> RunDocument: ...

    def diff(self, request: SyncRequest) -> RunDocument: ...

    def status(self) -> StatusAnswer: ...

    def reload(self) -> ReloadAnswer: ...

    def health(self) -> HealthAnswer: ...


# --- a request in, its answer out ---


def dispatch(handler: ControlHandler, req: ControlRequest, origin: str) -> Answer:
    """Given a parsed request, run it on the handler and return its answer, with the fields
    it ignored and, for `sprint`, its stdout. A handler that raises yields a refusal naming
    the error class; it never escapes."""
    doc = copy.copy(_run(handler, req, origin))  # the handler may keep its own
    doc["ignored"] = list(req.ignored)
    if req.sprint:
        doc = with_stdout(doc)
    return doc


def _run(handler: ControlHandler, req: ControlRequest, origin: str) -> Answer:
    doc: Answer
    try:
        if req.action == SYNC_ACTION:
            doc = handler.sync(to_sync_request(req, origin))
        elif req.action == DIFF_ACTION:
            doc = handler.diff(to_sync_request(req, origin))
        elif req.action == STATUS_ACTION:
            doc = handler.status()
        elif req.action == HEALTH_ACTION:
            doc = handler.health()
        else:
            doc = handler.reload()
    except RequestError as exc:
        return refusal_document(req.echo(), str(exc))
    except Exception as exc:
        logger().exception("control.handler_failed", action=req.action, error=type(exc).__name__)
        reason = f"internal error while running {req.action}: {type(exc).__name__}: {exc}"
        return refusal_document(req.echo(), reason, Code.INTERNAL)
    if not isinstance(doc, dict):  # a handler that broke its protocol: said, never raised
        reason = f"internal error: {req.action} answered {type(doc).__name__}, not a document"
        logger().error("control.handler_failed", action=req.action, error=reason)
        return refusal_document(req.echo(), reason, Code.INTERNAL)
    if "param" not in doc:
        doc = copy.copy(doc)
        doc["param"] = req.echo()
    return doc


def with_stdout(doc: Answer) -> Answer:
    """Given an answer, return it as the original answered `sprint`: print_stdout "1" and
    respon.stdout saying, a line per app, what each target became, then the msg."""
    view: Mapping[str, Any] = doc  # read as sent: any answer, whatever its kind
    lines: list[str] = []
    for app in view.get("apps") or ():
        if not isinstance(app, dict):
            continue  # status's apps are a mapping of last syncs, not outcomes
        parts = []
        for kind in (PROGRAM, CONFIG):
            target = app.get(kind)
            if isinstance(target, dict):
                parts.append(f"{kind} {target.get('status')}")
        lines.append(f"{app.get('app_key')}: {', '.join(parts) or 'nothing'}")
    for skipped in view.get("skipped") or ():
        if isinstance(skipped, dict):
            lines.append(f"{skipped.get('app_key')}: skipped, {skipped.get('reason')}")
    data = view.get("data")
    if isinstance(data, dict) and isinstance(data.get("msg"), str):
        lines.append(data["msg"])
    respon = view.get("respon")
    respon = dict(respon) if isinstance(respon, dict) else {}
    respon["stdout"] = "\n".join(lines)
    # A status or health answer has no respon of the original's: it gets one with stdout.
    return cast(Answer, {**view, "print_stdout": "1", "respon": cast(Respon, respon)})


@dataclass(frozen=True)
class Reply:
    """One request's answer and what its log event says of it: the action and fields as
    understood (a token only redacted), and the reason when it did not succeed."""

    doc: Answer
    action: str | None
    param: dict[str, str]
    error: str | None

    @property
    def ok(self) -> bool:
        return succeeded(self.doc, self.action)


def answer_line(handler: ControlHandler, line: bytes, origin: str) -> Reply:
    """Given one request line, parse it and run it on the handler; return its reply. A line
    that cannot be parsed is answered its refusal and nothing runs."""
    try:
        req = parse_request(line)
    except ProtocolError as exc:
        return Reply(exc.document(), exc.param.get("action"), exc.param, exc.reason)
    doc = dispatch(handler, req, origin)
    error = None if str(doc.get("code")) == Code.OK else message(doc)
    return Reply(doc, req.action, req.echo(), error)


def message(doc: Mapping[str, Any]) -> str | None:
    """Given an answer, return what it says: the original's data.msg, else its own msg."""
    data = doc.get("data")
    if isinstance(data, dict) and isinstance(data.get("msg"), str):
        return str(data["msg"])
    return str(doc.get("msg")) if doc.get("msg") is not None else None


# --- what an answer means: one mapping for the log events and `ctl`'s exit code ---


def exit_code(doc: Mapping[str, Any], action: str | None) -> ExitCode:
    """Given an answer (as built, or as `ctl` read it) and its action, return what `ctl`
    exits with, as `syncpro sync` does: USAGE when the request was refused, else OK when it
    fully succeeded, UNSUCCESSFUL when not."""
    if str(doc.get("code")) != Code.OK:
        # A refusal carries parseparameters; a status, health or reload that ran and
        # answers "1" says the daemon is unwell, which is not the caller's mistake.
        ran = action not in NEEDS_K and "parseparameters" not in doc
        return ExitCode.UNSUCCESSFUL if ran else ExitCode.USAGE
    if action not in NEEDS_K:
        return ExitCode.OK
    data = doc.get("data")
    inner = data.get("data") if isinstance(data, dict) else None
    ok = isinstance(inner, dict) and inner.get("0") == "1"
    return ExitCode.OK if ok else ExitCode.UNSUCCESSFUL


def succeeded(doc: Mapping[str, Any], action: str | None) -> bool:
    """Given an answer and its action, return whether the request ran and (for a sync or
    diff) every selected app succeeded."""
    return exit_code(doc, action) is ExitCode.OK


# --- writing an answer ---


def encode(doc: Mapping[str, Any], *, pretty: bool = False) -> bytes:
    """Return an answer as UTF-8 JSON and a newline: one line, or indented for `pretty`
    (values JSON cannot hold as their str). An answer that cannot be encoded at all becomes
    a one-line refusal saying so."""
    try:
        # text_safe: a lone surrogate (a file name's odd byte) would fail the UTF-8 encoding
        # after the request ran, and its client would get no answer at all.
        text = json.dumps(
            text_safe(doc), ensure_ascii=False, indent=2 if pretty else None, default=str
        )
    except (TypeError, ValueError) as exc:
        logger().error("control.unencodable_document", error=str(exc))
        reason = f"internal error: the answer could not be encoded: {exc}"
        text = json.dumps(refusal_document({}, reason, Code.INTERNAL), ensure_ascii=False)
    return text.encode("utf-8") + b"\n"


def render(doc: Mapping[str, Any], *, pretty: bool) -> str:
    """Return an answer as `ctl` and `syncpro sync` print it: indented for a person, else
    one compact line."""
    if pretty:
        return json.dumps(doc, ensure_ascii=False, indent=2)
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
