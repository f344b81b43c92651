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
        names = [p for p in self.patterns if "/" not in p]
        self._names = _compile(names)
        self._paths = _compile(p for p in self.patterns if "/" in p)
        # Asked once per name of every sync: most names start and end unlike any pattern,
        # which two string tests tell faster than the regular expression (6 % of a walk).
        ends = [_literal_ends(p) for p in names]
        self._prefixes = tuple(head for head, _ in ends if head)
        self._suffixes = tuple(tail for head, tail in ends if tail and not head)
        self._unbounded = any(not head and not tail for head, tail in ends)

    def __call__(self, name: str, rel: str = "") -> bool:
        if (
            self._names is not None
            and (
                self._unbounded or name.startswith(self._prefixes) or name.endswith(self._suffixes)
            )
            and self._names.match(name)
        ):
            return True
        return bool(rel and self._paths is not None and self._paths.match(rel))


def _literal_ends(pattern: str) -> tuple[str, str]:
    """The text every name a glob matches starts with and ends with ("" where unknown): what
    comes before its first wildcard or class, and after its last."""
    first = min((i for i, c in enumerate(pattern) if c in "*?["), default=len(pattern))
    last = max((i for i, c in enumerate(pattern) if c in "*?[]"), default=-1)
    return pattern[:first], pattern[last + 1 :]


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    return _compiled(tuple(patterns))


@functools.lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    # Every sync builds its Ignore from the same few patterns: translate them once.
    joined = "|".join(fnmatch.translate(p) for p in patterns)
    return re.compile(joined) if joined else None
