"""Which failures are retried, and how long to wait before the next attempt.

Retried: connection failures, timeouts before any answer, and HTTP 408, 429, 500, 502, 503,
504 — never another 4xx, and never once a stream's first byte has reached the client (the
engine only retries before it hands a stream out). Attempts are bounded by ``max_retries`` and
by the request's deadline. The wait before retry ``n`` (from 0) is "full jitter" backoff,
``uniform(0, min(max_delay, base_delay * 2**n))``, unless the backend said how long to wait
(``retry-after-ms`` or ``Retry-After``), which is honoured up to ``max_delay``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from time import time

from inference_core.errors import (
    BackendTimeout,
    BackendUnreachable,
    BadUpstreamResponse,
    GatewayError,
    NoHealthyBackend,
    QueueFull,
    QueueTimeout,
    UpstreamStatusError,
)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """One retry about to happen, for hooks (logs, metrics)."""

    request_id: str
    backend: str
    attempt: int
    reason: str
    delay: float


@dataclass(frozen=True, slots=True)
class FallbackEvent:
    """A request moving from one backend to the next target of its model, for hooks."""

    request_id: str
    source: str
    target: str
    reason: str


def reason(error: GatewayError) -> str | None:
    """Why ``error`` is worth retrying (a bounded label), or None if it is not."""
    if isinstance(error, UpstreamStatusError):
        return str(error.status) if error.status in RETRY_STATUSES else None
    if isinstance(error, BackendUnreachable):
        return "connect"
    if isinstance(error, BackendTimeout):
        return "timeout"
    return None


def fallback_reason(error: GatewayError) -> str | None:
    """Why a request should move on to its next target (a bounded label), or None if it must not.

    The target could not answer: no replica in rotation, no slot in time, or its last answer after
    retries was a failure of the backend (408, 429, 5xx, a timeout, unreachable, malformed).
    Never for another 4xx: the next target would refuse the same request.
    """
    if isinstance(error, UpstreamStatusError):
        return str(error.status) if error.status in RETRY_STATUSES or error.status >= 500 else None
    if isinstance(error, NoHealthyBackend):
        return "no_replica"
    if isinstance(error, QueueFull | QueueTimeout):
        return error.code
    if isinstance(error, BadUpstreamResponse):
        return "bad_response"
    return reason(error)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The wait a backend asked for, in seconds: ``retry-after-ms``, or ``Retry-After`` as seconds or a date."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int
    base_delay: float
    max_delay: float

    def delay(self, attempt: int, asked: float | None) -> float:
        if asked is not None:
            return min(asked, self.max_delay)
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))
