"""Parse one control request (form-encoded like the seed, or JSON) into a typed value."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from syncpro.engine.request import SYNC_ACTION, SyncRequest, split_k, validate_k
from syncpro.engine.response import REDACTED, ResponseDocument, refusal_document
from syncpro.errors import RequestError

DIFF_ACTION = "Deploy:Core:diff"
STATUS_ACTION = "status"
RELOAD_ACTION = "reload"
HEALTH_ACTION = "health"
ACTIONS = (SYNC_ACTION, DIFF_ACTION, STATUS_ACTION, RELOAD_ACTION, HEALTH_ACTION)
QUIET_ACTIONS = frozenset({STATUS_ACTION, HEALTH_ACTION})
"""Polled by monitors every few seconds: their requests are logged at debug."""
NEEDS_K = frozenset({SYNC_ACTION, DIFF_ACTION})

MAX_REQUEST = 64 * 1024
FIELDS = ("action", "k", "update", "w", "token", "pretty")
# Fields the original platform read and its clients still send: never refused (see
# ControlRequest). Any other name is ignored as the original did, and listed in the answer.
SWITCHES = ("debug", "sprint")
_FLAGS = ("update", "pretty")
_OFF = frozenset({"", "0", "false", "no", "off"})
_QUOTES = "'\""
# An echoed value is a hint for the operator, not a copy of whatever was sent.
_ECHO_LIMIT = 200


class ProtocolError(RequestError):
    """A control request could not be parsed or validated; nothing ran.

    `param` echoes the fields that were understood (a token only ever as REDACTED), so the
    caller can answer `refusal_document(error.param, error.reason)`.
    `ignored` names the unknown fields the request carried, for the answer's `ignored`.
    """

    def __init__(
        self,
        reason: str,
        param: dict[str, str] | None = None,
        ignored: tuple[str, ...] = (),
    ) -> None:
        self.reason = reason
        self.param = dict(param or {})
        self.ignored = ignored
        super().__init__(reason)

    def document(self, code: str = "1") -> ResponseDocument:
        """Return the refusal document answering the request: nothing ran."""
        doc = refusal_document(self.param, self.reason, code)
        doc["ignored"] = list(self.ignored)
        return doc


@dataclass(frozen=True)
class ControlRequest:
    """One understood request: which action, and the sync fields it carries.

    `debug` is accepted and changes nothing: every answer carries the per-app details the
    original printed with it. `sprint` ("print stdout") sets the answer's `print_stdout` to
    "1" and fills `respon.stdout` with a line per app. `ignored` names the other fields sent.
    """

    action: str
    k: str | None = None
    update: bool = False
    w: str | None = None
    token: str | None = field(default=None, repr=False, compare=False)
    pretty: bool = False
    debug: bool = False
    sprint: bool = False
    ignored: tuple[str, ...] = ()

    @property
    def token_given(self) -> bool:
        return self.token is not None

    @property
    def normalised_k(self) -> str | None:
        return None if self.k is None else " ".join(split_k(self.k))

    def echo(self) -> dict[str, str]:
        """Return the request as the response's `param`: k normalised, a token redacted."""
        param = {"action": self.action}
        if self.k is not None:
            param["k"] = self.normalised_k or ""
        if self.action in NEEDS_K:
            param["update"] = "1" if self.update else "0"
        if self.w is not None:
            param["w"] = self.w
        if self.token_given:
            param["token"] = REDACTED
        param.update(self.switches)
        return param

    @property
    def switches(self) -> dict[str, str]:
        """The original's debug and sprint fields that are on, as the answer echoes them."""
        return {name: "1" for name in SWITCHES if getattr(self, name)}


def parse_request(raw: bytes) -> ControlRequest:
    """Given one request line (its trailing newline optional), return the request it makes.
    Raise ProtocolError saying why when it is too large, not UTF-8, empty, neither a form nor
    a JSON object, repeats or misses a field, names an unknown action, or carries a `k` or
    `update` the action cannot run with. Unknown fields are ignored and listed in `ignored`."""
    return request_of(request_pairs(raw))


def request_pairs(raw: bytes) -> list[tuple[str, Any]]:
    """Given one request line (form-encoded or a JSON object), return its (name, value)
    fields as sent, JSON values as JSON gave them. Raise ProtocolError when it is too large,
    not UTF-8, neither a form nor a JSON object. A blank line has no fields."""
    if len(raw) > MAX_REQUEST + 2:
        raise ProtocolError(f"request over {MAX_REQUEST // 1024} KiB ({len(raw)} bytes)")
    line = raw[:-1] if raw.endswith(b"\n") else raw
    line = line[:-1] if line.endswith(b"\r") else line
    if len(line) > MAX_REQUEST:
        raise ProtocolError(f"request over {MAX_REQUEST // 1024} KiB ({len(line)} bytes)")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"request is not valid UTF-8 (byte {exc.start})") from None
    text = text.strip()
    if not text:
        return []
    return _json_pairs(text) if _looks_like_json(text) else _form_pairs(text)


def _looks_like_json(text: str) -> bool:
    if text[0] in '{["':
        return True
    if "=" in text:
        return False
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True  # a bare number or constant: JSON, but not an object


def _json_pairs(text: str) -> list[tuple[str, Any]]:
    try:
        document = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_not_json)
    except RecursionError:
        raise ProtocolError("request is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise ProtocolError(f"request is not valid JSON: {exc}") from None
    if not isinstance(document, _Pairs):
        kind = "array" if isinstance(document, list) else type(document).__name__
        raise ProtocolError(f"a JSON request must be an object of fields, not {kind}")
    if _has_lone_surrogate(document):
        # "\ud800" is valid JSON but no text: it names no app, and no answer could carry it.
        raise ProtocolError("request is not valid UTF-8: a \\uD8xx-\\uDFxx escape stands alone")
    return list(document)


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, list | tuple):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _not_json(constant: str) -> Any:
    # Python's json reads NaN and Infinity; JSON has neither, and no field means them.
    raise ValueError(f"{constant} is not a JSON value")


class _Pairs(list[tuple[str, Any]]):
    """A JSON object kept as its (key, value) pairs, so a repeated key can be refused."""


def _form_pairs(text: str) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = []
    for number, piece in enumerate(text.split("&"), 1):
        if not piece:
            continue  # a stray '&' (trailing or doubled) carries nothing
        name, sep, value = piece.partition("=")
        if not sep or not name:
            # Not quoted back: an unparsed piece may be anything, a token included.
            raise ProtocolError(
                f"request is neither form-encoded (action=...&k=...) nor a JSON object:"
                f" its piece {number} between '&'s is not a name=value field"
            )
        try:
            pairs.append(
                (unquote_plus(name, errors="strict"), unquote_plus(value, errors="strict"))
            )
        except UnicodeDecodeError:
            raise ProtocolError("request is not valid UTF-8 once %XX-decoded") from None
    return pairs


def request_of(pairs: list[tuple[str, Any]]) -> ControlRequest:
    """Given a request's (name, value) fields as sent (a form's, a JSON object's or a
    multipart body's), return the request they make; fields other than the known ones and
    the original's debug and sprint are ignored and named in `ignored`. Raise ProtocolError
    saying why when there are none, one is repeated, or the action cannot run with them."""
    fields: dict[str, Any] = {}
    echo: dict[str, str] = {}
    problems: list[str] = []
    ignored: list[str] = []
    for name, value in pairs:
        shown = _shorten(name)
        if name not in FIELDS and name not in SWITCHES:
            if shown not in ignored:
                ignored.append(shown)
            continue
        if name in fields and name not in SWITCHES:  # the original's switches: never refused
            problems.append(f"field {shown!r} is given more than once")
            continue
        fields[name] = value
        if name not in SWITCHES:
            echo[shown] = REDACTED if name == "token" else _shorten(_text(value))
    if not pairs:
        problems.append("empty request: send action=Deploy:Core:syncpro&k=... or JSON")
    if problems:
        raise ProtocolError("; ".join(problems), echo, tuple(ignored))
    try:
        req = _validate(fields, echo)
    except ProtocolError as exc:
        exc.ignored = tuple(ignored)
        raise
    return dataclasses.replace(req, ignored=tuple(ignored))


def _validate(fields: dict[str, Any], echo: dict[str, str]) -> ControlRequest:
    values = {name: _field_text(name, fields.get(name), echo) for name in FIELDS}

    action = values["action"]
    if not action:
        known = ", ".join(ACTIONS)
        what = "missing" if action is None else "empty"
        raise ProtocolError(f"action is {what}: give one of {known}", echo)
    if action not in ACTIONS:
        known = ", ".join(ACTIONS)
        raise ProtocolError(f"unknown action {_shorten(action)!r} (known: {known})", echo)
    update, pretty = (_flag(name, values[name], echo) for name in ("update", "pretty"))
    k = values["k"]
    if action in NEEDS_K:
        try:
            validate_k(k)
        except RequestError as exc:
            raise ProtocolError(str(exc), echo) from None
    return ControlRequest(
        action=action,
        k=k,
        update=update,
        w=values["w"],
        token=values["token"],
        pretty=pretty,
        debug=_switch(fields.get("debug")),
        sprint=_switch(fields.get("sprint")),
    )


def _switch(value: Any) -> bool:
    # The original read these loosely, and a client that sends them must never be refused.
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return unquote(value).lower() not in _OFF
    if isinstance(value, int | float):
        return value != 0
    return True


def _field_text(name: str, value: Any, echo: dict[str, str]) -> str | None:
    """Given a field as sent (a form's text, or any JSON value), return it as the form's text
    would be. Raise ProtocolError if JSON gave a kind of value the field cannot be."""
    if value is None:
        return None  # absent, or JSON null: the same
    if isinstance(value, str):
        return unquote(value)
    if name in _FLAGS:
        # bool before int: True is an int too, and JSON's true means 1 here.
        if isinstance(value, bool):
            return "1" if value else "0"
        if type(value) is int and value in (0, 1):
            return str(value)
        raise ProtocolError(
            f"{name} must be 0 or 1 (a string, a number or a boolean), not {_text(value)}", echo
        )
    if name == "w":
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return json.dumps(value)
        raise ProtocolError(f"w must be a string or a finite number, not {_text(value)}", echo)
    raise ProtocolError(f"{name} must be a string, not {_text(value)}", echo)


def _flag(name: str, value: str | None, echo: dict[str, str]) -> bool:
    # One pair of quotes is the seed's style (update='1'); a stray or doubled quote is a
    # mangled request, and guessing what it meant could sync the wrong area.
    if value in (None, "", "0"):
        return False
    if value == "1":
        return True
    raise ProtocolError(f"{name} must be 0 or 1, not {echo.get(name)!r}", echo)


def unquote(value: str) -> str:
    """Given a field's text, return it without surrounding blanks and one pair of quotes, as
    the seed writes its values (k='server')."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in _QUOTES:
        return value[1:-1].strip()
    return value


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, _Pairs):
        return "{...}"
    if isinstance(value, list):
        return "[...]"
    return json.dumps(value)


def _shorten(text: str) -> str:
    return text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + "…"


def to_sync_request(req: ControlRequest, origin: str) -> SyncRequest:
    """Given a sync or diff request, return the engine's SyncRequest, marked with its origin
    (control, http). Raise ProtocolError if the request carries no `k` (status, reload)."""
    if req.k is None:
        raise ProtocolError(f"{req.action} takes no k: it is not a sync", req.echo())
    return SyncRequest(
        k=req.k,
        update=req.update,
        action=req.action,
        w=req.w,
        token_given=req.token_given,
        origin=origin,
        extra=req.switches,
    )
