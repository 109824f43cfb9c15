"""The per-request wrapper: request id, root span, one access-log line and the request's metrics.

One ASGI middleware does all of it, so each request pays for one wrapper, and the request id is
known to the log line, the response header, the span and the upstream call alike. Routes fill
in the ``RequestRecord`` it puts in the scope; it reads the record when the response is done.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference_core.engine.call import Outcome
from inference_core.errors import GatewayError, error_body
from inference_core.observability.logs import log_access
from inference_core.observability.metrics import Metrics
from inference_core.tracing import Tracer

_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")

log = logging.getLogger("inference_core")


@dataclass(slots=True)
class RequestRecord:
    """What one request was and what happened to it, for its log line, metrics and span."""

    request_id: str
    started: float
    model: str | None = None
    #: The name of the key it came with, when the gateway has keys.
    key: str | None = None
    #: Why the key's request was refused (rpm, tpm, model_not_allowed, queue_timeout...).
    rejection: str | None = None
    outcome: Outcome | None = None
    #: A batch's entries, each with its model and outcome (``outcome`` then holds their total).
    entries: tuple[tuple[str | None, Outcome], ...] = ()
    stream: bool = False
    first_event: float | None = None
    last_event: float | None = None
    client_left: bool = False
    error: str | None = None

    def event_sent(self, now: float, metrics: Metrics) -> None:
        """A stream event went out: the first sets time to first token, the rest the gaps."""
        if self.last_event is None:
            self.first_event = now
        else:
            metrics.gaps.observe(now - self.last_event)
        self.last_event = now


def record_of(scope: Scope) -> RequestRecord:
    """The record the middleware made for this request."""
    record: RequestRecord = scope["state"]["record"]
    return record


class RequestContext:
    """Gives every request an id (the client's ``x-request-id`` if sane), a span, a log line, metrics.

    It also answers any unexpected exception with a generic OpenAI-shaped 500, if nothing has
    been sent yet: no traceback ever reaches a client.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, tracer: Tracer, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.tracer = tracer
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _client_request_id(scope) or os.urandom(16).hex()
        record = RequestRecord(request_id, started)
        scope.setdefault("state", {})["record"] = record
        id_header = (b"x-request-id", request_id.encode())
        status = 0
        response_started = 0.0

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = time.perf_counter()
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        headers = (
            {} if not self.tracer.enabled else {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        )
        with self.tracer.server_span(f"{scope['method']} {scope['path']}", headers) as span:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
                if status == 0:
                    body = error_body("The gateway failed unexpectedly.", GatewayError.type)
                    start = {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json")],
                    }
                    await send_with_id(start)
                    await send({"type": "http.response.body", "body": body})
            finally:
                route = scope.get("route")
                endpoint = route.path if route is not None else "other"
                finished = time.perf_counter()
                self._measure(record, endpoint, status, finished, response_started)
                span.set("http.response.status_code", status)
                span.set("http.route", endpoint)
                span.set("inference_core.request_id", request_id)
                outcome = record.outcome
                if outcome is not None:
                    span.set("gen_ai.request.model", record.model)
                    span.set("gen_ai.usage.input_tokens", outcome.prompt_tokens)
                    span.set("gen_ai.usage.output_tokens", outcome.completion_tokens)
                if self.access_log:
                    self._log(scope, record, endpoint, status, finished)

    def _measure(
        self, record: RequestRecord, endpoint: str, status: int, finished: float, response_started: float
    ) -> None:
        metrics = self.metrics
        model = metrics.model_label(record.model) if record.model is not None else "none"
        status_class = f"{status // 100}xx"
        metrics.of(metrics.requests, endpoint, model, status_class).inc()
        key = record.key
        if key is not None:
            metrics.of(metrics.key_requests, key, status_class).inc()
            if record.rejection is not None:
                metrics.of(metrics.key_rejections, key, record.rejection).inc()
        metrics.of(metrics.latency, endpoint).observe(finished - record.started)
        outcome = record.outcome
        if outcome is None:
            return
        metrics.queue_wait.observe(outcome.queued)
        if outcome.rate_limited:
            metrics.rate_limited.inc()
        if outcome.backend is not None:
            metrics.of(metrics.upstream_latency, endpoint, outcome.backend).observe(outcome.upstream)
        for backend, kind in outcome.upstream_errors:
            metrics.of(metrics.upstream_errors, kind, backend).inc()
        for entry_model, entry in record.entries or ((record.model, outcome),):
            label = metrics.model_label(entry_model) if entry_model is not None else "none"
            for kind, tokens in (("prompt", entry.prompt_tokens), ("completion", entry.completion_tokens)):
                if tokens:
                    metrics.of(metrics.tokens, kind, label).inc(tokens)
                    if key is not None:
                        metrics.of(metrics.key_tokens, key, kind).inc(tokens)
        if response_started and status < 400 and outcome.backend is not None:
            own = response_started - record.started - outcome.queued - outcome.upstream - outcome.backoff
            metrics.of(metrics.overhead, endpoint).observe(max(own, 0.0))
        if record.first_event is not None:
            metrics.of(metrics.ttft, endpoint).observe(record.first_event - record.started)
        if outcome.cached_blocks is not None:
            metrics.routed_cached_blocks.observe(outcome.cached_blocks)
        if record.client_left:
            metrics.of(metrics.disconnects, "streaming" if status == 200 else "waiting").inc()

    def _log(self, scope: Scope, record: RequestRecord, endpoint: str, status: int, finished: float) -> None:
        outcome = record.outcome
        fields: dict[str, object] = {
            "request_id": record.request_id,
            "method": scope["method"],
            "endpoint": endpoint,
            "model": record.model,
            "key": record.key,
            "status": status,
            "latency_ms": round((finished - record.started) * 1000, 2),
        }
        if outcome is not None:
            fields |= {
                "queue_ms": round(outcome.queued * 1000, 2),
                "retries": outcome.retries,
                "backend": outcome.backend,
                "fallbacks": outcome.fallbacks,
                "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": outcome.completion_tokens,
            }
            if outcome.cached_blocks is not None:
                fields["cached_blocks"] = outcome.cached_blocks
        if record.stream:
            fields["stream"] = True
        if record.client_left:
            fields["client_disconnected"] = True
        if record.error:
            fields["error"] = record.error
        log_access(fields)


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return value.decode() if _VALID_REQUEST_ID.fullmatch(value) else None
    return None
