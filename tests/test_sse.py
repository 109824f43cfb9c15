"""Frame re-cutting: upstream bytes are relayed whole-frame, and truncation is noticed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from inference_core import sse
from inference_core.errors import BadUpstreamResponse


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _collect(*parts: bytes) -> list[bytes]:
    async def run() -> list[bytes]:
        return [frame async for frame in sse.whole_frames(_chunks(*parts))]

    return asyncio.run(run())


def test_frames_split_across_chunks_are_joined() -> None:
    assert _collect(b'data: {"a"', b": 1}\n\n", sse.DONE) == [b'data: {"a": 1}\n\n', sse.DONE]
    assert _collect(b"data: 1\n", b"\ndata: [DONE]\n\n") == [b"data: 1\n\ndata: [DONE]\n\n"]


def test_many_frames_in_one_chunk_pass_as_one_piece() -> None:
    body = b"data: 1\n\ndata: 2\n\n" + sse.DONE
    assert _collect(body) == [body]


def test_crlf_separators() -> None:
    assert _collect(b"data: 1\r\n\r\ndata: [DONE]\r\n\r\n") == [b"data: 1\r\n\r\ndata: [DONE]\r\n\r\n"]


@pytest.mark.parametrize("parts", [(b"data: 1\n\n",), (b"data: 1\n\ndata: [DO",), ()])
def test_missing_done_is_an_error(parts: tuple[bytes, ...]) -> None:
    with pytest.raises(BadUpstreamResponse):
        _collect(*parts)
