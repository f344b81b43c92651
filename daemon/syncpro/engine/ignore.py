"""Which names a publish leaves out: upload temporaries and the ready marker, by glob."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable


class Ignore:
    """Glob patterns for upload temporaries. A pattern without '/' matches a name; one with
    '/' matches the path relative to the source root."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._names = _compile(p for p in self.patterns if "/" not in p)
        self._paths = _compile(p for p in self.patterns if "/" in p)

    def __call__(self, name: str, rel: str = "") -> bool:
        if self._names is not None and self._names.match(name):
            return True
        return bool(rel and self._paths is not None and self._paths.match(rel))


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    return _compiled(tuple(patterns))


@functools.lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    # Every sync builds its Ignore from the same few patterns: translate them once.
    joined = "|".join(fnmatch.translate(p) for p in patterns)
    return re.compile(joined) if joined else None
