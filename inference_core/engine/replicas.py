"""Replicas of one backend, their health, and how a request picks one.

Each replica has its own connection pool, in-flight count and health. Failures (a probe, a
refused connection, a 5xx, a timeout) count up; ``eject_after`` in a row take the replica out
of rotation for a cooldown that doubles each time it is ejected again soon after coming back
(1 s, 2 s, 4 s ... 60 s). A successful probe after the cooldown brings it back. Requests'
failures never eject the last replica in rotation; failing probes do.

Policies (``INFERENCE_LB_POLICY``):

- ``least_outstanding``: the less busy of two replicas drawn at random (power of two choices).
- ``round_robin``: each in turn.
- ``load_aware``: the lowest score from the replica's own ``/metrics`` (2 x waiting + running +
  KV-cache use), scraped with every probe; stale or missing figures fall back to in-flight count.
- ``prefix_affinity``: the same prompt prefix (or ``user``) goes to the same replica, by
  rendezvous hashing, so its prefix cache hits; a replica busier than the least busy by more
  than ``AFFINITY_SLACK`` requests is passed over, so one hot prefix cannot swamp it.
- ``cache_aware``: the replica whose KV cache holds most of the prompt, by what the replicas'
  own KV events say (``inference_core.kvcache``), weighed against load (``cache_score``); a
  replica busier than the least busy by more than ``kv_load_slack`` requests is passed over
  (the saturation release). Ties go by rendezvous hashing of the first block none of them holds,
  so a new prefix picks one replica, the same in every gateway.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from inference_core.config import LBPolicy
from inference_core.errors import NoHealthyBackend
from inference_core.kvcache.feed import Feed
from inference_core.kvcache.index import Key, Prompt
from inference_core.providers.base import Payload, Provider
from inference_core.upstream import Transport

MAX_COOLDOWN_SECONDS = 60.0
#: Ejected again within this long of coming back counts as "repeated": the cooldown doubles.
REPEAT_WINDOW_SECONDS = 60.0
AFFINITY_SLACK = 4
PREFIX_CHARS = 256
#: cache_aware: what a whole prompt held is worth against load. A replica holding all of the
#: prompt while busier than the least busy by the whole slack scores as an idle one holding half:
#: prefill of an uncached prompt costs more than waiting behind a few requests, up to the slack.
CACHE_LOAD_WEIGHT = 0.5


@dataclass(frozen=True, slots=True)
class Load:
    """What a vLLM replica said about itself, and when."""

    waiting: float
    running: float
    kv_cache: float
    at: float

    def score(self) -> float:
        return 2 * self.waiting + self.running + self.kv_cache


class Replica:
    def __init__(self, index: int, root: str, transport: Transport, provider: Provider) -> None:
        parts = urlsplit(root)
        #: A bounded, secret-free label (never the URL, which may carry credentials).
        self.name = f"r{index}"
        self.address = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        self.transport = transport
        #: Its own translator: what it learns (vLLM's version) is this replica's, as fleets mix versions.
        self.provider = provider
        self.discovered = False
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.ejections = 0
        self.healthy = True
        self.failures = 0
        self.ejected_until = 0.0
        self._readmitted_at = -REPEAT_WINDOW_SECONDS
        self._strikes = 0
        self.models: frozenset[str] | None = None
        self.load: Load | None = None
        self.probe_ok: bool | None = None
        self.probe_ms: float | None = None
        self.probed_at = 0.0
        #: Its KV-event feed, under cache_aware with ``kv_events`` given.
        self.kv: Feed | None = None

    def queue(self, now: float, stale_after: float) -> float:
        """Requests ahead of a new one here: the gateway's own in flight, or what vLLM last reported
        (every gateway's, running and waiting) if that is more and recent."""
        load = self.load
        if load is not None and now - load.at <= stale_after:
            return max(self.in_flight, load.waiting + load.running)
        return self.in_flight

    def serves(self, model: object) -> bool:
        return self.models is None or model is None or model in self.models

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self, *, eject_after: int) -> bool:
        """Count a failure; returns True if it ejected the replica."""
        self.failures += 1
        if not self.healthy or self.failures < eject_after:
            return False
        now = time.monotonic()
        self._strikes = self._strikes + 1 if now - self._readmitted_at < REPEAT_WINDOW_SECONDS else 1
        self.healthy = False
        self.ejections += 1
        self.ejected_until = now + min(MAX_COOLDOWN_SECONDS, 2.0 ** (self._strikes - 1))
        return True

    def probed(self, ok: bool, latency_ms: float) -> None:
        self.probe_ok, self.probe_ms, self.probed_at = ok, latency_ms, time.monotonic()
        if ok and not self.healthy and self.probed_at >= self.ejected_until:
            self.healthy, self.failures, self._readmitted_at = True, 0, self.probed_at

    def report(self) -> dict[str, object]:
        return {
            "name": self.name,
            "address": self.address,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "version": self.provider.version,
            "last_probe": {
                "ok": self.probe_ok,
                "latency_ms": None if self.probe_ms is None else round(self.probe_ms, 2),
                "age_s": round(time.monotonic() - self.probed_at, 2) if self.probe_ok is not None else None,
            },
            "load": None if self.load is None else {"waiting": self.load.waiting, "running": self.load.running,
                                                    "kv_cache": self.load.kv_cache},
            **({} if self.kv is None else {"kv_index": self.kv.report()}),
        }  # fmt: skip


def _prefix_key(payload: Payload) -> bytes:
    user = payload.get("user")
    if isinstance(user, str) and user:
        return b"user:" + user.encode()
    source = payload.get("messages") or payload.get("prompt") or payload.get("input") or ""
    return repr(source)[:PREFIX_CHARS].encode(errors="replace")


def _weight(key: bytes, replica: Replica) -> bytes:
    return hashlib.blake2b(key + replica.name.encode(), digest_size=8).digest()


def cache_score(held: int, blocks: int, excess: float, slack: int) -> float:
    """A replica's worth for a prompt under cache_aware (higher is better).

    The share of the prompt's ``blocks`` it holds from the start, less ``CACHE_LOAD_WEIGHT`` times
    its load beyond the least busy candidate's (``excess``) as a share of the ``slack``.
    """
    share = held / blocks if blocks else 0.0
    return share - CACHE_LOAD_WEIGHT * excess / max(slack, 1)


class Balancer:
    """Picks a healthy replica that serves the model, by policy."""

    def __init__(
        self, replicas: Sequence[Replica], policy: LBPolicy, *, eject_after: int, stale_after: float, slack: int = 8
    ) -> None:
        self.replicas = list(replicas)
        self.policy = policy
        self.eject_after = eject_after
        self.stale_after = stale_after
        #: cache_aware's saturation release (``kv_load_slack``).
        self.slack = slack
        self._turn = itertools.count()

    def healthy(self) -> list[Replica]:
        return [replica for replica in self.replicas if replica.healthy]

    def pick(self, payload: Payload, tried: Iterable[Replica] = (), prompt: Prompt | None = None) -> Replica:
        """A replica for ``payload``, preferring ones this call has not tried yet.

        ``prompt`` is the request's prompt as tokens, for cache_aware (None: routed by load).
        """
        model = payload.get("model")
        healthy = self.healthy()
        # A model no replica lists goes anywhere: the backend's own 404 is the right answer.
        candidates = [replica for replica in healthy if replica.serves(model)] or healthy
        fresh = [replica for replica in candidates if replica not in tried]
        candidates = fresh or candidates
        if not candidates:
            raise NoHealthyBackend("No healthy backend replica can serve this request right now.")
        if len(candidates) == 1:
            return candidates[0]
        if self.policy is LBPolicy.ROUND_ROBIN:
            return candidates[next(self._turn) % len(candidates)]
        if self.policy is LBPolicy.PREFIX_AFFINITY:
            key = _prefix_key(payload)
            preferred = max(candidates, key=lambda replica: _weight(key, replica))
            least = min(replica.in_flight for replica in candidates)
            if preferred.in_flight <= least + AFFINITY_SLACK:
                return preferred
            return min(candidates, key=lambda replica: replica.in_flight)
        if self.policy is LBPolicy.CACHE_AWARE:
            return self._cache_aware(candidates, prompt)
        if self.policy is LBPolicy.LOAD_AWARE:
            now = time.monotonic()
            if all(r.load is not None and now - r.load.at <= self.stale_after for r in candidates):
                return min(candidates, key=lambda replica: (replica.load.score(), replica.in_flight))  # type: ignore[union-attr]
        first, second = random.sample(candidates, 2)
        return first if first.in_flight <= second.in_flight else second

    def _cache_aware(self, candidates: list[Replica], prompt: Prompt | None) -> Replica:
        now = time.monotonic()
        queues = [replica.queue(now, self.stale_after) for replica in candidates]
        least = min(queues)
        best: list[Replica] = []
        top = -math.inf
        tie: Key | None = None
        for replica, queue in zip(candidates, queues, strict=True):
            if queue > least + self.slack:
                continue  # saturated: whatever it holds, one hot prefix must not swamp it
            held, keys = replica.kv.held(prompt) if prompt is not None and replica.kv is not None else (0, [])
            score = cache_score(held, len(keys), queue - least, self.slack)
            if score > top:
                best, top = [replica], score
                tie = keys[min(held, len(keys) - 1)] if keys else None  # the first block it lacks
            elif score == top:
                best.append(replica)
        if len(best) == 1:
            return best[0]
        if tie is None:
            return random.choice(best)
        key = tie.to_bytes(8, "big", signed=True)
        return max(best, key=lambda replica: _weight(key, replica))
