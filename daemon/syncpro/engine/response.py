"""The response document of the original platform (SPEC section 5), built from a result."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, NotRequired, TypedDict, TypeVar

from syncpro.engine.request import SyncRequest
from syncpro.engine.result import AppDocument, DriftDocument, SyncResult

OK_MSG = "成功"
FAIL_MSG = "失败"
PARSE_OK_MSG = "校验和解析参数成功"
RUN_DONE_MSG = "执行完成"
NOT_RUN_MSG = "未执行"
REDACTED = "******"

# The original's document, key for key (SPEC section 5); what clients of the original read.
# Its counters and flags are strings ("0", "1") as the original sent them.
Outcome = TypedDict("Outcome", {"0": str, "1": str, "2": str})
"""data.data: "0" is "1" when the run succeeded; "1" and "2" the missing program and config
sources, comma-separated."""


class Data(TypedDict):
    code: str
    data: Outcome
    msg: str


class ParseParameters(TypedDict):
    code: str
    msg: str
    precmd: str
    requestCmd: str


class Respon(TypedDict):
    chdir: str
    cmd: str
    code: str
    msg: str
    ret: str
    stderr: str
    stdout: str


class TriggerDocument(TypedDict):
    by: str
    paths: list[str]


class ResponseDocument(TypedDict):
    """The original's response document: a refusal is this alone."""

    code: str
    data: Data
    param: dict[str, str]
    parseparameters: ParseParameters
    print_stdout: str
    respon: Respon
    take: str
    ignored: NotRequired[list[str]]  # the request's unknown fields, added by dispatch


class RunDocument(ResponseDocument):
    """The document of a sync or diff that ran: the original's keys, then our extras (clients
    of the original ignore what they do not know)."""

    seconds: float
    started: float
    origin: str
    unknown: list[str]
    trigger: NotRequired[TriggerDocument]
    skipped: NotRequired[list[dict[str, str]]]
    drift: NotRequired[list[DriftDocument]]
    apps: NotRequired[list[AppDocument]]  # a sync's
    diff: NotRequired[dict[str, dict[str, dict[str, Any]]]]  # a diff's, per app and kind


D = TypeVar("D", ResponseDocument, RunDocument)


def text_safe(value: Any) -> Any:
    """Given a document (or any JSON-able value), return it with every string valid UTF-8.

    File names are bytes; Python hands the undecodable ones over as lone surrogates, which
    no UTF-8 stream can carry (a strict stdout raises, a lenient one writes invalid JSON).
    Such bytes are shown as `\\xff`, the way a shell would show them.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:
                return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:  # a surrogate that no file name gave us
                return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {text_safe(k): text_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [text_safe(v) for v in value]
    return value


def safe_document(doc: D) -> D:
    """Given a document, return it through text_safe: a file name's odd byte as `\\xff`."""
    return text_safe(doc)  # type: ignore[no-any-return]


def param_of(request: SyncRequest) -> dict[str, str]:
    """Echo the request with k normalised; a token only ever appears redacted."""
    param = {"action": request.action, "k": request.normalised_k, "update": _flag(request.update)}
    if request.w is not None:
        param["w"] = request.w
    if request.token_given:
        param["token"] = REDACTED
    param.update(request.extra)
    return param


def _flag(value: bool) -> str:
    return "1" if value else "0"


def request_cmd(param: dict[str, str]) -> str:
    """The original's requestCmd: `action,--key="value",...,--w="1"`. An update of "0" is the
    default the original left out (SPEC's example: `--k="server1 server2",--w="1"`)."""
    action = param.get("action", "")
    keys = [
        f'--{key}="{value}"'
        for key, value in param.items()
        if key not in ("action", "w") and not (key == "update" and value == "0")
    ]
    keys.append(f'--w="{param.get("w", "1")}"')
    return ",".join([action, *keys])


def command_line(
    request: SyncRequest, config: Path | None = None, words: tuple[str, ...] = ("sync",)
) -> str:
    """The equivalent command line of this project, for `respon.cmd`: run it anywhere and it
    does the same, so it names the config the run used."""
    parts = ["syncpro", *words]
    if config is not None:
        parts += ["--config", str(config)]
    parts += ["-k", request.normalised_k]
    if request.update:
        parts.append("--update")
    return shlex.join(parts)


def _message(ok: bool, errors: list[str], notes: list[str]) -> str:
    if not ok:
        return f"{FAIL_MSG}: " + "; ".join(errors)
    return f"{OK_MSG}: " + "; ".join(notes) if notes else OK_MSG


def run_document(
    request: SyncRequest,
    *,
    ok: bool,
    errors: list[str],
    missing_program: list[str],
    missing_config: list[str],
    seconds: float,
    started: float,
    cmd: str,
    unknown: tuple[str, ...],
    notes: list[str] | None = None,
) -> RunDocument:
    """Given what a run (a sync or a diff) found, return the original's response document
    with our extra keys; callers add their own details. `notes` are what a successful run
    still has to tell (entries left out): they follow the success message."""
    param = param_of(request)
    doc: RunDocument = {
        "code": "0",
        "data": {
            "code": "0" if ok else "1",
            "data": {
                "0": "1" if ok else "0",
                "1": ",".join(missing_program),
                "2": ",".join(missing_config),
            },
            "msg": _message(ok, errors, notes or []),
        },
        "param": param,
        "parseparameters": {
            "code": "0",
            "msg": PARSE_OK_MSG,
            "precmd": "",
            "requestCmd": request_cmd(param),
        },
        "print_stdout": "0",
        "respon": {
            "chdir": os.getcwd(),
            "cmd": cmd,
            "code": "1",
            "msg": RUN_DONE_MSG,
            "ret": "0" if ok else "1",
            "stderr": "\n".join(errors),
            "stdout": "",
        },
        "take": str(int(seconds)),  # whole seconds elapsed, as the original counted them
        # Extra keys: clients of the original ignore what they do not know.
        "seconds": round(seconds, 6),
        "started": started,
        "origin": request.origin,
        "unknown": list(unknown),
    }
    if request.trigger is not None:
        doc["trigger"] = {"by": request.trigger.by, "paths": list(request.trigger.paths)}
    return doc


def response_document(result: SyncResult) -> RunDocument:
    """Given a sync result, return the response document its clients expect, plus details."""
    doc = run_document(
        result.request,
        ok=result.ok,
        errors=result.errors,
        missing_program=result.missing_program,
        missing_config=result.missing_config,
        seconds=result.seconds,
        started=result.started,
        cmd=command_line(result.request, result.config_path),
        unknown=result.unknown,
        notes=result.notes,
    )
    doc["skipped"] = [s.as_dict() for s in result.skipped]
    doc["drift"] = [d.as_dict() for d in result.drift]
    doc["apps"] = [app.as_dict() for app in result.apps]
    return safe_document(doc)


def refusal_document(param: dict[str, str], reason: str, code: str = "1") -> ResponseDocument:
    """Given the request's fields (token already redacted) and why it was refused, return the
    response document of a request that could not be parsed or validated; nothing ran."""
    code = str(code)  # a plain str, never an enum's member, in the document and its logs
    param = dict(param)
    if "token" in param:
        param["token"] = REDACTED
    return {
        "code": code,
        "data": {"code": code, "data": {"0": "0", "1": "", "2": ""}, "msg": reason},
        "param": param,
        "parseparameters": {
            "code": code,
            "msg": reason,
            "precmd": "",
            "requestCmd": request_cmd(param) if param.get("action") else "",
        },
        "print_stdout": "0",
        "respon": {
            "chdir": os.getcwd(),
            "cmd": "",
            "code": "0",
            "msg": NOT_RUN_MSG,
            "ret": "",
            "stderr": "",
            "stdout": "",
        },
        "take": "0",
    }
