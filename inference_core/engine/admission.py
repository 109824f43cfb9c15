"""Admission: at most N requests in flight upstream, the rest waiting in a bounded priority queue.

Waiters are served by priority (lower first, vLLM's convention), first come first served within
one priority. A full queue refuses at once; a waiter that times out or is cancelled (its client
left) leaves the queue at once and never reaches the backend.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

from inference_core.errors import Draining, QueueFull, QueueTimeout


class Admission:
    def __init__(self, *, max_in_flight: int, queue_size: int, queue_timeout: float) -> None:
        self.max_in_flight = max_in_flight
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        self.waiting = 0
        self.closed = False
        self._idle: asyncio.Event | None = None
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def close(self) -> None:
        """Admit nothing new (the gateway is draining); those already queued are still served."""
        self.closed = True

    async def idle(self) -> None:
        """Wait until nothing is in flight or queued."""
        self._idle = asyncio.Event()
        if self.in_flight or self.waiting:
            await self._idle.wait()

    async def acquire(self, priority: int = 0) -> float:
        """Take a slot, waiting for one if need be; returns the seconds spent queued."""
        if self.closed:
            raise Draining("The gateway is shutting down; retry on another instance.")
        if self.in_flight < self.max_in_flight and not self.waiting:
            self.in_flight += 1
            return 0.0
        if self.waiting >= self.queue_size:
            raise QueueFull(f"The request queue is full ({self.queue_size} waiting).")
        started = time.monotonic()
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._order), granted))
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await granted
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self.release()  # the slot arrived as we gave up: pass it on
            else:
                granted.cancel()
                self.waiting -= 1
                self._compact()
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(f"The request waited over {self.queue_timeout:g}s for a slot.") from None
            raise
        return time.monotonic() - started

    def release(self) -> None:
        """Give the slot to the next live waiter, or free it."""
        while self._heap:
            _, _, granted = heapq.heappop(self._heap)
            if not granted.done():
                self.waiting -= 1
                granted.set_result(None)
                return
        self.in_flight -= 1
        if self._idle is not None and not self.in_flight:
            self._idle.set()

    def _compact(self) -> None:
        """Drop abandoned entries once they outnumber the live ones, to bound memory."""
        if len(self._heap) > 2 * self.waiting + 64:
            self._heap = [entry for entry in self._heap if not entry[2].done()]
            heapq.heapify(self._heap)
