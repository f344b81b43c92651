"""The move-pairing queue between watchdog's inotify reader and its emitter: the same events in
the same order as watchdog's own, at a constant cost per event."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, WatchDescriptor
from watchdog.observers.inotify_move_event_grouper import (
    GroupedInotifyEvent,
    InotifyMoveEventGrouper,
    PathedInotifyEvent,
)

from syncpro.config.model import DEFAULT_IGNORE
from syncpro.daemon import movepairs
from syncpro.daemon.watch import Watcher
from syncpro.engine.tree import Ignore

from helpers import wait_until

WAIT = 10.0
MASKS = {
    "C": InotifyConstants.IN_CREATE,
    "M": InotifyConstants.IN_MODIFY,
    "F": InotifyConstants.IN_MOVED_FROM,
    "T": InotifyConstants.IN_MOVED_TO,
}


class _Stock(InotifyMoveEventGrouper):
    delay = 0.001  # its queue takes the delay when made


class _Ours(movepairs.PairingQueue):
    delay = 0.001


def _event(kind: str, cookie: int, n: int) -> PathedInotifyEvent:
    name = f"{kind}{n}".encode()
    return PathedInotifyEvent(
        InotifyEvent(WatchDescriptor(1), MASKS[kind], cookie, name), b"/w/" + name
    )


def _script(tokens: Sequence[str]) -> list[PathedInotifyEvent]:
    """Events for tokens as inotify would send them: each F a rename's first half with a
    cookie of its own, each T the second half of the oldest open F (or of a rename from
    outside the tree when none is open), C and M plain events."""
    events, open_cookies, cookies = [], [], iter(range(1, 10_000))
    for n, kind in enumerate(tokens):
        cookie = 0
        if kind == "F":
            cookie = next(cookies)
            open_cookies.append(cookie)
        elif kind == "T":
            cookie = open_cookies.pop(0) if open_cookies else next(cookies)
        events.append(_event(kind, cookie, n))
    return events


def _shape(event: GroupedInotifyEvent | None) -> tuple[bytes, ...]:
    assert event is not None
    if isinstance(event, PathedInotifyEvent):
        return (event.path,)
    return (event[0].path, event[1].path)


def _drain(
    grouper: InotifyMoveEventGrouper, events: list[PathedInotifyEvent]
) -> list[tuple[bytes, ...]]:
    for event in events:
        grouper.put_event(event)
    out = []
    # Each event comes out once, a paired rename's two halves as one.
    pairs = sum(1 for e in events if e.ev.is_moved_to and _has_first(events, e))
    for _ in range(len(events) - pairs):
        out.append(_shape(grouper.read_event()))
    return out


def _has_first(events: list[PathedInotifyEvent], to: PathedInotifyEvent) -> bool:
    return any(e.ev.is_moved_from and e.ev.cookie == to.ev.cookie for e in events)


@given(st.lists(st.sampled_from("CMFT"), max_size=40))
@example(list("FCT"))  # something between a rename's halves comes out before the rename
@example(list("FFTT"))
@example(list("TF"))  # a second half from outside, a first half that leaves the tree
def test_the_same_events_come_out_in_the_same_order_as_from_watchdogs_own(
    tokens: list[str],
) -> None:
    events = _script(tokens)
    assert _drain(_Ours(), events) == _drain(_Stock(), events)


def test_a_reader_held_back_by_a_first_half_is_woken_by_its_second() -> None:
    queue = movepairs.PairingQueue()
    queue.delay = 3600.0  # the wait for a pair would outlast the test: only the pair ends it
    first, second = _event("F", 7, 0), _event("T", 7, 1)
    got: list[GroupedInotifyEvent | None] = []
    queue.put_event(first)
    reader = threading.Thread(target=lambda: got.append(queue.read_event()))
    reader.start()
    queue.put_event(second)
    reader.join(WAIT)
    assert not reader.is_alive()
    assert got == [(first, second)]


def test_an_unpaired_first_half_comes_alone_after_the_delay_and_is_forgotten() -> None:
    queue = _Ours()
    first = _event("F", 7, 0)
    queue.put_event(first)
    assert queue.get_queued_moved_from_event(7) is first
    assert queue.read_event() is first
    assert queue.get_queued_moved_from_event(7) is None
    late = _event("T", 7, 1)
    queue.put_event(late)
    assert queue.read_event() is late  # alone: its first half was already given out


def test_discarding_drops_every_pending_event_and_closing_wakes_a_waiting_reader() -> None:
    queue = movepairs.PairingQueue()
    queue.put_event(_event("C", 0, 0))
    queue.put_event(_event("F", 3, 1))
    queue.discard_pending_events()
    assert len(queue) == 0
    assert queue.get_queued_moved_from_event(3) is None
    got: list[GroupedInotifyEvent | None] = [_event("C", 0, 2)]
    reader = threading.Thread(target=lambda: got.append(queue.read_event()))
    reader.start()
    queue.close()
    reader.join(WAIT)
    assert not reader.is_alive()
    assert got[-1] is None


def test_a_paired_first_half_no_longer_counts_as_queued() -> None:
    queue = movepairs.PairingQueue()
    for n in range(1000):
        queue.put_event(_event("F", n + 1, 2 * n))
        queue.put_event(_event("T", n + 1, 2 * n + 1))
    assert len(queue) == 1000, "one event per rename, its halves together"
    assert all(isinstance(queue.read_event(), tuple) for _ in range(1000))


@pytest.fixture
def watcher(tmp_path: Path) -> Iterator[tuple[Watcher, Path, list[Path]]]:
    root = tmp_path / "remotecomdir"
    (root / "softdir/server1").mkdir(parents=True)
    changed: list[Path] = []
    watcher = Watcher(
        [root],
        ignore=Ignore(DEFAULT_IGNORE),
        on_change=lambda path: changed.append(Path(path)),
        on_trouble=print,
    )
    with watcher:
        yield watcher, root, changed


def test_the_daemons_watcher_pairs_moves_with_this_queue(
    watcher: tuple[Watcher, Path, list[Path]],
) -> None:
    # A watchdog whose inside changed would silently fall back to its own queue: fail instead.
    assert movepairs.FITS
    w, root, _ = watcher
    (emitter,) = w._observers[root].emitters
    assert isinstance(emitter._inotify._move_event_grouper, movepairs.PairingQueue)  # type: ignore[attr-defined]


def test_a_folder_moved_within_the_tree_is_still_watched_at_its_new_path(
    watcher: tuple[Watcher, Path, list[Path]],
) -> None:
    # watchdog moves a folder's watches by the path its first half names: found through
    # get_queued_moved_from_event, so a file written later is reported under the new path.
    _, root, changed = watcher
    old, new = root / "softdir/server1/old", root / "softdir/server1/new"
    old.mkdir()
    wait_until(lambda: old in changed, WAIT)
    old.rename(new)
    wait_until(lambda: new in changed, WAIT)
    (new / "file").write_text("x", encoding="utf-8")
    wait_until(lambda: new / "file" in changed, WAIT)
    assert old / "file" not in changed
