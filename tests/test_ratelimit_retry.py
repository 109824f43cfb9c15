"""The rate limiter with a fake clock, and the retry policy's pieces."""

from __future__ import annotations

from email.utils import formatdate
from time import time

import pytest

from inference_core.engine import RateLimiter, RetryPolicy
from inference_core.engine.retry import reason, retry_after
from inference_core.errors import (
    BackendTimeout,
    BackendUnreachable,
    BadUpstreamResponse,
    QueueTimeout,
    UpstreamStatusError,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _delays(limiter: RateLimiter, count: int) -> list[float]:
    return [limiter.reserve() for _ in range(count)]


def test_burst_then_steady_spacing() -> None:
    limiter = RateLimiter(10, 3, clock=Clock())
    assert _delays(limiter, 5) == pytest.approx([0, 0, 0, 0.1, 0.2])


def test_429_halves_the_rate_pauses_and_recovers() -> None:
    clock = Clock()
    limiter = RateLimiter(10, 1, clock=clock)
    limiter.throttled(2.0)
    assert limiter.rate == 5
    assert _delays(limiter, 1) == pytest.approx([2.0])
    for _ in range(10):
        limiter.succeeded()
    assert limiter.rate == 10


def test_refuses_a_wait_longer_than_allowed() -> None:
    limiter = RateLimiter(1, 1, clock=Clock())
    limiter.throttled(30)
    with pytest.raises(QueueTimeout):
        limiter.reserve(within=1)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (UpstreamStatusError(429, {}), "429"),
        (UpstreamStatusError(503, {}), "503"),
        (UpstreamStatusError(400, {}), None),
        (UpstreamStatusError(404, {}), None),
        (BackendUnreachable("x"), "connect"),
        (BackendTimeout("x"), "timeout"),
        (BadUpstreamResponse("x"), None),
    ],
)
def test_what_is_retried(error: Exception, expected: str | None) -> None:
    assert reason(error) == expected  # type: ignore[arg-type]


def test_retry_after_forms() -> None:
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after({"retry-after": "3"}) == 3
    assert 8 < retry_after({"retry-after": formatdate(time() + 10, usegmt=True)}) <= 10  # type: ignore[operator]
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None


def test_backoff_is_jittered_capped_and_honours_the_backend() -> None:
    policy = RetryPolicy(max_retries=5, base_delay=1, max_delay=4)
    for attempt in range(6):
        assert 0 <= policy.delay(attempt, None) <= min(4, 2**attempt)
    assert policy.delay(0, 2.5) == 2.5
    assert policy.delay(0, 60) == 4
