"""Admission: at most N requests in flight upstream, the rest waiting in a bounded priority queue.

Each backend has a ``Lane``: its own cap on slots and its own line of waiters, so a slow backend
fills its own lane and never holds up requests for another. Above the lanes the gateway keeps
its total (``INFERENCE_MAX_CONCURRENT_TASKS``) and one bound on everyone waiting
(``INFERENCE_QUEUE_SIZE``). A freed slot goes to the most urgent waiter of any lane that has room:
priority first (lower first, vLLM's convention), then the waiter's fair-share tag. A full queue
refuses at once; a waiter that times out or is cancelled (its client left) leaves the queue at
once and never reaches the backend.

Fair share: within one priority, keys are served in proportion to their weights by start-time
fair queuing. Each waiter gets a virtual finish tag, ``max(now, its key's last tag) + 1 /
weight``, where "now" is the tag of the waiter served last: a key with 2,000 requests waiting
holds tags far ahead, so a key that sends one request now is served next, not after the 2,000;
one key's own requests keep their order. It needs no timer and no scan: one number per key.
Requests without a key share one tag sequence, which is plain first come, first served.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

from inference_core.errors import Draining, QueueFull, QueueTimeout

#: (priority, fair-share tag, arrival, grant)
Waiter = tuple[int, float, int, asyncio.Future[None]]


class Lane:
    """One backend's slots (at most ``max_in_flight``) and its waiters, most urgent first."""

    def __init__(self, name: str, max_in_flight: int) -> None:
        self.name = name
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.waiting = 0
        self.heap: list[Waiter] = []

    def head(self) -> Waiter | None:
        """The most urgent live waiter, if this lane has room for it."""
        if not self.waiting or self.in_flight >= self.max_in_flight:
            return None
        while self.heap[0][3].done():  # abandoned waiters stay in the heap until they surface
            heapq.heappop(self.heap)
        return self.heap[0]


class Admission:
    def __init__(self, *, max_in_flight: int, queue_size: int, queue_timeout: float) -> None:
        self.max_in_flight = max_in_flight
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        self.waiting = 0
        self.closed = False
        self.lanes: dict[str, Lane] = {}
        self._idle: asyncio.Event | None = None
        self._order = itertools.count()
        #: The tag of the waiter served last, and each key's last tag.
        self._virtual = 0.0
        self._tags: dict[str, float] = {}

    def lane(self, name: str, max_in_flight: int) -> Lane:
        """The lane of backend ``name``, capped at ``max_in_flight`` (and at the gateway's total).

        A backend keeps its lane across configuration reloads, so requests that started under the
        old configuration and those under the new one share its cap.
        """
        lane = self.lanes.get(name)
        if lane is None:
            lane = self.lanes[name] = Lane(name, 0)
        lane.max_in_flight = min(max_in_flight, self.max_in_flight)
        self._dispatch()
        return lane

    def close(self) -> None:
        """Admit nothing new (the gateway is draining); those already queued are still served."""
        self.closed = True

    async def idle(self) -> None:
        """Wait until nothing is in flight or queued."""
        self._idle = asyncio.Event()
        if self.in_flight or self.waiting:
            await self._idle.wait()

    async def acquire(self, lane: Lane, priority: int = 0, *, share: str = "", weight: float = 1.0) -> float:
        """Take a slot in ``lane``, waiting for one if need be; returns the seconds spent queued.

        ``share`` names the key the request counts against, ``weight`` that key's share.
        """
        if self.closed:
            raise Draining("The gateway is shutting down; retry on another instance.")
        if self.in_flight < self.max_in_flight and lane.in_flight < lane.max_in_flight and not lane.waiting:
            self.in_flight += 1
            lane.in_flight += 1
            return 0.0
        if self.waiting >= self.queue_size:
            raise QueueFull(f"The request queue is full ({self.queue_size} waiting).")
        started = time.monotonic()
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        tag = max(self._virtual, self._tags.get(share, 0.0)) + 1 / weight
        self._tags[share] = tag
        heapq.heappush(lane.heap, (priority, tag, next(self._order), granted))
        lane.waiting += 1
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await granted
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self.release(lane)  # the slot arrived as we gave up: pass it on
            else:
                granted.cancel()
                lane.waiting -= 1
                self.waiting -= 1
                self._compact(lane)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(f"The request waited over {self.queue_timeout:g}s for a slot.") from None
            raise
        return time.monotonic() - started

    def release(self, lane: Lane) -> None:
        """Free a slot of ``lane`` and hand slots to the most urgent waiters that may take them."""
        lane.in_flight -= 1
        self.in_flight -= 1
        self._dispatch()
        if self._idle is not None and not self.in_flight:
            self._idle.set()

    def _dispatch(self) -> None:
        while self.in_flight < self.max_in_flight:
            best: Lane | None = None
            best_head: Waiter | None = None
            for lane in self.lanes.values():
                head = lane.head()
                if head is not None and (best_head is None or head[:3] < best_head[:3]):
                    best, best_head = lane, head
            if best is None or best_head is None:
                return
            heapq.heappop(best.heap)
            best.waiting -= 1
            self.waiting -= 1
            best.in_flight += 1
            self.in_flight += 1
            self._virtual = max(self._virtual, best_head[1])
            best_head[3].set_result(None)

    @staticmethod
    def _compact(lane: Lane) -> None:
        """Drop abandoned entries once they outnumber the live ones, to bound memory."""
        if len(lane.heap) > 2 * lane.waiting + 64:
            lane.heap = [entry for entry in lane.heap if not entry[3].done()]
            heapq.heapify(lane.heap)
