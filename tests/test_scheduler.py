"""The scheduler between the watcher and the sync engine: debounce, batch, one run per group."""

from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from syncpro.daemon.scheduler import PACK_MAX, PATHS_LIMIT, Batch, Scheduler

from helpers import wait_until

WAIT = 10.0  # deadline for anything that must happen; only a broken scheduler reaches it
QUIET = 0.3  # how long to watch for something that must not happen


def pause(seconds: float) -> None:
    """Space events out in time, as a slow upload does; never used to wait for the scheduler."""
    threading.Event().wait(seconds)


@dataclass
class Run:
    batch: Batch
    start: float
    ticket: int
    end: float | None = None


class Recorder:
    """A `run` callback recording every batch, how many run at once, and when.

    `hold` keeps every run inside the callback until `release()`; `work` stands for the time a
    sync takes; `fail` makes that many first runs raise; `on_run` is called inside each run.
    """

    def __init__(
        self,
        *,
        hold: bool = False,
        work: float = 0.0,
        fail: int = 0,
        on_run: Callable[[Batch], None] | None = None,
        tickets: Iterator[int] | None = None,
    ) -> None:
        self._cv = threading.Condition()
        self._released = threading.Event()
        if not hold:
            self._released.set()
        self._work = work
        self._fail = fail
        self._on_run = on_run
        self._tickets = tickets if tickets is not None else itertools.count()
        self.runs: list[Run] = []
        self.started: queue.Queue[Batch] = queue.Queue()
        self.errors: list[BaseException] = []
        self.active = 0
        self.max_active = 0
        self.active_by_group: Counter[str] = Counter()
        self.max_by_group: Counter[str] = Counter()

    def release(self) -> None:
        self._released.set()

    def __call__(self, batch: Batch) -> None:
        run = Run(batch, time.monotonic(), next(self._tickets))
        with self._cv:
            self.runs.append(run)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            for group in batch.groups:
                self.active_by_group[group] += 1
                self.max_by_group[group] = max(
                    self.max_by_group[group], self.active_by_group[group]
                )
            fail = self._fail > 0
            self._fail -= 1
        self.started.put(batch)
        try:
            assert self._released.wait(WAIT), "a held run was never released"
            if self._work:
                pause(self._work)
            if self._on_run is not None:
                try:
                    self._on_run(batch)
                except BaseException as exc:
                    self.errors.append(exc)
                    raise
            if fail:
                raise RuntimeError("the sync broke")
        finally:
            with self._cv:
                run.end = time.monotonic()
                self.active -= 1
                for group in batch.groups:
                    self.active_by_group[group] -= 1
                self._cv.notify_all()

    def wait_finished(self, count: int) -> bool:
        with self._cv:
            return self._cv.wait_for(
                lambda: sum(r.end is not None for r in self.runs) >= count, timeout=WAIT
            )

    def batches(self) -> list[tuple[str, bool, tuple[str, ...]]]:
        with self._cv:
            return [(r.batch.group, r.batch.update, r.batch.app_keys) for r in self.runs]


MakeScheduler = Callable[..., Scheduler]


@pytest.fixture(params=[False, True], ids=["groups-looked-up", "groups-cached"])
def make(request: pytest.FixtureRequest) -> Iterator[MakeScheduler]:
    """Schedulers, each test run twice: looking every key's group up at each dispatch, and
    (as the daemon does) once per version of the groups, here one that never changes."""
    made: list[tuple[Scheduler, Recorder]] = []
    version = object()

    def factory(
        recorder: Recorder,
        *,
        settle: float = 0.05,
        max_wait: float = 5.0,
        workers: int = 2,
        group_of: Callable[[str], str | None] | None = None,
        start: bool = True,
    ) -> Scheduler:
        scheduler = Scheduler(
            recorder,
            settle=settle,
            max_wait=max_wait,
            workers=workers,
            group_of=group_of if group_of is not None else (lambda app_key: app_key),
            groups_version=(lambda: version) if request.param else None,
            clock=time.monotonic,
        )
        made.append((scheduler, recorder))
        if start:
            scheduler.start()
        return scheduler

    yield factory
    for scheduler, recorder in made:
        recorder.release()
        scheduler.stop(timeout=WAIT)


def test_a_burst_of_a_thousand_events_costs_one_run(make: MakeScheduler) -> None:
    recorder = Recorder()
    scheduler = make(recorder, settle=0.3, max_wait=30)
    for n in range(1000):
        scheduler.submit("app1", False, f"/src/app1/f{n % 50}")
    assert scheduler.wait_idle(WAIT)
    assert recorder.batches() == [("app1", False, ("app1",))]
    batch = recorder.runs[0].batch
    assert batch.events == 1000
    assert batch.trigger == "watcher"
    assert batch.paths == tuple(f"/src/app1/f{n}" for n in range(PATHS_LIMIT))


def test_no_run_starts_before_settle_seconds_after_its_last_event(make: MakeScheduler) -> None:
    settle = 0.2
    recorder = Recorder()
    scheduler = make(recorder, settle=settle, max_wait=30)
    submitted: dict[str, float] = {}
    for n in range(6):
        submitted[f"p{n}"] = time.monotonic()
        scheduler.submit("app1", False, f"p{n}")
        pause(settle / 4)
    assert scheduler.wait_idle(WAIT)
    assert sum(r.batch.events for r in recorder.runs) == len(submitted)
    for run in recorder.runs:
        assert run.start - max(submitted[p] for p in run.batch.paths) >= settle
        assert run.batch.first_event >= submitted[run.batch.paths[0]]


def test_a_steady_stream_of_events_is_flushed_by_max_wait(make: MakeScheduler) -> None:
    settle, max_wait = 0.15, 0.6
    recorder = Recorder()
    scheduler = make(recorder, settle=settle, max_wait=max_wait)
    submitted: list[float] = []
    deadline = time.monotonic() + max_wait + WAIT
    while time.monotonic() < deadline:
        submitted.append(time.monotonic())
        scheduler.submit("app1", False, f"p{len(submitted)}")
        try:
            first = recorder.started.get(timeout=settle / 3)
            break
        except queue.Empty:
            pass
    else:
        pytest.fail("a steady stream of events never ran")
    run = recorder.runs[0]
    assert run.batch is first
    assert run.start - submitted[0] <= max_wait + 2.0
    last_included = submitted[first.events - 1]
    assert run.start - first.first_event >= max_wait or run.start - last_included >= settle
    # The events that came after the batch was taken still get their own run.
    assert scheduler.wait_idle(WAIT)
    assert sum(r.batch.events for r in recorder.runs) == len(submitted)
    assert recorder.runs[-1].start >= submitted[-1]


def test_events_during_a_run_give_exactly_one_more_run_after_it(make: MakeScheduler) -> None:
    settle = 0.05
    recorder = Recorder(hold=True)
    scheduler = make(recorder, settle=settle, max_wait=30)
    scheduler.submit("app1", False, "before", immediate=True)
    recorder.started.get(timeout=WAIT)
    last_event = 0.0
    for n in range(100):
        last_event = time.monotonic()
        scheduler.submit("app1", False, f"during{n}")
    with pytest.raises(queue.Empty):
        recorder.started.get(timeout=QUIET)
    recorder.release()
    assert scheduler.wait_idle(WAIT)
    first, second = recorder.runs
    assert (first.batch.events, second.batch.events) == (1, 100)
    assert first.end is not None
    assert second.start >= first.end
    assert second.start - last_event >= settle


def test_two_keys_of_one_group_never_run_at_once(make: MakeScheduler) -> None:
    recorder = Recorder(hold=True, work=0.005)
    scheduler = make(recorder, settle=0.01, max_wait=0.05, workers=4, group_of=lambda _: "g")
    scheduler.submit("a", False, immediate=True)
    recorder.started.get(timeout=WAIT)
    scheduler.submit("b", False, immediate=True)
    scheduler.submit("c", True, immediate=True)
    with pytest.raises(queue.Empty):
        recorder.started.get(timeout=QUIET)
    recorder.release()
    for n in range(60):
        scheduler.submit(f"k{n % 5}", n % 2 == 0, immediate=n % 7 == 0)
        if n % 10 == 0:
            pause(0.01)
    assert scheduler.wait_idle(WAIT)
    assert recorder.max_by_group["g"] == 1
    assert recorder.max_active == 1
    assert sum(r.batch.events for r in recorder.runs) == 63


def test_two_groups_run_in_parallel(make: MakeScheduler) -> None:
    both_inside = threading.Barrier(2, timeout=WAIT)
    recorder = Recorder(on_run=lambda _: both_inside.wait())
    scheduler = make(recorder, workers=2)
    scheduler.submit("a", False, immediate=True)
    scheduler.submit("b", False, immediate=True)
    assert scheduler.wait_idle(WAIT)
    assert recorder.errors == []
    assert sorted(recorder.batches()) == [("a", False, ("a",)), ("b", False, ("b",))]


def test_no_more_than_workers_batches_run_at_once(make: MakeScheduler) -> None:
    recorder = Recorder(hold=True)
    scheduler = make(recorder, workers=2)
    scheduler.submit("a", False, immediate=True)
    scheduler.submit("b", False, immediate=True)
    recorder.started.get(timeout=WAIT)
    recorder.started.get(timeout=WAIT)
    scheduler.submit("c", False, immediate=True)
    with pytest.raises(queue.Empty):
        recorder.started.get(timeout=QUIET)
    snapshot = scheduler.snapshot()
    assert sorted(r["group"] for r in snapshot["running"]) == ["a", "b"]
    assert [p["app_key"] for p in snapshot["pending"]] == ["c"]
    recorder.release()
    assert scheduler.wait_idle(WAIT)
    assert recorder.max_active == 2
    assert sorted(g for r in recorder.runs for g in r.batch.groups) == list("abc")


def test_more_due_groups_than_workers_are_packed_evenly_into_one_batch_per_worker(
    make: MakeScheduler,
) -> None:
    recorder = Recorder(hold=True)
    scheduler = make(recorder, workers=2, start=False)
    for app in "abcdef":
        scheduler.submit(app, False, f"/{app}/1", trigger="catch-up", immediate=True)
    scheduler.start()
    first, second = recorder.started.get(timeout=WAIT), recorder.started.get(timeout=WAIT)
    with pytest.raises(queue.Empty):
        recorder.started.get(timeout=QUIET)
    assert sorted([first.app_keys, second.app_keys]) == [("a", "c", "e"), ("b", "d", "f")]
    assert first.groups == first.app_keys  # one app per group here
    assert sorted(first.paths + second.paths) == [f"/{app}/1" for app in "abcdef"]
    assert first.trigger == "catch-up" and first.events == 3
    # Running, each group counts as running: a new change of one waits for its batch.
    snapshot = scheduler.snapshot()
    assert sorted(r["group"] for r in snapshot["running"]) == ["a", "b"]
    scheduler.submit("e", False, immediate=True)
    with pytest.raises(queue.Empty):
        recorder.started.get(timeout=QUIET)
    recorder.release()
    assert scheduler.wait_idle(WAIT)
    assert [r.batch.app_keys for r in recorder.runs[2:]] == [("e",)]
    assert recorder.max_by_group["e"] == 1


def test_a_packed_batch_holds_one_mode_and_the_same_parts_and_at_most_pack_max_groups(
    make: MakeScheduler,
) -> None:
    recorder = Recorder(hold=True)
    scheduler = make(recorder, workers=1, start=False)
    count = PACK_MAX + 4
    for n in range(count):
        scheduler.submit(f"p{n:02}", False, immediate=True, part="program")
    scheduler.submit("u", True, immediate=True)
    scheduler.submit("c", False, immediate=True, part="config")
    scheduler.start()
    batch = recorder.started.get(timeout=WAIT)
    assert batch.app_keys == tuple(f"p{n:02}" for n in range(PACK_MAX))
    assert batch.parts == {"program"} and not batch.update
    recorder.release()
    assert scheduler.wait_idle(WAIT)
    runs = [(r.batch.app_keys, r.batch.update, r.batch.parts) for r in recorder.runs]
    assert len(runs) == 4
    assert sorted(k for keys, _, _ in runs for k in keys) == sorted(
        [f"p{n:02}" for n in range(count)] + ["u", "c"]
    )
    assert (("u",), True, {"program", "config"}) in runs
    assert (("c",), False, {"config"}) in runs


def test_a_batch_takes_every_due_key_of_its_group_and_mode(make: MakeScheduler) -> None:
    groups = {"x": "g", "a": "g", "b": "g", "c": "g", "d": "h"}
    recorder = Recorder(hold=True)
    scheduler = make(recorder, settle=30, max_wait=60, workers=2, group_of=groups.get)
    scheduler.submit("x", False, immediate=True)
    recorder.started.get(timeout=WAIT)
    scheduler.submit("a", False, "/a/1", trigger="catch-up", immediate=True)
    scheduler.submit("c", True, "/c/1", immediate=True)
    scheduler.submit("b", False, "/b/1", immediate=True)
    scheduler.submit("a", False, "/a/2")
    scheduler.submit("a", False, "/a/1")
    scheduler.submit("d", False, "/d/1", immediate=True)
    scheduler.submit("x", True, "/x/later")  # due only after settle: not part of any batch
    assert recorder.started.get(timeout=WAIT).group == "h"
    recorder.release()
    assert recorder.wait_finished(4)
    runs = {(r.batch.group, r.batch.update): r.batch for r in recorder.runs[2:]}
    assert [(r.batch.group, r.batch.update) for r in recorder.runs if r.batch.group == "g"] == [
        ("g", False),
        ("g", False),
        ("g", True),
    ]
    merged = recorder.runs[2].batch
    assert merged == Batch(
        group="g",
        update=False,
        app_keys=("a", "b"),
        paths=("/a/1", "/a/2", "/b/1"),
        trigger="catch-up",
        first_event=merged.first_event,
        events=4,
    )
    assert runs[("g", True)].app_keys == ("c",)
    pending = scheduler.snapshot()["pending"]
    assert [(p["app_key"], p["update"]) for p in pending] == [("x", True)]


@pytest.mark.parametrize("older", [False, True])
def test_both_modes_of_one_app_run_oldest_change_first(make: MakeScheduler, older: bool) -> None:
    recorder = Recorder()
    scheduler = make(recorder, start=False)
    scheduler.submit("app1", older, trigger="catch-up", immediate=True)
    scheduler.submit("app1", not older, trigger="catch-up", immediate=True)
    scheduler.start()
    assert scheduler.wait_idle(WAIT)
    assert recorder.batches() == [("app1", older, ("app1",)), ("app1", not older, ("app1",))]


def test_an_apps_older_change_in_the_other_mode_runs_before_its_newer_one_in_a_group(
    make: MakeScheduler,
) -> None:
    recorder = Recorder()
    scheduler = make(recorder, start=False, group_of=lambda _: "g")
    # The catch-up's order: oldest arrival first. B's update=1 is the oldest of all, so a
    # batch of update=1 runs first, but it must not take A's update=1 along: A's update=0
    # is older and would then overwrite it.
    for app_key, update in (("B", True), ("A", False), ("A", True), ("B", False)):
        scheduler.submit(app_key, update, trigger="catch-up", immediate=True)
    scheduler.start()
    assert scheduler.wait_idle(WAIT)
    assert recorder.batches() == [
        ("g", True, ("B",)),
        ("g", False, ("A", "B")),
        ("g", True, ("A",)),
    ]


def test_a_due_change_waits_for_the_same_apps_older_change_still_settling(
    make: MakeScheduler,
) -> None:
    recorder = Recorder()
    scheduler = make(recorder, settle=QUIET, max_wait=WAIT)
    scheduler.submit("A", False, "/r/A/x")
    scheduler.submit("A", True, "/u/A/y", trigger="manual", immediate=True)
    assert scheduler.wait_idle(WAIT)
    assert recorder.batches() == [("A", False, ("A",)), ("A", True, ("A",))]


def test_an_immediate_submission_does_not_wait_for_settle(make: MakeScheduler) -> None:
    recorder = Recorder()
    scheduler = make(recorder, settle=60, max_wait=120)
    scheduler.submit("app1", False, "/src/app1/a")
    scheduler.submit("app1", False, trigger="manual", immediate=True)
    batch = recorder.started.get(timeout=WAIT)
    assert (batch.app_keys, batch.paths, batch.trigger, batch.events) == (
        ("app1",),
        ("/src/app1/a",),
        "manual",
        2,
    )


def test_an_app_no_longer_known_is_dropped_and_logged(make: MakeScheduler) -> None:
    groups = {"a": "ga", "gone": "gg"}
    recorder = Recorder()
    scheduler = make(recorder, start=False, group_of=groups.get)
    scheduler.submit("gone", False, "/src/gone/x")
    scheduler.submit("gone", False, "/src/gone/y")
    scheduler.submit("a", False, "/src/a/x")
    del groups["gone"]
    with capture_logs() as logs:
        scheduler.start()
        assert scheduler.wait_idle(WAIT)
    assert recorder.batches() == [("ga", False, ("a",))]
    dropped = [e for e in logs if e["event"] == "scheduler.unknown_app_dropped"]
    assert dropped == [
        {
            "event": "scheduler.unknown_app_dropped",
            "log_level": "warning",
            "app_key": "gone",
            "update": False,
            "events": 2,
        }
    ]


def test_an_exception_in_run_is_logged_and_the_worker_keeps_going(
    make: MakeScheduler,
) -> None:
    recorder = Recorder(fail=1)
    scheduler = make(recorder, workers=1)
    with capture_logs() as logs:
        scheduler.submit("a", False, immediate=True)
        assert recorder.wait_finished(1)
        assert scheduler.wait_idle(WAIT)
        scheduler.submit("a", False, immediate=True)
        scheduler.submit("b", True, immediate=True)
        assert scheduler.wait_idle(WAIT)
    assert recorder.batches() == [("a", False, ("a",)), ("a", False, ("a",)), ("b", True, ("b",))]
    failed = [e for e in logs if e["event"] == "scheduler.run_failed"]
    assert failed == [
        {
            "event": "scheduler.run_failed",
            "log_level": "error",
            "exc_info": True,
            "group": "a",
            "update": False,
            "app_keys": ["a"],
            "trigger": "watcher",
        }
    ]


def test_stop_returns_what_it_abandons_and_joins_its_threads() -> None:
    recorder = Recorder(hold=True)
    scheduler = Scheduler(
        recorder, settle=30, max_wait=60, workers=2, group_of=lambda app: f"g-{app}"
    )
    scheduler.start()
    scheduler.submit("a", False, "/a/1", immediate=True)
    recorder.started.get(timeout=WAIT)
    scheduler.submit("b", True, "/b/1")
    scheduler.submit("a", False, "/a/2")

    abandoned = scheduler.stop(timeout=0.1)
    assert [(b.group, b.update, b.app_keys, b.paths) for b in abandoned] == [
        ("g-a", False, ("a",), ("/a/1",)),
        ("g-b", True, ("b",), ("/b/1",)),
        ("g-a", False, ("a",), ("/a/2",)),
    ]
    scheduler.submit("c", False, immediate=True)  # stopping: taken no more
    recorder.release()
    assert [b.paths for b in scheduler.stop(timeout=WAIT)] == [("/b/1",), ("/a/2",)]
    assert not [t for t in threading.enumerate() if t.name.startswith("syncpro-scheduler")]
    assert len(recorder.runs) == 1


def test_as_a_context_manager_it_starts_and_stops_its_named_threads() -> None:
    recorder = Recorder()
    with Scheduler(recorder, settle=0.01, max_wait=1, workers=3, group_of=str) as scheduler:
        names = sorted(t.name for t in threading.enumerate() if t.name.startswith("syncpro-"))
        assert names == [
            "syncpro-scheduler-dispatch",
            "syncpro-scheduler-worker-1",
            "syncpro-scheduler-worker-2",
            "syncpro-scheduler-worker-3",
        ]
        scheduler.submit("a", False)
        assert scheduler.wait_idle(WAIT)
    assert not [t for t in threading.enumerate() if t.name.startswith("syncpro-scheduler")]
    assert scheduler.stop(timeout=0) == []
    with pytest.raises(RuntimeError):
        scheduler.start()


def test_snapshot_shows_pending_keys_and_running_batches(make: MakeScheduler) -> None:
    recorder = Recorder(hold=True)
    scheduler = make(recorder, settle=30, max_wait=60, group_of=lambda _: "g")
    assert scheduler.snapshot() == {"pending": [], "running": []}
    scheduler.submit("a", False, immediate=True)
    recorder.started.get(timeout=WAIT)
    scheduler.submit("b", True, "/b/1")
    scheduler.submit("b", True, "/b/2")
    snapshot = scheduler.snapshot()
    assert snapshot["running"] == [
        {
            "group": "g",
            "update": False,
            "app_keys": ["a"],
            "since": snapshot["running"][0]["since"],
            "started": True,
        }
    ]
    assert snapshot["running"][0]["since"] <= recorder.runs[0].start
    (pending,) = snapshot["pending"]
    assert (pending["app_key"], pending["update"], pending["group"], pending["events"]) == (
        "b",
        True,
        "g",
        2,
    )
    assert 25 < pending["due_in"] <= 30
    assert not scheduler.wait_idle(0.05)


def test_wrong_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="workers"):
        Scheduler(Recorder(), settle=1, max_wait=2, workers=0, group_of=str)
    with pytest.raises(ValueError, match="settle"):
        Scheduler(Recorder(), settle=-1, max_wait=2, workers=1, group_of=str)


def test_under_concurrent_submissions_every_event_is_followed_by_a_run_of_its_key(
    make: MakeScheduler,
) -> None:
    apps = [f"app{n}" for n in range(6)]
    groups = {app: f"g{n % 3}" for n, app in enumerate(apps)}
    tickets = itertools.count()
    recorder = Recorder(work=0.002, tickets=tickets)
    scheduler = make(recorder, settle=0.02, max_wait=0.08, workers=2, group_of=groups.get)
    events: list[tuple[tuple[str, bool], int]] = []

    def produce(seed: int) -> None:
        rnd = random.Random(seed)  # noqa: S311 - reproducible test data, not a secret
        for _ in range(300):
            key = (rnd.choice(apps), rnd.random() < 0.3)
            events.append((key, next(tickets)))
            scheduler.submit(*key, immediate=rnd.random() < 0.05)
            if rnd.random() < 0.1:
                pause(rnd.random() * 0.01)

    producers = [threading.Thread(target=produce, args=(seed,)) for seed in range(3)]
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join(WAIT)
    assert scheduler.wait_idle(WAIT)

    assert sum(r.batch.events for r in recorder.runs) == len(events) == 900
    assert max(recorder.max_by_group.values()) == 1
    last_event: dict[tuple[str, bool], int] = {}
    for key, ticket in events:
        last_event[key] = max(ticket, last_event.get(key, -1))
    last_run: dict[tuple[str, bool], int] = {}
    for run in recorder.runs:
        for app in run.batch.app_keys:
            key = (app, run.batch.update)
            last_run[key] = max(run.ticket, last_run.get(key, -1))
    for key, ticket in last_event.items():
        assert last_run[key] > ticket, key


def test_a_held_key_waits_for_its_temporary_to_go_then_settles(make: MakeScheduler) -> None:
    settle = 0.05
    recorder = Recorder()
    scheduler = make(recorder, settle=settle, max_wait=30)
    scheduler.submit("app1", False, "/src/app1/part0")
    scheduler.hold("app1", False, "/src/app1/.part1.AbC123")
    # Many settle periods without any event: the temporary alone keeps the key from running.
    with pytest.raises(queue.Empty):
        recorder.started.get(timeout=QUIET)
    released = time.monotonic()
    scheduler.release("app1", False, "/src/app1/.part1.AbC123")
    scheduler.submit("app1", False, "/src/app1/part1")
    batch = recorder.started.get(timeout=WAIT)
    assert recorder.runs[0].start - released >= settle
    assert (batch.paths, batch.events) == (("/src/app1/part0", "/src/app1/part1"), 2)


def test_a_hold_alone_never_makes_a_run(make: MakeScheduler) -> None:
    recorder = Recorder()
    scheduler = make(recorder, settle=0.01, max_wait=0.05)
    scheduler.hold("app1", False, "/src/app1/.a.AbC123")
    scheduler.release("app1", False, "/src/app1/.a.AbC123")
    scheduler.hold("app1", False, "/src/app1/.b.AbC123")
    # A later key that runs proves the dispatcher had every chance to run the held one.
    scheduler.submit("app2", False, "/src/app2/x")
    assert recorder.started.get(timeout=WAIT).app_keys == ("app2",)
    assert scheduler.wait_idle(WAIT)
    assert recorder.batches() == [("app2", False, ("app2",))]


def test_an_upload_releasing_temporaries_one_by_one_does_not_wake_the_dispatcher_each_time(
    make: MakeScheduler,
) -> None:
    # rsync holds and releases one temporary per file: only a release that makes the key due
    # sooner than the dispatcher will look anyway is worth waking it (and the GIL) for.
    recorder = Recorder()
    scheduler = make(recorder, settle=30, max_wait=60)
    wakes = itertools.count()
    condition = scheduler._dispatcher_cv
    notify = condition.notify

    def counted(n: int = 1) -> None:
        next(wakes)
        notify(n)

    condition.notify = counted  # type: ignore[method-assign]
    for i in range(1000):
        scheduler.hold("app1", False, f"/src/app1/.f{i}.AbC123")
        scheduler.release("app1", False, f"/src/app1/.f{i}.AbC123")
        scheduler.submit("app1", False, f"/src/app1/f{i}")
        if i == 0:  # the dispatcher has seen the key once: it knows when it is due
            wait_until(lambda: scheduler.snapshot()["pending"], WAIT)
            wait_until(lambda: not scheduler._dirty, WAIT)
    assert next(wakes) < 10
    # (A release that makes a held key due sooner still wakes it: the test above.)


def test_max_wait_bounds_a_hold_that_is_never_released(make: MakeScheduler) -> None:
    max_wait = 0.4
    recorder = Recorder()
    scheduler = make(recorder, settle=0.01, max_wait=max_wait)
    submitted = time.monotonic()
    scheduler.submit("app1", False, "/src/app1/x")
    scheduler.hold("app1", False, "/src/app1/.y.AbC123")
    batch = recorder.started.get(timeout=WAIT)
    assert recorder.runs[0].start - submitted >= max_wait
    assert batch.app_keys == ("app1",)


def test_new_timings_apply_in_place_and_keep_pending_keys(make: MakeScheduler) -> None:
    recorder = Recorder(hold=True)
    scheduler = make(recorder, settle=30, max_wait=60, workers=1)
    scheduler.submit("a", False, "/a/1", immediate=True)
    recorder.started.get(timeout=WAIT)
    scheduler.submit("b", False, "/b/1")  # due in 30 s under the old settle time
    scheduler.reconfigure(settle=0.05, max_wait=1, workers=2)
    # The running batch is untouched; the pending key runs on the new worker, by the new
    # settle time, while the first worker is still busy.
    batch = recorder.started.get(timeout=WAIT)
    assert (batch.app_keys, batch.paths, batch.trigger) == (("b",), ("/b/1",), "watcher")
    assert recorder.max_active == 2
    recorder.release()
    assert scheduler.wait_idle(WAIT)
    assert recorder.batches() == [("a", False, ("a",)), ("b", False, ("b",))]


def test_fewer_workers_after_a_reconfigure_run_fewer_batches_at_once(
    make: MakeScheduler,
) -> None:
    recorder = Recorder(hold=True)
    scheduler = make(recorder, workers=3)
    scheduler.reconfigure(settle=0.05, max_wait=5, workers=1)
    for app in "abc":
        scheduler.submit(app, False, immediate=True)
    recorder.started.get(timeout=WAIT)
    with pytest.raises(queue.Empty):
        recorder.started.get(timeout=QUIET)
    recorder.release()
    assert scheduler.wait_idle(WAIT)
    assert recorder.max_active == 1
    assert sorted(g for r in recorder.runs for g in r.batch.groups) == list("abc")

    def workers() -> list[str]:
        prefix = "syncpro-scheduler-worker"
        return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]

    wait_until(lambda: workers() == ["syncpro-scheduler-worker-1"], timeout=WAIT)


def test_touching_a_temporary_pushes_the_settle_time_back_but_never_runs(
    make: MakeScheduler,
) -> None:
    settle = 0.2
    recorder = Recorder()
    scheduler = make(recorder, settle=settle, max_wait=30)
    scheduler.touch("app1", False)  # nothing pending: nothing to push, nothing to run
    scheduler.submit("app1", False, "/src/app1/a")
    touched = 0.0
    for _ in range(4):
        pause(settle / 2)
        touched = time.monotonic()
        scheduler.touch("app1", False)
    batch = recorder.started.get(timeout=WAIT)
    assert recorder.runs[0].start - touched >= settle
    assert (batch.events, batch.paths) == (1, ("/src/app1/a",))
    assert scheduler.wait_idle(WAIT)
    assert len(recorder.runs) == 1


def test_busy_says_which_keys_are_pending_and_which_are_running(make: MakeScheduler) -> None:
    recorder = Recorder(hold=True)
    scheduler = make(recorder, workers=1)
    scheduler.submit("a", False, immediate=True)
    recorder.started.get(timeout=WAIT)
    scheduler.submit("a", False, "again")  # arrives while a runs: one more run afterwards
    scheduler.submit("b", True, immediate=True)
    assert scheduler.busy() == (frozenset({("a", False), ("b", True)}), frozenset({("a", False)}))
    recorder.release()
    assert scheduler.wait_idle(WAIT)
    assert scheduler.busy() == (frozenset(), frozenset())


def test_a_catch_up_of_many_groups_looks_each_key_up_once_and_keeps_batches_whole() -> None:
    # With more ready groups than workers can take, packed, a dispatch stops looking groups
    # up once every worker has its batch, yet a batch still takes every due key of its groups.
    groups = {f"app{n:03d}": f"g{n % 40:02d}" for n in range(120)}
    looked_up: Counter[str] = Counter()
    version: list[object] = [object()]

    def group_of(app_key: str) -> str | None:
        looked_up[app_key] += 1
        return groups.get(app_key)

    recorder = Recorder(work=0.002)
    scheduler = Scheduler(
        recorder,
        settle=30,
        max_wait=60,
        workers=2,
        group_of=group_of,
        groups_version=lambda: version[0],
    )
    try:
        for app_key in groups:
            scheduler.submit(app_key, False, trigger="catch-up", immediate=True)
        scheduler.start()
        assert scheduler.wait_idle(WAIT)
        ran = sorted(g for r in recorder.runs for g in r.batch.groups)
        assert ran == sorted(f"g{n:02d}" for n in range(40))
        for run in recorder.runs:
            assert sorted(run.batch.app_keys) == sorted(
                k for k, g in groups.items() if g in run.batch.groups
            )
        assert max(looked_up.values()) == 1
        # A new version of the groups (a reload) is looked up again.
        groups["app000"] = "moved"
        version[0] = object()
        scheduler.submit("app000", False, trigger="rescan", immediate=True)
        assert scheduler.wait_idle(WAIT)
        assert recorder.runs[-1].batch.group == "moved"
    finally:
        scheduler.stop(timeout=WAIT)
