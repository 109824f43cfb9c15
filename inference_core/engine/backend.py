"""One configured backend: its replicas and their balancer, its slots, rate limit and dialect.

Built from one ``backends:`` block of the configuration file, or from the ``INFERENCE_*``
variables as the backend named ``default``. The engine sends requests through backends without
knowing how many there are; the health monitor reaches replicas through the side doors here
(probes, discovery, load scrapes, model lists), which never queue.
"""

from __future__ import annotations

import asyncio
import time
from fnmatch import fnmatchcase
from typing import Any

import orjson

from inference_core.config import ProviderType
from inference_core.config_file import BackendConfig
from inference_core.endpoints import Endpoint
from inference_core.engine import retry
from inference_core.engine.admission import Lane
from inference_core.engine.ratelimit import RateLimiter
from inference_core.engine.replicas import Balancer, Load, Replica
from inference_core.errors import GatewayError, NoHealthyBackend, UpstreamStatusError
from inference_core.providers.base import Provider
from inference_core.providers.openai import OpenAIProvider
from inference_core.providers.vllm import VLLMProvider
from inference_core.upstream import UpstreamResponse, create_transport

PROBE_TIMEOUT_SECONDS = 5.0
_LOAD_GAUGES = {
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv_cache",
}


def _provider(kind: ProviderType, drop_unsupported: bool) -> Provider:
    return OpenAIProvider(drop_unsupported=drop_unsupported) if kind is ProviderType.OPENAI else VLLMProvider()


class Backend:
    def __init__(
        self,
        name: str,
        config: BackendConfig,
        *,
        lane: Lane,
        rate_limiter: RateLimiter | None,
        idle_connections: int,
        eject_after: int,
        stale_after: float,
        drop_unsupported: bool,
    ) -> None:
        self.name = name
        self.config = config
        self.kind = config.provider
        self.lane = lane
        self.timeout = config.timeout
        replicas = [
            Replica(
                index,
                root,
                create_transport(root, idle_connections=idle_connections, timeout=config.timeout),
                _provider(config.provider, drop_unsupported),
            )
            for index, root in enumerate(config.base_url)
        ]
        self.balancer = Balancer(replicas, config.lb_policy, eject_after=eject_after, stale_after=stale_after)
        self.replicas = self.balancer.replicas
        self.rate_limiter = rate_limiter
        key = config.api_key.get_secret_value()
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        #: Calls using this backend, queued or in flight (a removed backend closes at zero).
        self.calls = 0
        self._unused: asyncio.Event | None = None

    def serves(self, model: str) -> bool:
        """Its declared ``models`` globs say so, or, without them, one of its replicas lists it."""
        if self.config.models is not None:
            return any(fnmatchcase(model, pattern) for pattern in self.config.models)
        return any(replica.models is not None and model in replica.models for replica in self.replicas)

    @property
    def knows_models(self) -> bool:
        """It declared its models, or a replica has listed them."""
        return self.config.models is not None or any(replica.models is not None for replica in self.replicas)

    def can_serve(self, endpoint: Endpoint) -> bool:
        return self.kind is ProviderType.VLLM or not endpoint.vllm_only

    def enter(self) -> None:
        self.calls += 1

    def leave(self) -> None:
        self.calls -= 1
        if not self.calls and self._unused is not None:
            self._unused.set()

    async def unused(self) -> None:
        """Wait until no call is using this backend."""
        self._unused = asyncio.Event()
        if self.calls:
            await self._unused.wait()

    async def start(self) -> None:
        for replica in self.replicas:
            await replica.transport.start()

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.transport.aclose()

    def report(self) -> dict[str, Any]:
        replicas = self.replicas
        lane = self.lane
        return {
            "name": self.name,
            "provider": self.kind.value,
            "reachable": any(replica.probe_ok for replica in replicas),
            "healthy_replicas": sum(replica.healthy for replica in replicas),
            "in_flight": lane.in_flight,
            "queued": lane.waiting,
            "concurrency_limit": lane.max_in_flight,
            "replicas": [replica.report() for replica in replicas],
        }

    # Side doors: outside the queue, never retried.

    async def get(self, replica: Replica, path: str, request_id: str) -> bytes:
        headers = {**self.auth, "X-Request-Id": request_id}
        response = await replica.transport.request("GET", path, headers=headers, within=PROBE_TIMEOUT_SECONDS)
        body = await response.read()
        if response.status >= 400:
            raise upstream_error(replica.provider, response, body)
        return body

    async def discover(self, replica: Replica) -> None:
        """Ask a replica what it is (vLLM's version decides how to translate), until it says.

        Called by the health monitor at start-up and with every probe, never on the request path.
        """
        path = replica.provider.discovery_path
        if path is None or replica.discovered:
            return
        try:
            replica.provider.learn(await self.get(replica, path, "discovery"))
            replica.discovered = True
        except (GatewayError, ValueError):
            pass  # the next probe asks again; until then the provider assumes a current backend

    async def probe(self, replica: Replica) -> tuple[bool, float]:
        """Is this replica answering, and how fast (ms)? Also learns the models it serves."""
        started = time.perf_counter()
        try:
            await self.get(replica, replica.provider.health_path, "health-probe")
            ok = True
        except GatewayError:
            ok = False
        latency = (time.perf_counter() - started) * 1000
        if ok:
            try:
                listed = model_entries(await self.get(replica, "models", "health-probe"))
                replica.models = frozenset(entry["id"] for entry in listed)
            except GatewayError:
                pass
        return ok, latency

    async def scrape_load(self, replica: Replica) -> None:
        """Read a vLLM replica's own queue figures from its ``/metrics``."""
        try:
            text = (await self.get(replica, "../metrics", "load-scrape")).decode(errors="replace")
        except GatewayError:
            return
        figures = dict.fromkeys(_LOAD_GAUGES.values(), 0.0)
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in _LOAD_GAUGES:
                try:
                    figures[_LOAD_GAUGES[name]] += float(line.rsplit(" ", 1)[1])
                except (IndexError, ValueError):
                    continue
        replica.load = Load(figures["waiting"], figures["running"], figures["kv_cache"], time.monotonic())

    async def models(self, request_id: str) -> bytes:
        """The models it serves: one replica's list as written, or the union of its replicas' lists.

        With declared ``models`` globs, only what they match, plus each plain name they give.
        """
        replicas = self.balancer.healthy()
        if not replicas:
            raise NoHealthyBackend("No healthy backend replica can list models right now.")
        declared = self.config.models
        if len(self.replicas) == 1 and declared is None:
            return await self.get(replicas[0], "models", request_id)  # relayed as the backend wrote it
        answers = await asyncio.gather(*(self.get(r, "models", request_id) for r in replicas), return_exceptions=True)
        merged: dict[str, object] = {}
        for answer in answers:
            for entry in model_entries(answer):
                if declared is None or self.serves(entry["id"]):
                    merged.setdefault(entry["id"], entry)
        for name in declared or ():
            if not any(sign in name for sign in "*?["):
                merged.setdefault(name, model_entry(name, self.name))
        if not merged and isinstance(answers[0], GatewayError):
            raise answers[0]
        return orjson.dumps({"object": "list", "data": list(merged.values())})


def upstream_error(provider: Provider, response: UpstreamResponse, body: bytes) -> UpstreamStatusError:
    """A backend's error answer as the gateway's error, keeping its ``Retry-After``."""
    error = provider.classify_error(response.status, body)
    error.retry_after = retry.retry_after(response.headers)
    if "retry-after" in response.headers:
        error.headers["retry-after"] = response.headers["retry-after"]
    return error


def model_entry(name: str, owner: str) -> dict[str, object]:
    """A ``/v1/models`` entry for a name no backend listed (an alias, a declared model)."""
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


def model_entries(answer: object) -> list[dict[str, Any]]:
    """The entries of a ``/models`` body that have an id; nothing for an error or a malformed body."""
    if not isinstance(answer, bytes):
        return []
    try:
        data = orjson.loads(answer).get("data")
    except (orjson.JSONDecodeError, AttributeError):
        return []
    return (
        [entry for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
        if isinstance(data, list)
        else []
    )
