"""The honest parts of the control answers: ISO times, last results, health, reload outcome."""

from __future__ import annotations

import time
from typing import Any, cast

from syncpro.control.dispatch import HealthAnswer, ReloadAnswer, StatusAnswer
from syncpro.daemon.monitor import problems
from syncpro.daemon.progress import RunningSyncs, iso
from syncpro.daemon.reloads import ReloadOutcome, Reloads


def completed_status(
    doc: dict[str, Any], *, ready: bool, running: RunningSyncs, reloads: Reloads
) -> StatusAnswer:
    """Given the daemon's raw status document, return it with wall-clock ISO 8601 times, the
    running syncs' progress, the last reload's outcome and its health; code "1" (msg naming
    them) when an app's last sync failed."""
    doc = dict(doc)
    apps: dict[str, Any] = {}
    for app_key, last in (doc.get("apps") or {}).items():
        if isinstance(last, dict) and isinstance(last.get("at"), int | float):
            last = {**last, "at": iso(last["at"])}
        apps[app_key] = last
    doc["apps"] = apps
    doc["running"] = _running(doc.get("running") or [], running)
    last_reload = reloads.last
    doc["reload"] = last_reload.as_dict() if last_reload is not None else None
    doc["last_reload_error"] = last_reload.error if last_reload is not None else None
    found = problems(doc)
    doc["ready"] = ready
    doc["healthy"] = ready and not found
    doc["problems"] = found if ready else ["not ready", *found]
    failed = sorted(k for k, v in apps.items() if isinstance(v, dict) and v.get("ok") is False)
    if failed:
        doc["code"] = "1"
        doc["msg"] = f"last sync failed: {', '.join(failed)}"
    return cast(StatusAnswer, doc)  # the raw document's keys and those added here


def _running(scheduled: list[Any], running: RunningSyncs) -> list[dict[str, Any]]:
    """The syncs under way with their progress, then the batches handed to a worker that
    have not begun syncing (their sources are being fingerprinted)."""
    syncs = running.snapshot()
    busy = {(tuple(s["app_keys"]), s["update"]) for s in syncs}
    wall_offset = time.time() - time.monotonic()
    for entry in scheduled:
        if not isinstance(entry, dict):
            continue
        key = (tuple(entry.get("app_keys") or ()), entry.get("update"))
        if key in busy:
            continue
        # The scheduler's own `started` (taken by a worker) and monotonic `since` become the
        # one wall-clock `started` every entry has; `syncing` tells the two kinds apart.
        waiting = {k: v for k, v in entry.items() if k not in ("since", "started")}
        if isinstance(entry.get("since"), int | float):
            waiting["started"] = iso(entry["since"] + wall_offset)
        waiting["syncing"] = False
        syncs.append(waiting)
    return syncs


def reload_answer(outcome: ReloadOutcome | None, waited: float) -> ReloadAnswer:
    """Given the outcome of the reload a client asked for (None: not over after `waited` s),
    return its answer: code "0" when the new config is in use, "1" with the error when the
    old one was kept or the reload did not end in time."""
    if outcome is None:
        return {
            "code": "1",
            "msg": f"reload still running after {waited:g} s: see ctl status for its outcome",
            "reload": None,
        }
    if outcome.pending:
        return {
            "code": "0",
            "msg": "reload applying: the control servers restart with the new config;"
            " ctl status tells its outcome",
            "reload": None,
        }
    if outcome.ok:
        return {"code": "0", "msg": "reloaded", "reload": outcome.as_dict()}
    return {
        "code": "1",
        "msg": f"reload failed, old config kept: {outcome.error}",
        "reload": outcome.as_dict(),
    }


def health_answer(status: StatusAnswer) -> HealthAnswer:
    """Given the completed status document, return the answer of the `health` action."""
    healthy = bool(status.get("healthy"))
    return {
        "code": "0" if healthy else "1",
        "msg": "healthy" if healthy else "; ".join(status.get("problems") or ["unhealthy"]),
        "ready": status.get("ready"),
        "healthy": healthy,
        "problems": status.get("problems") or [],
    }
