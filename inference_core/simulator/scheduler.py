"""A vLLM replica's scheduler as the simulator models it: its requests, its prefills, its prefix cache.

It holds what vLLM's v1 ``Scheduler`` holds for cache-aware routing to see: the requests running
and waiting, the prefix cache (``prefix_cache.py``, vLLM's ``KVCacheManager``) and the KV event
publisher (``kv_publisher.py``). The HTTP API asks it to count a request as running while it is
answered (``serving``), to prefill a prompt (``prefilled``), to reset the cache
(``reset_prefix_cache``) and, for tests, to hold event batches back (``steer``); it renders vLLM's
metrics of all this (``metrics``) and the simulator's own view of it for ``/_sim/stats`` (``stats``).

Prefills run one at a time, in arrival order, ``prefill_per_token`` seconds per prompt token not
found in the cache: a replica's prefill throughput is bounded, and queueing behind other prompts
is what makes a loaded one slow. A request counts as waiting until its turn, then as running. Its
admission's events go out as one batch when its prefill ends (vLLM publishes once per engine step,
never an empty batch); the blocks it hit or stored are held until the request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from inference_core.kvcache.events import AllBlocksCleared, Event
from inference_core.simulator.kv_publisher import KVPublisher
from inference_core.simulator.prefix_cache import DEFAULT_BLOCK_SIZE, Adapter, Admission, PrefixCache


class Scheduler:
    """One replica's requests, prefill queue, prefix cache of ``blocks`` blocks (0: none) and KV events."""

    def __init__(
        self,
        *,
        model: str,
        lora: Sequence[str] = (),
        blocks: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefill_per_token: float = 0.0,
        reported_waiting: int = 0,
        kv_events: str = "",
        kv_replay: str = "",
        kv_topic: str = "kv",
    ) -> None:
        if kv_replay and not kv_events:
            raise ValueError("kv_replay needs kv_events: replay serves what the PUB socket sent")
        self.model = model
        self.block_size = block_size
        self.prefill_per_token = prefill_per_token
        #: Added to the waiting requests /metrics reports, to fake a busy server.
        self.reported_waiting = reported_waiting
        #: Requests being answered now (streams until they end), but for those waiting for their prefill.
        self.running = 0
        #: Requests waiting for their turn to prefill.
        self.waiting = 0
        self.cache = PrefixCache(blocks, block_size=block_size) if blocks else None
        # vLLM numbers adapters from 1; the simulator's have no files, so each one's name is its path.
        self.adapters = {name: Adapter(name, number, name) for number, name in enumerate(lora, 1)}
        self.publisher = KVPublisher(kv_events, replay=kv_replay, topic=kv_topic) if kv_events else None
        #: One prefill at a time; asyncio's lock wakes its waiters first come, first served.
        self._prefill = asyncio.Lock()

    @property
    def prefills(self) -> bool:
        """Whether prompts are prefilled here (a prefix cache, or a cost per token); else none need tokenizing."""
        return self.cache is not None or bool(self.prefill_per_token)

    @contextlib.asynccontextmanager
    async def publishing(self) -> AsyncIterator[None]:
        """The KV event sockets, bound for the block's duration: the server's life."""
        if self.publisher is not None:
            self.publisher.start()
        try:
            yield
        finally:
            if self.publisher is not None:
                await self.publisher.close()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Count a request as running for the block's duration."""
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1

    @contextlib.asynccontextmanager
    async def prefilled(self, model: str, prompt: list[int] | None) -> AsyncIterator[int]:
        """Prefill ``prompt`` after those that came before it; the number of its tokens found cached.

        The caller is ``serving``: it counts as waiting instead until its turn. ``None``, a prompt
        that is not modelled, is neither queued nor cached.
        """
        if prompt is None:
            yield 0
            return
        self.running -= 1
        self.waiting += 1
        try:
            await self._prefill.acquire()
        finally:
            self.waiting -= 1
            self.running += 1
        admission: Admission | None = None
        try:
            try:
                if self.cache is not None:
                    admission = self.cache.admit(prompt, self.adapters.get(model))
                cached = 0 if admission is None else admission.cached_tokens
                await asyncio.sleep((len(prompt) - cached) * self.prefill_per_token)
            finally:
                self._prefill.release()
                if admission is not None:
                    self._publish(admission.events)
            yield cached
        finally:
            if admission is not None and self.cache is not None:
                self.cache.release(admission)

    def reset_prefix_cache(self, *, force: bool = False) -> bool:
        """vLLM's: False (nothing done) while running requests hold blocks, unless ``force``.

        Without a modelled cache there is nothing to refuse: the reset is announced all the same.
        """
        events: list[Event] | None = [AllBlocksCleared()] if self.cache is None else self.cache.reset(force=force)
        if events is None:
            return False
        self._publish(events)
        return True

    def steer(self, *, drop: int | None = None, silent: bool | None = None) -> dict[str, Any]:
        """Keep the next ``drop`` event batches, or all while ``silent``, off the PUB socket; its state.

        For testing a subscriber's handling of loss: a withheld batch is still numbered and kept for
        replay, so a subscriber sees a gap in ``seq`` that replay fills. ``LookupError`` when no
        events are published.
        """
        publisher = self.publisher
        if publisher is None:
            raise LookupError("no KV events are published")
        if drop is not None:
            publisher.drop(drop)
        if silent is not None:
            publisher.silent = silent
        return publisher.state()

    def metrics(self) -> str:
        """vLLM's scheduler and prefix-cache metrics, in Prometheus' text format, as vLLM names them."""
        labels = f'{{model_name="{self.model}"}}'
        engine = f'{{model_name="{self.model}",engine="0"}}'
        cache = self.cache
        usage = 0.0 if cache is None else cache.in_use / cache.capacity
        queries, hits = (0, 0) if cache is None else (cache.queries, cache.hits)
        return (
            f"vllm:num_requests_running{labels} {self.running}\n"
            f"vllm:num_requests_waiting{labels} {self.waiting + self.reported_waiting}\n"
            f"vllm:kv_cache_usage_perc{labels} {usage}\n"
            "# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.\n"
            "# TYPE vllm:prefix_cache_queries counter\n"
            f"vllm:prefix_cache_queries_total{engine} {float(queries)}\n"
            "# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.\n"
            "# TYPE vllm:prefix_cache_hits counter\n"
            f"vllm:prefix_cache_hits_total{engine} {float(hits)}\n"
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
            "# TYPE vllm:cache_config_info gauge\n"
            f'vllm:cache_config_info{{block_size="{self.block_size}",'
            f'enable_prefix_caching="{cache is not None}",engine="0"}} 1.0\n'
        )

    def stats(self) -> dict[str, Any]:
        """For ``/_sim/stats``: the cache's blocks and token counts, the event sockets as bound; None if off."""
        cache = self.cache
        prefix_cache = (
            None
            if cache is None
            else {"blocks": len(cache), "in_use": cache.in_use, "hit_tokens": cache.hits, "query_tokens": cache.queries}
        )
        return {"prefix_cache": prefix_cache, "kv_events": None if self.publisher is None else self.publisher.state()}

    def _publish(self, events: list[Event]) -> None:
        """One engine step's events, if any (vLLM sends no empty batch)."""
        if events and self.publisher is not None:
            self.publisher.publish(events)
