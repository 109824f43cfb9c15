"""multipart: form text fields read and rewritten in place, on bodies real clients send and on hostile ones."""

from __future__ import annotations

import email.parser
import email.policy
import random
import string
from typing import Any

import httpx
import httpx2
import openai
import pytest

from inference_core import multipart

URL = "http://backend/v1/audio/transcriptions"
B = b"b0undary"
AUDIO = b"RIFF\x00\x01\xff\r\n--b0und\r\n--b0undaryX\r\n-- b0undary\r\n\r\n--b0undary \r\nWAVE"


def _encoded(*, files: Any = None, data: dict[str, Any] | None = None, boundary: str = "") -> tuple[bytes, bytes]:
    """A body as httpx sends it (so as the openai SDK does), and its boundary."""
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"} if boundary else {}
    request = httpx.Request("POST", URL, data=data, files=files, headers=headers)
    found = multipart.boundary(request.headers["content-type"])
    assert found is not None
    return request.read(), found


def _form(*parts: bytes, preamble: bytes = b"", epilogue: bytes = b"\r\n") -> bytes:
    """A body with these parts (each ``headers CRLF CRLF content``), delimited by ``B``."""
    return preamble + b"".join(b"--" + B + b"\r\n" + part + b"\r\n" for part in parts) + b"--" + B + b"--" + epilogue


def _field(name: bytes, value: bytes, *, headers: bytes = b"") -> bytes:
    return b'Content-Disposition: form-data; name="' + name + b'"\r\n' + headers + b"\r\n" + value


def _file(content: bytes = AUDIO, *, name: bytes = b"file") -> bytes:
    disposition = b'Content-Disposition: form-data; name="' + name + b'"; filename="a.wav"\r\n'
    return disposition + b"Content-Type: audio/wav\r\n\r\n" + content


def _by_email(body: bytes, boundary: bytes) -> dict[str, bytes]:
    """The form as the standard library's MIME parser reads it: an independent opinion."""
    head = b'Content-Type: multipart/form-data; boundary="' + boundary + b'"\r\n\r\n'
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    return {str(part.get_param("name", header="content-disposition")): part.get_payload(decode=True)
            for part in message.iter_parts()}  # fmt: skip


# The boundary, from the Content-Type header.


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("multipart/form-data; boundary=abc123", b"abc123"),
        ('multipart/form-data; boundary="abc123"', b"abc123"),
        ('Multipart/Form-Data;BOUNDARY="a b:c=d?"', b"a b:c=d?"),
        (
            "multipart/form-data; charset=utf-8; boundary=----WebKitFormBoundary7MA4YWxk",
            b"----WebKitFormBoundary7MA4YWxk",
        ),
        ("  multipart/form-data ;  boundary = xyz ; ", b"xyz"),
        ("multipart/form-data; boundary=" + "x" * 70, b"x" * 70),
    ],
)
def test_the_boundary_is_read_from_the_content_type(content_type: str, expected: bytes) -> None:
    assert multipart.boundary(content_type) == expected


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "multipart/mixed; boundary=abc",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        'multipart/form-data; boundary=""',
        "multipart/form-data; boundary=" + "x" * 71,  # RFC 2046 allows 70
        'multipart/form-data; boundary="ends in a space "',
        'multipart/form-data; boundary="a\\"b"',  # a character RFC 2046 does not allow
        'multipart/form-data; boundary="unterminated',
        "multipart/form-data; boundary=abc def",
        "multipart/form-data; boundary=abc; boundary=def",  # which one?
        "multipart/form-data boundary=abc",
    ],
)
def test_other_types_and_bad_boundaries_have_none(content_type: str) -> None:
    assert multipart.boundary(content_type) is None


# Bodies real clients send.


def test_fields_before_the_file_as_httpx_sends_them() -> None:
    body, boundary = _encoded(data={"model": "whisper-1", "language": "en"}, files={"file": ("a.wav", AUDIO)})
    assert multipart.read_field(body, boundary, "model") == "whisper-1"
    assert multipart.read_field(body, boundary, "language") == "en"
    assert multipart.read_field(body, boundary, "file") is None  # a file, not a text field
    assert multipart.read_field(body, boundary, "prompt") is None


def test_a_field_after_the_file() -> None:
    body, boundary = _encoded(files=[("file", ("a.wav", AUDIO)), ("model", (None, "whisper-1"))])
    assert body.index(AUDIO) < body.index(b"whisper-1")
    assert multipart.read_field(body, boundary, "model") == "whisper-1"


def test_what_the_openai_sdk_sends_is_read_and_rewritten() -> None:
    sent: list[httpx2.Request] = []

    def backend(request: httpx2.Request) -> httpx2.Response:
        sent.append(request)
        return httpx2.Response(200, json={"text": "ok"})

    # The SDK's default client, so the body is encoded by the HTTP library the SDK itself uses.
    http = openai.DefaultHttpxClient(transport=httpx2.MockTransport(backend))
    with openai.OpenAI(api_key="k", base_url="http://backend/v1", http_client=http) as sdk:
        sdk.audio.transcriptions.create(model="whisper", file=("a.wav", AUDIO), language="de", temperature=0.2)
    (request,) = sent
    boundary = multipart.boundary(request.headers["content-type"])
    assert boundary is not None
    body = request.read()
    assert [multipart.read_field(body, boundary, name) for name in ("model", "language", "temperature")] == [
        "whisper", "de", "0.2"
    ]  # fmt: skip
    rewritten = multipart.replace_field(body, boundary, "model", "openai/whisper-large-v3")
    assert multipart.read_field(rewritten, boundary, "model") == "openai/whisper-large-v3"
    assert _by_email(rewritten, boundary) == {"model": b"openai/whisper-large-v3", "language": b"de",
                                              "temperature": b"0.2", "file": AUDIO}  # fmt: skip


def test_values_are_utf8_and_may_be_empty_or_hold_line_breaks() -> None:
    body, boundary = _encoded(data={"prompt": "Grüße,\r\nçà 日本", "language": ""}, files={"file": ("a", b"x")})
    assert multipart.read_field(body, boundary, "prompt") == "Grüße,\r\nçà 日本"
    assert multipart.read_field(body, boundary, "language") == ""


def test_a_utf8_field_name() -> None:
    body, boundary = _encoded(data={"módèl": "x"}, files={"file": ("a", b"x")})
    assert multipart.read_field(body, boundary, "módèl") == "x"


def test_parts_locate_every_part_and_the_file_content_exactly() -> None:
    body, boundary = _encoded(data={"model": "m", "t[]": ["a", "b"]}, files={"file": ("clip.wav", AUDIO)})
    found = multipart.parts(body, boundary)
    assert found is not None
    assert [(part.name, part.filename) for part in found] == [
        ("model", None), ("t[]", None), ("t[]", None), ("file", "clip.wav")
    ]  # fmt: skip
    assert body[found[-1].start : found[-1].end] == AUDIO


# Hand-written bodies: what RFC 7578 and RFC 2046 allow.


def test_header_names_and_the_disposition_in_any_case() -> None:
    body = _form(b'CONTENT-DISPOSITION: Form-Data; NAME="model"\r\ncontent-type: text/plain\r\n\r\nm', _file())
    assert multipart.read_field(body, B, "model") == "m"


def test_unquoted_and_escaped_names() -> None:
    body = _form(
        b"Content-Disposition: form-data; name=model\r\n\r\nplain",
        b'Content-Disposition: form-data; name="say \\"hi\\""\r\n\r\nquoted',
        b'Content-Disposition:form-data;name="back\\\\slash"\r\n\r\nescaped',
        _file(),
    )
    assert multipart.read_field(body, B, "model") == "plain"
    assert multipart.read_field(body, B, 'say "hi"') == "quoted"
    assert multipart.read_field(body, B, "back\\slash") == "escaped"


def test_a_name_inside_a_quoted_filename_is_not_a_name() -> None:
    trap = b'Content-Disposition: form-data; filename="x; name=\\"model\\""; name="file"\r\n\r\nevil'
    body = _form(trap, _field(b"model", b"good"))
    assert multipart.read_field(body, B, "model") == "good"
    found = multipart.parts(body, B)
    assert found is not None and (found[0].name, found[0].filename) == ("file", 'x; name="model"')


def test_preamble_epilogue_and_a_leading_line_break() -> None:
    body = _form(_field(b"model", b"m"), _file(), preamble=b"This is a preamble.\r\n", epilogue=b"\r\nbye\r\n")
    assert multipart.read_field(body, B, "model") == "m"
    assert multipart.read_field(b"\r\n" + _form(_field(b"model", b"m")), B, "model") == "m"
    assert multipart.read_field(_form(_field(b"model", b"m"), epilogue=b""), B, "model") == "m"


def test_lines_like_the_boundary_inside_a_file_are_content() -> None:
    # Each of these starts like a delimiter; none is CRLF "--b0undary" followed by CRLF or "--".
    body = _form(_file(AUDIO), _field(b"model", b"m"))
    assert multipart.read_field(body, B, "model") == "m"
    found = multipart.parts(body, B)
    assert found is not None and body[found[0].start : found[0].end] == AUDIO


def test_a_field_named_in_a_file_is_not_read() -> None:
    smuggled = b'\r\n--b0undary-\r\nContent-Disposition: form-data; name="model"\r\n\r\nevil'
    body = _form(_file(smuggled), _field(b"model", b"good"))
    assert multipart.read_field(body, B, "model") == "good"


def test_identity_transfer_encodings_are_accepted() -> None:
    body = _form(_field(b"model", b"m", headers=b"Content-Transfer-Encoding: 8BIT\r\n"), _file())
    assert multipart.read_field(body, B, "model") == "m"


# Malformed or ambiguous bodies: no value, rather than one the upstream would read differently.


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_form(_field(b"model", b"a"), _file(), _field(b"model", b"b")), id="sent twice"),
        pytest.param(_form(_field(b"model", b"a"), _file(name=b"model")), id="also a file"),
        pytest.param(_form(_file(name=b"model")), id="only a file"),
        pytest.param(_form(_field(b"model", b"a"))[:-6], id="no close delimiter"),
        pytest.param(_form(_field(b"model", b"a")).replace(b"\r\n", b"\n"), id="bare LF"),
        pytest.param(_form(b"\r\nm"), id="no headers"),
        pytest.param(_form(b'Content-Disposition: form-data; name="model"\r\nbroken\r\n\r\nm'), id="header line"),
        pytest.param(_form(b' Content-Disposition: form-data; name="model"\r\n\r\nm'), id="folded header"),
        pytest.param(_form(b'Content-Disposition: attachment; name="model"\r\n\r\nm'), id="not form-data"),
        pytest.param(_form(b"Content-Disposition: form-data\r\n\r\nm"), id="no name"),
        pytest.param(_form(b'Content-Disposition: form-data; name="model"; name="x"\r\n\r\nm'), id="name twice"),
        pytest.param(_form(b'Content-Disposition: form-data; name="model\r\n\r\nm'), id="open quote"),
        pytest.param(
            _form(_field(b"model", b"m", headers=b'Content-Disposition: form-data; name="x"\r\n')),
            id="two dispositions",
        ),
        pytest.param(_form(_field(b"model", b"bQ==", headers=b"Content-Transfer-Encoding: base64\r\n")), id="base64"),
        pytest.param(
            b"--b0undary\r\n" + _file() + b"\r\n--b0undary \r\n" + _field(b"model", b"m") + b"\r\n--b0undary--",
            id="padded delimiter",
        ),
        pytest.param(b"", id="empty"),
        pytest.param(b"--" + B + b"--\r\n", id="no parts"),
        pytest.param(b"preamble only", id="no delimiter"),
    ],
)
def test_malformed_or_ambiguous_bodies_have_no_value(body: bytes) -> None:
    assert multipart.read_field(body, B, "model") is None
    with pytest.raises(ValueError, match="no single text field"):
        multipart.replace_field(body, B, "model", "x")


def test_a_value_that_is_not_utf8_is_not_read_but_can_be_replaced() -> None:
    body = _form(_field(b"model", b"\xff\xfe"), _file())
    assert multipart.read_field(body, B, "model") is None
    assert multipart.read_field(multipart.replace_field(body, B, "model", "m"), B, "model") == "m"


def test_a_body_cut_short_is_malformed() -> None:
    assert multipart.parts(_form(_field(b"model", b"m"), _file())[:-20], B) is None


# Rewriting.


def test_replacing_changes_only_the_value() -> None:
    body, boundary = _encoded(data={"model": "alias", "language": "en"}, files={"file": ("a.wav", AUDIO)})
    rewritten = multipart.replace_field(body, boundary, "model", "backend/model-name")
    old, new = body.index(b"alias"), rewritten.index(b"backend/model-name")
    assert old == new
    assert rewritten[:new] == body[:old]
    assert rewritten[new + len("backend/model-name") :] == body[old + len("alias") :]
    assert multipart.replace_field(rewritten, boundary, "model", "alias") == body


def test_a_value_holding_the_boundary_is_refused() -> None:
    body = _form(_field(b"model", b"m"), _file())
    with pytest.raises(ValueError, match="boundary"):
        multipart.replace_field(body, B, "model", "x\r\n--b0undary--")
    assert multipart.read_field(multipart.replace_field(body, B, "model", "--b0undar"), B, "model") == "--b0undar"


# Property-style: random forms built by httpx, read back and rewritten.

_NAMES = ["model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]", "módèl"]


def _value(rng: random.Random, boundary: str) -> str:
    alphabet = string.ascii_letters + string.digits + " -_/.:\r\n\"'\\;=éß日"
    value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
    if rng.random() < 0.3:  # something that starts like a delimiter without being one
        value += "\r\n--" + boundary[: rng.randrange(len(boundary))]
    return value


def _content(rng: random.Random, boundary: str) -> bytes:
    pieces = [rng.randbytes(rng.randrange(0, 200))]
    for _ in range(rng.randrange(0, 4)):
        cut = boundary[: rng.randrange(len(boundary) + 1)].encode()
        # After the whole boundary, what no parser takes for the end of a line (AUDIO has harder cases).
        tail = rng.choice([b"x", b" x", b"\tx", b"-x"]) if len(cut) == len(boundary) else b"\r\n"
        pieces += [b"\r\n--" + cut + tail, rng.randbytes(rng.randrange(0, 50))]
    return b"".join(pieces)


@pytest.mark.parametrize("seed", range(300))
def test_random_forms_read_back_and_survive_a_rewrite(seed: int) -> None:
    rng = random.Random(seed)
    boundary = "".join(rng.choice(string.ascii_letters + string.digits + "'()+_,-./:=?") for _ in range(16))
    names = rng.sample(_NAMES, rng.randrange(1, len(_NAMES)))
    values = {name: _value(rng, boundary) for name in names}
    audio = _content(rng, boundary)
    fields: list[tuple[str, Any]] = [(name, (None, value.encode())) for name, value in values.items()]
    fields.insert(rng.randrange(len(fields) + 1), ("file", ("clip.wav", audio)))
    body, found = _encoded(files=fields, boundary=boundary)
    assert found == boundary.encode()

    for name, value in values.items():
        assert multipart.read_field(body, found, name) == value
    parts = multipart.parts(body, found)
    assert parts is not None
    (upload,) = [part for part in parts if part.filename is not None]
    assert body[upload.start : upload.end] == audio

    name = rng.choice(names)
    replacement = _value(rng, boundary)
    rewritten = multipart.replace_field(body, found, name, replacement)
    assert multipart.read_field(rewritten, found, name) == replacement
    for other, value in values.items():
        if other != name:
            assert multipart.read_field(rewritten, found, other) == value
    assert len(rewritten) - len(body) == len(replacement.encode()) - len(values[name].encode())
    assert multipart.replace_field(rewritten, found, name, values[name]) == body
    expected = {other: value.encode() for other, value in values.items()} | {name: replacement.encode()}
    assert _by_email(rewritten, found) == expected | {"file": audio}
