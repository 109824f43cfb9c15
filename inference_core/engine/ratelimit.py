"""An adaptive token bucket on requests sent upstream.

Implemented as GCRA (a token bucket that tracks one "theoretical arrival time"): each caller
reserves the next free send time and sleeps until it, so waiters are served in order with one
timer each and no polling. A 429 from the backend halves the rate (multiplicative decrease)
and its ``Retry-After`` pauses every sender; each success climbs back by a twentieth of the
configured rate (additive increase).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from inference_core.errors import QueueTimeout

MIN_RATE_FRACTION = 0.05
RECOVERY_FRACTION = 0.05


class RateLimiter:
    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.configured_rate = rate
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._tat = clock()
        self._paused_until = 0.0

    def reserve(self, *, within: float = float("inf")) -> float:
        """Book the next send time; return the seconds until it.

        Raises ``QueueTimeout`` (booking nothing) if that is more than ``within`` seconds away.
        """
        now = self._clock()
        tat = max(self._tat, now, self._paused_until)
        allowed_at = max(tat - (self.burst - 1) / self.rate, self._paused_until)
        delay = max(0.0, allowed_at - now)
        if delay > within:
            raise QueueTimeout("The request would wait too long for the upstream rate limit.")
        self._tat = tat + 1 / self.rate
        return delay

    async def acquire(self, *, within: float) -> float:
        """Wait for a send slot, at most ``within`` seconds; returns the seconds waited."""
        delay = self.reserve(within=within)
        if delay > 0:
            await asyncio.sleep(delay)
        return delay

    def throttled(self, retry_after: float | None) -> None:
        """The backend said 429: slow down, and stop everyone for ``retry_after`` seconds."""
        self.rate = max(self.configured_rate * MIN_RATE_FRACTION, self.rate / 2)
        if retry_after:
            self._paused_until = max(self._paused_until, self._clock() + retry_after)

    def succeeded(self) -> None:
        if self.rate < self.configured_rate:
            self.rate = min(self.configured_rate, self.rate + self.configured_rate * RECOVERY_FRACTION)
