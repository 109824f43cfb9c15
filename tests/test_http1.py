"""The HTTP/1.1 upstream client alone, against raw servers that write hand-made bytes.

Each case is what a backend, or a proxy in front of one, may send: interim answers, answers
glued together, bytes on an idle connection, stale keep-alive, huge heads, resets, odd framing,
compression. Every case runs on both event loops the gateway may use (asyncio's and uvloop's).
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import random
import socket
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from inference_core.errors import BackendTimeout, BackendUnreachable, BadUpstreamResponse, InvalidRequest
from inference_core.upstream.http1 import MAX_HEAD_BYTES, HTTP1Transport

T = TypeVar("T")
Run = Callable[[Awaitable[T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Run[Any]]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def go(main: Awaitable[T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(main, 30))  # type: ignore[arg-type]

    yield go


class Peer:
    """One accepted connection, from the server's side."""

    def __init__(self, upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.upstream, self.reader, self.writer = upstream, reader, writer
        self.index = upstream.connections

    async def request(self) -> bytes | None:
        """The next request's head and body, or None once the client has closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await self.reader.readexactly(length)
        self.upstream.requests.append(request)
        return request

    async def serve(self, answer: Callable[[bytes], Awaitable[None]]) -> None:
        """Answer every request with ``answer(request)`` until the client leaves."""
        while (request := await self.request()) is not None:
            await answer(request)

    async def send(self, *pieces: bytes) -> None:
        """Each piece in its own write, with a pause so that the client reads each on its own."""
        for index, piece in enumerate(pieces):
            if index:
                await asyncio.sleep(0.002)
            self.writer.write(piece)
            await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP reset instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[Peer], Awaitable[None]]


class Upstream:
    """A loopback server running ``script`` for each connection, counting what it saw."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.open = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(self, reader, writer)
        self.connections += 1
        self.open += 1
        try:
            await self.script(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()


def ok(body: bytes, *, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\ncontent-length: %d\r\n" % len(body) + extra + b"\r\n" + body


def chunked(*pieces: bytes, extra: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n" + extra + b"\r\n" + body + b"0\r\n\r\n"


def transport(upstream: Upstream, *, timeout: float = 10.0, idle: int = 10) -> HTTP1Transport:
    return HTTP1Transport(upstream.url, idle_connections=idle, timeout=timeout)


async def fetch(
    client: HTTP1Transport, *, stream: bool = False, path: str = "chat/completions", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    response = await client.request("POST", path, headers=headers, body=b"{}", stream=stream)
    body = b"".join([chunk async for chunk in response.chunks()]) if stream else await response.read()
    return response.status, dict(response.headers), body


async def started(client: HTTP1Transport) -> HTTP1Transport:
    await client.start()
    return client


async def exchange(
    script: Script, *, count: int = 1, stream: bool = False, **options: Any
) -> tuple[list[tuple[int, dict[str, str], bytes]], Upstream]:
    """``count`` requests one after another from one client to a server running ``script``.

    Returns the answers and the server (what it saw); a failure is raised as the client raised it.
    """
    async with Upstream(script) as upstream:
        client = await started(transport(upstream, **options))
        answers = [await fetch(client, stream=stream) for _ in range(count)]
        return answers, upstream


# Interim answers.


@pytest.mark.parametrize(
    "interim",
    [
        [b"HTTP/1.1 100 Continue\r\n\r\n"],
        [b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"],
        [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"],
    ],
    ids=["100", "103", "100+103"],
)
@pytest.mark.parametrize("together", [False, True], ids=["separate-reads", "one-read"])
def test_interim_answers_are_skipped(run: Run[None], interim: list[bytes], together: bool) -> None:
    """The answer is the first status of 200 or more; the next request on the connection gets its own."""

    async def script(peer: Peer) -> None:
        await peer.request()
        pieces = [*interim, ok(b"first", extra=b"x-which: 1\r\n")]
        await peer.send(b"".join(pieces)) if together else await peer.send(*pieces)
        await peer.request()
        await peer.send(ok(b"second"))

    async def main() -> None:
        async with Upstream(script) as upstream:
            client = await started(transport(upstream))
            status, headers, body = await fetch(client)
            assert (status, headers["x-which"], body) == (200, "1", b"first")
            assert "link" not in headers
            assert await fetch(client) == (200, {"content-length": "6"}, b"second")
            assert upstream.connections == 1
            await client.aclose()

    run(main())


def test_switching_protocols_is_refused(run: Run[None]) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\nxyz")
        await asyncio.sleep(1)

    with pytest.raises(BadUpstreamResponse):
        run(exchange(script))


# Bytes that belong to no request.


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_second_answer_glued_to_the_first_is_never_relayed(run: Run[None], stream: bool) -> None:
    mine = chunked(b"data: 1\n\n", b"data: [DONE]\n\n", extra=b"content-type: text/event-stream\r\n")
    other = chunked(b"data: intruder\n\n", b"data: [DONE]\n\n", extra=b"x-other: yes\r\n")

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(mine + other)
            await asyncio.sleep(1)
        else:
            await peer.serve(lambda _: peer.send(ok(b"fresh")))

    async def main() -> None:
        async with Upstream(script) as upstream:
            client = await started(transport(upstream))
            _, headers, body = await fetch(client, stream=stream)
            assert body == b"data: 1\n\ndata: [DONE]\n\n" and "x-other" not in headers
            assert (await fetch(client))[2] == b"fresh"
            assert upstream.connections == 2

    run(main())


def test_bytes_on_an_idle_connection_close_it(run: Run[None]) -> None:
    async def main() -> None:
        idle, hung_up = asyncio.Event(), asyncio.Event()

        async def script(peer: Peer) -> None:
            if peer.index == 0:
                await peer.request()
                await peer.send(ok(b"first"))
                await idle.wait()
                await peer.send(ok(b"unasked for"))  # the answer to a request nobody sent yet
                if await peer.request() is None:
                    hung_up.set()
                    return
                await peer.send(ok(b"late"))
            else:
                await peer.serve(lambda _: peer.send(ok(b"second")))

        async with Upstream(script) as upstream:
            client = await started(transport(upstream, timeout=5))
            answers = [await fetch(client)]
            idle.set()  # the first answer is read whole: the connection waits in the pool
            async with asyncio.timeout(10):
                await hung_up.wait()  # the client hangs up on the bytes nobody asked for
            answers.append(await fetch(client))
            assert [body for _, _, body in answers] == [b"first", b"second"] and upstream.connections == 2

    run(main())


@pytest.mark.parametrize("extra", [b"hello world", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"])
def test_more_body_than_content_length_closes_the_connection(run: Run[None], extra: bytes) -> None:
    async def script(peer: Peer) -> None:
        await peer.serve(lambda _: peer.send(ok(b"12345") + extra))

    answers, upstream = run(exchange(script, count=2))
    assert [body for _, _, body in answers] == [b"12345", b"12345"] and upstream.connections == 2


# Stale keep-alive.


def test_a_stale_keep_alive_connection_is_retried_once_on_a_new_one(run: Run[None]) -> None:
    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(ok(b"first"))
            await peer.request()  # read the second request, then hang up without a byte of answer
            return
        await peer.serve(lambda _: peer.send(ok(b"again")))

    answers, upstream = run(exchange(script, count=2))
    assert [body for _, _, body in answers] == [b"first", b"again"]
    assert (upstream.connections, len(upstream.requests)) == (2, 3)


def test_a_new_connection_closed_unanswered_is_not_retried_here(run: Run[None]) -> None:
    seen: list[bytes | None] = []

    async def script(peer: Peer) -> None:
        seen.append(await peer.request())

    with pytest.raises(BackendUnreachable):
        run(exchange(script))
    assert len(seen) == 1


def test_a_stale_connection_that_began_its_answer_is_not_retried(run: Run[None]) -> None:
    connections: list[int] = []

    async def script(peer: Peer) -> None:
        connections.append(peer.index)
        await peer.request()
        await peer.send(ok(b"first"))
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-le")

    with pytest.raises(BackendUnreachable):
        run(exchange(script, count=2))
    assert connections == [0]


# Limits on the answer's head.


@pytest.mark.parametrize(
    "head",
    [
        b"".join(b"x-h%d: v\r\n" % i for i in range(200)),
        b"x-big: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n",
    ],
    ids=["200 headers", "one huge header"],
)
def test_oversized_heads_are_refused(run: Run[None], head: bytes) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n" + head + b"content-length: 2\r\n\r\n{}")
        await asyncio.sleep(1)

    with pytest.raises(BadUpstreamResponse):
        run(exchange(script))


def test_an_endless_head_is_cut_off_without_buffering_it(run: Run[None]) -> None:
    written = 0

    async def script(peer: Peer) -> None:
        nonlocal written
        await peer.request()
        peer.writer.write(b"HTTP/1.1 200 OK\r\nx-endless: ")
        for _ in range(4096):  # up to 64 MiB, 16 KiB at a time
            peer.writer.write(b"a" * 16384)
            await peer.writer.drain()
            written += 16384

    with pytest.raises(BadUpstreamResponse):
        run(exchange(script, timeout=20))
    assert written < 8 * 1024 * 1024  # what the socket buffers held when the gateway hung up


# Ends of bodies: framing, resets, HTTP/1.0.


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n"],
    ids=["close-delimited", "chunked"],
)
def test_a_reset_in_the_middle_of_a_body_is_a_failure(run: Run[None], stream: bool, head: bytes) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(head + b"hel")
        await asyncio.sleep(0.05)
        peer.reset()

    with pytest.raises(BadUpstreamResponse):
        run(exchange(script, stream=stream))


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\nhello, world", False),
        (b"HTTP/1.0 200 OK\r\n\r\nhello, world", False),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 12\r\n\r\nhello, world", False),
        (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 12\r\n\r\nhello, world", True),
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 12\r\n\r\nhello, world", False),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\n"
         b"x-trailer: t\r\n\r\n", True),
    ],
    ids=["close-delimited", "http/1.0", "http/1.0 length", "http/1.0 keep-alive", "connection close",
         "chunk extensions and trailers"],
)  # fmt: skip
def test_framings(run: Run[None], answer: bytes, reused: bool) -> None:
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(answer)
            if not reused:
                return  # the body may end where the connection does

    answers, upstream = run(exchange(script, count=2))
    assert [(status, body) for status, _, body in answers] == [(200, b"hello, world")] * 2
    assert upstream.connections == (1 if reused else 2)


def test_a_body_shorter_than_its_length_is_a_failure(run: Run[None]) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b'HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{"id": ')

    with pytest.raises(BadUpstreamResponse):
        run(exchange(script))


# What goes on the wire.


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\rb", "a\x00b"])
def test_header_values_with_cr_lf_or_nul_are_refused_before_anything_is_written(run: Run[None], value: str) -> None:
    async def main() -> None:
        async with Upstream(lambda peer: peer.send()) as upstream:
            client = await started(transport(upstream))
            with pytest.raises(InvalidRequest):
                await client.request("POST", "chat/completions", headers={"x-request-id": value}, body=b"{}")
            with pytest.raises(InvalidRequest):
                await client.request("POST", "chat/completions", headers={value: "v"}, body=b"{}")
            with pytest.raises(InvalidRequest):
                await client.request("GET", "models x", headers={})
            assert upstream.connections == 0

    run(main())


def test_identity_is_asked_for(run: Run[None]) -> None:
    async def script(peer: Peer) -> None:
        await peer.serve(lambda _: peer.send(ok(b"{}")))

    async def main() -> None:
        async with Upstream(script) as upstream:
            await fetch(await started(transport(upstream)), authorization="Bearer k")
            head = upstream.requests[0].lower()
            assert b"\r\naccept-encoding: identity\r\n" in head and b"\r\nauthorization: bearer k\r\n" in head

    run(main())


# Compressed answers, although identity was asked for.


def _deflate(data: bytes) -> bytes:
    return zlib.compress(data)


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_compressed_answers_are_decoded(run: Run[None], encoding: str, stream: bool) -> None:
    events = b"".join(b'data: {"n": %d}\n\n' % i for i in range(200)) + b"data: [DONE]\n\n"
    packed = _deflate(events) if encoding == "deflate" else gzip.compress(events)
    pieces = [packed[i : i + 97] for i in range(0, len(packed), 97)]
    head = b"content-type: text/event-stream\r\ncontent-encoding: " + encoding.encode() + b"\r\n"

    async def script(peer: Peer) -> None:
        await peer.serve(lambda _: peer.send(chunked(*pieces, extra=head) if stream else ok(packed, extra=head)))

    async def main() -> None:
        async with Upstream(script) as upstream:
            client = await started(transport(upstream))
            for _ in range(2):
                _, headers, body = await fetch(client, stream=stream)
                assert body == events
                assert "content-encoding" not in headers and "content-length" not in headers
            assert upstream.connections == 1

    run(main())


@pytest.mark.parametrize(
    ("encoding", "body"),
    [("br", b"\x0b\x02\x80{}\x03"), ("gzip", gzip.compress(b"{}" * 100)[:-12]), ("gzip", b"not gzip at all")],
    ids=["unknown encoding", "truncated gzip", "corrupt gzip"],
)
def test_undecodable_answers_are_refused(run: Run[None], encoding: str, body: bytes) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(body, extra=b"content-encoding: " + encoding.encode() + b"\r\n"))
        await asyncio.sleep(1)

    with pytest.raises(BadUpstreamResponse):
        run(exchange(script))


def test_a_stream_nobody_reads_stops_being_read(run: Run[None]) -> None:
    """Backpressure: the server can write no more than the socket buffers hold, not the whole body."""
    total = 96 * 1024 * 1024  # more than every kernel buffer on the way (receive buffers grow to 32 MB)
    written = 0

    async def script(peer: Peer) -> None:
        nonlocal written
        await peer.request()
        peer.writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        piece = b"x" * 65536
        while written < total:
            peer.writer.write(piece)
            await peer.writer.drain()
            written += len(piece)

    async def main() -> None:
        async with Upstream(script) as upstream:
            response = await (await started(transport(upstream))).request(
                "POST", "chat/completions", headers={}, body=b"{}", stream=True
            )
            chunks = response.chunks()
            await anext(chunks)
            await asyncio.sleep(1.0)
            assert written < total // 2, f"the client kept reading: {written} bytes written"
            async for _ in chunks:  # reading again resumes the flow, to the end
                pass
            assert written == total

    run(main())


# Time limits.


def test_a_silent_stream_times_out_one_timeout_after_its_last_chunk(run: Run[None]) -> None:
    timeout = 2.0
    last_chunk = 0.0

    async def script(peer: Peer) -> None:
        nonlocal last_chunk
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for delay in (0.03, 0.5):
            await asyncio.sleep(delay)
            await peer.send(b"7\r\ndata: 1\r\n")
            last_chunk = time.monotonic()
        await asyncio.sleep(30)

    async def main() -> float:
        async with Upstream(script) as upstream:
            client = await started(transport(upstream, timeout=timeout))
            with pytest.raises(BackendTimeout):
                await fetch(client, stream=True)
            return time.monotonic() - last_chunk

    silence = run(main())
    # Generous above (a busy machine fires timers late); the old timer fired up to a timeout late.
    assert timeout - 0.05 <= silence < timeout + 0.9


def test_a_whole_body_times_out_one_timeout_after_the_request(run: Run[None]) -> None:
    timeout = 1.5

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        for _ in range(100):  # a trickle never resets the whole-body limit
            await asyncio.sleep(0.2)
            await peer.send(b"x")

    async def main() -> float:
        async with Upstream(script) as upstream:
            client = await started(transport(upstream, timeout=timeout))
            sent = time.monotonic()
            with pytest.raises(BackendTimeout):
                await fetch(client)
            return time.monotonic() - sent

    elapsed = run(main())
    assert timeout - 0.05 <= elapsed < timeout + 0.9


# Framing under every split, and many requests on one pool.

ANSWERS = [
    ok(b'{"id": "a"}', extra=b"content-type: application/json\r\nx-request-id: r1\r\n"),
    chunked(b"data: 1\n\n", b"data: [DONE]\n\n", extra=b"content-type: text/event-stream\r\n"),
    b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + ok(b"after hints"),
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;name=value\r\nabc\r\n0\r\nx-t: 1\r\n\r\n",
    ok(gzip.compress(b"squeezed " * 20), extra=b"content-encoding: gzip\r\n"),
    ok(b"", status=b"204 No Content"),
]
EXPECTED = [
    (200, {"content-type": "application/json", "x-request-id": "r1", "content-length": "11"}, b'{"id": "a"}'),
    (200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"}, b"data: 1\n\ndata: [DONE]\n\n"),
    (200, {"content-length": "11"}, b"after hints"),
    (200, {"transfer-encoding": "chunked"}, b"abc"),
    (200, {}, b"squeezed " * 20),
    (204, {"content-length": "0"}, b""),
]


def _splits(size: int, rng: random.Random) -> Iterator[list[int]]:
    """Every single cut, then random sets of cuts."""
    for cut in range(1, size):
        yield [cut]
    for _ in range(40):
        yield sorted(rng.sample(range(1, size), rng.randint(2, min(12, size - 1))))


def test_every_split_gives_the_same_answer(run: Run[None]) -> None:
    rng = random.Random(20261129)
    plans = [(case, cuts) for case, answer in enumerate(ANSWERS) for cuts in _splits(len(answer), rng)]

    async def script(peer: Peer) -> None:
        async def answer(request: bytes) -> None:
            case, cuts = plans[int(request.split(b" ", 2)[1].rsplit(b"/", 1)[1])]
            whole = ANSWERS[case]
            edges = [0, *cuts, len(whole)]
            await peer.send(*(whole[start:end] for start, end in itertools.pairwise(edges)))

        await peer.serve(answer)

    async def main() -> None:
        async with Upstream(script) as upstream:
            client = await started(transport(upstream))
            for index, (case, _) in enumerate(plans):
                assert await fetch(client, path=f"case/{index}") == EXPECTED[case], plans[index]
            assert upstream.connections == 1  # every answer ended cleanly, so one connection served all

    run(main())


def test_concurrent_requests_on_one_pool_never_see_each_others_bytes(run: Run[None]) -> None:
    rng = random.Random(7)

    async def script(peer: Peer) -> None:
        async def answer(request: bytes) -> None:
            mine = request.split(b"x-mine: ", 1)[1].split(b"\r\n", 1)[0]
            whole = ok(mine)
            if rng.random() < 0.3:
                whole = b"HTTP/1.1 100 Continue\r\n\r\n" + whole
            if rng.random() < 0.1:
                whole += ok(b"stray")  # glued: must close this connection, never reach anyone
            cut = rng.randint(1, len(whole) - 1)
            await asyncio.sleep(rng.random() * 0.01)
            await peer.send(whole[:cut], whole[cut:])

        await peer.serve(answer)

    async def main() -> None:
        async with Upstream(script) as upstream:
            client = await started(transport(upstream, idle=8))

            async def one(tag: str) -> None:
                status, _, body = await fetch(client, **{"x-mine": tag})
                assert (status, body) == (200, tag.encode())

            for round_ in range(6):
                await asyncio.gather(*(one(f"r{round_}-{i}") for i in range(40)))

    run(main())


def test_no_request_waits_for_a_connection(run: Run[None]) -> None:
    """Thirty requests at once get thirty connections; only the configured number stay idle."""
    everyone = asyncio.Event()
    count = 30

    async def script(peer: Peer) -> None:
        async def answer(_: bytes) -> None:
            if peer.upstream.open >= count:
                everyone.set()
            await everyone.wait()  # nobody is answered until all are connected
            await peer.send(ok(b"{}"))

        await peer.serve(answer)

    async def main() -> None:
        async with Upstream(script) as upstream:
            client = await started(transport(upstream, idle=2))
            answers = await asyncio.gather(*(fetch(client) for _ in range(count)))
            assert all(status == 200 for status, _, _ in answers)
            for _ in range(100):
                if upstream.open == 2:
                    break
                await asyncio.sleep(0.01)
            assert upstream.open == 2

    run(main())
