"""ASGI responses for relayed bodies: whole JSON bytes, and SSE streams that stop with the client."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import TypeVar

from starlette.types import Receive, Scope, Send

from inference_core import sse
from inference_core.engine import Stream
from inference_core.errors import ClientDisconnected, GatewayError, anthropic_type
from inference_core.observability import Metrics, RequestRecord

log = logging.getLogger("inference_core")
T = TypeVar("T")


#: Most answers are back sooner than this; only work still running then gets a watcher task.
WATCH_AFTER_SECONDS = 0.05


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (e.g. while queued).

    ``work`` runs inline; after ``WATCH_AFTER_SECONDS`` one watcher task races ``receive()``
    against it (a task per request would cost more than the rest of a quick request's work).
    Call only once the request body has been read: every message left is a disconnect.
    """
    current = asyncio.current_task()
    assert current is not None
    left = False
    watcher: asyncio.Future[None] | None = None

    async def watch() -> None:
        nonlocal left
        await _disconnected(receive)
        left = True
        current.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(watch())

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER_SECONDS, start_watching)
    try:
        return await work
    except asyncio.CancelledError:
        if left and current.uncancel() == 0:
            raise ClientDisconnected("The client disconnected.") from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


class JSONBytes:
    """Bytes that already are JSON (relayed or pre-serialised), sent as they are."""

    def __init__(self, body: bytes, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self.body = body
        self.status = status
        self.headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if headers:
            self.headers += [
                (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
            ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


class EventStreamResponse:
    """Relays a ``Stream`` to the client frame by frame.

    The client's disconnect is watched for by racing ``receive()`` against the relay (see
    ``unless_disconnected``), so the backend connection is closed within ``WATCH_AFTER_SECONDS``
    of the client leaving, even while no token is due.
    A failure after the first byte becomes one in-band ``data: {"error": ...}`` event (on
    Anthropic's routes, its ``event: error`` in its shape).
    """

    def __init__(self, stream: Stream, record: RequestRecord, metrics: Metrics, *, anthropic: bool = False) -> None:
        self.stream = stream
        self.record = record
        self.metrics = metrics
        self.anthropic = anthropic
        self.headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        self.headers += [(name.encode(), value.encode()) for name, value in stream.headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await unless_disconnected(receive, self._relay(send))
        except ClientDisconnected:
            self.record.client_left = True
        finally:
            await self.stream.aclose()

    async def _relay(self, send: Send) -> None:
        record = self.record
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        try:
            async for frame in self.stream.frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
                record.event_sent(time.perf_counter(), self.metrics)
        except GatewayError as exc:
            record.error = anthropic_type(exc.status) if self.anthropic else exc.label
            await send({"type": "http.response.body", "body": self._error_event(exc), "more_body": True})
        except Exception:
            log.exception("stream relay failed")
            record.error = "internal"
            failed = GatewayError("The gateway failed unexpectedly.")
            await send({"type": "http.response.body", "body": self._error_event(failed), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _error_event(self, error: GatewayError) -> bytes:
        if self.anthropic:
            return b"event: error\ndata: " + error.anthropic_body(self.record.request_id) + b"\n\n"
        return sse.frame(error.body())


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
