"""The control request parser: the seed's form, JSON, and every way a request is refused."""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_request import reading
from syncpro.control.protocol import (
    ACTIONS,
    DIFF_ACTION,
    MAX_REQUEST,
    NEEDS_K,
    ControlRequest,
    ProtocolError,
    parse_request,
    to_sync_request,
)
from syncpro.engine.request import SYNC_ACTION
from syncpro.engine.response import REDACTED
from syncpro.errors import RequestError

SECRET = "1527669337mxchcptwhwevbwgyiahtilfadcycyfxm"  # noqa: S105 - the seed's example


def refused(raw: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_request(raw)
    assert info.value.reason
    assert str(info.value) == info.value.reason
    return info.value


# --- what is understood ---


def test_the_seeds_first_example_syncs_the_group_from_remotecomdir() -> None:
    req = parse_request(b"action=Deploy:Core:syncpro&k='server'\n")
    assert (req.action, req.k, req.update) == (SYNC_ACTION, "server", False)


def test_the_seeds_second_example_syncs_from_updatedir() -> None:
    req = parse_request(b"action=Deploy:Core:syncpro&k='server'&update='1'\n")
    assert (req.k, req.update) == ("server", True)


def test_the_seeds_request_example_with_commas_normalises_k() -> None:
    req = parse_request(b"action=Deploy:Core:syncpro&k=server1,server2")
    assert req.echo() == {"action": SYNC_ACTION, "k": "server1 server2", "update": "0"}


def test_plus_and_percent_escapes_are_decoded_and_double_quotes_stripped() -> None:
    raw = b"action=Deploy%3ACore%3Asyncpro&k=%22server1+server2%22&update=%221%22\r\n"
    req = parse_request(raw)
    assert (req.action, req.k, req.update) == (SYNC_ACTION, "server1 server2", True)


def test_a_json_object_with_the_same_fields_is_understood() -> None:
    req = parse_request(json.dumps({"action": DIFF_ACTION, "k": "server1", "update": "1"}).encode())
    assert (req.action, req.k, req.update) == (DIFF_ACTION, "server1", True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, False), (1, True), (False, False), (True, True), ("0", False), ("1", True), ("", False)],
)
def test_json_update_may_be_0_or_1_as_a_string_or_a_number_or_a_boolean(
    value: object, expected: bool
) -> None:
    raw = json.dumps({"action": SYNC_ACTION, "k": "a", "update": value}).encode()
    req = parse_request(raw)
    assert req.update is expected
    assert req.echo()["update"] == ("1" if expected else "0")


@pytest.mark.parametrize(("value", "expected"), [(1, "1"), ("1", "1"), (2.5, "2.5"), (0, "0")])
def test_json_w_may_be_a_string_or_a_number(value: object, expected: str) -> None:
    raw = json.dumps({"action": SYNC_ACTION, "k": "a", "w": value}).encode()
    assert parse_request(raw).w == expected


def test_json_pretty_may_be_a_boolean() -> None:
    assert parse_request(b'{"action": "status", "pretty": true}').pretty is True


def test_status_and_reload_need_no_k() -> None:
    assert parse_request(b"action=status").action == "status"
    assert parse_request(b'{"action": "reload"}').action == "reload"


def test_w_and_token_are_accepted_and_the_token_is_only_ever_echoed_redacted() -> None:
    req = parse_request(f"action=Deploy:Core:syncpro&k=server&w=1&token={SECRET}".encode())
    assert req.w == "1"
    assert req.token_given
    assert req.echo()["token"] == REDACTED
    assert SECRET not in repr(req)
    assert SECRET not in json.dumps(req.echo())


def test_stray_ampersands_are_harmless() -> None:
    assert parse_request(b"action=status&&").action == "status"


def test_a_request_of_exactly_64_kib_is_accepted() -> None:
    head = b"action=Deploy:Core:syncpro&k="
    raw = head + b"a" * (MAX_REQUEST - len(head))
    assert len(raw) == MAX_REQUEST
    assert parse_request(raw + b"\n").k == "a" * (MAX_REQUEST - len(head))


def test_to_sync_request_carries_every_field_and_the_origin() -> None:
    req = parse_request(f"action=Deploy:Core:diff&k=server&update=1&w=1&token={SECRET}".encode())
    sync = to_sync_request(req, "control")
    assert (sync.action, sync.k, sync.update, sync.w, sync.token_given, sync.origin) == (
        DIFF_ACTION,
        "server",
        True,
        "1",
        True,
        "control",
    )


def test_to_sync_request_refuses_a_request_without_k() -> None:
    with pytest.raises(ProtocolError):
        to_sync_request(parse_request(b"action=status"), "control")


# --- what is refused, and why ---


def test_a_protocol_error_is_a_request_error() -> None:
    assert issubclass(ProtocolError, RequestError)


def test_a_request_over_64_kib_is_refused() -> None:
    raw = b"action=Deploy:Core:syncpro&k=" + b"a" * MAX_REQUEST
    assert "64 KiB" in refused(raw).reason


def test_invalid_utf8_is_refused() -> None:
    assert "UTF-8" in refused(b"action=Deploy:Core:syncpro&k=\xff\xfe").reason


def test_percent_encoded_invalid_utf8_is_refused() -> None:
    assert "UTF-8" in refused(b"action=Deploy:Core:syncpro&k=%ff").reason


@pytest.mark.parametrize("raw", [b"", b"\n", b"  \r\n", b"&&"])
def test_an_empty_request_is_refused(raw: bytes) -> None:
    assert "empty" in refused(raw).reason


@pytest.mark.parametrize(
    ("raw", "kind"), [(b"[1, 2]", "array"), (b'"x"', "str"), (b"42", "int"), (b"null", "None")]
)
def test_json_that_is_not_an_object_is_refused(raw: bytes, kind: str) -> None:
    reason = refused(raw).reason
    assert "object" in reason
    assert kind in reason


def test_broken_json_is_refused() -> None:
    assert "not valid JSON" in refused(b'{"action": "status"').reason


def test_deeply_nested_json_is_refused_not_crashed() -> None:
    assert "JSON" in refused(b"[" * 60000).reason


def test_text_that_is_neither_form_nor_json_is_refused() -> None:
    assert "neither form-encoded" in refused(b"Deploy:Core:syncpro server").reason


@pytest.mark.parametrize(
    "raw",
    [b"action=status&action=status", b'{"action": "status", "action": "reload"}'],
)
def test_a_repeated_field_is_refused(raw: bytes) -> None:
    assert "more than once" in refused(raw).reason


@pytest.mark.parametrize("raw", [b"k=server", b'{"k": "server"}', b"action=&k=server"])
def test_a_missing_or_empty_action_is_refused(raw: bytes) -> None:
    error = refused(raw)
    assert "action is" in error.reason
    assert "Deploy:Core:syncpro" in error.reason


def test_an_unknown_action_is_refused_and_echoed() -> None:
    error = refused(b"action=Deploy:Core:rm&k=server")
    assert "unknown action 'Deploy:Core:rm'" in error.reason
    assert error.param == {"action": "Deploy:Core:rm", "k": "server"}


@pytest.mark.parametrize("action", sorted(NEEDS_K))
@pytest.mark.parametrize("k", [None, "", "''", " , "])
def test_sync_and_diff_without_a_k_are_refused(action: str, k: str | None) -> None:
    raw = f"action={action}" + ("" if k is None else f"&k={quote(k)}")
    assert "k " in refused(raw.encode()).reason


@pytest.mark.parametrize("update", ["2", "yes", "'true'", "-1"])
def test_an_update_other_than_0_or_1_is_refused(update: str) -> None:
    error = refused(f"action=Deploy:Core:syncpro&k=server&update={update}".encode())
    assert "update must be 0 or 1" in error.reason


@pytest.mark.parametrize("update", ["2", "-1", "1.0", "[1]", '{"a": 1}', '"yes"'])
def test_a_json_update_other_than_0_or_1_is_refused_saying_what_it_may_be(update: str) -> None:
    raw = f'{{"action": "Deploy:Core:syncpro", "k": "a", "update": {update}}}'.encode()
    reason = refused(raw).reason
    assert reason.startswith("update must be 0 or 1"), reason
    assert "must be a string" not in reason


@pytest.mark.parametrize(
    ("w", "shown"), [("true", "true"), ("[1]", "[...]"), ("1e400", "Infinity"), ("null", None)]
)
def test_a_json_w_that_is_not_a_string_or_a_finite_number_is_refused(
    w: str, shown: str | None
) -> None:
    raw = f'{{"action": "Deploy:Core:syncpro", "k": "a", "w": {w}}}'.encode()
    if shown is None:
        assert parse_request(raw).w is None  # null: as if not given
        return
    reason = refused(raw).reason
    assert reason == f"w must be a string or a finite number, not {shown}"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_constants_outside_the_json_standard_are_refused(constant: str) -> None:
    raw = f'{{"action": "Deploy:Core:syncpro", "k": "a", "w": {constant}}}'.encode()
    assert "not valid JSON" in refused(raw).reason


def test_a_json_k_that_is_not_a_string_is_refused() -> None:
    assert "k must be a string" in refused(b'{"action": "Deploy:Core:syncpro", "k": ["a"]}').reason


def test_an_unknown_field_is_ignored_as_the_original_did_and_named() -> None:
    req = parse_request(b"action=Deploy:Core:syncpro&k=server&force=1&x=&force=2")
    assert (req.action, req.k, req.ignored) == ("Deploy:Core:syncpro", "server", ("force", "x"))
    assert "force" not in req.echo()


def test_an_unknown_field_is_still_named_when_the_request_is_refused() -> None:
    error = refused(b"action=Deploy:Core:syncpro&foo=1")
    assert "k is required" in error.reason
    assert error.ignored == ("foo",)
    assert error.document()["ignored"] == ["foo"]


@pytest.mark.parametrize(
    ("raw", "debug", "sprint"),
    [
        (b"action=status&debug=1&sprint=1", True, True),
        (b"action=status&debug=0&sprint=", False, False),
        (b"action=status&debug=yes&sprint='1'", True, True),
        (b'{"action": "status", "debug": true, "sprint": 0}', True, False),
        (b'{"action": "status", "debug": [1], "sprint": null}', True, False),
        (b"action=status&debug=1&debug=0&sprint=0&sprint=on", False, True),  # the last wins
    ],
)
def test_the_originals_debug_and_sprint_are_accepted_with_any_value(
    raw: bytes, debug: bool, sprint: bool
) -> None:
    req = parse_request(raw)
    assert (req.debug, req.sprint, req.ignored) == (debug, sprint, ())


def test_a_refusal_never_echoes_the_token_in_clear() -> None:
    error = refused(f"action=nope&token={SECRET}".encode())
    assert error.param["token"] == REDACTED
    assert SECRET not in repr(error.param) + error.reason


def test_an_echoed_value_is_kept_short() -> None:
    error = refused(b"action=" + b"x" * 5000)
    assert len(error.param["action"]) < 300
    assert len(error.reason) < 500


# --- fuzz ---

FUZZ = settings(max_examples=400, deadline=None)


def understood(req: ControlRequest) -> dict[str, object]:
    """A parsed request in the terms of reference_request.reading."""
    return {
        "action": req.action,
        "k": req.normalised_k,
        "update": req.update,
        "w": req.w,
        "token": req.token_given,
        "pretty": req.pretty,
        "debug": req.debug,
        "sprint": req.sprint,
        "ignored": list(req.ignored),
    }


def _never_wrong(raw: bytes) -> None:
    """The parser succeeds exactly on what a second, plain reading of the rules calls valid,
    and then means the same; every refusal says why."""
    expected = reading(raw)
    try:
        req = parse_request(raw)
    except ProtocolError as exc:
        assert exc.reason
        assert expected is None, f"a valid request was refused ({exc.reason}): {raw!r}"
        return
    assert isinstance(req, ControlRequest)
    assert expected is not None, f"garbage was understood as {req!r}: {raw!r}"
    assert understood(req) == expected
    assert req.action in ACTIONS
    if req.action in NEEDS_K:
        assert req.k is not None and req.normalised_k


@pytest.mark.parametrize(
    "raw",
    [
        b"action=Deploy:Core:syncpro&k=a&update='1",
        b"action=Deploy:Core:syncpro&k=a&update=1'",
        b"action=Deploy:Core:syncpro&k=a&update=\"'1'\"",
        b"action=Deploy:Core:syncpro&k=a&update=''1''",
        b"action=Deploy:Core:syncpro&k=a&update=%20'1'%20",
        b"action=Deploy:Core:syncpro&k=a&update=''",
        b"action=status&pretty='",
        b"action=Deploy:Core:syncpro&k='",
        b"action='status'",
        b"action=' status '",
        b'{"action": "Deploy:Core:syncpro", "k": "a", "update": "\'1"}',
        b'{"action": "status", "pretty": "1"}',
        b"\xef\xbb\xbfaction=status",
        b"action=status\r\r\n",
    ],
)
def test_odd_lines_are_read_as_the_rules_say(raw: bytes) -> None:
    _never_wrong(raw)


QUOTED = st.text(alphabet="01 '\"", max_size=6)


@FUZZ
@given(action=st.sampled_from([*ACTIONS, "x"]), update=QUOTED, pretty=QUOTED, k=QUOTED)
def test_quotes_and_spaces_around_flags_are_read_as_the_rules_say(
    action: str, update: str, pretty: str, k: str
) -> None:
    _never_wrong(urlencode({"action": action, "k": k + "a", "update": update}).encode())
    _never_wrong(json.dumps({"action": action, "pretty": pretty, "k": k}).encode())


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_or_understood_never_crash(raw: bytes) -> None:
    _never_wrong(raw)


@FUZZ
@given(st.text(max_size=200))
def test_random_text_is_refused_or_understood_never_crash(text: str) -> None:
    _never_wrong(text.encode("utf-8", "surrogatepass"))


FIELD = st.sampled_from(["action", "k", "update", "w", "token", "pretty", "x", "K", ""])
VALUE = st.one_of(
    st.sampled_from([*ACTIONS, "Deploy:Core:nope", "0", "1", "'1'", "server", "all", ""]),
    st.text(max_size=20),
)


@FUZZ
@given(st.lists(st.tuples(FIELD, VALUE), max_size=6))
def test_random_forms_are_refused_or_understood_never_crash(pairs: list[tuple[str, str]]) -> None:
    _never_wrong(urlencode(pairs).encode())


@FUZZ
@given(
    st.dictionaries(
        FIELD, st.one_of(VALUE, st.integers(), st.booleans(), st.none(), st.lists(st.integers()))
    )
)
def test_random_json_objects_are_refused_or_understood_never_crash(
    fields: dict[str, object],
) -> None:
    _never_wrong(json.dumps(fields).encode())


KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12)


@FUZZ
@given(
    action=st.sampled_from(sorted(NEEDS_K)),
    keys=st.lists(KEY, min_size=1, max_size=5),
    update=st.booleans(),
    as_json=st.booleans(),
    quote_k=st.sampled_from(["", "'", '"']),
)
def test_valid_requests_round_trip(
    action: str, keys: list[str], update: bool, as_json: bool, quote_k: str
) -> None:
    k = quote_k + " ".join(keys) + quote_k
    fields = {"action": action, "k": k, "update": "1" if update else "0"}
    raw = json.dumps(fields) if as_json else urlencode(fields)
    req = parse_request(raw.encode() + b"\n")
    expected = " ".join(dict.fromkeys(key.strip("'\"") for key in keys if key.strip("'\"")))
    assert (req.action, req.update) == (action, update)
    assert req.echo()["k"] == expected
    sync = to_sync_request(req, "control")
    assert sync.normalised_k == expected
