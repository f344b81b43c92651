"""Detached helper: wait out the grace period of replaced trees, then remove them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import threading
import time
from pathlib import Path

from syncpro.engine.publish import next_expiry, sweep

_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}.get(platform.machine())
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_IDLE = 3


def yield_to_others(*, cpu: bool = True) -> None:
    """Run the calling thread at idle I/O priority, and with `cpu` at idle CPU priority too:
    retiring a replaced tree (thousands of stats or unlinks) must never slow a sync or the
    deploy step reading the new tree. A thread of the daemon keeps its CPU priority: one
    that never got a core while holding the interpreter lock would stall the others. Best
    effort: where the kernel refuses, the work runs at normal priority."""
    if _IOPRIO_SET is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        # ioprio_set(IOPRIO_WHO_PROCESS, tid, IOPRIO_PRIO_VALUE(IDLE, 0)): per thread on Linux.
        libc.syscall(
            _IOPRIO_SET, _IOPRIO_WHO_PROCESS, threading.get_native_id(), _IOPRIO_CLASS_IDLE << 13
        )
    if cpu:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


def io_priority_class(tid: int) -> int | None:
    """The I/O priority class of a thread (3 is idle), or None where it cannot be read."""
    if _IOPRIO_SET is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    value = libc.syscall(_IOPRIO_SET + 1, _IOPRIO_WHO_PROCESS, tid)  # ioprio_get
    return None if value < 0 else int(value) >> 13


def sweep_quietly(roots: list[Path], now: float | None = None) -> None:
    """Sweep roots on the calling thread, at idle I/O priority (the daemon's sweep thread)."""
    yield_to_others(cpu=False)
    for root in roots:
        sweep(root, now)


def main(argv: list[str]) -> int:
    yield_to_others()
    roots = [Path(arg) for arg in argv]
    deadline = time.time() + 24 * 3600  # never linger for ever, whatever the clock does
    while roots and time.time() < deadline:
        expiries = [e for e in (next_expiry(r) for r in roots) if e is not None]
        if not expiries:
            return 0
        time.sleep(max(0.0, min(expiries) - time.time()) + 0.05)
        for root in roots:
            sweep(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
