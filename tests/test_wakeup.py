"""The daemon's main loop is woken by signal handlers without ever waiting on a lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

# As the daemon's main loop: waits and clears in a loop while other threads hold the
# interpreter lock (the daemon syncing), and signals arrive from outside at any moment, also
# while the main thread is inside wait() holding whatever it holds there. A threading.Event
# set by the handler deadlocks there (its handler waits for the lock the interrupted wait
# holds); this script, with one, dies of the handlers piling up or hangs.
LOOP = textwrap.dedent(
    """
    import signal, sys, threading
    from syncpro.daemon.wakeup import Wakeup
    wake = Wakeup()
    handled = 0
    def on_signal(signum, frame):
        global handled
        handled += 1
        wake.set()
    signal.signal(signal.SIGUSR1, on_signal)
    def busy():
        while True:
            sum(range(1000))
    threading.Thread(target=busy, daemon=True).start()
    print("ready", flush=True)
    while handled < int(sys.argv[1]):
        wake.wait(0.0005)
        wake.clear()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # more come while it exits
    print("done", flush=True)
    """
)


def test_a_wakeup_set_by_a_thousand_signals_never_stalls_the_waiting_loop() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", LOOP, "1000"], stdout=subprocess.PIPE, text=True
    ) as loop:
        assert loop.stdout is not None
        try:
            assert loop.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 60
            while loop.poll() is None and time.monotonic() < deadline:
                os.kill(loop.pid, signal.SIGUSR1)
                time.sleep(0.0002)  # a pace the loop can keep up with, not a synchronisation
            assert loop.poll() is not None, "the loop stalled under signals"
            assert loop.returncode == 0
            assert loop.stdout.read().split() == ["done"]
        finally:
            loop.kill()


def test_a_wakeup_waits_for_its_timeout_when_nothing_sets_it() -> None:
    from syncpro.daemon.wakeup import Wakeup

    wake = Wakeup()
    assert wake.wait(0.01) is False
    wake.set()
    wake.set()
    assert wake.wait(0) is True
    wake.clear()
    assert wake.wait(0) is False
