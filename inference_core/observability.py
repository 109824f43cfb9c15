"""Request ids, the access log and Prometheus metrics, applied to every HTTP request.

One ASGI middleware does all three, so each request pays for one wrapper, and the request id is
known to the log line, the response header and the upstream call alike.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference_core.engine.retry import RetryEvent
from inference_core.errors import GatewayError, error_body

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")

log = logging.getLogger("inference_core")
access_log = logging.getLogger("inference_core.access")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")


class Metrics:
    """The gateway's own Prometheus registry (not the process-global one, so apps stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "inference_core_requests",
            "HTTP requests answered, by endpoint and status class.",
            ("endpoint", "status_class"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "inference_core_request_duration_seconds",
            "Time from request to the end of the response, by endpoint.",
            ("endpoint",),
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.retries = Counter(
            "inference_core_upstream_retries",
            "Upstream attempts retried, by reason (HTTP status, connect or timeout).",
            ("reason",),
            registry=self.registry,
        )

        self.rate_limit = Gauge(
            "inference_core_rate_limit_rps",
            "The adaptive upstream rate limit in force, in requests per second (0: no limit).",
            registry=self.registry,
        )

    def retried(self, event: RetryEvent) -> None:
        self.retries.labels(event.reason).inc()
        log.info(
            "retrying upstream call: request %s attempt %d reason %s in %.2fs",
            event.request_id, event.attempt, event.reason, event.delay,
        )  # fmt: skip


def request_id_of(scope: Scope) -> str:
    """The id the middleware gave this request."""
    return scope["state"]["request_id"]


class RequestContext:
    """Gives every request an id (the client's ``x-request-id`` if sane), logs and counts it.

    It also answers any unexpected exception with a generic OpenAI-shaped 500, if nothing has
    been sent yet: no traceback ever reaches a client.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _client_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            if status == 0:
                status = 500
                body = error_body("The gateway failed unexpectedly.", GatewayError.type)
                await send_with_id(
                    {"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]}
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            endpoint = route.path if route is not None else "other"
            self.metrics.requests.labels(endpoint, f"{status // 100}xx").inc()
            self.metrics.latency.labels(endpoint).observe(elapsed)
            access_log.info("%s %s %s %d %.1fms", request_id, scope["method"], endpoint, status, elapsed * 1000)


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return value.decode() if _VALID_REQUEST_ID.fullmatch(value) else None
    return None
