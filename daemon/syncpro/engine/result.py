"""What a sync did: per target, per app, and for the whole request."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, NotRequired, TypedDict, cast

from syncpro.engine.request import SyncRequest
from syncpro.engine.selection import Skipped

if TYPE_CHECKING:  # the tree builder and what it imports are not needed to read a result
    from syncpro.engine.tree import CopyStats


class Status(StrEnum):
    """What became of one target. A str: documents and logs carry the plain word."""

    OK = "ok"  # a diff could compare it
    PUBLISHED = "published"
    SUPERSEDED = "superseded"  # a program another app of the group supplied
    MISSING = "missing"  # its source folder does not exist
    FAILED = "failed"


PUBLISHED, MISSING, FAILED, SUPERSEDED = (
    Status.PUBLISHED,
    Status.MISSING,
    Status.FAILED,
    Status.SUPERSEDED,
)


class TargetDocument(TypedDict):
    """A target in a response document's `apps`: what became of it, then its copy counts."""

    status: str
    source: str
    target: str
    error: NotRequired[str]
    winner: NotRequired[str]
    unchanged: NotRequired[bool]
    # CopyStats.as_dict(), when the tree was built or compared:
    files: NotRequired[int]
    dirs: NotRequired[int]
    symlinks: NotRequired[int]
    copied: NotRequired[int]
    linked: NotRequired[int]
    bytes_copied: NotRequired[int]
    skipped: NotRequired[list[str]]
    hardlinks: NotRequired[int]
    not_kept: NotRequired[list[str]]
    seconds: NotRequired[float]


class AppDocument(TypedDict):
    app_key: str
    local_name: str
    ok: bool
    program: TargetDocument | None
    config: TargetDocument | None


class DriftDocument(TypedDict):
    group: str
    apps: list[str]
    count: int
    paths: list[str]


@dataclass
class TargetOutcome:
    """One program or config target of one app."""

    kind: str  # a Kind: "program" or "config"
    source: str
    target: str
    status: Status
    error: str | None = None
    stats: CopyStats | None = None
    seconds: float = 0.0
    winner: str | None = None  # for a superseded program: the app whose tree was published
    unchanged: bool = False  # the published tree already equalled the source: left as it was
    # The walk's digest and newest ctime of the source, when it was walked whole.
    digest: tuple[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.status in (PUBLISHED, SUPERSEDED)

    def as_dict(self) -> TargetDocument:
        doc: TargetDocument = {
            "status": str(self.status),
            "source": self.source,
            "target": self.target,
        }
        if self.error:
            doc["error"] = self.error
        if self.winner:
            doc["winner"] = self.winner
        if self.unchanged:
            doc["unchanged"] = True
        if self.stats is not None:
            # The stats' own keys, in their order: CopyStats says which they are.
            doc.update(cast(TargetDocument, self.stats.as_dict()))
            doc["seconds"] = round(self.seconds, 6)
        return doc


@dataclass
class AppOutcome:
    app_key: str
    local_name: str
    program: TargetOutcome | None = None
    config: TargetOutcome | None = None

    @property
    def ok(self) -> bool:
        """Every target that was synced is fine; a part the request left out (None) is not
        judged, but at least one part was synced."""
        synced = [t for t in (self.program, self.config) if t is not None]
        return bool(synced) and all(t.ok for t in synced)

    @property
    def errors(self) -> list[str]:
        found: list[str] = []
        for outcome in (self.program, self.config):
            if outcome is None:
                continue
            if outcome.status == MISSING:
                found.append(f"{self.app_key}: {outcome.kind} source {outcome.source} is missing")
            elif outcome.error:
                found.append(f"{self.app_key}: {outcome.error}")
        return found

    def as_dict(self) -> AppDocument:
        return {
            "app_key": self.app_key,
            "local_name": self.local_name,
            "ok": self.ok,
            "program": self.program.as_dict() if self.program else None,
            "config": self.config.as_dict() if self.config else None,
        }


@dataclass(frozen=True)
class Drift:
    """The program trees of two apps of one group differ."""

    group: str
    apps: tuple[str, str]
    count: int
    paths: tuple[str, ...]

    def as_dict(self) -> DriftDocument:
        return {
            "group": self.group,
            "apps": list(self.apps),
            "count": self.count,
            "paths": list(self.paths),
        }


@dataclass
class SyncResult:
    request: SyncRequest
    started: float
    seconds: float = 0.0
    apps: list[AppOutcome] = field(default_factory=list)
    unknown: tuple[str, ...] = ()
    skipped: tuple[Skipped, ...] = ()  # members of selected groups not synced: not failures
    drift: list[Drift] = field(default_factory=list)
    missing_program: list[str] = field(default_factory=list)
    missing_config: list[str] = field(default_factory=list)
    config_path: Path | None = None  # the config the run used, for its command line
    # Source folder -> (digest, newest ctime) of every source the sync walked whole: what the
    # daemon records as published without walking them again.
    digests: dict[str, tuple[str, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.unknown and bool(self.apps) and all(app.ok for app in self.apps)

    @property
    def notes(self) -> list[str]:
        """What was left out of targets that were published: special files never copied,
        attributes the target filesystem could not hold."""
        found: list[str] = []
        for app in self.apps:
            for outcome in (app.program, app.config):
                stats = outcome.stats if outcome is not None else None
                if outcome is None or stats is None:
                    continue
                where = f"{app.app_key}: {outcome.kind}"
                if stats.skipped:
                    found.append(f"{where} left out special files {', '.join(stats.skipped)}")
                if stats.not_kept:
                    found.append(f"{where} could not keep {'; '.join(stats.not_kept)}")
        return found

    @property
    def errors(self) -> list[str]:
        found = [f"unknown key: {token}" for token in self.unknown]
        if not self.apps and not self.unknown:
            found.append("no app selected")
        for app in self.apps:
            found.extend(app.errors)
        return found
