"""Start on entering a with-block, stop on leaving it: written once for every server and every
owner of threads (the control socket, the HTTP endpoint, the watcher, the scheduler)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self


class Lifecycle(ABC):
    """Something with threads or sockets of its own: `start()` them, `stop()` them with the
    class's default deadline. `with service:` starts it and stops it however the block ends."""

    @abstractmethod
    def start(self) -> None:
        """Start the threads (or bind the sockets)."""

    @abstractmethod
    def stop(self) -> object:
        """Stop them, waiting at most the class's default deadline."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
