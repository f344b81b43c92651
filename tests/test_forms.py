"""Reading the fields of an HTTP request body: multipart/form-data, or a form or JSON line."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from urllib3.filepost import encode_multipart_formdata

from syncpro.control.forms import FormError, body_pairs
from syncpro.control.protocol import ProtocolError

FORM = "multipart/form-data; boundary=XyZ"


def test_a_urlencoded_or_json_body_is_read_as_a_request_line() -> None:
    form = "application/x-www-form-urlencoded"
    assert body_pairs(form, b"action=status&k=a+b") == [("action", "status"), ("k", "a b")]
    assert body_pairs(None, b'{"action": "status"}') == [("action", "status")]
    assert body_pairs("text/plain", b"  \r\n") == []
    with pytest.raises(ProtocolError, match="not a name=value field"):
        body_pairs(form, b"garbage-without-equals")


def test_a_multipart_body_gives_its_parts_in_order_files_included() -> None:
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="action"\r\n\r\nstatus\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="k"; filename="k.txt"\r\n'
        b"Content-Type: text/plain\r\n\r\nserver1\nserver2\r\n"
        b'--XyZ\r\nContent-Disposition: form-data; name="empty"\r\n\r\n\r\n'
        b"--XyZ--\r\nepilogue"
    )
    assert body_pairs(FORM, body) == [
        ("action", "status"),
        ("k", "server1\nserver2"),
        ("empty", ""),
    ]


def test_a_multipart_body_with_no_parts_has_no_fields() -> None:
    assert body_pairs(FORM, b"--XyZ--\r\n") == []


@pytest.mark.parametrize(
    ("content_type", "body", "why"),
    [
        ("multipart/form-data", b"--XyZ--\r\n", "without a boundary"),
        (FORM, b"", "closing boundary"),
        (FORM, b'--XyZ\r\nContent-Disposition: form-data; name="k"\r\n\r\nx', "closing boundary"),
        (FORM, b"--XyZ\r\nno colon here\r\n\r\nx\r\n--XyZ--\r\n", "malformed at byte"),
        (FORM, b"--XyZ\r\nContent-Type: text/plain\r\n\r\nx\r\n--XyZ--\r\n", "with a name"),
        (
            FORM,
            b'--XyZ\r\nContent-Disposition: form-data; name="k"\r\n\r\n\xff\r\n--XyZ--\r\n',
            "not UTF-8",
        ),
    ],
)
def test_a_malformed_multipart_body_is_refused_saying_why(
    content_type: str, body: bytes, why: str
) -> None:
    with pytest.raises(FormError, match=why):
        body_pairs(content_type, body)


_NAME = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"\\%'),
    min_size=1,
    max_size=10,
)
_VALUE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(st.tuples(_NAME, _VALUE, st.booleans()), max_size=8),
    boundary=st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=60),
)
def test_any_form_a_client_library_encodes_is_read_back_as_sent(
    fields: list[tuple[str, str, bool]], boundary: str
) -> None:
    # urllib3 is what requests' files= uses; a part with a filename is sent as a file.
    encoded = [
        (name, (f"{name}.bin", value.encode()) if as_file else value)
        for name, value, as_file in fields
    ]
    body, content_type = encode_multipart_formdata(encoded, boundary=boundary)
    assert body_pairs(content_type, body) == [(name, value) for name, value, _ in fields]
