"""Tenants: who is calling (by gateway key), what each key may use, its limits and its usage.

Keys come from the configuration file's ``keys:`` (named, with limits) and from
``INFERENCE_GATEWAY_API_KEYS`` (unlimited, named ``key-1``, ``key-2``...). A presented key is
hashed (SHA-256) and compared in constant time with every key's digest, so the file may hold
digests instead of secrets (``key_sha256``), and neither timing nor the number of comparisons
tells a caller how close a guess was.

Limits, per key:

- ``rpm`` and ``tpm`` count requests and tokens in fixed windows of ``INFERENCE_LIMIT_WINDOW``
  seconds (60: a minute), aligned to the clock, so every gateway agrees where a window starts.
  Tokens are reserved when a request is admitted (its prompt estimated at a token per four bytes
  of its body, plus ``max_tokens``, or ``INFERENCE_DEFAULT_COMPLETION_TOKENS`` when it sets none)
  and corrected with the real ``usage`` when it ends; a stream without usage counts one token
  per event.
- ``max_concurrent`` requests in flight; more wait (first come, first served) within the queue
  timeout.
- ``priority`` is the key's default and its best: a request may ask for a later one only.
- ``weight`` is the key's share of the queue against other keys of the same priority (see
  ``Admission``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Protocol

from inference_core.config_file import KeyConfig
from inference_core.errors import ModelNotAllowed, RateLimitExceeded

#: Bytes of a request body per estimated prompt token.
BYTES_PER_TOKEN = 4


@dataclass(slots=True)
class Window:
    """One limit window's counts; ``index`` is its start divided by the window's length."""

    index: int
    requests: int = 0
    tokens: int = 0


class Tenant:
    def __init__(self, name: str, digest: bytes, config: KeyConfig | None = None) -> None:
        #: A label for metrics and logs; never the key.
        self.name = name
        self.digest = digest
        self.config = config or KeyConfig(key_sha256=digest.hex())
        limit = self.config.max_concurrent
        #: Its concurrency slots in this process (used alone, or while Redis is away).
        self.slots = asyncio.Semaphore(limit) if limit else None
        #: Its calls admitted and not yet ended (waiting for a slot, queued, or in flight).
        self.active = 0
        self.current = Window(-1)
        self.previous = Window(-2)

    @property
    def limited(self) -> bool:
        config = self.config
        return bool(config.rpm or config.tpm or config.max_concurrent)

    def allows(self, model: str) -> bool:
        patterns = self.config.models
        return patterns is None or any(fnmatchcase(model, pattern) for pattern in patterns)

    def check_model(self, model: str) -> None:
        if not self.allows(model):
            raise ModelNotAllowed(f"This key may not use the model '{model}'.")

    def priority(self, asked: int | None) -> int:
        """The priority its request runs at: the key's, unless the request asked for a later one."""
        best = self.config.priority
        return best if asked is None else max(asked, best)


class Keys:
    """Every key the gateway accepts."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self.tenants = {tenant.name: tenant for tenant in tenants}

    def authenticate(self, given: bytes) -> Tenant | None:
        """The tenant whose key is ``given``, compared with every key in constant time."""
        digest = hashlib.sha256(given).digest()
        found = None
        for tenant in self.tenants.values():
            if hmac.compare_digest(tenant.digest, digest):
                found = tenant
        return found if given else None


def build_keys(configs: Mapping[str, KeyConfig], flat: Iterable[bytes], previous: Keys | None) -> Keys | None:
    """The keys of a configuration (None: no keys, the API is open); unchanged keys keep their state."""
    tenants = []
    for name, config in configs.items():
        kept = previous.tenants.get(name) if previous is not None else None
        if kept is not None and kept.config == config:
            tenants.append(kept)
            continue
        secret = config.key.get_secret_value().encode() if config.key is not None else None
        digest = hashlib.sha256(secret).digest() if secret is not None else bytes.fromhex(config.key_sha256 or "")
        tenants.append(Tenant(name, digest, config))
    for number, key in enumerate(flat, 1):
        name = f"key-{number}"
        kept = previous.tenants.get(name) if previous is not None else None
        digest = hashlib.sha256(key).digest()
        tenants.append(kept if kept is not None and kept.digest == digest else Tenant(name, digest))
    return Keys(tenants) if tenants else None


@dataclass(frozen=True, slots=True)
class Quota:
    """What a key has left in the window, for OpenAI's ``x-ratelimit-*`` headers."""

    config: KeyConfig
    requests: int
    tokens: int
    reset: float

    def headers(self) -> dict[str, str]:
        headers = {}
        reset = _duration(self.reset)
        if self.config.rpm:
            headers["x-ratelimit-limit-requests"] = str(self.config.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, self.config.rpm - self.requests))
            headers["x-ratelimit-reset-requests"] = reset
        if self.config.tpm:
            headers["x-ratelimit-limit-tokens"] = str(self.config.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, self.config.tpm - self.tokens))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers


def _duration(seconds: float) -> str:
    """OpenAI's spelling of a reset time: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s" if minutes else f"{rest:.3g}s"


class WindowStore(Protocol):
    """Where the keys' rpm and tpm windows are counted: this process (``Windows``) or Redis."""

    length: float

    async def take(self, tenant: Tenant, tokens: int) -> tuple[Quota, int]: ...

    def settle(self, tenant: Tenant, index: int, correction: int) -> None: ...

    async def usage(self, tenant: Tenant) -> dict[str, object]: ...


#: A held concurrency slot: what giving it back needs (this process's, or a lease's id in Redis).
Slot = object
LOCAL_SLOT: Slot = object()


class SlotStore(Protocol):
    """Where the keys' max_concurrent slots are held: this process (``Slots``) or Redis."""

    async def acquire(self, tenant: Tenant, *, within: float) -> Slot | None:
        """A slot of the key's, waiting at most ``within`` seconds (None: none came)."""
        ...

    def release(self, tenant: Tenant, slot: Slot) -> None: ...


class Slots:
    """The keys' concurrency slots in this process: a semaphore each, first come first served."""

    async def acquire(self, tenant: Tenant, *, within: float) -> Slot | None:
        assert tenant.slots is not None
        try:
            async with asyncio.timeout(within):
                await tenant.slots.acquire()
        except TimeoutError:
            return None
        return LOCAL_SLOT

    def release(self, tenant: Tenant, slot: Slot) -> None:
        assert tenant.slots is not None
        tenant.slots.release()


class Windows:
    """The keys' rpm and tpm windows, in this process."""

    def __init__(self, length: float, *, clock: Callable[[], float] = time.time) -> None:
        self.length = length
        self._clock = clock

    def _roll(self, tenant: Tenant, now: float) -> Window:
        index = math.floor(now / self.length)
        if tenant.current.index != index:
            tenant.previous = tenant.current if tenant.current.index == index - 1 else Window(index - 1)
            tenant.current = Window(index)
        return tenant.current

    async def take(self, tenant: Tenant, tokens: int) -> tuple[Quota, int]:
        """Count a request and reserve ``tokens``; returns the quota left and the window's index.

        Raises ``RateLimitExceeded`` (counting nothing) when either limit would be passed.
        """
        now = self._clock()
        window = self._roll(tenant, now)
        verdict = judge(tenant.config, window.requests, window.tokens, tokens, self.length)
        if verdict is None:
            window.requests += 1
            window.tokens += tokens
        return quota_or_refusal(tenant.config, verdict, window.requests, window.tokens, now, self.length), window.index

    def settle(self, tenant: Tenant, index: int, correction: int) -> None:
        """Correct a reservation made in window ``index`` by what the request really used."""
        self._roll(tenant, self._clock())
        for window in (tenant.current, tenant.previous):
            if window.index == index:
                window.tokens = max(0, window.tokens + correction)

    async def usage(self, tenant: Tenant) -> dict[str, object]:
        """The key's limits and its counts in the current and the last window."""
        self._roll(tenant, self._clock())
        return usage_report(tenant, tenant.current, tenant.previous, self.length)


def judge(config: KeyConfig, requests: int, tokens: int, asked: int, length: float) -> RateLimitExceeded | None:
    """The refusal of one more request reserving ``asked`` tokens in a window holding these counts."""
    if config.rpm and requests + 1 > config.rpm:
        return RateLimitExceeded(
            f"Rate limit reached for requests: {config.rpm} per {length:g}s.", kind="requests", retry_after=0
        )
    if config.tpm and tokens + asked > config.tpm:
        return RateLimitExceeded(
            f"Rate limit reached for tokens: {config.tpm} per {length:g}s; this request needs {asked}.",
            kind="tokens",
            retry_after=0,
        )
    return None


def quota_or_refusal(
    config: KeyConfig, refusal: RateLimitExceeded | None, requests: int, tokens: int, now: float, length: float
) -> Quota:
    """The quota left after a decision, or the refusal raised with its headers and wait."""
    reset = (math.floor(now / length) + 1) * length - now
    quota = Quota(config, requests, tokens, reset)
    if refusal is None:
        return quota
    refusal.wait(reset)
    refusal.headers.update(quota.headers())
    raise refusal


def usage_report(tenant: Tenant, current: Window, previous: Window, length: float) -> dict[str, object]:
    """What ``GET /v1/usage`` shows of one key."""
    config = tenant.config

    def window(counts: Window) -> dict[str, object]:
        return {"start": counts.index * length, "requests": counts.requests, "tokens": counts.tokens}

    return {
        "key": tenant.name,
        "limits": {
            "rpm": config.rpm,
            "tpm": config.tpm,
            "max_concurrent": config.max_concurrent,
            "priority": config.priority,
            "weight": config.weight,
            "models": list(config.models) if config.models is not None else None,
        },
        "window_seconds": length,
        "current": window(current),
        "previous": window(previous),
        "active": tenant.active,
    }


def estimate(body: bytes | None, payload: Mapping[str, object], default_completion: int) -> tuple[int, int]:
    """The prompt and completion tokens to reserve for a request before its usage is known."""
    prompt = math.ceil(len(body or b"") / BYTES_PER_TOKEN)
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return prompt, value
    return prompt, default_completion
