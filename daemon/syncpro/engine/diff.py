"""What a sync would change in each selected app's targets, computed without writing anything.

Per app and target the answer is the original's `differcount`, "total,changed,deleted,added",
and the relative paths in each class: `total` counts the entries the sync would publish,
`changed` those present in both trees that differ (type, size, mtime, mode, link target, and
the owner when running as root, since the sync keeps it then), `deleted` those only in the
target, `added` those only in the source. A directory's own mtime follows its children and is
not compared.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from syncpro.config.model import Config
from syncpro.engine.ignore import Ignore
from syncpro.engine.plan import ConfigPlan, ProgramPlan, config_plan, program_plans
from syncpro.engine.request import SyncRequest
from syncpro.engine.response import RunDocument, command_line, run_document, text_safe
from syncpro.engine.result import Status
from syncpro.engine.selection import select
from syncpro.engine.sync import ignore_for
from syncpro.engine.tree import ListedFileError, resolve_listed
from syncpro.engine.walk import Entry, plan_path, read_xattrs, same_entry
from syncpro.inventory.apps import Inventory

OK, MISSING, FAILED = Status.OK, Status.MISSING, Status.FAILED
_NOTHING = Ignore(())
DEFAULT_LIMIT = 1000


@dataclass
class TargetDiff:
    """The difference between what one target holds and what a sync would publish there."""

    kind: str  # "program" or "config"
    source: str
    target: str
    status: Status = OK
    total: int = 0
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    error: str | None = None
    winner: str | None = None

    @property
    def differcount(self) -> str:
        return f"{self.total},{len(self.changed)},{len(self.deleted)},{len(self.added)}"

    def as_dict(self, limit: int) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "status": str(self.status),
            "source": self.source,
            "target": self.target,
            "differcount": self.differcount,
        }
        truncated = False
        for name in ("changed", "deleted", "added"):
            paths: list[str] = getattr(self, name)
            doc[name] = paths[:limit]
            truncated = truncated or len(paths) > limit
        if truncated:
            doc["truncated"] = limit
        if self.error:
            doc["error"] = self.error
        if self.winner:
            doc["winner"] = self.winner
        return doc


def diff(
    request: SyncRequest, config: Config, inventory: Inventory, *, limit: int = DEFAULT_LIMIT
) -> RunDocument:
    """Given a sync request, the config and the inventory, return a response document whose
    `diff` key says, per selected app, what syncing it would change in its program and config
    targets. Nothing is written. `data.data["0"]` is "1" when every app could be compared in
    full (both sources present, listed config files valid) and no token of `k` is unknown; at
    most `limit` paths are listed per class (the counts stay exact)."""
    started, clock = time.time(), time.monotonic()
    selection = select(request.tokens, inventory)
    ignore = ignore_for(config)  # what a sync leaves out, the ready marker included
    owners = os.geteuid() == 0
    per_app: dict[str, dict[str, TargetDiff]] = {app.app_key: {} for app in selection.apps}
    missing_program: list[str] = []
    missing_config: list[str] = []

    for plan in program_plans(config.dirs, selection.apps, request.update):
        programs = _program_diffs(plan, ignore, owners)
        for app, _ in (*plan.missing, *plan.present):
            per_app[app.app_key]["program"] = programs[app.app_key]
            if programs[app.app_key].status == MISSING:
                _append_once(missing_program, programs[app.app_key].source)
    for app in selection.apps:
        found = _config_diff(config_plan(config.dirs, app, request.update), ignore, owners)
        per_app[app.app_key]["config"] = found
        if found.status == MISSING:
            missing_config.append(found.source)

    errors = [f"unknown key: {token}" for token in selection.unknown]
    if not selection.apps and not selection.unknown:
        errors.append("no app selected")
    for key, targets in per_app.items():
        for found in targets.values():
            if found.status == MISSING:
                errors.append(f"{key}: {found.kind} source {found.source} is missing")
            elif found.error:
                errors.append(f"{key}: {found.error}")
    doc = run_document(
        request,
        ok=not errors,
        errors=errors,
        missing_program=missing_program,
        missing_config=missing_config,
        seconds=time.monotonic() - clock,
        started=started,
        cmd=command_line(request, config.path, ("ctl", "diff")),
        unknown=selection.unknown,
    )
    # A group's members that are not auto-deployed, as a sync reports them.
    doc["skipped"] = [s.as_dict() for s in selection.skipped]
    doc["diff"] = {
        key: {kind: found.as_dict(limit) for kind, found in targets.items()}
        for key, targets in per_app.items()
    }
    return text_safe(doc)  # type: ignore[no-any-return]


def _append_once(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def _program_diffs(plan: ProgramPlan, ignore: Ignore, owners: bool) -> dict[str, TargetDiff]:
    """The group's program target receives the winner's source (the plan's rule); every app
    whose source exists is told that difference, the others that theirs is missing."""
    target = str(plan.target.path)
    found: dict[str, TargetDiff] = {
        app.app_key: TargetDiff("program", str(source), target, MISSING)
        for app, source in plan.missing
    }
    if plan.winner is None:
        return found
    winner, winner_source = plan.winner
    group_diff = TargetDiff("program", str(winner_source), target)
    _compare(group_diff, lambda: _listing(winner_source, ignore), owners)
    for app, source in plan.present:
        found[app.app_key] = replace(
            group_diff, source=str(source), winner=None if app is winner else winner.app_key
        )
    return found


def _config_diff(plan: ConfigPlan, ignore: Ignore, owners: bool) -> TargetDiff:
    found = TargetDiff("config", str(plan.source), str(plan.target.path))
    if not plan.exists:
        found.status = MISSING
        return found
    listed = plan.listed
    if listed is not None:
        _compare(found, lambda: _listed(plan.source, listed, ignore), owners)
    else:
        _compare(found, lambda: _listing(plan.source, ignore), owners)
    return found


def _differs(wanted: Entry | None, present: Entry | None, owners: bool) -> bool:
    if wanted is None or present is None:
        return True
    return not same_entry(
        wanted.st,
        wanted.link,
        wanted.xattrs,
        present.st,
        present.link,
        present.xattrs,
        owners=owners,
        dir_times=False,
    )


def _compare(
    found: TargetDiff, expected: Callable[[], dict[str, Entry | None]], owners: bool
) -> None:
    try:
        wanted = expected()
        present = _listing(Path(found.target), None) if os.path.isdir(found.target) else {}
    except ListedFileError as exc:
        found.status, found.error = FAILED, "; ".join(exc.problems)
        return
    except OSError as exc:
        found.status, found.error = FAILED, f"cannot compare {found.kind}: {exc}"
        return
    found.total = len(wanted)
    for rel in sorted(wanted.keys() | present.keys()):
        if rel not in present:
            found.added.append(rel)
        elif rel not in wanted:
            found.deleted.append(rel)
        elif _differs(wanted[rel], present[rel], owners):
            found.changed.append(rel)


def _listing(root: Path, ignore: Ignore | None, prefix: str = "") -> dict[str, Entry | None]:
    """Every entry under root by relative path, walked as a sync walks (by descriptors, never
    following links). Names the copy would leave out (ignore patterns; FIFOs, sockets and
    devices) are not listed for a source. A target is listed whole (ignore None): whatever
    lies there that the source lacks, the sync would delete, special files included (None)."""
    plan = plan_path(
        root, None, ignore or _NOTHING, owners=False, rel_prefix=prefix, every_xattr=True
    )
    found: dict[str, Entry | None] = {entry.rel: entry for entry in plan.entries}
    if ignore is None:
        found.update((rel, None) for rel, _ in plan.skipped)
    return found


def _listed(source: Path, entries: tuple[str, ...], ignore: Ignore) -> dict[str, Entry | None]:
    """What a type-2 config target would hold: the listed entries (links resolved, a listed
    directory whole) and the directories leading to them. Raise ListedFileError with every entry
    that is absolute, escapes the source or is missing, as the copy would."""
    real_root = os.path.realpath(source)
    chosen = resolve_listed(source, entries)
    found: dict[str, Entry | None] = {}
    # Shallow entries first, as the copy does: a listed directory is taken whole before any
    # listed file inside it.
    for norm, real in sorted(chosen, key=lambda item: item[0].count("/")):
        parts = norm.split("/")
        for depth in range(1, len(parts)):
            sub = "/".join(parts[:depth])
            if sub not in found:
                found[sub] = _resolved(sub, os.path.join(real_root, sub))
        if norm in found:
            continue
        st = os.stat(real)
        if stat.S_ISDIR(st.st_mode):
            found[norm] = _resolved(norm, real)
            found.update(_listing(Path(real), ignore, norm))
        elif stat.S_ISREG(st.st_mode):
            found[norm] = _resolved(norm, real)
    return found


def _resolved(rel: str, path: str) -> Entry:
    """A listed entry as the copy publishes it: its content, links followed."""
    real = os.path.realpath(path)
    return Entry(rel, os.path.basename(rel), rel.count("/"), os.stat(real), None, read_xattrs(real))
