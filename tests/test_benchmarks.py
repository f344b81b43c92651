"""The benchmarks in scripts/ still run, on a tree small enough for the suite, and report the
figures their documents promise (their speed is not judged here: that is what they are for)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.daemon
ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, tmp_path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--json", "--dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def test_bench_sync_times_every_contender_and_verifies_the_trees(tmp_path: Path) -> None:
    doc = _run(
        "bench_sync.py", "--files", "40", "--size-mb", "0.2", "--runs", "1", tmp_path=tmp_path
    )

    assert doc["verified"] is True
    for case in ("full", "incremental", "nochange"):
        rows = doc["cases"][case]["rows"]
        for name in ("cli-fsync", "inproc-nofsync", "daemon-nofsync", "daemon-fsync"):
            assert rows[name]["wall_median"] > 0, (case, name)
            assert rows[name]["ratio_vs_baseline"] > 0, (case, name)
    incremental = doc["cases"]["incremental"]["rows"]
    assert incremental["inproc-nofsync"]["copied_median"] == 1
    # Every timed incremental run met the steady state it stands for: a spare to update.
    assert {name: row["no_spare_runs"] for name, row in incremental.items()} == {
        name: 0 for name in incremental
    }


def test_bench_scale_counts_syncs_overflows_and_restarts(tmp_path: Path) -> None:
    doc = _run(
        "bench_scale.py",
        *("--apps", "12", "--files", "6", "--rounds", "1", "--idle", "1"),
        *("--uploads", "1", "--changed", "4"),
        tmp_path=tmp_path,
    )

    assert doc["syncs_first_start"] == 12
    assert doc["syncs_for_changed_apps"] == 4
    assert doc["syncs_on_restart"] == 0
    assert doc["overflows"] == 0
    assert doc["catch_up_seconds"] > 0 and doc["cp_a_sync_f_seconds"] > 0
    assert doc["rss_mib"] > 0


def test_bench_daemon_times_uploads_idles_and_takes_in_a_big_upload(tmp_path: Path) -> None:
    doc = _run(
        "bench_daemon.py",
        *("--uploads", "2", "--files", "20", "--idle", "1", "--big-upload", "350"),
        # A quiet second and a half: a loaded machine's pause inside an upload is no new burst.
        *("--settle", "1.5"),
        tmp_path=tmp_path,
    )

    assert doc["syncs_per_upload"] == 1
    assert doc["latency"]["p50"] > -doc["settings"]["settle"]
    assert doc["idle"]["rss_kib"] > 0
    big = doc["big_upload"]
    # Every file of the upload reached the published tree (the script counts them) in one sync.
    assert (big["files"], big["syncs"], big["overflows"]) == (350, 1, 0)
    assert big["published_after_return_seconds"] > 0 and big["cpu_seconds"] > 0
