"""A second, plain reading of SPEC section 6's request line, to judge the parser's answers by.

It is written from the rules, not from the parser: a line is valid when it is UTF-8 of at most
64 KiB, a JSON object or a form whose known fields are each given once, with a known action, a
`k` selecting something when the action syncs, and flags that are 0 or 1. The original's
`debug` and `sprint` take any value (off only when empty, 0, false, no or off); any other
field is ignored and named.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import unquote_plus

ACTIONS = ("Deploy:Core:syncpro", "Deploy:Core:diff", "status", "reload", "health")
NEEDS_K = ("Deploy:Core:syncpro", "Deploy:Core:diff")
FIELDS = ("action", "k", "update", "w", "token", "pretty")
SWITCHES = ("debug", "sprint")
LIMIT = 64 * 1024


class _Object(list[tuple[str, Any]]):
    pass


def reading(raw: bytes) -> dict[str, Any] | None:
    """Given one request line, return what it asks (action, k normalised, update, w, whether a
    token came, pretty, debug, sprint, the ignored names), or None when it is not valid."""
    line = raw.removesuffix(b"\n").removesuffix(b"\r")
    if len(line) > LIMIT:
        return None
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    pairs = _json(text) if text.startswith("{") else _form(text)
    if pairs is None:
        return None
    if not pairs:
        return None
    ignored = [name for name, _ in pairs if name not in FIELDS + SWITCHES]
    pairs = [(name, value) for name, value in pairs if name in FIELDS + SWITCHES]
    names = [name for name, _ in pairs if name in FIELDS]
    if len(set(names)) != len(names):
        return None
    switches = {name: _on(value) for name, value in pairs if name in SWITCHES}  # the last wins
    pairs = [(name, value) for name, value in pairs if name in FIELDS]
    fields = {name: _value(name, value) for name, value in pairs if value is not None}
    if any(value is None for value in fields.values()):
        return None
    action = fields.get("action")
    if action not in ACTIONS:
        return None
    flags = {}
    for name in ("update", "pretty"):
        if fields.get(name, "") not in ("", "0", "1"):
            return None
        flags[name] = fields.get(name) == "1"
    k = fields.get("k")
    normalised = None if k is None else _normalised(k)
    if action in NEEDS_K and not normalised:
        return None
    return {
        "action": action,
        "k": normalised,
        "update": flags["update"],
        "w": fields.get("w"),
        "token": "token" in fields,
        "pretty": flags["pretty"],
        "debug": switches.get("debug", False),
        "sprint": switches.get("sprint", False),
        "ignored": list(dict.fromkeys(n if len(n) <= 200 else n[:200] + "…" for n in ignored)),
    }


def _on(value: Any) -> bool:
    if isinstance(value, str):
        text = value.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1].strip()
        return text.lower() not in ("", "0", "false", "no", "off")
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int | float):
        return value != 0
    return True


def _json(text: str) -> list[tuple[str, Any]] | None:
    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    try:
        doc = json.loads(text, object_pairs_hook=_Object, parse_constant=refuse)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, _Object):
        return None
    if any("\ud800" <= c <= "\udfff" for c in json.dumps(doc, ensure_ascii=False)):
        return None  # a lone surrogate escape is no text: nothing valid holds one
    return list(doc)


def _form(text: str) -> list[tuple[str, Any]] | None:
    pairs: list[tuple[str, Any]] = []
    for piece in text.split("&"):
        if not piece:
            continue
        name, sep, value = piece.partition("=")
        if not sep or not name:
            return None
        try:
            pairs.append(
                (unquote_plus(name, errors="strict"), unquote_plus(value, errors="strict"))
            )
        except UnicodeDecodeError:
            return None
    return pairs or None


def _value(name: str, value: Any) -> str | None:
    """A field's text as a form would carry it, or None if JSON gave a kind it cannot be."""
    if isinstance(value, str):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1].strip()
        return value
    if name in ("update", "pretty"):
        if isinstance(value, bool):
            return "1" if value else "0"
        return str(value) if type(value) is int and value in (0, 1) else None
    if name == "w" and type(value) in (int, float) and math.isfinite(value):
        return json.dumps(value)
    return None


def _normalised(k: str) -> str:
    tokens = (t.strip("'\"").strip() for t in re.split(r"[\s,]+", k.strip()))
    return " ".join(dict.fromkeys(t for t in tokens if t))
