"""Sync requests: the one shape every entry point turns its input into."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from syncpro.errors import RequestError

SYNC_ACTION = "Deploy:Core:syncpro"


class Kind(StrEnum):
    """Which target of an app: a str, so documents and logs carry the plain word."""

    PROGRAM = "program"  # the group's program tree in softdir
    CONFIG = "config"  # the app's own config tree in configuredir


class Mode(StrEnum):
    """Which source area a sync reads: the request's update=0 or update=1."""

    REMOTE = "remote"  # remotecomdir: what was downloaded from servers
    UPDATE = "update"  # updatedir: new builds

    @classmethod
    def of(cls, update: bool) -> Mode:
        return cls.UPDATE if update else cls.REMOTE


PROGRAM, CONFIG = Kind.PROGRAM, Kind.CONFIG
BOTH_PARTS = frozenset({PROGRAM, CONFIG})
_SEPARATORS = re.compile(r"[\s,]+")
_QUOTES = "'\""


@dataclass(frozen=True)
class Trigger:
    """Why an automatic run happened: the watcher or the catch-up, and the paths seen."""

    by: str  # "watcher", "catch-up", "rescan"
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class SyncRequest:
    """A request to sync the apps selected by `k` from one source area (update=0/1)."""

    k: str
    update: bool = False
    action: str = SYNC_ACTION
    w: str | None = None
    token_given: bool = False
    trigger: Trigger | None = None
    origin: str = "cli"  # cli, control, http, watcher
    extra: dict[str, str] = field(default_factory=dict)
    # Which targets of each app to sync. A manual or HTTP request syncs both, as the original
    # did; the watcher syncs only the part whose source changed.
    parts: frozenset[str] = BOTH_PARTS

    @property
    def tokens(self) -> tuple[str, ...]:
        return split_k(self.k)

    @property
    def mode(self) -> Mode:
        return Mode.of(self.update)

    @property
    def normalised_k(self) -> str:
        return " ".join(self.tokens)


def split_k(k: str) -> tuple[str, ...]:
    """Given a raw `k`, return its tokens: split on spaces/commas, quotes stripped, duplicates
    collapsed in order of first appearance."""
    tokens: list[str] = []
    for raw in _SEPARATORS.split(k.strip()):
        token = raw.strip(_QUOTES).strip()
        # A quoted list like "'server1 server2'" loses its quotes on its outer tokens only.
        if token and token not in tokens:
            tokens.append(token)
    return tuple(tokens)


def parse_update(value: str | bool | int | None) -> bool:
    """Given the `update` field as sent ("0", "1", quoted, absent), return it as a bool.
    Raise RequestError for anything else."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().strip(_QUOTES).strip()
    if text in ("", "0"):
        return False
    if text == "1":
        return True
    raise RequestError(f"update must be 0 or 1, not {value!r}")


def validate_k(k: str | None) -> str:
    """Given the raw `k`, return it. Raise RequestError when it is absent or selects nothing."""
    if k is None:
        raise RequestError("k is required: an app_key, a local_name or all")
    if not split_k(k):
        raise RequestError("k must not be empty: give an app_key, a local_name or all")
    return k
