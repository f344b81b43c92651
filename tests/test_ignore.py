"""Ignore answers as fnmatch does, whatever its shortcut for names no pattern can match."""

from __future__ import annotations

import fnmatch

from hypothesis import example, given
from hypothesis import strategies as st

from syncpro.config.model import DEFAULT_IGNORE
from syncpro.engine.ignore import Ignore

# Few letters, so that names and patterns meet often; every glob metacharacter among them.
ALPHABET = "ab.~#*?[]!-"
NAMES = st.text(alphabet="ab.~#[]!-", max_size=8)


@given(st.lists(st.text(alphabet=ALPHABET, max_size=6), max_size=4), NAMES)
@example(["*[ab]"], "a")  # a class at the end: no literal ending
@example(["[!a]b"], "bb")  # a class at the start: no literal beginning
@example(["*"], "x")
def test_a_name_is_ignored_exactly_when_a_pattern_matches_it(
    patterns: list[str], name: str
) -> None:
    expected = any(fnmatch.fnmatchcase(name, p) for p in patterns)

    assert Ignore(patterns)(name) is expected


@given(NAMES)
def test_the_default_patterns_answer_as_fnmatch(name: str) -> None:
    expected = any(fnmatch.fnmatchcase(name, p) for p in DEFAULT_IGNORE)

    assert Ignore(DEFAULT_IGNORE)(name) is expected


def test_names_unlike_every_pattern_are_kept_and_rsync_temporaries_are_not() -> None:
    ignore = Ignore(DEFAULT_IGNORE)

    assert not ignore("Main.class")
    assert not ignore("app.properties")
    assert ignore(".Main.class.a1B2c3")
    assert ignore("upload.part")
    assert ignore("notes~")
    assert ignore(".#lock")
