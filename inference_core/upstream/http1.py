"""Keep-alive HTTP/1.1 to the backend: asyncio protocols and httptools, the parser uvicorn uses.

A gateway's upstream client does little: write one request, parse one response, reuse the
connection. General clients pay for much more on every request (cookie jars, redirects,
tracing hooks, timeout objects); ``bench/upstream_clients.py`` measures this client at a
fraction of aiohttp's CPU per request.

What it guarantees, whatever bytes the server (or a proxy in front of it) sends:

- A connection carries one request at a time. Interim ``1xx`` answers are skipped; only a
  status of 200 or more is the answer.
- A connection goes back to the pool only when its answer ended and nothing else arrived. A
  byte that belongs to no request (on an idle connection, after the end of an answer) closes
  the connection and is never relayed, so no client can receive another's bytes.
- A reused connection that the server closed before answering (it timed out its keep-alive as
  we wrote) is retried once, at once, on a new connection.
- The answer's head is bounded (``MAX_HEAD_BYTES``, ``MAX_HEADERS``); a reset in the middle of
  a body is a failure, never an end; ``gzip`` and ``deflate`` bodies are decoded although we ask
  for ``identity``.
- Nothing holding CR, LF or NUL is written into a request head.
- No request waits for a connection: one is opened when none is idle (admission bounds how
  many requests are in flight), and at most ``idle_connections`` idle ones are kept.

A response not read to its end closes its connection, so the backend sees the client leave at once.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

from inference_core.errors import (
    BackendTimeout,
    BackendUnreachable,
    BadUpstreamResponse,
    GatewayError,
    InvalidRequest,
)
from inference_core.upstream.base import Transport

#: A stream whose reader falls this far behind stops reading from the backend until it catches up.
HIGH_WATER_BYTES = 256 * 1024
#: The status line and headers of one answer (what most servers accept of a request head).
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100

_UNSAFE_IN_HEADER = re.compile(r"[\r\n\x00]")
_UNSAFE_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")
#: ``gzip``, ``x-gzip`` and ``deflate`` (zlib-wrapped) are told apart by their own header.
_DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})
_GZIP_OR_ZLIB = 32 + zlib.MAX_WBITS


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(BackendTimeout("The backend did not answer in time."))


class _Unanswered(BackendUnreachable):
    """The connection closed before one byte of the answer: on a reused connection, worth one more try."""


class HTTP1Response:
    """One answer as its connection parses it; the body is buffered until read."""

    def __init__(self, connection: _Connection, deadline: float, read_timeout: float) -> None:
        self.status = 0
        self.headers: Mapping[str, str] = {}
        self._connection = connection
        self._deadline = deadline
        self._read_timeout = read_timeout
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._started = False
        self._ended = False
        self._framed = False  # content-length or chunked: the end is known, not just EOF
        self._whole = False  # read() wants the whole body: no backpressure
        self._decoder: zlib._Decompress | None = None
        self._error: GatewayError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._until = 0.0  # when the current wait times out
        self._timer: asyncio.TimerHandle | None = None
        self._finished = False

    # Fed by the connection.

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def started(self, status: int, headers: dict[str, str]) -> None:
        self._framed = "content-length" in headers or "transfer-encoding" in headers
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in _DECODABLE:
            self._decoder = zlib.decompressobj(_GZIP_OR_ZLIB)
            del headers["content-encoding"]
            headers.pop("content-length", None)
        elif encoding != "identity":
            raise BadUpstreamResponse("The backend's answer is in a content encoding the gateway cannot decode.")
        self.status = status
        self.headers = headers
        self._started = True
        self._wake()

    def data(self, chunk: bytes) -> None:
        if self._decoder is not None:
            try:
                chunk = self._decoder.decompress(chunk)
            except zlib.error:
                raise BadUpstreamResponse("The backend's compressed answer is corrupt.") from None
            if not chunk:
                return
        self._body.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER_BYTES and not self._whole:
            self._connection.pause_reading()
        self._wake()

    def ended(self) -> None:
        if self._decoder is not None and not self._decoder.eof:
            self.failed(BadUpstreamResponse("The backend's compressed answer was cut short."))
            return
        self._ended = True
        self._wake()

    def failed(self, error: GatewayError) -> None:
        if not self._ended and self._error is None:
            self._error = error
        self._wake()

    def lost(self, exc: Exception | None, *, heard: bool) -> None:
        """The connection closed: a failure, unless it is the end of a body that only EOF delimits."""
        if not self._started:
            kind = BackendUnreachable if heard else _Unanswered
            self.failed(kind("The backend closed the connection before it answered."))
        elif self._framed or exc is not None:
            self.failed(BadUpstreamResponse("The backend's answer was cut short."))
        else:
            self.ended()

    # Read by the engine.

    async def _wait(self, until: float) -> None:
        """Sleep until the connection has news; time out at loop time ``until``."""
        loop = asyncio.get_running_loop()
        self._until = until
        timer = self._timer
        if timer is None or timer.when() > until:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(until, self._check_time)
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_time(self) -> None:
        """Time the current wait out, or re-arm for when it (or the next one) can end.

        One timer serves the whole response: a timer per wait (per stream chunk) was a
        measurable share of relaying a chunk. A wait that starts later ends no sooner than one
        read timeout from now, so re-arming there never fires late.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._waiter is None:
            self._timer = loop.call_at(now + self._read_timeout, self._check_time)
        elif now >= self._until:
            self._timer = None
            _expire(self._waiter)
        else:
            self._timer = loop.call_at(self._until, self._check_time)

    def _finish(self, *, reuse: bool) -> None:
        """Hand the connection back (answer read to its end) or drop it; once only, as it may be reused."""
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if reuse:
            self._connection.done()
        else:
            self._connection.close()

    async def _wait_for(self, arrived: Callable[[], bool]) -> None:
        """Wait, until the deadline, for ``arrived()``; any failure drops the connection."""
        try:
            while not arrived():
                if self._error is not None:
                    raise self._error
                await self._wait(self._deadline)
        except BaseException:
            self._finish(reuse=False)
            raise

    async def headers_arrived(self) -> None:
        await self._wait_for(lambda: self._started)

    async def read(self) -> bytes:
        self._whole = True
        self._connection.resume_reading()
        await self._wait_for(lambda: self._ended)
        self._finish(reuse=True)
        return b"".join(self._body)

    async def chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._body:
                    # Whatever has arrived goes out as one piece: a reader that fell behind catches up.
                    piece = b"".join(self._body) if len(self._body) > 1 else self._body[0]
                    self._body.clear()
                    self._buffered = 0
                    self._connection.resume_reading()
                    yield piece
                elif self._ended:
                    self._finish(reuse=True)
                    return
                elif self._error is not None:
                    raise self._error
                else:
                    await self._wait(loop.time() + self._read_timeout)
        except BaseException:
            self._finish(reuse=False)
            raise

    async def aclose(self) -> None:
        self._finish(reuse=self._ended)


class _Connection(asyncio.Protocol):
    """One keep-alive connection, feeding the parser's callbacks to the answer in progress.

    ``_response`` is the answer being received: set when a request is sent, cleared when its
    message ends. Bytes that arrive while it is unset belong to no request: the connection is
    closed and they go nowhere.
    """

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: HTTP1Response | None = None
        self._headers: dict[str, str] = {}
        self._header_count = 0
        self._in_head = False
        self._head_bytes = 0  # of the current request's heads so far, interim ones included
        self._unparsed = 0  # bytes fed while no head had completed: what the parser may be holding
        self._interim = False
        self._heard = False
        self._paused = False
        self.open = False
        self.reusable = False
        #: Served a request before, so the server may have closed it on its side meanwhile.
        self.reused = False

    def send(self, request: bytes, response: HTTP1Response) -> None:
        assert self._transport is not None
        self._response = response
        self._head_bytes = self._unparsed = 0
        self._heard = self.reusable = False
        self._transport.write(request)

    def done(self) -> None:
        """The answer was read to its end: the connection may serve the next request."""
        if self._response is None:
            self.reused = True
            self._pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.abort()

    def pause_reading(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self.open = True

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:
            self.close()  # nothing is due on this connection: whatever this is, nobody gets it
            return
        self._heard = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            invalid = BadUpstreamResponse("The backend's answer is not valid HTTP.")
            response.failed(cause if isinstance(cause, GatewayError) else invalid)
            self.close()
            return
        if self._response is response and not response._started:
            # A head split over many reads sits in the parser until it is whole: bound it.
            self._unparsed += len(data)
            if self._unparsed > MAX_HEAD_BYTES:
                response.failed(BadUpstreamResponse(f"The backend's answer head exceeds {MAX_HEAD_BYTES} bytes."))
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.reusable = False
        self._pool.lost(self)
        response, self._response = self._response, None
        if response is not None:
            response.lost(exc, heard=self._heard)

    # httptools callbacks: an exception raised here stops the parser and fails the answer.

    def on_message_begin(self) -> None:
        if self._response is None:
            raise BadUpstreamResponse("The backend sent more than one answer.")
        self._headers = {}
        self._header_count = 0
        self._in_head = True

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise BadUpstreamResponse(f"The backend's answer head exceeds {MAX_HEAD_BYTES} bytes.")

    def on_status(self, status: bytes) -> None:
        self._count(len(status) + 15)  # "HTTP/1.1 200 " and the line's CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            raise BadUpstreamResponse(f"The backend's answer has over {MAX_HEADERS} headers.")
        if self._in_head:  # not a trailer of a chunked body: those are counted and dropped
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self._parser.get_status_code()
        if status == 101:
            raise BadUpstreamResponse("The backend switched protocols, which the gateway never asks for.")
        if status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints...: the answer is still to come
            return
        self._unparsed = 0
        assert self._response is not None
        self._response.started(status, self._headers)

    def on_body(self, body: bytes) -> None:
        assert self._response is not None
        self._response.data(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        response, self._response = self._response, None
        self.reusable = self._parser.should_keep_alive()
        assert response is not None
        response.ended()


class _Pool:
    """Connections to one host: a new one whenever none is idle, up to ``keep`` idle ones reused last-in first-out."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, keep: int) -> None:
        self.host, self.port, self.tls, self.keep = host, port, tls, keep
        self.idle: list[_Connection] = []

    async def acquire(self, within: float, *, fresh: bool = False) -> _Connection:
        if not fresh:
            while self.idle:
                connection = self.idle.pop()
                if connection.open:
                    return connection
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(within):
            _, connection = await loop.create_connection(
                lambda: _Connection(self), self.host, self.port, ssl=self.tls,
                server_hostname=self.host if self.tls else None,
            )  # fmt: skip
        return connection

    def release(self, connection: _Connection) -> None:
        if connection.open and connection.reusable and len(self.idle) < self.keep:
            self.idle.append(connection)
        else:
            connection.close()

    def lost(self, connection: _Connection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)

    def close(self) -> None:
        for connection in list(self.idle):
            connection.close()


class HTTP1Transport(Transport):
    _pool: _Pool | None = None

    async def start(self) -> None:
        parts = urlsplit(self.url(""))
        tls = ssl.create_default_context() if parts.scheme == "https" else None
        port = parts.port or (443 if tls else 80)
        self._pool = _Pool(parts.hostname or "localhost", port, tls, self.idle_connections)
        self._host = parts.netloc.rsplit("@", 1)[-1]
        self._targets: dict[str, str] = {}

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def _target(self, url: str) -> str:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            if _UNSAFE_IN_TARGET.search(target):
                raise InvalidRequest("The request path holds a space or a control character.")
            self._targets[url] = target
        return target

    def _head(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
        lines = [f"{method} {self._target(url)} HTTP/1.1\r\nHost: {self._host}\r\nAccept-Encoding: identity\r\n"]
        for name, value in headers.items():
            if _UNSAFE_IN_HEADER.search(value) or _UNSAFE_IN_HEADER.search(name):
                raise InvalidRequest(f"The header '{name!r}' holds CR, LF or NUL.", param=name)
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, limit: float, stream: bool
    ) -> HTTP1Response:
        assert self._pool is not None, "start() was not awaited"
        request = self._head(method, url, headers, body)
        if body:
            request += body
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        fresh = False
        while True:
            try:
                connection = await self._pool.acquire(deadline - loop.time(), fresh=fresh)
            except TimeoutError:
                raise BackendTimeout("The backend did not answer in time.") from None
            except OSError:
                raise BackendUnreachable("The backend could not be reached.") from None
            response = HTTP1Response(connection, deadline, self.timeout)
            connection.send(request, response)
            try:
                await response.headers_arrived()
            except _Unanswered:
                if fresh or not connection.reused:
                    raise
                fresh = True  # a stale keep-alive connection, not a failing backend
                continue
            return response
