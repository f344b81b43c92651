"""The daemon's Prometheus registry: its own per daemon, counting what it is told."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from syncpro.daemon.metrics import Metrics
from syncpro.engine.request import SyncRequest
from syncpro.engine.result import FAILED, PUBLISHED, AppOutcome, SyncResult, TargetOutcome
from syncpro.engine.tree import CopyStats


def scraped(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def outcome(app_key: str, ok: bool, copied: int = 0, linked: int = 0) -> AppOutcome:
    stats = CopyStats(files=copied + linked, copied=copied, linked=linked, bytes_copied=copied * 10)
    status = PUBLISHED if ok else FAILED
    program = TargetOutcome("program", "/s", "/t", status, stats=stats)
    config = TargetOutcome("config", "/s", "/t", PUBLISHED)
    return AppOutcome(app_key, "group", program, config)


def test_two_daemons_in_one_process_count_apart() -> None:
    first, second = Metrics(), Metrics()
    first.rescan_requested("overflow")

    assert scraped(first)[("syncpro_watch_overflows_total", ())] == 1
    assert scraped(second)[("syncpro_watch_overflows_total", ())] == 0


def test_a_sync_counts_per_app_mode_origin_and_outcome_and_its_files() -> None:
    metrics = Metrics()
    result = SyncResult(SyncRequest(k="a b", update=True, origin="http"), started=0.0)
    result.apps = [outcome("a", True, copied=3, linked=2), outcome("b", False, copied=1)]

    metrics.sync_finished(result, 1.5)
    found = scraped(metrics)

    labels = (("app", "a"), ("mode", "update"), ("origin", "http"), ("outcome", "ok"))
    assert found[("syncpro_syncs_total", labels)] == 1
    failed = (("app", "b"), ("mode", "update"), ("origin", "http"), ("outcome", "failed"))
    assert found[("syncpro_syncs_total", failed)] == 1
    assert found[("syncpro_files_total", (("how", "copied"),))] == 4
    assert found[("syncpro_files_total", (("how", "linked"),))] == 2
    assert found[("syncpro_bytes_total", (("how", "copied"),))] == 40
    assert found[("syncpro_sync_duration_seconds_sum", (("origin", "http"),))] == 1.5
    assert found[("syncpro_app_last_sync_failed", (("app", "b"),))] == 1
    assert found[("syncpro_last_success_timestamp_seconds", (("app", "a"),))] > 0
    assert ("syncpro_last_success_timestamp_seconds", (("app", "b"),)) not in found


def test_watcher_trouble_and_inventory_reads_are_counted() -> None:
    metrics = Metrics()
    for reason in ("overflow", "overflow", "watcher_error", "rescan"):
        metrics.rescan_requested(reason)
    metrics.inventory_read(None, "database away")
    metrics.inventory_read(7, None)
    found = scraped(metrics)

    assert found[("syncpro_watch_overflows_total", ())] == 2
    assert found[("syncpro_watch_trouble_total", (("reason", "watcher_error"),))] == 1
    assert found[("syncpro_rescans_total", (("reason", "rescan"),))] == 1
    assert found[("syncpro_inventory_errors_total", ())] == 1
    assert found[("syncpro_inventory_apps", ())] == 7
    assert found[("syncpro_inventory_last_refresh_timestamp_seconds", ())] > 0


def test_queue_and_health_gauges_are_read_at_each_scrape(tmp_path: Path) -> None:
    metrics = Metrics()
    counts = [(3, 1)]
    healthy = [True]
    metrics.watch_scheduler(lambda: counts[0])
    metrics.watch_health(lambda: True, lambda: healthy[0])
    assert scraped(metrics)[("syncpro_pending", ())] == 3
    assert scraped(metrics)[("syncpro_healthy", ())] == 1

    counts[0], healthy[0] = (0, 2), False
    found = scraped(metrics)
    assert (found[("syncpro_pending", ())], found[("syncpro_running", ())]) == (0, 2)
    assert found[("syncpro_healthy", ())] == 0
