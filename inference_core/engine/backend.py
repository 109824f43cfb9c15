"""One configured backend: its replicas and their balancer, its slots, rate limit and dialect.

Built from one ``backends:`` block of the configuration file, or from the ``INFERENCE_*``
variables as the backend named ``default``. The engine sends requests through backends without
knowing how many there are; the health monitor reaches replicas through the side doors here
(probes, discovery, load scrapes, model lists), which never queue.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from fnmatch import fnmatchcase
from typing import Any

import orjson
import zmq.asyncio

from inference_core.config import LBPolicy, ProviderType
from inference_core.config_file import BackendConfig
from inference_core.endpoints import Endpoint
from inference_core.engine import retry
from inference_core.engine.admission import Lane
from inference_core.engine.ratelimit import RateLimiter
from inference_core.engine.replicas import Balancer, Load, Replica
from inference_core.errors import GatewayError, NoHealthyBackend, UpstreamStatusError
from inference_core.kvcache.feed import Feed
from inference_core.kvcache.index import Prompt
from inference_core.providers.base import Provider
from inference_core.providers.openai import OpenAIProvider
from inference_core.providers.vllm import VLLMProvider
from inference_core.upstream import UpstreamResponse, create_transport

log = logging.getLogger("inference_core")
PROBE_TIMEOUT_SECONDS = 5.0
#: A replica's /tokenize is on the request path (cache_aware without a tokenizer directory): brief.
TOKENIZE_TIMEOUT_SECONDS = 2.0
TOKENIZE_LOG_INTERVAL_SECONDS = 60.0
#: The chat fields vLLM's /tokenize takes that change what the chat template renders.
_TEMPLATE_FIELDS = (
    "messages", "tools", "documents", "chat_template", "chat_template_kwargs", "add_generation_prompt",
    "continue_final_message", "add_special_tokens",
)  # fmt: skip
#: In ``vllm:cache_config_info``: the block size, known to cache_aware before the replica's first event.
_BLOCK_SIZE = re.compile(r'block_size="(\d+)"')
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
        kv_load_slack: int = 8,
        kv_events_silence: float = 10.0,
        kv_index_blocks: int = 200_000,
    ) -> None:
        """Raises ValueError if its ``tokenizer`` directory cannot be loaded."""
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
            for index, root in enumerate(config.urls)
        ]
        self.balancer = Balancer(
            replicas, config.lb_policy, eject_after=eject_after, stale_after=stale_after, slack=kv_load_slack
        )
        self.replicas = self.balancer.replicas
        #: Routed on its replicas' KV events: cache_aware, with at least one replica's events named.
        self.cache_aware = False
        self.tokenizer = None
        self._zmq: zmq.asyncio.Context | None = None
        if config.lb_policy is LBPolicy.CACHE_AWARE:
            if any(replica.kv_events for replica in config.base_url):
                self.cache_aware = True
                self._zmq = zmq.asyncio.Context()
                for replica, given in zip(replicas, config.base_url, strict=True):
                    if given.kv_events:
                        replica.kv = Feed(
                            self._zmq,
                            endpoint=given.kv_events,
                            replay=given.kv_replay,
                            capacity=kv_index_blocks,
                            silence=kv_events_silence,
                            fields={"backend": name, "replica": replica.name},
                        )
            if config.tokenizer is not None:
                # Imported here: Hugging Face's tokenizers is an optional extra, loaded only where it serves.
                from inference_core.kvcache.tokenizer import PromptTokenizer

                self.tokenizer = PromptTokenizer.load(config.tokenizer)
        #: When a prompt that could not be tokenized was last logged (once a minute at most, not per request).
        self._untokenized_logged_at = -TOKENIZE_LOG_INTERVAL_SECONDS
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
        if self.config.lb_policy is LBPolicy.CACHE_AWARE and not self.cache_aware:
            log.warning("cache_aware without kv_events: routed by load", extra={"fields": {"backend": self.name}})
        for replica in self.replicas:
            await replica.transport.start()
            if replica.kv is not None:
                replica.kv.start()

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.transport.aclose()
            if replica.kv is not None:
                await replica.kv.aclose()
        if self._zmq is not None:
            self._zmq.destroy(linger=0)  # closes any socket left, so it cannot hang

    async def prompt(self, endpoint: Endpoint, payload: dict[str, Any]) -> Prompt | None:
        """The request's prompt as tokens, for cache_aware; None (routed by load) when it has none or
        cannot be tokenized: by the backend's tokenizer directory, else by a replica's /tokenize.

        Only called under cache_aware.
        """
        if not endpoint.prompted:
            return None
        try:
            if self.tokenizer is not None:
                tokens = await self.tokenizer.tokens_async(payload)
            else:
                tokens = await self._tokenized(payload)
        except (ValueError, GatewayError) as exc:
            now = time.monotonic()
            if now - self._untokenized_logged_at >= TOKENIZE_LOG_INTERVAL_SECONDS:
                fields = {"backend": self.name, "reason": str(exc)[:200]}
                log.warning("prompt not tokenized; routed by load", extra={"fields": fields})
                self._untokenized_logged_at = now
            return None
        model = payload.get("model")
        return Prompt(tokens, model if isinstance(model, str) else None)

    async def _tokenized(self, payload: dict[str, Any]) -> list[int]:
        """A replica's own token ids for the prompt (vLLM's ``POST /tokenize``)."""
        replicas = self.balancer.healthy()
        if not replicas:
            raise NoHealthyBackend("No healthy backend replica can tokenize right now.")
        fields = _TEMPLATE_FIELDS if "messages" in payload else ("prompt", "add_special_tokens")
        body = orjson.dumps({"model": payload.get("model"), **{f: payload[f] for f in fields if f in payload}})
        replica = random.choice(replicas)
        headers = {**self.auth, "Content-Type": "application/json", "X-Request-Id": "tokenize"}
        response = await replica.transport.request(
            "POST", "../tokenize", headers=headers, body=body, within=TOKENIZE_TIMEOUT_SECONDS
        )
        answer = await response.read()
        if response.status >= 400:
            raise upstream_error(replica.provider, response, answer)
        parsed = orjson.loads(answer)
        tokens = parsed.get("tokens") if isinstance(parsed, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(token, int) for token in tokens):
            raise ValueError("the replica's /tokenize answer has no token ids")
        return tokens

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
            found = _BLOCK_SIZE.search(line) if name == "vllm:cache_config_info" else None
            if found is not None and replica.kv is not None:
                replica.kv.index.learn_block_size(int(found[1]))
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
