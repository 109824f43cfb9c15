"""Routing details clients rely on: HEAD wherever GET is, 404 and 405 with ``Allow``."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.conftest import MODEL
from tests.servers import Server

#: Headers that differ between two answers to the same request.
_PER_ANSWER = {"date", "x-request-id"}
GET_ROUTES = [
    "/health", "/health/live", "/health/ready", "/metrics", "/v1/models", f"/v1/models/{MODEL}",
    "/v1/files", "/docs", "/docs/swagger-ui.css", "/openapi.json", "/v1/models/no-such-model", "/v1/batches",
]  # fmt: skip


def _same_answer(http: httpx.Client, path: str) -> None:
    got, head = http.get(path), http.head(path)
    assert head.status_code == got.status_code, path
    assert head.content == b"", path
    assert {k: v for k, v in head.headers.items() if k not in _PER_ANSWER} == {
        k: v for k, v in got.headers.items() if k not in _PER_ANSWER
    }, path


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_answers_as_get_without_a_body(http: httpx.Client, path: str) -> None:
    if path == "/metrics":  # its body (and length) changes with every request; the rest must not
        got, head = http.get(path), http.head(path)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-type"] == got.headers["content-type"]
        assert int(head.headers["content-length"]) > 1000
        return
    _same_answer(http, path)


def test_head_on_a_stored_file_and_its_content(http: httpx.Client) -> None:
    lines = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\n'
    created = http.post("/v1/files", files={"file": ("in.jsonl", lines)}, data={"purpose": "batch"}).json()
    for path in (f"/v1/files/{created['id']}", f"/v1/files/{created['id']}/content", "/v1/files/file-missing"):
        _same_answer(http, path)
    assert http.head(f"/v1/files/{created['id']}/content").headers["content-length"] == str(len(lines))


def test_head_where_get_is_not_answered_is_405(http: httpx.Client) -> None:
    refused = http.head("/v1/chat/completions")
    assert (refused.status_code, refused.headers["allow"], refused.content) == (405, "POST", b"")
    assert http.delete("/health").headers["allow"] == "GET, HEAD"
    assert http.head("/v1/nothing-here").status_code == 404


def test_no_body_follows_a_head_answer_on_the_connection(gateway: Server) -> None:
    """The next answer on a kept-alive connection starts right after HEAD's headers."""
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"HEAD /openapi.json HTTP/1.1\r\nHost: x\r\n\r\nGET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b'{"status":"ok"}'):
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    head, rest = received.split(b"\r\n\r\n", 1)
    assert b"content-length: " in head.lower() and rest.startswith(b"HTTP/1.1 200")
