"""The fields of an HTTP request body: multipart/form-data, or a form or JSON line."""

from __future__ import annotations

import logging
from typing import Any

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from syncpro.control.protocol import ProtocolError, request_pairs

MULTIPART = b"multipart/form-data"
# Its warnings repeat, with an offset into the body, what our 400 answer already says; the
# answer and the request's log event are the record, and neither carries the body.
logging.getLogger("python_multipart").addHandler(logging.NullHandler())
logging.getLogger("python_multipart").propagate = False


class FormError(ProtocolError):
    """A multipart body that cannot be read as form fields; nothing ran. HTTP answers 400."""


def body_pairs(content_type: str | None, body: bytes) -> list[tuple[str, Any]]:
    """Given the request's Content-Type and its whole body, return the (name, value) fields
    it carries: a multipart/form-data body's parts (each part's text, a file's as well),
    else the body as one form-encoded or JSON request line. A blank body has none.
    Raise FormError if a multipart body is malformed, and ProtocolError if a line is."""
    kind, options = parse_options_header(content_type)
    if kind != MULTIPART:
        return request_pairs(body)
    boundary = options.get(b"boundary")
    if not boundary:
        raise FormError("multipart/form-data without a boundary in its Content-Type")
    return _multipart_pairs(boundary, body)


class _Part:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.data = bytearray()
        self._name = bytearray()
        self._value = bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        self.headers[bytes(self._name).strip().lower()] = bytes(self._value).strip()
        self._name.clear()
        self._value.clear()


def _multipart_pairs(boundary: bytes, body: bytes) -> list[tuple[str, Any]]:
    parts: list[_Part] = []
    ended = False

    def begin() -> None:
        parts.append(_Part())

    def data(chunk: bytes, start: int, end: int) -> None:
        parts[-1].data += chunk[start:end]

    def end() -> None:
        nonlocal ended
        ended = True

    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": begin,
                "on_part_data": data,
                "on_header_field": lambda d, s, e: parts[-1].header_field(d, s, e),
                "on_header_value": lambda d, s, e: parts[-1].header_value(d, s, e),
                "on_header_end": lambda: parts[-1].header_end(),
                "on_end": end,
            },
        )
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        # Its message can quote a byte of the body: only where it went wrong is said.
        where = f" at byte {exc.offset}" if isinstance(exc, MultipartParseError) else ""
        raise FormError(
            f"multipart body is malformed{where}: it is not form-data parts between boundaries"
        ) from None
    if not ended:
        raise FormError(
            "multipart body ends before its closing boundary: it was cut off or is not"
            " multipart/form-data"
        )
    return [_field(number, part) for number, part in enumerate(parts, 1)]


def _field(number: int, part: _Part) -> tuple[str, str]:
    disposition, options = parse_options_header(part.headers.get(b"content-disposition"))
    raw_name = options.get(b"name")
    if disposition != b"form-data" or raw_name is None:
        raise FormError(f"multipart part {number} is not a form-data field with a name")
    try:
        # parse_options_header hands the header back as latin-1 bytes: these are the bytes sent.
        name = raw_name.decode("utf-8")
        value = bytes(part.data).decode("utf-8")
    except UnicodeDecodeError:
        raise FormError(f"multipart part {number} is not UTF-8 text") from None
    return name, value
