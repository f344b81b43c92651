"""A sync result for people at a terminal: one short line per app and target, then a total."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from syncpro.engine.result import (
    FAILED,
    MISSING,
    PUBLISHED,
    SUPERSEDED,
    AppOutcome,
    SyncResult,
    TargetOutcome,
)

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(count: int) -> str:
    """Given a number of bytes, return it short: 512 B, 3.4 MiB."""
    size = float(count)
    for unit in UNITS:
        if size < 1024 or unit == UNITS[-1]:
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


UNCHANGED = "unchanged"
"""A published target whose tree already equalled the source: its Status is PUBLISHED."""


def target_state(outcome: TargetOutcome) -> str:
    """Given a target's outcome, return its one word: its Status (published, superseded,
    missing, failed), or unchanged for a published tree left as it was."""
    if outcome.status == PUBLISHED and outcome.unchanged:
        return UNCHANGED
    return str(outcome.status)


def _detail(outcome: TargetOutcome) -> str:
    if outcome.status == MISSING:
        return f"source {outcome.source} is missing"
    if outcome.status == FAILED:
        return outcome.error or "failed"
    if outcome.status == SUPERSEDED:
        return f"the group's program came from {outcome.winner}"
    stats = outcome.stats
    if stats is None:
        return f"{outcome.seconds:.2f} s"
    parts = [f"{stats.files} file{'' if stats.files == 1 else 's'}"]
    if not outcome.unchanged:
        parts.append(f"{stats.copied} copied, {stats.linked} linked")
        parts.append(human_bytes(stats.bytes_copied))
    parts.append(f"{outcome.seconds:.2f} s")
    return ", ".join(parts)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _targets(app: AppOutcome) -> Iterator[TargetOutcome]:
    yield from (t for t in (app.program, app.config) if t is not None)


def summary_lines(result: SyncResult, hint: Callable[[str], str] = lambda _token: "") -> list[str]:
    """Given a sync result, return the lines to show: `app  kind  state  detail` per target, one
    per unknown token (with `hint(token)` after it), and a closing total."""
    rows: list[tuple[str, str, str, str]] = []
    for app in result.apps:
        rows.extend(
            (app.app_key, target.kind, target_state(target), _detail(target))
            for target in _targets(app)
        )
    rows.extend(
        (token, "", "unknown", f"no such app or group{hint(token)}") for token in result.unknown
    )
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        + f"  {row[3]}"
        for row in rows
    ]
    states = [target_state(t) for app in result.apps for t in _targets(app)]
    failed = sum(state in (FAILED, MISSING) for state in states)
    verdict = "ok" if result.ok else "unsuccessful"
    lines.append(
        f"{verdict}: {_count(len(result.apps), 'app')}, {_count(len(states), 'target')},"
        f" {failed} failed, in {result.seconds:.2f} s"
    )
    return [line.rstrip() for line in lines]
