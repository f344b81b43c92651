"""Debounce change events per (app, mode) and run them in batches, never one group twice at once.

The scheduler knows nothing of files or syncing. It is given keys — an app and a mode — with
the paths and the cause that triggered them, and calls one function with a `Batch`:

- a key becomes due `settle` seconds after its last event, but at the latest `max_wait` seconds
  after the first event of its burst (a quiet period *and* a maximum delay, as watchfiles does;
  a steady stream is flushed, never postponed for ever), or at once when submitted `immediate`;
- a key can be held: while an upload's temporary file of it is being written, it is not due
  before `max_wait` (rsync writes a file under a temporary name, with no event for seconds,
  then renames it; the files already renamed must not be published without the rest). Holds
  and touches of temporaries push the settle time back but are never by themselves a reason
  to run;
- a burst of any number of events costs one run;
- an app's two modes publish to the same targets: a key never runs while the same app has an
  older pending change in the other mode, so the newest arrival is the one left published;
- a group (an app's local name) is never run twice at once: events arriving while it runs are
  kept and give exactly one more run afterwards, so every event is followed by a run that
  started after it;
- different groups run in parallel on at most `workers` threads of the scheduler's own;
- when more groups are due than workers are free (a catch-up, a storm of uploads), each free
  worker takes several groups of one mode in one batch, up to `PACK_MAX`: one run of many apps
  publishes them as one batch (one flush for all, see engine.sync), where a run per app would
  pay the flushes, the state commits and the log lines of each.

One dispatcher thread decides what runs, the worker threads only run what it hands them; all
state lives under one lock, with one condition for each kind of waiter. The timings and the
number of workers can be changed while running (`reconfigure`), keeping every pending key.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

import structlog

from syncpro.engine.request import BOTH_PARTS
from syncpro.lifecycle import Lifecycle

log = structlog.get_logger()

Key = tuple[str, bool]
"""An app key and its mode (`update`)."""

PATHS_LIMIT = 20
"""How many triggering paths a key and a batch remember; a log line, not an inventory."""

PACK_MAX = 16
"""The most groups one batch takes when more groups are due than workers are free."""


@dataclass(frozen=True)
class Batch:
    """One run: due keys of one group (or, when many are due, of several) and one mode, and
    what triggered them."""

    group: str
    """The group of the oldest key."""
    update: bool
    app_keys: tuple[str, ...]
    """Every due key of the group with this mode, in the order their bursts began, but for
    an app whose older change in the other mode is still pending."""
    paths: tuple[str, ...]
    """Paths that triggered the run, deduplicated, the first `PATHS_LIMIT` of them."""
    trigger: str
    """The cause of the oldest key's burst ("watcher", "catch-up", "rescan", …); a key
    submitted `immediate` takes the cause of that submission, which is what made it run."""
    first_event: float
    """Clock time of the first event of the oldest burst in the batch."""
    events: int = 0
    """How many events the batch covers."""
    parts: frozenset[str] = BOTH_PARTS
    """Which targets the events concern: a watcher's event names the part its path lies in;
    one that names none (a retry, a manual trigger) concerns both."""
    packed: tuple[str, ...] = ()
    """The other groups run in this batch, when several were packed into it."""

    @property
    def groups(self) -> tuple[str, ...]:
        return (self.group, *self.packed)


class PendingInfo(TypedDict):
    app_key: str
    update: bool
    group: str | None
    due_in: float
    events: int


class RunningInfo(TypedDict):
    group: str
    update: bool
    app_keys: list[str]
    since: float
    started: bool


class Snapshot(TypedDict):
    pending: list[PendingInfo]
    running: list[RunningInfo]


@dataclass
class _Burst:
    """The events of one key not yet handed to a run."""

    app_key: str
    update: bool
    seq: int
    first: float
    last: float
    trigger: str
    events: int = 0
    paths: dict[str, None] = field(default_factory=dict)
    forced: float = math.inf
    """Clock time from which the key is due whatever its settle time (immediate submission)."""
    parts: set[str] = field(default_factory=set)
    group: str | None = None
    grouped_by: object = None
    """The `groups_version` `group` was resolved under; another resolves it again."""

    def due(self, settle: float, max_wait: float, held_until: float = -math.inf) -> float:
        quiet = max(self.last + settle, held_until)
        return min(quiet, self.first + max_wait, self.forced)

    def age(self) -> tuple[float, int]:
        return (self.first, self.seq)


@dataclass
class _Running:
    batch: Batch
    since: float
    started: bool = False


class Scheduler(Lifecycle):
    """Debounce keys and run them as batches on a pool of worker threads.

    `run` is called with one `Batch` at a time per group; an exception it raises is logged and
    the group released. `group_of` maps an app key to its group, or to None for an app no
    longer known (its events are dropped); it is called with the scheduler's lock held, so it
    must be quick and must not call back into the scheduler. Given `groups_version`, a
    lock-free call returning an object that changes whenever `group_of` may answer otherwise,
    a key's group is looked up once per version, not at every dispatch. `clock` timestamps
    events (it must advance like `time.monotonic`, since waits are real time).
    """

    def __init__(
        self,
        run: Callable[[Batch], None],
        *,
        settle: float,
        max_wait: float,
        workers: int,
        group_of: Callable[[str], str | None],
        groups_version: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        stop_timeout: float = 30.0,
    ) -> None:
        _check_settings(settle, max_wait, workers)
        self._run = run
        self._settle = settle
        self._max_wait = max_wait
        self._workers = workers
        self._group_of = group_of
        self._groups_version = groups_version
        self._clock = clock
        self._stop_timeout = stop_timeout

        self._lock = threading.Lock()
        self._dispatcher_cv = threading.Condition(self._lock)
        self._workers_cv = threading.Condition(self._lock)
        self._idle_cv = threading.Condition(self._lock)
        self._stop_event = threading.Event()
        self._started = False
        self._threads: list[threading.Thread] = []
        # The workers by number; one numbered above `_workers` (after a reconfigure) finishes
        # what it took and leaves, removing itself.
        self._worker_threads: dict[int, threading.Thread] = {}

        self._pending: dict[Key, _Burst] = {}
        # Upload temporaries per key: path -> clock time of its last event.
        self._holds: dict[Key, dict[str, float]] = {}
        # By group: a batch of several groups is found under each of them.
        self._running: dict[str, _Running] = {}
        self._ready: deque[_Running] = deque()
        self._batches = 0  # handed out or running: what occupies the workers
        self._seq = itertools.count()
        self._dirty = False
        # When the dispatcher will look again on its own: a submission that is due earlier
        # wakes it, any later one need not (most events only push a due time further out).
        self._wake_at = math.inf

    # -- public API ---------------------------------------------------------------------

    def submit(
        self,
        app_key: str,
        update: bool,
        path: str | None = None,
        trigger: str = "watcher",
        *,
        immediate: bool = False,
        part: str | None = None,
    ) -> None:
        """Given an event for (app_key, update), schedule a run after it.

        `immediate` makes the key due now (catch-up, a manual trigger) instead of after the
        settle time. `part` names the target the event concerns ("program" or "config");
        None means both. Ignored, with a warning, once the scheduler is stopping.
        """
        with self._lock:
            if self._stop_event.is_set():
                log.warning(
                    "scheduler.submit_after_stop", app_key=app_key, update=update, path=path
                )
                return
            now = self._clock()
            key = (app_key, update)
            burst = self._pending.get(key)
            fresh = burst is None
            if burst is None:
                burst = _Burst(app_key, update, next(self._seq), now, now, trigger)
                self._pending[key] = burst
            burst.last = now
            burst.events += 1
            burst.parts.update(BOTH_PARTS if part is None else (part,))
            if path is not None and len(burst.paths) < PATHS_LIMIT:
                burst.paths.setdefault(path)
            if immediate:
                if burst.forced == math.inf:
                    burst.trigger = trigger
                burst.forced = min(burst.forced, now)
            if (fresh or immediate) and self._due(burst, now) < self._wake_at:
                self._dirty = True
                self._dispatcher_cv.notify()

    def hold(self, app_key: str, update: bool, path: str) -> None:
        """Given that an upload's temporary file `path` of (app_key, update) is being written,
        keep the key from being due until it is released: at most until `max_wait` after its
        burst began, or after this call. Never makes the key run by itself."""
        with self._lock:
            if self._stop_event.is_set():
                return
            now = self._clock()
            key = (app_key, update)
            holds = self._holds.setdefault(key, {})
            holds[path] = now
            self._prune_holds(key, now)
            burst = self._pending.get(key)
            if burst is not None:
                burst.last = max(burst.last, now)
            # Due times only move later: the dispatcher need not look again.

    def touch(self, app_key: str, update: bool) -> None:
        """Given an event of an upload temporary of (app_key, update) that says nothing of its
        writing (its mode or times set), push a pending run's settle time back."""
        with self._lock:
            burst = self._pending.get((app_key, update))
            if burst is not None:
                burst.last = max(burst.last, self._clock())

    def release(self, app_key: str, update: bool, path: str) -> None:
        """Given that the temporary file `path` of (app_key, update) is written (closed), or
        gone (renamed to its real name, deleted), stop holding the key for it; a pending run
        of the key is then due `settle` seconds from now, unless another temporary holds it."""
        with self._lock:
            now = self._clock()
            key = (app_key, update)
            holds = self._holds.get(key)
            if holds is not None:
                holds.pop(path, None)
                if not holds:
                    del self._holds[key]
            burst = self._pending.get(key)
            if burst is not None:
                # The next file of an upload appears right after the previous one's rename:
                # a settle period from here gives its event the time to hold the key again.
                burst.last = max(burst.last, now)
                # Woken only when this makes the key due before the dispatcher looks again
                # (its last hold is gone): an rsync upload releases once per file, and a
                # dispatch per release cost the watcher's thread the interpreter lock.
                if self._due(burst, now) < self._wake_at:
                    self._dirty = True
                    self._dispatcher_cv.notify()

    def reconfigure(self, *, settle: float, max_wait: float, workers: int) -> None:
        """Apply new timings and a new number of workers at once, keeping every pending key
        and letting running batches finish. Raise ValueError on wrong settings."""
        _check_settings(settle, max_wait, workers)
        with self._lock:
            self._settle = settle
            self._max_wait = max_wait
            self._workers = workers
            if self._started and not self._stop_event.is_set():
                for number in range(1, workers + 1):
                    if number not in self._worker_threads:
                        self._start_worker(number)
            self._dirty = True
            self._dispatcher_cv.notify()
            # Workers numbered above the new count notice it and leave once idle.
            self._workers_cv.notify_all()
        log.info("scheduler.reconfigured", settle=settle, max_wait=max_wait, workers=workers)

    def snapshot(self) -> Snapshot:
        """Return the pending keys (soonest due first) and the batches running, for status."""
        with self._lock:
            now = self._clock()
            bursts = sorted(self._pending.values(), key=lambda b: self._due(b, now))
            pending: list[PendingInfo] = [
                {
                    "app_key": b.app_key,
                    "update": b.update,
                    "group": self._resolve(b, log_failure=False),
                    "due_in": max(0.0, self._due(b, now) - now),
                    "events": b.events,
                }
                for b in bursts
            ]
            running: list[RunningInfo] = [
                {
                    "group": r.batch.group,
                    "update": r.batch.update,
                    "app_keys": list(r.batch.app_keys),
                    "since": r.since,
                    "started": r.started,
                }
                for r in self._running_batches()
            ]
        return {"pending": pending, "running": running}

    def busy(self) -> tuple[frozenset[Key], frozenset[Key]]:
        """Return the keys pending (a run after their last event is still to come) and the
        keys of the batches handed out or running."""
        with self._lock:
            pending = frozenset(self._pending)
            running = frozenset(
                (key, r.batch.update) for r in self._running.values() for key in r.batch.app_keys
            )
        return pending, running

    def wait_idle(self, timeout: float) -> bool:
        """Return True once nothing is pending or running, False if `timeout` passes first."""
        with self._lock:
            return self._idle_cv.wait_for(
                lambda: not self._pending and not self._running, timeout=timeout
            )

    def start(self) -> None:
        """Start the dispatcher and worker threads. Raise RuntimeError if started before."""
        with self._lock:
            if self._started or self._stop_event.is_set():
                raise RuntimeError("a scheduler can be started only once")
            self._started = True
            # Not daemons: a sync must never be cut off half way by the interpreter exiting.
            dispatcher = threading.Thread(
                target=self._dispatch_loop, name="syncpro-scheduler-dispatch", daemon=False
            )
            self._threads.append(dispatcher)
            dispatcher.start()
            for number in range(1, self._workers + 1):
                self._start_worker(number)

    def _start_worker(self, number: int) -> None:
        """Start worker `number`; called with the lock held."""
        thread = threading.Thread(
            target=self._work_loop,
            args=(number,),
            name=f"syncpro-scheduler-worker-{number}",
            daemon=False,
        )
        self._worker_threads[number] = thread
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout: float | None = None) -> list[Batch]:
        """Stop taking work, let running batches finish for up to `timeout` seconds (the
        `stop_timeout` it was made with when None).

        Return what was abandoned: batches still running when the time was up, then the
        pending keys that never started, grouped into the batches they would have made.
        Calling it again waits again and returns what is still abandoned.
        """
        deadline = time.monotonic() + (self._stop_timeout if timeout is None else timeout)
        with self._lock:
            self._stop_event.set()
            self._dispatcher_cv.notify_all()
            self._workers_cv.notify_all()
            self._idle_cv.notify_all()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            abandoned = [r.batch for r in self._running_batches()] + self._pending_batches()
        alive = [t.name for t in threads if t.is_alive()]
        log.info("scheduler.stopped", abandoned=len(abandoned), threads_still_running=alive)
        return abandoned

    # -- threads --------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        with self._lock:
            while not self._stop_event.is_set():
                self._dirty = False
                delay = self._dispatch(self._clock())
                self._dispatcher_cv.wait_for(
                    lambda: self._dirty or self._stop_event.is_set(), timeout=delay
                )

    def _work_loop(self, number: int) -> None:
        while True:
            with self._lock:
                self._workers_cv.wait_for(
                    lambda: self._ready or self._stop_event.is_set() or number > self._workers
                )
                if self._stop_event.is_set():
                    return
                if not self._ready:
                    # One worker too many since a reconfigure: leave. It takes work first when
                    # there is some, so that a notify meant for a worker is never lost.
                    del self._worker_threads[number]
                    return
                running = self._ready.popleft()
                running.started = True
                running.since = self._clock()
                batch = running.batch
            try:
                self._run(batch)
            except Exception:
                log.exception(
                    "scheduler.run_failed",
                    group=batch.group,
                    update=batch.update,
                    app_keys=list(batch.app_keys),
                    trigger=batch.trigger,
                )
            finally:
                with self._lock:
                    for group in batch.groups:
                        del self._running[group]
                    self._batches -= 1
                    self._dirty = True
                    self._dispatcher_cv.notify()
                    self._idle_cv.notify_all()

    # -- decisions, all with the lock held -----------------------------------------------

    def _dispatch(self, now: float) -> float | None:
        """Hand every runnable group to a free worker; return how long to wait before next."""
        if self._batches >= self._workers:
            # A catch-up queues a thousand keys and every submission wakes the dispatcher:
            # scanning them all while no worker can take one made dispatching quadratic, and
            # the scanning thread starved the workers of the interpreter lock.
            self._wake_at = math.inf  # nothing can start before a worker frees up
            return None
        free = self._workers - self._batches
        # Room for more groups than free workers: packed several to a batch when that many
        # are due (see _pack).
        room = free * PACK_MAX
        version = self._groups_version() if self._groups_version is not None else None
        # Pending keys are kept in the order their bursts began, oldest first: the first
        # ready key met of a group is its oldest, and groups are chosen in that order.
        chosen: dict[str, list[_Burst]] = {}
        next_due = math.inf
        for key, burst in list(self._pending.items()):
            if len(chosen) == room and burst.grouped_by is version and version is not None:
                # Every worker has its group: only keys of those groups still matter (a
                # batch takes every due key of its group), and their groups are known.
                if burst.group in chosen and self._ready_now(burst, now):
                    chosen[burst.group].append(burst)
                continue
            group = self._group(burst, version)
            if group is None:
                del self._pending[key]
                log.warning(
                    "scheduler.unknown_app_dropped",
                    app_key=burst.app_key,
                    update=burst.update,
                    events=burst.events,
                )
                self._idle_cv.notify_all()
                continue
            if group in self._running:
                continue  # its release wakes the dispatcher
            if group not in chosen and len(chosen) == room:
                continue
            due = self._due(burst, now)
            if due <= now and not self._behind_other_mode(burst):
                chosen.setdefault(group, []).append(burst)
            elif due > now:
                # A key behind its app's older change waits for that one, which is due
                # itself or waits for a time of its own counted here.
                next_due = min(next_due, due)
        for pack in _pack(chosen, free):
            self._hand_out(pack, now)
        if self._batches >= self._workers:
            self._wake_at = math.inf  # nothing can start before a worker frees up
            return None
        self._wake_at = next_due
        return None if next_due == math.inf else max(0.0, next_due - now)

    def _ready_now(self, burst: _Burst, now: float) -> bool:
        return self._due(burst, now) <= now and not self._behind_other_mode(burst)

    def _group(self, burst: _Burst, version: object) -> str | None:
        """The burst's group, looked up again unless known under this version of groups."""
        if version is None or burst.grouped_by is not version:
            burst.group, burst.grouped_by = self._resolve(burst), version
        return burst.group

    def _hand_out(self, pack: list[list[_Burst]], now: float) -> None:
        """Hand one batch to the workers: the ready keys of each group of the pack (oldest
        group first) that share the mode of the group's oldest key."""
        groups: list[str] = []
        chosen: list[_Burst] = []
        for ready in pack:
            oldest = ready[0]
            assert oldest.group is not None  # resolved by the dispatch that chose it
            groups.append(oldest.group)
            chosen += sorted((b for b in ready if b.update == oldest.update), key=lambda b: b.seq)
        paths: dict[str, None] = {}
        for burst in chosen:
            del self._pending[(burst.app_key, burst.update)]
            for path in burst.paths:
                if len(paths) < PATHS_LIMIT:
                    paths.setdefault(path)
        first = pack[0][0]
        batch = Batch(
            group=groups[0],
            update=first.update,
            app_keys=tuple(b.app_key for b in chosen),
            paths=tuple(paths),
            trigger=first.trigger,
            first_event=min(b.first for b in chosen),
            events=sum(b.events for b in chosen),
            parts=frozenset().union(*(b.parts for b in chosen)) or BOTH_PARTS,
            packed=tuple(groups[1:]),
        )
        running = _Running(batch, since=now)
        for group in groups:
            self._running[group] = running
        self._batches += 1
        self._ready.append(running)
        self._workers_cv.notify()

    def _running_batches(self) -> list[_Running]:
        return list({id(r): r for r in self._running.values()}.values())

    def _behind_other_mode(self, burst: _Burst) -> bool:
        """Whether the same app has an older pending change in the other mode. Both modes
        publish to the same targets: applied oldest change first, the newest arrival wins
        (SPEC section 7), so this one must wait for that one to run first."""
        other = self._pending.get((burst.app_key, not burst.update))
        return other is not None and other.age() < burst.age()

    def _due(self, burst: _Burst, now: float) -> float:
        return burst.due(self._settle, self._max_wait, self._held_until(burst, now))

    def _held_until(self, burst: _Burst, now: float) -> float:
        """When the key's newest hold runs out if never released, or -inf if it has none."""
        key = (burst.app_key, burst.update)
        if key not in self._holds:
            return -math.inf
        self._prune_holds(key, now)
        holds = self._holds.get(key)
        return max(holds.values()) + self._max_wait if holds else -math.inf

    def _prune_holds(self, key: Key, now: float) -> None:
        """Forget temporaries not heard of for `max_wait`: their deletion may have been missed
        (an overflow, a polling root), and a hold must never last for ever."""
        holds = self._holds.get(key)
        if holds is None:
            return
        for path, seen in list(holds.items()):
            if seen + self._max_wait <= now:
                del holds[path]
        if not holds:
            del self._holds[key]

    def _resolve(self, burst: _Burst, *, log_failure: bool = True) -> str | None:
        try:
            return self._group_of(burst.app_key)
        except Exception:
            if log_failure:
                log.exception("scheduler.group_of_failed", app_key=burst.app_key)
            return None

    def _pending_batches(self) -> list[Batch]:
        """Group the pending keys into the batches they would make, oldest first."""
        grouped: dict[tuple[str, bool], list[_Burst]] = {}
        for burst in sorted(self._pending.values(), key=_Burst.age):
            group = self._resolve(burst, log_failure=False)
            if group is not None:
                grouped.setdefault((group, burst.update), []).append(burst)
        batches = []
        for (group, update), bursts in grouped.items():
            paths = dict.fromkeys(p for b in bursts for p in b.paths)
            batches.append(
                Batch(
                    group=group,
                    update=update,
                    app_keys=tuple(b.app_key for b in bursts),
                    paths=tuple(paths)[:PATHS_LIMIT],
                    trigger=bursts[0].trigger,
                    first_event=bursts[0].first,
                    events=sum(b.events for b in bursts),
                    parts=frozenset().union(*(b.parts for b in bursts)) or BOTH_PARTS,
                )
            )
        return batches


def _pack(chosen: dict[str, list[_Burst]], free: int) -> list[list[list[_Burst]]]:
    """Given the ready keys of each chosen group (oldest group first) and the free workers,
    return the batches to hand out, each a list of groups' ready keys: a group each while
    there are workers enough, else up to PACK_MAX groups each, spread evenly over the free
    workers. Only groups whose keys ask the same of a run share one (the mode, the parts):
    a run has one mode, and a part nobody changed would be walked for nothing. Groups left
    over stay pending for the next dispatch."""
    if len(chosen) <= free:
        return [[ready] for ready in chosen.values()]
    per = min(PACK_MAX, math.ceil(len(chosen) / free))
    packs: list[list[list[_Burst]]] = []
    kinds: list[tuple[bool, frozenset[str]]] = []
    for ready in chosen.values():
        update = ready[0].update
        kind = (update, frozenset().union(*(b.parts for b in ready if b.update == update)))
        if len(packs) < free:  # every free worker busy first
            packs.append([ready])
            kinds.append(kind)
            continue
        fits = [p for p, k in zip(packs, kinds, strict=True) if k == kind and len(p) < per]
        if fits:
            min(fits, key=len).append(ready)
    return packs


def _check_settings(settle: float, max_wait: float, workers: int) -> None:
    if not (settle >= 0 and max_wait >= 0):
        raise ValueError(f"settle and max_wait must be >= 0, not {settle!r}, {max_wait!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers!r}")
