"""The simulator's KV-cache events on ZMQ, sent exactly as vLLM's ``ZmqEventPublisher`` sends them.

A PUB socket carries each batch as a multipart message ``(topic, seq, payload)``: ``seq`` 8 bytes
big-endian, from 0 in each process; ``payload`` the msgpack of ``inference_core.kvcache.events``.
The last ``BUFFER_STEPS`` batches are kept for replay on a ROUTER socket: a DEALER sends
``[b"", start_seq]`` and gets ``(b"", topic, seq, payload)`` for every kept batch from
``start_seq`` on, then ``(b"", b"", END_SEQ, b"")``. Unlike vLLM, which connects to an endpoint
without a wildcard, both endpoints are always bound: a simulator is the server its gateway dials.

Sending is synchronous: a PUB socket never blocks (past its high-water mark it drops, as vLLM's
does), so a batch leaves from the coroutine that finished the step, in ``seq`` order, with no
queue or thread between. Replay requests are served by a task on the event loop (``zmq.asyncio``).

Test hooks, for a subscriber's handling of loss: ``drop(n)`` keeps the next ``n`` batches off PUB
(still kept for replay: the subscriber sees a gap in ``seq`` that replay fills); ``silent`` keeps
every batch off PUB until cleared (still numbered and kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

from inference_core.kvcache.events import END_SEQ, Event, encode, seq_bytes, seq_of

logger = logging.getLogger(__name__)

#: Batches kept for replay (vLLM's ``buffer_steps``).
BUFFER_STEPS = 10_000
#: PUB's high-water mark (vLLM's ``hwm``).
HWM = 100_000


class KVPublisher:
    """Publishes one replica's event batches; ``start`` binds, ``close`` unbinds at once."""

    def __init__(self, endpoint: str, *, replay: str = "", topic: str = "", buffer_steps: int = BUFFER_STEPS) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay
        self.topic = topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0
        #: Batches still to keep off PUB (``drop``), and whether all are (``silent``).
        self.dropping = 0
        self.silent = False
        self._context: zmq.asyncio.Context | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Bind the sockets (on the running event loop, which serves replay)."""
        self._context = zmq.asyncio.Context()
        self._pub = zmq.Socket(self._context, zmq.PUB)
        self._pub.set_hwm(HWM)
        self._pub.bind(self.endpoint)
        # As bound: port 0 becomes the port the system chose.
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.replay_endpoint:
            self._router = self._context.socket(zmq.ROUTER)
            self._router.bind(self.replay_endpoint)
            self.replay_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay(self._router))

    async def close(self) -> None:
        """Unbind with linger 0, so a restarted simulator binds the same ports at once."""
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        if self._context is not None:
            self._context.term()
        self._pub = self._router = self._context = self._replay_task = None

    def publish(self, events: list[Event]) -> int:
        """Number, keep and send one batch; its ``seq``."""
        seq = self._next_seq
        self._next_seq += 1
        payload = encode(events, time.time())
        self._buffer.append((seq, payload))
        if self.silent:
            pass
        elif self.dropping:
            self.dropping -= 1
        elif self._pub is not None:
            self._pub.send_multipart((self.topic, seq_bytes(seq), payload), flags=zmq.NOBLOCK)
        return seq

    def drop(self, batches: int) -> None:
        """Keep the next ``batches`` batches off PUB, for replay only."""
        self.dropping = batches

    def state(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint,
            "next_seq": self._next_seq,
            "dropping": self.dropping,
            "silent": self.silent,
        }

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3:
                logger.warning("invalid KV replay request of %d frames", len(frames))
                continue
            client, _, start = frames
            first = seq_of(start)
            try:
                for seq, payload in list(self._buffer):
                    if seq >= first:
                        await router.send_multipart((client, b"", self.topic, seq_bytes(seq), payload))
                await router.send_multipart((client, b"", b"", END_SEQ, b""))
            except zmq.ZMQError:
                logger.exception("KV replay failed")  # that client's replay only: serve the next
