"""Start writing a durable build's data to disk while the build is still copying.

A durable publish flushes once its trees are built (`publish.make_durable`): every byte the
build copied is written out then, after the copy. For a big copy that flush lasts about as
long as the copy itself (200 MB in 5,000 files on a loop ext4: 0.17 s after 0.18 s). Started
in the background each time another `WRITEBACK_BYTES` have been copied, the writing overlaps
the copying, and the final flush finds little left to do: the same durable build took 0.25 s
instead of 0.37 s (`cp -a` + `sync -f`: 0.33 s).

An early flush is a syncfs of the build's filesystem on a thread of its own, one at a time,
waited for only when the build ends. It makes nothing durable: the final flush still does,
after the build. Its failure fails the build: a failed writeback (EIO) is reported to the
first syncfs after it only, so the final flush would never hear of it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

from syncpro.engine import publish

WRITEBACK_BYTES = 16 << 20
"""Bytes copied between two early flushes. Measured on the tree above: 8 and 16 MiB gave
0.25 s, 32 MiB 0.254 s, 64 MiB 0.28 s; a build copying less never starts one."""


class Writeback:
    """Told of the bytes a build copies, from any of its threads; starts an early flush of
    the filesystem holding `folder` whenever `WRITEBACK_BYTES` more have been copied and none
    is running. Used as a context manager around the build: leaving it waits for the flush
    running, and raises its OSError if one failed (unless the build itself raised)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._running: threading.Thread | None = None
        self._error: OSError | None = None
        self.flushes = 0
        """Early flushes started: for tests and benchmarks."""

    def __enter__(self) -> Writeback:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        with self._lock:
            running = self._running
        if running is not None:
            running.join()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if kind is None and self._error is not None:
            raise self._error

    def wrote(self, size: int) -> None:
        """Count `size` bytes copied; start an early flush if enough are waiting."""
        with self._lock:
            self._pending += size
            if self._pending < WRITEBACK_BYTES or self._running is not None:
                return
            if self._error is not None:
                return  # the build fails anyway when it ends
            self._pending = 0
            if self._fd is None:
                # Opened once, by the build's first early flush: a build that copies little
                # costs nothing.
                self._fd = os.open(self._folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._running = threading.Thread(
                target=self._flush, args=(self._fd,), name="syncpro-writeback", daemon=True
            )
            self.flushes += 1
            self._running.start()

    def _flush(self, fd: int) -> None:
        try:
            publish.syncfs_or_sync(fd)
        except OSError as exc:
            with self._lock:
                self._error = self._error or exc
        finally:
            with self._lock:
                self._running = None
