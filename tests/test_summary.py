"""The terminal summary of a sync: one short line per app and target, then a total."""

from __future__ import annotations

from typing import Any

from syncpro.engine.request import SyncRequest
from syncpro.engine.result import FAILED, PUBLISHED, AppOutcome, SyncResult, TargetOutcome
from syncpro.engine.tree import CopyStats
from syncpro.summary import human_bytes, summary_lines


def test_byte_counts_are_short_and_exact_below_a_kibibyte() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(2_200_000_000) == "2.0 GiB"


def target(kind: str, status: str = PUBLISHED, **fields: Any) -> TargetOutcome:
    return TargetOutcome(kind, f"/src/{kind}", f"/dst/{kind}", status, **fields)


def test_columns_line_up_and_each_target_says_what_happened() -> None:
    stats = CopyStats(files=12, copied=10, linked=2, bytes_copied=3 * 1024 * 1024)
    result = SyncResult(
        request=SyncRequest(k="server"),
        started=0.0,
        seconds=1.25,
        apps=[
            AppOutcome(
                "server1",
                "server",
                program=target("program", stats=stats, seconds=0.5),
                config=target("config", unchanged=True, stats=CopyStats(files=3), seconds=0.01),
            ),
            AppOutcome(
                "server10",
                "server",
                program=target("program", FAILED, error="cannot publish /dst: No space left"),
                config=target("config", "missing"),
            ),
        ],
        unknown=("sever1",),
    )

    lines = summary_lines(result, lambda token: " (did you mean server1?)")

    assert lines == [
        "server1   program  published  12 files, 10 copied, 2 linked, 3.0 MiB, 0.50 s",
        "server1   config   unchanged  3 files, 0.01 s",
        "server10  program  failed     cannot publish /dst: No space left",
        "server10  config   missing    source /src/config is missing",
        "sever1             unknown    no such app or group (did you mean server1?)",
        "unsuccessful: 2 apps, 4 targets, 2 failed, in 1.25 s",
    ]
