"""Every log event the code emits is in the catalogue (docs/log-events.md), with its level,
and every catalogued event is still emitted: operators filter and alert on these names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "daemon" / "syncpro"
CATALOGUE = REPO / "docs" / "log-events.md"
LEVELS = ("debug", "info", "warning", "error", "exception", "critical")


def emitted() -> dict[str, set[str]]:
    """Event name -> the levels it is logged at, from every `log.<level>("event", ...)` call
    (or `emit = log.info if ... else log.warning` pairs) in the package."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        chosen: dict[str, set[str]] = {}  # name bound to log.<level> (or a choice of two)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                levels = _levels_of(node.value)
                if isinstance(target, ast.Name) and levels:
                    chosen[target.id] = levels
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            levels = _levels_of(node.func)
            if not levels and isinstance(node.func, ast.Name):
                levels = chosen.get(node.func.id, set())
            if levels and re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", first.value):
                found.setdefault(first.value, set()).update(levels)
    return found


def _levels_of(node: ast.expr) -> set[str]:
    if isinstance(node, ast.IfExp):
        return _levels_of(node.body) | _levels_of(node.orelse)
    if not (isinstance(node, ast.Attribute) and node.attr in LEVELS):
        return set()
    base = node.value
    if isinstance(base, ast.Name) and base.id in ("log", "logger"):
        return {node.attr}
    if (  # structlog.get_logger().warning(...)
        isinstance(base, ast.Call)
        and isinstance(base.func, ast.Attribute)
        and base.func.attr == "get_logger"
    ):
        return {node.attr}
    if (  # syncpro.log.logger().warning(...), structlog imported when first logged with
        isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "logger"
    ):
        return {node.attr}
    return set()


def catalogued() -> dict[str, set[str]]:
    """Event name -> levels, from the catalogue's table rows: | `event` | level, level | ..."""
    found: dict[str, set[str]] = {}
    for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*`([a-z_.]+)`\s*\|\s*([a-z, ]+?)\s*\|", line)
        if match:
            found[match.group(1)] = {lvl.strip() for lvl in match.group(2).split(",")}
    return found


def test_every_emitted_event_is_catalogued_with_its_levels() -> None:
    code, docs = emitted(), catalogued()
    assert len(code) > 40, "the scan found too few events: is it still reading the package?"
    missing = sorted(set(code) - set(docs))
    assert missing == [], "add these events to docs/log-events.md"
    wrong = {e: sorted(code[e]) for e in code if code[e] != docs[e]}
    assert wrong == {}, "fix the levels of these events in docs/log-events.md"


def test_every_catalogued_event_is_still_emitted() -> None:
    stale = sorted(set(catalogued()) - set(emitted()))
    assert stale == [], "remove these events from docs/log-events.md"


def test_one_key_names_one_concept() -> None:
    # `app=` and `app_key=` once named the same thing; the catalogue's word is app_key.
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            is_log = isinstance(node, ast.Call) and _levels_of(node.func)
            if is_log and any(k.arg == "app" for k in node.keywords):  # type: ignore[union-attr]
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], "log the app as app_key="
