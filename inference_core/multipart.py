"""The text fields of a multipart/form-data body, read and rewritten without parsing its uploads.

The gateway routes an audio upload by its ``model`` field and, when it maps an alias to a
backend's name, rewrites that one field; every other byte is relayed as it came. So only part
headers are parsed: delimiters are found with ``bytes.find`` and file content is never copied
or scanned in Python.

What is accepted follows RFC 7578 as python-multipart reads it (the parser behind Starlette, so
behind vLLM), because a relay that saw the parts differently from its upstream could route by a
field the upstream never reads:

- Lines end in CRLF (RFC 7578 §4.1). Bare LF is not tolerated: python-multipart rejects it.
- A delimiter is CRLF ``--boundary`` followed by CRLF, or by ``--`` after the last part; the
  same bytes followed by anything else are content, as in python-multipart.
- A preamble before the first delimiter and an epilogue after the last are ignored (RFC 2046
  §5.1.1; python-multipart refuses a preamble, so such a body fails upstream, never misleads).
- Content-Transfer-Encoding (deprecated by RFC 7578 §4.7, yet decoded by python-multipart),
  a part without a form-data Content-Disposition, or a header that does not parse make the
  whole body malformed, and so does a field sent twice for the field asked about (Starlette
  keeps the last one): there is no single value both sides would agree on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MAIN = re.compile(rf"[ \t]*({_TOKEN}(?:/{_TOKEN})?)")
_PARAMETER = re.compile(rf'[ \t]*;[ \t]*({_TOKEN})[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]+))')
_ESCAPED = re.compile(r'\\([\\"])')
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*")
#: RFC 2046 §5.1.1: 1 to 70 of these characters, the last not a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
#: Content-Transfer-Encodings that leave the content as it is.
_IDENTITY = frozenset({"7bit", "8bit", "binary"})


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a form: its field name, its filename if it is a file, and where its content lies."""

    name: str
    filename: str | None
    start: int
    end: int


def boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type, or None for any other type or a bad boundary."""
    parsed = _parameters(content_type)
    if parsed is None or parsed[0] != "multipart/form-data":
        return None
    value = parsed[1].get("boundary")
    if value is None or _BOUNDARY.fullmatch(value) is None:
        return None
    return value.encode("ascii")


def parts(body: bytes, boundary: bytes) -> list[Part] | None:
    """The parts of ``body`` in order, or None if it is malformed."""
    delimiter = b"\r\n--" + boundary
    # The first delimiter may open the body, without the CRLF that belongs to it elsewhere.
    at = -2 if body.startswith((delimiter[2:] + b"\r\n", delimiter[2:] + b"--")) else _delimiter(body, delimiter, 0)
    found: list[Part] = []
    while at is not None:
        after = at + len(delimiter)
        if body.startswith(b"--", after):
            return found
        start = after + 2
        head_end = -1 if body.startswith(b"\r\n", start) else body.find(b"\r\n\r\n", start)  # no headers, no name
        if head_end < 0:
            return None
        described = _describe(body[start:head_end])
        content = head_end + 4
        at = _delimiter(body, delimiter, content)
        if described is None or at is None:
            return None
        found.append(Part(described[0], described[1], content, at))
    return None


def read_field(body: bytes, boundary: bytes, name: str) -> str | None:
    """The value of text field ``name``: None if absent, sent twice, a file or not UTF-8, or the body is malformed."""
    part = _field(body, boundary, name)
    if part is None:
        return None
    try:
        return body[part.start : part.end].decode()
    except UnicodeDecodeError:
        return None


def replace_field(body: bytes, boundary: bytes, name: str, value: str) -> bytes:
    """``body`` with text field ``name`` set to ``value``, every other byte unchanged.

    Raises ``ValueError`` when the body is malformed or has no single text field ``name``, or
    when ``value`` holds the boundary (it would end its part early).
    """
    part = _field(body, boundary, name)
    if part is None:
        raise ValueError(f"the form has no single text field {name!r}")
    encoded = value.encode()
    if b"--" + boundary in encoded:
        raise ValueError("the value contains the form's boundary")
    whole = memoryview(body)
    return b"".join((whole[: part.start], encoded, whole[part.end :]))


def _field(body: bytes, boundary: bytes, name: str) -> Part | None:
    """The one text part named ``name``."""
    found = parts(body, boundary)
    if found is None:
        return None
    named = [part for part in found if part.name == name]
    if len(named) != 1 or named[0].filename is not None:
        return None
    return named[0]


def _delimiter(body: bytes, delimiter: bytes, start: int) -> int | None:
    """Where the next delimiter (its leading CRLF) is, at or after ``start``."""
    while (at := body.find(delimiter, start)) >= 0:
        if body.startswith((b"\r\n", b"--"), at + len(delimiter)):
            return at
        start = at + 1
    return None


def _describe(headers: bytes) -> tuple[str, str | None] | None:
    """(field name, filename) from a part's header block, or None if it is malformed."""
    disposition = None
    for line in headers.split(b"\r\n"):
        match = _HEADER.fullmatch(line)
        if match is None:
            return None
        header = match[1].lower()
        if header == b"content-disposition":
            if disposition is not None:
                return None
            disposition = _parameters(match[2].decode("latin-1"))
        elif header == b"content-transfer-encoding" and match[2].decode("latin-1").lower() not in _IDENTITY:
            return None
    if disposition is None or disposition[0] != "form-data" or "name" not in disposition[1]:
        return None
    filename = disposition[1].get("filename")
    return _text(disposition[1]["name"]), None if filename is None else _text(filename)


def _parameters(value: str) -> tuple[str, dict[str, str]] | None:
    """A header's lower-cased main value and its parameters, or None if it does not parse.

    A parameter given twice does not parse: readers disagree on which one counts.
    """
    main = _MAIN.match(value)
    if main is None:
        return None
    parameters: dict[str, str] = {}
    at = main.end()
    while value[at:].strip(" \t;"):
        match = _PARAMETER.match(value, at)
        if match is None:
            return None
        key = match[1].lower()
        if key in parameters:
            return None
        parameters[key] = match[3] if match[2] is None else _ESCAPED.sub(r"\1", match[2])
        at = match.end()
    return main[1].lower(), parameters


def _text(latin1: str) -> str:
    """A header parameter (decoded as Latin-1) as the UTF-8 it usually is, as Starlette decodes it."""
    raw = latin1.encode("latin-1")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return latin1
