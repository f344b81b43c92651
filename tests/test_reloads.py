"""Reload tickets: whoever asked for a reload gets the outcome of one that began after."""

from __future__ import annotations

import threading

import pytest

from syncpro.daemon.reloads import Reloads


def test_a_failed_reload_answers_its_asker_with_the_error() -> None:
    reloads = Reloads()
    ticket = reloads.ask()

    def broken() -> bool:
        reloads.failed("watch.settle: must be positive")
        return False

    assert reloads.around(broken)() is False
    outcome = reloads.wait(ticket, timeout=0)
    assert outcome is not None
    assert (outcome.ok, outcome.error) == (False, "watch.settle: must be positive")


def test_an_ask_made_during_a_reload_waits_for_the_next_one() -> None:
    reloads = Reloads()
    reloads.ask()
    late: list[int] = []

    def reload() -> bool:
        late.append(reloads.ask())  # arrives after this reload read the config
        return True

    reloads.around(reload)()
    assert reloads.wait(late[0], timeout=0) is None
    reloads.around(lambda: True)()
    outcome = reloads.wait(late[0], timeout=0)
    assert outcome is not None and outcome.ok


def test_a_crashed_reload_still_answers_and_reraises() -> None:
    outcomes: list[str | None] = []
    reloads = Reloads(outcomes.append)
    ticket = reloads.ask()

    def crash() -> bool:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        reloads.around(crash)()
    outcome = reloads.wait(ticket, timeout=0)
    assert outcome is not None and not outcome.ok
    assert outcome.error is not None and "boom" in outcome.error
    assert outcomes == [outcome.error]


def test_released_waiters_answer_pending_before_the_end() -> None:
    reloads = Reloads()
    ticket = reloads.ask()
    answered = threading.Event()
    got = []

    def waiter() -> None:
        got.append(reloads.wait(ticket, timeout=30))
        answered.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    reloads.release_waiters()
    assert answered.wait(30)
    thread.join(30)
    assert got[0] is not None and got[0].pending


def test_stopping_answers_waiters_that_the_reload_was_abandoned() -> None:
    reloads = Reloads()
    ticket = reloads.ask()
    reloads.release_waiters("abandoned: the daemon is stopping")

    outcome = reloads.wait(ticket, timeout=0)
    assert outcome is not None
    assert (outcome.ok, outcome.pending) == (False, False)
    assert outcome.error == "abandoned: the daemon is stopping"
