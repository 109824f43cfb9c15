"""State shared by every gateway replica through Redis (``INFERENCE_REDIS_URL``).

Several gateways in front of the same backends must count the same limits: a key's ``rpm`` is
the key's, not each replica's. Each decision is one Lua script, so it is atomic and costs one
round trip. A key's counters live under one hash tag, ``{ic:<key>}``, so they share a slot on
Redis Cluster.

When Redis cannot be reached, the gateway fails open by default: each replica applies every
limit in full from its own counters (logged once, ``inference_core_redis_up`` 0) and asks Redis
again a second later; ``INFERENCE_REDIS_FAILURE=closed`` answers 503 ``limits_unavailable``
instead. redis-py reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.exceptions import RedisError

from inference_core.engine.affinity import Holder, ResponseAffinity
from inference_core.engine.ratelimit import RateLimiter
from inference_core.engine.tenants import (
    Quota,
    Slot,
    Slots,
    Tenant,
    Window,
    Windows,
    judge,
    quota_or_refusal,
    usage_report,
)
from inference_core.errors import Overloaded, QueueTimeout

log = logging.getLogger("inference_core")
T = TypeVar("T")
#: After a failure, Redis is not asked again for this long (each request would pay the wait).
RETRY_AFTER_FAILURE_SECONDS = 1.0
#: Connecting to or hearing from Redis takes at most this long, on the request path.
REDIS_TIMEOUT_SECONDS = 0.25
#: How long Redis remembers where a stored response is.
AFFINITY_TTL_SECONDS = 7 * 24 * 3600

#: KEYS[1]: the key's window. ARGV: rpm, tpm (0: none), tokens asked, seconds to keep the window.
#: Returns {requests, tokens, refused (0, or 1 for rpm, 2 for tpm)}, counting only when not refused.
_TAKE = """
local counts = redis.call('HMGET', KEYS[1], 'r', 't')
local r, t = tonumber(counts[1] or '0'), tonumber(counts[2] or '0')
local rpm, tpm, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if rpm > 0 and r + 1 > rpm then return {r, t, 1} end
if tpm > 0 and t + n > tpm then return {r, t, 2} end
r = redis.call('HINCRBY', KEYS[1], 'r', 1)
t = redis.call('HINCRBY', KEYS[1], 't', n)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {r, t, 0}
"""


class LimitsUnavailable(Overloaded):
    code = "limits_unavailable"


class Shared:
    """A Redis client that knows whether Redis is there, and what to do when it is not."""

    def __init__(self, url: str, *, fail_open: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
        )
        self.fail_open = fail_open
        self.up = True
        self._clock = clock
        self._resting_until = 0.0
        self._background: set[asyncio.Task[None]] = set()

    async def call(self, operation: Callable[[], Awaitable[T]], fallback: Callable[[], Awaitable[T]]) -> T:
        """``operation`` on Redis; while Redis is away, ``fallback`` (open) or a 503 (closed)."""
        if self._clock() >= self._resting_until:
            try:
                result = await operation()
            except (RedisError, OSError) as error:
                self._down(error)
            else:
                if not self.up:
                    self.up = True
                    log.warning("redis reachable again: limits shared")
                return result
        if not self.fail_open:
            raise LimitsUnavailable("The shared limits store cannot be reached; retry shortly.")
        return await fallback()

    def _down(self, error: Exception) -> None:
        self._resting_until = self._clock() + RETRY_AFTER_FAILURE_SECONDS
        if self.up:
            self.up = False
            mode = "each gateway applies the limits alone" if self.fail_open else "answering 503"
            log.warning("redis unreachable: %s", mode, extra={"fields": {"error": type(error).__name__}})

    def background(self, operation: Coroutine[Any, Any, None]) -> None:
        """Run ``operation`` on Redis without waiting for it (a correction, not a decision)."""
        task = asyncio.ensure_future(operation)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        error = None if task.cancelled() else task.exception()
        if isinstance(error, RedisError | OSError):
            self._down(error)

    async def aclose(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.client.aclose()


class SharedWindows:
    """The keys' rpm and tpm windows in Redis, with this process's ``Windows`` while it is away."""

    def __init__(self, shared: Shared, length: float, *, clock: Callable[[], float] = time.time) -> None:
        self.shared = shared
        self.length = length
        self.local = Windows(length, clock=clock)
        self._clock = clock
        self._take = shared.client.register_script(_TAKE)
        #: Keep a window as long as the one after it may still report it as "the last".
        self._keep = math.ceil(2 * length) + 1

    def _key(self, tenant: Tenant, index: int) -> str:
        return f"{{ic:{tenant.name}}}:w:{index}"

    async def take(self, tenant: Tenant, tokens: int) -> tuple[Quota, int]:
        now = self._clock()
        index = math.floor(now / self.length)
        config = tenant.config

        async def remote() -> tuple[Quota, int]:
            args = [config.rpm or 0, config.tpm or 0, tokens, self._keep]
            requests, used, refused = await self._take(keys=[self._key(tenant, index)], args=args)
            # The script has counted (or not); only the words of the refusal are made here.
            refusal = judge(config, int(requests), int(used), tokens, self.length) if refused else None
            return quota_or_refusal(config, refusal, int(requests), int(used), now, self.length), index

        return await self.shared.call(remote, lambda: self.local.take(tenant, tokens))

    def settle(self, tenant: Tenant, index: int, correction: int) -> None:
        self.local.settle(tenant, index, correction)
        if correction and self.shared.up:
            self.shared.background(self._settle(tenant, index, correction))

    async def _settle(self, tenant: Tenant, index: int, correction: int) -> None:
        await self.shared.client.hincrby(self._key(tenant, index), "t", correction)

    async def usage(self, tenant: Tenant) -> dict[str, object]:
        index = math.floor(self._clock() / self.length)

        async def remote() -> dict[str, object]:
            pipe = self.shared.client.pipeline(transaction=False)
            for at in (index, index - 1):
                pipe.hmget(self._key(tenant, at), "r", "t")
            answers: list[list[Any]] = await pipe.execute()
            current, previous = (
                Window(at, int(counts[0] or 0), int(counts[1] or 0))
                for at, counts in zip((index, index - 1), answers, strict=True)
            )
            return usage_report(tenant, current, previous, self.length)

        return await self.shared.call(remote, lambda: self.local.usage(tenant))


#: KEYS[1]: the key's leases (a sorted set: lease id -> expiry). ARGV: now, max_concurrent, lease id,
#: expiry. Drops expired leases (a gateway that died holding them), then takes one if there is room.
_LEASE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[4] - ARGV[1]))
return 1
"""
#: A lease outlives the gateway that took it by at most this long (the request it covers, too).
LEASE_SECONDS = 600.0
#: How often a request waiting for a key's slot held on another gateway asks again.
LEASE_POLL_SECONDS = 0.05


class SharedSlots:
    """The keys' max_concurrent slots as leases in Redis, shared by every gateway.

    A request waiting for a slot asks again when a slot of its key is given back on this
    gateway, and at least every ``LEASE_POLL_SECONDS`` (a slot freed on another gateway says
    nothing here). A lease lasts ``LEASE_SECONDS``, so the slots of a gateway killed while
    holding them come back by themselves.
    """

    def __init__(self, shared: Shared, *, clock: Callable[[], float] = time.time) -> None:
        self.shared = shared
        self.local = Slots()
        self._lease = shared.client.register_script(_LEASE)
        self._clock = clock
        self._freed: dict[str, asyncio.Event] = {}

    async def acquire(self, tenant: Tenant, *, within: float) -> Slot | None:
        deadline = time.monotonic() + within
        lease = uuid.uuid4().hex
        key = f"{{ic:{tenant.name}}}:slots"
        while True:

            async def remote() -> Slot | None:
                now = self._clock()
                args: list[float | str] = [now, tenant.config.max_concurrent or 0, lease, now + LEASE_SECONDS]
                return lease if await self._lease(keys=[key], args=args) else None

            remaining = deadline - time.monotonic()

            def alone(within: float = max(0.0, remaining)) -> Awaitable[Slot | None]:
                return self.local.acquire(tenant, within=within)

            taken = await self.shared.call(remote, alone)
            if taken is not None or remaining <= 0:
                return taken
            freed = self._freed.setdefault(tenant.name, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(LEASE_POLL_SECONDS, remaining)):
                    await freed.wait()

    def release(self, tenant: Tenant, slot: Slot) -> None:
        if isinstance(slot, str):
            self.shared.background(self._give_back(tenant, slot))
        else:
            self.local.release(tenant, slot)
        freed = self._freed.pop(tenant.name, None)
        if freed is not None:
            freed.set()

    async def _give_back(self, tenant: Tenant, lease: str) -> None:
        await self.shared.client.zrem(f"{{ic:{tenant.name}}}:slots", lease)


class SharedAffinity:
    """Which backend and replica hold each stored response, in Redis, so any gateway routes them.

    Written through to this process's map too, which answers while Redis is away. Entries
    expire after ``AFFINITY_TTL_SECONDS`` in Redis (the local map forgets its least recently used).
    """

    def __init__(self, shared: Shared, local: ResponseAffinity) -> None:
        self.shared = shared
        self.local = local

    async def holder_of(self, response_id: str) -> Holder | None:
        async def remote() -> Holder | None:
            found = await self.shared.client.get(f"ic:resp:{response_id}")
            if found is None:
                return self.local.get(response_id)
            text = found.decode() if isinstance(found, bytes) else found
            backend, _, replica = text.partition("/")
            return backend, replica

        return await self.shared.call(remote, lambda: self.local.holder_of(response_id))

    def remember(self, response_id: str, holder: Holder) -> None:
        self.local.remember(response_id, holder)
        self.shared.background(self._store(response_id, f"{holder[0]}/{holder[1]}"))

    async def _store(self, response_id: str, holder: str) -> None:
        await self.shared.client.set(f"ic:resp:{response_id}", holder, ex=AFFINITY_TTL_SECONDS)

    def forget(self, response_id: str) -> None:
        self.local.forget(response_id)
        self.shared.background(self._delete(response_id))

    async def _delete(self, response_id: str) -> None:
        await self.shared.client.delete(f"ic:resp:{response_id}")


#: KEYS[1]: the backend's theoretical arrival time. ARGV: now, 1/rate, (burst-1)/rate, the longest
#: wait accepted, a pause every sender keeps (a backend's Retry-After). GCRA, as ``RateLimiter``;
#: returns the wait as text (Lua numbers reach the client as integers), or "-1" if too long.
_GCRA = """
local now, interval, slack = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local within, paused = tonumber(ARGV[4]), tonumber(ARGV[5])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now, paused)
local delay = math.max(0, math.max(tat - slack, paused) - now)
if delay > within then return '-1' end
redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', math.ceil((tat + interval - now) * 1000) + 1000)
return tostring(delay)
"""


class SharedRateLimiter(RateLimiter):
    """A backend's ``rate_limit_rps`` as the total every gateway on the same Redis may send.

    The rate in force stays this gateway's own (it still halves on a 429 and climbs back), and
    each send books its turn on the backend's one shared schedule.
    """

    def __init__(self, shared: Shared, backend: str, rate: float, burst: int) -> None:
        super().__init__(rate, burst, clock=time.time)
        self.shared = shared
        self._key = f"ic:rate:{backend}"
        self._gcra = shared.client.register_script(_GCRA)

    async def acquire(self, *, within: float) -> float:
        async def remote() -> float:
            now = self._clock()
            args = [now, 1 / self.rate, (self.burst - 1) / self.rate, within, self._paused_until]
            delay = float(await self._gcra(keys=[self._key], args=args))
            if delay < 0:
                raise QueueTimeout("The request would wait too long for the upstream rate limit.")
            if delay > 0:
                await asyncio.sleep(delay)
            return delay

        return await self.shared.call(remote, lambda: super(SharedRateLimiter, self).acquire(within=within))
