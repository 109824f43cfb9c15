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

from inference_core.errors import BackendTimeout, BackendUnreachable, GatewayError, UpstreamStatusError

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """One retry about to happen, for hooks (logs, metrics)."""

    request_id: str
    attempt: int
    reason: str
    delay: float


def reason(error: GatewayError) -> str | None:
    """Why ``error`` is worth retrying (a bounded label), or None if it is not."""
    if isinstance(error, UpstreamStatusError):
        return str(error.status) if error.status in RETRY_STATUSES else None
    if isinstance(error, BackendUnreachable):
        return "connect"
    if isinstance(error, BackendTimeout):
        return "timeout"
    return None


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
