"""Keep-alive HTTP/1.1 to the backend: asyncio protocols and httptools, the parser uvicorn uses.

A gateway's upstream client does little: write one request, parse one response, reuse the
connection. General clients pay for much more on every request (cookie jars, redirects,
tracing hooks, timeout objects); ``bench/upstream_clients.py`` measures this client at a
fraction of aiohttp's CPU per request. A connection carries one request at a time; a response
not read to its end closes its connection, so the backend sees the client leave at once.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

from inference_core.errors import BackendTimeout, BackendUnreachable, BadUpstreamResponse, GatewayError
from inference_core.upstream.base import Transport

#: A stream whose reader falls this far behind stops reading from the backend until it catches up.
HIGH_WATER_BYTES = 256 * 1024


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(BackendTimeout("The backend did not answer in time."))


class HTTP1Response:
    """One response as its connection parses it; the body is buffered until read."""

    def __init__(self, connection: _Connection, deadline: float, read_timeout: float) -> None:
        self.status = 0
        self._headers: dict[str, str] = {}
        self.headers: Mapping[str, str] = self._headers
        self._connection = connection
        self._deadline = deadline
        self._read_timeout = read_timeout
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._started = False
        self._ended = False
        self._framed = False  # content-length or chunked: the end is known, not just EOF
        self._whole = False  # read() wants the whole body: no backpressure
        self._error: GatewayError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._until = 0.0  # when the current wait times out
        self._timer: asyncio.TimerHandle | None = None
        self._finished = False

    # Fed by the connection.

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key in ("content-length", "transfer-encoding"):
            self._framed = True
        self._headers[key] = value.decode("latin-1")

    def started(self, status: int) -> None:
        self.status = status
        self._started = True
        self._wake()

    def data(self, chunk: bytes) -> None:
        self._body.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER_BYTES and not self._whole:
            self._connection.pause_reading()
        self._wake()

    def ended(self) -> None:
        self._ended = True
        self._wake()

    def failed(self, error: GatewayError) -> None:
        if not self._ended:
            self._error = error
        self._wake()

    def lost(self) -> None:
        """The connection closed: fine after the end, or as the end of a body it delimits."""
        if not self._started:
            self.failed(BackendUnreachable("The backend closed the connection."))
        elif self._framed:
            self.failed(BadUpstreamResponse("The backend's answer was cut short."))
        else:
            self.ended()

    # Read by the engine.

    async def _wait(self, until: float) -> None:
        """Sleep until the connection has news; time out at loop time ``until``."""
        loop = asyncio.get_running_loop()
        self._until = until
        if self._timer is None:
            self._timer = loop.call_at(until, self._check_time)
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_time(self) -> None:
        """Time the current wait out, or re-arm for the next.

        One timer serves the whole response: a timer per wait (per stream chunk) was a
        measurable share of relaying a chunk.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._waiter is not None and now >= self._until:
            self._timer = None
            _expire(self._waiter)
        else:
            self._timer = loop.call_at(max(self._until, now + self._read_timeout), self._check_time)

    def _finish(self, *, reuse: bool) -> None:
        """Hand the connection back (body read to its end) or drop it; once only, as it may be reused."""
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if reuse:
            self._connection.done(self)
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
    """One keep-alive connection, feeding the parser's callbacks to the response in progress."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: HTTP1Response | None = None
        self._paused = False
        self.open = False
        self.reusable = False
        #: Counted in the pool's limit (set once the connection is established).
        self.counted = False

    def send(self, request: bytes, response: HTTP1Response) -> None:
        assert self._transport is not None
        self._response = response
        self.reusable = False
        self._transport.write(request)

    def done(self, response: HTTP1Response) -> None:
        """``response`` was read to its end: the connection may serve the next request."""
        if self._response is response:
            self._response = None
            self._pool.release(self)

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
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._response is not None:
                self._response.failed(BadUpstreamResponse("The backend's answer is not valid HTTP."))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.reusable = False
        if self._response is not None:
            self._response.lost()
            self._response = None
        self._pool.lost(self)

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            self._response.header(name, value)

    def on_headers_complete(self) -> None:
        if self._response is not None:
            self._response.started(self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response.data(body)

    def on_message_complete(self) -> None:
        self.reusable = self._parser.should_keep_alive()
        if self._response is not None:
            self._response.ended()


class _Pool:
    """At most ``limit`` connections to one host, the idle ones reused last-in first-out."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, limit: int) -> None:
        self.host, self.port, self.tls, self.limit = host, port, tls, limit
        self.count = 0
        self.idle: list[_Connection] = []
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, within: float) -> _Connection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            while self.idle:
                connection = self.idle.pop()
                if connection.open:
                    return connection
            if self.count < self.limit:
                break
            waiter = loop.create_future()
            self.waiters.append(waiter)
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken and cancelled at once: pass the turn on
                raise
            finally:
                timer.cancel()
        self.count += 1
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                )  # fmt: skip
        except BaseException:
            self.count -= 1
            self._wake_one()
            raise
        connection.counted = True
        return connection

    def release(self, connection: _Connection) -> None:
        if connection.open and connection.reusable:
            self.idle.append(connection)
            self._wake_one()
        else:
            connection.close()

    def lost(self, connection: _Connection) -> None:
        if not connection.counted:
            return  # failed while connecting: acquire() gave its place back
        self.count -= 1
        if connection in self.idle:
            self.idle.remove(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for connection in list(self.idle):
            connection.close()


class HTTP1Transport(Transport):
    _pool: _Pool | None = None

    async def start(self) -> None:
        parts = urlsplit(self.url(""))
        tls = ssl.create_default_context() if parts.scheme == "https" else None
        port = parts.port or (443 if tls else 80)
        self._pool = _Pool(parts.hostname or "localhost", port, tls, self.max_connections)
        self._host = parts.netloc.rsplit("@", 1)[-1]
        self._targets: dict[str, str] = {}

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def _head(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            target = self._targets[url] = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self._host}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
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
        deadline = asyncio.get_running_loop().time() + limit
        try:
            connection = await self._pool.acquire(limit)
        except TimeoutError:
            raise BackendTimeout("The backend did not answer in time.") from None
        except OSError:
            raise BackendUnreachable("The backend could not be reached.") from None
        response = HTTP1Response(connection, deadline, self.timeout)
        connection.send(request, response)
        await response.headers_arrived()
        return response
